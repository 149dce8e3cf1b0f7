"""The reward server and client over real HTTP on 127.0.0.1.

`PixelScorer` is test scaffolding for the scorer interface: it computes a real result from the
images (changed-pixel mask -> edit box -> grounding report -> `aggregate` on scores derived from
pixel statistics), so every image pair and instruction has its own, checkable answer.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sr_jax.serve.client import RewardClient, RewardServerError
from sr_jax.reward.grounding import changed_mask, grounding_report, mask_bbox, pixels_to_grid
from sr_jax.reward import AGGREGATION_MODES, aggregate
from sr_jax.serve.protocol import ServeConfig, parse_request, to_jsonable
from sr_jax.serve.server import BackgroundServer

HERE = Path(__file__).resolve().parent  # the serve subprocesses import this module by name


class PixelScorer:
    """Deterministic scorer over pixels. Instructions "sleep:S" wait S seconds, "boom" raises,
    "gate" waits for `gate` to be set, "spin" runs until `should_stop()` (5 s at most); every
    call's (batch size, options) is recorded."""

    # Its float64 statistics need far more than the real Scorer: 71 bytes per pixel of an
    # original/edited pair at its peak (measured with ru_maxrss on 2000x2000 images).
    work_bytes_per_pixel = 40

    def __init__(self, max_batch_size: int | None = None):
        if max_batch_size is not None:
            self.max_batch_size = max_batch_size
        self.calls: list[tuple[int, dict]] = []
        self.gate = threading.Event()
        self._lock = threading.Lock()

    def validate_options(self, options: dict) -> None:
        if options.get("mode", "weighted") not in AGGREGATION_MODES:
            raise ValueError(f"mode must be one of {AGGREGATION_MODES}")

    def score(self, originals, edited, instructions, grounding_weight: float = 0.0, mode: str = "weighted",
              should_stop=None):
        with self._lock:
            self.calls.append((len(edited), {"grounding_weight": grounding_weight, "mode": mode}))
        for text in instructions:
            if text == "spin":  # a long generation: runs 5 s unless the server says nobody waits
                start = time.monotonic()
                while time.monotonic() - start < 5 and not (should_stop and should_stop()):
                    time.sleep(0.01)
                self.spun = time.monotonic() - start
            if text == "boom":
                raise RuntimeError("the model fell over")
            if text.startswith("sleep:"):
                time.sleep(float(text[6:]))
            if text == "gate" and not self.gate.wait(10):
                raise RuntimeError("gate never opened")
        return [self._one(o, e, t, grounding_weight, mode) for o, e, t in zip(originals, edited, instructions)]

    @staticmethod
    def _one(originals, edited, instruction, grounding_weight, mode):
        mask = changed_mask(originals[-1], edited)
        box = mask_bbox(mask)
        regions = [] if box is None else [{"id": 0, "label": instruction[:16],
                                           "bbox_2d": pixels_to_grid(box, *mask.shape)}]
        report = grounding_report(mask, regions)
        pixels = np.asarray(edited.convert("RGB"), dtype=np.float64)
        sc = [25.0 * float(mask.mean()), 25.0 * float(pixels[..., 0].mean()) / 255.0]
        pq = [min(25.0, float(pixels.std()) / 5.0), float(len(instruction) % 26)]
        reward, sc10, pq10 = aggregate(sc, pq, mode=mode, grounding=report["grounding_score"],
                                       grounding_weight=grounding_weight)
        return {"reward": reward, "sc": sc10, "pq": pq10, "scores": {"sc": sc, "pq": pq},
                "edit_region": regions, "grounding": report, "instruction": instruction,
                "n_originals": len(originals), "edited_mode": edited.mode}


def make_pixel_scorer(model_dir: str, **options) -> PixelScorer:
    """Factory for `sr-jax serve --scorer-factory test_serve:make_pixel_scorer`."""
    return PixelScorer(**options)


def edit_pair(seed: int, size=(40, 32)) -> tuple[Image.Image, Image.Image]:
    """A noisy background and the same picture with one seeded rectangle painted over."""
    rng = np.random.default_rng(seed)
    w, h = size
    base = rng.integers(0, 120, (h, w, 3), dtype=np.uint8)
    edited = base.copy()
    x1, y1 = rng.integers(0, w - 8), rng.integers(0, h - 8)
    x2, y2 = x1 + rng.integers(4, 9), y1 + rng.integers(4, 9)
    edited[y1:y2, x1:x2] = rng.integers(160, 256, 3, dtype=np.uint8)
    return Image.fromarray(base), Image.fromarray(edited)


def direct(originals, edited, instructions, **options):
    """What the server must return: the scorer's own answer (from a fresh instance, so the served
    one's call log stays the server's), as JSON would carry it."""
    originals = [o if isinstance(o, list) else [o] for o in originals]
    return json.loads(json.dumps(to_jsonable(PixelScorer().score(originals, edited, instructions, **options))))


def png_b64(image: Image.Image, fmt="PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return base64.b64encode(buffer.getvalue()).decode()


def post(url: str, body: bytes, timeout=10.0) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url + "/v1/score", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def metric(text: str, name: str, labels: str = "") -> float:
    """A sample's value from Prometheus text (0 when absent)."""
    pattern = re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else "") + r" ([0-9.e+-]+)$"
    m = re.search(pattern, text, re.MULTILINE)
    return float(m.group(1)) if m else 0.0


CONFIG = dict(host="127.0.0.1", port=0, max_batch=8, max_wait_ms=40, max_items_per_request=4,
              max_images_per_request=8, max_image_pixels=64 * 64, max_request_pixels=6 * 64 * 64,
              max_body_mb=0.25, request_timeout_s=10)


