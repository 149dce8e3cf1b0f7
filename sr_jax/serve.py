"""The reward server: SpatialReward over HTTP/JSON with dynamic batching, for RL trainers.

    sr-jax serve --model DIR --host 127.0.0.1 --port 8000 [--max-batch 8 --max-wait-ms 10 ...]

Endpoints
  POST /v1/score  {"items": [{"original": B64 | [B64, ...], "edited": B64, "instruction": str}, ...],
                   "options": {...scorer options...}, "timeout_s": float (optional)}
                  -> 200 {"results": [one scorer result dict per item, in request order]}
                  Images are base64 PNG or JPEG (a `data:image/...;base64,` prefix is allowed).
                  Errors -> {"error": message, "status": code, "reason": name}: 400 malformed
                  request (the message names the item and field; JSON nesting and number sizes are
                  bounded, options range-checked, image shapes the model cannot take refused),
                  408 body not received in time, 413 body/count/pixel/memory limits, 429 memory
                  budget busy (with Retry-After), 500 the scorer failed, 503 queue full or shutting
                  down (with Retry-After), 504 timed out. `reason` is also the label counted in
                  `sr_jax_score_errors`.
  GET  /healthz   -> {"status": "ok", "queue_depth", "max_batch", "options" (accepted scorer
                  options; null: any), "limits"}; 503 (status "unavailable") once stopping.
  GET  /metrics   -> Prometheus text format (names in `_Metrics`).

Why JSON and base64: the original SpatialReward server unpickles request bodies, which lets any
client run code on the host. Here client data is only ever parsed as JSON and decoded as PNG/JPEG.

Batching: each request is validated and its images decoded on its own (in a small thread pool)
before it is queued, so a bad request fails alone and never reaches the model. Queued items with
the same options are grouped into model calls of at most `max_batch` items, waiting at most
`max_wait_ms` after the oldest queued item arrived; a request may be split across calls. The
scorer (blocking JAX code) runs in one worker thread, so the event loop keeps serving. If a call
with several requests raises, each request is retried alone so that only the culprit gets a 500.

Memory: a request's cost (its body's copies, then each image's decoded and working bytes, from the
image headers) is reserved from a global budget before the body is read and before any image is
decoded; the reservation lasts until the request is answered and the model is done with its
images. A request that times out or whose client disconnects is cancelled: its queued items are
dropped, rows of it in a running model call are discarded, and both count as cancelled; when a
scorer's `score` takes `should_stop=`, the server passes a callable that turns true once every
caller of the running call has gone (the `Scorer` then stops between decode segments).

A scorer may also offer `check_image_size(width, height)` (raising ValueError for a size the
model cannot take), checked at validation so one request can never fail a shared model call, and
`work_bytes_per_pixel`, the full-resolution working memory it needs per image pixel.

The scorer is any object with `score(originals: list[list[PIL.Image]], edited: list[PIL.Image],
instructions: list[str], **options) -> list[dict]`; an optional `max_batch_size` caps the batch
and an optional `validate_options(options)` (raising ValueError/TypeError) vets options per request
(without it, a dataclass `scorer.options` is used to check option names and types).
Images reach it exactly as decoded (mode untouched), as if the caller had opened the files itself.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import dataclasses
import functools
import inspect
import io
import json
import logging
import math
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

import numpy as np
from aiohttp import web
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

log = logging.getLogger("sr_jax.serve")

ITEM_FIELDS = ("original", "edited", "instruction")
REQUEST_FIELDS = ("items", "options", "timeout_s")
_DATA_URL_PREFIX = "data:"


@dataclasses.dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int | None = None  # items per model call; None: the scorer's max_batch_size, else 8
    max_wait_ms: float = 10.0  # how long the oldest queued item may wait for company
    max_queue: int = 256  # queued items beyond which requests get 503
    max_body_mb: float = 64.0
    max_items_per_request: int = 64
    max_images_per_request: int = 256
    max_image_pixels: int = 4096 * 4096
    max_request_pixels: int = 256 * 1024 * 1024
    max_instruction_chars: int = 8192
    request_timeout_s: float = 600.0  # from arrival to answer; a request may ask for less
    body_timeout_s: float = 30.0  # to receive a request's body; a trickling client gets 408
    # Memory admission (`image_cost`, `MemoryBudget`): the bytes all requests in flight may hold
    # (None: a quarter of the machine's or cgroup's memory) and one request may (None: a quarter of that).
    memory_budget_mb: float | None = None
    max_request_mb: float | None = None
    max_new_tokens_cap: int | None = None  # most a request may ask for; None: the scorer's default
    retry_after_s: float = 1.0  # Retry-After on 429 and 503
    image_formats: tuple[str, ...] = ("PNG", "JPEG")
    request_options: list[str] | None = None  # options requests may set; None: all the scorer takes
    isolate_failures: bool = True  # on a failed multi-request call, retry each request alone
    decode_threads: int = 2

    def __post_init__(self):
        for name in ("max_queue", "max_items_per_request", "max_images_per_request", "max_image_pixels",
                     "max_request_pixels", "max_instruction_chars", "decode_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_batch", "max_new_tokens_cap"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_body_mb", "request_timeout_s", "body_timeout_s", "retry_after_s", "memory_budget_mb",
                     "max_request_mb"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value}")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")
        self.image_formats = tuple(f.upper() for f in self.image_formats)

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    def budget_bytes(self) -> tuple[int, int]:
        """(in-flight budget, per-request limit) in bytes, defaults sized to this machine."""
        total = int(self.memory_budget_mb * _MB) if self.memory_budget_mb else machine_memory_bytes() // 4
        per_request = int(self.max_request_mb * _MB) if self.max_request_mb else total // 4
        return total, min(per_request, total)


_MB = 1024 * 1024


def machine_memory_bytes() -> int:
    """Physical memory, or the cgroup's limit when a container sets a lower one."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                raw = f.read().strip()
        except OSError:
            continue
        if raw.isdigit():
            total = min(total, int(raw))
    return total


