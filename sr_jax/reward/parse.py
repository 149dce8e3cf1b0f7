"""Reading the reward model's answers: a forgiving parser (the reward formula is `aggregate.py`).

`parse_output(text)` reads one generated answer (SC: edit regions + reasoning + [success,
overediting]; PQ: reasoning + [naturalness, artifacts]). A policy being trained against this reward
sees thousands of samples, and a reward model occasionally writes broken JSON, so the parser never
raises: it repairs what it can and falls back to the middle of the scale for what it cannot.

Two more reading rules reproduce the official SpatialReward scripts on the same text (see
`PARSE_MODES`): `official_eval` (the benchmark evaluation scripts) and `official_server` (the
released reward server). They are for reproducing published numbers; the strict reading above stays
the default for scoring and RL.

One rule for numbers too large for a float, in every mode: a value that does not fit a finite
64-bit float (a 401-digit integer, `1e400`, `Infinity`, `NaN`) is unreadable. As a score it counts
as a missing score in its place (score_range / 2, counted in `missing_scores`); as a box
coordinate it drops its region. The rest of the answer is kept.
"""

from __future__ import annotations

import json
import math
import re
import string
import sys
from typing import Any

SCORE_RANGE = 25.0  # answers score on 0..SCORE_RANGE (records, parser, aggregation, RL rewards)
BOX_GRID = 1000  # box coordinates live on 0..BOX_GRID
_MAX_DEPTH = 64  # deeper nesting is never a real answer; stopping there keeps recursion bounded

_NOTHING = object()  # "no value could be read here" (distinct from a JSON null)
_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_WORDS = {"true": True, "false": False, "null": None, "none": None,
          "nan": math.nan, "infinity": math.inf, "inf": math.inf}
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "b": "\b", "f": "\f", "/": "/", "\\": "\\", '"': '"', "'": "'"}
_HEX_ESCAPES = {"u": 4, "x": 2, "U": 8}
_SURROGATE_PAIR = re.compile("[\ud800-\udbff][\udc00-\udfff]")
_PLAIN_RUN = {q: re.compile(r"[^\\" + q + r"]+") for q in "\"'"}
_STRING_END = ",:}])"  # what may follow a closing quote; anything else means the quote was literal
_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_SCORE_FALLBACK = re.compile(
    r"""["']?scores?["']?\s*[:=]\s*[\[(]([^,\]\)\n]*)(?:,([^,\]\)\n]*))?""", re.IGNORECASE
)


_MAX_INT_DIGITS = 300  # longer integers exceed any float anyway; int() of them is slow and limited


def _read_number(text: str) -> int | float:
    """A JSON-style number literal; integers stay int while they fit a float. float() takes any
    length and gives inf past the float range, which `_finite` then rejects."""
    if len(text) <= _MAX_INT_DIGITS and text.lstrip("+-").isdigit():
        return int(text)
    return float(text)