@pytest.fixture(scope="module")
def served():
    scorer = PixelScorer()
    with BackgroundServer(scorer, ServeConfig(**CONFIG)) as server:
        yield server, scorer


def test_results_match_direct_call_and_keep_order(served):
    server, scorer = served
    pairs = [edit_pair(s) for s in range(3)]
    originals = [pairs[0][0], [pairs[1][0], pairs[2][0], pairs[1][0]], pairs[2][0]]
    edited = [p[1] for p in pairs]
    instructions = ["paint a box", "another box", "third"]
    client = RewardClient(server.url, timeout=10, retries=0)
    for options in ({}, {"grounding_weight": 0.25, "mode": "min_geometric"}):
        got = client.score(originals, edited, instructions, **options)
        assert got == direct(originals, edited, instructions, **options)
    assert [r["n_originals"] for r in got] == [1, 3, 1]
    assert got[0]["edit_region"] and got[0]["grounding"]["grounding_score"] > 0.5  # a real, non-trivial answer
    # Bytes and paths are sent as they are: a JPEG arrives as the same decoded JPEG (modes untouched).
    jpeg = io.BytesIO()
    pairs[0][1].convert("L").save(jpeg, format="JPEG", quality=90)
    got = client.score([pairs[0][0]], [jpeg.getvalue()], ["gray jpeg"])
    decoded = Image.open(io.BytesIO(jpeg.getvalue()))
    assert got == direct([pairs[0][0]], [decoded], ["gray jpeg"]) and got[0]["edited_mode"] == "L"
    # Calls larger than one request are split and reassembled in order.
    many = [edit_pair(10 + s) for s in range(6)]
    small = RewardClient(server.url, timeout=10, retries=0, max_items_per_request=4)
    texts = [f"item {s}" for s in range(6)]
    assert small.score([p[0] for p in many], [p[1] for p in many], texts) == \
        direct([p[0] for p in many], [p[1] for p in many], texts)


def test_client_accepts_paths_and_arrays(served, tmp_path):
    server, scorer = served
    original, edited = edit_pair(5)
    path = tmp_path / "edited.png"
    edited.save(path)
    client = RewardClient(server.url, timeout=10, retries=0)
    got = client.score([np.asarray(original)], [str(path)], ["from a path"])
    assert got == direct([original], [edited], ["from a path"])


def test_32_concurrent_clients_get_their_own_answers_in_batches(served):
    server, scorer = served
    client = RewardClient(server.url, timeout=20, retries=0)
    before = client.metrics()
    calls_before = len(scorer.calls)

    def one_client(k: int):
        n = 1 + k % 3
        pairs = [edit_pair(1000 + 10 * k + j) for j in range(n)]
        texts = [f"client {k} item {j}" for j in range(n)]
        options = {"grounding_weight": 0.5} if k % 2 else {}
        got = client.score([p[0] for p in pairs], [p[1] for p in pairs], texts, **options)
        return got, direct([p[0] for p in pairs], [p[1] for p in pairs], texts, **options), n

    with ThreadPoolExecutor(32) as pool:
        outcomes = list(pool.map(one_client, range(32)))
    for got, expected, n in outcomes:
        assert len(got) == n and got == expected
    total = sum(n for _, _, n in outcomes)
    after = client.metrics()
    batches = metric(after, "sr_jax_batch_size_count") - metric(before, "sr_jax_batch_size_count")
    items = metric(after, "sr_jax_batch_size_sum") - metric(before, "sr_jax_batch_size_sum")
    assert items == total == 63
    print(f"{batches:.0f} model calls for 32 requests, sizes {sorted(size for size, _ in scorer.calls[calls_before:])}")
    assert batches < 32, f"{batches} model calls for 32 requests: nothing was batched"
    calls = scorer.calls[calls_before:]
    assert max(size for size, _ in calls) > 1 and all(size <= 8 for size, _ in calls)
    assert metric(after, "sr_jax_score_requests_total", 'code="200"') - \
        metric(before, "sr_jax_score_requests_total", 'code="200"') == 32
    assert metric(after, "sr_jax_queue_depth") == 0
    assert "sr_jax_request_latency_seconds_bucket" in after and "sr_jax_inflight_requests" in after


def _item(seed=0, **override):
    original, edited = edit_pair(seed)
    item = {"original": png_b64(original), "edited": png_b64(edited), "instruction": "fine"}
    item.update(override)
    return item


def _body(items=None, **top) -> bytes:
    return json.dumps({"items": [_item()] if items is None else items, **top}).encode()