class RequestError(Exception):
    """A request the server refuses; `status` is the HTTP code, the message says why and `reason`
    names the class of refusal (the `reason` label of `sr_jax_score_errors`)."""

    def __init__(self, status: int, message: str, reason: str | None = None):
        super().__init__(message)
        self.status = status
        self.reason = reason or _REASONS.get(status, str(status))


class ClientGone(Exception):
    """The client closed its connection; nothing can be answered."""


class ScorerFailure(Exception):
    pass


# ---------------------------------------------------------------- request parsing (pure, sync)

@dataclasses.dataclass
class Item:
    originals: list[Image.Image]
    edited: Image.Image
    instruction: str


@dataclasses.dataclass
class ParsedRequest:
    items: list[Item]
    options: dict[str, Any]
    timeout_s: float | None


STOP_HOOK = "should_stop"  # a `score` keyword the server fills itself; never a request option


def accepted_options(scorer: Any, allowlist: Sequence[str] | None = None) -> frozenset[str] | None:
    """Keyword options `scorer.score` takes beyond the three inputs, narrowed to `allowlist`;
    None (anything) when it takes **kwargs and no allowlist is given."""
    params = list(inspect.signature(scorer.score).parameters.values())
    named = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    takes = None if any(p.kind is p.VAR_KEYWORD for p in params) else \
        frozenset(p.name for p in named[3:]) - {STOP_HOOK}
    if allowlist is None:
        return takes
    return (frozenset(allowlist) if takes is None else takes & frozenset(allowlist)) - {STOP_HOOK}


def takes_stop_hook(scorer: Any) -> bool:
    """Whether `scorer.score` accepts `should_stop=`, a callable it polls to abandon a model call
    whose callers have all gone."""
    parameter = inspect.signature(scorer.score).parameters.get(STOP_HOOK)
    return parameter is not None and parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)


def option_validator(scorer: Any) -> Callable[[dict], Any] | None:
    """How request options are vetted before queueing: the scorer's own `validate_options`, else,
    when `scorer.options` is a config dataclass (as `Scorer`'s is), its field names and types."""
    validate = getattr(scorer, "validate_options", None)
    if callable(validate):
        return validate
    defaults = getattr(scorer, "options", None)
    if dataclasses.is_dataclass(defaults) and not isinstance(defaults, type):
        from sr_jax.config import from_dict

        return lambda options: from_dict(type(defaults), options, "options")
    return None


def _b64_bytes(value: Any, where: str) -> bytes:
    if not isinstance(value, str):
        raise RequestError(400, f"{where}: expected a base64 string, got {type(value).__name__}")
    if value.startswith(_DATA_URL_PREFIX):
        head, sep, value = value.partition(",")
        if not sep or not head.endswith(";base64"):
            raise RequestError(400, f"{where}: a data URL must look like data:image/png;base64,...")
    try:
        data = base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(400, f"{where}: invalid base64 ({exc})") from None
    if not data:
        raise RequestError(400, f"{where}: empty image")
    return data


# JSON limits: a real request nests 4 deep ({items: [{original: [...]}]}) and carries small numbers.
MAX_JSON_DEPTH = 16
MAX_JSON_NUMBER_CHARS = 32
_ESCAPE = re.compile(rb"\\.", re.S)
_STRING = re.compile(rb'"[^"]*"')
_DEPTH_STEP = np.zeros(256, np.int8)
_DEPTH_STEP[[ord("["), ord("{")]] = 1
_DEPTH_STEP[[ord("]"), ord("}")]] = -1


def json_depth(body: bytes, stop_above: int = MAX_JSON_DEPTH) -> int:
    """The deepest nesting of arrays/objects in a JSON text (strings skipped), found without
    parsing it, so that hostile nesting never reaches the recursive parser. Counts in 1 MiB chunks
    and stops after the first chunk that goes past `stop_above`."""
    steps = _DEPTH_STEP[np.frombuffer(_STRING.sub(b"", _ESCAPE.sub(b"", body)), np.uint8)]
    depth = peak = 0
    for start in range(0, len(steps), 1 << 20):
        run = np.cumsum(steps[start:start + (1 << 20)], dtype=np.int64) + depth
        peak, depth = max(peak, int(run.max())), int(run[-1])
        if peak > stop_above:
            break
    return peak


def _json_int(text: str) -> int:
    if len(text) > MAX_JSON_NUMBER_CHARS:
        raise RequestError(400, f"malformed JSON: a {len(text)}-character integer exceeds the limit of "
                                f"{MAX_JSON_NUMBER_CHARS} characters", reason="json_number")
    return int(text)


def _json_float(text: str) -> float:
    value = float(text) if len(text) <= MAX_JSON_NUMBER_CHARS else math.inf
    if not math.isfinite(value):
        raise RequestError(400, f"malformed JSON: the number {text[:40]}{'...' if len(text) > 40 else ''} "
                                f"is too long or too large for a float", reason="json_number")
    return value


