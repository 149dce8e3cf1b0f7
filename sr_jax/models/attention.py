"""Attention by backend: one entry point per use (text self-attention over packed rows, vision
attention within each image) that picks the kernel for the platform the program is compiled for.

Backends (`ModelConfig.attention_backend`):
  auto    tpu -> splash, gpu -> cudnn, cpu -> cpu (the platform of the mesh in context, so an
          ahead-of-time compile for a TPU topology on a CPU host gets the TPU kernel)
  cpu     the portable kernels of `sr_jax.models.layers` (dense boolean mask; query blocks and
          the causal block skipping tuned for XLA:CPU). Runs anywhere.
  splash  Pallas splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`) with
          segment ids: causal within each packed segment for text, bidirectional within each
          image for the vision tower; no (T, T) mask exists anywhere. Inside `shard_map` over the
          batch (text rows, vision patches) and head (tensor) mesh axes. Off TPU the same kernel
          runs in Pallas interpret mode (slow: tests only).
  cudnn   `jax.nn.dot_product_attention(implementation="cudnn")` for causal text rows without
          packing and with right padding (checked on device; otherwise the portable kernel). The
          vision tower's per-image masks are not among cuDNN's mask types: it uses the portable kernel.

The decoding path (a KV cache with an explicit mask over cache slots) always uses the portable
kernel: a few queries against the cache.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct

from sr_jax.models.layers import (causal_attention, compile_platform, query_blocked_attention, to_heads_major,
                                  windowed_segment_attention)
from sr_jax.sharding import MESH_AXES, logical_to_spec

BACKENDS = ("auto", "cpu", "splash", "cudnn")
PAD_SEGMENT = -1  # segment id of padding tokens (and of the rows splash pads to its block size)


def resolve_backend(requested: str) -> str:
    """The backend `requested` ("auto" or an explicit one) means for the current compile."""
    if requested not in BACKENDS:
        raise ValueError(f"unknown attention_backend {requested!r}; use one of {list(BACKENDS)}")
    if requested != "auto":
        return requested
    return {"tpu": "splash", "gpu": "cudnn"}.get(compile_platform(), "cpu")


@struct.dataclass
class Segments:
    """Text self-attention described without a dense mask: `ids` (B, T) int32, a token's packed
    segment (>= 0) or PAD_SEGMENT for padding; attention is causal within a segment. `packed` is
    static: whether rows hold several segments."""

    ids: jax.Array
    packed: bool = struct.field(pytree_node=False, default=False)

    @classmethod
    def from_masks(cls, attention_mask, segment_ids=None) -> "Segments":
        real = attention_mask.astype(bool)
        ids = jnp.zeros(real.shape, jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
        return cls(ids=jnp.where(real, ids, PAD_SEGMENT), packed=segment_ids is not None)

    def dense(self) -> jax.Array:
        """The (B, T, T) boolean mask of the portable kernels: causal, same segment, real keys."""
        t = self.ids.shape[1]
        same = self.ids[:, :, None] == self.ids[:, None, :]
        return jnp.tril(jnp.ones((t, t), bool))[None] & same & (self.ids >= 0)[:, None, :]


# ---------------------------------------------------------------------------------------------
# splash attention


def _padded(n: int) -> int:
    return -(-n // 128) * 128  # the kernel's key blocks are multiples of 128 lanes


def _block(n: int) -> int:
    return next(b for b in (512, 256, 128) if n % b == 0)


def _pad_seq(x, n: int, axis: int, value=0):
    if x.shape[axis] == n:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, n - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


def splash_attention(q, k, v, q_segment, kv_segment, *, causal: bool, scale: float, interpret: bool = False):
    """Splash attention on one device: q (B, Hq, Tq, D), k/v (B, Hkv, Tk, D) with Hq a multiple
    of Hkv (query head h reads key/value head h // (Hq / Hkv)), segment ids (B, Tq) and (B, Tk):
    a query sees the keys of its own segment (and, if `causal`, at or before its position).
    Sequences are padded to the kernel's blocks with PAD_SEGMENT rows and cut back."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa  # Pallas TPU kernels: only this backend

    b, hq, tq, _ = q.shape
    tk = k.shape[2]
    if causal and tq != tk:
        raise ValueError(f"causal splash attention needs as many queries as keys, got {tq} and {tk}")
    tqp, tkp = _padded(tq), _padded(tk)
    q = _pad_seq((q.astype(jnp.float32) * scale).astype(q.dtype), tqp, 2)
    k, v = _pad_seq(k, tkp, 2), _pad_seq(v, tkp, 2)
    q_segment = _pad_seq(q_segment.astype(jnp.int32), tqp, 1, PAD_SEGMENT)
    kv_segment = _pad_seq(kv_segment.astype(jnp.int32), tkp, 1, PAD_SEGMENT)
    one = sa.CausalMask((tqp, tkp)) if causal else sa.FullMask((tqp, tkp))
    bq, bkv = _block(tqp), _block(tkp)
    sizes = sa.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                          block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
    kernel = sa.make_splash_mha(sa.MultiHeadMask([one] * hq), block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                interpret=interpret)
    out = jax.vmap(kernel)(q, k, v, sa.SegmentIds(q=q_segment, kv=kv_segment))
    return out[:, :, :tq]


def _mesh():
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names) else mesh


