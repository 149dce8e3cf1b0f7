"""Checks a converted (or directly imported) model against the Hugging Face PyTorch model.

Both models score one fixed multimodal prompt: two synthetic non-square images with text before,
between and after them, in the Qwen3-VL chat layout. The HF model runs first, in float32 on the CPU,
and is freed before ours is loaded, so peak memory is one model, not two.
"""

from __future__ import annotations

import dataclasses
import gc
from pathlib import Path

import numpy as np
from PIL import Image

from sr_jax.convert.hf_import import hf_family
from sr_jax.convert.loading import load_model
from sr_jax.data import Processor
from sr_jax.data.image import ImageConfig
from sr_jax.models import family_of

PROMPT = ("<|im_start|>user\nHere is the original photo: <|vision_start|><|image_pad|><|vision_end|>"
          " and this is the edited one: <|vision_start|><|image_pad|><|vision_end|>"
          " Did the edit add a red square in the top left corner?<|im_end|>\n<|im_start|>assistant\n")


@dataclasses.dataclass(frozen=True)
class Thresholds:
    max_rel: float          # max |logit error| / max |HF logit|
    max_kl: float           # mean over positions of KL(HF || ours)
    min_agreement: float    # fraction of positions whose argmax token agrees
    max_abs: float | None = None


DEFAULT_THRESHOLDS = {
    "float32": Thresholds(max_rel=1e-4, max_kl=1e-6, min_agreement=1.0),
    "bfloat16": Thresholds(max_rel=5e-2, max_kl=5e-3, min_agreement=0.95),
}


@dataclasses.dataclass(frozen=True)
class Report:
    max_abs: float
    max_rel: float
    mean_kl: float
    agreement: float
    positions: int

    def failures(self, limits: Thresholds) -> list[str]:
        out = []
        if self.max_rel > limits.max_rel:
            out.append(f"max relative error {self.max_rel:.3g} > {limits.max_rel:g}")
        if limits.max_abs is not None and self.max_abs > limits.max_abs:
            out.append(f"max abs error {self.max_abs:.3g} > {limits.max_abs:g}")
        if self.mean_kl > limits.max_kl:
            out.append(f"mean KL {self.mean_kl:.3g} > {limits.max_kl:g}")
        if self.agreement < limits.min_agreement:
            out.append(f"greedy agreement {100 * self.agreement:.2f}% < {100 * limits.min_agreement:.2f}%")
        return out

    def summary(self) -> str:
        return (f"positions {self.positions}  max abs err {self.max_abs:.4g}  max rel err {self.max_rel:.4g}  "
                f"mean KL(HF||ours) {self.mean_kl:.4g}  greedy agreement {100 * self.agreement:.2f}%")


def synthetic_images():
    """Two deterministic RGB images, 64x96 and 128x64 (height x width): gradients plus shapes."""
    def gradient(h, w):
        y, x = np.mgrid[0:h, 0:w]
        return np.stack([255 * x / (w - 1), 255 * y / (h - 1), 128 + 100 * np.sin(x / 7.0 + y / 11.0)], -1)

    first = gradient(64, 96)
    first[8:24, 10:30] = (230, 20, 20)                      # a red square
    second = gradient(128, 64)[:, ::-1]
    y, x = np.mgrid[0:128, 0:64]
    second[(y - 80) ** 2 + (x - 30) ** 2 < 15**2] = (20, 40, 220)  # a blue disc
    return [Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)) for a in (first, second)]


