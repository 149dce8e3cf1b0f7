"""Text + images -> Qwen3-VL model inputs, identical to HF's `Qwen3VLProcessor` + `get_rope_index`.

`Processor(text=..., images=[...])` mirrors the HF call on one sample. `encode(example)` builds
the chat turns for a SpatialExample (user: images + filled template; assistant: the target JSON)
and adds `labels`, which supervise only the answer and its closing `<|im_end|>`.

Token layout of an encoded example (no system turn, as in Qwen3-VL's chat template):
    <|im_start|>user\n (<|vision_start|> <|image_pad|>*n_i <|vision_end|>)*images PROMPT <|im_end|>\n
    <|im_start|>assistant\n ANSWER <|im_end|>
The turn's trailing newline after the final <|im_end|> is left out: nothing is predicted from it.
That is the `sr_jax` chat layout, used for sr_jax's own records.

Verbatim records (imported official data, see records.py) are rendered from their own strings:
the user text with each `<image>` tag replaced in place by the vision placeholder, and the answer
text as given. `chat_template` picks the layout, token for token as LLaMA-Factory trains it:
    qwen3_vl          [<|im_start|>system\n S <|im_end|>\n]  (only for a non-empty system turn)
                      per exchange: <|im_start|>user\n U <|im_end|>\n<|im_start|>assistant\n
                      then, trained: [<think>\n\n</think>\n\n] A <|im_end|>\n
                      The empty think block is inserted (and trained on) only when the answer
                      holds neither <think> nor </think>; every assistant turn is trained.
    qwen3_vl_nothink  the same without the inserted think block.
    sr_jax            today's layout above.
    auto (default)    qwen3_vl for imported verbatim records, sr_jax for the others (sr_jax's own
                      verbatim records, meta["source"] == "synthetic", included).
Each piece (system turn, user turn, think block, answer) is tokenised on its own, as
LLaMA-Factory does, so no token can straddle the prompt/answer boundary.

`image_resize` picks the image path the same way:
    sr_jax            one smart resize with `min_pixels`/`max_pixels` (HF's processor alone).
    llamafactory      LLaMA-Factory's PIL pre-resize to `image_min_pixels`..`image_max_pixels`,
                      then the checkpoint processor's smart resize with `processor_min_pixels`/
                      `processor_max_pixels` (image.py), so grids and pixels are the official run's.
    auto (default)    llamafactory for imported verbatim records, sr_jax for the others and for __call__.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from sr_jax.batch import IGNORE_INDEX  # also importable from here (sr_jax.data.IGNORE_INDEX)
from sr_jax.data.image import (
    ImageConfig,
    ImageError,
    LLAMAFACTORY_MAX_PIXELS,
    LLAMAFACTORY_MIN_PIXELS,
    MAX_PIXELS,
    MIN_PIXELS,
    QWEN3_VL_MAX_PIXELS,
    QWEN3_VL_MIN_PIXELS,
    open_image,
    preprocess_images,
)
from sr_jax.data.records import IMAGE_TAG, RecordError, SpatialExample
from sr_jax.data.templates import PromptTemplates, VISION_PLACEHOLDER, chat_messages, user_text
from sr_jax.data.tokenizer import QwenTokenizer, load_tokenizer
from sr_jax.models import get_family

CHAT_TEMPLATES = ("auto", "sr_jax", "qwen3_vl", "qwen3_vl_nothink")
IMAGE_RESIZES = ("auto", "sr_jax", "llamafactory")
EMPTY_THINK = "<think>\n\n</think>\n\n"
THINK_TAGS = ("<think>", "</think>")


class Processor:
    def __init__(
        self,
        tokenizer: str | Path | QwenTokenizer | None = None,
        min_pixels: int = MIN_PIXELS,
        max_pixels: int = MAX_PIXELS,
        *,
        templates: PromptTemplates | None = None,
        max_length: int | None = None,
        chat_template: str = "auto",
        image_resize: str = "auto",
        image_max_pixels: int = LLAMAFACTORY_MAX_PIXELS,
        image_min_pixels: int = LLAMAFACTORY_MIN_PIXELS,
        processor_min_pixels: int = QWEN3_VL_MIN_PIXELS,
        processor_max_pixels: int = QWEN3_VL_MAX_PIXELS,
    ):
        if chat_template not in CHAT_TEMPLATES:
            raise ValueError(f"chat_template must be one of {CHAT_TEMPLATES}, got {chat_template!r}")
        check_image_resize(image_resize, image_max_pixels, image_min_pixels, processor_min_pixels,
                           processor_max_pixels)
        self.chat_template = chat_template
        self.image_resize = image_resize
        self.llamafactory_pixels = (image_max_pixels, image_min_pixels, processor_min_pixels, processor_max_pixels)
        self.tokenizer = tokenizer if isinstance(tokenizer, QwenTokenizer) else load_tokenizer(tokenizer)
        self.image_config = ImageConfig(min_pixels=min_pixels, max_pixels=max_pixels)
        self.templates = templates or PromptTemplates()
        self.max_length = max_length

    @property
    def tokens_per_image_unit(self) -> int:
        return self.image_config.merge_size**2

    def resize_mode(self, example: SpatialExample | None = None) -> str:
        """The image path for `example` (None: a plain __call__)."""
        if self.image_resize == "auto":
            return "llamafactory" if example is not None and _imported(example) else "sr_jax"
        return self.image_resize

    def images_config(self, mode: str) -> ImageConfig:
        """The ImageConfig of an image path; patch and merge sizes always follow `image_config`."""
        if mode == "sr_jax":
            return self.image_config
        pre_max, pre_min, proc_min, proc_max = self.llamafactory_pixels
        return dataclasses.replace(self.image_config, min_pixels=proc_min, max_pixels=proc_max,
                                   pre_resize=(pre_max, pre_min))

    def __call__(self, text: str, images: list | None = None) -> dict[str, np.ndarray]:
        """One sample: `text` holds one `<|image_pad|>` per image (in order)."""
        ids = self.tokenizer.encode(text)
        return self._assemble(ids, list(images or []), image_config=self.images_config(self.resize_mode()))

    def _assemble(self, ids: list[int], images: list, labels: list[int] | None = None,
                  image_config: ImageConfig | None = None) -> dict[str, np.ndarray]:
        tok = self.tokenizer
        ids_arr = np.asarray(ids, dtype=np.int64)
        slots = np.flatnonzero(ids_arr == tok.image_pad_id)
        if len(slots) != len(images):
            raise ValueError(f"text has {len(slots)} <|image_pad|> tokens but {len(images)} images were given")
        pixel_values, grids = preprocess_images(images, image_config or self.image_config)
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
        get_rope_index = get_family().module("rope_index").get_rope_index  # the one M-RoPE implementation

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

    def layout(self, example: SpatialExample) -> str:
        if self.chat_template == "auto":
            return "qwen3_vl" if _imported(example) else "sr_jax"
        return self.chat_template

    def _turns(self, example: SpatialExample) -> tuple[str | None, list[tuple[str, str | None]]]:
        """(system, [(user text with vision placeholders, answer or None), ...])."""
        if example.verbatim:
            meta = example.meta
            turns = [(u, a) for u, a in meta.get("history") or []] + [(meta["prompt"], meta.get("answer"))]
            turns = [(u.replace(IMAGE_TAG, VISION_PLACEHOLDER), a) for u, a in turns]
            return meta.get("system") or None, turns
        return None, [(user_text(self.templates.render(example)), example.target_json())]

    def _segments(self, example: SpatialExample, with_target: bool) -> list[tuple[str, bool]]:
        """The conversation as (text, supervised) pieces, each tokenised on its own."""
        layout = self.layout(example)
        system, turns = self._turns(example)
        if not with_target:
            turns = turns[:-1] + [(turns[-1][0], None)]
        pieces = []
        if system:
            pieces.append((f"<|im_start|>system\n{system}<|im_end|>\n", False))
        for k, (user, answer) in enumerate(turns):
            pieces.append((f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n", False))
            if answer is None:
                if k != len(turns) - 1:
                    raise RecordError("bad_text", f"exchange {k} has no answer", example.id)
                break
            if layout == "sr_jax":
                # No newline after the last <|im_end|>: nothing is predicted from it.
                pieces.append((answer + ("<|im_end|>" if k == len(turns) - 1 else "<|im_end|>\n"), True))
                continue
            if layout == "qwen3_vl" and not any(tag in answer for tag in THINK_TAGS):
                pieces.append((EMPTY_THINK, True))
            pieces.append((answer + "<|im_end|>\n", True))
        return pieces

    def prompt_text(self, example: SpatialExample) -> str:
        """The conversation up to and including the generation prompt `<|im_start|>assistant\\n`."""
        return "".join(text for text, _ in self._segments(example, with_target=False))

    def messages(self, example: SpatialExample, with_target: bool = True) -> list[dict]:
        """The same conversation as HF chat messages (images as content parts, answers as given)."""
        if not example.verbatim:
            return chat_messages(self.templates.render(example), example.target_json() if with_target else None)
        system, turns = self._turns(example)
        if not with_target:
            turns = turns[:-1] + [(turns[-1][0], None)]
        out = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []
        for user, answer in turns:
            parts = []
            for i, piece in enumerate(user.split(VISION_PLACEHOLDER)):
                if i:
                    parts.append({"type": "image"})
                if piece:
                    parts.append({"type": "text", "text": piece})
            out.append({"role": "user", "content": parts})
            if answer is not None:
                out.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        return out

    def token_ids(self, example: SpatialExample, with_target: bool = True) -> tuple[list[int], list[int] | None]:
        """Token ids (one <|image_pad|> per image) and labels (None without the target)."""
        if self.layout(example) == "sr_jax" and not example.verbatim:
            return self._sr_jax_ids(example, with_target)
        ids, labels = [], []
        for text, supervised in self._segments(example, with_target):
            piece = self.tokenizer.encode(text)
            ids += piece
            labels += piece if supervised else [IGNORE_INDEX] * len(piece)
        return ids, (labels if with_target else None)

    def _sr_jax_ids(self, example: SpatialExample, with_target: bool) -> tuple[list[int], list[int] | None]:
        prompt = self.prompt_text(example)
        if not with_target:
            return self.tokenizer.encode(prompt), None
        answer = example.target_json() + "<|im_end|>"
        ids, offsets = self.tokenizer.encode_with_offsets(prompt + answer)
        start = len(prompt)
        # The answer begins with "{" after "\n", which the split regex never joins, so no
        # token straddles the boundary; check anyway rather than mislabel silently.
        if any(s < start < e for s, e in offsets):
            raise RecordError("bad_text", "a token straddles the prompt/answer boundary", example.id)
        return ids, [tid if s >= start else IGNORE_INDEX for tid, (s, e) in zip(ids, offsets)]

    def encode(self, example: SpatialExample, with_target: bool = True) -> dict[str, np.ndarray]:
        example.validate()
        if with_target and example.verbatim and example.meta.get("answer") is None:
            raise RecordError("no_answer", "a prompt-only record has no answer to train on", example.id)
        images = []
        for i, source in enumerate(example.images):
            try:
                images.append(open_image(source))
            except (OSError, ValueError, SyntaxError) as e:  # PIL's decoders raise all three
                raise RecordError("bad_image", f"image {i} cannot be decoded: {e}", example.id) from None
        ids, labels = self.token_ids(example, with_target)
        try:
            out = self._assemble(ids, images, labels, self.images_config(self.resize_mode(example)))
        except ImageError as e:
            raise RecordError("bad_image", str(e), example.id) from None
        except ValueError as e:
            raise RecordError("image_count", str(e), example.id) from None
        length = out["input_ids"].shape[1]
        if self.max_length is not None and length > self.max_length:
            raise RecordError("too_long", f"{length} tokens exceed max_length {self.max_length}", example.id)
        return out


def _imported(example: SpatialExample) -> bool:
    """A verbatim record from outside (the official layout and images); sr_jax's own verbatim
    records (the synthetic grounding tasks) keep sr_jax's."""
    return example.verbatim and example.meta.get("source") != "synthetic"


def check_image_resize(mode: str, image_max_pixels: int, image_min_pixels: int, processor_min_pixels: int,
                       processor_max_pixels: int) -> None:
    """ValueError naming the setting when an image_resize setting is unusable."""
    if mode not in IMAGE_RESIZES:
        raise ValueError(f"image_resize must be one of {IMAGE_RESIZES}, got {mode!r}")
    for name, value in (("image_max_pixels", image_max_pixels), ("image_min_pixels", image_min_pixels),
                        ("processor_min_pixels", processor_min_pixels),
                        ("processor_max_pixels", processor_max_pixels)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if image_min_pixels > image_max_pixels:
        raise ValueError(f"image_min_pixels {image_min_pixels} exceeds image_max_pixels {image_max_pixels}")
    if processor_min_pixels > processor_max_pixels:
        raise ValueError(f"processor_min_pixels {processor_min_pixels} exceeds processor_max_pixels "
                         f"{processor_max_pixels}")
