"""Building blocks with logical-axis metadata.

Every parameter is an `nnx.Param` carrying `logical_axes` (names such as "embed", "mlp",
"heads"); `sr_jax.sharding` maps them to mesh axes, so the model code never mentions a mesh.
Parameters are stored in `param_dtype` and cast to the compute `dtype` at use.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
from flax import nnx

from sr_jax.sharding import constrain

INIT_STD = 0.02


def _normal(rngs: nnx.Rngs, shape, dtype):
    return INIT_STD * jax.random.normal(rngs.params(), shape, dtype)


def sincos_2d_table(rows: int, features: int) -> jnp.ndarray:
    """A square grid's 2-D sine/cosine position code, (side*side, features), row-major like the
    vision position table: half the features code the row, half the column, at geometric
    frequencies; values in [-1, 1]. Smooth in position, so nearby cells start out alike."""
    side = int(round(rows**0.5))
    if side * side != rows or features % 4:
        raise ValueError(f"a sincos table needs a square number of rows and features divisible by 4, got {(rows, features)}")
    freqs = 1.0 / (side * 4.0) ** (jnp.arange(features // 4) / (features // 4))  # periods 2*pi .. ~2*pi*4*side
    pos = jnp.arange(side, dtype=jnp.float32)[:, None] * freqs[None]
    axis = jnp.concatenate([jnp.sin(pos), jnp.cos(pos)], -1)  # (side, features/2)
    y = jnp.repeat(axis, side, axis=0)
    x = jnp.tile(axis, (side, 1))
    return jnp.concatenate([y, x], -1)


def redraw_params(model: nnx.Module, specs: list[str], seed: int = 0) -> dict[str, int]:
    """Redraws parameters from normal(0, std) after init, per "regex=std" spec (dotted parameter
    paths, fullmatch; the first matching spec wins; std 0 zeroes), or sets a square position
    table to A * `sincos_2d_table` ("regex=sincos:A"). Returns matches per spec and
    raises if a spec matches nothing, so a typo never trains silently with the default init."""
    rules = []
    for spec in specs:
        pattern, sep, std = spec.rpartition("=")
        try:
            kind, amplitude = ("sincos", float(std[7:])) if std.startswith("sincos:") else ("normal", float(std))
            rules.append((spec, re.compile(pattern), kind, amplitude))
        except (re.error, ValueError) as e:
            raise ValueError(f"model.init_std entry {spec!r}: expected 'regex=std' or 'regex=sincos:A' ({e})") from None
        if not sep:
            raise ValueError(f"model.init_std entry {spec!r}: expected 'regex=std'")
    counts = {rule[0]: 0 for rule in rules}
    key = jax.random.key(seed)
    for i, (path, var) in enumerate(nnx.to_flat_state(nnx.state(model, nnx.Param))):
        name = ".".join(str(p) for p in path)
        rule = next((r for r in rules if r[1].fullmatch(name)), None)
        if rule is None:
            continue
        value = var.get_value()
        if rule[2] == "sincos":
            if value.ndim != 2:
                raise ValueError(f"model.init_std {rule[0]!r}: {name} is not a (cells, features) table: {value.shape}")
            fresh = sincos_2d_table(*value.shape)
        else:
            fresh = jax.random.normal(jax.random.fold_in(key, i), value.shape, jnp.float32)
        var.set_value((rule[3] * fresh).astype(value.dtype))
        counts[rule[0]] += 1
    missing = [spec for spec, n in counts.items() if n == 0]
    if missing:
        raise ValueError(f"model.init_std: no parameter path matches {missing}")
    return counts


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


def scan_layers(layers, remat: str, x, *args, constrain_to=None, collect: bool = False):
    """x through `layers` (modules of one structure, in order) as one `lax.scan` over their states
    stacked along a new leading axis, each step rematerialised by `remat`: XLA compiles one layer
    body instead of len(layers) copies (compile time and memory of the compiler, not of the step).
    The parameters stay per layer (checkpoints, conversion, LoRA and sharding rules unchanged); the
    stack is one copy of these layers' weights, in their sharded layout. Returns (x, per-layer
    outputs stacked on axis 0, or None)."""
    if remat not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {remat!r}; use one of {sorted(REMAT_POLICIES)}")
    graphdef = nnx.graphdef(layers[0])
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[nnx.state(layer) for layer in layers])

    def body(x, state):
        y = nnx.merge(graphdef, state)(x, *args)
        y = y if constrain_to is None else constrain(y, constrain_to)
        return y, (y if collect else None)

    if remat != "none":
        body = jax.checkpoint(body, policy=REMAT_POLICIES[remat])
    return jax.lax.scan(body, x, stacked)


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


NEG_FILL = float(jnp.finfo(jnp.float32).min)  # masked scores: large but finite, so fully masked rows stay finite


def compile_platform() -> str:
    """The platform the program being traced is compiled for: the devices of the mesh in context
    (`jax.set_mesh`; a TPU topology's devices when compiling ahead of time on a CPU host), else
    JAX's default backend. "tpu", "gpu" or "cpu"."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    platform = device.platform if device is not None else jax.default_backend()
    return "gpu" if platform in ("cuda", "rocm") else platform


def _swap_last(x: jax.Array) -> jax.Array:
    """x with its last two axes swapped. On CPU the copy is forced (an optimisation barrier keeps
    XLA from folding it into the next dot): XLA:CPU runs a dot that contracts over its left
    operand's rows at about a third of its usual speed, and the copy costs less than the loss."""
    x = jnp.swapaxes(x, -1, -2)
    return jax.lax.optimization_barrier(x) if compile_platform() == "cpu" else x


def _scores(q, k, allowed, scale):
    s = jnp.einsum("bhgqd,bhkd->bhgqk", q, k, preferred_element_type=jnp.float32) * scale
    return jnp.where(allowed, s, NEG_FILL)


def _attention_fwd(q, k, v, allowed, scale):
    s = _scores(q, k, allowed, scale)
    row_max = jnp.max(s, axis=-1, keepdims=True)
    e = jnp.exp(s - row_max)
    row_sum = jnp.sum(e, axis=-1, keepdims=True)
    out = jnp.einsum("bhgqk,bhkd->bhgqd", (e / row_sum).astype(v.dtype), v)
    return out, (q, k, v, allowed, out, row_max, row_sum)


def _attention_bwd(scale, res, d_out):
    # Flash-attention style: the probabilities are recomputed from the saved row max and sum
    # rather than stored, so the residuals are O(T) per head instead of O(T^2).
    q, k, v, allowed, out, row_max, row_sum = res
    p = jnp.exp(_scores(q, k, allowed, scale) - row_max) / row_sum
    b, h, g, tq, tk = p.shape
    rows = lambda x: x.reshape(b, h, g * tq, x.shape[-1])  # queries of all groups as one row axis
    f32 = jnp.float32
    d_v = jnp.einsum("bhkq,bhqd->bhkd", _swap_last(rows(p.astype(v.dtype))), rows(d_out), preferred_element_type=f32)
    d_p = jnp.einsum("bhgqd,bhkd->bhgqk", d_out, v, preferred_element_type=f32)
    delta = jnp.sum(d_out.astype(f32) * out.astype(f32), axis=-1, keepdims=True)
    d_s = (p * (d_p - delta)).astype(q.dtype)  # the score scale is applied to d_q and d_k (smaller)
    d_q = jnp.einsum("bhgqk,bhkd->bhgqd", d_s, k, preferred_element_type=f32) * scale
    d_k = jnp.einsum("bhkq,bhqd->bhkd", _swap_last(rows(d_s)), rows(q), preferred_element_type=f32) * scale
    return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype), None


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def heads_major_attention(q, k, v, allowed, scale: float):
    """Softmax attention on heads-major layouts: q (B, H, G, Q, D) (G query heads per key/value
    head), k/v (B, H, K, D), `allowed` broadcastable to (B, H, G, Q, K), True where a query may
    see a key. Scores and softmax in float32; a fully masked row averages all keys (its output
    is unused), exactly as a softmax over a large negative fill does."""
    return _attention_fwd(q, k, v, allowed, scale)[0]


