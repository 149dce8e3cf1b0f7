"""Next-token cross-entropy on label tokens only, without building full-sequence logits.

`labels` are aligned with `input_ids` as in HF (`labels[t]` is the token at position t, -100 =
ignored): position t is trained to predict `labels[t + 1]`. Prompt tokens dominate an SFT
sequence, so the hidden states at the positions whose next label is valid are gathered into a
fixed-size buffer (`max_label_tokens` rows, a static shape) and only those rows are projected
onto the vocabulary, in float32, optionally in rematerialised chunks.

The function returns sums, not means (`LossStats`): the step adds them over microbatches and
divides once by the total weight, so gradient accumulation and sharding give exactly the loss
of the whole batch.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sr_jax.batch import IGNORE_INDEX as IGNORE
from sr_jax.sharding import constrain


class LossStats(NamedTuple):
    loss_sum: jax.Array   # sum of weighted token losses
    weight: jax.Array     # normaliser: label tokens ("token") or examples ("example")
    tokens: jax.Array     # label tokens scored
    correct: jax.Array    # of those, argmax == target
    dropped: jax.Array    # label tokens beyond max_label_tokens (not scored; should stay 0)

    @classmethod
    def zeros(cls) -> "LossStats":
        return cls(*(jnp.zeros((), jnp.float32) for _ in range(5)))

    def __add__(self, other: "LossStats") -> "LossStats":  # type: ignore[override]
        return LossStats(*(a + b for a, b in zip(self, other)))


def next_token_targets(labels, segment_ids=None, xp=jnp):
    """targets[b, t] = labels[b, t + 1]; ignored at the last position and, for packed rows,
    where the next token starts another segment."""
    pad = xp.full(labels.shape[:-1] + (1,), IGNORE, labels.dtype)
    targets = xp.concatenate([labels[..., 1:], pad], axis=-1)
    if segment_ids is not None:
        same = xp.concatenate([segment_ids[..., 1:] == segment_ids[..., :-1],
                               xp.zeros(labels.shape[:-1] + (1,), bool)], axis=-1)
        targets = xp.where(same, targets, IGNORE)
    return targets


def count_label_tokens(labels, segment_ids=None) -> int:
    """Host-side count of scored positions (check a batch against `max_label_tokens`)."""
    labels = np.asarray(labels)
    seg = None if segment_ids is None else np.asarray(segment_ids)
    return int((next_token_targets(labels, seg, xp=np) >= 0).sum())


def _example_weights(valid, segment_ids):
    """Per-position weight 1 / (label tokens of its example), and the number of examples.

    An example is a row, or a (row, segment) pair in packed rows; segment ids lie in [0, T)."""
    b, t = valid.shape
    seg = jnp.zeros_like(valid, jnp.int32) if segment_ids is None else jnp.clip(segment_ids, 0, t - 1)
    example = (jnp.arange(b)[:, None] * t + seg).reshape(-1)
    counts = jax.ops.segment_sum(valid.reshape(-1).astype(jnp.float32), example, num_segments=b * t)
    per_position = jnp.where(valid.reshape(-1), 1.0 / jnp.maximum(counts[example], 1.0), 0.0)
    return per_position, jnp.sum(counts > 0).astype(jnp.float32)


def _score(project, hidden, targets):
    """(rows, hidden) -> per-row negative log-likelihood and correctness, in float32."""
    logits = project(hidden).astype(jnp.float32)
    target_logit = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    nll = jax.nn.logsumexp(logits, axis=-1) - target_logit
    return nll, jnp.argmax(logits, axis=-1) == targets


def label_loss(project: Callable[[jax.Array], jax.Array], hidden, labels, *, segment_ids=None,
               max_label_tokens: int | None = None, chunk_size: int = 0, weighting: str = "token",
               token_weights: tuple = ()) -> LossStats:
    """project: hidden rows (N, H) -> logits (N, V) (the model's `logits`); hidden (B, T, H);
    labels (B, T) with -100 = ignore; segment_ids (B, T) for packed rows; token_weights
    ((target id, weight), ...) multiplies the weight of positions predicting those ids."""
    if weighting not in ("token", "example"):
        raise ValueError(f"unknown loss weighting {weighting!r}; use 'token' or 'example'")
    b, t, h = hidden.shape
    targets = next_token_targets(labels, segment_ids)
    valid = targets >= 0
    capacity = b * t if max_label_tokens is None else int(max_label_tokens)
    if chunk_size and capacity % chunk_size:
        capacity += chunk_size - capacity % chunk_size
    flat_valid = valid.reshape(-1)
    total = jnp.sum(flat_valid)
    (rows,) = jnp.nonzero(flat_valid, size=capacity, fill_value=0)
    scored = jnp.arange(capacity) < total
    picked = constrain(jnp.take(hidden.reshape(b * t, h), rows, axis=0), ("label_tokens", "act_embed"))
    picked_targets = jnp.where(scored, jnp.take(targets.reshape(-1), rows), 0)
    if weighting == "token":
        weights, weight_total = scored.astype(jnp.float32), jnp.sum(scored).astype(jnp.float32)
    else:
        per_position, weight_total = _example_weights(valid, segment_ids)
        weights = jnp.where(scored, jnp.take(per_position, rows), 0.0)
    if token_weights:
        ids = jnp.asarray([int(i) for i, _ in token_weights], picked_targets.dtype)
        values = jnp.asarray([float(w) for _, w in token_weights], jnp.float32)
        hit = picked_targets[:, None] == ids[None, :]
        weights = weights * jnp.where(hit.any(-1), jnp.sum(jnp.where(hit, values, 0.0), -1), 1.0)
        if weighting == "token":  # a weighted mean over label tokens
            weight_total = jnp.sum(weights)

    if not chunk_size or chunk_size >= capacity:
        nll, correct = _score(project, picked, picked_targets)
    else:
        n = capacity // chunk_size
        chunk = jax.checkpoint(lambda xs: _score(project, *xs))
        nll, correct = jax.lax.map(chunk, (picked.reshape(n, chunk_size, h), picked_targets.reshape(n, chunk_size)))
        nll, correct = nll.reshape(-1), correct.reshape(-1)
    f32 = jnp.float32
    return LossStats(
        loss_sum=jnp.sum(nll * weights),
        weight=weight_total,
        tokens=jnp.sum(scored).astype(f32),
        correct=jnp.sum(correct & scored).astype(f32),
        dropped=jnp.maximum(total - capacity, 0).astype(f32),
    )


def resolve_token_weights(token_weights: dict, tokenizer, vocab_map=None) -> tuple:
    """`train.loss.token_weights` ({token text: weight}) as ((model id, weight), ...): each text
    must be exactly one token of `tokenizer`; under a reduced vocabulary the id is its compact id."""
    resolved = []
    for text, weight in token_weights.items():
        ids = tokenizer.encode(text)
        if len(ids) != 1:
            raise ValueError(f"train.loss.token_weights: {text!r} is {len(ids)} tokens {ids}, not one token")
        if not float(weight) > 0:
            raise ValueError(f"train.loss.token_weights: the weight of {text!r} must be > 0, got {weight!r}")
        token = ids[0] if vocab_map is None else vocab_map.compact_id(ids[0])
        resolved.append((int(token), float(weight)))
    return tuple(resolved)
