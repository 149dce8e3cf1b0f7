"""The Grain input pipeline: records on disk -> fixed-shape training batches.

    index range -> seeded shuffle (reshuffled every epoch) -> repeat -> per-host slice
      -> decode + validate + `Processor.encode` + length policy   (map, read threads)
      -> pad or pack into buckets -> batch (+ vision tables)      (`packing.py`)
      -> worker processes (Grain `mp_prefetch`; 0 = all of the above in this process)
      -> count and log skipped records                           (main process)

Bad records never raise inside the pipeline: the map step turns them into skip markers, the
batcher attaches the markers it passed to the next batch it emits (or emits them alone at
the end), and the last stage, in the main process, counts them per reason (`stats()`), logs
each one, and in strict mode raises `RecordError` with the record id. So counting works the
same with any number of worker processes.

Batching runs inside the workers: the patches are written once, straight into shared memory,
and the trainer process only receives finished batches (moving per-example patches to the
main process and copying them again there cost more than the image decoding it saves). As
Grain documents for stateful steps before `mp_prefetch`, each worker packs its own slice, so
the batches depend on the number of workers (deterministic for a given seed and count, and a
checkpoint must be restored with the same `workers`).

Sources: ArrayRecord files or directories (see `storage.py`), and `synthetic:KEY=VALUE,...`
(keys: n (required), seed, split, min_side, max_side, tasks as `sc+pq` (or one of colour,
locate), pq_fraction, edit_types as `add+remove+recolor+resize` (a type named twice is drawn
twice as often), outcome_weights as five numbers
`0.5+0.13+0.12+0.1+0.15` in synthetic.OUTCOMES order, min_objects, max_objects, locate_size
as `0.2+0.45`: the locate object's side over the image's, object_size the same for sc/pq scene
objects, backgrounds as `solid+gradient` (of noise, stripes too), failed_pairs as 0/1: sc
contrast pairs, see `SynthConfig.failed_pairs`), locate_absent (the share of locate prompts naming
an object the image lacks, answered with no region), all concatenated in the order given. A record's
index in that concatenation is its `record_index`. `shuffle_group: k` shuffles runs of k
consecutive records as units, so such pairs stay next to each other in the stream.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from typing import Literal

import msgpack
import numpy as np

from sr_jax.data.image import (
    LLAMAFACTORY_MAX_PIXELS,
    LLAMAFACTORY_MIN_PIXELS,
    MAX_PIXELS,
    MIN_PIXELS,
    QWEN3_VL_MAX_PIXELS,
    QWEN3_VL_MIN_PIXELS,
)
from sr_jax.data.processor import CHAT_TEMPLATES, IGNORE_INDEX, Processor, check_image_resize
from sr_jax.data.records import RecordError, SpatialExample
from sr_jax.data.storage import ArrayRecordSource
from sr_jax.data.synthetic import SynthConfig, generate_example
from sr_jax.data.templates import PromptTemplates
from sr_jax.data.vocab import VocabMissError
from sr_jax.models import get_family

SYNTHETIC_PREFIX = "synthetic:"


@dataclasses.dataclass
class DataConfig:
    sources: list[str] = dataclasses.field(default_factory=lambda: ["synthetic:n=1024"])
    seed: int = 0
    shuffle: bool = True
    shuffle_group: int = 1  # runs of this many consecutive records move together (contrast pairs: 2)
    num_epochs: int | None = 1  # None: repeat forever (multi-host training: stop by step count)
    batch_size: int = 8  # rows per batch on this host
    mode: Literal["pad", "pack"] = "pad"
    seq_lens: list[int] = dataclasses.field(default_factory=lambda: [512, 1024, 2048])  # pack: exactly one
    patch_budgets: list[int] = dataclasses.field(default_factory=list)  # per bucket; [] = 4 * batch * seq_len
    max_segments: int = 16  # pack: examples per row at most (fixed width of `record_index`)
    too_long: Literal["drop", "truncate"] = "drop"  # truncate never cuts into an image's tokens
    drop_remainder: bool = False  # False: the last partial batch comes with empty rows
    strict: bool = False  # raise on the first bad record instead of skipping it
    workers: int = 0  # worker processes (Grain mp_prefetch); 0 = in this process
    worker_buffer: int = 8  # encoded examples buffered per worker
    read_threads: int = 1  # threads per process running the map; 0 = inline
    read_buffer: int = 8
    tokenizer: str | None = None  # checkpoint dir with tokenizer.json; None = offline Qwen tokenizer
    min_pixels: int = MIN_PIXELS
    max_pixels: int = MAX_PIXELS
    templates: PromptTemplates = dataclasses.field(default_factory=PromptTemplates)
    # auto: imported official rows (verbatim) in LLaMA-Factory's qwen3_vl layout, our own records
    # in sr_jax's; or one of qwen3_vl | qwen3_vl_nothink | sr_jax for all (processor.py).
    chat_template: str = "auto"
    # Images, chosen the same way: auto = LLaMA-Factory's two-step resize for verbatim rows (the
    # official run's grids and pixels) and min/max_pixels above for our own; or sr_jax | llamafactory.
    image_resize: str = "auto"
    image_max_pixels: int = LLAMAFACTORY_MAX_PIXELS  # LLaMA-Factory's pre-resize (official SFT yaml)
    image_min_pixels: int = LLAMAFACTORY_MIN_PIXELS  # LLaMA-Factory's default
    processor_min_pixels: int = QWEN3_VL_MIN_PIXELS  # then the checkpoint processor's own size
    processor_max_pixels: int = QWEN3_VL_MAX_PIXELS

    def buckets(self):
        from sr_jax.data.packing import MERGE_UNIT, Bucket

        if not self.seq_lens or any(t <= 0 for t in self.seq_lens) or sorted(set(self.seq_lens)) != list(self.seq_lens):
            raise ValueError(f"seq_lens must be positive and strictly increasing, got {self.seq_lens}")
        if self.mode == "pack" and len(self.seq_lens) != 1:
            raise ValueError(f"mode 'pack' takes one seq_len, got {self.seq_lens}")
        budgets = list(self.patch_budgets) or [MERGE_UNIT * self.batch_size * t for t in self.seq_lens]
        if (len(budgets) != len(self.seq_lens) or any(b <= 0 or b % MERGE_UNIT for b in budgets)
                or budgets != sorted(budgets)):
            # Non-decreasing, so an example within the largest seq_len and budget fits the last bucket.
            raise ValueError(f"patch_budgets must give one positive multiple of {MERGE_UNIT} per seq_len, "
                             f"non-decreasing, got {self.patch_budgets} for {self.seq_lens}")
        return [Bucket(t, b) for t, b in zip(self.seq_lens, budgets)]

    def validate(self) -> "DataConfig":
        if not self.sources:
            raise ValueError("no data sources given")
        if self.batch_size <= 0 or self.max_segments <= 0 or self.shuffle_group <= 0:
            raise ValueError("batch_size, max_segments and shuffle_group must be positive")
        if self.num_epochs is not None and self.num_epochs <= 0:
            raise ValueError(f"num_epochs must be positive or null, got {self.num_epochs}")
        if self.mode not in ("pad", "pack") or self.too_long not in ("drop", "truncate"):
            raise ValueError(f"mode must be pad|pack and too_long drop|truncate, got {self.mode}, {self.too_long}")

        if self.chat_template not in CHAT_TEMPLATES:
            raise ValueError(f"chat_template must be one of {CHAT_TEMPLATES}, got {self.chat_template!r}")
        check_image_resize(self.image_resize, self.image_max_pixels, self.image_min_pixels,
                           self.processor_min_pixels, self.processor_max_pixels)
        if min(self.workers, self.read_threads) < 0 or min(self.worker_buffer, self.read_buffer) <= 0:
            raise ValueError("workers/read_threads must be >= 0 and buffers > 0")
        self.buckets()
        return self


# ---- sources ---------------------------------------------------------------------------------

class SyntheticSource:
    """Random access to the embedded synthetic dataset (each example is rendered on demand)."""

    KEYS = ("n", "seed", "split", "min_side", "max_side", "tasks", "pq_fraction", "edit_types", "outcome_weights",
            "min_objects", "max_objects", "locate_size", "object_size", "backgrounds", "failed_pairs", "locate_absent")

    def __init__(self, spec: str):
        fields = dict(SynthConfig().__dict__)
        opts = {}
        for item in filter(None, spec[len(SYNTHETIC_PREFIX):].split(",")):
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"{spec!r}: expected key=value, got {item!r}")
            opts[key.strip()] = value.strip()
        unknown = set(opts) - set(self.KEYS)
        if unknown or "n" not in opts:
            raise ValueError(f"{spec!r}: needs n=...; unknown keys {sorted(unknown)} (known: {', '.join(self.KEYS)})")

        def number(key, kind=int, default=None):
            if key not in opts:
                return default
            try:
                return kind(opts[key])
            except ValueError:
                raise ValueError(f"{spec!r}: {key}={opts[key]!r} is not {'an integer' if kind is int else 'a number'}") from None

        self.n = number("n")
        self.seed = number("seed", default=0)
        self.split = opts.get("split", "train")
        lo, hi = fields["image_size"]
        fields["image_size"] = (number("min_side", default=lo), number("max_side", default=hi))
        for key in ("tasks", "edit_types", "backgrounds"):
            if key in opts:
                fields[key] = tuple(opts[key].split("+"))
        if "pq_fraction" in opts:
            fields["pq_fraction"] = number("pq_fraction", float)
        if "outcome_weights" in opts:
            try:
                fields["outcome_weights"] = tuple(float(v) for v in opts["outcome_weights"].split("+"))
            except ValueError:
                raise ValueError(f"{spec!r}: outcome_weights={opts['outcome_weights']!r} is not numbers joined by +") from None
        for key in ("min_objects", "max_objects"):
            fields[key] = number(key, default=fields[key])
        if "failed_pairs" in opts:
            if opts["failed_pairs"] not in ("0", "1"):
                raise ValueError(f"{spec!r}: failed_pairs={opts['failed_pairs']!r} must be 0 or 1")
            fields["failed_pairs"] = opts["failed_pairs"] == "1"
        if "locate_absent" in opts:
            fields["locate_absent"] = number("locate_absent", float)
        for key in ("locate_size", "object_size"):
            if key in opts:
                try:
                    fields[key] = tuple(float(v) for v in opts[key].split("+"))
                except ValueError:
                    raise ValueError(f"{spec!r}: {key}={opts[key]!r} is not two numbers joined by +") from None
        try:
            self.config = SynthConfig(**fields)
        except ValueError as e:
            raise ValueError(f"{spec!r}: {e}") from None
        self.spec = spec

    def __len__(self) -> int:
        return self.n

    def fetch(self, index: int) -> SpatialExample:
        return generate_example(index, self.seed, self.split, self.config)


class ArrayRecordRecords:
    """One ArrayRecord file (or directory) whose raw bytes are decoded inside the map step."""

    def __init__(self, path: str):
        self.records = ArrayRecordSource(path)
        self.length = len(self.records)

    def __len__(self) -> int:
        return self.length

    def fetch(self, index: int) -> SpatialExample:
        try:
            return self.records[index]  # RecordError names file and index
        except RecordError as e:
            if e.reason == "bad_record" and _is_invalid_utf8(self.records.raw(index)):
                raise RecordError("bad_utf8", f"text is not valid UTF-8: {_detail(e)}", e.record_id) from None
            raise


def _is_invalid_utf8(data: bytes) -> bool:
    """True when the record parses as msgpack only with strings left as raw bytes."""
    try:
        msgpack.unpackb(data, raw=False)
        return False
    except UnicodeDecodeError:
        pass
    except Exception:
        return False
    try:
        msgpack.unpackb(data, raw=True)
        return True
    except Exception:
        return False


class Sources:
    """Several sources as one index space."""

    def __init__(self, specs: list[str]):
        self.parts = [SyntheticSource(s) if s.startswith(SYNTHETIC_PREFIX) else ArrayRecordRecords(s) for s in specs]
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def fetch(self, index: int) -> SpatialExample:
        part = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return self.parts[part].fetch(index - int(self.offsets[part]))


# ---- the per-example map step (runs in read threads / worker processes) ----------------------

def _check_text(example: SpatialExample) -> None:
    texts = [example.instruction, example.reasoning] + [r.label for r in example.edit_region]
    if example.verbatim:  # the texts training actually sees
        meta = example.meta
        texts += [meta.get("prompt"), meta.get("answer"), meta.get("system")]
        texts += [t for turn in meta.get("history") or [] for t in turn]
    for text in texts:
        if isinstance(text, str):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise RecordError("bad_utf8", f"text is not valid UTF-8: {e}", example.id) from None


def _check_files(example: SpatialExample) -> None:
    for i, image in enumerate(example.images):
        if isinstance(image, str) and not os.path.isfile(image):
            raise RecordError("missing_image", f"image {i} file not found: {image}", example.id)


def truncate(ex: dict, limit: int, image_token_ids: tuple[int, ...]) -> dict | None:
    """Keeps the first `limit` tokens, or None when that would cut an image or leave no label."""
    ids = ex["input_ids"]
    image_at = np.flatnonzero(np.isin(ids, image_token_ids))
    if len(image_at) and image_at[-1] >= limit:
        return None
    if not (ex["labels"][:limit] != IGNORE_INDEX).any():
        return None
    return {**ex, "input_ids": ids[:limit], "labels": ex["labels"][:limit],
            "position_ids": ex["position_ids"][:, :limit], "truncated": np.int32(1)}


class EncodeStep:
    """index -> encoded example dict, or a skip marker naming the reason (never raises)."""

    def __init__(self, sources: Sources, processor: Processor, max_len: int, max_patches: int, too_long: str,
                 vocab_map=None):
        self.sources = sources
        self.vocab_map = vocab_map
        self.processor = processor
        self.max_len = max_len
        self.max_patches = max_patches
        self.too_long = too_long

    def __call__(self, index) -> dict:
        from sr_jax.data.packing import skipped

        index = int(index)
        record_id = f"#{index}"
        try:
            example = self.sources.fetch(index)
            record_id = example.id
            return self.encode(example, index)
        except RecordError as e:
            rid = e.record_id if e.record_id != "?" else record_id
            return skipped(e.reason, rid, _detail(e))
        except Exception as e:  # a bad record must not stop the pipeline; the reason names the type
            return skipped("error", record_id, f"{type(e).__name__}: {e}")

    def encode(self, example: SpatialExample, index: int) -> dict:
        _check_text(example)
        _check_files(example)
        out = self.processor.encode(example, with_target=True)
        ex = {
            "input_ids": out["input_ids"][0].astype(np.int32),
            "labels": out["labels"][0].astype(np.int32),
            "position_ids": out["position_ids"][:, 0].astype(np.int32),
            "pixel_values": out["pixel_values"],
            "image_grid_thw": out["image_grid_thw"].astype(np.int32),
            "index": np.int64(index),
            "truncated": np.int32(0),
        }
        length, patches = ex["input_ids"].shape[0], ex["pixel_values"].shape[0]
        if patches > self.max_patches:
            raise RecordError("too_many_patches", f"{patches} image patches exceed the largest budget "
                              f"{self.max_patches}", example.id)
        if length > self.max_len:
            tok = self.processor.tokenizer
            cut = truncate(ex, self.max_len, (tok.vision_start_id, tok.image_pad_id, tok.vision_end_id)) \
                if self.too_long == "truncate" else None
            if cut is None:
                how = "" if self.too_long == "drop" else " (truncating would cut an image or every label)"
                raise RecordError("too_long", f"{length} tokens exceed {self.max_len}{how}", example.id)
            ex = cut
        if self.vocab_map is not None:  # a compact model: every id renumbered, the ignore index kept
            try:
                ex["input_ids"] = self.vocab_map.to_compact(ex["input_ids"], record_id=example.id).astype(np.int32)
                ex["labels"] = self.vocab_map.to_compact(ex["labels"], record_id=example.id,
                                                         keep=IGNORE_INDEX).astype(np.int32)
            except VocabMissError as e:
                raise RecordError("not_in_vocab_map", str(e), example.id) from None
        return ex


def _detail(e: RecordError) -> str:
    """The message without RecordError's 'record ID: ' prefixes (the id travels separately)."""
    text = str(e)
    prefix = f"record {e.record_id}: "
    while text.startswith(prefix):
        text = text[len(prefix):]
    return text


