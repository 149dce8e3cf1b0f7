"""Qwen3-VL (SpatialReward backbone) in Flax NNX.

Names are imported lazily: data workers use `sr_jax.model.rope_index` (numpy only) and should
not pay for importing JAX and Flax.
"""

import importlib

_EXPORTS = {
    "ModelConfig": "sr_jax.model.config",
    "TextConfig": "sr_jax.model.config",
    "VisionConfig": "sr_jax.model.config",
    "ForwardOutput": "sr_jax.model.qwen3vl",
    "Qwen3VLForConditionalGeneration": "sr_jax.model.qwen3vl",
    "abstract_model": "sr_jax.model.qwen3vl",
    "init_model": "sr_jax.model.qwen3vl",
    "resolve_dtype": "sr_jax.model.qwen3vl",
    "get_rope_index": "sr_jax.model.rope_index",
    "VisionInputs": "sr_jax.model.vision",
    "vision_inputs": "sr_jax.model.vision",
    "pad_patches": "sr_jax.model.vision",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'sr_jax.model' has no attribute {name!r}")
