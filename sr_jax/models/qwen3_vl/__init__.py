"""Qwen3-VL (SpatialReward backbone) in Flax NNX.

Names are imported lazily: data workers use `sr_jax.models.qwen3_vl.rope_index` (numpy only) and should
not pay for importing JAX and Flax.
"""

import importlib

_EXPORTS = {
    "ModelConfig": "sr_jax.models.qwen3_vl.config",
    "TextConfig": "sr_jax.models.qwen3_vl.config",
    "VisionConfig": "sr_jax.models.qwen3_vl.config",
    "ForwardOutput": "sr_jax.models.qwen3_vl.model",
    "Qwen3VLForConditionalGeneration": "sr_jax.models.qwen3_vl.model",
    "abstract_model": "sr_jax.models.qwen3_vl.model",
    "init_model": "sr_jax.models.qwen3_vl.model",
    "resolve_dtype": "sr_jax.models.qwen3_vl.model",
    "get_rope_index": "sr_jax.models.qwen3_vl.rope_index",
    "VisionInputs": "sr_jax.models.qwen3_vl.vision",
    "vision_inputs": "sr_jax.models.qwen3_vl.vision",
    "pad_patches": "sr_jax.models.qwen3_vl.vision",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'sr_jax.models.qwen3_vl' has no attribute {name!r}")
