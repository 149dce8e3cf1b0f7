"""Architecture config of Qwen3-VL (the SpatialReward backbone), readable from HF `config.json`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, ClassVar

from sr_jax.config import apply_overrides, from_dict, load_yaml, read_hf_config, to_dict
from sr_jax.models import ImageConstants
from sr_jax.special_tokens import IMAGE_PAD_ID, VIDEO_PAD_ID, VISION_END_ID, VISION_START_ID

MODEL_TYPE = "qwen3_vl"  # HF config.json's, the key of this family in `sr_jax.models`
IMAGE = ImageConstants(patch_size=16, temporal_patch_size=2, merge_size=2)

PRESET_DIR = Path(__file__).resolve().parents[3] / "configs" / "model"


def _config_hash(self) -> int:
    # Modules keep their config as a static attribute, and JAX hashes static graph data.
    return hash(json.dumps(to_dict(self), sort_keys=True))


@dataclasses.dataclass
class VisionConfig:
    __hash__ = _config_hash

    depth: int = 27
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = IMAGE.patch_size
    temporal_patch_size: int = IMAGE.temporal_patch_size
    spatial_merge_size: int = IMAGE.merge_size
    out_hidden_size: int = 4096
    num_position_embeddings: int = 2304
    deepstack_visual_indexes: list[int] = dataclasses.field(default_factory=lambda: [8, 16, 24])
    hidden_act: str = "gelu_pytorch_tanh"
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


@dataclasses.dataclass
class TextConfig:
    __hash__ = _config_hash

    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 12288
    num_hidden_layers: int = 36
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 5_000_000.0
    mrope_section: list[int] = dataclasses.field(default_factory=lambda: [24, 20, 20])
    hidden_act: str = "silu"
    attention_bias: bool = False
    max_position_embeddings: int = 262144


@dataclasses.dataclass
class ModelConfig:
    __hash__ = _config_hash
    model_type: ClassVar[str] = MODEL_TYPE

    text: TextConfig = dataclasses.field(default_factory=TextConfig)
    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    tie_word_embeddings: bool = False
    image_token_id: int = IMAGE_PAD_ID
    video_token_id: int = VIDEO_PAD_ID
    vision_start_token_id: int = VISION_START_ID
    vision_end_token_id: int = VISION_END_ID
    # Runtime numerics, not architecture: compute dtype and stored-parameter dtype.
    dtype: str = "float32"
    param_dtype: str = "float32"
    # auto | cpu | splash | cudnn: the attention kernel (sr_jax.models.attention); auto picks the
    # one for the platform the step is compiled for.
    attention_backend: str = "auto"
    # Full passes run the decoder layers (after the deepstack ones) and the vision blocks between
    # deepstack taps as lax.scans (layers.scan_layers): much smaller programs, faster compiles.
    scan_layers: bool = False

    # ---- Hugging Face config.json <-> ModelConfig ----
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        if "text_config" not in d or "vision_config" not in d:
            raise ValueError("not a Qwen3-VL config: 'text_config' and 'vision_config' are required")
        t, v = d["text_config"], d["vision_config"]
        rope = dict(t.get("rope_parameters") or t.get("rope_scaling") or {})
        text = TextConfig(
            vocab_size=t.get("vocab_size", 151936),
            hidden_size=t["hidden_size"],
            intermediate_size=t["intermediate_size"],
            num_hidden_layers=t["num_hidden_layers"],
            num_attention_heads=t["num_attention_heads"],
            num_key_value_heads=t.get("num_key_value_heads") or t["num_attention_heads"],
            head_dim=t.get("head_dim") or t["hidden_size"] // t["num_attention_heads"],
            rms_norm_eps=t.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope.get("rope_theta", t.get("rope_theta", 5_000_000.0))),
            mrope_section=list(rope.get("mrope_section", [24, 20, 20])),
            hidden_act=t.get("hidden_act", "silu"),
            attention_bias=bool(t.get("attention_bias", False)),
            max_position_embeddings=t.get("max_position_embeddings", 262144),
        )
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "mrope"):
            raise ValueError(f"unsupported text rope_type {rope_type!r} (only the default M-RoPE is implemented)")
        vrope = v.get("rope_parameters") or {}
        vision = VisionConfig(
            depth=v["depth"],
            hidden_size=v["hidden_size"],
            intermediate_size=v["intermediate_size"],
            num_heads=v["num_heads"],
            in_channels=v.get("in_channels", 3),
            patch_size=v.get("patch_size", 16),
            temporal_patch_size=v.get("temporal_patch_size", 2),
            spatial_merge_size=v.get("spatial_merge_size", 2),
            out_hidden_size=v["out_hidden_size"],
            num_position_embeddings=v.get("num_position_embeddings", 2304),
            deepstack_visual_indexes=list(v.get("deepstack_visual_indexes", [8, 16, 24])),
            hidden_act=v.get("hidden_act", "gelu_pytorch_tanh"),
            rope_theta=float(vrope.get("rope_theta", 10000.0)),
        )
        tie = d.get("tie_word_embeddings", t.get("tie_word_embeddings", False))
        return cls(
            text=text,
            vision=vision,
            tie_word_embeddings=bool(tie),
            image_token_id=d.get("image_token_id", IMAGE_PAD_ID),
            video_token_id=d.get("video_token_id", VIDEO_PAD_ID),
            vision_start_token_id=d.get("vision_start_token_id", VISION_START_ID),
            vision_end_token_id=d.get("vision_end_token_id", VISION_END_ID),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        t, v = self.text, self.vision
        return {
            "architectures": ["Qwen3VLForConditionalGeneration"],
            "model_type": MODEL_TYPE,
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
            "text_config": {
                "model_type": "qwen3_vl_text",
                "vocab_size": t.vocab_size,
                "hidden_size": t.hidden_size,
                "intermediate_size": t.intermediate_size,
                "num_hidden_layers": t.num_hidden_layers,
                "num_attention_heads": t.num_attention_heads,
                "num_key_value_heads": t.num_key_value_heads,
                "head_dim": t.head_dim,
                "rms_norm_eps": t.rms_norm_eps,
                "hidden_act": t.hidden_act,
                "attention_bias": t.attention_bias,
                "max_position_embeddings": t.max_position_embeddings,
                "tie_word_embeddings": self.tie_word_embeddings,
                "rope_parameters": {
                    "rope_type": "default",
                    "rope_theta": t.rope_theta,
                    "mrope_section": list(t.mrope_section),
                    "mrope_interleaved": True,
                },
            },
            "vision_config": {
                "model_type": "qwen3_vl_vision",
                "depth": v.depth,
                "hidden_size": v.hidden_size,
                "intermediate_size": v.intermediate_size,
                "num_heads": v.num_heads,
                "in_channels": v.in_channels,
                "patch_size": v.patch_size,
                "temporal_patch_size": v.temporal_patch_size,
                "spatial_merge_size": v.spatial_merge_size,
                "out_hidden_size": v.out_hidden_size,
                "num_position_embeddings": v.num_position_embeddings,
                "deepstack_visual_indexes": list(v.deepstack_visual_indexes),
                "hidden_act": v.hidden_act,
                "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta},
            },
        }

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> "ModelConfig":
        cfg = Path(path) / "config.json"
        data = read_hf_config(path)
        try:
            return cls.from_hf_dict(data)
        except KeyError as e:
            raise ValueError(f"{cfg}: missing key {e} in the Qwen3-VL config") from None
        except (ValueError, TypeError) as e:
            raise ValueError(f"{cfg}: {e}") from None

    # ---- our YAML presets ----
    @classmethod
    def preset(cls, name: str, overrides: list[str] | None = None) -> "ModelConfig":
        """`tiny`, `2b`, `4b`, `8b`, `32b` (files `configs/model/qwen3vl_<name>.yaml`) or a YAML path."""
        path = Path(name)
        if not path.suffix:
            path = PRESET_DIR / f"qwen3vl_{name}.yaml"
        elif not path.is_absolute() and not path.exists() and (PRESET_DIR.parents[1] / path).exists():
            path = PRESET_DIR.parents[1] / path  # a repo-relative path such as configs/model/x.yaml
        data = apply_overrides(load_yaml(path), overrides or [])
        return from_dict(cls, data, str(path))

    def to_dict(self) -> dict:
        return to_dict(self)

    def validate(self) -> "ModelConfig":
        t, v = self.text, self.vision
        if t.num_attention_heads % t.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if sum(t.mrope_section) * 2 != t.head_dim:
            raise ValueError(f"mrope_section {t.mrope_section} must sum to head_dim/2 = {t.head_dim // 2}")
        if v.hidden_size % v.num_heads:
            raise ValueError("vision hidden_size must be a multiple of num_heads")
        side = int(round(v.num_position_embeddings**0.5))
        if side * side != v.num_position_embeddings:
            raise ValueError("vision num_position_embeddings must be a square number")
        if any(not 0 <= i < v.depth for i in v.deepstack_visual_indexes):
            raise ValueError(f"deepstack_visual_indexes {v.deepstack_visual_indexes} outside vision depth {v.depth}")
        if len(v.deepstack_visual_indexes) > t.num_hidden_layers:
            raise ValueError("more deepstack features than decoder layers")
        from sr_jax.models.attention import BACKENDS

        if self.attention_backend not in BACKENDS:
            raise ValueError(f"attention_backend {self.attention_backend!r} is not one of {list(BACKENDS)}")
        if v.out_hidden_size != t.hidden_size:
            raise ValueError("vision out_hidden_size must equal the text hidden_size")
        return self
