"""Importers: outside data -> SpatialExample, bad records counted per reason and skipped.

Formats
  jsonl     LLaMA-Factory / ShareGPT lines as SpatialReward-Train uses them:
            {"messages": [{"role": "user", "content": "<image><image>...prompt..."},
                          {"role": "assistant", "content": "{json answer}"}],
             "images": ["rel/path1.png", ...]}
            ("conversations" with "from"/"value" and human/gpt roles is read too; an optional
            system turn is ignored.) Image paths are relative to the JSONL file's folder.
  parquet   the same rows as a Parquet table (how Hugging Face `datasets` stores them): column
            `messages` (list of {role, content}) and `images`, a list whose items are
            {"bytes": ..., "path": ...} structs (bytes win; a path is relative to the file).
  synthdir  a folder written by `sr-jax data synth` (manifest.json + *.array_record).
The assistant answer is parsed as JSON (a ```json fence is allowed): with `edit_region` it is an
SC record, otherwise PQ. The user text is kept verbatim as meta["prompt"]; the instruction is
extracted best-effort with `instruction_patterns` (regexes with a group named "instruction",
first match wins). When none matches, an SC record's instruction is the user text without its
<image> tags and meta["instruction_extracted"] is False.
Image bytes are copied verbatim after a full decode check (corrupt images are rejected here).
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import re
from pathlib import Path
from typing import Callable, Iterator, NoReturn

from PIL import Image

from sr_jax.data.records import RecordError, Region, SpatialExample
from sr_jax.data.storage import ArrayRecordSource, write_array_record

DEFAULT_INSTRUCTION_PATTERNS = (
    # "Instruction: make it blue", "editing instruction is: \"...\"" (up to the end of the line)
    r"(?i)\binstruction\s*(?:is|was)?\s*[:：]\s*[\"“']?(?P<instruction>[^\n\"”]+?)[\"”']?\s*(?:\n|$)",
    # 'the instruction is "make it blue"'
    r"(?i)\binstruction\s+(?:is|was)\s*[\"“](?P<instruction>[^\"”]+)[\"”]",
)
IMAGE_TAG = "<image>"
FORMATS = ("jsonl", "parquet", "synthdir")


@dataclasses.dataclass
class ImportStats:
    read: int = 0
    written: int = 0
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def summary(self) -> str:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none"
        return f"read {self.read}, kept {self.written}, skipped {sum(self.skipped.values())} ({reasons})"


@dataclasses.dataclass(frozen=True)
class ImportOptions:
    strict: bool = False  # raise on the first bad record instead of skipping it
    instruction_patterns: tuple[str, ...] = DEFAULT_INSTRUCTION_PATTERNS
    check_images: bool = True  # fully decode every image once


def _fail(reason: str, message: str, rid: str) -> NoReturn:
    raise RecordError(reason, message, rid)


def _load_image(entry, base: Path, index: int, rid: str, check: bool) -> bytes:
    if isinstance(entry, dict):
        data, path = entry.get("bytes"), entry.get("path")
    elif isinstance(entry, (bytes, bytearray)):
        data, path = entry, None
    elif isinstance(entry, str):
        data, path = None, entry
    else:
        _fail("bad_image", f"image {index}: expected a path, bytes or {{bytes, path}}, got {type(entry).__name__}", rid)
    if not data:
        if not path:
            _fail("missing_image", f"image {index} has neither bytes nor a path", rid)
        file = Path(path) if Path(path).is_absolute() else base / path
        try:
            data = file.read_bytes()
        except OSError:
            _fail("missing_image", f"image {index} not found: {file}", rid)
    data = bytes(data)
    if check:
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
        except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, ... on bad data
            _fail("bad_image", f"image {index} cannot be decoded ({type(e).__name__}: {e})", rid)
    return data


def _turns(row: dict, rid: str) -> tuple[str, str]:
    """(user text, assistant text) of a one-exchange conversation."""
    messages = row.get("messages", row.get("conversations"))
    if not isinstance(messages, list):
        _fail("bad_messages", "no 'messages' (or 'conversations') list", rid)
    user, answer = [], []
    for m in messages:
        if not isinstance(m, dict):
            _fail("bad_messages", "a message is not an object", rid)
        role = m.get("role", m.get("from"))
        content = m.get("content", m.get("value"))
        if not isinstance(content, str):
            _fail("bad_messages", f"message content of role {role!r} is not text", rid)
        if role in ("user", "human"):
            user.append(content)
        elif role in ("assistant", "gpt"):
            answer.append(content)
        elif role != "system":
            _fail("bad_messages", f"unknown role {role!r}", rid)
    if len(user) != 1 or len(answer) != 1:
        _fail("bad_messages", f"need one user and one assistant turn, got {len(user)} and {len(answer)}", rid)
    return user[0], answer[0]


def _parse_answer(text: str, rid: str) -> dict:
    body = text.strip()
    fence = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", body, flags=re.S)
    if fence:
        body = fence.group(1)
    try:
        answer = json.loads(body)
    except json.JSONDecodeError as e:
        _fail("bad_json", f"assistant answer is not JSON ({e})", rid)
    if not isinstance(answer, dict):
        _fail("bad_json", "assistant answer is not a JSON object", rid)
    return answer


def _score(value, rid: str) -> tuple[float, float]:
    ok = isinstance(value, list) and len(value) == 2
    if not ok or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        _fail("bad_score", f"score must be two numbers, got {value!r}", rid)
    return float(value[0]), float(value[1])


def _regions(value, rid: str) -> list[Region]:
    if not isinstance(value, list):
        _fail("bad_box", f"edit_region must be a list, got {type(value).__name__}", rid)
    out = []
    for k, item in enumerate(value):
        box = item.get("bbox_2d") if isinstance(item, dict) else None
        if not isinstance(box, list) or len(box) != 4:
            _fail("bad_box", f"region {k}: bbox_2d must be 4 numbers, got {box!r}", rid)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and float(v).is_integer() for v in box):
            _fail("bad_box", f"region {k}: bbox_2d must hold integers, got {box!r}", rid)
        label = item.get("label", "")
        if not isinstance(label, str):
            _fail("bad_box", f"region {k}: label must be text", rid)
        rid_k = item.get("id", k)
        out.append(Region(int(rid_k) if isinstance(rid_k, int) else k, label, tuple(int(v) for v in box)))
    return out


def extract_instruction(user_text: str, patterns) -> str | None:
    for pattern in patterns:
        m = re.search(pattern, user_text)
        if m and m.group("instruction").strip():
            return m.group("instruction").strip()
    return None


def parse_conversation_row(row: dict, base: Path, rid: str, opts: ImportOptions) -> SpatialExample:
    """One ShareGPT-style row -> a validated SpatialExample (RecordError when unusable)."""
    if not isinstance(row, dict):
        _fail("bad_json", "row is not a JSON object", rid)
    user, answer_text = _turns(row, rid)
    answer = _parse_answer(answer_text, rid)
    images = row.get("images") or []
    if not isinstance(images, list):
        _fail("bad_image", "'images' must be a list", rid)
    if user.count(IMAGE_TAG) != len(images):
        _fail("image_count", f"{user.count(IMAGE_TAG)} {IMAGE_TAG} tags but {len(images)} images", rid)
    loaded = [_load_image(entry, base, i, rid, opts.check_images) for i, entry in enumerate(images)]
    task = "sc" if "edit_region" in answer else "pq"
    reasoning = answer.get("reasoning", "")
    if not isinstance(reasoning, str):
        _fail("bad_text", "reasoning must be text", rid)
    meta = {"source": "import", "prompt": user}
    instruction = ""
    if task == "sc":
        instruction = extract_instruction(user, opts.instruction_patterns)
        meta["instruction_extracted"] = instruction is not None
        if instruction is None:
            instruction = user.replace(IMAGE_TAG, "").strip()
    example = SpatialExample(
        id=rid,
        task=task,
        images=loaded,
        instruction=instruction,
        edit_region=_regions(answer["edit_region"], rid) if task == "sc" else [],
        reasoning=reasoning,
        score=_score(answer.get("score"), rid),
        meta=meta,
    )
    return example.validate()


def _guarded(rows: Iterator[tuple[str, Callable[[], SpatialExample]]], stats: ImportStats, strict: bool):
    """Runs each row's parser; counts and skips RecordErrors unless strict."""
    for where, parse in rows:
        stats.read += 1
        try:
            example = parse()
        except RecordError as e:
            if strict:
                raise RecordError(e.reason, f"{e} [{where}]", e.record_id) from None
            stats.skipped[e.reason] += 1
            continue
        yield example


