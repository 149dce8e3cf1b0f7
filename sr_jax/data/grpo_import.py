"""`sr-jax data import --format grpo-json`: GRPO prompt rows (ms-swift's dataset form, as in the
released SpatialReward-Train `rl/data.json`) -> prompt-only verbatim records for `sr-jax rl`.

A row (the file is a JSON array of rows, or JSON lines):
    {"messages": [{"role": "user", "content": "<image><image>...prompt..."}],
     "images": ["a.png", "b.png"] | [{"bytes": ..., "path": ...}] | "a.png",
     "solution": "sc" | "pq",          the task; it holds no answer
     "instruction": "...",             the editing instruction (given to the judge reward)
     "id": ...}
Read as ms-swift reads it: `conversations`/`from`/`value` are accepted for
`messages`/`role`/`content`; a content may be a list of {"type": "image"} / {"type": "text"}
parts; a system turn becomes meta["system"]; a trailing assistant turn is dropped (GRPO samples
the answer); images without an `<image>` tag get theirs at the start of the first user turn (as
ms-swift's template adds them), more tags than images is an error. Image paths are relative to
the file's folder (or `image_root`).

Each record is verbatim (meta["verbatim"], meta["prompt"] = the user text with its `<image>` tags
where they stand) and prompt-only: no meta["answer"], meta["ground_truth"] = False, so rewards
that compare with a true answer refuse it (`sr_jax.rl.rewards.check_rewards_against_data`).

Every row is isolated: one that is not JSON (even one with a 5000-digit number or nested 10000
deep), has bad messages, images or task, or cannot be stored is skipped and counted by reason;
`strict` stops at the first and names it. The output appears only when complete (written to a
temporary file, then renamed), so a failed import leaves an existing output untouched.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Iterator

from sr_jax.data.records import IMAGE_TAG, RecordError, SpatialExample
from sr_jax.data.rows import RowStats, check_text, fail as _fail, guarded, load_image, load_json_row, row_id
from sr_jax.data.storage import example_to_bytes, write_records

FORMAT = "grpo-json"
TASKS = ("sc", "pq")
_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|"|[\[\]{},]', re.S)  # a whole string, a lone quote, or structure
_KNOWN_COLUMNS = {"messages", "conversations", "query", "images", "image", "solution", "instruction", "id"}


class GRPOImportStats(RowStats):
    """read / written / skipped (by reason) of one grpo-json import."""


class _Lines:
    """'line L column C' of increasing offsets, counting newlines only since the previous call
    (counting from the start each time is quadratic in the file size)."""

    def __init__(self, text: str):
        self.text, self.offset, self.line, self.line_start = text, 0, 1, 0

    def __call__(self, offset: int) -> str:
        if offset < self.offset:
            self.offset, self.line, self.line_start = 0, 1, 0
        self.line += self.text.count("\n", self.offset, offset)
        newline = self.text.rfind("\n", self.offset, offset)
        if newline >= 0:
            self.line_start = newline + 1
        self.offset = offset
        return f"line {self.line} column {offset - self.line_start + 1}"


def _row(text: str, begin: int, end: int, where) -> tuple[int, str, str]:
    chunk = text[begin:end]
    first = begin + len(chunk) - len(chunk.lstrip())  # locate the row at its first character
    return first, chunk, where(first)


def split_rows(text: str) -> Iterator[tuple[int, str | None, str]]:
    """(offset, row text or None when the rest is unreadable, where) for each element of a JSON
    array, or each line of JSON lines. Elements are found by their brackets (strings skipped), not
    parsed, so a row that does not parse is isolated; only a broken structure (an unterminated
    string, unbalanced brackets) ends the file, reported as one last unreadable row."""
    start = len(text) - len(text.lstrip())
    if text[start:start + 1] != "[":  # JSON lines
        pos = 0
        for number, line in enumerate(text.splitlines(keepends=True), 1):
            if line.strip():
                yield pos, line, f"line {number}"
            pos += len(line)
        return
    _line_col = _Lines(text)
    depth, begin = 0, start + 1
    for m in _TOKEN.finditer(text, start + 1):
        token = m.group()
        if token.startswith('"'):
            if len(token) == 1:
                yield m.start(), None, f"unterminated string at {_line_col(m.start())}"
                return
            continue
        if token in "[{":
            depth += 1
        elif token in "]}":
            if depth == 0:
                if token == "]":
                    if text[begin:m.start()].strip():
                        yield _row(text, begin, m.start(), _line_col)
                    if text[m.end():].strip():
                        yield m.end(), None, f"text after the array at {_line_col(m.end())}"
                    return
                yield m.start(), None, f"unbalanced '}}' at {_line_col(m.start())}"
                return
            depth -= 1
        elif depth == 0:  # a comma between rows
            yield _row(text, begin, m.start(), _line_col)
            begin = m.end()
    yield begin, None, f"the array is not closed (from {_line_col(begin)})"


def _content_text(content, rid: str, role) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts
        out = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                out.append(part["text"])
            elif kind == "image":
                out.append(IMAGE_TAG)
            else:
                _fail("bad_messages", f"a content part of role {role!r} is neither text nor image", rid)
        return "".join(out)
    _fail("bad_messages", f"message content of role {role!r} is not text", rid)


def _conversation(row: dict, rid: str) -> tuple[str | None, list[tuple[str, str]], str, bool]:
    """(system, earlier [user, assistant] exchanges, the prompt's user text, a trailing answer dropped)."""
    messages = row.get("messages", row.get("conversations"))
    if messages is None and isinstance(row.get("query"), str):
        messages = [{"role": "user", "content": row["query"]}]
    if not isinstance(messages, list) or not messages:
        _fail("bad_messages", "no 'messages' (or 'conversations') list", rid)
    system, turns = None, []
    for k, m in enumerate(messages):
        if not isinstance(m, dict):
            _fail("bad_messages", f"message {k} is not an object", rid)
        role = m.get("role", m.get("from"))
        text = _content_text(m.get("content", m.get("value")), rid, role)
        if role == "system":
            if k != 0:
                _fail("bad_messages", "a system turn after the first message", rid)
            system = text
        elif role in ("user", "human", "assistant", "gpt"):
            turns.append(("user" if role in ("user", "human") else "assistant", text))
        else:
            _fail("bad_messages", f"unknown role {role!r}", rid)
    dropped = bool(turns) and turns[-1][0] == "assistant"
    if dropped:
        turns = turns[:-1]
    roles = [r for r, _ in turns]
    if not turns or roles != ["user", "assistant"] * (len(turns) // 2) + ["user"]:
        _fail("bad_messages", f"turns must alternate user/assistant and end with a user turn, got {roles}", rid)
    history = [(turns[i][1], turns[i + 1][1]) for i in range(0, len(turns) - 1, 2)]
    return system, history, turns[-1][1], dropped


def _plain_columns(row: dict) -> dict:
    """Extra columns kept in meta (ms-swift hands every column to the reward functions)."""
    out = {}
    for key, value in row.items():
        if key in _KNOWN_COLUMNS or not isinstance(key, str):
            continue
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError):
            continue
        out[key] = value
    return out


def parse_grpo_row(row, base: Path, rid: str) -> SpatialExample:
    """One ms-swift GRPO row -> a validated prompt-only verbatim SpatialExample (RecordError when unusable)."""
    if not isinstance(row, dict):
        _fail("bad_json", "row is not a JSON object", rid)
    solution = row.get("solution")
    task = solution.strip().lower() if isinstance(solution, str) else None
    if task not in TASKS:
        _fail("bad_task", f"'solution' must be 'sc' or 'pq' (the task), got {solution!r}", rid)
    system, history, prompt, dropped = _conversation(row, rid)
    images = row.get("images", row.get("image"))
    images = [] if images is None else [images] if isinstance(images, (str, dict)) else images
    if not isinstance(images, list):
        _fail("bad_image", "'images' must be a list", rid)
    tags = sum(u.count(IMAGE_TAG) for u, _ in history) + prompt.count(IMAGE_TAG)
    if tags > len(images):
        _fail("image_count", f"{tags} {IMAGE_TAG} tags but {len(images)} images", rid)
    added = len(images) - tags
    if added:  # ms-swift puts untagged images at the start of the first user turn
        if history:
            history[0] = (IMAGE_TAG * added + history[0][0], history[0][1])
        else:
            prompt = IMAGE_TAG * added + prompt
    if task == "sc" and len(images) < 2:
        _fail("image_count", f"an SC prompt takes the original(s) and the edited image, got {len(images)}", rid)
    if task == "pq" and len(images) < 1:
        _fail("image_count", "a PQ prompt takes the edited image, got none", rid)
    instruction = row.get("instruction", "")
    instruction = "" if instruction is None else instruction
    if not isinstance(instruction, str):
        _fail("bad_text", "'instruction' must be text", rid)
    if task == "sc" and not instruction.strip():
        _fail("empty_instruction", "an SC prompt needs its editing instruction (the judge reads it)", rid)
    check_text([prompt, instruction, system or ""] + [t for pair in history for t in pair], rid)
    loaded = [load_image(entry, base, i, rid) for i, entry in enumerate(images)]
    meta = {"source": FORMAT, "verbatim": True, "prompt": prompt, "ground_truth": False, "solution": solution}
    if system:
        meta["system"] = system
    if history:
        meta["history"] = [list(pair) for pair in history]
    if added:
        meta["image_tags_added"] = added
    if dropped:
        meta["answer_dropped"] = True
    columns = _plain_columns(row)
    if columns:
        meta["columns"] = columns
    return SpatialExample(id=rid, task=task, images=loaded, instruction=instruction, meta=meta).validate()


def read_grpo_json(path: str | Path, stats: GRPOImportStats | None = None, *, strict: bool = False,
                   image_root: str | Path | None = None) -> Iterator[tuple[SpatialExample, bytes]]:
    """(record, its stored bytes) for every usable row; bad rows are counted in `stats.skipped`."""
    path = Path(path)
    stats = stats if stats is not None else GRPOImportStats()
    base = Path(image_root) if image_root else path.parent
    raw = path.read_bytes()
    # Undecodable bytes become lone surrogates, so only the rows holding them fail (bad_utf8).
    text = raw.decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")

    def rows():
        for index, (_, chunk, where) in enumerate(split_rows(text)):
            def parse(chunk=chunk, where=where, fallback=f"{path.name}#{index}"):
                if chunk is None:
                    _fail("bad_json", f"the rest of the file is unreadable: {where}", fallback)
                row = load_json_row(chunk, fallback)
                example = parse_grpo_row(row, base, row_id(row, fallback))
                return example, example_to_bytes(example)

            yield f"{path} {where}", parse

    yield from guarded(rows(), stats, strict)


def import_grpo_json(src: str | Path, out: str | Path, *, strict: bool = False,
                     image_root: str | Path | None = None) -> GRPOImportStats:
    """Streams `src` into the ArrayRecord file `out`, which appears only when the import completes
    with at least one row (no usable row leaves an existing `out` as it was)."""
    stats = GRPOImportStats()
    rows = read_grpo_json(src, stats, strict=strict, image_root=image_root)
    stats.written = write_records(out, (data for _, data in rows), replace_empty=False)
    return stats


def import_command(args) -> int:
    """`sr-jax data import --format grpo-json` (registered in sr_jax.data.cli)."""
    try:
        stats = import_grpo_json(args.src, args.out, strict=args.strict, image_root=getattr(args, "image_root", None))
    except (RecordError, FileNotFoundError, IsADirectoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not stats.written:
        print(f"error: {args.src}: no usable rows, {args.out} not written ({stats.summary()})", file=sys.stderr)
        return 1
    print(f"{args.src} -> {args.out}: {stats.summary()}")
    return 0