def _json_constant(text: str):
    raise RequestError(400, f"malformed JSON: {text} is not a JSON number", reason="json_number")


def load_json(body: bytes) -> Any:
    """JSON with limits: bounded nesting, integers of at most MAX_JSON_NUMBER_CHARS characters,
    finite floats, no NaN/Infinity; every violation is a RequestError (400) naming it."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(400, f"malformed JSON: body is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    depth = json_depth(body)
    if depth > MAX_JSON_DEPTH:
        raise RequestError(400, f"malformed JSON: nested more than {MAX_JSON_DEPTH} levels deep", reason="json_depth")
    try:
        return json.loads(text, parse_int=_json_int, parse_float=_json_float, parse_constant=_json_constant)
    except json.JSONDecodeError as exc:
        raise RequestError(400, f"malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None


# Memory admission. PIL keeps 1 byte per pixel for modes 1/L/P, 2 for 16-bit grey and 4 for all
# others (RGB is stored as 4). Scoring then works on full-resolution copies (an RGB conversion, the
# grounding check's arrays); the work bytes per pixel charge those to every image up front, so the
# sum of reservations bounds the peak even if all of a batch's images are at work at once. The
# `Scorer`'s peak is ~11 bytes per pixel of each image (measured: an original/edited pair of 2000x2000
# grew the peak RSS by 22.5 bytes per pixel); a scorer may declare its own `work_bytes_per_pixel`.
WORK_BYTES_PER_PIXEL = 16
BODY_COPIES = 4  # the body, its text, the parsed strings, the decoded base64 (0.75) plus slack


def pixel_bytes(mode: str) -> int:
    if mode in ("1", "L", "P"):
        return 1
    return 2 if mode.startswith("I;16") else 4


def image_cost(width: int, height: int, mode: str, work_bytes_per_pixel: int = WORK_BYTES_PER_PIXEL) -> int:
    """Bytes one image holds while its request is in flight, known from its header."""
    return width * height * (pixel_bytes(mode) + work_bytes_per_pixel)


def open_image_header(value: Any, where: str, cfg: ServeConfig) -> Image.Image:
    """base64 -> a PIL image whose header is read but whose pixels are not; format and size checked."""
    data = _b64_bytes(value, where)
    try:
        image = Image.open(io.BytesIO(data))
    except Exception as exc:  # PIL raises many types for garbage; all of them mean "not an image"
        raise RequestError(400, f"{where}: not a decodable image ({type(exc).__name__}: {exc})") from None
    if image.format not in cfg.image_formats:
        raise RequestError(400, f"{where}: image format {image.format} is not accepted "
                                f"(accepted: {', '.join(cfg.image_formats)})")
    width, height = image.size
    if width * height > cfg.max_image_pixels:
        raise RequestError(413, f"{where}: {width}x{height} image exceeds max_image_pixels={cfg.max_image_pixels}")
    return image


def _load_pixels(image: Image.Image, where: str) -> Image.Image:
    try:
        image.load()
    except Exception as exc:
        raise RequestError(400, f"{where}: corrupt or truncated {image.format} image "
                                f"({type(exc).__name__}: {exc})") from None
    return image


def decode_image(value: Any, where: str, cfg: ServeConfig) -> Image.Image:
    """base64 -> a fully loaded PIL image; the size is checked from the header before decoding."""
    return _load_pixels(open_image_header(value, where, cfg), where)


def _check_options(options: Any, allowed: frozenset[str] | None, validate, max_new_tokens: int | None = None) -> dict:
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise RequestError(400, f"options: expected an object, got {type(options).__name__}")
    if STOP_HOOK in options:
        raise RequestError(400, f"options: unknown option(s) ['{STOP_HOOK}']", reason="bad_option")
    if allowed is not None:
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise RequestError(400, f"options: unknown option(s) {unknown}; accepted: {sorted(allowed)}",
                               reason="bad_option")
    if validate is not None:
        try:
            validate(dict(options))
        except (ValueError, TypeError, OverflowError) as exc:
            message = str(exc)
            raise RequestError(400, message if message.startswith("options") else f"options: {message}",
                               reason="bad_option") from None
    asked = options.get("max_new_tokens")
    if max_new_tokens is not None and isinstance(asked, int) and asked > max_new_tokens:
        raise RequestError(400, f"options.max_new_tokens: {asked} exceeds this server's cap of {max_new_tokens} "
                                f"(max_new_tokens_cap)", reason="bad_option")
    return options


def _check_item_shape(index: int, item: Any, cfg: ServeConfig) -> tuple[list, Any, str]:
    where = f"items[{index}]"
    if not isinstance(item, dict):
        raise RequestError(400, f"{where}: expected an object, got {type(item).__name__}")
    unknown = sorted(set(item) - set(ITEM_FIELDS))
    if unknown:
        raise RequestError(400, f"{where}: unknown field(s) {unknown}; expected {list(ITEM_FIELDS)}")
    for field in ITEM_FIELDS:
        if field not in item:
            raise RequestError(400, f"{where}.{field}: missing")
    originals = item["original"]
    if isinstance(originals, str):
        originals = [originals]
    if not isinstance(originals, list):
        raise RequestError(400, f"{where}.original: expected a base64 string or a list of them, "
                                f"got {type(originals).__name__}")
    if not originals:
        raise RequestError(400, f"{where}.original: the list is empty")
    instruction = item["instruction"]
    if not isinstance(instruction, str):
        raise RequestError(400, f"{where}.instruction: expected a string, got {type(instruction).__name__}")
    if len(instruction) > cfg.max_instruction_chars:
        raise RequestError(413, f"{where}.instruction: {len(instruction)} characters exceed "
                                f"max_instruction_chars={cfg.max_instruction_chars}")
    return originals, item["edited"], instruction


def _check_timeout(timeout: Any) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < 1e9:
        raise RequestError(400, f"timeout_s: expected a positive number of seconds, got {timeout!r}")
    return float(timeout)


def parse_request(body: bytes, cfg: ServeConfig, allowed_options: frozenset[str] | None = None,
                  validate_options=None, *, admit: Callable[[int], Any] | None = None,
                  check_image: Callable[[int, int], Any] | None = None,
                  max_new_tokens: int | None = None,
                  work_bytes_per_pixel: int = WORK_BYTES_PER_PIXEL) -> ParsedRequest:
    """Validates a /v1/score body and decodes its images; raises RequestError naming the culprit.

    Structure, counts, options and every image's header are checked before any image is decoded;
    then `admit(bytes)` is called with the request's image cost (`image_cost`), and may refuse it
    (RequestError), so decoding only ever happens within the memory budget. `check_image(width,
    height)` raising ValueError refuses a size the model cannot take (400); `max_new_tokens` caps
    that option."""
    payload = load_json(body)
    if not isinstance(payload, dict):
        raise RequestError(400, f"body: expected a JSON object, got {type(payload).__name__}")
    unknown = sorted(set(payload) - set(REQUEST_FIELDS))
    if unknown:
        raise RequestError(400, f"body: unknown field(s) {unknown}; expected {list(REQUEST_FIELDS)}")
    items = payload.get("items")
    if not isinstance(items, list):
        raise RequestError(400, "items: missing" if items is None else
                                f"items: expected a list, got {type(items).__name__}")
    if not items:
        raise RequestError(400, "items: the list is empty")
    if len(items) > cfg.max_items_per_request:
        raise RequestError(413, f"items: {len(items)} items exceed max_items_per_request={cfg.max_items_per_request}")
    timeout = _check_timeout(payload.get("timeout_s"))
    options = _check_options(payload.get("options"), allowed_options, validate_options, max_new_tokens)

    shapes = [_check_item_shape(i, item, cfg) for i, item in enumerate(items)]
    n_images = sum(len(originals) + 1 for originals, _, _ in shapes)
    if n_images > cfg.max_images_per_request:
        raise RequestError(413, f"items: {n_images} images exceed max_images_per_request={cfg.max_images_per_request}")

    headers, pixels, cost = [], 0, 0
    for i, (originals, edited, instruction) in enumerate(shapes):
        for where, value in [(f"items[{i}].original[{j}]", v) for j, v in enumerate(originals)] \
                + [(f"items[{i}].edited", edited)]:
            image = open_image_header(value, where, cfg)
            width, height = image.size
            pixels += width * height
            if pixels > cfg.max_request_pixels:
                raise RequestError(413, f"{where}: the request's images exceed max_request_pixels="
                                        f"{cfg.max_request_pixels}")
            if check_image is not None:
                try:
                    check_image(width, height)
                except ValueError as exc:
                    raise RequestError(400, f"{where}: {width}x{height} image cannot be scored: {exc}",
                                       reason="image_shape") from None
            cost += image_cost(width, height, image.mode, work_bytes_per_pixel)
            headers.append((where, image))
    if admit is not None:
        admit(cost)
    decoded = [_load_pixels(image, where) for where, image in headers]
    items_out, k = [], 0
    for originals, _, instruction in shapes:
        n = len(originals)
        items_out.append(Item(decoded[k:k + n], decoded[k + n], instruction))
        k += n + 1
    return ParsedRequest(items_out, options, timeout)


def to_jsonable(value: Any) -> Any:
    """Scorer results as plain JSON values: numpy scalars/arrays unwrapped, tuples as lists,
    non-finite floats as null (JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"scorer result holds a {type(value).__name__}, which has no JSON form")