def _finite(x: Any) -> float | None:
    """A Python number as a finite float, else None (the huge-number rule)."""
    try:
        v = float(x)
    except (OverflowError, TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


class _LenientReader:
    """Reads JSON, Python-literal style JSON and truncated JSON.

    Instead of failing on something unexpected it stops and returns what it has read so far
    (an object cut by garbage or by the end of the text keeps its complete entries). Tolerated:
    single quotes, bare keys, True/False/None, trailing or doubled commas, tuples, raw newlines
    and unescaped quotes inside strings (a quote only closes a string if a delimiter follows it).
    """

    def __init__(self, text: str):
        self.s = text
        self.n = len(text)
        self.hit_end = False  # the text ended inside a value: the answer was truncated

    def _ws(self, i: int) -> int:
        while i < self.n and self.s[i].isspace():
            i += 1
        return i

    def _ws_commas(self, i: int) -> int:
        while i < self.n and (self.s[i].isspace() or self.s[i] == ","):
            i += 1
        return i

    def value(self, i: int, depth: int) -> tuple[Any, int]:
        i = self._ws(i)
        if i >= self.n:
            self.hit_end = True
            return _NOTHING, i
        c = self.s[i]
        if depth > _MAX_DEPTH:
            return _NOTHING, i
        if c == "{":
            return self.obj(i, depth)
        if c in "[(":
            return self.array(i, depth)
        if c in "\"'":
            return self.string(i)
        m = _NUMBER.match(self.s, i)
        if m:
            text = m.group()
            return _read_number(text), m.end()
        m = _WORD.match(self.s, i)
        if m and m.group().lower() in _WORDS:
            return _WORDS[m.group().lower()], m.end()
        return _NOTHING, i

    def obj(self, i: int, depth: int) -> tuple[dict, int]:
        out: dict = {}
        i += 1
        while True:
            i = self._ws_commas(i)
            if i >= self.n:
                self.hit_end = True
                return out, i
            if self.s[i] == "}":
                return out, i + 1
            if self.s[i] in "\"'":
                key, j = self.string(i)
            else:
                m = _WORD.match(self.s, i)
                if not m:
                    return out, i
                key, j = m.group(), m.end()
            j = self._ws(j)
            if j >= self.n:
                self.hit_end = True
                return out, j
            if self.s[j] not in ":=":
                return out, j
            val, k = self.value(j + 1, depth + 1)
            if val is _NOTHING:
                return out, k
            out[key] = val
            i = self._ws(k)
            if i < self.n and self.s[i] not in ",}":
                return out, i

    def array(self, i: int, depth: int) -> tuple[list, int]:
        close = "]" if self.s[i] == "[" else ")"
        out: list = []
        i += 1
        while True:
            i = self._ws_commas(i)
            if i >= self.n:
                self.hit_end = True
                return out, i
            if self.s[i] == close:
                return out, i + 1
            val, k = self.value(i, depth + 1)
            if val is _NOTHING:
                return out, k
            out.append(val)
            i = self._ws(k)
            if i < self.n and self.s[i] not in "," + close:
                return out, i

    def string(self, i: int) -> tuple[str, int]:
        quote, plain = self.s[i], _PLAIN_RUN[self.s[i]]
        parts: list[str] = []
        j = i + 1
        while j < self.n:
            m = plain.match(self.s, j)
            if m:
                parts.append(m.group())
                j = m.end()
                continue
            c = self.s[j]
            if c == "\\":
                if j + 1 >= self.n:
                    break
                e = self.s[j + 1]
                width = _HEX_ESCAPES.get(e, 0)  # \uXXXX (JSON), \xXX and \UXXXXXXXX (Python)
                digits = self.s[j + 2 : j + 2 + width]
                if width and len(digits) == width and all(d in string.hexdigits for d in digits) \
                        and int(digits, 16) <= sys.maxunicode:
                    parts.append(chr(int(digits, 16)))
                    j += 2 + width
                else:
                    parts.append(_ESCAPES.get(e, e))
                    j += 2
                continue
            k = self._ws(j + 1)  # c is the quote character
            if k >= self.n or self.s[k] in _STRING_END:
                return _join_surrogates("".join(parts)), j + 1
            parts.append(c)
            j += 1
        self.hit_end = True
        return _join_surrogates("".join(parts)), self.n


def _join_surrogates(text: str) -> str:
    """JSON writes characters beyond the BMP as two \\u escapes; fuse such pairs (lone halves stay)."""
    return _SURROGATE_PAIR.sub(lambda m: m.group().encode("utf-16", "surrogatepass").decode("utf-16"), text)


def _strip_thinking(text: str, errors: list[str]) -> str:
    if "</think>" in text.lower():  # guard: the lazy regex is quadratic on many unclosed tags
        text = _THINK_BLOCK.sub("", text)
    low = text.lower()
    close = low.rfind("</think>")
    if close >= 0:  # the opening tag was in the prompt (or lost): only what follows is the answer
        text, low = text[close + len("</think>") :], low[close + len("</think>") :]
    start = low.find("<think>")
    if start >= 0:  # never closed: the answer, if any, can only be inside; search all of it
        errors.append("unclosed_think")
        text = text[:start] + text[start + len("<think>") :]
    return text


def _candidate_objects(text: str) -> tuple[list[dict], bool, bool]:
    """All `{...}` objects (nested ones included, in reading order), whether the text was cut
    inside one, and whether the chosen top-level spans were all strict JSON."""
    reader = _LenientReader(text)
    found: list[dict] = []
    strict = True
    i = 0
    while (i := text.find("{", i)) >= 0:
        obj, end = reader.obj(i, 0)
        _collect_dicts(obj, found)
        if any(k in obj for k in ("score", "scores", "reasoning", "edit_region")):
            try:
                _json_loads(text[i:end])
            except ValueError:
                strict = False
        i = max(end, i + 1)
    return found, reader.hit_end, strict


def _collect_dicts(value: Any, out: list[dict]) -> None:
    if isinstance(value, dict):
        out.append(value)
        for v in value.values():
            _collect_dicts(v, out)
    elif isinstance(value, list):
        for v in value:
            _collect_dicts(v, out)


def _choose_answer(objects: list[dict]) -> dict | None:
    """The last object holding a score, else the last holding answer fields: models sometimes
    echo an example before the real answer, and the real one comes last."""
    for keys in (("score", "scores"), ("reasoning", "edit_region")):
        for obj in reversed(objects):
            if any(k in obj for k in keys):
                return obj
    return None


def _as_number(x: Any) -> float | None:
    if isinstance(x, bool) or x is None:
        return None
    if isinstance(x, (int, float)):
        return _finite(x)
    if isinstance(x, str):
        m = _NUMBER.search(x)
        return _finite(m.group()) if m else None
    return None


def _scores_from(raw: Any) -> list[float | None]:
    if isinstance(raw, str):  # "20, 18" written as one string
        raw = raw.strip("[]() ").split(",")
    items = list(raw.values()) if isinstance(raw, dict) else raw
    items = list(items[:2]) if isinstance(items, (list, tuple)) else [items]
    return [_as_number(x) for x in items] + [None] * (2 - len(items))


def _scores_by_pattern(text: str) -> list[float | None] | None:
    for m in reversed(list(_SCORE_FALLBACK.finditer(text))):
        pair = [_as_number(g) if g else None for g in m.groups()]
        if any(v is not None for v in pair):
            return pair
    return None


def _clean_box(box: Any) -> tuple[list[int] | None, str]:
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        return None, "box_shape"
    values = [_as_number(v) for v in box]
    if any(v is None for v in values):
        return None, "box_value"
    x1, y1, x2, y2 = (int(round(min(max(v, 0.0), BOX_GRID))) for v in values)
    reason = "box_reordered" if x1 > x2 or y1 > y2 else ""
    x1, x2 = sorted((x1, x2))
    y1, y2 = sorted((y1, y2))
    if x1 == x2 or y1 == y2:
        return None, "box_empty"
    return [x1, y1, x2, y2], reason


def _regions_from(raw: Any, errors: list[str]) -> list[dict]:
    if raw is None:
        return []
    if isinstance(raw, dict):
        raw = [raw]
    if not isinstance(raw, list):
        errors.append("edit_region_not_list")
        return []
    regions = []
    for index, item in enumerate(raw):
        if isinstance(item, dict):
            box = item.get("bbox_2d", item.get("bbox"))
            rid, label = item.get("id", index), item.get("label", "")
        else:  # a bare [x1, y1, x2, y2]
            box, rid, label = item, index, ""
        clean, reason = _clean_box(box)
        if reason:
            errors.append(f"region{index}:{reason}")
        if clean is None:
            continue
        rid_num = _as_number(rid)
        regions.append({
            "id": int(rid_num) if rid_num is not None and rid_num.is_integer() else index,
            "label": label if isinstance(label, str) else ("" if label is None else str(label)),
            "bbox_2d": clean,
        })
    return regions


PARSE_MODES = ("strict", "official_eval", "official_server")


def parse_output(text: Any, with_region: bool = True, score_range: float = SCORE_RANGE,
                 mode: str = "strict") -> dict:
    """Reads one generated answer. Never raises (except ValueError for an unknown `mode`).

    `mode` picks the reading rule; every mode returns the same fields:
      strict           sr_jax's own reading (below); the default for scoring and RL.
      official_eval    the official benchmark evaluation scripts' reading: `<think>...</think>`
                       blocks removed, the text from the first `{` to the last `}` read as JSON;
                       if that is not valid JSON, a `"score": [a, b, ...]` pattern in it (plain
                       decimals, at least two) gives the first two scores; a lone score is used
                       twice (`[21]` -> [21, 21]); no answer -> both scores score_range / 2.
                       Scores are not clamped. Used by `sr-jax eval`.
      official_server  the released reward server's reading: no think handling, first `{` to last
                       `}` as JSON, retried with every `'` turned into `"`, else the first two
                       numbers anywhere in the text; numbers are kept, other list items dropped;
                       fewer than two scores are padded with score_range / 2 (`[21]` -> [21, 12.5]).
                       Scores are not clamped.
    Where the official scripts would crash (a score that is text or null, a number too large for
    a float) the official modes treat the score as missing, like the strict mode does; booleans
    count as 1/0 as they do in the official Python code. In official modes `edit_region` is read
    with the strict box rules, which do not affect scores; their extra error codes are
    score_by_pattern, score_by_numbers (a fallback gave the scores) and no_score.

    The strict mode:

    Returns {"score": [float, float], "reasoning": str, "edit_region": [...] (only when
    with_region, i.e. SC answers), "parsed": bool, "missing_scores": 0..2, "errors": [codes]}.

    - A `<think>...</think>` block is dropped (also a dangling `</think>`, whose opener was in the
      prompt, and an unclosed `<think>`, whose text is then searched as is).
    - The answer is the last `{...}` object holding "score" (else "reasoning"/"edit_region"),
      read leniently (see `_LenientReader`), so fences and text around it do not matter.
    - Scores may be numbers or numeric strings; if no object holds a score, `"score": [a, b`
      is looked for by pattern (a number cut by the end of the text is taken as written).
      Each score is clamped to [0, score_range]; one that is missing or unreadable becomes
      score_range / 2 and counts in `missing_scores`.
    - Boxes must be 4 finite numbers. They are clamped to 0..1000 and rounded to integers;
      swapped corners are put back in order (code `box_reordered`), and a box with no area
      left (x1 == x2 or y1 == y2, e.g. lying wholly outside the image) is dropped with its region.
    - `parsed` is True when an answer object was found; error codes: no_json, truncated,
      not_strict_json, unclosed_think, score_clamped, regionN:<why>, edit_region_not_list.
    """
    if mode not in PARSE_MODES:
        raise ValueError(f"parse mode must be one of {PARSE_MODES}, got {mode!r}")
    errors: list[str] = []
    default = float(score_range) / 2.0
    try:
        if not isinstance(text, str):
            text = text.decode("utf-8", "replace") if isinstance(text, bytes) else ("" if text is None else str(text))
        if mode != "strict":
            reader = _parse_official_eval if mode == "official_eval" else _parse_official_server
            return _official_result(*reader(text, errors), errors, default, with_region)
        body = _strip_thinking(text, errors)
        objects, truncated, strict = _candidate_objects(body)
        answer = _choose_answer(objects)
        if truncated:
            errors.append("truncated")
        if answer is None:
            errors.append("no_json")
        elif not strict:
            errors.append("not_strict_json")
        answer = answer or {}

        raw_score = answer.get("score", answer.get("scores", _NOTHING))
        pair = _scores_from(raw_score) if raw_score is not _NOTHING else _scores_by_pattern(body) or [None, None]
        scores = []
        for v in pair:
            if v is None:
                scores.append(default)
                continue
            if not 0.0 <= v <= score_range:
                errors.append("score_clamped")
            scores.append(min(max(v, 0.0), float(score_range)))

        reasoning = answer.get("reasoning", "")
        result = {
            "score": scores,
            "reasoning": reasoning if isinstance(reasoning, str) else ("" if reasoning is None else str(reasoning)),
            "parsed": bool(answer),
            "missing_scores": sum(v is None for v in pair),
            "errors": errors,
        }
        if with_region:
            result["edit_region"] = _regions_from(answer.get("edit_region"), errors)
        return result
    except Exception as exc:  # the last line of defence: a reward must always come out
        result = {"score": [default, default], "reasoning": "", "parsed": False, "missing_scores": 2,
                  "errors": errors + [f"internal:{type(exc).__name__}"]}
        if with_region:
            result["edit_region"] = []
        return result


# ---------------------------------------------------------------- the official scripts' readings

_OFFICIAL_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)  # case-sensitive, as theirs
_PLAIN_NUMBER = r"[-+]?\d*\.?\d+"  # no exponent: "1e5" reads as the two numbers 1 and 5
_EVAL_SCORE_LIST = re.compile(r'"score"\s*:\s*\[(' + _PLAIN_NUMBER + r"(?:,\s*" + _PLAIN_NUMBER + r")+)\]")
_ANY_NUMBER = re.compile(_PLAIN_NUMBER)


