"""Fixed-shape batches from encoded examples: one example per row (`pad`) or several (`pack`).

An encoded example (what the pipeline's workers emit) is a dict of numpy arrays
    input_ids (L,) int32, labels (L,) int32, position_ids (3, L) int32,
    pixel_values (N, patch_dim) float32, image_grid_thw (n, 3) int32, index () int64 (source index)
and a record that could not be used is a dict with `SKIP_KEY` (its reason), `id` and `message`.

Batch layout (B rows, T tokens, P patches, S segment slots per row; T and P come from the
chosen bucket, so a train step compiles once per bucket):
    input_ids (B, T) int32        padding = the pad token
    attention_mask (B, T) int32   1 on real tokens
    labels (B, T) int32           IGNORE_INDEX = no loss (`sr_jax.batch` names the keys)
    position_ids (3, B, T) int32  each example's own M-RoPE positions (0 on padding)
    segment_ids (B, T) int32      0 = padding, 1..S = the examples of the row, left to right
    pixel_values (P, patch_dim) float32
    vision_interp_index (P, 4) int32, vision_interp_weight (P, 4) float32,
    vision_rope_hw (P, 2) int32, vision_segment (P,) int32
                                  `sr_jax.models.qwen3_vl.vision.vision_inputs` tables, padded as
                                  `pad_patches` does (padding patches form their own segment)
    image_grid_thw (n, 3) int32   the batch's real images (n varies: host-side use only)
    record_index (B, S) int64     source index of each segment, -1 for empty slots
    num_examples, num_tokens, num_label_tokens, num_patches, num_images, num_truncated: () int32
`model_inputs(batch)` keeps the keys a train step takes (`sr_jax.train.step`, which stacks k
microbatches with `stack_microbatches`); `vision_tuple(batch)` is the model's `vision=`.

Rules that make a packed row equal to its examples run one by one:
- patches are laid out in flattened (row-major B*T) token order, because the model gives the
  k-th `<|image_pad|>` token of the batch the k-th merged patch row;
- positions restart per segment (each example keeps the positions of its own encode);
- the model's attention only joins tokens with equal segment ids (and real keys);
- labels never cross a segment: the loss predicts labels[t + 1] from token t, so the label
  at each segment's first token is set to IGNORE_INDEX. Then the last token of a segment is never
  trained to predict the next segment's first token, and padding (ignored too) predicts nothing.
  (The first token is `<|im_start|>`, a prompt token, so this only makes the rule explicit.)
Packing is first-fit over the rows of the batch being filled; an example that fits no row,
no free segment slot, or not the batch's remaining patch budget closes the batch and opens the
next one. Pad mode closes a batch at B examples or when the patch budget would overflow, then
picks the smallest bucket holding its longest row and its patches.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from typing import Any, Callable, Literal

import grain
import numpy as np

from sr_jax.batch import IGNORE_INDEX, SFT_KEYS, VISION_KEYS
from sr_jax.data.records import RecordError
from sr_jax.models import get_family

SKIP_KEY = "skip"
MERGE_UNIT = get_family().image.merge_unit  # patches per merged visual token

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Bucket:
    seq_len: int
    patch_budget: int


def skipped(reason: str, record_id: str, message: str) -> dict:
    return {SKIP_KEY: reason, "id": record_id, "message": message}


def is_skipped(element: dict) -> bool:
    return SKIP_KEY in element


def example_size(ex: dict) -> tuple[int, int]:
    """(tokens, patches) of an encoded example."""
    return int(ex["input_ids"].shape[0]), int(ex["pixel_values"].shape[0])


class BatchBuilder:
    """Collects encoded examples for one batch and lays them out (see the module docstring)."""

    def __init__(self, mode: Literal["pad", "pack"], batch_size: int, buckets: list[Bucket], max_segments: int):
        if mode == "pack" and len(buckets) != 1:
            raise ValueError("packing uses a single bucket (one seq_len and patch budget)")
        self.mode = mode
        self.batch_size = batch_size
        self.buckets = sorted(buckets, key=lambda b: (b.seq_len, b.patch_budget))
        self.max_segments = max_segments if mode == "pack" else 1
        self.max_len = max(b.seq_len for b in self.buckets)
        self.max_patches = max(b.patch_budget for b in self.buckets)
        self.rows: list[list[dict]] = []
        self.row_lens: list[int] = []
        self.patches = 0

    @property
    def empty(self) -> bool:
        return not self.rows

    def fits_alone(self, tokens: int, patches: int) -> bool:
        return any(tokens <= b.seq_len and patches <= b.patch_budget for b in self.buckets)

    def try_add(self, ex: dict) -> bool:
        """Places `ex` if it fits this batch; False means the batch is complete."""
        tokens, patches = example_size(ex)
        if not self.fits_alone(tokens, patches):
            raise ValueError(f"example of {tokens} tokens / {patches} patches fits no bucket {self.buckets}")
        if self.patches + patches > self.max_patches:
            return False
        if self.mode == "pack":
            for r, used in enumerate(self.row_lens):
                if used + tokens <= self.max_len and len(self.rows[r]) < self.max_segments:
                    self._place(r, ex, tokens, patches)
                    return True
        if len(self.rows) == self.batch_size:
            return False
        self.rows.append([])
        self.row_lens.append(0)
        self._place(len(self.rows) - 1, ex, tokens, patches)
        return True

    def _place(self, row: int, ex: dict, tokens: int, patches: int) -> None:
        self.rows[row].append(ex)
        self.row_lens[row] += tokens
        self.patches += patches

    def bucket(self) -> Bucket:
        longest = max(self.row_lens)
        for b in self.buckets:
            if longest <= b.seq_len and self.patches <= b.patch_budget:
                return b
        raise ValueError(f"batch of rows up to {longest} tokens and {self.patches} patches fits no bucket")

    def build(self, pad_id: int, vision_config, shared_memory: bool = False) -> dict[str, np.ndarray]:
        """The batch arrays; `shared_memory` writes the patches straight into a shared-memory
        block, which Grain hands from a worker process to the trainer without another copy."""
        bucket = self.bucket()
        B, T, P, S = self.batch_size, bucket.seq_len, bucket.patch_budget, self.max_segments
        patch_dim = self.rows[0][0]["pixel_values"].shape[1]
        input_ids = np.full((B, T), pad_id, np.int32)
        labels = np.full((B, T), IGNORE_INDEX, np.int32)
        attention_mask = np.zeros((B, T), np.int32)
        segment_ids = np.zeros((B, T), np.int32)
        position_ids = np.zeros((3, B, T), np.int32)
        record_index = np.full((B, S), -1, np.int64)
        if shared_memory:
            from grain._src.python.ipc.shared_memory_array import SharedMemoryArray  # private: only this path

            pixel_values = SharedMemoryArray((P, patch_dim), np.float32)  # new shm blocks read as zeros
        else:
            pixel_values = np.zeros((P, patch_dim), np.float32)
        grids, p = [], 0
        for r, row in enumerate(self.rows):
            start = 0
            for s, ex in enumerate(row):
                n = ex["input_ids"].shape[0]
                span = slice(start, start + n)
                input_ids[r, span] = ex["input_ids"]
                labels[r, span] = ex["labels"]
                labels[r, start] = IGNORE_INDEX  # nothing predicts across a segment boundary
                attention_mask[r, span] = 1
                segment_ids[r, span] = s + 1
                position_ids[:, r, span] = ex["position_ids"]
                record_index[r, s] = ex["index"]
                k = ex["pixel_values"].shape[0]
                pixel_values[p : p + k] = ex["pixel_values"]  # row-major token order
                grids.append(ex["image_grid_thw"])
                p += k
                start += n
        grid = np.concatenate(grids).astype(np.int32) if grids else np.zeros((0, 3), np.int32)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "position_ids": position_ids,
            "segment_ids": segment_ids,
            "pixel_values": pixel_values,
            **vision_tables(grid, p, P, vision_config),
            "image_grid_thw": grid,
            "record_index": record_index,
            "num_examples": np.asarray(sum(len(row) for row in self.rows), np.int32),
            "num_tokens": np.asarray(attention_mask.sum(), np.int32),
            "num_label_tokens": np.asarray((labels != IGNORE_INDEX).sum(), np.int32),
            "num_patches": np.asarray(p, np.int32),
            "num_images": np.asarray(len(grid), np.int32),
            "num_truncated": np.asarray(sum(int(ex["truncated"]) for row in self.rows for ex in row), np.int32),
        }


def vision_tables(grid: np.ndarray, num_patches: int, budget: int, vision_config) -> dict[str, np.ndarray]:
    """Per-patch vision tables of the batch's images, padded to the budget like `pad_patches`."""
    vision = get_family(getattr(vision_config, "model_type", None)).module("vision")  # JAX is loaded by Grain anyway
    VisionInputs, pad_patches, vision_inputs = vision.VisionInputs, vision.pad_patches, vision.vision_inputs

    if len(grid):
        inputs = vision_inputs(grid, vision_config)
    else:
        inputs = VisionInputs(np.zeros((0, 4), np.int32), np.zeros((0, 4), np.float32),
                              np.zeros((0, 2), np.int32), np.zeros((0,), np.int32))
    # Zero-width stand-in pixels: pad_patches pads the tables with its own rules, while the real
    # pixels were already written in place (no second copy of the largest array).
    _, padded = pad_patches(np.zeros((num_patches, 0), np.float32), inputs, budget, MERGE_UNIT)
    return dict(zip(VISION_KEYS, padded.as_tuple()))


