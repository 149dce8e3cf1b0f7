"""Benchmark metrics as pure numpy functions (no model, no files).

Conventions shared by every benchmark here (`official_ranking_metrics` excepted: it reproduces
the official MER-Bench script, which breaks ties in the model's favour):
- A tie in predicted scores never counts as a correct decision (exact ranking, top-k, pairwise).
- Rank statistics use average ranks for ties (rank 1 = highest score).
- A correlation that is undefined for one item (all predictions equal) counts as 0 for that
  item: the scorer gave no ordering information. Over a whole set an undefined correlation is
  reported as None.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np


# ---------------------------------------------------------------- ranks and correlations


def average_ranks(scores: Sequence[float]) -> np.ndarray:
    """Rank 1 for the highest score; tied scores share the mean of the ranks they span."""
    s = np.asarray(scores, dtype=np.float64)
    higher = (s[None, :] > s[:, None]).sum(axis=1)
    equal = (s[None, :] == s[:, None]).sum(axis=1)
    return 1.0 + higher + (equal - 1) / 2.0


def kendall_tau_b(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b (tie-corrected); NaN when either side is constant."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"kendall_tau_b needs two equal-length vectors, got {x.shape} and {y.shape}")
    i, j = np.triu_indices(len(x), k=1)
    dx, dy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
    numerator = float((dx * dy).sum())  # concordant minus discordant
    denominator = math.sqrt(float((dx != 0).sum()) * float((dy != 0).sum()))
    return numerator / denominator if denominator > 0 else math.nan


def spearman_rho(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation of average ranks; NaN when either side is constant."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"spearman_rho needs two equal-length vectors, got {x.shape} and {y.shape}")
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))
    return float((rx * ry).sum()) / denominator if denominator > 0 else math.nan


def ndcg(scores: Sequence[float], gains: Sequence[float]) -> float:
    """NDCG of the order given by `scores` (descending) for items worth `gains`.

    Discount of position p (1-based) is 1/log2(p + 1). Items with tied scores each get the mean
    discount of the positions their tie group occupies, i.e. the expected DCG over all orders of
    the tie, so a tie is neither rewarded nor punished against a coin flip. NaN if all gains are 0.
    """
    s, g = np.asarray(scores, np.float64), np.asarray(gains, np.float64)
    discounts = 1.0 / np.log2(np.arange(2, len(s) + 2))
    higher = (s[None, :] > s[:, None]).sum(axis=1)
    equal = (s[None, :] == s[:, None]).sum(axis=1)
    cumulative = np.concatenate([[0.0], np.cumsum(discounts)])
    item_discount = (cumulative[higher + equal] - cumulative[higher]) / equal
    ideal = float((np.sort(g)[::-1] * discounts).sum())
    return float((g * item_discount).sum()) / ideal if ideal > 0 else math.nan


def _zero_if_nan(x: float) -> float:
    return 0.0 if math.isnan(x) else x


# ---------------------------------------------------------------- MER-Bench: one ranked list


def ranking_metrics(scores: Sequence[float]) -> dict:
    """Metrics for predicted `scores` of k candidates listed best first (the true order).

    exact_match    1 iff scores[0] > scores[1] > ... > scores[k-1] (any tie: 0)
    kendall_tau    tau-b between scores and the true order (0 if all scores are equal)
    spearman_rho   Spearman between scores and the true order (0 if all scores are equal)
    ndcg           NDCG with linear gains k-1-i for the i-th best (best k-1 ... worst 0)
    top1           1 iff the true best has the strictly highest score
    top2           1 iff fewer than 2 other candidates score >= the true best (ties pessimistic);
                   None for k = 2, where it is trivially 1
    position_error mean over candidates of |predicted average rank - true rank|
    """
    s = np.asarray(scores, np.float64)
    k = len(s)
    if k < 2:
        raise ValueError(f"a ranking needs at least 2 candidates, got {k}")
    if not np.isfinite(s).all():
        raise ValueError(f"ranking scores must be finite, got {s.tolist()}")
    truth = np.arange(k, 0, -1, dtype=np.float64)  # higher is better, no ties
    rivals = int((s[1:] >= s[0]).sum())  # candidates that tie or beat the true best
    return {
        "exact_match": float(bool(np.all(s[:-1] > s[1:]))),
        "kendall_tau": _zero_if_nan(kendall_tau_b(s, truth)),
        "spearman_rho": _zero_if_nan(spearman_rho(s, truth)),
        "ndcg": ndcg(s, truth - 1.0),
        "top1": float(rivals == 0),
        "top2": float(rivals < 2) if k > 2 else None,
        "position_error": float(np.abs(average_ranks(s) - np.arange(1, k + 1)).mean()),
    }


def official_ranking_metrics(scores: Sequence[float]) -> dict:
    """MER-Bench metrics as the official SpatialReward script computes them, for predicted
    `scores` of k candidates listed best first.

    The predicted order `p` lists candidate indices by descending score with a stable sort, so
    tied candidates keep their true order (a tie is resolved in the model's favour); p[i] is
    the candidate predicted at position i, and the truth is 0, 1, ..., k-1.
      exact_match    1 iff p is the truth and no two scores are equal
      kendall_tau    (concordant - discordant pairs of p) / (k(k-1)/2)
      spearman_rho   1 - 6 * sum_i (p[i] - i)^2 / (k(k^2 - 1))
      ndcg           sum_i (k - i) / log2(p[i] + 2)  /  sum_i (k - i) / log2(i + 2): gains k..1
                     by predicted position, discounted by the true index of the item placed there
      top1           1 iff p[0] == 0
      top2           1 iff {p[0], p[1]} == {0, 1} (always 1 for k = 2)
      position_error mean_i |p[i] - i|
    """
    s = np.asarray(scores, np.float64)
    k = len(s)
    if k < 2:
        raise ValueError(f"a ranking needs at least 2 candidates, got {k}")
    if not np.isfinite(s).all():
        raise ValueError(f"ranking scores must be finite, got {s.tolist()}")
    p = np.argsort(-s, kind="stable")
    truth = np.arange(k)
    i, j = np.triu_indices(k, k=1)
    order = np.sign(p[j] - p[i])  # the truth increases along i < j
    positions = np.arange(k, 0, -1, dtype=np.float64)  # gains k, k-1, ..., 1
    return {
        "exact_match": float(bool((p == truth).all() and len(np.unique(s)) == k)),
        "kendall_tau": float(order.sum()) / (k * (k - 1) / 2),
        "spearman_rho": 1.0 - 6.0 * float(((p - truth) ** 2).sum()) / (k * (k * k - 1)),
        "ndcg": float((positions / np.log2(p + 2.0)).sum() / (positions / np.log2(truth + 2.0)).sum()),
        "top1": float(p[0] == 0),
        "top2": float(set(p[:2].tolist()) == {0, 1}),
        "position_error": float(np.abs(p - truth).mean()),
    }


def mean_metrics(rows: Iterable[dict], keys: Sequence[str]) -> dict:
    """Mean of each key over rows, skipping None values; `n` counts the rows. A key with no
    values gives None."""
    rows = list(rows)
    out: dict = {"n": len(rows)}
    for key in keys:
        values = [r[key] for r in rows if r.get(key) is not None]
        out[key] = float(np.mean(values)) if values else None
    return out


def grouped(rows: Sequence[dict], field: str, keys: Sequence[str]) -> dict:
    """{value of `field`: mean_metrics of the rows with that value}, values sorted."""
    groups: dict = {}
    for r in rows:
        groups.setdefault(str(r[field]), []).append(r)
    return {name: mean_metrics(groups[name], keys) for name in sorted(groups)}


# ---------------------------------------------------------------- pairwise


def pairwise_correct(first: float, second: float) -> bool:
    """The first candidate is the preferred one: correct iff it scores strictly higher."""
    return bool(first > second)


# ---------------------------------------------------------------- boxes


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two [x1, y1, x2, y2] boxes (0 when they do not overlap or have no area)."""
    ax1, ay1, ax2, ay2 = (float(v) for v in a)
    bx1, by1, bx2, by2 = (float(v) for v in b)
    iw = max(0.0, min(ax2, bx2) - max(ax1, bx1))
    ih = max(0.0, min(ay2, by2) - max(ay1, by1))
    inter = iw * ih
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    return inter / union if union > 0 else 0.0


def _assignment(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Minimum-cost assignment on a rectangular matrix (scipy when present)."""
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:
        return hungarian(cost)
    return linear_sum_assignment(cost)


def hungarian(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Minimum-cost assignment (rows, cols), min(n, m) pairs, for an n x m cost matrix.

    Shortest augmenting paths with potentials (Jonker-Volgenant style), O(n^2 m); a fallback
    for when scipy is missing, and the matrices here are a few boxes wide.
    """
    cost = np.asarray(cost, np.float64)
    transposed = cost.shape[0] > cost.shape[1]
    if transposed:
        cost = cost.T
    n, m = cost.shape
    if n == 0:
        return np.zeros(0, int), np.zeros(0, int)
    u, v = np.zeros(n + 1), np.zeros(m + 1)
    owner = np.zeros(m + 1, int)  # owner[j] = 1-based row matched to column j (0: free)
    for row in range(1, n + 1):
        owner[0] = row
        j0 = 0
        best = np.full(m + 1, np.inf)
        previous = np.zeros(m + 1, int)
        used = np.zeros(m + 1, bool)
        while owner[j0] != 0:
            used[j0] = True
            i0 = owner[j0]
            delta, j1 = np.inf, 0
            for j in range(1, m + 1):
                if used[j]:
                    continue
                reduced = cost[i0 - 1, j - 1] - u[i0] - v[j]
                if reduced < best[j]:
                    best[j], previous[j] = reduced, j0
                if best[j] < delta:
                    delta, j1 = best[j], j
            for j in range(m + 1):
                if used[j]:
                    u[owner[j]] += delta
                    v[j] -= delta
                else:
                    best[j] -= delta
            j0 = j1
        while j0:
            j1 = previous[j0]
            owner[j0] = owner[j1]
            j0 = j1
    rows, cols = [], []
    for j in range(1, m + 1):
        if owner[j]:
            rows.append(owner[j] - 1)
            cols.append(j - 1)
    rows, cols = np.asarray(rows, int), np.asarray(cols, int)
    if transposed:
        rows, cols = cols, rows
    order = np.argsort(rows)
    return rows[order], cols[order]


def match_boxes(predicted: Sequence[Sequence[float]], truth: Sequence[Sequence[float]],
                threshold: float = 0.5) -> dict:
    """One-to-one matching of predicted and true boxes maximising total IoU.

    Returns {"ious": IoU of each matched pair, "tp": matched pairs with IoU >= threshold,
    "n_pred", "n_true", "mean_iou"}: mean_iou = sum of matched IoUs / max(n_pred, n_true), so an
    unmatched box on either side counts as IoU 0, and no boxes on both sides is IoU 1.
    """
    n_pred, n_true = len(predicted), len(truth)
    if n_pred == 0 or n_true == 0:
        return {"ious": [], "tp": 0, "n_pred": n_pred, "n_true": n_true,
                "mean_iou": 1.0 if n_pred == n_true else 0.0}
    iou = np.array([[box_iou(p, t) for t in truth] for p in predicted])
    rows, cols = _assignment(-iou)
    ious = [float(iou[r, c]) for r, c in zip(rows, cols)]
    return {"ious": ious, "tp": sum(v >= threshold for v in ious), "n_pred": n_pred, "n_true": n_true,
            "mean_iou": sum(ious) / max(n_pred, n_true)}


def detection_summary(matches: Sequence[dict]) -> dict:
    """Micro precision/recall over all boxes (None when there are no predicted / true boxes),
    mean per-example IoU, and how often "no boxes" agrees between prediction and truth."""
    tp = sum(m["tp"] for m in matches)
    n_pred = sum(m["n_pred"] for m in matches)
    n_true = sum(m["n_true"] for m in matches)
    return {
        "box_precision": tp / n_pred if n_pred else None,
        "box_recall": tp / n_true if n_true else None,
        "mean_iou": float(np.mean([m["mean_iou"] for m in matches])) if matches else None,
        "empty_agreement": float(np.mean([(m["n_pred"] == 0) == (m["n_true"] == 0) for m in matches]))
        if matches else None,
    }


def mae(predicted: Sequence[float], truth: Sequence[float]) -> float | None:
    p, t = np.asarray(predicted, np.float64), np.asarray(truth, np.float64)
    return float(np.abs(p - t).mean()) if len(p) else None


def correlation_or_none(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman over a set; None when it is undefined (fewer than 2 items or a constant side)."""
    if len(x) < 2:
        return None
    rho = spearman_rho(x, y)
    return None if math.isnan(rho) else rho