# ---------------------------------------------------------------- metrics

class _Metrics:
    """One registry per server, so several servers (tests) never share counters."""

    def __init__(self, queue_depth, inflight, memory_used, memory_limit):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("sr_jax_score_requests", "POST /v1/score responses by HTTP code", ["code"], registry=r)
        self.errors = Counter("sr_jax_score_errors", "failed score requests by reason", ["reason"], registry=r)
        self.items = Counter("sr_jax_items_scored", "items scored and returned to a caller", registry=r)
        self.batch_failures = Counter("sr_jax_batch_failures", "model calls that raised", registry=r)
        self.batch_size = Histogram("sr_jax_batch_size", "items per model call", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.batch_requests = Histogram("sr_jax_batch_requests", "requests sharing a model call", registry=r,
                                        buckets=(1, 2, 4, 8, 16, 32, 64))
        self.model_latency = Histogram("sr_jax_model_latency_seconds", "duration of one model call", registry=r,
                                       buckets=(.01, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120))
        self.latency = Histogram("sr_jax_request_latency_seconds", "POST /v1/score, arrival to response",
                                 registry=r, buckets=(.01, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120, 300))
        Gauge("sr_jax_queue_depth", "items waiting for a model call", registry=r).set_function(queue_depth)
        Gauge("sr_jax_inflight_requests", "score requests being handled", registry=r).set_function(inflight)
        self.cancelled = Counter("sr_jax_items_cancelled", "items whose caller timed out or disconnected before "
                                 "they were answered (dropped from the queue or their batch row discarded)", registry=r)
        Gauge("sr_jax_memory_reserved_bytes", "bytes reserved by requests in flight",
              registry=r).set_function(memory_used)
        Gauge("sr_jax_memory_budget_bytes", "memory_budget_mb in bytes", registry=r).set_function(memory_limit)


# ---------------------------------------------------------------- memory admission

class MemoryBudget:
    """Bytes that requests in flight may hold: `limit` for all, `per_request` for one. Reservations
    are taken before a body is read (from Content-Length) and before images are decoded (from their
    headers), so the memory itself is only ever allocated within the budget."""

    def __init__(self, limit: int, per_request: int, retry_after_s: float = 1.0):
        self.limit, self.per_request, self.retry_after_s = limit, per_request, retry_after_s
        self.used = 0
        self.lock = threading.Lock()  # decode threads reserve too

    def reservation(self) -> "Reservation":
        return Reservation(self)


class Reservation:
    """One request's share of a MemoryBudget. Its handler holds it, and so does every model call
    running its items; the bytes go back when the last holder releases it (a caller that gave up
    must not free the budget while the model still works on its images)."""

    def __init__(self, budget: MemoryBudget):
        self.budget = budget
        self.nbytes = 0
        self.holders = 1
        self.open = True

    def grow(self, nbytes: int, what: str) -> None:
        budget = self.budget
        with budget.lock:
            if not self.open:
                raise RequestError(503, "request abandoned before it was admitted", reason="cancelled")
            if self.nbytes + nbytes > budget.per_request:
                raise RequestError(413, f"{what} need {(self.nbytes + nbytes) / _MB:.1f} MB in flight, over the "
                                        f"per-request limit max_request_mb={budget.per_request / _MB:.1f}",
                                   reason="too_large")
            if budget.used + nbytes > budget.limit:
                raise RequestError(429, f"memory budget busy: {budget.used / _MB:.1f} of {budget.limit / _MB:.1f} MB "
                                        f"in flight, {what} need {nbytes / _MB:.1f} MB; retry later",
                                   reason="memory_busy")
            budget.used += nbytes
            self.nbytes += nbytes

    def shrink(self, nbytes: int) -> None:
        with self.budget.lock:
            nbytes = min(nbytes, self.nbytes)
            self.nbytes -= nbytes
            self.budget.used -= nbytes

    def hold(self) -> None:
        with self.budget.lock:
            self.holders += 1

    def release(self) -> None:
        with self.budget.lock:
            self.holders -= 1
            if self.holders == 0:
                self.budget.used -= self.nbytes
                self.nbytes, self.open = 0, False


# ---------------------------------------------------------------- batching

@dataclasses.dataclass(eq=False)
class _Pending:
    items: list[Item]
    options: dict
    key: str  # canonical options: only requests with equal options share a model call
    future: asyncio.Future
    queued_at: float
    taken: int = 0  # items handed to model calls so far
    done: int = 0
    results: list = dataclasses.field(default_factory=list)
    dropped: bool = False  # timed out, disconnected or failed: do not start more of its items
    reservation: Reservation | None = None

    def __post_init__(self):
        self.results = [None] * len(self.items)


class Batcher:
    """Queue of decoded requests -> model calls on one worker thread."""

    def __init__(self, scorer: Any, max_batch: int, max_wait_s: float, max_queue: int,
                 isolate_failures: bool, metrics: _Metrics):
        self.scorer, self.max_batch, self.max_wait_s = scorer, max_batch, max_wait_s
        self.max_queue, self.isolate_failures, self.metrics = max_queue, isolate_failures, metrics
        self.queue: collections.deque[_Pending] = collections.deque()
        self.depth = 0  # queued items not yet handed to a model call
        self.closing = False
        self._wake = asyncio.Event()
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="sr-jax-scorer")
        self.stop_hook = takes_stop_hook(scorer)
        self._task: asyncio.Task | None = None

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done() and not self.closing

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="sr-jax-batcher")

    async def close(self) -> None:
        self.closing = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for pending in self.queue:
            self._fail(pending, RequestError(503, "server shutting down"))
        self.queue.clear()
        self.depth = 0
        self._worker.shutdown(wait=False, cancel_futures=True)

    def submit(self, request: ParsedRequest, reservation: Reservation | None = None) -> _Pending:
        if self.closing:
            raise RequestError(503, "server shutting down")
        n = len(request.items)
        if self.depth + n > self.max_queue:
            raise RequestError(503, f"queue full ({self.depth} items queued, max_queue={self.max_queue}); retry later")
        key = json.dumps(request.options, sort_keys=True)
        pending = _Pending(request.items, request.options, key, asyncio.get_running_loop().create_future(),
                           time.monotonic(), reservation=reservation)
        self.queue.append(pending)
        self.depth += n
        self._wake.set()
        return pending

    def drop(self, pending: _Pending) -> None:
        """Stops a request's queued items from reaching the model (its caller is gone)."""
        if not pending.dropped:
            pending.dropped = True
            self.depth -= len(pending.items) - pending.taken
            pending.taken = len(pending.items)

    def cancel(self, pending: _Pending) -> int:
        """The caller is gone (timed out or disconnected): its queued items never reach the model,
        rows of it in a running call are discarded, and all of them count as cancelled, not scored.
        Returns how many items that was (0 once answered)."""
        if pending.future.done() or pending.dropped:
            return 0
        n = len(pending.items) - pending.done
        self.drop(pending)
        pending.future.cancel()
        self.metrics.cancelled.inc(n)
        return n

    def _fail(self, pending: _Pending, exc: Exception) -> None:
        self.drop(pending)
        if not pending.future.done():
            pending.future.set_exception(exc)

    def _head(self) -> _Pending | None:
        while self.queue and (self.queue[0].dropped or self.queue[0].taken == len(self.queue[0].items)):
            self.queue.popleft()
        return self.queue[0] if self.queue else None

    def _ready(self, key: str) -> int:
        return sum(len(p.items) - p.taken for p in self.queue if p.key == key and not p.dropped)

    def _take(self, key: str) -> list[tuple[_Pending, int]]:
        batch: list[tuple[_Pending, int]] = []
        for pending in self.queue:
            if pending.key != key or pending.dropped:
                continue
            while pending.taken < len(pending.items) and len(batch) < self.max_batch:
                batch.append((pending, pending.taken))
                pending.taken += 1
            if len(batch) == self.max_batch:
                break
        self.depth -= len(batch)
        self._head()
        return batch

    async def _loop(self) -> None:
        while True:
            head = self._head()
            if head is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            deadline = head.queued_at + self.max_wait_s
            while self._ready(head.key) < self.max_batch and (left := deadline - time.monotonic()) > 0:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), left)
                except asyncio.TimeoutError:
                    break
            batch = self._take(head.key)
            if batch:
                await self._run(batch, batch[0][0].options)

    def _call(self, batch: list[tuple[_Pending, int]], options: dict) -> tuple[list, list]:
        """Runs on the worker thread: (rows run, their results). Rows of callers that gave up
        since the batch was formed are left out."""
        batch = [(p, i) for p, i in batch if not p.dropped]
        if not batch:
            return [], []
        self.metrics.batch_size.observe(len(batch))
        self.metrics.batch_requests.observe(len({id(p) for p, _ in batch}))
        items = [p.items[i] for p, i in batch]
        hook = {}
        if self.stop_hook:
            owners = list({id(p): p for p, _ in batch}.values())
            hook[STOP_HOOK] = lambda: all(p.dropped for p in owners)
        start = time.perf_counter()
        try:
            results = self.scorer.score([it.originals for it in items], [it.edited for it in items],
                                        [it.instruction for it in items], **options, **hook)
        finally:
            self.metrics.model_latency.observe(time.perf_counter() - start)
        results = list(results)
        if len(results) != len(items):
            raise ScorerFailure(f"scorer returned {len(results)} results for {len(items)} items")
        return batch, [to_jsonable(r) for r in results]

    async def _run(self, batch: list[tuple[_Pending, int]], options: dict) -> None:
        loop = asyncio.get_running_loop()
        owners = list(dict.fromkeys(p for p, _ in batch))
        holding = [p.reservation for p in owners if p.reservation is not None]
        for reservation in holding:
            reservation.hold()
        try:
            ran, results = await loop.run_in_executor(self._worker, self._call, batch, options)
        except Exception as exc:
            self.metrics.batch_failures.inc()
            live = [owner for owner in owners if not owner.future.done() and not owner.dropped]
            if len(live) > 1 and self.isolate_failures:
                log.warning("model call over %d requests failed (%s); retrying each alone", len(live), exc)
                for owner in live:
                    if not owner.future.done() and not owner.dropped:  # skip callers that gave up meanwhile
                        await self._run([(p, i) for p, i in batch if p is owner], options)
                return
            log.exception("model call failed")
            for owner in live:
                self._fail(owner, ScorerFailure(f"scorer failed: {type(exc).__name__}: {exc}"))
            return
        finally:
            for reservation in holding:
                reservation.release()
        for (pending, index), result in zip(ran, results):
            if pending.dropped:  # its caller left while the model ran: the row is discarded
                continue
            pending.results[index] = result
            pending.done += 1
            if pending.done == len(pending.items) and not pending.future.done():
                pending.future.set_result(pending.results)


