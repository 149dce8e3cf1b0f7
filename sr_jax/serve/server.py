"""The reward server (`sr_jax.serve.server`): SpatialReward over HTTP/JSON with dynamic batching, for RL trainers.

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
  GET  /metrics   -> Prometheus text format (names in `sr_jax.serve.batching.Metrics`).

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
import functools
import importlib
import json
import logging
import math
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import yaml
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from sr_jax.config import ConfigError, load_config
from sr_jax.serve.batching import Batcher, ClientGone, MemoryBudget, Metrics, Reservation, ScorerFailure
from sr_jax.serve.protocol import (
    BODY_COPIES,
    MB,
    REASONS,
    RequestError,
    ServeConfig,
    WORK_BYTES_PER_PIXEL,
    accepted_options,
    option_validator,
    parse_request,
)

log = logging.getLogger("sr_jax.serve")

# ---------------------------------------------------------------- HTTP

def _error(status: int, message: str, reason: str, **headers) -> web.Response:
    return web.json_response({"error": message, "status": status, "reason": reason}, status=status,
                             headers=headers or None)


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
        self.metrics = Metrics(lambda: self.batcher.depth if self.batcher else 0, lambda: self.inflight,
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
            response = _error(500, str(exc), REASONS[500])
        except ClientGone as exc:
            log.info("client %s gone: %s", request.remote, exc)
            response = _error(499, str(exc), REASONS[499])
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
                       "memory_budget_mb": self.budget.limit / MB, "max_request_mb": self.budget.per_request / MB,
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
    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"--scorer-factory {spec!r} is not of the form package.module:function")
    return getattr(importlib.import_module(module), attr)


def _serve(args) -> int:
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
             "max_new_tokens <= %s)", cfg.host, cfg.port, server.max_batch, cfg.max_wait_ms, server.budget.limit / MB,
             server.budget.per_request / MB, server.max_new_tokens)
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
