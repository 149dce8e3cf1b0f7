"""The training record: one SC (semantic consistency) or PQ (perceptual quality) example.

SC: images = [original(s)..., edited], an instruction, and the target answer
    {"edit_region": [{"id", "label", "bbox_2d"}], "reasoning", "score": [success, overediting]}.
PQ: images = [edited], no instruction, target {"reasoning", "score": [naturalness, artifacts]}.
Boxes are integers on a 0..1000 grid relative to the edited image; scores are on 0..score_range.

Verbatim records (imported official data, meta["verbatim"] = True) are trained on their own text:
    meta["prompt"]   the user turn, with one `<image>` tag where each image stands
    meta["answer"]   the assistant text exactly as given (absent or None: a prompt-only record)
    meta["system"]   optional system turn
    meta["history"]  optional earlier exchanges [[user, assistant], ...] (their `<image>` tags
                     come first in image order)
The structured fields (regions, reasoning, score) are filled only when the answer parsed
(meta["answer_parsed"]); they serve evaluation and statistics, never the training text.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Literal

from sr_jax.reward import BOX_GRID, SCORE_RANGE  # noqa: F401  (the answer's scales; re-exported)


class RecordError(ValueError):
    """A record that must not be trained on. `reason` is a short counter key."""

    def __init__(self, reason: str, message: str, record_id: str = "?"):
        super().__init__(f"record {record_id}: {message}")
        self.reason = reason
        self.message = message  # without the record prefix, so re-raising can add a location once
        self.record_id = record_id

    def at(self, where: str) -> "RecordError":
        """The same error with `where` (file:line, file#index) appended once."""
        return RecordError(self.reason, f"{self.message} [{where}]", self.record_id)


IMAGE_TAG = "<image>"


@dataclasses.dataclass(frozen=True)
class Region:
    id: int
    label: str
    bbox_2d: tuple[int, int, int, int]

    def to_json(self) -> dict:
        return {"id": self.id, "label": self.label, "bbox_2d": list(self.bbox_2d)}


@dataclasses.dataclass
class SpatialExample:
    """`images` holds encoded image bytes (PNG/JPEG/...) or file paths, in prompt order."""

    id: str
    task: Literal["sc", "pq"]
    images: list[bytes | str]
    instruction: str = ""
    edit_region: list[Region] = dataclasses.field(default_factory=list)
    reasoning: str = ""
    score: tuple[float, float] = (0.0, 0.0)
    meta: dict = dataclasses.field(default_factory=dict)

    @property
    def verbatim(self) -> bool:
        return bool(self.meta.get("verbatim"))

    def validate(self, score_range: float = SCORE_RANGE) -> "SpatialExample":
        rid = self.id
        if self.task not in ("sc", "pq"):
            raise RecordError("bad_task", f"task must be 'sc' or 'pq', got {self.task!r}", rid)
        if self.verbatim:
            self._validate_verbatim()
            if not self.meta.get("answer_parsed"):
                return self  # trained on its text alone; the structured fields are unset
            return self._validate_fields(score_range)
        if not self.images:
            raise RecordError("no_images", "no images", rid)
        if self.task == "pq" and len(self.images) != 1:
            raise RecordError("image_count", f"PQ takes one image, got {len(self.images)}", rid)
        if self.task == "sc":
            if len(self.images) < 2:
                raise RecordError("image_count", f"SC takes originals + edited, got {len(self.images)}", rid)
            if not self.instruction or not self.instruction.strip():
                raise RecordError("empty_instruction", "empty instruction", rid)
        return self._validate_fields(score_range)

    def _validate_verbatim(self) -> None:
        rid, meta = self.id, self.meta
        prompt, answer, system = meta.get("prompt"), meta.get("answer"), meta.get("system")
        if not isinstance(prompt, str):
            raise RecordError("bad_text", "verbatim record without a text meta['prompt']", rid)
        if answer is not None and not isinstance(answer, str):
            raise RecordError("bad_text", "meta['answer'] must be text or None", rid)
        if system is not None and not isinstance(system, str):
            raise RecordError("bad_text", "meta['system'] must be text or None", rid)
        history = meta.get("history") or []
        if not isinstance(history, (list, tuple)) or not all(
            isinstance(t, (list, tuple)) and len(t) == 2 and all(isinstance(x, str) for x in t) for t in history
        ):
            raise RecordError("bad_text", "meta['history'] must be a list of [user, assistant] texts", rid)
        tags = sum(u.count(IMAGE_TAG) for u, _ in history) + prompt.count(IMAGE_TAG)
        if tags != len(self.images):
            raise RecordError("image_count", f"{tags} {IMAGE_TAG} tags but {len(self.images)} images", rid)

    def _validate_fields(self, score_range: float) -> "SpatialExample":
        rid = self.id
        for text in (self.instruction, self.reasoning):
            if not isinstance(text, str):
                raise RecordError("bad_text", "text fields must be str", rid)
        if (
            not isinstance(self.score, (tuple, list))
            or len(self.score) != 2
            or not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in self.score)
        ):
            raise RecordError("bad_score", f"score must be two numbers, got {self.score!r}", rid)
        if not all(_finite(s) and 0.0 <= float(s) <= score_range for s in self.score):
            raise RecordError("score_range", f"score {list(self.score)} outside [0, {score_range:g}]", rid)
        for r in self.edit_region:
            b = r.bbox_2d
            if len(b) != 4 or not all(isinstance(v, int) and not isinstance(v, bool) for v in b):
                raise RecordError("bad_box", f"region {r.id}: bbox must be 4 integers, got {b!r}", rid)
            if not all(0 <= v <= BOX_GRID for v in b):
                raise RecordError("box_range", f"region {r.id}: bbox {list(b)} outside 0..{BOX_GRID}", rid)
            if b[0] >= b[2] or b[1] >= b[3]:
                raise RecordError("box_order", f"region {r.id}: bbox {list(b)} needs x1<x2 and y1<y2", rid)
        if self.task == "pq" and self.edit_region:
            raise RecordError("pq_regions", "PQ records carry no edit regions", rid)
        return self

    def target(self) -> dict:
        score = [_num(s) for s in self.score]
        if self.task == "pq":
            return {"reasoning": self.reasoning, "score": score}
        return {
            "edit_region": [r.to_json() for r in self.edit_region],
            "reasoning": self.reasoning,
            "score": score,
        }

    def target_json(self) -> str:
        """Canonical answer text: key order as above, compact separators, UTF-8 kept."""
        return json.dumps(self.target(), ensure_ascii=False, separators=(", ", ": "))


def _finite(x) -> bool:
    """False for NaN/inf and for integers too large for a float (float() would overflow)."""
    try:
        return math.isfinite(float(x))
    except OverflowError:
        return False


def _num(x: float) -> float | int:
    x = float(x)
    return int(x) if x.is_integer() else round(x, 2)
