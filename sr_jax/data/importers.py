"""Importers: outside data -> SpatialExample, bad records counted per reason and skipped.

Formats
  jsonl     LLaMA-Factory ShareGPT-style lines, as SpatialReward-Train's `sft/data.jsonl`:
            {"image": ["rel/a.png", ...],
             "messages": [{"role": "user", "content": "<image><image>...prompt..."},
                          {"role": "assistant", "content": "...answer..."}]}
            Accepted like LLaMA-Factory accepts them: `image` or `images` (one path or a list),
            `messages` or `conversations`, `role`/`from` and `content`/`value`, roles user/human,
            assistant/gpt and a leading system turn (or a row-level "system" text); exchanges
            alternate user/assistant and end with an assistant turn. Image paths are relative to
            the JSONL file's folder.
  parquet   the same rows as a Parquet table (how Hugging Face `datasets` stores them); images
            may also be {"bytes": ..., "path": ...} structs (bytes win).
  synthdir  a folder written by `sr-jax data synth` (manifest.json + *.array_record).

Imported rows become verbatim records (records.py): the user text with its `<image>` tags, the
answer text and any system turn are kept exactly and are what training sees. The last answer is
also parsed (think blocks dropped, a ```json fence allowed) into regions/reasoning/score for
evaluation and statistics; a row whose answer does not parse still trains (counted per reason,
meta["answer_parsed"] False) unless `require_parsed` is set. The instruction is extracted
best-effort with `instruction_patterns` (regexes with a group named "instruction", first match
wins), else the user text without its <image> tags (meta["instruction_extracted"] False).

Every row is isolated: undecodable UTF-8, bad JSON (including nesting too deep and integers too
long to convert), numbers that overflow a float and unreadable images skip that row with a
reason; `strict` raises a RecordError naming it instead. Output is written to a temporary file
next to `out` and renamed into place only when complete.
Image bytes are copied verbatim after a full decode check (corrupt images are rejected here).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Callable, Iterator

from sr_jax.data.records import IMAGE_TAG, SCORE_RANGE, RecordError, Region, SpatialExample
from sr_jax.data.rows import RowStats, check_text, format_counts, guarded, load_image, load_json_row, row_id
from sr_jax.data.rows import fail as _fail
from sr_jax.data.storage import ArrayRecordSource, example_to_bytes, write_records

# Quotes that may wrap a whole instruction: straight, curly double and curly single.
_QUOTE_PAIRS = {'"': '"', "“": "”", "'": "'", "‘": "’", "„": "“", "«": "»"}
DEFAULT_INSTRUCTION_PATTERNS = (
    # "Instruction: make it blue", "editing instruction is: “...”": the rest of the line, quotes
    # inside it kept (Change the text "OPEN" to "CLOSED"); one wrapping pair is removed later.
    r"(?i)\binstruction\s*(?:is|was)?\s*[:：]\s*(?P<instruction>[^\n]+?)\s*(?:\n|$)",
    # 'the instruction is "make it blue". ...': up to the last matching quote on the line.
    r'(?i)\binstruction\s+(?:is|was)\s*"(?P<instruction>[^\n]+)"',
    r"(?i)\binstruction\s+(?:is|was)\s*“(?P<instruction>[^\n]+)”",
)
FORMATS = ("jsonl", "parquet", "synthdir")
USER_ROLES, ASSISTANT_ROLES, SYSTEM_ROLE = ("user", "human"), ("assistant", "gpt"), "system"
# Reasons a parsed answer's fields can be refused for; such a row still trains verbatim.
_FIELD_REASONS = ("bad_json", "bad_score", "bad_box", "bad_text", "score_range", "box_range", "box_order",
                  "pq_regions")


@dataclasses.dataclass
class ImportStats(RowStats):
    parsed: int = 0  # kept rows whose answer parsed into regions/score
    unparsed: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # kept anyway

    def summary(self) -> str:
        text = super().summary()
        if self.parsed or self.unparsed:
            text += (f"; answers parsed {self.parsed}, kept verbatim without parsing "
                     f"{sum(self.unparsed.values())} ({format_counts(self.unparsed)})")
        return text


@dataclasses.dataclass(frozen=True)
class ImportOptions:
    strict: bool = False  # raise on the first bad record instead of skipping it
    instruction_patterns: tuple[str, ...] = DEFAULT_INSTRUCTION_PATTERNS
    check_images: bool = True  # fully decode every image once
    require_parsed: bool = False  # skip rows whose answer does not parse (they train verbatim otherwise)


def _images(row: dict, rid: str) -> list:
    """`images` or `image`: one entry or a list (LLaMA-Factory wraps a lone entry in a list)."""
    given = [k for k in ("images", "image") if row.get(k) is not None]
    if len(given) == 2 and row["images"] != row["image"]:
        _fail("bad_image", "both 'images' and 'image' are given and differ", rid)
    value = row[given[0]] if given else []
    if isinstance(value, (str, bytes, bytearray, dict)):
        return [value]
    if not isinstance(value, list):
        _fail("bad_image", f"'{given[0]}' must be a path or a list, got {type(value).__name__}", rid)
    return value


def _turns(row: dict, rid: str) -> tuple[str | None, list[tuple[str, str]]]:
    """(system text or None, [(user, assistant), ...]) of a ShareGPT-style conversation."""
    messages = row.get("messages") if row.get("messages") is not None else row.get("conversations")
    if not isinstance(messages, list):
        _fail("bad_messages", "no 'messages' (or 'conversations') list", rid)
    texts = []
    for k, m in enumerate(messages):
        if not isinstance(m, dict):
            _fail("bad_messages", f"message {k} is not an object", rid)
        role = m["role"] if "role" in m else m.get("from")
        content = m["content"] if "content" in m else m.get("value")
        if not isinstance(content, str):
            _fail("bad_messages", f"message {k} (role {role!r}): content is not text", rid)
        texts.append((role, content))
    system = row.get("system")
    if texts and texts[0][0] == SYSTEM_ROLE:
        system = texts.pop(0)[1]
    if system is not None and not isinstance(system, str):
        _fail("bad_messages", "'system' is not text", rid)
    for k, (role, _) in enumerate(texts):
        want = USER_ROLES if k % 2 == 0 else ASSISTANT_ROLES
        if role not in want:
            _fail("bad_messages", f"turn {k}: expected role {'/'.join(want)}, got {role!r}", rid)
    if not texts or len(texts) % 2:
        _fail("bad_messages", f"need user/assistant exchanges ending with an answer, got {len(texts)} turns", rid)
    return system, [(texts[i][1], texts[i + 1][1]) for i in range(0, len(texts), 2)]


def _parse_answer(text: str, rid: str) -> dict:
    body = re.sub(r"<think>.*?</think>", "", text, flags=re.S).strip()
    fence = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", body, flags=re.S)
    if fence:
        body = fence.group(1)
    try:
        answer = json.loads(body)
    except (ValueError, RecursionError) as e:  # ValueError: also integers past the digit limit
        _fail("bad_json", f"assistant answer is not JSON ({type(e).__name__}: {e})", rid)
    if not isinstance(answer, dict):
        _fail("bad_json", "assistant answer is not a JSON object", rid)
    return answer


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _score(value, rid: str) -> tuple[float, float]:
    if not (isinstance(value, list) and len(value) == 2 and all(_is_number(v) for v in value)):
        _fail("bad_score", f"score must be two numbers, got {str(value)[:80]}", rid)
    try:
        out = float(value[0]), float(value[1])
    except OverflowError:
        _fail("score_range", "score too large for a float", rid)
    if not all(math.isfinite(v) for v in out):
        _fail("score_range", f"score {list(out)} is not finite", rid)
    return out


def _regions(value, rid: str) -> list[Region]:
    if not isinstance(value, list):
        _fail("bad_box", f"edit_region must be a list, got {type(value).__name__}", rid)
    out = []
    for k, item in enumerate(value):
        box = item.get("bbox_2d") if isinstance(item, dict) else None
        if not isinstance(box, list) or len(box) != 4:
            _fail("bad_box", f"region {k}: bbox_2d must be 4 numbers, got {str(box)[:80]}", rid)
        # Integers compare exactly (no float(), which overflows past 1e308); floats must be whole.
        if not all(isinstance(v, int) and not isinstance(v, bool) or isinstance(v, float) and v.is_integer()
                   for v in box):
            _fail("bad_box", f"region {k}: bbox_2d must hold integers, got {str(box)[:80]}", rid)
        label = item.get("label", "")
        if not isinstance(label, str):
            _fail("bad_box", f"region {k}: label must be text", rid)
        rid_k = item.get("id", k)
        region_id = rid_k if isinstance(rid_k, int) and not isinstance(rid_k, bool) and abs(rid_k) < 2**31 else k
        out.append(Region(region_id, label, tuple(int(v) for v in box)))
    return out


def _unquote(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and _QUOTE_PAIRS.get(text[0]) == text[-1]:
        inner = text[1:-1].strip()
        # Only a pair that wraps the whole text: '"A" to "B"' keeps its quotes.
        if inner and text[0] not in inner and text[-1] not in inner:
            return inner
    return text


def extract_instruction(user_text: str, patterns) -> str | None:
    for pattern in patterns:
        m = re.search(pattern, user_text)
        if m and m.group("instruction").strip():
            return _unquote(m.group("instruction"))
    return None


def _structured(answer_text: str, rid: str, n_images: int) -> dict:
    """Regions/reasoning/score of a parsed answer (RecordError when it does not parse)."""
    answer = _parse_answer(answer_text, rid)
    reasoning = answer.get("reasoning", "")
    if not isinstance(reasoning, str):
        _fail("bad_text", "reasoning must be text", rid)
    task = "sc" if "edit_region" in answer else "pq"
    fields = dict(task=task, reasoning=reasoning, score=_score(answer.get("score"), rid),
                  edit_region=_regions(answer["edit_region"], rid) if task == "sc" else [])
    SpatialExample(id=rid, images=[b""] * n_images, instruction="-", **fields)._validate_fields(SCORE_RANGE)
    return fields


def parse_conversation_row(row: dict, base: Path, rid: str, opts: ImportOptions) -> SpatialExample:
    """One ShareGPT-style row -> a validated verbatim SpatialExample (RecordError when unusable)."""
    if not isinstance(row, dict):
        _fail("bad_json", "row is not a JSON object", rid)
    system, turns = _turns(row, rid)
    images = _images(row, rid)
    (*history, (prompt, answer_text)) = turns
    n_tags = sum(u.count(IMAGE_TAG) for u, _ in turns)
    if n_tags != len(images):
        _fail("image_count", f"{n_tags} {IMAGE_TAG} tags but {len(images)} images", rid)
    if any(IMAGE_TAG in a for _, a in turns):
        _fail("image_count", f"an assistant turn holds an {IMAGE_TAG} tag", rid)
    check_text([system or ""] + [t for turn in turns for t in turn], rid)
    loaded = [load_image(entry, base, i, rid, opts.check_images) for i, entry in enumerate(images)]
    meta = {"source": "import", "verbatim": True, "prompt": prompt, "answer": answer_text}
    if system:
        meta["system"] = system
    if history:
        meta["history"] = [[u, a] for u, a in history]
    try:
        fields = _structured(answer_text, rid, len(loaded))
        meta["answer_parsed"] = True
    except RecordError as e:
        if opts.require_parsed or e.reason not in _FIELD_REASONS:
            raise
        fields = dict(task="sc" if len(loaded) >= 2 else "pq")
        meta["answer_parsed"] = False
        meta["parse_error"] = e.reason
    instruction = ""
    if fields["task"] == "sc":
        users = [prompt] + [u for u, _ in history]
        instruction = next(filter(None, (extract_instruction(u, opts.instruction_patterns) for u in users)), None)
        meta["instruction_extracted"] = instruction is not None
        if instruction is None:
            instruction = prompt.replace(IMAGE_TAG, "").strip()
    return SpatialExample(id=rid, images=loaded, instruction=instruction, meta=meta, **fields).validate()


def _guarded(rows: Iterator[tuple[str, Callable[[], SpatialExample]]], stats: ImportStats, strict: bool):
    """rows.guarded, counting whether each kept verbatim row's answer parsed."""
    for example in guarded(rows, stats, strict):
        if example.meta.get("verbatim"):
            if example.meta.get("answer_parsed"):
                stats.parsed += 1
            else:
                stats.unparsed[example.meta.get("parse_error", "?")] += 1
        yield example


