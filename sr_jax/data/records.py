"""The training record: one SC (semantic consistency) or PQ (perceptual quality) example.

SC: images = [original(s)..., edited], an instruction, and the target answer
    {"edit_region": [{"id", "label", "bbox_2d"}], "reasoning", "score": [success, overediting]}.
PQ: images = [edited], no instruction, target {"reasoning", "score": [naturalness, artifacts]}.
Boxes are integers on a 0..1000 grid relative to the edited image; scores are on 0..score_range.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Literal

SCORE_RANGE = 25.0
BOX_GRID = 1000


class RecordError(ValueError):
    """A record that must not be trained on. `reason` is a short counter key."""

    def __init__(self, reason: str, message: str, record_id: str = "?"):
        super().__init__(f"record {record_id}: {message}")
        self.reason = reason
        self.record_id = record_id


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

    def validate(self, score_range: float = SCORE_RANGE) -> "SpatialExample":
        rid = self.id
        if self.task not in ("sc", "pq"):
            raise RecordError("bad_task", f"task must be 'sc' or 'pq', got {self.task!r}", rid)
        if not self.images:
            raise RecordError("no_images", "no images", rid)
        if self.task == "pq" and len(self.images) != 1:
            raise RecordError("image_count", f"PQ takes one image, got {len(self.images)}", rid)
        if self.task == "sc":
            if len(self.images) < 2:
                raise RecordError("image_count", f"SC takes originals + edited, got {len(self.images)}", rid)
            if not self.instruction or not self.instruction.strip():
                raise RecordError("empty_instruction", "empty instruction", rid)
        for text in (self.instruction, self.reasoning):
            if not isinstance(text, str):
                raise RecordError("bad_text", "text fields must be str", rid)
        if (
            not isinstance(self.score, (tuple, list))
            or len(self.score) != 2
            or not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in self.score)
        ):
            raise RecordError("bad_score", f"score must be two numbers, got {self.score!r}", rid)
        if not all(0.0 <= float(s) <= score_range for s in self.score):
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


def _num(x: float) -> float | int:
    x = float(x)
    return int(x) if x.is_integer() else round(x, 2)