def vision_tuple(batch: dict) -> tuple:
    """The `vision=` argument of the model from a batch."""
    return tuple(batch[k] for k in VISION_KEYS)


def model_inputs(batch: dict) -> dict[str, np.ndarray]:
    """The arrays a train step takes (`sr_jax.train.step` layout, before stacking microbatches);
    the rest (image_grid_thw, record_index, counters) is for the host."""
    return {k: batch[k] for k in SFT_KEYS}


# ---- the Grain stages ------------------------------------------------------------------------

SKIPS_KEY = "skipped"  # per batch: the skip markers met while filling it (stripped by SkipCounter)


class BatchDataset(grain.IterDataset):
    """Encoded examples / skip markers -> batches carrying the skip markers they passed.

    Runs before `mp_prefetch`, i.e. inside each worker process when there are workers.
    """

    def __init__(self, parent: grain.IterDataset, make_builder: Callable[[], BatchBuilder], *, pad_id: int,
                 vision_config, drop_remainder: bool = False, shared_memory: bool = False):
        super().__init__(parent)
        self._make_builder = make_builder
        self._pad_id = pad_id
        self._vision_config = vision_config
        self._drop_remainder = drop_remainder
        self._shared_memory = shared_memory

    def __iter__(self) -> "BatchIterator":
        return BatchIterator(self._parent.__iter__(), self)

    def __str__(self) -> str:
        return "BatchDataset"


