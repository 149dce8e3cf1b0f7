"""Reward functions for GRPO: plain callables `(record, completion, parsed) -> float | None`.

`record` is the prompt's `SpatialExample` (with its ground truth, when it has one), `completion`
the decoded answer and `parsed` its `sr_jax.reward.parse_output` reading. None means "does not
apply to this record" (e.g. box IoU on a PQ prompt): it adds 0 to the total, which leaves the
group's advantages untouched since every completion of a prompt gets the same None, and it is
left out of that function's mean in the metrics.

Built-in functions (configure by name in YAML, `options` go to the factory):
  format       1 if the answer is strict JSON in the task's schema, else 0 (`allow_think: true`
               accepts a leading <think>...</think> block, as Qwen3-VL's thinking layout emits)
  iou          mean IoU of predicted vs true boxes after Hungarian matching (SC with ground truth;
               unmatched boxes count 0, both lists empty = 1)
  score_error  1 - mean |predicted - true| / score_range over the two scores
  empty_list   1 if "no region" agrees with the truth (the failed-edit case), else 0 (SC)
  grounding    F1 of box precision and changed-pixel coverage (`sr_jax.reward.grounding`; SC, needs
               the original and edited images only)
  judge        an external evaluator over HTTP (`JudgeReward`), with a timeout and a fallback

A record counts as having ground truth unless `record.meta["ground_truth"]` is False (prompts
imported without answers, `sr-jax data import --format grpo-json`) or it is a verbatim record whose
answer was not parsed. The rewards in GROUND_TRUTH_REWARDS need it: `check_rewards_against_data`
refuses a config that uses them on prompt sources without any (before the model is built).
"""

from __future__ import annotations

import base64
import collections
import hashlib
import importlib
import json
import logging
import math
import re
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import numpy as np

from sr_jax.data.image import open_image
from sr_jax.data.records import BOX_GRID, RecordError, SCORE_RANGE, SpatialExample
from sr_jax.eval.metrics import match_boxes
from sr_jax.reward.grounding import changed_mask, grounding_report

log = logging.getLogger(__name__)

RewardFn = Callable[[SpatialExample, str, dict], "float | None"]


def has_ground_truth(record: SpatialExample) -> bool:
    if record.meta.get("ground_truth", True) is False:
        return False
    return not (record.meta.get("verbatim") and not record.meta.get("answer_parsed"))


# ---- format ---------------------------------------------------------------------------------

def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _valid_region(r) -> bool:
    if not isinstance(r, dict) or set(r) != {"id", "label", "bbox_2d"}:
        return False
    box = r["bbox_2d"]
    return (isinstance(r["label"], str) and isinstance(box, list) and len(box) == 4
            and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= BOX_GRID for v in box)
            and box[0] < box[2] and box[1] < box[3])


_LEADING_THINK = re.compile(r"\s*<think>.*?</think>", re.S)


def format_reward(record: SpatialExample, completion: str, parsed: dict, score_range: float = SCORE_RANGE,
                  allow_think: bool = False) -> float:
    """Strict schema: the whole completion is one JSON object with exactly the task's keys (after
    one leading think block, with `allow_think`)."""
    if allow_think:
        m = _LEADING_THINK.match(completion)
        completion = completion[m.end():] if m else completion
    try:
        answer = json.loads(completion.strip())
    except ValueError:
        return 0.0
    keys = {"reasoning", "score"} | ({"edit_region"} if record.task == "sc" else set())
    if not isinstance(answer, dict) or set(answer) != keys or not isinstance(answer["reasoning"], str):
        return 0.0
    score = answer["score"]
    if not (isinstance(score, list) and len(score) == 2 and all(_is_number(s) and 0 <= s <= score_range for s in score)):
        return 0.0
    if record.task == "sc":
        regions = answer["edit_region"]
        if not isinstance(regions, list) or not all(_valid_region(r) for r in regions):
            return 0.0
    return 1.0


# ---- verifiable rewards against ground truth -------------------------------------------------

def iou_reward(record: SpatialExample, completion: str, parsed: dict) -> float | None:
    if record.task != "sc" or not has_ground_truth(record):
        return None
    predicted = [r["bbox_2d"] for r in parsed.get("edit_region", [])]
    truth = [list(r.bbox_2d) for r in record.edit_region]
    return float(match_boxes(predicted, truth)["mean_iou"])


