"""LoRA adapters on the model's `Linear` layers and merging (PEFT adapter import/export is
`sr_jax.convert.peft`).

An adapted layer computes `x @ W + dropout(x) @ A @ B * scale` with `A` (in, r), `B` (r, out),
`scale = alpha / r` (or `alpha / sqrt(r)` for rsLoRA). `A` starts uniform in +-1/sqrt(in) and `B`
at zero (PEFT's initialisation), so a fresh adapter leaves the model unchanged. Adapter weights
are `LoRAParam`s, a subclass of `nnx.Param`: training selects them with that type as the
trainable filter, so the base weights get neither gradients nor optimizer state.

The adapter lives at `<linear>.lora` (paths such as
`model/language_model/layers/0/self_attn/q_proj/lora/lora_a`), leaving base parameter names,
and so checkpoint conversion, untouched.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
from flax import nnx

from sr_jax.models import family_of
from sr_jax.models.layers import Linear

class LoRAParam(nnx.Param):
    """A trainable low-rank adapter weight."""


@dataclasses.dataclass
class LoRAConfig:
    enabled: bool = False
    rank: int = 32
    alpha: float = 64.0
    dropout: float = 0.05
    # "all" = every linear layer of the decoder (q, k, v, o, gate, up, down). Other entries: a
    # layer's attribute name (e.g. "q_proj", matched in the decoder, and in the vision tower
    # when `vision`), or a regex full-matched against the dotted module path.
    targets: list[str] = dataclasses.field(default_factory=lambda: ["all"])
    vision: bool = False  # also adapt the vision tower's linear layers (blocks and mergers)
    use_rslora: bool = False
    seed: int = 0

    def scale(self) -> float:
        return self.alpha / (self.rank**0.5 if self.use_rslora else self.rank)


class LoRA(nnx.Module):
    def __init__(self, in_features: int, out_features: int, *, rank: int, scale: float, dropout: float,
                 axes: tuple[str, str], dtype, param_dtype, key: jax.Array, dropout_stream=None):
        bound = in_features**-0.5
        self.lora_a = LoRAParam(jax.random.uniform(key, (in_features, rank), param_dtype, -bound, bound),
                                logical_axes=(axes[0], "lora_rank"))
        self.lora_b = LoRAParam(jnp.zeros((rank, out_features), param_dtype), logical_axes=("lora_rank", axes[1]))
        self.scale = float(scale)
        self.dropout = float(dropout)
        self.dropout_rng = dropout_stream if dropout > 0 else None
        self.deterministic = True  # dropout off unless training turns it on (set_lora_dropout)
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        if self.dropout > 0 and not self.deterministic:
            keep = jax.random.bernoulli(self.dropout_rng(), 1.0 - self.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(self.dtype)
        h = jnp.dot(x, self.lora_a[...].astype(self.dtype))
        return jnp.dot(h, self.lora_b[...].astype(self.dtype)) * jnp.asarray(self.scale, self.dtype)


# ---------------------------------------------------------------------------------------------
# finding layers


def _dotted(path) -> str:
    return ".".join(str(p) for p in path)


def linear_layers(model) -> dict[tuple, Linear]:
    return {tuple(path): node for path, node in nnx.iter_graph(model) if isinstance(node, Linear)}


def lora_layers(model) -> dict[tuple, Linear]:
    return {p: m for p, m in linear_layers(model).items() if m.lora is not None}


def select_targets(model, targets: list[str], *, vision: bool) -> list[tuple]:
    """Paths of the Linear layers that `targets` names (see LoRAConfig.targets)."""
    family = family_of(model)
    chosen = []
    for path, _ in linear_layers(model).items():
        name, in_vision = str(path[-1]), family.vision_scope in path
        in_decoder = family.decoder_scope in path
        if path[-2:-1] == ("patch_embed",):  # a Conv3d in HF; PEFT adapters there use another layout
            continue
        for t in targets:
            if t == "all":
                hit = (name in family.lora_targets and in_decoder) or (vision and in_vision)
            elif re.fullmatch(r"\w+", t):
                hit = name == t and (in_decoder or (vision and in_vision))
            else:
                hit = re.fullmatch(t, _dotted(path)) is not None
            if hit:
                chosen.append(path)
                break
    if not chosen:
        raise ValueError(f"LoRA targets {targets} (vision={vision}) match no linear layer of the model")
    return chosen


def _module_at(model, path):
    node = model
    for part in path:
        node = node[part] if isinstance(part, int) else getattr(node, part)
    return node


# ---------------------------------------------------------------------------------------------
# adding, toggling, merging


def add_lora(linear: Linear, *, rank: int, scale: float, dropout: float, key: jax.Array,
             dropout_stream=None, a=None, b=None) -> None:
    """Attaches an adapter to `linear` (optionally with given A (in, r) and B (r, out) values)."""
    in_f, out_f = linear.kernel.get_value().shape
    param_dtype = linear.kernel.get_value().dtype
    lora = LoRA(in_f, out_f, rank=rank, scale=scale, dropout=dropout, axes=linear.axes, dtype=linear.dtype,
                param_dtype=param_dtype, key=key, dropout_stream=dropout_stream)
    if a is not None:
        lora.lora_a.set_value(jnp.asarray(a, param_dtype))
        lora.lora_b.set_value(jnp.asarray(b, param_dtype))
    linear.lora = lora


def apply_lora(model, cfg: LoRAConfig) -> list[tuple]:
    """Adds fresh adapters (in place) to the layers `cfg.targets` selects; returns their paths."""
    if cfg.rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {cfg.rank}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {cfg.dropout}")
    paths = select_targets(model, cfg.targets, vision=cfg.vision)
    # One shared stream: each adapter call draws the next key, so masks differ across layers.
    stream = nnx.Rngs(dropout=cfg.seed).dropout if cfg.dropout > 0 else None
    key = jax.random.key(cfg.seed)
    for i, path in enumerate(paths):
        add_lora(_module_at(model, path), rank=cfg.rank, scale=cfg.scale(), dropout=cfg.dropout,
                 key=jax.random.fold_in(key, i), dropout_stream=stream)
    return paths


def set_lora_dropout(model, enabled: bool) -> None:
    for _, linear in lora_layers(model).items():
        linear.lora.deterministic = not enabled


def merge_lora(model):
    """Folds every adapter into its base kernel (W + A @ B * scale) and removes it; in place."""
    for _, linear in lora_layers(model).items():
        lora = linear.lora
        kernel = linear.kernel.get_value()
        delta = jnp.dot(lora.lora_a[...].astype(jnp.float32), lora.lora_b[...].astype(jnp.float32)) * lora.scale
        linear.kernel.set_value((kernel.astype(jnp.float32) + delta).astype(kernel.dtype))
        linear.lora = None
    return model
