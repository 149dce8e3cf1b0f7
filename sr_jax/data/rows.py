"""Row isolation shared by the importers (importers.py: LLaMA-Factory JSONL/Parquet; grpo_import.py:
ms-swift GRPO JSON): one bad row is counted by reason and skipped, or, in strict mode, raised once
as a RecordError naming the record and where it stands. Each importer keeps its own format
handling (how rows are split, which fields a row holds); what is here is what both check alike.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NoReturn, TypeVar

from PIL import Image

from sr_jax.data.records import RecordError

T = TypeVar("T")

# A failure no check foresaw still costs only its own row (counted as bad_row).
DATA_ERRORS = (ValueError, TypeError, KeyError, IndexError, OverflowError, RecursionError)


def fail(reason: str, message: str, rid: str) -> NoReturn:
    raise RecordError(reason, message, rid)


def format_counts(counter) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(counter.items())) or "none"


@dataclasses.dataclass
class RowStats:
    read: int = 0
    written: int = 0
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def summary(self) -> str:
        return (f"read {self.read}, kept {self.written}, skipped {sum(self.skipped.values())} "
                f"({format_counts(self.skipped)})")


def load_json_row(text: str, rid: str, what: str = "row") -> Any:
    """json.loads, a failure being this row's bad_json: not JSON, nesting deeper than Python's stack
    (RecursionError) or an integer past Python's digit limit (ValueError)."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        fail("bad_json", f"{what} is not JSON ({type(e).__name__}: {str(e)[:200]})", rid)


def check_text(texts: Iterable[str], rid: str) -> None:
    """bad_utf8 for a text that cannot be stored as UTF-8: a lone surrogate, from a JSON \\ud800
    escape or from undecodable bytes read with errors="surrogateescape"."""
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            fail("bad_utf8", f"text is not valid UTF-8 ({e.reason} at {e.start})", rid)


def row_id(row, fallback: str) -> str:
    """The row's own "id" (text, or an integer of a sane size), else `fallback` (file and position)."""
    rid = row.get("id") if isinstance(row, dict) else None
    if isinstance(rid, str) or isinstance(rid, int) and not isinstance(rid, bool) and abs(rid) < 10**18:
        return str(rid)
    return fallback


def load_image(entry, base: Path, index: int, rid: str, check: bool = True) -> bytes:
    """An image entry (a path relative to `base`, bytes, or {bytes, path}: bytes win) -> its bytes,
    fully decoded once when `check` so that a corrupt image fails here, in its own row."""
    if isinstance(entry, dict):
        data, path = entry.get("bytes"), entry.get("path")
    elif isinstance(entry, (bytes, bytearray)):
        data, path = entry, None
    elif isinstance(entry, str):
        data, path = None, entry
    else:
        fail("bad_image", f"image {index}: expected a path, bytes or {{bytes, path}}, got {type(entry).__name__}", rid)
    if not data:
        if not path or not isinstance(path, str):
            fail("missing_image", f"image {index} has neither bytes nor a path", rid)
        file = Path(path) if Path(path).is_absolute() else base / path
        try:
            data = file.read_bytes()
        except (OSError, ValueError):  # ValueError: a NUL byte in the path
            fail("missing_image", f"image {index} not found: {file}", rid)
    if not isinstance(data, (bytes, bytearray)):
        fail("bad_image", f"image {index}: bytes must be binary, got {type(data).__name__}", rid)
    data = bytes(data)
    if check:
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
        except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError, ...
            fail("bad_image", f"image {index} cannot be decoded ({type(e).__name__}: {e})", rid)
    return data


def guarded(rows: Iterable[tuple[str, Callable[[], T]]], stats: RowStats, strict: bool) -> Iterator[T]:
    """Runs each row's parser (`where` names the row's place in its file); counts and skips a bad
    row unless `strict`, which raises a RecordError naming the record and `where` once."""
    for where, parse in rows:
        stats.read += 1
        try:
            result = parse()
        except RecordError as e:
            if strict:
                raise e.at(where) from None
            stats.skipped[e.reason] += 1
            continue
        except DATA_ERRORS as e:
            if strict:
                raise RecordError("bad_row", f"{type(e).__name__}: {e}", where) from None
            stats.skipped["bad_row"] += 1
            continue
        yield result