heads_major_attention.defvjp(_attention_fwd, _attention_bwd)


def to_heads_major(q, k, v):
    """(B, T, H, G, D) queries and (B, T, H, D) keys/values -> heads-major layouts."""
    return jnp.transpose(q, (0, 2, 3, 1, 4)), jnp.transpose(k, (0, 2, 1, 3)), jnp.transpose(v, (0, 2, 1, 3))


def query_blocks(n: int, target: int = 128) -> list[tuple[int, int]]:
    """[start, stop) ranges of about `target` rows (multiples of 8) covering n rows."""
    count = -(-n // target)
    step = -(-n // count)
    step = -(-step // 8) * 8
    return [(a, min(a + step, n)) for a in range(0, n, step)]


def windowed_segment_attention(q, k, v, segment, scale: float, span: int, target: int = 128):
    """Bidirectional attention within segments (q/k/v (..., N, D) heads-major, `segment` (N,)),
    for segments that reach over at most `span` consecutive rows (first to last): a query block
    [a, b) meets only keys [a - span + 1, b + span - 1), a cost of N * (block + 2 * span)
    instead of N^2. The same result as attention over all N rows for every row of such a segment."""
    n = q.shape[-2]
    outs = []
    for a, b in query_blocks(n, target):
        lo, hi = max(0, a - span + 1), min(n, b + span - 1)
        allowed = segment[a:b, None] == segment[None, lo:hi]
        outs.append(heads_major_attention(q[..., a:b, :], k[..., lo:hi, :], v[..., lo:hi, :], allowed, scale))
    return jnp.concatenate(outs, axis=-2)


def query_blocked_attention(q, k, v, allowed, scale: float, target: int = 128):
    """`heads_major_attention` in query blocks of about `target` rows, each against all keys:
    a block's scores stay in cache, which on a CPU is much faster than one score array per head
    once that outgrows the cache. `allowed` has a query axis of 1 or Q."""
    def mask(a, b):
        return allowed if allowed.shape[-2] == 1 else allowed[..., a:b, :]
    return jnp.concatenate([heads_major_attention(q[..., a:b, :], k, v, mask(a, b), scale)
                            for a, b in query_blocks(q.shape[-2], target)], axis=-2)


def masked_softmax_attention(q, k, v, mask, *, scale: float):
    """Grouped-query attention on (B, Tq, Hkv, G, D) queries and (B, Tk, Hkv, D) keys/values.

    `mask` (B, Tq, Tk) is True where attention is allowed. Scores and softmax run in float32;
    a large negative (not -inf) fill keeps fully masked rows (padding queries) finite.
    """
    if q.shape[1] <= 8:
        # Decoding: a few queries against the whole KV cache. Computed in the cache's own layout;
        # moving the cache to heads-major would copy all of it every step.
        scores = jnp.einsum("bqhgd,bkhd->bhgqk", q, k, preferred_element_type=jnp.float32) * scale
        scores = jnp.where(mask[:, None, None, :, :], scores, NEG_FILL)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        return jnp.einsum("bhgqk,bkhd->bqhgd", probs, v)
    qh, kh, vh = to_heads_major(q, k, v)
    return jnp.transpose(heads_major_attention(qh, kh, vh, mask[:, None, None], scale), (0, 3, 1, 2, 4))


def causal_attention(q, k, v, mask, *, scale: float, block: int = 128, span: int | None = None):
    """`masked_softmax_attention` for a mask that is causal (no key after its query), as every
    mask of a full forward pass is: query block i only meets keys [0, (i + 1) * block), so the
    upper triangle is never computed (about half the work and memory for long rows, forward and
    backward). `span`: no packed segment reaches over more than this many positions (first to
    last token), so block i's keys start at i * block - span + 1: rows packed with short examples
    skip the blocks of earlier examples too. Falls back to the plain form for short or unevenly
    divisible lengths."""
    t = q.shape[1]
    block = max(block, t // 16)  # at most 16 blocks: bounded program size for long rows
    while t % block and block % 2 == 0 and block > 64:  # e.g. 640 = 5 x 128
        block //= 2
    if t != k.shape[1] or t % block or t <= block:
        return masked_softmax_attention(q, k, v, mask, scale=scale)
    qh, kh, vh = to_heads_major(q, k, v)
    outs = []
    for i in range(t // block):
        rows, end = slice(i * block, (i + 1) * block), (i + 1) * block
        first = 0 if span is None else max(0, i * block - span + 1)
        outs.append(heads_major_attention(qh[:, :, :, rows], kh[:, :, first:end], vh[:, :, first:end],
                                          mask[:, None, None, rows, first:end], scale))
    return jnp.transpose(jnp.concatenate(outs, axis=3), (0, 3, 1, 2, 4))