def _absl_flags_defaults() -> None:
    """Grain's worker processes read absl flags; outside `absl.app` nobody parsed them."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


# ---- the pipeline ----------------------------------------------------------------------------

def make_processor(config: DataConfig) -> Processor:
    """The processor (tokenizer, templates, image sizes) a data config describes."""
    return Processor(
        config.tokenizer, config.min_pixels, config.max_pixels, templates=config.templates,
        chat_template=config.chat_template, image_resize=config.image_resize,
        image_max_pixels=config.image_max_pixels, image_min_pixels=config.image_min_pixels,
        processor_min_pixels=config.processor_min_pixels, processor_max_pixels=config.processor_max_pixels)


@functools.cache
def _grouped_indices_class():
    import grain

    class GroupedIndices(grain.MapDataset):
        """Record indices of groups: element i is record `parent[i // k] * k + i % k`, so the k
        records of a group follow each other wherever the shuffle put the group."""

        def __init__(self, parent, k: int):
            super().__init__(parent)
            self._k = k

        def __len__(self) -> int:
            return min(sys.maxsize, len(self._parent) * self._k)  # repeat(None) is sys.maxsize long

        def __getitem__(self, index):
            if isinstance(index, slice):
                return self.slice(index)
            group = self._parent[index // self._k]
            return None if group is None else int(group) * self._k + index % self._k

    return GroupedIndices


def GroupedIndices(parent, k: int):  # noqa: N802 (a class, built when grain is first needed)
    return _grouped_indices_class()(parent, k)


class DataPipeline:
    """`iter(pipeline)` gives a checkpointable Grain iterator of batch dicts (layout: packing.py).

    `process_index`/`process_count` default to JAX's; tests pass them to simulate hosts.
    `vision` is the model's VisionConfig (position-table size for the vision tables).
    `vocab_map` (a `sr_jax.data.vocab.VocabMap`): batches hold a compact model's ids.
    """

    def __init__(self, config: DataConfig, *, processor: Processor | None = None, vision=None,
                 process_index: int | None = None, process_count: int | None = None, vocab_map=None):
        self.config = config.validate()
        self.processor = processor or make_processor(config)
        self.vision = vision or get_family().config_class().vision  # the default family's
        self.vocab_map = vocab_map
        if process_index is None or process_count is None:
            import jax

            process_index, process_count = jax.process_index(), jax.process_count()
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} outside 0..{process_count - 1}")
        self.process_index, self.process_count = process_index, process_count
        self.sources = Sources(list(config.sources))
        if len(self.sources) == 0:
            raise ValueError(f"sources {config.sources} hold no records")
        for spec, part in zip(config.sources, self.sources.parts):
            if len(part) % config.shuffle_group:
                raise ValueError(f"source {spec!r} holds {len(part)} records, not a multiple of data.shuffle_group "
                                 f"{config.shuffle_group}: a group would straddle two sources")
        self._last_iterator = None

    def dataset(self):
        """The whole pipeline as a `grain.IterDataset`."""
        import grain

        from sr_jax.data.packing import BatchBuilder, BatchDataset, SkipCounter

        cfg = self.config
        buckets = cfg.buckets()
        group = cfg.shuffle_group
        ds = grain.MapDataset.range(len(self.sources) // group)
        if cfg.shuffle:
            ds = ds.shuffle(seed=cfg.seed)  # the shuffle reseeds per epoch (seed + epoch)
        ds = ds.repeat(cfg.num_epochs)
        if self.process_count > 1:
            ds = ds[self.process_index :: self.process_count]  # whole groups per host
        if group > 1:
            ds = GroupedIndices(ds, group)
        ds = ds.map(EncodeStep(self.sources, self.processor, max(b.seq_len for b in buckets),
                               max(b.patch_budget for b in buckets), cfg.too_long, self.vocab_map))
        ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=cfg.read_buffer))
        make_builder = functools.partial(BatchBuilder, cfg.mode, cfg.batch_size, buckets, cfg.max_segments)
        pad_id = self.processor.tokenizer.pad_id
        if self.vocab_map is not None:
            pad_id = self.vocab_map.compact_id(pad_id)
        ds = BatchDataset(ds, make_builder, pad_id=pad_id, vision_config=self.vision,
                          drop_remainder=cfg.drop_remainder, shared_memory=cfg.workers > 0)
        if cfg.workers > 0:
            _absl_flags_defaults()
            # Small arrays travel pickled: a shared-memory block per array costs more than copying
            # them (the patches are a shared-memory block already).
            ds = grain.experimental.WithOptionsIterDataset(ds, grain.experimental.DatasetOptions(min_shm_size=1 << 20))
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.workers,
                                                             per_worker_buffer_size=cfg.worker_buffer))
        return SkipCounter(ds, strict=cfg.strict)

    def __iter__(self):
        self._last_iterator = iter(self.dataset())
        return self._last_iterator

    def stats(self) -> dict[str, int]:
        """Skipped records by reason, of the most recent iterator."""
        return self._last_iterator.stats() if self._last_iterator is not None else {}
