"""Qwen3-VL's entry in the model-family registry: the facts about it that generic code uses."""

from __future__ import annotations

from sr_jax.models import ModelFamily, register_family
from sr_jax.models.qwen3_vl.config import IMAGE, MODEL_TYPE


def set_remat(model, policy: str) -> None:
    model.model.language_model.remat = policy
    model.model.visual.remat = policy


def set_attention_spans(model, text: int | None, vision: int | None) -> None:
    for layer in model.model.language_model.layers:
        layer.self_attn.segment_span = text
    for block in model.model.visual.blocks:
        block.attn.image_span = vision


FAMILY = register_family(ModelFamily(
    model_type=MODEL_TYPE,
    package=__name__.rpartition(".")[0],
    config_class_name="ModelConfig",
    model_class_name="Qwen3VLForConditionalGeneration",
    image=IMAGE,
    lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    decoder_scope="language_model",
    vision_scope="visual",
    freeze_vision=r"model\.visual\..*",
    set_remat=set_remat,
    set_attention_spans=set_attention_spans,
))
