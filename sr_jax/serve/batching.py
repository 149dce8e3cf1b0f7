"""Between the protocol and the model: the memory budget that admits requests (`MemoryBudget`,
`Reservation`), the queue that groups items into model calls on one worker thread (`Batcher`),
cancellation of abandoned requests, and the server's Prometheus counters (`Metrics`)."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from sr_jax.serve.protocol import MB, STOP_HOOK, Item, ParsedRequest, RequestError, takes_stop_hook, to_jsonable

log = logging.getLogger("sr_jax.serve")


class ClientGone(Exception):
    """The client closed its connection; nothing can be answered."""


class ScorerFailure(Exception):
    pass


# ---------------------------------------------------------------- metrics

class Metrics:
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
                raise RequestError(413, f"{what} need {(self.nbytes + nbytes) / MB:.1f} MB in flight, over the "
                                        f"per-request limit max_request_mb={budget.per_request / MB:.1f}",
                                   reason="too_large")
            if budget.used + nbytes > budget.limit:
                raise RequestError(429, f"memory budget busy: {budget.used / MB:.1f} of {budget.limit / MB:.1f} MB "
                                        f"in flight, {what} need {nbytes / MB:.1f} MB; retry later",
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
                 isolate_failures: bool, metrics: Metrics):
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
