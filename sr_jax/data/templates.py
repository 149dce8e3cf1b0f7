"""Prompt templates for the SC and PQ tasks.

A template is a text file with an `{instruction}` field (SC only; filled by plain replacement,
so JSON braces in the text need no escaping). Images go before the text in the user turn,
unless the template places them itself with `<image>` markers (then their count must equal
the number of images). The default files live in configs/prompts/; users of the official
checkpoint point the config at the official wording instead.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

from sr_jax.data.records import RecordError, SpatialExample

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_PROMPT_DIR = REPO_ROOT / "configs" / "prompts"
INSTRUCTION_FIELD = "{instruction}"
IMAGE_MARKER = "<image>"
VISION_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"


class TemplateError(ValueError):
    pass


class Image:
    """Marks where an image goes in a rendered user turn."""

    def __repr__(self) -> str:
        return "IMAGE"


IMAGE = Image()


@functools.lru_cache(maxsize=32)
def _read_template(path: str) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TemplateError(f"prompt template not found: {path}") from None
    # Editors add a final newline; it is not part of the prompt.
    return text.rstrip("\n")


def _resolve(path: str) -> str:
    p = Path(path).expanduser()
    if not p.is_absolute() and not p.exists() and (REPO_ROOT / p).exists():
        p = REPO_ROOT / p
    return str(p)


@dataclasses.dataclass
class PromptTemplates:
    """Paths to the three template files; None means the default in configs/prompts/."""

    sc: str | None = None  # one original + the edited image
    sc_multi: str | None = None  # several originals + the edited image
    pq: str | None = None  # the edited image alone

    def path(self, kind: str) -> str:
        if kind not in ("sc", "sc_multi", "pq"):
            raise TemplateError(f"unknown template kind {kind!r}")
        given = getattr(self, kind)
        return _resolve(given) if given else str(DEFAULT_PROMPT_DIR / f"{kind}.txt")

    def text(self, kind: str) -> str:
        path = self.path(kind)
        text = _read_template(path)
        has_field = INSTRUCTION_FIELD in text
        if kind == "pq" and has_field:
            raise TemplateError(f"{path}: a PQ template has no instruction, remove {INSTRUCTION_FIELD}")
        if kind != "pq" and not has_field:
            raise TemplateError(f"{path}: an SC template needs the {INSTRUCTION_FIELD} field")
        return text

    def kind_for(self, example: SpatialExample) -> str:
        if example.task == "pq":
            return "pq"
        return "sc" if len(example.images) == 2 else "sc_multi"

    def render(self, example: SpatialExample) -> list[str | Image]:
        """The user turn as text pieces and IMAGE markers, in order."""
        kind = self.kind_for(example)
        text = self.text(kind)
        if kind != "pq":
            text = text.replace(INSTRUCTION_FIELD, example.instruction)
        n_images = len(example.images)
        if IMAGE_MARKER not in text:
            return [IMAGE] * n_images + [text]
        pieces = text.split(IMAGE_MARKER)
        if len(pieces) - 1 != n_images:
            raise RecordError(
                "image_count",
                f"template {self.path(kind)} has {len(pieces) - 1} {IMAGE_MARKER} markers "
                f"but the record has {n_images} images",
                example.id,
            )
        parts: list[str | Image] = []
        for i, piece in enumerate(pieces):
            if i:
                parts.append(IMAGE)
            if piece:
                parts.append(piece)
        return parts


def user_text(parts: list[str | Image]) -> str:
    """The user turn content with each image as the vision placeholder triple."""
    return "".join(VISION_PLACEHOLDER if p is IMAGE else p for p in parts)


def chat_messages(parts: list[str | Image], answer: str | None = None) -> list[dict]:
    """The same turn(s) as HF chat messages (for `apply_chat_template`)."""
    content = [{"type": "image"} if p is IMAGE else {"type": "text", "text": p} for p in parts]
    messages = [{"role": "user", "content": content}]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages
