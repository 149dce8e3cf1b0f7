"""The request protocol of the reward server: its limits (`ServeConfig`), the refusals
(`RequestError` and its `reason` names), bounded JSON reading, image headers and decoding, option
checks and `parse_request`, all pure and synchronous (no aiohttp, no event loop)."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import inspect
import io
import json
import math
import os
import re
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from sr_jax.config import from_dict

ITEM_FIELDS = ("original", "edited", "instruction")
REQUEST_FIELDS = ("items", "options", "timeout_s")
_DATA_URL_PREFIX = "data:"
REASONS = {400: "bad_request", 408: "body_timeout", 413: "too_large", 429: "memory_busy", 499: "disconnected",
            500: "scorer_error", 503: "unavailable", 504: "timeout"}



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
        total = int(self.memory_budget_mb * MB) if self.memory_budget_mb else machine_memory_bytes() // 4
        per_request = int(self.max_request_mb * MB) if self.max_request_mb else total // 4
        return total, min(per_request, total)


MB = 1024 * 1024


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
        self.reason = reason or REASONS.get(status, str(status))


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
