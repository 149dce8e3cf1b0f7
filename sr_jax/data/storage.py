"""Training records on disk: SpatialExample <-> bytes, and ArrayRecord files of them.

Serialisation is msgpack (never pickle): a map
    {"format": "sr_jax.example", "v": 1, "id", "task", "images": [bytes | str, ...],
     "instruction", "edit_region": [[id, label, [x1, y1, x2, y2]], ...], "reasoning",
     "score": [a, b], "meta": {...}}
Image bytes are stored verbatim (msgpack bin); a str image is a file path. `meta` must hold
plain data (str/int/float/bool/None/bytes, lists, str-keyed maps); tuples come back as lists.
Decoding rejects msgpack extension types, so a record can never construct arbitrary objects.

ArrayRecord files are written with group_size 1 (one record per chunk, the layout random access
wants) and zstd. `ArrayRecordSource` reads any number of files as one indexable sequence and
satisfies Grain's RandomAccessDataSource protocol (len, getitem, repr; picklable).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

import msgpack
import numpy as np

from sr_jax.data.records import RecordError, Region, SpatialExample

RECORD_FORMAT = "sr_jax.example"
RECORD_VERSION = 1
ARRAY_RECORD_OPTIONS = "group_size:1,zstd:1"
ARRAY_RECORD_SUFFIX = ".array_record"


def _plain(value):
    """msgpack fallback: numpy scalars and arrays become Python numbers and lists."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot store a {type(value).__name__} in a record")


def example_to_bytes(example: SpatialExample) -> bytes:
    payload = {
        "format": RECORD_FORMAT,
        "v": RECORD_VERSION,
        "id": example.id,
        "task": example.task,
        "images": [bytes(im) if isinstance(im, (bytearray, memoryview)) else im for im in example.images],
        "instruction": example.instruction,
        "edit_region": [[r.id, r.label, list(r.bbox_2d)] for r in example.edit_region],
        "reasoning": example.reasoning,
        "score": list(example.score),
        "meta": example.meta,
    }
    try:
        return msgpack.packb(payload, use_bin_type=True, default=_plain)
    except (TypeError, ValueError, OverflowError) as e:
        raise RecordError("unserialisable", f"cannot serialise: {e}", example.id) from None


def _reject_ext(code, data):
    raise ValueError(f"msgpack extension type {code} is not allowed in a record")


def example_from_bytes(data: bytes, where: str = "?") -> SpatialExample:
    """Decodes one record; `where` names the file/index in errors."""
    try:
        d = msgpack.unpackb(data, raw=False, strict_map_key=True, ext_hook=_reject_ext)
    except Exception as e:  # msgpack raises several unrelated exception types
        raise RecordError("bad_record", f"not a msgpack record ({type(e).__name__}: {e})", where) from None
    if not isinstance(d, dict) or d.get("format") != RECORD_FORMAT:
        raise RecordError("bad_record", "not an sr_jax.example record", where)
    if d.get("v") != RECORD_VERSION:
        raise RecordError("bad_record", f"record version {d.get('v')!r}, this reader knows {RECORD_VERSION}", where)
    rid = d.get("id", where)
    try:
        images = d["images"]
        if not isinstance(images, list) or not all(isinstance(im, (bytes, str)) for im in images):
            raise TypeError("images must be a list of bytes or paths")
        regions = [Region(int(i), str(label), tuple(int(v) for v in box)) for i, label, box in d["edit_region"]]
        return SpatialExample(
            id=str(d["id"]),
            task=d["task"],
            images=images,
            instruction=d["instruction"],
            edit_region=regions,
            reasoning=d["reasoning"],
            score=tuple(d["score"]),
            meta=d["meta"],
        )
    except (KeyError, TypeError, ValueError) as e:
        raise RecordError("bad_record", f"malformed record field ({type(e).__name__}: {e})", f"{rid} ({where})") from None


def write_records(path: str | Path, payloads: Iterable[bytes], *, replace_empty: bool = True) -> int:
    """Writes serialised records to one ArrayRecord file, atomically; returns how many.

    The file is built under a temporary name in the same folder and renamed over `path` only
    after the last record: an error midway leaves an existing `path` as it was, and so does
    writing no record at all when `replace_empty` is False.
    """
    from array_record.python.array_record_module import ArrayRecordWriter

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    count = 0
    try:
        writer = ArrayRecordWriter(tmp, ARRAY_RECORD_OPTIONS)
        try:
            for data in payloads:
                writer.write(data)
                count += 1
        finally:
            writer.close()
        if count or replace_empty:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        else:
            Path(tmp).unlink()
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return count


def write_array_record(path: str | Path, examples: Iterable[SpatialExample], *, validate: bool = True) -> int:
    """Writes examples to one ArrayRecord file (atomically, see write_records); returns how many."""

    def payloads():
        for example in examples:
            if validate:
                example.validate()
            yield example_to_bytes(example)

    return write_records(path, payloads())


def resolve_paths(paths: str | Path | Sequence[str | Path]) -> list[str]:
    """Files as given; a directory stands for its *.array_record files, sorted by name."""
    items = [paths] if isinstance(paths, (str, Path)) else list(paths)
    out: list[str] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(p.glob(f"*{ARRAY_RECORD_SUFFIX}"))
            if not found:
                raise FileNotFoundError(f"no *{ARRAY_RECORD_SUFFIX} files in {p}")
            out.extend(str(f) for f in found)
        elif p.is_file():
            out.append(str(p))
        else:
            raise FileNotFoundError(f"ArrayRecord file not found: {p}")
    if not out:
        raise FileNotFoundError("no ArrayRecord paths given")
    return out


class ArrayRecordSource:
    """Random access to SpatialExamples stored in one or more ArrayRecord files."""

    def __init__(self, paths: str | Path | Sequence[str | Path], validate: bool = False):
        self.paths = resolve_paths(paths)
        self.validate = validate
        self._source = None
        self._bounds = None

    def _raw(self):
        # Opened lazily so the object pickles cheaply into Grain worker processes.
        if self._source is None:
            from grain.sources import ArrayRecordDataSource

            self._source = ArrayRecordDataSource(self.paths)
        return self._source

    def __getstate__(self):
        return {"paths": self.paths, "validate": self.validate}

    def __setstate__(self, state):
        self.__init__(state["paths"], state["validate"])

    def __len__(self) -> int:
        return len(self._raw())

    def _where(self, index: int) -> str:
        if self._bounds is None:
            from array_record.python.array_record_module import ArrayRecordReader

            sizes = []
            for p in self.paths:
                reader = ArrayRecordReader(p)
                sizes.append(reader.num_records())
                reader.close()
            self._bounds = np.cumsum(sizes)
        f = int(np.searchsorted(self._bounds, index, side="right"))
        start = 0 if f == 0 else int(self._bounds[f - 1])
        return f"{self.paths[f]}#{index - start}"

    def _decode(self, data: bytes, index: int) -> SpatialExample:
        try:
            example = example_from_bytes(data, f"record {index}")
            return example.validate() if self.validate else example
        except RecordError as e:
            raise e.at(self._where(index)) from None

    def __getitem__(self, index: int) -> SpatialExample:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} records")
        index %= n
        return self._decode(self._raw()[index], index)

    def __getitems__(self, indices: Sequence[int]) -> list[SpatialExample]:
        raw = self._raw().__getitems__(list(indices))
        return [self._decode(data, i) for data, i in zip(raw, indices)]

    def raw(self, index: int) -> bytes:
        return self._raw()[index]

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return f"ArrayRecordSource(paths={self.paths!r})"
