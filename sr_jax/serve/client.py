"""A small synchronous client for the reward server (`sr-jax serve`), standard library only.

    client = RewardClient("http://127.0.0.1:8000", timeout=600, retries=3, backoff=0.5)
    results = client.score(originals, edited, instructions, grounding_weight=0.1)

Images may be PIL images (sent as PNG), uint8 arrays (sent as PNG), encoded PNG/JPEG bytes, or
file paths (sent as they are). Only failures that say nothing ran and a retry may succeed are
retried: 429 (memory budget busy), 503 (queue full), 502 and connections refused or reset; each wait
is exponential with jitter, at least the server's Retry-After, at most `max_backoff`. Other
answers raise at once: 4xx are the caller's fault, a 500 would fail again, and a 504 or a client
timeout means the server already spent its time on the request (resending multiplies the load).
Large calls are split into requests of at most `max_items_per_request` items.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import random
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image


class RewardServerError(RuntimeError):
    """The server answered with an error (`status` is the HTTP code; 0: it never answered)."""

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}" if status else message)
        self.status = status
        self.message = message


def encode_image(image: Any) -> str:
    """An image as base64 text: PIL images and uint8 arrays become PNG, bytes and files go as they are."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", compress_level=1)
        data = buffer.getvalue()
    elif isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
    elif isinstance(image, (str, Path)):
        data = Path(image).read_bytes()
    else:
        raise TypeError(f"expected a PIL image, uint8 array, bytes or a path, got {type(image).__name__}")
    return base64.b64encode(data).decode("ascii")


RETRY_STATUSES = (429, 502, 503)
_TIMED_OUT = -1  # internal status: no answer within the client's timeout (not retried)


def _retryable(status: int) -> bool:
    return status in RETRY_STATUSES or status == 0


class RewardClient:
    def __init__(self, base_url: str, timeout: float = 600.0, retries: int = 3, backoff: float = 0.5,
                 max_backoff: float = 30.0, max_items_per_request: int = 64, request_timeout_s: float | None = None):
        """timeout: seconds per HTTP attempt; retries: extra attempts after the first; backoff: first
        wait, doubled each retry up to max_backoff; request_timeout_s: asks the server to give up
        (504) sooner than its own limit."""
        if retries < 0 or backoff < 0 or timeout <= 0 or max_items_per_request < 1:
            raise ValueError("need timeout > 0, retries >= 0, backoff >= 0, max_items_per_request >= 1")
        self.base_url = base_url.rstrip("/")
        self.timeout, self.retries, self.backoff, self.max_backoff = timeout, retries, backoff, max_backoff
        self.max_items_per_request = max_items_per_request
        self.request_timeout_s = request_timeout_s

    def _once(self, method: str, path: str, body: bytes | None) -> tuple[int, bytes, float | None]:
        """One HTTP exchange -> (status, body, Retry-After seconds); status 0 for a transport error."""
        headers = {"Content-Type": "application/json"} if body is not None else {}
        request = urllib.request.Request(self.base_url + path, data=body, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.status, response.read(), None
        except urllib.error.HTTPError as exc:
            retry_after = exc.headers.get("Retry-After") if exc.headers else None
            try:
                wait = float(retry_after) if retry_after else None
            except ValueError:
                wait = None
            return exc.code, exc.read(), wait
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, socket.timeout, TimeoutError) as exc:
            reason = getattr(exc, "reason", exc)
            status = _TIMED_OUT if isinstance(reason, (socket.timeout, TimeoutError)) else 0
            return status, f"{type(exc).__name__}: {reason}".encode(), None

    def _request(self, method: str, path: str, body: bytes | None = None, ok: tuple[int, ...] = (200,)) -> Any:
        for attempt in range(self.retries + 1):
            status, data, retry_after = self._once(method, path, body)
            if status in ok:
                return json.loads(data) if path != "/metrics" else data.decode()
            if not _retryable(status) or attempt == self.retries:
                break
            wait = self.backoff * 2**attempt * random.uniform(0.5, 1.0)  # jitter spreads retrying clients
            time.sleep(min(max(wait, retry_after or 0.0), self.max_backoff))
        try:
            message = json.loads(data).get("error", data.decode(errors="replace"))
        except (ValueError, AttributeError):
            message = data.decode(errors="replace")
        if status == _TIMED_OUT:
            status, message = 0, f"no answer within {self.timeout:g} s ({message}); not retried"
        raise RewardServerError(status, f"{method} {path}: {message}")

    def score(self, originals: Sequence[Any], edited: Sequence[Any], instructions: Sequence[str],
              **options: Any) -> list[dict]:
        """One result dict per item, in order. originals[i] is one image or a list of them."""
        if not len(originals) == len(edited) == len(instructions):
            raise ValueError(f"got {len(originals)} originals, {len(edited)} edited images and "
                             f"{len(instructions)} instructions; they must match")
        items = []
        for i, (orig, edit, text) in enumerate(zip(originals, edited, instructions)):
            group = list(orig) if isinstance(orig, (list, tuple)) else [orig]
            try:
                items.append({"original": [encode_image(o) for o in group], "edited": encode_image(edit),
                              "instruction": text})
            except (TypeError, OSError) as exc:
                raise ValueError(f"item {i}: {exc}") from exc
        results: list[dict] = []
        for start in range(0, len(items), self.max_items_per_request):
            payload: dict[str, Any] = {"items": items[start : start + self.max_items_per_request], "options": options}
            if self.request_timeout_s is not None:
                payload["timeout_s"] = self.request_timeout_s
            results += self._request("POST", "/v1/score", json.dumps(payload).encode())["results"]
        return results

    def health(self) -> dict:
        """The server's /healthz answer ("status" is "ok" or "unavailable")."""
        return self._request("GET", "/healthz", ok=(200, 503))

    def metrics(self) -> str:
        """The Prometheus text from /metrics."""
        return self._request("GET", "/metrics")

    def wait_until_ready(self, timeout: float = 60.0, interval: float = 0.1) -> dict:
        """Polls /healthz until the server says ok; raises TimeoutError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            status, data, _ = self._once("GET", "/healthz", None)
            if status == 200:
                return json.loads(data)
            last = data.decode(errors="replace")
            time.sleep(interval)
        raise TimeoutError(f"{self.base_url} not ready after {timeout} s: {last}")
