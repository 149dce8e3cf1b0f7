"""AdamW with warmup + decay schedule, global-norm clipping and a weight-decay mask.

The schedule follows HF's Trainer: the first optimizer update uses the step-0 learning rate
(0 with warmup), warmup is linear over ceil(ratio * total) steps, then cosine (or linear) decay
reaches `min_lr_ratio * learning_rate` at `total_steps`. Weight decay is decoupled and scaled by
the learning rate, as in torch.optim.AdamW. The optimizer only ever sees the trainable
parameters (see `sr_jax.train.step.split_model`), so frozen weights carry no optimizer state.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from sr_jax.train.config import OptimConfig


@dataclasses.dataclass(frozen=True)
class Optimizer:
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    total_steps: int


def warmup_steps(cfg: OptimConfig, total_steps: int) -> int:
    if cfg.warmup_steps is not None:
        return int(cfg.warmup_steps)
    return math.ceil(total_steps * cfg.warmup_ratio)


def lr_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    peak, warm = cfg.learning_rate, warmup_steps(cfg, total_steps)
    if warm > total_steps:
        raise ValueError(f"warmup ({warm} steps) is longer than training ({total_steps} steps)")
    floor = cfg.min_lr_ratio
    decay_len = max(total_steps - warm, 1)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warmup = peak * step / max(warm, 1)
        progress = jnp.clip((step - warm) / decay_len, 0.0, 1.0)
        if cfg.schedule == "cosine":
            shape = 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        elif cfg.schedule == "linear":
            shape = 1.0 - progress
        elif cfg.schedule == "constant":
            shape = jnp.ones_like(progress)
        else:
            raise ValueError(f"unknown schedule {cfg.schedule!r}; use cosine, linear or constant")
        return jnp.where(step < warm, warmup, peak * (floor + (1.0 - floor) * shape))

    return schedule


def _path_names(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]


def decay_mask_fn(no_decay: list[str]):
    """params -> same-structured tree of bools: True where weight decay applies."""
    patterns = [re.compile(p) for p in no_decay]

    def decays(path) -> bool:
        names = _path_names(path)
        dotted = ".".join(names)
        return not any(names[-1] == raw or pat.fullmatch(dotted) for raw, pat in zip(no_decay, patterns))

    def mask(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, v: v.replace(decays(path)) if isinstance(v, nnx.Variable) else decays(path),
            params, is_leaf=lambda x: isinstance(x, nnx.Variable))

    return mask


def make_optimizer(cfg: OptimConfig, total_steps: int) -> Optimizer:
    schedule = lr_schedule(cfg, total_steps)
    adamw = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                        mask=decay_mask_fn(cfg.no_decay))
    clip = optax.clip_by_global_norm(cfg.max_grad_norm) if cfg.max_grad_norm > 0 else optax.identity()
    return Optimizer(tx=optax.chain(clip, adamw), schedule=schedule, total_steps=total_steps)