def score_error_reward(record: SpatialExample, completion: str, parsed: dict,
                       score_range: float = SCORE_RANGE) -> float | None:
    if not has_ground_truth(record):
        return None
    error = np.abs(np.asarray(parsed["score"], np.float64) - np.asarray(record.score, np.float64)).mean()
    return float(1.0 - min(error / score_range, 1.0))


def empty_list_reward(record: SpatialExample, completion: str, parsed: dict) -> float | None:
    if record.task != "sc" or not has_ground_truth(record):
        return None
    return float((len(parsed.get("edit_region", [])) == 0) == (len(record.edit_region) == 0))


# ---- pixel grounding ------------------------------------------------------------------------

class GroundingReward:
    """`grounding_score` of the predicted boxes against the changed-pixel mask between the first
    original and the edited image. The mask is cached per record (G completions share it)."""

    def __init__(self, cache_size: int = 256, **mask_options):
        self.mask_options = mask_options
        self.cache_size = cache_size
        self._masks: collections.OrderedDict = collections.OrderedDict()

    def _mask(self, record: SpatialExample) -> np.ndarray:
        digest = hashlib.sha1()
        for image in (record.images[0], record.images[-1]):
            digest.update(image if isinstance(image, bytes) else str(image).encode())
        key = (record.id, digest.hexdigest())
        if key not in self._masks:
            self._masks[key] = changed_mask(open_image(record.images[0]), open_image(record.images[-1]),
                                            **self.mask_options)
            if len(self._masks) > self.cache_size:
                self._masks.popitem(last=False)
        return self._masks[key]

    def __call__(self, record: SpatialExample, completion: str, parsed: dict) -> float | None:
        if record.task != "sc":
            return None
        boxes = [r["bbox_2d"] for r in parsed.get("edit_region", [])]
        return float(grounding_report(self._mask(record), boxes)["grounding_score"])


# ---- external judge -------------------------------------------------------------------------