def _truncated_png() -> str:
    raw = base64.b64decode(_item()["edited"])
    return base64.b64encode(raw[: len(raw) // 2]).decode()


def _gif() -> str:
    buffer = io.BytesIO()
    edit_pair(0)[1].save(buffer, format="GIF")
    return base64.b64encode(buffer.getvalue()).decode()


MALFORMED = {
    "not_json": (b"{items: nope", 400, "malformed JSON"),
    "not_utf8": (b"\xff\xfe{}", 400, "not UTF-8"),
    "not_an_object": (b"[1, 2]", 400, "body: expected a JSON object"),
    "unknown_top_field": (json.dumps({"items": [], "extra": 1}).encode(), 400, "unknown field(s) ['extra']"),
    "items_missing": (b"{}", 400, "items: missing"),
    "items_not_list": (b'{"items": {}}', 400, "items: expected a list"),
    "items_empty": (b'{"items": []}', 400, "items: the list is empty"),
    "item_not_object": (_body(["x"]), 400, "items[0]: expected an object"),
    "edited_missing": (_body([_item(), {"original": _item()["original"], "instruction": "x"}]), 400,
                       "items[1].edited: missing"),
    "instruction_not_string": (_body([_item(instruction=3)]), 400, "items[0].instruction: expected a string"),
    "original_wrong_type": (_body([_item(original=7)]), 400, "items[0].original: expected a base64 string"),
    "original_empty_list": (_body([_item(original=[])]), 400, "items[0].original: the list is empty"),
    "unknown_item_field": (_body([_item(originals="x")]), 400, "items[0]: unknown field(s) ['originals']"),
    "bad_base64": (_body([_item(), _item(edited="not base64 !!")]), 400, "items[1].edited: invalid base64"),
    "not_an_image": (_body([_item(original=[_item()["original"], base64.b64encode(b"hello").decode()])]), 400,
                     "items[0].original[1]: not a decodable image"),
    "truncated_png": (_body([_item(edited=_truncated_png())]), 400, "items[0].edited: corrupt or truncated PNG"),
    "gif_refused": (_body([_item(edited=_gif())]), 400, "items[0].edited: image format GIF is not accepted"),
    "bad_data_url": (_body([_item(edited="data:image/png," + _item()["edited"])]), 400, "data URL"),
    "options_not_object": (_body(options=[1]), 400, "options: expected an object"),
    "unknown_option": (_body(options={"temperature": 1}), 400, "options: unknown option(s) ['temperature']"),
    "bad_option_value": (_body(options={"mode": "max"}), 400, "options: mode must be one of"),
    "bad_timeout": (_body(timeout_s=-1), 400, "timeout_s: expected a positive number"),
    "too_many_items": (_body([_item(s) for s in range(5)]), 413, "max_items_per_request=4"),
    "too_many_images": (_body([_item(original=[_item()["original"]] * 4)] * 2), 413, "max_images_per_request=8"),
    "image_too_large": (_body([_item(edited=png_b64(Image.new("RGB", (65, 64))))]), 413,
                        "items[0].edited: 65x64 image exceeds max_image_pixels"),
    "request_pixels": (_body([_item(original=[png_b64(Image.new("RGB", (64, 64)))] * 3, edited=
                                    png_b64(Image.new("RGB", (64, 64))))] * 2), 413, "max_request_pixels"),
    "body_too_large": (b'{"items": "' + b"A" * 300_000 + b'"}', 413, "max_body_mb"),
    # issue 16: each of these was a 500 with a traceback
    "deep_nesting": (b'{"items": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, "nested more than 16 levels"),
    "huge_int": (b'{"items": [], "timeout_s": ' + b"7" * 4301 + b"}", 400, "4301-character integer"),
    "timeout_10e30": (_body(timeout_s=10**30), 400, "timeout_s: expected a positive number"),
    "timeout_10e400": (_body(timeout_s=10**400), 400, "401-character integer"),
    "float_overflow": (_body().replace(b'{"items"', b'{"timeout_s": 1e400, "items"'), 400, "too large for a float"),
    "infinity": (_body().replace(b'{"items"', b'{"timeout_s": Infinity, "items"'), 400, "Infinity is not a JSON"),
    "nan_option": (_body().replace(b'{"items"', b'{"options": {"grounding_weight": NaN}, "items"'), 400,
                   "NaN is not a JSON number"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_requests_get_4xx_and_server_keeps_serving(served, case):
    server, scorer = served
    body, status, message = MALFORMED[case]
    before = RewardClient(server.url).metrics()
    code, answer = post(server.url, body)
    assert (code, answer["status"]) == (status, status) and message in answer["error"], answer
    after = RewardClient(server.url).metrics()
    label = f'reason="{answer["reason"]}"'
    assert metric(after, "sr_jax_score_errors_total", label) == metric(before, "sr_jax_score_errors_total", label) + 1
    code, answer = post(server.url, _body([_item(3)]))
    assert code == 200 and answer["results"][0]["instruction"] == "fine"


def test_client_does_not_retry_4xx(served):
    server, _ = served
    client = RewardClient(server.url, timeout=10, retries=3, backoff=0.01)
    before = metric(client.metrics(), "sr_jax_score_requests_total", 'code="400"')
    with pytest.raises(RewardServerError) as err:
        client.score([edit_pair(0)[0]], [base64.b64decode(_gif())], ["gif"])
    assert err.value.status == 400 and "image format GIF" in err.value.message
    assert metric(client.metrics(), "sr_jax_score_requests_total", 'code="400"') == before + 1


def test_scorer_error_fails_only_its_request(served):
    server, _ = served
    client = RewardClient(server.url, timeout=10, retries=0)
    pairs = [edit_pair(s) for s in range(4)]
    texts = ["ok 0", "boom", "ok 2", "ok 3"]

    def call(k):
        try:
            return client.score([pairs[k][0]], [pairs[k][1]], [texts[k]])[0]["instruction"]
        except RewardServerError as exc:
            return exc.status, exc.message

    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(call, range(4)))
    assert got[0] == "ok 0" and got[2] == "ok 2" and got[3] == "ok 3"
    assert got[1][0] == 500 and "RuntimeError: the model fell over" in got[1][1]
    assert metric(client.metrics(), "sr_jax_batch_failures_total") >= 1
    assert client.score([pairs[0][0]], [pairs[0][1]], ["after"])[0]["instruction"] == "after"


def test_timeout_gives_504_and_others_are_served(served):
    server, scorer = served
    client = RewardClient(server.url, timeout=10, retries=0, request_timeout_s=0.2)
    original, edited = edit_pair(7)
    start = time.monotonic()
    with pytest.raises(RewardServerError) as err:
        client.score([original], [edited], ["sleep:0.6"])
    assert err.value.status == 504 and "not scored within 0.2 s" in err.value.message
    assert time.monotonic() - start < 0.55
    # The slow call still occupies the model; the next request waits for it, then is answered.
    assert RewardClient(server.url, timeout=10, retries=0).score([original], [edited], ["next"]) == \
        direct([original], [edited], ["next"])
    assert metric(client.metrics(), "sr_jax_score_errors_total", 'reason="timeout"') >= 1


def test_full_queue_gives_503_and_client_retries():
    scorer = PixelScorer()
    config = ServeConfig(port=0, max_batch=1, max_wait_ms=0, max_queue=2, request_timeout_s=10)
    with BackgroundServer(scorer, config) as server:
        fast = RewardClient(server.url, timeout=10, retries=0)
        pairs = [edit_pair(s) for s in range(4)]
        with ThreadPoolExecutor(2) as pool:
            blocked = pool.submit(fast.score, [pairs[0][0]], [pairs[0][1]], ["gate"])  # holds the model
            while not scorer.calls:
                time.sleep(0.01)
            queued = pool.submit(fast.score, [p[0] for p in pairs[1:3]], [p[1] for p in pairs[1:3]], ["a", "b"])
            while fast.health()["queue_depth"] < 2:
                time.sleep(0.01)
            with pytest.raises(RewardServerError) as err:
                fast.score([pairs[3][0]], [pairs[3][1]], ["no retry"])
            assert err.value.status == 503 and "queue full" in err.value.message
            threading.Timer(0.3, scorer.gate.set).start()
            patient = RewardClient(server.url, timeout=10, retries=20, backoff=0.05, max_backoff=0.05)
            got = patient.score([pairs[3][0]], [pairs[3][1]], ["retried"])
            assert got == direct([pairs[3][0]], [pairs[3][1]], ["retried"])
            assert blocked.result(10)[0]["instruction"] == "gate"
            assert [r["instruction"] for r in queued.result(10)] == ["a", "b"]
        assert metric(fast.metrics(), "sr_jax_score_errors_total", 'reason="unavailable"') >= 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_client_retries_until_server_is_up():
    port = _free_port()
    client = RewardClient(f"http://127.0.0.1:{port}", timeout=5, retries=30, backoff=0.05, max_backoff=0.1)
    original, edited = edit_pair(9)
    scorer = PixelScorer()
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(client.score, [original], [edited], ["late server"])
        time.sleep(0.3)
        assert not pending.done()
        with BackgroundServer(scorer, ServeConfig(port=port)):
            assert pending.result(10) == direct([original], [edited], ["late server"])
    with pytest.raises(RewardServerError) as err:  # and gives up with status 0 once retries run out
        RewardClient(f"http://127.0.0.1:{port}", timeout=2, retries=1, backoff=0.01).score(
            [original], [edited], ["nobody home"])
    assert err.value.status == 0


def test_server_batch_cap_follows_scorer():
    scorer = PixelScorer(max_batch_size=3)
    with BackgroundServer(scorer, ServeConfig(port=0, max_batch=16, max_wait_ms=100)) as server:
        client = RewardClient(server.url, timeout=10, retries=0)
        health = client.health()
        assert health["max_batch"] == 3 and health["options"] == ["grounding_weight", "mode"]
        pairs = [edit_pair(s) for s in range(7)]
        texts = [str(s) for s in range(7)]
        assert client.score([p[0] for p in pairs], [p[1] for p in pairs], texts) == \
            direct([p[0] for p in pairs], [p[1] for p in pairs], texts)
        assert [size for size, _ in scorer.calls] == [3, 3, 1]  # one request split over calls


def test_parse_request_decodes_data_urls():
    cfg = ServeConfig(max_items_per_request=2)
    item = _item()
    item["edited"] = "data:image/png;base64," + item["edited"]
    parsed = parse_request(_body([item], timeout_s=2), cfg)
    assert parsed.items[0].edited.size == (40, 32) and parsed.timeout_s == 2.0 and parsed.options == {}
    assert np.array_equal(np.asarray(parsed.items[0].edited), np.asarray(edit_pair(0)[1]))


class ServeProcess:
    """`sr-jax serve ...` in a subprocess on a free port; always killed at exit."""

    def __init__(self, args: list[str], log_path: Path):
        self.port = _free_port()
        self.log = open(log_path, "w")
        self.log_path = log_path
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
        self.process = subprocess.Popen([sys.executable, "-m", "sr_jax.cli", "serve", "--port", str(self.port), *args],
                                        env=env, stdout=self.log, stderr=subprocess.STDOUT, cwd=log_path.parent)
        self.client = RewardClient(f"http://127.0.0.1:{self.port}", timeout=120, retries=0)

    def wait_ready(self, timeout=120.0) -> dict:
        deadline = time.monotonic() + timeout
        while self.process.poll() is None and time.monotonic() < deadline:
            try:
                return self.client.wait_until_ready(timeout=0.5)
            except TimeoutError:
                continue
        raise AssertionError(f"server not ready (exit code {self.process.poll()}):\n{self.log_path.read_text()}")

    def terminate(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=30)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.log.close()


def test_cli_serves_and_stops_on_sigterm(tmp_path):
    args = ["--model", str(tmp_path), "--max-batch", "4", "--scorer-factory", "test_serve:make_pixel_scorer",
            "--option", "max_batch_size=2"]
    with ServeProcess(args, tmp_path / "serve.log") as served:
        assert served.wait_ready()["max_batch"] == 2
        original, edited = edit_pair(4)
        assert served.client.score([original], [edited], ["cli"]) == direct([original], [edited], ["cli"])
        assert served.terminate() == 0


def test_request_options_allowlist():
    scorer = PixelScorer()
    with BackgroundServer(scorer, ServeConfig(port=0, request_options=["mode"])) as server:
        assert RewardClient(server.url, retries=0).health()["options"] == ["mode"]
        code, answer = post(server.url, _body(options={"grounding_weight": 0.5}))
        assert code == 400 and "unknown option(s) ['grounding_weight']; accepted: ['mode']" in answer["error"]
        code, answer = post(server.url, _body(options={"mode": "min_geometric"}))
        assert code == 200 and answer["results"] == direct([edit_pair(0)[0]], [edit_pair(0)[1]], ["fine"],
                                                            mode="min_geometric")


# ---------------------------------------------------------------- issue 16: hardening

@functools.cache
def big_png(side: int, seed: int = 0) -> bytes:
    """A side x side PNG that compresses to a few KB: the memory-amplification payload."""
    pixels = np.zeros((side, side, 3), np.uint8)
    pixels[seed % side, :] = 255
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=9)
    return buffer.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_memory_budget_refuses_from_headers_and_reserves_until_done():
    """Point 1: the cost of a request is known from image headers before decoding; one too big for
    a request is 413, one that does not fit beside the work in flight is 429 with Retry-After, and
    the reservation lasts until the model is done with the images."""
    scorer = PixelScorer()
    config = ServeConfig(port=0, max_wait_ms=0, max_image_pixels=4096 * 4096, max_request_pixels=10**9,
                         memory_budget_mb=48, max_request_mb=36, request_timeout_s=10, retry_after_s=0.2)
    with BackgroundServer(scorer, config) as server:
        client = RewardClient(server.url, timeout=10, retries=0)
        # (4 + 40) B/px * 4 Mpx > 36 MB: refused from the header; the pixel data is garbage, so a
        # decoder that ran first would have said "corrupt" instead.
        header_only = big_png(2048)[:200]
        code, answer = post(server.url, _body([_item(edited=_b64(header_only))]))
        assert (code, answer["reason"]) == (413, "too_large") and "max_request_mb=36" in answer["error"], answer
        # 600x600 px x 44 B x 2 images = 30.2 MB: fits alone; holds the model at the gate.
        frame = _b64(big_png(600))
        with ThreadPoolExecutor(3) as pool:
            held = pool.submit(post, server.url, _body([_item(original=frame, edited=frame, instruction="gate")]))
            while not scorer.calls:
                time.sleep(0.01)
            assert server.server.budget.used >= 2 * 600 * 600 * 44
            import urllib.request
            request = urllib.request.Request(server.url + "/v1/score", method="POST", data=_body(
                [_item(original=frame, edited=_b64(big_png(600, seed=5)), instruction="second")]))
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(request, timeout=10)
            answer = json.loads(err.value.read())
            assert err.value.code == 429 and err.value.headers["Retry-After"] == "0.2" and \
                answer["reason"] == "memory_busy" and "memory budget busy" in answer["error"], answer
            # Small requests still fit beside it and are queued; a patient client retries its 429s
            # (waiting Retry-After each time) until the held request is done.
            small = pool.submit(client.score, [edit_pair(1)[0]], [edit_pair(1)[1]], ["small"])
            patient = RewardClient(server.url, timeout=10, retries=20, backoff=0.01)
            retried = pool.submit(patient.score, [Image.open(io.BytesIO(big_png(600)))],
                                  [Image.open(io.BytesIO(big_png(600, 3)))], ["retried"])
            time.sleep(0.5)
            assert not retried.done()
            scorer.gate.set()
            assert held.result(10)[0] == 200 and small.result(10)[0]["instruction"] == "small"
            assert retried.result(10)[0]["instruction"] == "retried"
        assert server.server.budget.used == 0
        text = client.metrics()
        assert metric(text, "sr_jax_memory_reserved_bytes") == 0
        assert metric(text, "sr_jax_memory_budget_bytes") == 48 * 1024 * 1024
        assert metric(text, "sr_jax_score_errors_total", 'reason="memory_busy"') >= 3  # the 429 above + retries


def test_json_depth_skips_strings_and_escapes():
    from sr_jax.serve.protocol import json_depth, load_json

    assert json_depth(b'{"items": [{"original": ["a", "b"]}]}') == 4
    assert json_depth(rb'{"a": "[[[[\"[[[{{{", "b": ["\\"]}') == 2  # brackets in strings, escaped quotes
    assert json_depth(b"[" * 20 + b"]" * 20) == 20 and json_depth(b"[" * (3 << 20)) > 16
    assert load_json(b'{"seed": 123, "w": -0.5e3}') == {"seed": 123, "w": -500.0}
    for bad in (b'{"x": 1e999}', b'{"x": -Infinity}', b'{"x": ' + b"1" * 33 + b"}"):
        with pytest.raises(Exception) as err:
            load_json(bad)
        assert getattr(err.value, "status", None) == 400 and err.value.reason == "json_number"


def test_default_budget_is_sized_to_the_machine():
    from sr_jax.serve.protocol import machine_memory_bytes

    total, per_request = ServeConfig().budget_bytes()
    assert total == machine_memory_bytes() // 4 and per_request == total // 4
    assert ServeConfig(memory_budget_mb=10, max_request_mb=50).budget_bytes() == (10 << 20, 10 << 20)
    with pytest.raises(ValueError, match="memory_budget_mb"):
        ServeConfig(memory_budget_mb=float("nan"))


def _raw_post(port: int, body: bytes, content_length: int | None = None) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % (len(body) if content_length is None else content_length) + body)
    return sock


def test_abandoned_requests_are_cancelled_not_scored():
    """Point 3 (and 2's timeout): a caller that times out or disconnects has its queued items
    dropped and its running rows discarded, counted as cancelled; the client does not resend."""
    scorer = PixelScorer()
    with BackgroundServer(scorer, ServeConfig(port=0, max_batch=4, max_wait_ms=0, request_timeout_s=10)) as server:
        client = RewardClient(server.url, timeout=10, retries=0)
        before = client.metrics()
        impatient = RewardClient(server.url, timeout=0.3, retries=3, backoff=0.01)
        pair = edit_pair(2)
        with ThreadPoolExecutor(3) as pool:
            running = pool.submit(impatient.score, [pair[0]], [pair[1]], ["gate"])  # on the model, then gone
            while not scorer.calls:
                time.sleep(0.01)
            queued = pool.submit(impatient.score, [pair[0]] * 3, [pair[1]] * 3, ["queued"] * 3)  # gone while queued
            timed = RewardClient(server.url, timeout=10, retries=3, request_timeout_s=0.2)
            with pytest.raises(RewardServerError) as err:  # the server's own timeout: 504, not resent
                timed.score([pair[0]], [pair[1]], ["timed out"])
            assert err.value.status == 504
            for future in (running, queued):
                with pytest.raises(RewardServerError) as err:
                    future.result(10)
                assert err.value.status == 0 and "not retried" in err.value.message
            deadline = time.monotonic() + 5
            while metric(client.metrics(), "sr_jax_items_cancelled_total") < 5 and time.monotonic() < deadline:
                time.sleep(0.02)
            scorer.gate.set()
            start = time.monotonic()
            assert client.score([pair[0]], [pair[1]], ["fresh"])[0]["instruction"] == "fresh"
            assert time.monotonic() - start < 2
        after = client.metrics()
        assert [c for c in scorer.calls if c[0] != 1] == []  # the 3 queued items never reached the model
        assert len(scorer.calls) == 2  # the gate call and the fresh one
        assert metric(after, "sr_jax_items_cancelled_total") - metric(before, "sr_jax_items_cancelled_total") == 5
        assert metric(after, "sr_jax_items_scored_total") - metric(before, "sr_jax_items_scored_total") == 1
        assert metric(after, "sr_jax_score_requests_total", 'code="499"') == 2  # each sent once
        assert metric(after, "sr_jax_score_requests_total", 'code="504"') == 1
        assert metric(after, "sr_jax_queue_depth") == 0


def test_running_call_stops_once_its_callers_are_gone(served):
    """Point 2: the request timeout cancels the work itself: a model call whose every caller has
    gone is told to stop (`should_stop`), so the next request does not wait for it."""
    server, scorer = served
    client = RewardClient(server.url, timeout=10, retries=0)
    before = client.metrics()
    pair = edit_pair(8)
    code, answer = post(server.url, _body([_item(instruction="spin")], timeout_s=0.3,
                                          options={"should_stop": True}))
    assert code == 400 and "should_stop" in answer["error"]  # the hook is the server's, not an option
    start = time.monotonic()
    with pytest.raises(RewardServerError) as err:
        RewardClient(server.url, timeout=10, retries=0, request_timeout_s=0.3).score([pair[0]], [pair[1]], ["spin"])
    assert err.value.status == 504
    assert client.score([pair[0]], [pair[1]], ["next"])[0]["instruction"] == "next"
    assert time.monotonic() - start < 1.5 and scorer.spun < 1.0
    after = client.metrics()
    assert metric(after, "sr_jax_items_cancelled_total") - metric(before, "sr_jax_items_cancelled_total") == 1


def test_client_retries_only_what_may_succeed(served):
    server, scorer = served
    client = RewardClient(server.url, timeout=10, retries=3, backoff=0.01)
    before = client.metrics()
    pair = edit_pair(3)
    with pytest.raises(RewardServerError) as err:
        client.score([pair[0]], [pair[1]], ["boom"])
    assert err.value.status == 500
    after = client.metrics()
    assert metric(after, "sr_jax_score_requests_total", 'code="500"') - \
        metric(before, "sr_jax_score_requests_total", 'code="500"') == 1


def test_body_timeout_and_disconnect_mid_body(caplog):
    """Point 5: a trickling body is cut off with 408; a client leaving mid-body is one INFO line."""
    import logging

    with BackgroundServer(PixelScorer(), ServeConfig(port=0, body_timeout_s=0.3)) as server:
        sock = _raw_post(server.port, b'{"items": [', content_length=1000)
        start = time.monotonic()
        sock.settimeout(5)
        reply = sock.recv(65536)
        assert reply.startswith(b"HTTP/1.1 408") and b"body_timeout_s=0.3" in reply
        assert 0.25 < time.monotonic() - start < 2
        sock.close()
        caplog.clear()
        with caplog.at_level(logging.INFO):
            sock = _raw_post(server.port, b'{"items": [', content_length=1000)
            time.sleep(0.1)
            sock.close()
            deadline = time.monotonic() + 5
            while not any("gone" in r.getMessage() for r in caplog.records) and time.monotonic() < deadline:
                time.sleep(0.02)
        gone = [r for r in caplog.records if "gone" in r.getMessage()]
        assert len(gone) == 1 and gone[0].levelno == logging.INFO and "while sending its body" in gone[0].getMessage()
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
        code, answer = post(server.url, _body())
        assert code == 200
        assert metric(RewardClient(server.url).metrics(), "sr_jax_score_errors_total", 'reason="disconnected"') == 1


def _rss_sampler(pid: int, stop: threading.Event, peaks: list) -> None:
    import psutil

    process = psutil.Process(pid)
    while not stop.is_set():
        peaks.append(process.memory_info().rss)
        time.sleep(0.005)


def test_load_valid_and_hostile_requests_concurrently(tmp_path):
    """The issue's load test, bounded: 64 clients x 2 requests against `sr-jax serve` in its own
    process, mixing valid requests with memory-amplification bodies (16 PNGs of 2048x2048 that
    compress to ~12 KB each), medium ones that fill the budget, and malformed ones. No 500s, every
    valid request answered correctly, hostile ones refused with 4xx/429, and the server's RSS stays
    within its memory budget."""
    budget_mb = 96
    args = ["--model", str(tmp_path), "--scorer-factory", "test_serve:make_pixel_scorer", "--max-batch", "8",
            "--max-wait-ms", "5", "--memory-budget-mb", str(budget_mb), "--max-request-mb", "48",
            "--max-image-pixels", str(4096 * 4096), "--set", f"max_request_pixels={10**9}",
            "--max-items-per-request", "8", "--set", "max_images_per_request=32", "--max-body-mb", "2"]
    bomb = _b64(big_png(2048))
    amplification = json.dumps({"items": [{"original": bomb, "edited": bomb, "instruction": "amp"}] * 8}).encode()
    medium = json.dumps({"items": [{"original": _b64(big_png(720)), "edited": _b64(big_png(720, 7)),
                                    "instruction": "medium"}]}).encode()
    hostile = [amplification, MALFORMED["deep_nesting"][0], MALFORMED["huge_int"][0], MALFORMED["nan_option"][0],
               MALFORMED["truncated_png"][0], MALFORMED["gif_refused"][0], _body(timeout_s=10**30)]
    pairs = [edit_pair(4000 + k) for k in range(64)]
    with ServeProcess(args, tmp_path / "serve.log") as served:
        served.wait_ready()
        url = f"http://127.0.0.1:{served.port}"
        warm = RewardClient(url, timeout=30, retries=0)
        warm.score([pairs[0][0]], [pairs[0][1]], ["warm"])
        post(url, medium, timeout=30)
        baseline = __import__("psutil").Process(served.process.pid).memory_info().rss
        stop, peaks = threading.Event(), []
        sampler = threading.Thread(target=_rss_sampler, args=(served.process.pid, stop, peaks))
        sampler.start()

        def one_client(k: int):
            out = []
            if k % 2 == 0:  # a valid caller: retries 429/503 as a trainer would
                client = RewardClient(url, timeout=60, retries=50, backoff=0.02, max_backoff=0.2)
                for r in range(2):
                    text = f"client {k} request {r}"
                    got = client.score([pairs[k][0]], [pairs[k][1]], [text])
                    out.append(("valid", got == direct([pairs[k][0]], [pairs[k][1]], [text])))
            else:
                for r in range(2):
                    body = medium if (k + r) % 4 == 1 else hostile[(k // 2 + r) % len(hostile)]
                    code, answer = post(url, body, timeout=60)
                    out.append(("medium" if body is medium else "hostile", code, answer.get("reason")))
            return out

        start = time.monotonic()
        try:
            with ThreadPoolExecutor(64) as pool:
                outcomes = [o for out in pool.map(one_client, range(64)) for o in out]
        finally:
            stop.set()
            sampler.join()
        elapsed = time.monotonic() - start
        metrics_text = warm.metrics()
        assert served.terminate() == 0
    valid = [o for o in outcomes if o[0] == "valid"]
    assert len(valid) == 64 and all(ok for _, ok in valid)  # every valid request answered, correctly
    hostile_codes = [(code, reason) for kind, code, reason in (o for o in outcomes if o[0] == "hostile")]
    medium_codes = [code for kind, code, _ in (o for o in outcomes if o[0] == "medium")]
    assert hostile_codes and all(400 <= code < 500 for code, _ in hostile_codes), hostile_codes
    assert ("too_large" in {r for _, r in hostile_codes})  # the amplification request, from its headers
    assert medium_codes and set(medium_codes) <= {200, 429}, medium_codes
    assert metric(metrics_text, "sr_jax_score_requests_total", 'code="500"') == 0
    assert metric(metrics_text, "sr_jax_memory_reserved_bytes") == 0
    growth = (max(peaks) - baseline) / 2**20
    print(f"64 clients: {len(outcomes)} requests in {elapsed:.1f} s; medium {sorted(medium_codes)}; "
          f"server RSS {baseline / 2**20:.0f} MB -> peak {max(peaks) / 2**20:.0f} MB (+{growth:.0f} MB, "
          f"budget {budget_mb} MB)")
    assert growth < budget_mb, growth


# ---------------------------------------------------------------- the real Scorer on a tiny model

@pytest.fixture(scope="module")
def tiny_scorer(tiny_hf_dir):
    from sr_jax.reward.scorer import Scorer

    return Scorer.from_pretrained(tiny_hf_dir, max_new_tokens=8, batch_size=4, max_pixels=64 * 64), tiny_hf_dir


@pytest.mark.slow
def test_real_scorer_over_http_matches_direct_call(tiny_scorer):
    scorer, _ = tiny_scorer
    pairs = [edit_pair(50 + s, size=(64, 64)) for s in range(3)]
    originals = [[p[0]] for p in pairs]
    edited = [p[1] for p in pairs]
    texts = ["add a box", "paint the corner", "brighten the square"]
    options = {"grounding_weight": 0.3, "mode": "min_geometric"}
    expected = json.loads(json.dumps(to_jsonable(scorer.score(originals, edited, texts, **options))))
    assert all(r["raw"]["sc"] for r in expected)  # the tiny model did generate text
    with BackgroundServer(scorer, ServeConfig(port=0, max_wait_ms=200, request_timeout_s=120)) as server:
        client = RewardClient(server.url, timeout=120, retries=0)
        assert client.health()["max_batch"] == scorer.max_batch_size == 2
        with ThreadPoolExecutor(3) as pool:  # three callers, batched by the server
            got = list(pool.map(lambda i: client.score([originals[i]], [edited[i]], [texts[i]], **options)[0],
                                range(3)))
        assert got == expected
        assert client.score(originals, edited, texts, **options) == expected  # one request, split in two calls
        code, answer = post(server.url, _body(options={"max_new_tokens": "many"}))
        assert code == 400 and "options.max_new_tokens: expected int" in answer["error"]
        code, answer = post(server.url, _body(options={"temprature": 0.5}))
        assert code == 400 and "unknown key(s) ['temprature']" in answer["error"]
        batches = metric(client.metrics(), "sr_jax_batch_size_count")
        assert 2 <= batches < 5, batches  # 3 single-item requests share calls, then the 3-item one takes 2


@pytest.mark.slow
def test_cli_serves_the_real_scorer(tiny_scorer, tmp_path):
    scorer, model_dir = tiny_scorer
    args = ["--model", str(model_dir), "--option", "max_new_tokens=8", "--option", "batch_size=4",
            "--option", f"max_pixels={64 * 64}", "--set", "request_options=[grounding_weight]"]
    original, edited = edit_pair(60, size=(64, 64))
    expected = json.loads(json.dumps(to_jsonable(scorer.score([[original]], [edited], ["cli"], grounding_weight=0.2))))
    with ServeProcess(args, tmp_path / "serve.log") as served:
        health = served.wait_ready()
        assert health["max_batch"] == 2 and health["options"] == ["grounding_weight"]
        assert served.client.score([original], [edited], ["cli"], grounding_weight=0.2) == expected
        assert served.terminate() == 0


def test_real_scorer_refuses_what_it_cannot_honour_before_the_model(tiny_scorer):
    """Points 2, 4, 5 against the real Scorer: the max_new_tokens cap, load-time options, unbounded
    numbers and image shapes the processor cannot resize are 400s naming the key, and none of
    them reaches the model (no model call is made at all)."""
    scorer, _ = tiny_scorer
    assert scorer.options.max_new_tokens == 8
    scorer.check_image_size(200, 1)
    with pytest.raises(ValueError, match="aspect ratio"):
        scorer.check_image_size(201, 1)
    wide = png_b64(Image.new("RGB", (400, 1)))
    raw = _body().decode()
    cases = [
        (_body(options={"max_new_tokens": 20000}), "options.max_new_tokens: 20000 exceeds this server's cap of 8"),
        (_body(options={"max_new_tokens": 9}), "cap of 8 (max_new_tokens_cap)"),
        (_body(options={"templates": {"sc": "x"}}), "options.templates: set when the model is loaded"),
        (_body(options={"min_pixels": 100}), "options.min_pixels: set when the model is loaded"),
        (_body(options={"max_pixels": 10**6}), "options.max_pixels: set when the model is loaded"),
        (_body(options={"dtype": "bfloat16"}), "options.dtype: set when the model is loaded"),
        (_body(options={"temprature": 0.5}), "unknown key(s) ['temprature']"),
        (_body(options={"seed": 2**80}), "seed must be in [0, 2**32)"),
        (_body(options={"score_range": 1e300}), "score_range must be in (0, 1e6]"),
        (_body(options={"temperature": 1e9}), "temperature must be in [0, 100]"),
        (_body(options={"top_k": 2**20}), "options.top_k: 1048576 exceeds the vocabulary"),
        (raw.replace('{"items"', '{"options": {"w1": NaN}, "items"').encode(), "NaN is not a JSON number"),
        (raw.replace('{"items"', '{"options": {"score_range": Infinity}, "items"').encode(), "Infinity is not"),
        (_body([_item(), _item(edited=wide)]), "items[1].edited: 400x1 image cannot be scored: aspect ratio 400.0"),
    ]
    with BackgroundServer(scorer, ServeConfig(port=0, max_wait_ms=0, request_timeout_s=30)) as server:
        for body, message in cases:
            code, answer = post(server.url, body)
            assert code == 400 and message in answer["error"], (message, answer)
        assert RewardClient(server.url).health()["limits"]["max_new_tokens"] == 8
        text = RewardClient(server.url).metrics()
        assert metric(text, "sr_jax_batch_size_count") == 0
        assert metric(text, "sr_jax_score_errors_total", 'reason="image_shape"') == 1
        assert metric(text, "sr_jax_score_errors_total", 'reason="bad_option"') == 11
    # The direct API never ignores them either.
    original, edited = edit_pair(1, size=(64, 64))
    with pytest.raises(ValueError, match="options.dtype: fixed when the scorer was built"):
        scorer.score([[original]], [edited], ["x"], dtype="bfloat16")