class BatchIterator(grain.DatasetIterator):
    """Checkpointable: the state is the parent's state before the first example not yet emitted.

    A batch is complete only when the next usable example does not fit (or the input ends), so
    between batches exactly one pulled example is pending and no skip marker is; restoring
    re-reads the pending example. Skip markers after the last batch come out alone at the end.
    """

    def __init__(self, parent: grain.DatasetIterator, spec: BatchDataset):
        super().__init__(parent)
        self._spec = spec
        self._pending: dict | None = None
        self._resume = copy.deepcopy(self._parent.get_state())

    def _pull(self) -> dict | None:
        if self._pending is None:
            self._resume = copy.deepcopy(self._parent.get_state())
            try:
                self._pending = next(self._parent)
            except StopIteration:
                return None
        return self._pending

    def __next__(self) -> dict:
        spec = self._spec
        builder = spec._make_builder()
        skips: list[dict] = []
        ended = False
        while True:
            element = self._pull()
            if element is None:
                ended = True
                break
            if is_skipped(element):
                skips.append(element)
            elif not builder.try_add(element):
                break
            self._pending = None
        if builder.empty or (ended and spec._drop_remainder):
            if skips:
                return {SKIPS_KEY: skips}
            raise StopIteration
        batch = builder.build(spec._pad_id, spec._vision_config, spec._shared_memory)
        batch[SKIPS_KEY] = skips
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"parent": copy.deepcopy(self._resume)}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(copy.deepcopy(state["parent"]))
        self._resume = copy.deepcopy(state["parent"])
        self._pending = None

    def __str__(self) -> str:
        return "BatchIterator"


class SkipCounter(grain.IterDataset):
    """Main-process end of the pipeline: counts and logs the skipped records, yields batches."""

    def __init__(self, parent: grain.IterDataset, strict: bool = False):
        super().__init__(parent)
        self._strict = strict

    def __iter__(self) -> "SkipCounterIterator":
        return SkipCounterIterator(self._parent.__iter__(), self._strict)

    def __str__(self) -> str:
        return "SkipCounter"


class SkipCounterIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, strict: bool):
        super().__init__(parent)
        self._strict = strict
        self._skipped: dict[str, int] = {}
        self._counts = {"batches": 0, "examples": 0, "truncated": 0}
        self._done = False

    def stats(self) -> dict[str, int]:
        """Skipped records by reason."""
        return dict(sorted(self._skipped.items()))

    def counters(self) -> dict[str, int]:
        return {**self._counts, "skipped": sum(self._skipped.values())}

    def __next__(self) -> dict[str, np.ndarray]:
        while True:
            try:
                element = next(self._parent)
            except StopIteration:
                if not self._done:
                    self._done = True
                    logger.info("data pipeline exhausted: %s, skipped %s", self._counts, self.stats())
                raise
            for skip in element.pop(SKIPS_KEY, []):
                reason = skip[SKIP_KEY]
                if self._strict:
                    raise RecordError(reason, skip["message"], skip["id"])
                self._skipped[reason] = self._skipped.get(reason, 0) + 1
                logger.warning("skipped record %s (%s): %s", skip["id"], reason, skip["message"])
            if "input_ids" in element:
                self._counts["batches"] += 1
                self._counts["examples"] += int(element["num_examples"])
                self._counts["truncated"] += int(element["num_truncated"])
                return element

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), "counts": dict(self._counts), "skipped": dict(self._skipped)}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._counts = dict(state["counts"])
        self._skipped = dict(state["skipped"])
        self._done = False

    def __str__(self) -> str:
        return "SkipCounterIterator"
