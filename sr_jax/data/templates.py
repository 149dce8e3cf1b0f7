"""Prompt templates for the SC and PQ tasks.

A template is a text file read as a Python `str.format` string, whitespace kept exactly (a final
newline is part of the prompt). Literal braces are written doubled (`{{"score": [...]}}`,
`<|bbox_{{id}}|>`); the placeholders are
    {instruction}       the edit instruction (SC templates must hold it; PQ templates must not)
    {score_range}       the top of the score scale (25; written without ".0" when whole)
    {num_input_images}  the number of original images (SC: all images but the last)
Anything else in braces is an error naming the file and the key. Images go before the text in
the user turn, unless the template places them itself with `<image>` markers (then their count
must equal the number of images). The default files live in configs/prompts/; the official
checkpoint's prompt strings can be saved as such files as they are (README).
"""

from __future__ import annotations

import dataclasses
import functools
import string
from pathlib import Path

from sr_jax.data.records import SCORE_RANGE, RecordError, SpatialExample

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_PROMPT_DIR = REPO_ROOT / "configs" / "prompts"
INSTRUCTION_FIELD = "{instruction}"
PLACEHOLDERS = {"sc": ("instruction", "score_range", "num_input_images"),
                "sc_multi": ("instruction", "score_range", "num_input_images"),
                "pq": ("score_range",)}
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
    except UnicodeDecodeError as e:
        raise TemplateError(f"prompt template {path} is not UTF-8 ({e})") from None
    return text  # exactly: a final newline belongs to the prompt


def _fields(text: str, path: str) -> set[str]:
    """The placeholder names of a format string (TemplateError when it is malformed)."""
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as e:
        raise TemplateError(f"prompt template {path}: not a valid format string ({e}); "
                            "write literal braces doubled, {{ and }}") from None
    names = set()
    for _, name, spec, _ in parsed:
        if name is None:
            continue
        if "{" in (spec or ""):
            raise TemplateError(f"prompt template {path}: nested placeholder in {{{name}:{spec}}}; "
                                "write literal braces doubled, {{ and }}")
        names.add(name)
    return names


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
    score_range: float = SCORE_RANGE  # the value of {score_range}; the scorer sets its own

    def path(self, kind: str) -> str:
        if kind not in PLACEHOLDERS:
            raise TemplateError(f"unknown template kind {kind!r}")
        given = getattr(self, kind)
        return _resolve(given) if given else str(DEFAULT_PROMPT_DIR / f"{kind}.txt")

    def text(self, kind: str) -> str:
        """The template as written (braces still escaped), checked for its placeholders."""
        path = self.path(kind)
        text = _read_template(path)
        names = _fields(text, path)
        known = PLACEHOLDERS[kind]
        if kind == "pq" and "instruction" in names:
            raise TemplateError(f"{path}: a PQ template has no instruction, remove {INSTRUCTION_FIELD}")
        for name in sorted(names):
            if name not in known:
                what = "a positional {}" if name == "" else f"{{{name}}}"
                raise TemplateError(f"prompt template {path} ({kind}): unknown placeholder {what}; "
                                    f"this kind takes {', '.join('{' + k + '}' for k in known)} "
                                    "(literal braces are written {{ and }})")
        if kind != "pq" and "instruction" not in names:
            raise TemplateError(f"{path}: an SC template needs the {INSTRUCTION_FIELD} field")
        return text

    def kind_for(self, example: SpatialExample) -> str:
        if example.task == "pq":
            return "pq"
        return "sc" if len(example.images) == 2 else "sc_multi"

    def values(self, example: SpatialExample) -> dict:
        top = self.score_range
        values = {"score_range": int(top) if float(top).is_integer() else top}
        if example.task != "pq":
            values.update(instruction=example.instruction, num_input_images=len(example.images) - 1)
        return values

    def render(self, example: SpatialExample) -> list[str | Image]:
        """The user turn as text pieces and IMAGE markers, in order."""
        kind = self.kind_for(example)
        text = self.text(kind)
        values = self.values(example)
        # Markers are split off first so that an instruction holding "<image>" stays text.
        pieces = [piece.format_map(values) for piece in text.split(IMAGE_MARKER)]
        n_images = len(example.images)
        if len(pieces) == 1:
            return [IMAGE] * n_images + pieces
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
