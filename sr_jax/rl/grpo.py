"""GRPO math and its loss for the shared jitted step (`sr_jax.train.step`).

Per completion token t of row i (mask m = 1 up to and including the stop token):
  ratio     r = exp(logp - old_logp)                 (old_logp: the rollout policy, fixed across
                                                      `num_iterations`; with one iteration it is
                                                      stop_gradient(logp), so r = 1)
  policy    pg = -min(r * A_i, clip(r, 1 - eps, 1 + eps_high) * A_i)
  KL (k3)   kl = exp(ref - logp) - (ref - logp) - 1  (ref: the frozen reference policy)
  loss      sum_{i,t} m * (pg + beta * kl) / sum_{i,t} m    (token-level: every completion
                                                      token of the whole batch weighs the same)
A_i = (R_i - mean_group) / (std_group + eps) over the G completions of the row's prompt.
Log-probs are those of the sampling temperature's distribution (logits / temperature), as TRL
does; top-k/top-p/repetition penalty shape sampling only.

Batch layout of the update (leading microbatch axis k as in `sr_jax.train.step`): rows are
[prompt left-padded to width W | completion of N tokens], so the completion's log-probs come
from the hidden states at columns W-1 .. W+N-2 and only those B*N rows meet the vocabulary.
  input_ids, attention_mask (k, B, W+N); position_ids (k, 3, B, W+N); vision keys as in SFT
  completion_ids, completion_mask (k, B, N); advantages (k, B)
  old_logp (k, B, N) optional (absent: stop_gradient(logp)); ref_logp (k, B, N) when beta > 0
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from sr_jax.lora import set_lora_dropout
from sr_jax.sharding import batch_shardings, constrain, global_from_full, logical_sharding, use_mesh
from sr_jax.batch import POLICY_KEYS as MODEL_KEYS, VISION_KEYS
from sr_jax.models import family_of
from sr_jax.train.step import TrainState, TrainStep, attention_spans, trainable_filter
RL_AXES = {
    "completion_ids": (None, "batch", None),
    "completion_mask": (None, "batch", None),
    "old_logp": (None, "batch", None),
    "ref_logp": (None, "batch", None),
    "advantages": (None, "batch"),
}


# ---- pure math --------------------------------------------------------------------------------

def group_advantages(rewards, group_size: int, eps: float = 1e-4, ddof: int = 1) -> np.ndarray:
    """Rewards of consecutive groups of `group_size` rows -> (r - group mean) / (group std + eps)."""
    r = np.asarray(rewards, np.float64)
    if r.ndim != 1 or r.size % group_size:
        raise ValueError(f"{r.size} rewards do not split into groups of {group_size}")
    groups = r.reshape(-1, group_size)
    std = groups.std(axis=1, ddof=ddof, keepdims=True)
    return ((groups - groups.mean(axis=1, keepdims=True)) / (std + eps)).reshape(-1)


def kl_k3(logp, ref_logp):
    """Per-token k3 estimate of KL(policy || reference): exp(d) - d - 1, d = ref - logp (>= 0)."""
    d = ref_logp - logp
    return jnp.exp(d) - d - 1.0


class GRPOStats(NamedTuple):
    loss_sum: jax.Array
    tokens: jax.Array
    kl_sum: jax.Array
    clipped: jax.Array     # tokens whose gradient the clip removed
    ratio_sum: jax.Array

    @classmethod
    def zeros(cls) -> "GRPOStats":
        return cls(*(jnp.zeros((), jnp.float32) for _ in range(5)))

    def __add__(self, other):  # type: ignore[override]
        return GRPOStats(*(a + b for a, b in zip(self, other)))


def grpo_token_sums(logp, old_logp, ref_logp, advantages, mask, *, beta: float, epsilon: float,
                    epsilon_high: float | None = None) -> GRPOStats:
    """Sums (not means) of the GRPO objective over masked tokens; logp etc. (B, N), advantages (B,)."""
    eps_high = epsilon if epsilon_high is None else epsilon_high
    m = mask.astype(jnp.float32)
    adv = advantages.astype(jnp.float32)[:, None]
    ratio = jnp.exp(logp - old_logp)
    clipped_ratio = jnp.clip(ratio, 1.0 - epsilon, 1.0 + eps_high)
    per_token = -jnp.minimum(ratio * adv, clipped_ratio * adv)
    kl = jnp.zeros_like(logp)
    if beta > 0:
        kl = kl_k3(logp, ref_logp)
        per_token = per_token + beta * kl
    is_clipped = ((ratio < 1.0 - epsilon) & (adv < 0)) | ((ratio > 1.0 + eps_high) & (adv > 0))
    return GRPOStats(loss_sum=jnp.sum(per_token * m), tokens=jnp.sum(m), kl_sum=jnp.sum(kl * m),
                     clipped=jnp.sum(is_clipped * m), ratio_sum=jnp.sum(ratio * m))


# ---- completion log-probs ---------------------------------------------------------------------

def completion_logprobs(model, batch: Mapping[str, jax.Array], temperature: float, chunk_size: int = 0):
    """(B, N) log-probs of `completion_ids` under `model`, teacher-forced after the prompt."""
    pixel_values, vision = batch.get("pixel_values"), None
    if pixel_values is not None:
        vision = tuple(batch[k] for k in VISION_KEYS)
    out = model.features(batch["input_ids"], batch["attention_mask"], pixel_values,
                         position_ids=batch["position_ids"], vision=vision)
    targets = batch["completion_ids"]
    b, n = targets.shape
    width = batch["input_ids"].shape[1] - n
    hidden = out.hidden[:, width - 1: width - 1 + n]
    rows = constrain(hidden.reshape(b * n, hidden.shape[-1]), ("label_tokens", "act_embed"))
    flat = targets.reshape(-1)

    def score(h, t):
        logits = model.logits(h).astype(jnp.float32) / temperature
        return jnp.take_along_axis(logits, t[:, None], axis=-1)[:, 0] - jax.nn.logsumexp(logits, axis=-1)

    if not chunk_size or chunk_size >= b * n or (b * n) % chunk_size:
        logp = score(rows, flat)
    else:
        chunks = (b * n) // chunk_size
        logp = jax.lax.map(jax.checkpoint(lambda xs: score(*xs)),
                           (rows.reshape(chunks, chunk_size, -1), flat.reshape(chunks, chunk_size)))
    return logp.reshape(b, n)


# ---- the jitted programs ----------------------------------------------------------------------

class GRPOLoss:
    """The GRPO objective for the shared step (`sr_jax.train.step`): token sums of the clipped
    policy loss plus beta x k3 KL, divided once by all completion tokens of the batch."""

    def __init__(self, grpo, chunk_size: int = 0):
        self.grpo, self.chunk_size = grpo, chunk_size

    def zeros(self) -> GRPOStats:
        return GRPOStats.zeros()

    def __call__(self, model, mb) -> GRPOStats:
        grpo = self.grpo
        logp = completion_logprobs(model, mb, grpo.temperature, self.chunk_size)
        old = mb["old_logp"] if "old_logp" in mb else jax.lax.stop_gradient(logp)
        ref = mb["ref_logp"] if "ref_logp" in mb else logp
        return grpo_token_sums(logp, old, ref, mb["advantages"], mb["completion_mask"], beta=grpo.beta,
                               epsilon=grpo.epsilon, epsilon_high=grpo.epsilon_high)

    def denominator(self, stats: GRPOStats):
        return jnp.maximum(stats.tokens, 1.0)

    def metrics(self, stats: GRPOStats, denom) -> dict:
        return {"loss": stats.loss_sum / denom, "kl": stats.kl_sum / denom, "clip_fraction": stats.clipped / denom,
                "ratio_mean": stats.ratio_sum / denom, "completion_tokens": stats.tokens}

    def batch_shardings(self, batch, mesh, rules=None) -> dict:
        return rl_batch_shardings(batch, mesh, rules)


def _logprob_program(graphdef, temperature, chunk, params, frozen, rest, mb):
    model = nnx.merge(graphdef, params, frozen, rest)
    return completion_logprobs(model, mb, temperature, chunk)


def rl_batch_shardings(batch: Mapping[str, Any], mesh, rules=None) -> dict:
    model_part = batch_shardings({k: v for k, v in batch.items() if k in MODEL_KEYS}, mesh, rules)
    for key, value in batch.items():
        if key in MODEL_KEYS:
            continue
        if key not in RL_AXES:
            raise KeyError(f"GRPO batch key {key!r} has no sharding rule; known: {sorted(MODEL_KEYS + tuple(RL_AXES))}")
        model_part[key] = logical_sharding(RL_AXES[key], np.shape(value), mesh, rules)
    return model_part


def _signature(batch) -> tuple:
    return tuple(sorted((k, tuple(np.shape(v)), str(v.dtype)) for k, v in batch.items()))


class GRPOStep(TrainStep):
    """`state, metrics = step(state, batch)`: one GRPO optimizer update (layout in the module doc),
    the shared step with `GRPOLoss`; `logprobs(params, frozen, microbatch)`: completion log-probs
    without dropout (old / reference policy)."""

    def __init__(self, model, optimizer, mesh, cfg, grpo, compiler_options: dict | None = None):
        super().__init__(model, optimizer, mesh, cfg, compiler_options, loss=GRPOLoss(grpo, cfg.loss.chunk_size))
        self.grpo = grpo
        set_lora_dropout(model, False)
        self.eval_graphdef = nnx.split(model, trainable_filter(cfg, family_of(model)), nnx.Param, ...)[0]
        self._logprob_compiled: dict[tuple, Any] = {}

    def __call__(self, state: TrainState, batch: Mapping[str, Any], label_counts=None, spans=None):
        # Every process holds the whole rollout (see `sr_jax.rl.trainer`): global arrays from it,
        # and the attention spans of the global batch from its own copy.
        spans = attention_spans(batch) if spans is None else spans
        return super().__call__(state, global_from_full(batch, rl_batch_shardings(batch, self.mesh, self.rules)),
                                spans=spans)

    def logprobs(self, params, frozen, microbatch: Mapping[str, Any]) -> jax.Array:
        signature = _signature(microbatch)
        if signature not in self._logprob_compiled:
            fn = lambda p, f, r, b: _logprob_program(self.eval_graphdef, self.grpo.temperature,
                                                     self.cfg.loss.chunk_size, p, f, r, b)
            shardings = {k: NamedSharding(s.mesh, PartitionSpec(*s.spec[1:]))
                         for k, s in rl_batch_shardings({k: jax.ShapeDtypeStruct((1,) + np.shape(v), np.int8)
                                                         for k, v in microbatch.items()}, self.mesh, self.rules).items()}
            self._logprob_compiled[signature] = shardings, jax.jit(
                fn, in_shardings=(self.state_shardings.params, self.state_shardings.frozen, self.rest_shardings,
                                  shardings),
                out_shardings=NamedSharding(self.mesh, PartitionSpec()),  # readable on every process
                compiler_options=self.compiler_options)
        shardings, program = self._logprob_compiled[signature]
        with use_mesh(self.mesh, self.rules):
            return program(params, frozen, self.rest, global_from_full(microbatch, shardings))