def _row_id(row, fallback: str) -> str:
    rid = row.get("id") if isinstance(row, dict) else None
    return str(rid) if isinstance(rid, (str, int)) and not isinstance(rid, bool) else fallback


def read_jsonl(path: str | Path, stats: ImportStats | None = None, opts: ImportOptions = ImportOptions()):
    path = Path(path)
    stats = stats if stats is not None else ImportStats()

    def rows():
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"

                def parse(line=line, where=where, lineno=lineno):
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        _fail("bad_json", f"line is not JSON ({e})", where)
                    return parse_conversation_row(row, path.parent, _row_id(row, f"{path.name}:{lineno}"), opts)

                yield where, parse

    return _guarded(rows(), stats, opts.strict)


def read_parquet(path: str | Path, stats: ImportStats | None = None, opts: ImportOptions = ImportOptions()):
    import pyarrow.parquet as pq

    path = Path(path)
    stats = stats if stats is not None else ImportStats()

    def rows():
        index = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=64):
            for row in batch.to_pylist():
                rid = _row_id(row, f"{path.name}#{index}")
                yield f"{path} row {index}", (lambda row=row, rid=rid: parse_conversation_row(row, path.parent, rid, opts))
                index += 1

    return _guarded(rows(), stats, opts.strict)


def read_synthdir(
    path: str | Path, split: str | None = None, stats: ImportStats | None = None, opts: ImportOptions = ImportOptions()
):
    path = Path(path)
    stats = stats if stats is not None else ImportStats()
    manifest_file = path / "manifest.json"
    try:
        manifest = json.loads(manifest_file.read_text())
        splits = manifest["splits"]
    except (OSError, ValueError, KeyError) as e:
        raise FileNotFoundError(f"{manifest_file}: not a synthetic data folder ({e})") from None
    if split is not None and split not in splits:
        raise KeyError(f"{manifest_file}: no split {split!r}; have {sorted(splits)}")
    files = [path / splits[s]["file"] for s in ([split] if split else sorted(splits))]
    source = ArrayRecordSource(files, validate=True)

    def rows():
        for i in range(len(source)):
            yield f"{path} record {i}", (lambda i=i: source[i])

    return _guarded(rows(), stats, opts.strict)


def import_records(
    fmt: str, src: str | Path, out: str | Path, opts: ImportOptions = ImportOptions(), split: str | None = None
) -> ImportStats:
    """Streams `src` into one ArrayRecord file `out`; returns the counts."""
    stats = ImportStats()
    if fmt == "jsonl":
        examples = read_jsonl(src, stats, opts)
    elif fmt == "parquet":
        examples = read_parquet(src, stats, opts)
    elif fmt == "synthdir":
        examples = read_synthdir(src, split, stats, opts)
    else:
        raise ValueError(f"unknown import format {fmt!r}; expected one of {FORMATS}")
    stats.written = write_array_record(out, examples, validate=False)  # rows validate when parsed
    return stats
