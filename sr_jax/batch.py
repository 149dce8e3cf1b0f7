"""The batch layout: the key names every stage agrees on and the ignore label, defined once.

A model batch (B rows, T tokens, P patches) holds
    input_ids (B, T) int32, attention_mask (B, T) int32 (1 = real token),
    labels (B, T) int32: HF-aligned (labels[t] is the token at t; the loss shifts), IGNORE_INDEX
        where no loss is taken (prompt, padding, the first token of a packed segment),
    position_ids (3, B, T) int32: M-RoPE positions, segment_ids (B, T) int32: packed rows,
    pixel_values (P, patch_dim) and the vision tables named by VISION_KEYS, in the field order of
        `sr_jax.models.qwen3_vl.vision.VisionInputs` (so `tuple(batch[k] for k in VISION_KEYS)` is the
        model's `vision=` argument).
The data pipeline builds it (`sr_jax.data.packing`), the SFT step stacks microbatches of it
(`sr_jax.train.step`), and GRPO builds the same without labels and segments (`sr_jax.rl.grpo`).
"""

from __future__ import annotations

IGNORE_INDEX = -100  # HF's ignore label (CrossEntropyLoss ignore_index)

VISION_KEYS = ("vision_interp_index", "vision_interp_weight", "vision_rope_hw", "vision_segment")
PIXEL_KEYS = ("pixel_values",) + VISION_KEYS  # present all together or not at all

SFT_REQUIRED_KEYS = ("input_ids", "attention_mask", "labels", "position_ids")  # every SFT batch
SFT_KEYS = SFT_REQUIRED_KEYS + ("segment_ids",) + PIXEL_KEYS  # what the pipeline hands the step
POLICY_KEYS = ("input_ids", "attention_mask", "position_ids") + PIXEL_KEYS  # a GRPO model batch
