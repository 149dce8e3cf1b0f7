"""Qwen3-VL for conditional generation: the SpatialReward network.

Module tree (and so parameter paths) mirrors Hugging Face's `Qwen3VLForConditionalGeneration`:
`model.visual.*`, `model.language_model.*`, `lm_head` (absent when embeddings are tied). The
converter (`sr_jax.models.qwen3_vl.names`) is therefore a rename plus a transpose for linear kernels.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sr_jax.models.qwen3_vl.config import ModelConfig
from sr_jax.models.layers import Linear
from sr_jax.models.qwen3_vl.rope_index import get_rope_index, text_position_ids
from sr_jax.models.qwen3_vl.text import TextModel
from sr_jax.models.qwen3_vl.vision import VisionInputs, VisionModel, vision_inputs

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def resolve_dtype(name) -> jnp.dtype:
    if isinstance(name, str):
        if name not in DTYPES:
            raise ValueError(f"unknown dtype {name!r}; use one of {sorted(DTYPES)}")
        return DTYPES[name]
    return name


@dataclasses.dataclass
class ForwardOutput:
    hidden: jax.Array                      # (B, T, hidden) after the final norm
    hidden_states: list | None = None      # per decoder layer (before the final norm)
    image_embeds: jax.Array | None = None  # (num_image_tokens, hidden)
    deepstack: list | None = None
    kv_cache: list | None = None           # per layer (k, v), when decoding with a cache


def visual_index(input_ids, image_token_id: int, real_rows=None):
    """(B, T) row into the flattened visual features for each image token, -1 elsewhere: the k-th
    image token (row-major) takes the k-th feature row, counting only `real_rows` (M,) when given.
    That skips padding rows wherever they sit: a multi-host batch is the hosts' blocks side by
    side, each with its own patch padding, so padding lies between the images of consecutive hosts."""
    is_image = input_ids == image_token_id
    order = jnp.cumsum(is_image.reshape(-1)).reshape(is_image.shape) - 1
    if real_rows is not None:
        m = real_rows.shape[0]
        rank = jnp.cumsum(real_rows) - 1
        row_of_rank = jnp.zeros((m,), jnp.int32).at[jnp.where(real_rows, rank, m)].set(
            jnp.arange(m, dtype=jnp.int32), mode="drop")
        order = row_of_rank[jnp.clip(order, 0, m - 1)]
    return jnp.where(is_image, order, -1)


def real_feature_rows(vision, merge_unit: int):
    """(M,) bool: merged visual rows made of image patches; padding patches carry zero
    position-interpolation weights (`pad_patches`), real ones weights summing to 1."""
    interp_weight = jnp.asarray(vision.interp_weight if isinstance(vision, VisionInputs) else vision[1])
    return interp_weight.sum(-1).reshape(-1, merge_unit)[:, 0] > 0


class Qwen3VLModel(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        dtype, param_dtype = resolve_dtype(cfg.dtype), resolve_dtype(cfg.param_dtype)
        self.visual = VisionModel(cfg.vision, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                                  attention_backend=cfg.attention_backend)
        self.language_model = TextModel(cfg.text, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                                        attention_backend=cfg.attention_backend)
        self.visual.scan_layers = self.language_model.scan_layers = cfg.scan_layers


class Qwen3VLForConditionalGeneration(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        cfg.validate()
        self.config = cfg
        self.model = Qwen3VLModel(cfg, rngs=rngs)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(
            cfg.text.hidden_size, cfg.text.vocab_size, axes=("embed", "vocab"), use_bias=False,
            dtype=resolve_dtype(cfg.dtype), param_dtype=resolve_dtype(cfg.param_dtype), rngs=rngs)

    # ---- host-side preparation (numpy; outside jit) ----
    def prepare_positions(self, input_ids, attention_mask=None, image_grid_thw=None) -> np.ndarray:
        """3-D position ids exactly as HF derives them when the caller gives none."""
        ids = np.asarray(input_ids)
        if image_grid_thw is None:
            return text_position_ids(shape=ids.shape)
        pos, _ = get_rope_index(ids, image_grid_thw, attention_mask,
                                spatial_merge_size=self.config.vision.spatial_merge_size,
                                image_token_id=self.config.image_token_id)
        return pos

    def prepare_vision(self, image_grid_thw) -> VisionInputs:
        return vision_inputs(image_grid_thw, self.config.vision)

    # ---- the network ----
    def features(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None, *,
                 position_ids=None, vision=None, segment_ids=None, output_hidden_states=False,
                 mask=None, kv_cache=None, cache_index=None, vision_layout=None) -> ForwardOutput:
        """Final hidden states (before the LM head). Traceable under jit when `position_ids` and,
        with images, `vision` (from `prepare_vision`) are given; otherwise they are derived here.
        `mask`/`kv_cache`/`cache_index` are the decoding path (see `TextModel.__call__`);
        `vision_layout` runs vision attention per image (see `vision.attention_slots`)."""
        input_ids = jnp.asarray(input_ids)
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        if position_ids is None:
            position_ids = self.prepare_positions(input_ids, attention_mask, image_grid_thw)
        position_ids = jnp.asarray(position_ids)
        lm = self.model.language_model
        embeds = lm.embed_tokens(input_ids)
        vis_index, image_embeds, deepstack = None, None, []
        if pixel_values is not None:
            if vision is None:
                if image_grid_thw is None:
                    raise ValueError("pixel_values given without image_grid_thw")
                self._check_image_tokens(input_ids, image_grid_thw)
                vision = self.prepare_vision(image_grid_thw)
            image_embeds, deepstack = self.model.visual(pixel_values, vision, vision_layout)
            vis_index = visual_index(input_ids, self.config.image_token_id,
                                     real_feature_rows(vision, self.config.vision.spatial_merge_size**2))
            gathered = jnp.take(image_embeds.astype(embeds.dtype), jnp.maximum(vis_index, 0), axis=0)
            embeds = jnp.where((vis_index >= 0)[..., None], gathered, embeds)
        out = lm(embeds, position_ids, jnp.asarray(attention_mask), visual_index=vis_index, deepstack=deepstack,
                 segment_ids=None if segment_ids is None else jnp.asarray(segment_ids),
                 output_hidden_states=output_hidden_states, mask=mask, kv_cache=kv_cache, cache_index=cache_index)
        if kv_cache is not None:
            return ForwardOutput(hidden=out[0], kv_cache=out[1], image_embeds=image_embeds, deepstack=deepstack)
        hidden, states = out if output_hidden_states else (out, None)
        return ForwardOutput(hidden=hidden, hidden_states=states, image_embeds=image_embeds, deepstack=deepstack)

    def logits(self, hidden):
        if self.lm_head is None:
            return self.model.language_model.embed_tokens.attend(hidden)
        return self.lm_head(hidden)

    def __call__(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None, *,
                 position_ids=None, vision=None, segment_ids=None):
        """Logits (B, T, vocab), with inputs laid out as for HF's Qwen3VLForConditionalGeneration."""
        out = self.features(input_ids, attention_mask, pixel_values, image_grid_thw, position_ids=position_ids,
                            vision=vision, segment_ids=segment_ids)
        return self.logits(out.hidden)

    def _check_image_tokens(self, input_ids, image_grid_thw):
        if isinstance(input_ids, jax.core.Tracer):
            return
        grid = np.asarray(image_grid_thw).reshape(-1, 3)
        expected = int((grid.prod(-1) // self.config.vision.spatial_merge_size**2).sum())
        found = int((np.asarray(input_ids) == self.config.image_token_id).sum())
        if expected != found:
            raise ValueError(f"image features and image tokens do not match: {found} <|image_pad|> tokens, "
                             f"image_grid_thw implies {expected}")


def init_model(cfg: ModelConfig, seed: int = 0) -> Qwen3VLForConditionalGeneration:
    return Qwen3VLForConditionalGeneration(cfg, rngs=nnx.Rngs(seed))


def abstract_model(cfg: ModelConfig) -> Qwen3VLForConditionalGeneration:
    """The module with ShapeDtypeStruct leaves: no memory, no random init (for loading)."""
    return nnx.eval_shape(lambda: Qwen3VLForConditionalGeneration(cfg, rngs=nnx.Rngs(0)))
