"""Building blocks with logical-axis metadata.

Every parameter is an `nnx.Param` carrying `logical_axes` (names such as "embed", "mlp",
"heads"); `sr_jax.sharding` maps them to mesh axes, so the model code never mentions a mesh.
Parameters are stored in `param_dtype` and cast to the compute `dtype` at use.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sr_jax.sharding import constrain

INIT_STD = 0.02


def _normal(rngs: nnx.Rngs, shape, dtype):
    return INIT_STD * jax.random.normal(rngs.params(), shape, dtype)


class Linear(nnx.Module):
    """y = x @ kernel (+ bias); kernel is (in, out), i.e. the transpose of torch's weight."""

    def __init__(self, in_features: int, out_features: int, *, axes: tuple[str, str], use_bias: bool,
                 dtype, param_dtype, rngs: nnx.Rngs):
        self.kernel = nnx.Param(_normal(rngs, (in_features, out_features), param_dtype), logical_axes=axes)
        self.bias = (
            nnx.Param(jnp.zeros((out_features,), param_dtype), logical_axes=(axes[1],)) if use_bias else None
        )
        self.dtype = dtype
        self.axes = axes
        # Optional low-rank adapter (see sr_jax.lora), added to the output when present.
        self.lora = nnx.data(None)

    def __call__(self, x: jax.Array) -> jax.Array:
        # As a 2-D matmul: XLA:CPU runs the backward pass of a (B, T, in) x (in, out) dot more slowly.
        lead = x.shape[:-1]
        y = jnp.dot(x.reshape(-1, x.shape[-1]).astype(self.dtype), self.kernel[...].astype(self.dtype))
        y = y.reshape(*lead, y.shape[-1])
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if self.lora is not None:
            y = y + self.lora(x).astype(y.dtype)
        return y


class Embed(nnx.Module):
    def __init__(self, num: int, features: int, *, axes: tuple[str, str], dtype, param_dtype, rngs: nnx.Rngs):
        self.embedding = nnx.Param(_normal(rngs, (num, features), param_dtype), logical_axes=axes)
        self.dtype = dtype
        self.axes = axes

    def __call__(self, ids: jax.Array) -> jax.Array:
        # Under a mesh, gather the feature dimension first (FSDP-style, as for any weight):
        # looking rows up in a feature-sharded table yields feature-sharded activations, which
        # XLA can only turn into batch-sharded ones by replicating the whole activation.
        table = constrain(self.embedding[...], (self.axes[0], None))
        return constrain(jnp.take(table, ids, axis=0), ("batch", "seq", "act_embed")).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """Tied output projection: logits against the embedding table."""
        return jnp.dot(x.astype(self.dtype), self.embedding[...].astype(self.dtype).T)


class RMSNorm(nnx.Module):
    """Normalises in float32, casts back to the input dtype, then scales (HF's order of casts)."""

    def __init__(self, features: int, *, eps: float, axis_name: str, param_dtype):
        self.scale = nnx.Param(jnp.ones((features,), param_dtype), logical_axes=(axis_name,))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * y.astype(x.dtype)


class LayerNorm(nnx.Module):
    def __init__(self, features: int, *, eps: float, axis_name: str, param_dtype):
        self.scale = nnx.Param(jnp.ones((features,), param_dtype), logical_axes=(axis_name,))
        self.bias = nnx.Param(jnp.zeros((features,), param_dtype), logical_axes=(axis_name,))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


# Rematerialisation policies for a layer's backward pass: "full" keeps only the layer inputs,
# "save_dots" also keeps the outputs of weight matmuls (no attention scores), trading memory for speed.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def call_layer(layer, remat: str, *args):
    """layer(*args), rematerialised in the backward pass according to `remat`."""
    if remat == "none":
        return layer(*args)
    if remat not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {remat!r}; use one of {sorted(REMAT_POLICIES)}")
    return nnx.remat(lambda module, *a: module(*a), policy=REMAT_POLICIES[remat])(layer, *args)


def rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    return x * cos + rotate_half(x) * sin


def activation(name: str):
    table = {
        "silu": jax.nn.silu,
        "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),
        "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    }
    if name not in table:
        raise ValueError(f"unsupported activation {name!r}; known: {sorted(table)}")
    return table[name]


def masked_softmax_attention(q, k, v, mask, *, scale: float):
    """Grouped-query attention on (B, Tq, Hkv, G, D) queries and (B, Tk, Hkv, D) keys/values.

    `mask` (B, Tq, Tk) is True where attention is allowed. Scores and softmax run in float32;
    a large negative (not -inf) fill keeps fully masked rows (padding queries) finite.
    """
    scores = jnp.einsum("bqhgd,bkhd->bhgqk", q, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bhgqk,bkhd->bqhgd", probs, v)


def causal_attention(q, k, v, mask, *, scale: float, block: int = 256):
    """`masked_softmax_attention` for a mask that is causal (no key after its query), as every
    mask of a full forward pass is: query block i only meets keys [0, (i + 1) * block), so the
    upper triangle is never computed (about half the work and memory for long rows, forward and
    backward). Falls back to the plain form for short or unevenly divisible lengths."""
    t = q.shape[1]
    block = max(block, t // 16)  # at most 16 blocks: bounded program size for long rows
    while t % block and block % 2 == 0 and block > 64:  # e.g. 640 = 5 x 128
        block //= 2
    if t != k.shape[1] or t % block or t <= block:
        return masked_softmax_attention(q, k, v, mask, scale=scale)
    outs = []
    for i in range(t // block):
        rows, end = slice(i * block, (i + 1) * block), (i + 1) * block
        outs.append(masked_softmax_attention(q[:, rows], k[:, :end], v[:, :end], mask[:, rows, :end], scale=scale))
    return jnp.concatenate(outs, axis=1)
