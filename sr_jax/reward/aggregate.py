"""The reward formula: SC and PQ score pairs -> one scalar reward.

`aggregate` / `aggregate_batch` combine the two score pairs into the scalar reward; the settings
they read (mode, w1..w4, a, score range, clamp) are one `RewardWeights`, which the scorer, the
server (through the scorer's options) and evaluation build instead of passing the numbers around.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

from sr_jax.reward.parse import SCORE_RANGE

AGGREGATION_MODES = ("weighted", "min_geometric", "mean")


@dataclasses.dataclass(frozen=True)
class RewardWeights:
    """Everything `aggregate` needs besides the scores and grounding; the defaults are the
    official ones. `clamp=False` is the official evaluation's arithmetic (no cap at 10), which
    goes with the `official_eval` reading (`for_parse_mode`).

    The scorer's options, the server's request options and `sr-jax score/eval --set` keep these
    fields flat under the same names (`OPTION_KEYS`); `clamp` is not an option of its own there,
    it follows the parse mode."""

    mode: str = "weighted"
    w1: float = 0.6
    w2: float = 0.4
    w3: float = 0.5
    w4: float = 0.5
    a: float = 0.8
    score_range: float = SCORE_RANGE
    clamp: bool = True

    @classmethod
    def of(cls, weights: "RewardWeights | str | None" = None, **settings: Any) -> "RewardWeights":
        """`weights` (a mode name stands for RewardWeights(mode=...)) with `settings` replacing
        fields; an unknown setting is a TypeError, as an unknown keyword would be."""
        if isinstance(weights, str):
            weights = cls(mode=weights)
        elif weights is None:
            weights = cls()
        elif not isinstance(weights, cls):
            raise TypeError(f"weights: expected RewardWeights, a mode name or None, got {type(weights).__name__}")
        unknown = sorted(set(settings) - set(_WEIGHT_FIELDS))
        if unknown:
            raise TypeError(f"unknown reward setting(s) {unknown}; known: {list(_WEIGHT_FIELDS)}")
        return dataclasses.replace(weights, **settings) if settings else weights

    @classmethod
    def from_options(cls, options: Any, clamp: bool | None = None) -> "RewardWeights":
        """From any object or mapping holding some of `OPTION_KEYS` (scorer options, an eval
        config); missing ones keep their defaults. `clamp=None` derives it from a `parse_mode`
        there (`for_parse_mode`), else keeps the default."""
        get = options.get if isinstance(options, Mapping) else lambda k, d=None: getattr(options, k, d)
        found = {k: get(k) for k in OPTION_KEYS if get(k) is not None}
        if clamp is None and get("parse_mode") is not None:
            clamp = clamp_for_parse_mode(get("parse_mode"))
        return cls(**found, **({} if clamp is None else {"clamp": clamp}))

    def options(self) -> dict:
        """The option-named fields (without clamp), e.g. for `sr-jax eval` benchmarks."""
        return {k: getattr(self, k) for k in OPTION_KEYS}

    def option_errors(self) -> list[str]:
        """Bounds for request/CLI options, so a bad one is the caller's error (HTTP 400), not a
        model failure. Comparisons are False for NaN, so NaN fails each of them."""
        checks = [
            (self.mode in AGGREGATION_MODES, f"mode must be one of {AGGREGATION_MODES}"),
            (0 <= self.a <= 1, "a must be in [0, 1]"),
            (0 < self.score_range <= 1e6, "score_range must be in (0, 1e6]"),
        ] + [(-1e6 <= getattr(self, w) <= 1e6, f"{w} must be a finite number in [-1e6, 1e6]")
             for w in ("w1", "w2", "w3", "w4")]
        return [msg for ok, msg in checks if not ok]


_WEIGHT_FIELDS = tuple(f.name for f in dataclasses.fields(RewardWeights))
OPTION_KEYS = tuple(k for k in _WEIGHT_FIELDS if k != "clamp")  # as scorer options / eval settings name them


def clamp_for_parse_mode(parse_mode: str) -> bool:
    """The official evaluation scripts cap nothing; every other reading caps SC, PQ at 10."""
    return parse_mode != "official_eval"


def _pairs(values: Any, name: str) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: expected numbers, got {values!r}") from exc
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"{name}: expected pairs of scores (shape [N, 2]), got shape {arr.shape}")
    bad = np.flatnonzero(~np.isfinite(arr).all(axis=1))
    if bad.size:
        raise ValueError(f"{name}: row {int(bad[0])} is not finite: {arr[bad[0]].tolist()}")
    return arr


def aggregate_batch(
    sc_scores: Any,
    pq_scores: Any,
    weights: RewardWeights | str | None = None,
    *,
    grounding: Any = None,
    grounding_weight: float = 0.0,
    **settings: Any,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vectorised `aggregate` for N answers: sc_scores and pq_scores are [N, 2]; returns three
    float64 arrays of shape [N] (reward, SC, PQ). See `aggregate` for the formula and arguments."""
    w = RewardWeights.of(weights, **settings)
    mode, a, score_range = w.mode, w.a, w.score_range
    if mode not in AGGREGATION_MODES:
        raise ValueError(f"mode must be one of {AGGREGATION_MODES}, got {mode!r}")
    if not score_range > 0:
        raise ValueError(f"score_range must be positive, got {score_range!r}")
    if not 0.0 <= a <= 1.0:
        raise ValueError(f"a must lie in [0, 1], got {a!r}")
    if not 0.0 <= grounding_weight <= 1.0:
        raise ValueError(f"grounding_weight must lie in [0, 1], got {grounding_weight!r}")
    sc, pq = _pairs(sc_scores, "sc_scores"), _pairs(pq_scores, "pq_scores")
    if sc.shape != pq.shape:
        raise ValueError(f"sc_scores has {sc.shape[0]} rows but pq_scores has {pq.shape[0]}")
    unit = score_range / 10.0  # both components live on 0..10
    top = 10.0 if w.clamp else np.inf
    if mode == "weighted":
        sc_10 = np.clip((w.w1 * sc[:, 0] + w.w2 * sc[:, 1]) / unit, 0.0, top)
        pq_10 = np.clip((w.w3 * pq[:, 0] + w.w4 * pq[:, 1]) / unit, 0.0, top)
        # Bases are >= 0 after clipping, so the powers are real; numpy gives 0**x = 0 (x > 0), 0**0 = 1.
        reward = sc_10**a * pq_10 ** (1.0 - a) / 10.0
    else:
        pick = np.min if mode == "min_geometric" else np.mean
        sc_10 = np.maximum(pick(sc, axis=1) / unit, 0.0)
        pq_10 = np.maximum(pick(pq, axis=1) / unit, 0.0)
        # The official geometric modes cap the combined score, not its parts.
        reward = np.minimum(np.sqrt(sc_10 * pq_10), top) / 10.0
        sc_10, pq_10 = np.minimum(sc_10, top), np.minimum(pq_10, top)
    if grounding is not None:
        g = np.broadcast_to(np.asarray(grounding, dtype=np.float64), reward.shape)
        if not (np.isfinite(g) & (g >= 0) & (g <= 1)).all():
            raise ValueError(f"grounding must lie in [0, 1], got {np.asarray(grounding).tolist()}")
        reward = (1.0 - grounding_weight) * reward + grounding_weight * g
    return reward, sc_10, pq_10


