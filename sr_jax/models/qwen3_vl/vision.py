"""Qwen3-VL vision tower: patch embedding, interpolated learned positions, 2-D RoPE blocks,
the 2x2 patch merger and the deepstack mergers.

Patches arrive as HF's processor lays them out: (num_patches, C*T*P*P) rows, each image's
patches in merge-window order (the 2x2 groups that become one LLM token are consecutive).
Everything that depends only on `grid_thw` (positions, interpolation taps, which image a patch
belongs to) is computed on the host by `vision_inputs` so the jitted tower sees static shapes.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sr_jax.models.qwen3_vl.config import VisionConfig
from sr_jax.models.attention import vision_attention
from sr_jax.models.layers import LayerNorm, Linear, activation, apply_rope, call_layer, scan_layers
from sr_jax.sharding import constrain

PATCH_AXES = ("patches", "act_vision_embed")
MERGED_AXES = ("patches", "act_embed")  # merged visual tokens, before the scatter into the text


@dataclasses.dataclass
class VisionInputs:
    """Host-side per-patch tables for a set of images (all arrays indexed by patch)."""

    interp_index: np.ndarray   # (N, 4) int32 taps into the learned position table
    interp_weight: np.ndarray  # (N, 4) float32 bilinear weights
    rope_hw: np.ndarray        # (N, 2) int32 (row, col) of the patch in its image
    segment: np.ndarray        # (N,) int32 which image/frame the patch belongs to (attention blocks)

    def as_tuple(self):
        return (self.interp_index, self.interp_weight, self.rope_hw, self.segment)


def _axis_taps(index: np.ndarray, size: int, side: int):
    """Bilinear, align-corners sampling of a `side`-long table at `size` evenly spread points."""
    src = index.astype(np.float64) * (side - 1) / max(size - 1, 1)
    lo = np.floor(src)
    taps = np.stack([lo, lo + 1], axis=-1)
    weights = np.clip(1.0 - np.abs(src[:, None] - taps), 0.0, None)
    return np.clip(taps, 0, side - 1).astype(np.int64), weights


def vision_inputs(grid_thw, cfg: VisionConfig) -> VisionInputs:
    grid = np.asarray(grid_thw, np.int64).reshape(-1, 3)
    m = cfg.spatial_merge_size
    side = int(round(cfg.num_position_embeddings**0.5))
    idx, wts, hw, seg = [], [], [], []
    segment = 0
    for t, h, w in grid.tolist():
        if h % m or w % m:
            raise ValueError(f"image grid {h}x{w} is not divisible by spatial_merge_size {m}")
        # (row, col) of each patch in merge-window order: block row, block col, inner row, inner col.
        br, bc, ir, ic = np.meshgrid(np.arange(h // m), np.arange(w // m), np.arange(m), np.arange(m), indexing="ij")
        row = (br * m + ir).ravel()
        col = (bc * m + ic).ravel()
        h_taps, h_w = _axis_taps(row, h, side)
        w_taps, w_w = _axis_taps(col, w, side)
        frame_idx = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)
        frame_wts = (h_w[:, :, None] * w_w[:, None, :]).reshape(-1, 4)
        for _ in range(t):
            idx.append(frame_idx)
            wts.append(frame_wts)
            hw.append(np.stack([row, col], axis=-1))
            seg.append(np.full(h * w, segment))
            segment += 1
    if not idx:
        raise ValueError("image_grid_thw is empty")
    return VisionInputs(
        interp_index=np.concatenate(idx).astype(np.int32),
        interp_weight=np.concatenate(wts).astype(np.float32),
        rope_hw=np.concatenate(hw).astype(np.int32),
        segment=np.concatenate(seg).astype(np.int32),
    )


def vision_rope(rope_hw: jax.Array, cfg: VisionConfig):
    """cos/sin (N, head_dim) in float32: a quarter of the frequencies per axis, [h, w, h, w] layout."""
    quarter = cfg.head_dim // 4
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(quarter, dtype=jnp.float32) * 2 / (cfg.head_dim // 2)))
    freqs = rope_hw.astype(jnp.float32)[:, :, None] * inv_freq  # (N, 2, quarter)
    freqs = freqs.reshape(freqs.shape[0], -1)  # [h freqs..., w freqs...]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


class VisionPatchEmbed(nnx.Module):
    """The Conv3d with kernel == stride over (T, P, P) patches is a matmul on flattened patches."""

    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs):
        self.proj = Linear(cfg.patch_dim, cfg.hidden_size, axes=("patch", "vision_embed"), use_bias=True,
                           dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, patches):
        return self.proj(patches)


class VisionAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs, attention_backend: str = "auto"):
        d = cfg.hidden_size
        self.qkv = Linear(d, 3 * d, axes=("vision_embed", "vision_qkv"), use_bias=True,
                          dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.proj = Linear(d, d, axes=("vision_heads", "vision_embed"), use_bias=True,
                           dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.dtype = dtype
        self.attention_backend = attention_backend
        self.image_span = None  # a training step's largest image, in patches (family.set_attention_spans)

    def __call__(self, x, cos, sin, segment, layout=None):
        n = x.shape[0]
        qkv = self.qkv(x).reshape(n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        # RoPE in float32, as the reference does, then back to the compute dtype.
        q = apply_rope(q.astype(jnp.float32), cos[:, None], sin[:, None]).astype(self.dtype)
        k = apply_rope(k.astype(jnp.float32), cos[:, None], sin[:, None]).astype(self.dtype)
        # Without `layout` every patch meets every patch (or, with a training step's `image_span`,
        # those within that many rows), masked to its own image; with it, per-image slots (see
        # attention_slots).
        out = vision_attention(q, k, v, segment, layout, scale=self.head_dim ** -0.5, backend=self.attention_backend,
                               span=self.image_span)
        return self.proj(out.reshape(n, -1))


def attention_slots(segment: np.ndarray, num_real: int | None = None, multiple: int = 64):
    """Host-side layout for per-image vision attention: (slots (S, L), inverse (N,)) int32, or
    None when attention over all N patches at once costs no more.

    Row k of `slots` lists the patch rows of segment (image frame) k, -1 past its end; `inverse`
    maps each patch row back to its place in the flattened (S * L) slot grid. Attention then runs
    per slot at a cost of S * L^2 instead of N^2 (what the reference does with its cumulative
    sequence lengths). S is rounded up to a power of two and L to `multiple` so that similar
    batches share a compiled program. Padding rows (from `num_real` on) get no slot: their
    outputs, never used, come from slot 0's first row.
    """
    segment = np.asarray(segment)
    n = segment.shape[0]
    real = segment[: n if num_real is None else num_real]
    if real.size == 0:
        return None
    ids, starts, counts = np.unique(real, return_index=True, return_counts=True)
    if np.any(np.diff(real) < 0):
        raise ValueError("vision segments must be contiguous and non-decreasing")
    num = 1 << (len(ids) - 1).bit_length()
    width = -(-int(counts.max()) // multiple) * multiple
    if num * width * width >= n * n:
        return None
    slots = np.full((num, width), -1, np.int32)
    inverse = np.zeros(n, np.int32)
    for k, (start, count) in enumerate(zip(starts, counts)):
        slots[k, :count] = np.arange(start, start + count)
        inverse[start:start + count] = k * width + np.arange(count)
    return slots, inverse


class VisionMLP(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs):
        self.linear_fc1 = Linear(cfg.hidden_size, cfg.intermediate_size, axes=("vision_embed", "vision_mlp"),
                                 use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.linear_fc2 = Linear(cfg.intermediate_size, cfg.hidden_size, axes=("vision_mlp", "vision_embed"),
                                 use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.act = activation(cfg.hidden_act)

    def __call__(self, x):
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class VisionBlock(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs, attention_backend: str = "auto"):
        self.norm1 = LayerNorm(cfg.hidden_size, eps=1e-6, axis_name="vision_embed", param_dtype=param_dtype)
        self.norm2 = LayerNorm(cfg.hidden_size, eps=1e-6, axis_name="vision_embed", param_dtype=param_dtype)
        self.attn = VisionAttention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                                    attention_backend=attention_backend)
        self.mlp = VisionMLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, cos, sin, segment, layout=None):
        x = x + self.attn(self.norm1(x), cos, sin, segment, layout)
        return x + self.mlp(self.norm2(x))


class VisionPatchMerger(nnx.Module):
    """Concatenates each 2x2 window of patch features and projects to the LLM width.

    The main merger normalises per patch before concatenating; the deepstack mergers
    (`postshuffle_norm`) normalise the concatenated window.
    """

    def __init__(self, cfg: VisionConfig, *, postshuffle_norm: bool, dtype, param_dtype, rngs):
        self.window_dim = cfg.hidden_size * cfg.spatial_merge_size**2
        self.postshuffle_norm = postshuffle_norm
        self.norm = LayerNorm(self.window_dim if postshuffle_norm else cfg.hidden_size, eps=1e-6,
                              axis_name="vision_merge" if postshuffle_norm else "vision_embed",
                              param_dtype=param_dtype)
        self.linear_fc1 = Linear(self.window_dim, self.window_dim, axes=("vision_merge", "vision_mlp"),
                                 use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.linear_fc2 = Linear(self.window_dim, cfg.out_hidden_size, axes=("vision_mlp", "embed"),
                                 use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x):
        if self.postshuffle_norm:
            x = self.norm(x.reshape(-1, self.window_dim))
        else:
            x = self.norm(x).reshape(-1, self.window_dim)
        return self.linear_fc2(jax.nn.gelu(self.linear_fc1(x), approximate=False))


class VisionModel(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs, attention_backend: str = "auto"):
        self.config = cfg
        self.patch_embed = VisionPatchEmbed(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.pos_embed = nnx.Param(
            0.02 * jax.random.normal(rngs.params(), (cfg.num_position_embeddings, cfg.hidden_size), param_dtype),
            logical_axes=("vision_pos", "vision_embed"),
        )
        self.blocks = nnx.List([VisionBlock(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                                            attention_backend=attention_backend)
                                for _ in range(cfg.depth)])
        self.merger = VisionPatchMerger(cfg, postshuffle_norm=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.deepstack_merger_list = nnx.List([
            VisionPatchMerger(cfg, postshuffle_norm=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            for _ in cfg.deepstack_visual_indexes
        ])
        self.dtype = dtype
        self.remat = "none"  # per-block rematerialisation policy for training (layers.REMAT_POLICIES)
        self.scan_layers = False  # runs of blocks between deepstack taps go through one lax.scan each

    def __call__(self, pixel_values, inputs: VisionInputs | tuple, layout=None):
        """Returns (merged features (N/4, out_hidden), [deepstack features (N/4, out_hidden)...]).

        `layout` (from `attention_slots`) runs attention per image instead of over all patches
        with a block-diagonal mask: the same result, at a cost that no longer grows with the
        square of the total patch count."""
        interp_index, interp_weight, rope_hw, segment = (
            inputs.as_tuple() if isinstance(inputs, VisionInputs) else inputs
        )
        x = self.patch_embed(jnp.asarray(pixel_values))
        table = self.pos_embed[...]
        pos = jnp.einsum("nk,nkd->nd", jnp.asarray(interp_weight, table.dtype), jnp.take(table, interp_index, axis=0))
        x = constrain(x + pos.astype(x.dtype), PATCH_AXES)
        cos, sin = vision_rope(jnp.asarray(rope_hw), self.config)
        segment = jnp.asarray(segment)
        layout = None if layout is None else tuple(jnp.asarray(a) for a in layout)
        deepstack = []
        taps = list(self.config.deepstack_visual_indexes)
        blocks = list(self.blocks)
        start = 0
        for end in sorted(set(taps) | {len(blocks) - 1}):  # runs of blocks, each ending at a tap or the last
            run = blocks[start:end + 1]
            if self.scan_layers and len(run) > 1:
                x, _ = scan_layers(run, self.remat, x, cos, sin, segment, layout, constrain_to=PATCH_AXES)
            else:
                for block in run:
                    x = constrain(call_layer(block, self.remat, x, cos, sin, segment, layout), PATCH_AXES)
            if end in taps:
                deepstack.append(constrain(self.deepstack_merger_list[taps.index(end)](x), MERGED_AXES))
            start = end + 1
        return constrain(self.merger(x), MERGED_AXES), deepstack


def pad_patches(pixel_values: np.ndarray, inputs: VisionInputs, total: int, merge_unit: int = 4):
    """Pads the patch rows to `total` (a fixed budget, so jitted code sees one shape).

    Padding patches form their own attention segment and have zero position weights; they
    yield extra merged rows at the end, which no image token ever gathers.
    """
    n = pixel_values.shape[0]
    if total < n or total % merge_unit:
        raise ValueError(f"patch budget {total} must be >= {n} and a multiple of {merge_unit}")
    extra = total - n
    if extra == 0:
        return pixel_values, inputs
    pad_seg = int(inputs.segment.max()) + 1 if n else 0
    return (
        np.concatenate([pixel_values, np.zeros((extra, pixel_values.shape[1]), pixel_values.dtype)]),
        VisionInputs(
            interp_index=np.concatenate([inputs.interp_index, np.zeros((extra, 4), np.int32)]),
            interp_weight=np.concatenate([inputs.interp_weight, np.zeros((extra, 4), np.float32)]),
            rope_hw=np.concatenate([inputs.rope_hw, np.zeros((extra, 2), np.int32)]),
            segment=np.concatenate([inputs.segment, np.full(extra, pad_seg, np.int32)]),
        ),
    )