def _json_loads(text: str) -> Any:
    """json.loads where a long integer reads as float (inf past the range) instead of hitting
    Python's int-digit limit, so the huge-number rule sees every oversized number alike."""
    return json.loads(text, parse_int=_read_number)


def _braced(text: str) -> str | None:
    """First `{` to last `}` (what a greedy `{.*}` search finds), or None."""
    start, end = text.find("{"), text.rfind("}")
    return text[start:end + 1] if 0 <= start < end else None


def _python_number(x: Any) -> float | None:
    """What the official Python arithmetic accepts as a score: int, float or bool; finite."""
    return _finite(x) if isinstance(x, (int, float)) else None


def _parse_official_eval(text: str, errors: list[str]) -> tuple[dict | None, list | None]:
    """(answer object or None, raw score items or None = use the defaults)."""
    body = _OFFICIAL_THINK.sub("", text).strip()
    if body.find("{") < 0 or body.rfind("}") < 0:
        errors.append("no_json")
        return None, None
    candidate = body[body.find("{"):body.rfind("}") + 1]  # empty when the last } precedes the first {
    try:
        answer = _json_loads(candidate)
    except json.JSONDecodeError:
        errors.append("not_strict_json")
        m = _EVAL_SCORE_LIST.search(candidate)
        if m is None:
            return None, None
        errors.append("score_by_pattern")
        return {}, [float(v) for v in m.group(1).split(",")[:2]]
    except (ValueError, RecursionError):  # their reader gives up on these too
        errors.append("no_json")
        return None, None
    if not isinstance(answer, dict):
        errors.append("no_json")
        return None, None
    if "score" not in answer:
        errors.append("no_score")
        return answer, None
    raw = answer["score"]
    items = raw if isinstance(raw, list) else [raw]
    if not items:
        return answer, None
    if len(items) < 2:
        items = items * 2
    return answer, items[:2]


