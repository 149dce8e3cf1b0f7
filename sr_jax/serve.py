"""The reward server: SpatialReward over HTTP/JSON with dynamic batching, for RL trainers.

    sr-jax serve --model DIR --host 127.0.0.1 --port 8000 [--max-batch 8 --max-wait-ms 10 ...]

Endpoints
  POST /v1/score  {"items": [{"original": B64 | [B64, ...], "edited": B64, "instruction": str}, ...],
                   "options": {...scorer options...}, "timeout_s": float (optional)}
                  -> 200 {"results": [one scorer result dict per item, in request order]}
                  Images are base64 PNG or JPEG (a `data:image/...;base64,` prefix is allowed).
                  Errors -> {"error": message, "status": code}: 400 malformed request (the message
                  names the item and field), 413 body/count/pixel limits, 500 the scorer failed,
                  503 queue full or shutting down (with Retry-After), 504 timed out.
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
import inspect
import io
import json
import logging
import math
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
    image_formats: tuple[str, ...] = ("PNG", "JPEG")
    request_options: list[str] | None = None  # options requests may set; None: all the scorer takes
    isolate_failures: bool = True  # on a failed multi-request call, retry each request alone
    decode_threads: int = 2

    def __post_init__(self):
        for name in ("max_queue", "max_items_per_request", "max_images_per_request", "max_image_pixels",
                     "max_request_pixels", "max_instruction_chars", "decode_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_batch is not None and self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        for name in ("max_body_mb", "request_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")
        self.image_formats = tuple(f.upper() for f in self.image_formats)

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)


class RequestError(Exception):
    """A request the server refuses; `status` is the HTTP code, the message says why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


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


def accepted_options(scorer: Any, allowlist: Sequence[str] | None = None) -> frozenset[str] | None:
    """Keyword options `scorer.score` takes beyond the three inputs, narrowed to `allowlist`;
    None (anything) when it takes **kwargs and no allowlist is given."""
    params = list(inspect.signature(scorer.score).parameters.values())
    named = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    takes = None if any(p.kind is p.VAR_KEYWORD for p in params) else frozenset(p.name for p in named[3:])
    if allowlist is None:
        return takes
    return frozenset(allowlist) if takes is None else takes & frozenset(allowlist)


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


def decode_image(value: Any, where: str, cfg: ServeConfig) -> Image.Image:
    """base64 -> a fully loaded PIL image; the size is checked from the header before decoding."""
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
    try:
        image.load()
    except Exception as exc:
        raise RequestError(400, f"{where}: corrupt or truncated {image.format} image "
                                f"({type(exc).__name__}: {exc})") from None
    return image


def _check_options(options: Any, allowed: frozenset[str] | None, validate) -> dict:
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise RequestError(400, f"options: expected an object, got {type(options).__name__}")
    if allowed is not None:
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise RequestError(400, f"options: unknown option(s) {unknown}; accepted: {sorted(allowed)}")
    if validate is not None:
        try:
            validate(dict(options))
        except (ValueError, TypeError) as exc:
            message = str(exc)
            raise RequestError(400, message if message.startswith("options") else f"options: {message}") from None
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


def parse_request(body: bytes, cfg: ServeConfig, allowed_options: frozenset[str] | None = None,
                  validate_options=None) -> ParsedRequest:
    """Validates a /v1/score body and decodes its images; raises RequestError naming the culprit.
    Structure and counts are checked for all items before any image is decoded."""
    try:
        payload = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise RequestError(400, f"malformed JSON: body is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise RequestError(400, f"malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
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
    timeout = payload.get("timeout_s")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or not math.isfinite(timeout) or timeout <= 0):
        raise RequestError(400, f"timeout_s: expected a positive number, got {timeout!r}")
    options = _check_options(payload.get("options"), allowed_options, validate_options)

    shapes = [_check_item_shape(i, item, cfg) for i, item in enumerate(items)]
    n_images = sum(len(originals) + 1 for originals, _, _ in shapes)
    if n_images > cfg.max_images_per_request:
        raise RequestError(413, f"items: {n_images} images exceed max_images_per_request={cfg.max_images_per_request}")

    decoded, pixels = [], 0
    for i, (originals, edited, instruction) in enumerate(shapes):
        images = []
        for where, value in [(f"items[{i}].original[{j}]", v) for j, v in enumerate(originals)] \
                + [(f"items[{i}].edited", edited)]:
            image = decode_image(value, where, cfg)
            pixels += image.width * image.height
            if pixels > cfg.max_request_pixels:
                raise RequestError(413, f"{where}: the request's images exceed max_request_pixels="
                                        f"{cfg.max_request_pixels}")
            images.append(image)
        decoded.append(Item(images[:-1], images[-1], instruction))
    return ParsedRequest(decoded, options, None if timeout is None else float(timeout))


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

    def __init__(self, queue_depth, inflight):
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

    def submit(self, request: ParsedRequest) -> _Pending:
        if self.closing:
            raise RequestError(503, "server shutting down")
        n = len(request.items)
        if self.depth + n > self.max_queue:
            raise RequestError(503, f"queue full ({self.depth} items queued, max_queue={self.max_queue}); retry later")
        key = json.dumps(request.options, sort_keys=True)
        pending = _Pending(request.items, request.options, key, asyncio.get_running_loop().create_future(),
                           time.monotonic())
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

    def _call(self, batch: list[tuple[_Pending, int]], options: dict) -> list:
        """Runs on the worker thread."""
        items = [p.items[i] for p, i in batch]
        start = time.perf_counter()
        try:
            results = self.scorer.score([it.originals for it in items], [it.edited for it in items],
                                        [it.instruction for it in items], **options)
        finally:
            self.metrics.model_latency.observe(time.perf_counter() - start)
        results = list(results)
        if len(results) != len(items):
            raise ScorerFailure(f"scorer returned {len(results)} results for {len(items)} items")
        return [to_jsonable(r) for r in results]

    async def _run(self, batch: list[tuple[_Pending, int]], options: dict) -> None:
        loop = asyncio.get_running_loop()
        owners = list(dict.fromkeys(p for p, _ in batch))
        self.metrics.batch_size.observe(len(batch))
        self.metrics.batch_requests.observe(len(owners))
        try:
            results = await loop.run_in_executor(self._worker, self._call, batch, options)
        except Exception as exc:
            self.metrics.batch_failures.inc()
            if len(owners) > 1 and self.isolate_failures:
                log.warning("model call over %d requests failed (%s); retrying each alone", len(owners), exc)
                for owner in owners:
                    if not owner.future.done():  # skip callers that already gave up
                        await self._run([(p, i) for p, i in batch if p is owner], options)
                return
            log.exception("model call failed")
            for owner in owners:
                self._fail(owner, ScorerFailure(f"scorer failed: {type(exc).__name__}: {exc}"))
            return
        for (pending, index), result in zip(batch, results):
            pending.results[index] = result
            pending.done += 1
            if pending.done == len(pending.items) and not pending.future.done():
                pending.future.set_result(pending.results)


