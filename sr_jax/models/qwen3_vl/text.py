"""Qwen3-VL text decoder: GQA with q/k RMSNorm, interleaved multimodal RoPE, SwiGLU MLP,
and deepstack visual features added after the first decoder layers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sr_jax.models.attention import Segments, resolve_backend, text_attention
from sr_jax.models.qwen3_vl.config import TextConfig
from sr_jax.models.layers import (Embed, Linear, RMSNorm, activation, apply_rope, call_layer,
                                 masked_softmax_attention, scan_layers)
from sr_jax.sharding import constrain

HIDDEN_AXES = ("batch", "seq", "act_embed")


def mrope_axis_of_frequency(cfg: TextConfig) -> np.ndarray:
    """For each of the head_dim/2 rotary frequencies, which position axis (0=t, 1=h, 2=w) drives it.

    Interleaved layout: frequency i uses h when i % 3 == 1 and i < 3*section_h, w when
    i % 3 == 2 and i < 3*section_w, and t otherwise.
    """
    half = cfg.head_dim // 2
    axis = np.zeros(half, np.int32)
    for dim, offset in ((1, 1), (2, 2)):
        axis[offset: 3 * cfg.mrope_section[dim]: 3] = dim
    return axis


def text_rope(position_ids: jax.Array, cfg: TextConfig, dtype):
    """position_ids (3, B, T) -> cos, sin (B, T, head_dim), computed in float32 then cast."""
    half = cfg.head_dim // 2
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(half, dtype=jnp.float32) * 2 / cfg.head_dim))
    freqs = position_ids.astype(jnp.float32)[..., None] * inv_freq  # (3, B, T, half)
    axis = jnp.asarray(mrope_axis_of_frequency(cfg))
    picked = jnp.where(axis == 0, freqs[0], jnp.where(axis == 1, freqs[1], freqs[2]))
    emb = jnp.concatenate([picked, picked], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


class TextAttention(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, param_dtype, rngs, attention_backend: str = "auto"):
        h, d = cfg.num_attention_heads, cfg.head_dim
        kv = cfg.num_key_value_heads
        lin = dict(use_bias=cfg.attention_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = Linear(cfg.hidden_size, h * d, axes=("embed", "q_heads"), **lin)
        self.k_proj = Linear(cfg.hidden_size, kv * d, axes=("embed", "kv_heads"), **lin)
        self.v_proj = Linear(cfg.hidden_size, kv * d, axes=("embed", "kv_heads"), **lin)
        self.o_proj = Linear(h * d, cfg.hidden_size, axes=("q_heads", "embed"), **lin)
        self.q_norm = RMSNorm(d, eps=cfg.rms_norm_eps, axis_name="head_dim", param_dtype=param_dtype)
        self.k_norm = RMSNorm(d, eps=cfg.rms_norm_eps, axis_name="head_dim", param_dtype=param_dtype)
        self.num_heads, self.num_kv_heads, self.head_dim = h, kv, d
        self.attention_backend = attention_backend
        self.segment_span = None  # a training step's longest packed segment (family.set_attention_spans)

    def project_qkv(self, x, cos, sin):
        b, t, _ = x.shape
        q = self.q_norm(self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim))
        k = self.k_norm(self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim))
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        q = apply_rope(q, cos[:, :, None], sin[:, :, None])
        k = apply_rope(k, cos[:, :, None], sin[:, :, None])
        return q, k, v

    def attend(self, q, k, v, mask, causal: bool = False):
        """q (B, Tq, H, D); k, v (B, Tk, KV, D); mask (B, Tq, Tk), or `Segments` for a causal full
        pass on a non-cpu backend -> (B, Tq, hidden)."""
        b, tq = q.shape[:2]
        groups = self.num_heads // self.num_kv_heads
        q = q.reshape(b, tq, self.num_kv_heads, groups, self.head_dim)
        if causal:
            out = text_attention(q, k, v, mask, scale=self.head_dim**-0.5, backend=self.attention_backend,
                                 span=self.segment_span)
        else:
            out = masked_softmax_attention(q, k, v, mask, scale=self.head_dim**-0.5)
        return self.o_proj(out.reshape(b, tq, self.num_heads * self.head_dim))

    def __call__(self, x, cos, sin, mask, kv_cache=None, cache_index=None):
        """With `kv_cache` (k, v) of shape (B, S, KV, D), this call's keys/values are written at
        `cache_index` and attention runs over the whole cache; returns (out, new_cache) then.
        A multi-token call at a static `cache_index` 0 is a prefill into an empty cache: it
        attends over its own keys only, in causal blocks (its mask must be causal)."""
        q, k, v = self.project_qkv(x, cos, sin)
        if kv_cache is None:  # a full pass: the mask is attention_mask_3d's, causal
            return self.attend(q, k, v, mask, causal=True)
        ck, cv = kv_cache
        ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, cache_index, 0, 0))
        cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, cache_index, 0, 0))
        t = q.shape[1]
        if isinstance(cache_index, int) and cache_index == 0 and t > 1:
            return self.attend(q, k, v, mask[:, :, :t], causal=True), (ck, cv)
        return self.attend(q, ck, cv, mask), (ck, cv)


class TextMLP(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, param_dtype, rngs):
        lin = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, axes=("embed", "mlp"), **lin)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, axes=("embed", "mlp"), **lin)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, axes=("mlp", "embed"), **lin)
        self.act = activation(cfg.hidden_act)

    def __call__(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class TextDecoderLayer(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, param_dtype, rngs, attention_backend: str = "auto"):
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, axis_name="embed",
                                       param_dtype=param_dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, axis_name="embed",
                                                param_dtype=param_dtype)
        self.self_attn = TextAttention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                                       attention_backend=attention_backend)
        self.mlp = TextMLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, cos, sin, mask, kv_cache=None, cache_index=None):
        if kv_cache is None:
            x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
            return x + self.mlp(self.post_attention_layernorm(x))
        attn, kv_cache = self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache, cache_index)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x)), kv_cache


def attention_mask_3d(attention_mask, segment_ids=None):
    """Causal mask (B, T, T), restricted to real keys and, for packed rows, to the same segment."""
    t = attention_mask.shape[1]
    causal = jnp.tril(jnp.ones((t, t), bool))
    mask = causal[None] & attention_mask.astype(bool)[:, None, :]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    return mask


class TextModel(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, param_dtype, rngs, attention_backend: str = "auto"):
        self.config = cfg
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, axes=("vocab", "embed"), dtype=dtype,
                                  param_dtype=param_dtype, rngs=rngs)
        self.layers = nnx.List([TextDecoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                                                 attention_backend=attention_backend)
                                for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, axis_name="embed", param_dtype=param_dtype)
        self.dtype = dtype
        self.remat = "none"  # per-layer rematerialisation policy for training (layers.REMAT_POLICIES)
        self.attention_backend = attention_backend
        self.scan_layers = False  # full passes run the layers after the deepstack ones in one lax.scan

    def __call__(self, inputs_embeds, position_ids, attention_mask, *, visual_index=None, deepstack=(),
                 segment_ids=None, output_hidden_states=False, mask=None, kv_cache=None, cache_index=None):
        """inputs_embeds (B, T, hidden); position_ids (3, B, T); attention_mask (B, T).

        `visual_index` (B, T) holds, for each image-token position, its row in the visual feature
        arrays and -1 elsewhere; `deepstack[i]` is added at those positions after layer i.
        Decoding passes `kv_cache` (one (k, v) per layer), `cache_index` and an explicit `mask`
        (B, T, S) over the cache slots (causal when it is a prefill at `cache_index` 0); it then
        returns (hidden, new_cache).
        """
        cos, sin = text_rope(position_ids, self.config, self.dtype)
        if mask is not None and kv_cache is None:
            raise ValueError("an explicit `mask` belongs to the cached decoding path (pass kv_cache)")
        if mask is None and resolve_backend(self.attention_backend) == "cpu":
            mask = attention_mask_3d(attention_mask, segment_ids)
        elif mask is None:  # the other kernels take segment ids: no (B, T, T) mask is built
            mask = Segments.from_masks(attention_mask, segment_ids)
        x = constrain(inputs_embeds, HIDDEN_AXES)
        hidden_states, new_cache = [], []
        layers = list(self.layers)
        scanned = []
        if kv_cache is None and self.scan_layers and len(layers) - len(deepstack) > 1:
            # The deepstack layers run one by one (a feature is added after each), the rest as one scan.
            layers, scanned = layers[:len(deepstack)], layers[len(deepstack):]
        for i, layer in enumerate(layers):
            if kv_cache is None:
                x = constrain(call_layer(layer, self.remat, x, cos, sin, mask), HIDDEN_AXES)
            else:
                x, layer_cache = layer(x, cos, sin, mask, kv_cache[i], cache_index)
                new_cache.append(layer_cache)
            if output_hidden_states:  # the layer's own output, before any deepstack addition (as HF records it)
                hidden_states.append(x)
            if i < len(deepstack):
                x = add_visual(x, visual_index, deepstack[i])
        if scanned:
            x, outs = scan_layers(scanned, self.remat, x, cos, sin, mask, constrain_to=HIDDEN_AXES,
                                  collect=output_hidden_states)
            if output_hidden_states:
                hidden_states += list(outs)
        x = self.norm(x)
        if kv_cache is not None:
            return x, new_cache
        return (x, hidden_states) if output_hidden_states else x


def add_visual(x, visual_index, features):
    """x[b, t] += features[visual_index[b, t]] where visual_index >= 0 (a jit-friendly scatter)."""
    gathered = jnp.take(features.astype(x.dtype), jnp.maximum(visual_index, 0), axis=0)
    return x + jnp.where((visual_index >= 0)[..., None], gathered, 0)