def _parse_official_server(text: str, errors: list[str]) -> tuple[dict | None, list | None]:
    if not text.strip():
        errors.append("no_json")
        return None, None
    candidate = _braced(text)
    if candidate is None:  # no object at all: the defaults, without looking for numbers
        errors.append("no_json")
        return None, None
    answer = None
    try:
        answer = _json_loads(candidate)
    except (ValueError, RecursionError):
        errors.append("not_strict_json")
        try:
            answer = _json_loads(candidate.replace("'", '"'))
        except (ValueError, RecursionError):
            pass
    if not isinstance(answer, dict):  # the last resort reads the whole text, think block included
        errors.append("score_by_numbers")
        return None, [float(v) for v in _ANY_NUMBER.findall(text)[:2]]
    raw = answer.get("score", [])
    if isinstance(raw, (int, float)):
        items = [raw]
    elif isinstance(raw, list):
        items = [v for v in raw if isinstance(v, (int, float))]
    else:
        items = []
    return answer, items[:2]


def _official_result(answer: dict | None, items: list | None, errors: list[str], default: float,
                     with_region: bool) -> dict:
    values = [_python_number(v) for v in (items or [])][:2]
    values += [None] * (2 - len(values))
    answer_obj = answer if isinstance(answer, dict) else {}
    reasoning = answer_obj.get("reasoning", answer_obj.get("reason", ""))
    result = {
        "score": [default if v is None else v for v in values],
        "reasoning": reasoning if isinstance(reasoning, str) else ("" if reasoning is None else str(reasoning)),
        "parsed": answer is not None,
        "missing_scores": sum(v is None for v in values),
        "errors": errors,
    }
    if with_region:
        result["edit_region"] = _regions_from(answer_obj.get("edit_region"), errors)
    return result
