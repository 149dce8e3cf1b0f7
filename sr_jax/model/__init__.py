"""Qwen3-VL (SpatialReward backbone) in Flax NNX."""

from sr_jax.model.config import ModelConfig, TextConfig, VisionConfig
from sr_jax.model.qwen3vl import (
    ForwardOutput,
    Qwen3VLForConditionalGeneration,
    abstract_model,
    init_model,
    resolve_dtype,
)
from sr_jax.model.rope_index import get_rope_index
from sr_jax.model.vision import VisionInputs, vision_inputs

__all__ = [
    "ForwardOutput",
    "ModelConfig",
    "Qwen3VLForConditionalGeneration",
    "TextConfig",
    "VisionConfig",
    "VisionInputs",
    "abstract_model",
    "get_rope_index",
    "init_model",
    "resolve_dtype",
    "vision_inputs",
]