def verify_inputs(hf_dir: str | Path, cfg) -> dict[str, np.ndarray]:
    """input_ids, attention_mask, pixel_values, image_grid_thw for the fixed prompt."""
    hf_dir = Path(hf_dir)
    # The checkpoint's own tokenizer when it ships one, else the offline Qwen tokenizer (same ids).
    processor = Processor(hf_dir if (hf_dir / "tokenizer.json").is_file() else None)
    v = cfg.vision
    processor.image_config = ImageConfig(min_pixels=processor.image_config.min_pixels,
                                         max_pixels=processor.image_config.max_pixels, patch_size=v.patch_size,
                                         temporal_patch_size=v.temporal_patch_size, merge_size=v.spatial_merge_size)
    if processor.tokenizer.image_pad_id != cfg.image_token_id:
        raise ValueError(f"tokenizer's <|image_pad|> id {processor.tokenizer.image_pad_id} differs from "
                         f"config image_token_id {cfg.image_token_id}")
    batch = processor(PROMPT, synthetic_images())
    top = int(batch["input_ids"].max())
    if top >= cfg.text.vocab_size:
        raise ValueError(f"prompt token id {top} is outside the model vocabulary ({cfg.text.vocab_size})")
    return {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")}


def hf_logits(hf_dir: str | Path, inputs: dict) -> np.ndarray:
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    model = Qwen3VLForConditionalGeneration.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    ids = torch.as_tensor(inputs["input_ids"], dtype=torch.long)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.as_tensor(inputs["attention_mask"]),
                    pixel_values=torch.as_tensor(inputs["pixel_values"]),
                    image_grid_thw=torch.as_tensor(inputs["image_grid_thw"], dtype=torch.long),
                    mm_token_type_ids=(ids == model.config.image_token_id).long())
    logits = out.logits[0].float().numpy().copy()
    del model, out
    gc.collect()
    return logits


_compiled_forward: dict[str, object] = {}


def model_logits(model, inputs: dict) -> np.ndarray:
    """Our model's (T, vocab) float32 logits, jitted with host-prepared positions and vision tables.

    The compiled forward is shared by all models with the same config: it takes the parameter
    state as an argument (the module's graph holds an unhashable config, so `nnx.jit` on the
    module itself would recompile for every newly loaded model)."""
    import jax
    from flax import nnx

    VisionInputs = family_of(model).module("vision").VisionInputs

    graph, state = nnx.split(model)
    key = repr(model.config)
    if key not in _compiled_forward:
        def forward(state, ids, mask, pixels, positions, vision):
            return nnx.merge(graph, state)(ids, mask, pixels, position_ids=positions, vision=VisionInputs(*vision))

        _compiled_forward[key] = jax.jit(forward)
    grid = inputs["image_grid_thw"]
    positions = model.prepare_positions(inputs["input_ids"], inputs["attention_mask"], grid)
    logits = _compiled_forward[key](state, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"],
                                    positions, model.prepare_vision(grid).as_tuple())
    return np.asarray(logits[0], dtype=np.float32)


def compare(reference: np.ndarray, ours: np.ndarray) -> Report:
    ref, got = reference.astype(np.float64), ours.astype(np.float64)
    if ref.shape != got.shape:
        raise ValueError(f"logit shapes differ: HF {ref.shape}, ours {got.shape}")
    err = np.abs(ref - got)

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    log_p, log_q = log_softmax(ref), log_softmax(got)
    kl = (np.exp(log_p) * (log_p - log_q)).sum(-1)
    return Report(max_abs=float(err.max()), max_rel=float(err.max() / np.abs(ref).max()), mean_kl=float(kl.mean()),
                  agreement=float((ref.argmax(-1) == got.argmax(-1)).mean()), positions=ref.shape[0])


def run_verify(hf_dir: str | Path, jax_dir: str | Path | None = None, dtype: str = "float32",
               device: str | None = None) -> Report:
    """Report for ours (from `jax_dir`, else imported from `hf_dir`) against HF on the fixed prompt."""
    import jax

    cfg = hf_family(Path(hf_dir)).config_class.from_hf_dir(hf_dir)
    inputs = verify_inputs(hf_dir, cfg)
    reference = hf_logits(hf_dir, inputs)
    jax_device = jax.devices(device)[0] if device else jax.devices()[0]
    # A float32 check means float32 matmuls: on GPUs JAX's default precision would use TF32 (~1e-3 error).
    precision = "highest" if dtype == "float32" else None
    with jax.default_device(jax_device), jax.default_matmul_precision(precision):
        model = load_model(jax_dir or hf_dir, dtype, device=jax_device)
        ours = model_logits(model, inputs)
    del model
    gc.collect()
    return compare(reference, ours)