class JudgeReward:
    """POSTs JSON to `url` and reads a number from the reply's `reward_key`.

    Request: {"record_id", "task", "instruction", "completion", "parsed": {score, edit_region,
    reasoning}, "images": [base64 PNG/JPEG bytes] (only with send_images)}. A timeout, an HTTP
    error, a reply that is not JSON or has no finite number gives `fallback` (logged), so a flaky
    evaluator never stops training. `many` runs requests in `max_workers` threads.
    """

    def __init__(self, url: str, timeout_s: float = 30.0, fallback: float = 0.0, reward_key: str = "reward",
                 send_images: bool = False, headers: dict | None = None, max_workers: int = 8):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"judge url must be http(s)://..., got {url!r}")
        if timeout_s <= 0 or max_workers < 1:
            raise ValueError("judge timeout_s must be > 0 and max_workers >= 1")
        self.url, self.timeout_s, self.fallback = url, float(timeout_s), float(fallback)
        self.reward_key, self.send_images = reward_key, send_images
        self.headers = {"Content-Type": "application/json", **(headers or {})}
        self.max_workers = max_workers
        self.failures = 0

    def payload(self, record: SpatialExample, completion: str, parsed: dict) -> dict:
        body = {"record_id": record.id, "task": record.task, "instruction": record.instruction,
                "completion": completion,
                "parsed": {k: parsed.get(k) for k in ("score", "edit_region", "reasoning") if k in parsed}}
        if self.send_images:
            body["images"] = [base64.b64encode(im if isinstance(im, bytes) else open(im, "rb").read()).decode()
                              for im in record.images]
        return body

    def __call__(self, record: SpatialExample, completion: str, parsed: dict) -> float:
        data = json.dumps(self.payload(record, completion, parsed)).encode()
        request = urllib.request.Request(self.url, data=data, headers=self.headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as reply:
                value = json.loads(reply.read())[self.reward_key]
            value = float(value)
            if not math.isfinite(value):
                raise ValueError(f"non-finite reward {value}")
            return value
        except (OSError, ValueError, KeyError, TypeError, urllib.error.URLError) as e:
            # socket.timeout / TimeoutError are OSErrors; json errors are ValueErrors
            self.failures += 1
            log.warning("judge %s failed for %s (%s: %s); using fallback %g", self.url, record.id,
                        type(e).__name__, e, self.fallback)
            return self.fallback

    def many(self, items: Sequence[tuple[SpatialExample, str, dict]]) -> list[float]:
        with ThreadPoolExecutor(self.max_workers) as pool:
            return list(pool.map(lambda item: self(*item), items))


REWARD_FUNCTIONS: dict[str, Callable[..., RewardFn]] = {
    "format": lambda **o: (lambda r, c, p: format_reward(r, c, p, **o)),
    "iou": lambda: iou_reward,
    "score_error": lambda **o: (lambda r, c, p: score_error_reward(r, c, p, **o)),
    "empty_list": lambda: empty_list_reward,
    "grounding": GroundingReward,
    "judge": JudgeReward,
}


class RewardDataError(ValueError):
    """The configured rewards cannot score the configured prompt data."""


# Rewards that compare the completion with the record's true answer (None on records without one).
GROUND_TRUTH_REWARDS = ("iou", "score_error", "empty_list")


def sample_ground_truth(names, sources, per_source: int = 8) -> list[tuple[str, int, int]]:
    """(source spec, records sampled, how many have ground truth) for each prompt source, from up to
    `per_source` records spread over it (prompt files are uniform: imported all one way)."""
    out = []
    for spec, part in zip(names, sources.parts):
        n = len(part)
        picks = sorted({int(i) for i in np.linspace(0, n - 1, min(n, per_source))}) if n else []
        seen = with_truth = 0
        for index in picks:
            try:
                record = part.fetch(index)
            except RecordError:
                continue  # counted and skipped when the stream reaches it
            seen += 1
            with_truth += has_ground_truth(record)
        out.append((spec, seen, with_truth))
    return out


def check_rewards_against_data(specs, names, sources) -> None:
    """Refuses (RewardDataError naming the reward) a reward that needs ground truth when no prompt
    source has any: it would score nothing, silently. Warns when only some sources lack it.
    `specs`: the RewardSpecs; `names`: the source specs in the order of `sources.parts`."""
    needing = [s.name for s in specs if s.name in GROUND_TRUTH_REWARDS and float(s.weight) != 0.0]
    if not needing:
        return
    sampled = sample_ground_truth(names, sources)
    without = [spec for spec, seen, with_truth in sampled if seen and not with_truth]
    if without and len(without) == len([1 for _, seen, _ in sampled if seen]):
        listed = ", ".join(repr(n) for n in needing)
        raise RewardDataError(
            f"reward {listed} needs ground-truth answers, but the prompt data has none ({', '.join(without)} "
            f"hold prompt-only records, e.g. imported with --format grpo-json). Remove it from `rewards` and "
            f"reward with the judge (and format) instead.")
    if without:
        log.warning("rewards %s need ground truth, which prompt source(s) %s lack: they score only the "
                    "other sources' prompts", needing, without)


def build_reward(name: str, options: dict | None = None) -> RewardFn:
    """A reward callable by name (REWARD_FUNCTIONS) or dotted import path `pkg.module:attr`
    (a callable used as is, or a factory when options are given)."""
    options = dict(options or {})
    if name in REWARD_FUNCTIONS:
        factory = REWARD_FUNCTIONS[name]
    elif ":" in name:
        module, _, attr = name.partition(":")
        target = getattr(importlib.import_module(module), attr)
        return target(**options) if options else target
    else:
        raise ValueError(f"unknown reward {name!r}; known: {sorted(REWARD_FUNCTIONS)} or 'module:callable'")
    try:
        return factory(**options)
    except TypeError as e:
        raise ValueError(f"reward {name!r}: bad options {options}: {e}") from None


class RewardSet:
    """Named, weighted reward functions; `score` evaluates them over a rollout."""

    def __init__(self, specs: Sequence[tuple[str, float, RewardFn]]):
        if not specs:
            raise ValueError("no reward functions configured")
        names = [n for n, _, _ in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"reward names must be unique, got {names}")
        self.specs = list(specs)

    @classmethod
    def from_config(cls, specs) -> "RewardSet":
        return cls([(s.name, float(s.weight), build_reward(s.name, s.options)) for s in specs])

    def score(self, records: Sequence[SpatialExample], completions: Sequence[str], parsed: Sequence[dict]):
        """(total (R,), {name: (R,) with NaN where the function does not apply})."""
        items = list(zip(records, completions, parsed))
        per_function = {}
        total = np.zeros(len(items), np.float64)
        for name, weight, fn in self.specs:
            values = fn.many(items) if hasattr(fn, "many") else [fn(*item) for item in items]
            arr = np.array([np.nan if v is None else float(v) for v in values], np.float64)
            per_function[name] = arr
            total += weight * np.nan_to_num(arr, nan=0.0)
        return total, per_function