# ---------------------------------------------------------------- HTTP

def _error(status: int, message: str, reason: str, **headers) -> web.Response:
    return web.json_response({"error": message, "status": status, "reason": reason}, status=status,
                             headers=headers or None)


_REASONS = {400: "bad_request", 408: "body_timeout", 413: "too_large", 429: "memory_busy", 499: "disconnected",
            500: "scorer_error", 503: "unavailable", 504: "timeout"}
DISCONNECT_POLL_S = 0.05  # how often a waiting request checks that its client is still connected


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


class RewardServer:
    """The aiohttp application around one scorer. `app` is ready for `web.run_app` or a runner."""

    def __init__(self, scorer: Any, config: ServeConfig | None = None):
        self.scorer = scorer
        self.config = cfg = config or ServeConfig()
        cap = getattr(scorer, "max_batch_size", None)
        self.max_batch = min(cfg.max_batch or cap or 8, cap or math.inf)
        self.allowed_options = accepted_options(scorer, cfg.request_options)
        self.validate_options = option_validator(scorer)
        default_tokens = getattr(getattr(scorer, "options", None), "max_new_tokens", None)
        self.max_new_tokens = cfg.max_new_tokens_cap or default_tokens
        self.work_bytes_per_pixel = int(getattr(scorer, "work_bytes_per_pixel", WORK_BYTES_PER_PIXEL))
        check = getattr(scorer, "check_image_size", None)
        self.check_image = check if callable(check) else None
        self.budget = MemoryBudget(*cfg.budget_bytes(), retry_after_s=cfg.retry_after_s)
        self.inflight = 0
        self.batcher: Batcher | None = None
        self.metrics = _Metrics(lambda: self.batcher.depth if self.batcher else 0, lambda: self.inflight,
                                lambda: self.budget.used, lambda: self.budget.limit)
        self._decoder = ThreadPoolExecutor(cfg.decode_threads, thread_name_prefix="sr-jax-decode")
        self.app = web.Application(client_max_size=cfg.max_body_bytes)
        self.app.router.add_post("/v1/score", self._score)
        self.app.router.add_get("/healthz", self._health)
        self.app.router.add_get("/metrics", self._metrics)
        self.app.on_startup.append(self._on_startup)
        self.app.on_cleanup.append(self._on_cleanup)

    async def _on_startup(self, app) -> None:
        cfg = self.config
        self.batcher = Batcher(self.scorer, self.max_batch, cfg.max_wait_ms / 1000, cfg.max_queue,
                               cfg.isolate_failures, self.metrics)
        self.batcher.start()

    async def _on_cleanup(self, app) -> None:
        await self.batcher.close()
        self._decoder.shutdown(wait=False, cancel_futures=True)

    async def _score(self, request: web.Request) -> web.Response:
        arrival = time.monotonic()
        self.inflight += 1
        reservation = self.budget.reservation()
        try:
            response = await self._score_checked(request, arrival, reservation)
        except RequestError as exc:
            headers = {"Retry-After": f"{self.config.retry_after_s:g}"} if exc.status in (429, 503) else {}
            response = _error(exc.status, str(exc), exc.reason, **headers)
        except ScorerFailure as exc:
            response = _error(500, str(exc), _REASONS[500])
        except ClientGone as exc:
            log.info("client %s gone: %s", request.remote, exc)
            response = _error(499, str(exc), _REASONS[499])
        finally:
            self.inflight -= 1
            reservation.release()
        self.metrics.requests.labels(str(response.status)).inc()
        if response.status != 200:
            self.metrics.errors.labels(json.loads(response.body)["reason"]).inc()
        self.metrics.latency.observe(time.monotonic() - arrival)
        return response

    async def _read_body(self, request: web.Request, reservation: Reservation) -> bytes:
        cfg = self.config
        length = request.content_length
        if length is not None and length > cfg.max_body_bytes:
            raise RequestError(413, f"body of {length} bytes exceeds max_body_mb={cfg.max_body_mb}")
        if length is not None:  # reserved before a byte is read; a chunked body once it is in
            reservation.grow(length * BODY_COPIES, "the body and its copies")
        try:
            body = await asyncio.wait_for(request.read(), cfg.body_timeout_s)
        except asyncio.TimeoutError:
            raise RequestError(408, f"body not received within body_timeout_s={cfg.body_timeout_s:g}") from None
        except web.HTTPRequestEntityTooLarge:
            raise RequestError(413, f"body exceeds max_body_mb={cfg.max_body_mb}") from None
        except ConnectionError:
            raise ClientGone(f"disconnected while sending its body ({length} bytes announced)") from None
        if length is None:
            reservation.grow(len(body) * BODY_COPIES, "the body and its copies")
        return body

    async def _score_checked(self, request: web.Request, arrival: float, reservation: Reservation) -> web.Response:
        cfg = self.config
        body = await self._read_body(request, reservation)
        body_cost = reservation.nbytes
        loop = asyncio.get_running_loop()
        admit = functools.partial(reservation.grow, what="the request's decoded images")
        decoding = loop.run_in_executor(self._decoder, functools.partial(
            parse_request, body, cfg, self.allowed_options, self.validate_options, admit=admit,
            check_image=self.check_image, max_new_tokens=self.max_new_tokens,
            work_bytes_per_pixel=self.work_bytes_per_pixel))
        del body
        try:
            parsed = await asyncio.wait_for(decoding, cfg.request_timeout_s)
        except asyncio.TimeoutError:
            raise RequestError(504, f"decoding the request took over {cfg.request_timeout_s} s") from None
        reservation.shrink(body_cost)  # the body and its parsed copies are gone; the images stay
        limit = min(parsed.timeout_s or cfg.request_timeout_s, cfg.request_timeout_s)
        pending = self.batcher.submit(parsed, reservation)
        del parsed
        deadline = arrival + limit
        try:
            while not pending.future.done():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RequestError(504, f"not scored within {limit:g} s (queue depth {self.batcher.depth})")
                await asyncio.wait([pending.future], timeout=min(left, DISCONNECT_POLL_S))
                if not pending.future.done() and _client_gone(request):
                    raise ClientGone(f"disconnected while waiting for {len(pending.items)} item(s)")
            results = pending.future.result()
        finally:
            # A caller that timed out, disconnected or was cancelled: stop its items and count them.
            cancelled = self.batcher.cancel(pending)
            if cancelled:
                log.info("cancelled %d item(s) of a request from %s that gave up", cancelled, request.remote)
        self.metrics.items.inc(len(results))
        return web.json_response({"results": results})

    async def _health(self, request: web.Request) -> web.Response:
        cfg = self.config
        alive = self.batcher is not None and self.batcher.alive
        return web.json_response({
            "status": "ok" if alive else "unavailable",
            "queue_depth": self.batcher.depth if self.batcher else 0,
            "max_batch": self.max_batch,
            "options": None if self.allowed_options is None else sorted(self.allowed_options),
            "limits": {"max_items_per_request": cfg.max_items_per_request, "max_body_mb": cfg.max_body_mb,
                       "max_images_per_request": cfg.max_images_per_request,
                       "max_image_pixels": cfg.max_image_pixels, "max_request_pixels": cfg.max_request_pixels,
                       "request_timeout_s": cfg.request_timeout_s, "body_timeout_s": cfg.body_timeout_s,
                       "memory_budget_mb": self.budget.limit / _MB, "max_request_mb": self.budget.per_request / _MB,
                       "max_new_tokens": self.max_new_tokens},
        }, status=200 if alive else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


class BackgroundServer:
    """Runs a RewardServer on its own event loop thread (port 0 picks a free port).

        with BackgroundServer(scorer, ServeConfig(port=0)) as server:
            RewardClient(server.url).score(...)
    """

    def __init__(self, scorer: Any, config: ServeConfig | None = None, start_timeout_s: float = 30.0):
        self.server = RewardServer(scorer, config)
        self.start_timeout_s = start_timeout_s
        self.port: int | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="sr-jax-serve", daemon=True)
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{self.server.config.host}:{self.port}"

    async def _start(self) -> None:
        self._runner = web.AppRunner(self.server.app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.server.config.host, self.server.config.port).start()
        self.port = self._runner.addresses[0][1]

    def start(self) -> "BackgroundServer":
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(self.start_timeout_s)
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout_s)
            self._runner = None
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout_s)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ---------------------------------------------------------------- CLI