def sharded_splash(q, k, v, q_segment, kv_segment, *, causal: bool, scale: float, batch_axis: str | None,
                   q_seq_axis: str | None = None):
    """`splash_attention` under the mesh in context: inside `shard_map`, each device runs the
    kernel on its rows (`batch_axis`, a logical axis of dim 0) and on its query positions
    (`q_seq_axis`, a logical axis of the query length; keys are then gathered whole), and on its
    heads when the tensor axis divides the key/value heads. Without a mesh: one plain call."""
    fn = functools.partial(splash_attention, causal=causal, scale=scale, interpret=compile_platform() != "tpu")
    mesh = _mesh()
    if mesh is None:
        return fn(q, k, v, q_segment, kv_segment)
    P = jax.sharding.PartitionSpec
    rows = logical_to_spec((batch_axis,), shape=q.shape[:1], mesh=mesh)[0] if batch_axis else None
    positions = logical_to_spec((q_seq_axis,), shape=q.shape[2:3], mesh=mesh)[0] if q_seq_axis else None
    tensor = mesh.shape["tensor"]
    heads = "tensor" if tensor > 1 and k.shape[1] % tensor == 0 else None
    q_spec = P(rows, heads, positions, None)
    kv_spec = P(rows, heads, None, None)
    return jax.shard_map(fn, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, P(rows, positions), P(rows, None)),
                         out_specs=q_spec, check_vma=False)(q, k, v, q_segment, kv_segment)


# ---------------------------------------------------------------------------------------------
# entry points


def text_attention(q, k, v, mask, *, scale: float, backend: str, span: int | None = None):
    """Causal self-attention of a full forward pass: q (B, T, Hkv, G, D), k/v (B, T, Hkv, D) ->
    (B, T, Hkv, G, D). `mask` is a dense (B, T, T) mask (the cpu backend's) or `Segments`.
    `span` (portable kernels): the longest packed segment, first to last token (`causal_attention`)."""
    backend = resolve_backend(backend)
    if not isinstance(mask, Segments):
        return causal_attention(q, k, v, mask, scale=scale, span=span)
    b, t, hkv, g, d = q.shape
    if backend == "splash":
        qh = q.reshape(b, t, hkv * g, d).transpose(0, 2, 1, 3)
        out = sharded_splash(qh, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask.ids, mask.ids,
                             causal=True, scale=scale, batch_axis="batch")
        return out.transpose(0, 2, 1, 3).reshape(b, t, hkv, g, d)

    def portable(q, k, v, ids):
        return causal_attention(q, k, v, Segments(ids=ids, packed=mask.packed).dense(), scale=scale, span=span)

    if backend == "cudnn" and not mask.packed:
        # cuDNN's masks: causal plus per-row lengths, i.e. right padding. Anything else (left
        # padding) takes the portable kernel, decided on device.
        lengths = jnp.sum(mask.ids >= 0, axis=1).astype(jnp.int32)
        right_padded = jnp.all((mask.ids >= 0) == (jnp.arange(t)[None] < lengths[:, None]))

        def cudnn(q, k, v, ids):
            out = jax.nn.dot_product_attention(q.reshape(b, t, hkv * g, d), k, v, scale=scale, is_causal=True,
                                               query_seq_lengths=lengths, key_value_seq_lengths=lengths,
                                               implementation="cudnn")
            return out.reshape(b, t, hkv, g, d)

        return jax.lax.cond(right_padded, cudnn, portable, q, k, v, mask.ids)
    return portable(q, k, v, mask.ids)


def vision_attention(q, k, v, segment, layout=None, *, scale: float, backend: str, span: int | None = None):
    """Bidirectional attention within each image: q/k/v (N, H, D) of all patches, `segment` (N,)
    the image of each patch -> (N, H, D). `layout` (slots, inverse) from
    `vision.attention_slots` regroups the patches per image first. `span` (portable kernels,
    without `layout`): no image's patches reach over more than `span` rows, so each query block
    meets only the keys within `span` of it (`windowed_segment_attention`); rows of padding
    patches, never read, may then differ."""
    backend = resolve_backend(backend)
    if layout is None:
        if span is not None and backend != "splash":
            qh, kh, vh = to_heads_major(q[None, :, :, None], k[None], v[None])
            return windowed_segment_attention(qh, kh, vh, segment, scale, span)[0, :, 0].transpose(1, 0, 2)
        if backend == "splash":
            qh, kh, vh = (x.transpose(1, 0, 2)[None] for x in (q, k, v))  # (1, H, N, D)
            seg = segment[None].astype(jnp.int32)
            out = sharded_splash(qh, kh, vh, seg, seg, causal=False, scale=scale, batch_axis=None,
                                 q_seq_axis="patches")
            return out[0].transpose(1, 0, 2)
        qh, kh, vh = to_heads_major(q[None, :, :, None], k[None], v[None])  # (1, H, 1, N, D), (1, H, N, D)
        allowed = (segment[:, None] == segment[None, :])[None, None, None]
        return query_blocked_attention(qh, kh, vh, allowed, scale)[0, :, 0].transpose(1, 0, 2)
    slots, inverse = layout
    rows = jnp.maximum(slots, 0)
    if backend == "splash":
        valid = jnp.where(slots >= 0, 0, PAD_SEGMENT).astype(jnp.int32)  # (S, L)
        out = sharded_splash(*(x[rows].transpose(0, 2, 1, 3) for x in (q, k, v)), valid, valid, causal=False,
                             scale=scale, batch_axis=None)  # (S, H, L, D)
        out = out.transpose(0, 2, 1, 3)
    else:
        qh, kh, vh = to_heads_major(q[rows][:, :, :, None], k[rows], v[rows])  # (S, H, 1, L, D), (S, H, L, D)
        valid = (slots >= 0)[:, None, None, None, :]
        out = query_blocked_attention(qh, kh, vh, valid, scale)[:, :, 0].transpose(0, 2, 1, 3)  # (S, L, H, D)
    return out.reshape(-1, *out.shape[2:])[inverse]


__all__ = ["BACKENDS", "PAD_SEGMENT", "Segments", "resolve_backend", "sharded_splash", "splash_attention",
           "text_attention", "vision_attention"]
