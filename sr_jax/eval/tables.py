"""Reading benchmark tables from local files, row by row, in the formats Hugging Face publishes.

Accepted files (a directory means every such file under it, sorted by path):
  *.parquet  Hugging Face dataset shards; an image column holds {"bytes", "path"} structs.
  *.arrow    Arrow IPC stream files as `datasets.save_to_disk` (and Hub "arrow" repos) write them;
             the IPC file format is read too.
  *.jsonl    one JSON object per line; images are paths relative to the file's folder.
  *.json     a list of rows, or {"pairs": [...]} (MMRB2's release files); only when named.
Rows are produced a few at a time so a multi-GB shard never sits in memory; image columns can
be skipped (`drop`) or reduced to their list length (`lengths`) for a metadata-only pass.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Iterable, Iterator

from PIL import Image

from sr_jax.data.image import open_image

SCANNED_SUFFIXES = (".parquet", ".arrow", ".jsonl")
_CHUNK_ROWS = 8


class BenchmarkError(ValueError):
    """Bad benchmark data; the message names the file/row/key."""


@dataclasses.dataclass
class Row:
    index: int   # position over all files, in reading order
    file: Path
    where: str   # "file#row N" for messages
    data: dict

    @property
    def base(self) -> Path:
        return self.file.parent


def table_files(path: str | Path, suffixes: Iterable[str] = SCANNED_SUFFIXES) -> list[Path]:
    path = Path(path)
    suffixes = tuple(suffixes)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise BenchmarkError(f"benchmark data not found: {path}")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in suffixes
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise BenchmarkError(f"no {'/'.join(suffixes)} files under {path}")
    return files


def _arrow_batches(file: Path):
    import pyarrow as pa

    with pa.memory_map(str(file)) as source:
        try:
            reader = pa.ipc.open_stream(source)
            batches: Iterable = reader
        except pa.ArrowInvalid:
            source.seek(0)
            reader = pa.ipc.open_file(source)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        for batch in batches:
            for start in range(0, batch.num_rows, _CHUNK_ROWS):
                yield batch.slice(start, _CHUNK_ROWS)


def _parquet_batches(file: Path, drop: set[str]):
    import pyarrow.parquet as pq

    handle = pq.ParquetFile(str(file))
    columns = [n for n in handle.schema_arrow.names if n not in drop]
    yield from handle.iter_batches(batch_size=_CHUNK_ROWS, columns=columns)


def _batch_rows(batch, drop: set[str], lengths: set[str]) -> list[dict]:
    import pyarrow.compute as pc

    columns = {}
    for name, column in zip(batch.schema.names, batch.columns):
        if name in drop:
            continue
        columns[name] = (pc.list_value_length(column) if name in lengths else column).to_pylist()
    names = list(columns)
    return [dict(zip(names, values)) for values in zip(*columns.values())] if names else [{}] * batch.num_rows


def _python_row(obj: Any, where: str, drop: set[str], lengths: set[str]) -> dict:
    if not isinstance(obj, dict):
        raise BenchmarkError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    row = {k: v for k, v in obj.items() if k not in drop}
    for name in lengths & row.keys():
        row[name] = len(row[name]) if isinstance(row[name], list) else None
    return row


def _file_rows(file: Path, drop: set[str], lengths: set[str]) -> Iterator[tuple[str, dict]]:
    """(where, row) pairs; `where` is "file:line" for JSONL, "file#row N" otherwise."""
    suffix = file.suffix
    if suffix in (".parquet", ".arrow"):
        batches = _parquet_batches(file, drop) if suffix == ".parquet" else _arrow_batches(file)
        number = 0
        for batch in batches:
            for row in _batch_rows(batch, drop, lengths):
                yield f"{file}#row {number}", row
                number += 1
    elif suffix == ".jsonl":
        with open(file, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise BenchmarkError(f"{file}:{number}: not valid JSON ({e})") from None
                yield f"{file}:{number}", _python_row(obj, f"{file}:{number}", drop, lengths)
    elif suffix == ".json":
        try:
            obj = json.loads(file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise BenchmarkError(f"{file}: not valid JSON ({e})") from None
        rows = obj.get("pairs") if isinstance(obj, dict) else obj
        if not isinstance(rows, list):
            raise BenchmarkError(f"{file}: expected a list of rows or {{\"pairs\": [...]}}")
        for number, item in enumerate(rows):
            yield f"{file}#row {number}", _python_row(item, f"{file}#row {number}", drop, lengths)
    else:
        raise BenchmarkError(f"{file}: unsupported file type {suffix!r} (parquet, arrow, jsonl, json)")


def iter_rows(files: Iterable[Path], *, drop: Iterable[str] = (), lengths: Iterable[str] = (),
              limit: int | None = None) -> Iterator[Row]:
    """Rows of all files in order; stops after `limit` rows."""
    drop, lengths = set(drop), set(lengths)
    index = 0
    for file in files:
        for where, data in _file_rows(Path(file), drop, lengths):
            if limit is not None and index >= limit:
                return
            yield Row(index, Path(file), where, data)
            index += 1


def require(row: Row, *keys: str) -> None:
    missing = [k for k in keys if row.data.get(k) is None]
    if missing:
        raise BenchmarkError(f"{row.where}: missing field(s) {missing}")


def load_image(value: Any, base: Path, where: str) -> Image.Image:
    """An image cell -> decoded PIL image. Accepts {"bytes", "path"} (bytes win), raw bytes, or a
    path (relative to `base`)."""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
    elif isinstance(value, (bytes, bytearray, memoryview)):
        data, path = bytes(value), None
    elif isinstance(value, str):
        data, path = None, value
    else:
        raise BenchmarkError(f"{where}: expected image bytes, a path or {{bytes, path}}, got {type(value).__name__}")
    if data:
        source: Any = bytes(data)
    elif path:
        source = Path(path) if Path(path).is_absolute() else base / path
        if not source.is_file():
            raise BenchmarkError(f"{where}: image file not found: {source}")
    else:
        raise BenchmarkError(f"{where}: image has neither bytes nor a path")
    try:
        return open_image(source)
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, ... on bad data
        raise BenchmarkError(f"{where}: image cannot be decoded ({type(e).__name__}: {e})") from None
