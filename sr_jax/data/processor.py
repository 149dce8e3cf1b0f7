"""Text + images -> Qwen3-VL model inputs, identical to HF's `Qwen3VLProcessor` + `get_rope_index`.

`Processor(text=..., images=[...])` mirrors the HF call on one sample. `encode(example)` builds
the chat turns for a SpatialExample (user: images + filled template; assistant: the target JSON)
and adds `labels`, which supervise only the answer and its closing `<|im_end|>`.

Token layout of an encoded example (no system turn, as in Qwen3-VL's chat template):
    <|im_start|>user\n (<|vision_start|> <|image_pad|>*n_i <|vision_end|>)*images PROMPT <|im_end|>\n
    <|im_start|>assistant\n ANSWER <|im_end|>
The turn's trailing newline after the final <|im_end|> is left out: nothing is predicted from it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sr_jax.data.image import ImageConfig, ImageError, open_image, preprocess_images
from sr_jax.data.records import RecordError, SpatialExample
from sr_jax.data.templates import PromptTemplates, chat_messages, user_text
from sr_jax.data.tokenizer import QwenTokenizer, load_tokenizer

IGNORE_INDEX = -100


class Processor:
    def __init__(
        self,
        tokenizer: str | Path | QwenTokenizer | None = None,
        min_pixels: int = 3136,
        max_pixels: int = 262144,
        *,
        templates: PromptTemplates | None = None,
        max_length: int | None = None,
    ):
        self.tokenizer = tokenizer if isinstance(tokenizer, QwenTokenizer) else load_tokenizer(tokenizer)
        self.image_config = ImageConfig(min_pixels=min_pixels, max_pixels=max_pixels)
        self.templates = templates or PromptTemplates()
        self.max_length = max_length

    @property
    def tokens_per_image_unit(self) -> int:
        return self.image_config.merge_size**2

    def __call__(self, text: str, images: list | None = None) -> dict[str, np.ndarray]:
        """One sample: `text` holds one `<|image_pad|>` per image (in order)."""
        ids = self.tokenizer.encode(text)
        return self._assemble(ids, list(images or []))

    def _assemble(self, ids: list[int], images: list, labels: list[int] | None = None) -> dict[str, np.ndarray]:
        tok = self.tokenizer
        ids_arr = np.asarray(ids, dtype=np.int64)
        slots = np.flatnonzero(ids_arr == tok.image_pad_id)
        if len(slots) != len(images):
            raise ValueError(f"text has {len(slots)} <|image_pad|> tokens but {len(images)} images were given")
        pixel_values, grids = preprocess_images(images, self.image_config)
        # Expand each placeholder to one token per merged patch group (grid_t*grid_h*grid_w/merge^2).
        repeats = np.ones(len(ids_arr), dtype=np.int64)
        repeats[slots] = grids.prod(axis=1) // self.tokens_per_image_unit
        input_ids = np.repeat(ids_arr, repeats)[None, :]
        out = {
            "input_ids": input_ids,
            "attention_mask": np.ones_like(input_ids),
            "mm_token_type_ids": (input_ids == tok.image_pad_id).astype(np.int64),
            "pixel_values": pixel_values,
            "image_grid_thw": grids,
            "position_ids": self.position_ids(input_ids, grids),
        }
        if labels is not None:
            out["labels"] = np.repeat(np.asarray(labels, dtype=np.int64), repeats)[None, :]
        return out

    def position_ids(self, input_ids: np.ndarray, grids: np.ndarray) -> np.ndarray:
        from sr_jax.model.rope_index import get_rope_index  # the one shared M-RoPE implementation

        tok = self.tokenizer
        positions, _ = get_rope_index(
            input_ids,
            grids if len(grids) else None,
            np.ones_like(input_ids),
            spatial_merge_size=self.image_config.merge_size,
            image_token_id=tok.image_pad_id,
            vision_start_token_id=tok.vision_start_id,
        )
        return positions

    # ---- chat-formatted records -------------------------------------------------------------

    def prompt_text(self, example: SpatialExample) -> str:
        """The conversation up to and including the generation prompt `<|im_start|>assistant\\n`."""
        user = user_text(self.templates.render(example))
        return f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"

    def messages(self, example: SpatialExample, with_target: bool = True) -> list[dict]:
        """The same conversation as HF chat messages (images as content parts)."""
        return chat_messages(self.templates.render(example), example.target_json() if with_target else None)

    def encode(self, example: SpatialExample, with_target: bool = True) -> dict[str, np.ndarray]:
        example.validate()
        images = []
        for i, source in enumerate(example.images):
            try:
                images.append(open_image(source))
            except (OSError, ValueError, SyntaxError) as e:  # PIL's decoders raise all three
                raise RecordError("bad_image", f"image {i} cannot be decoded: {e}", example.id) from None
        prompt = self.prompt_text(example)
        if not with_target:
            ids = self.tokenizer.encode(prompt)
            labels = None
        else:
            answer = example.target_json() + "<|im_end|>"
            ids, offsets = self.tokenizer.encode_with_offsets(prompt + answer)
            start = len(prompt)
            # The answer begins with "{" after "\n", which the split regex never joins, so no
            # token straddles the boundary; check anyway rather than mislabel silently.
            if any(s < start < e for s, e in offsets):
                raise RecordError("bad_text", "a token straddles the prompt/answer boundary", example.id)
            labels = [tid if s >= start else IGNORE_INDEX for tid, (s, e) in zip(ids, offsets)]
        try:
            out = self._assemble(ids, images, labels)
        except ImageError as e:
            raise RecordError("bad_image", str(e), example.id) from None
        except ValueError as e:
            raise RecordError("image_count", str(e), example.id) from None
        length = out["input_ids"].shape[1]
        if self.max_length is not None and length > self.max_length:
            raise RecordError("too_long", f"{length} tokens exceed max_length {self.max_length}", example.id)
        return out