def aggregate(
    sc_scores: Sequence[float],
    pq_scores: Sequence[float],
    weights: RewardWeights | str | None = None,
    *,
    grounding: float | None = None,
    grounding_weight: float = 0.0,
    **settings: Any,
) -> tuple[float, float, float]:
    """Scalar reward in [0, 1] from SC scores (success, overediting) and PQ scores
    (naturalness, artifacts), each on 0..score_range. Returns (reward, SC, PQ), SC and PQ on 0..10.

    The settings are a `RewardWeights` (`weights=`; a mode name in its place means that mode with
    the default weights) and/or its fields as keywords (mode, w1..w4, a, score_range, clamp),
    which override it; unset ones keep the `RewardWeights` defaults. With u = score_range / 10:

    mode "weighted" (the official weighted geometric mean; the evaluation's "weighted_power"):
        SC = (w1*s1 + w2*s2) / u,  PQ = (w3*n + w4*art) / u,  each clamped to [0, 10];
        reward = SC**a * PQ**(1 - a) / 10      (a zero component gives a zero reward, never NaN)
    mode "min_geometric" (the official min geometric mean; the evaluation's "min"):
        SC = min(s1, s2) / u,  PQ = min(n, art) / u;  reward = min(sqrt(SC * PQ), 10) / 10
    mode "mean" (the evaluation's "mean"):
        SC = (s1 + s2) / 2 / u,  PQ = (n + art) / 2 / u;  reward = min(sqrt(SC * PQ), 10) / 10
    In the two geometric modes the exponent is 0.5 and `a`, w1..w4 are unused (as officially);
    SC and PQ are floored at 0 and reported capped at 10.
    `clamp=False` drops every cap at 10, the official evaluation scripts' arithmetic (they cap
    nothing); scores above score_range then give a reward above 1. Negative parts are still
    floored at 0 (the official code would fail on them).

    If `grounding` (a pixel-grounding score in [0, 1]) is given, the reward becomes
    (1 - grounding_weight) * reward + grounding_weight * grounding; without it grounding_weight
    is ignored, so a scorer can keep one setting for answers with and without a reference image.
    Non-finite scores, a bad mode or out-of-range weights raise ValueError.
    """
    reward, sc, pq = aggregate_batch(
        [sc_scores], [pq_scores], weights, grounding=None if grounding is None else [grounding],
        grounding_weight=grounding_weight, **settings,
    )
    return float(reward[0]), float(sc[0]), float(pq[0])