# ---------------------------------------------------------------- HTTP

def _error(status: int, message: str, **headers) -> web.Response:
    return web.json_response({"error": message, "status": status}, status=status, headers=headers or None)


_REASONS = {400: "bad_request", 413: "too_large", 500: "scorer_error", 503: "unavailable", 504: "timeout"}


class RewardServer:
    """The aiohttp application around one scorer. `app` is ready for `web.run_app` or a runner."""

    def __init__(self, scorer: Any, config: ServeConfig | None = None):
        self.scorer = scorer
        self.config = cfg = config or ServeConfig()
        cap = getattr(scorer, "max_batch_size", None)
        self.max_batch = min(cfg.max_batch or cap or 8, cap or math.inf)
        self.allowed_options = accepted_options(scorer, cfg.request_options)
        self.validate_options = option_validator(scorer)
        self.inflight = 0
        self.batcher: Batcher | None = None
        self.metrics = _Metrics(lambda: self.batcher.depth if self.batcher else 0, lambda: self.inflight)
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
        try:
            response = await self._score_checked(request, arrival)
        except RequestError as exc:
            headers = {"Retry-After": "1"} if exc.status == 503 else {}
            response = _error(exc.status, str(exc), **headers)
        except ScorerFailure as exc:
            response = _error(500, str(exc))
        finally:
            self.inflight -= 1
        self.metrics.requests.labels(str(response.status)).inc()
        if response.status != 200:
            self.metrics.errors.labels(_REASONS.get(response.status, str(response.status))).inc()
        self.metrics.latency.observe(time.monotonic() - arrival)
        return response

    async def _score_checked(self, request: web.Request, arrival: float) -> web.Response:
        cfg = self.config
        if request.content_length is not None and request.content_length > cfg.max_body_bytes:
            raise RequestError(413, f"body of {request.content_length} bytes exceeds max_body_mb={cfg.max_body_mb}")
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise RequestError(413, f"body exceeds max_body_mb={cfg.max_body_mb}") from None
        loop = asyncio.get_running_loop()
        decoding = loop.run_in_executor(self._decoder, parse_request, body, cfg, self.allowed_options,
                                        self.validate_options)
        try:
            parsed = await asyncio.wait_for(decoding, cfg.request_timeout_s)
        except asyncio.TimeoutError:
            raise RequestError(504, f"decoding the request took over {cfg.request_timeout_s} s") from None
        limit = min(parsed.timeout_s or cfg.request_timeout_s, cfg.request_timeout_s)
        pending = self.batcher.submit(parsed)
        try:
            results = await asyncio.wait_for(asyncio.shield(pending.future), limit - (time.monotonic() - arrival))
        except asyncio.TimeoutError:
            raise RequestError(504, f"not scored within {limit:g} s (queue depth {self.batcher.depth})") from None
        finally:
            self.batcher.drop(pending)  # no-op once done; stops queued items of a request that gave up
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
                       "request_timeout_s": cfg.request_timeout_s},
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
                 "max_body_mb", "max_image_pixels", "request_timeout_s"):
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
        from sr_jax.scorer import Scorer

        factory = Scorer.from_pretrained
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    log.info("loading scorer from %s", args.model)
    scorer = factory(args.model, **options)
    server = RewardServer(scorer, cfg)
    log.info("serving on http://%s:%d (max_batch=%d, max_wait_ms=%g)", cfg.host, cfg.port, server.max_batch,
             cfg.max_wait_ms)
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
    p.add_argument("--config", help="YAML with ServeConfig fields")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="ServeConfig override, repeatable")
    p.add_argument("--option", action="append", metavar="KEY=VALUE",
                   help="keyword for the scorer factory (Scorer.from_pretrained), repeatable")
    p.add_argument("--scorer-factory", metavar="MODULE:FUNCTION",
                   help="build the scorer with FUNCTION(model_dir, **options) instead of Scorer.from_pretrained")
    p.set_defaults(func=_serve)
