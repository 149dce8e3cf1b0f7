"""Qwen3-VL's special token ids, defined once.

The tokenizer's table (`sr_jax.data.tokenizer.SPECIAL_TOKENS`) is built from these and checked
against the vocabulary when a tokenizer is built; the model config's defaults, the M-RoPE index,
generation's pad and stop ids, GRPO's stop ids and the exported generation_config read them here.
A module of plain numbers so that the model can use them without importing the data package.
"""

from __future__ import annotations

ENDOFTEXT_ID = 151643  # <|endoftext|>: the first id after the byte-level vocabulary
IM_START_ID = 151644  # <|im_start|>
IM_END_ID = 151645  # <|im_end|>: ends every chat turn, so it ends an answer
VISION_START_ID = 151652  # <|vision_start|>
VISION_END_ID = 151653  # <|vision_end|>
VISION_PAD_ID = 151654  # <|vision_pad|>
IMAGE_PAD_ID = 151655  # <|image_pad|>: one per merged image patch
VIDEO_PAD_ID = 151656  # <|video_pad|>

PAD_ID = ENDOFTEXT_ID  # what Qwen pads with (generation_config pad_token_id)
DEFAULT_STOP_IDS = (IM_END_ID, ENDOFTEXT_ID)  # generation_config eos_token_id, in its order