def read_jsonl(path: str | Path, stats: ImportStats | None = None, opts: ImportOptions = ImportOptions()):
    path = Path(path)
    stats = stats if stats is not None else ImportStats()

    def rows():
        # Bytes per line, decoded one line at a time: a bad byte costs only its own line.
        with path.open("rb") as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                where = f"{path}:{lineno}"

                def parse(raw=raw, lineno=lineno):
                    fallback = f"{path.name}:{lineno}"
                    try:
                        line = raw.decode("utf-8")
                    except UnicodeDecodeError as e:
                        _fail("bad_utf8", f"line is not UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r})", fallback)
                    if lineno == 1:
                        line = line.removeprefix("\ufeff")
                    row = load_json_row(line, fallback, "line")
                    return parse_conversation_row(row, path.parent, row_id(row, fallback), opts)

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
                rid = row_id(row, f"{path.name}#{index}")
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
    """Streams `src` into one ArrayRecord file `out` (replaced only when complete); returns the counts."""
    stats = ImportStats()
    if fmt == "jsonl":
        examples = read_jsonl(src, stats, opts)
    elif fmt == "parquet":
        examples = read_parquet(src, stats, opts)
    elif fmt == "synthdir":
        examples = read_synthdir(src, split, stats, opts)
    else:
        raise ValueError(f"unknown import format {fmt!r}; expected one of {FORMATS}")

    def payloads():
        for example in examples:  # rows validate when parsed
            try:
                data = example_to_bytes(example)
            except RecordError as e:
                if opts.strict:
                    raise
                stats.skipped[e.reason] += 1
                continue
            yield data

    stats.written = write_records(out, payloads())
    return stats