def _load_object(spec: str):
    """'package.module:attribute' -> the attribute."""
    import importlib

    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"--scorer-factory {spec!r} is not of the form package.module:function")
    return getattr(importlib.import_module(module), attr)


def _serve(args) -> int:
    import sys

    import yaml

    from sr_jax.config import ConfigError, load_config

    overrides = list(args.set or [])
    for name in ("host", "port", "max_batch", "max_wait_ms", "max_queue", "max_items_per_request",
                 "max_body_mb", "max_image_pixels", "request_timeout_s", "body_timeout_s", "memory_budget_mb",
                 "max_request_mb", "max_new_tokens_cap"):
        value = getattr(args, name)
        if value is not None:
            overrides.append(f"{name}={value}")
    try:
        cfg = load_config(ServeConfig, args.config, overrides)
        options = {}
        for item in args.option or []:
            key, sep, raw = item.partition("=")
            if not sep or not key:
                raise ValueError(f"--option {item!r} is not of the form key=value")
            options[key.strip()] = yaml.safe_load(raw) if raw else ""
        factory = _load_object(args.scorer_factory) if args.scorer_factory else None
    except (ConfigError, ValueError, ImportError, AttributeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if factory is None:
        from sr_jax.reward.scorer import Scorer

        factory = Scorer.from_pretrained
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    log.info("loading scorer from %s", args.model)
    scorer = factory(args.model, **options)
    server = RewardServer(scorer, cfg)
    log.info("serving on http://%s:%d (max_batch=%d, max_wait_ms=%g, memory budget %.0f MB, %.0f MB per request, "
             "max_new_tokens <= %s)", cfg.host, cfg.port, server.max_batch, cfg.max_wait_ms, server.budget.limit / _MB,
             server.budget.per_request / _MB, server.max_new_tokens)
    web.run_app(server.app, host=cfg.host, port=cfg.port, print=None, access_log=None)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="HTTP reward server with dynamic batching")
    p.add_argument("--model", required=True, help="model directory for Scorer.from_pretrained")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--max-batch", type=int, help="items per model call (default: the scorer's max_batch_size or 8)")
    p.add_argument("--max-wait-ms", type=float, help="how long a queued item waits for others (default 10)")
    p.add_argument("--max-queue", type=int, help="queued items beyond which requests get 503 (default 256)")
    p.add_argument("--max-items-per-request", type=int)
    p.add_argument("--max-body-mb", type=float)
    p.add_argument("--max-image-pixels", type=int)
    p.add_argument("--request-timeout-s", type=float)
    p.add_argument("--body-timeout-s", type=float, help="seconds to receive a body before 408 (default 30)")
    p.add_argument("--memory-budget-mb", type=float,
                   help="bytes all requests in flight may hold: bodies and decoded images, costed from their "
                        "headers before decoding; over it -> 429 + Retry-After (default: 1/4 of the machine's memory)")
    p.add_argument("--max-request-mb", type=float,
                   help="the same for one request; over it -> 413 (default: 1/4 of the budget)")
    p.add_argument("--max-new-tokens-cap", type=int,
                   help="largest max_new_tokens a request may ask for (default: the scorer's max_new_tokens)")
    p.add_argument("--config", help="YAML with ServeConfig fields")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="ServeConfig override, repeatable")
    p.add_argument("--option", action="append", metavar="KEY=VALUE",
                   help="keyword for the scorer factory (Scorer.from_pretrained), repeatable")
    p.add_argument("--scorer-factory", metavar="MODULE:FUNCTION",
                   help="build the scorer with FUNCTION(model_dir, **options) instead of Scorer.from_pretrained")
    p.set_defaults(func=_serve)
