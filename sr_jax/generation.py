"""Batched generation: one jitted prefill (images included) plus a `lax.while_loop` of decode
steps over a preallocated KV cache.

Prompt lengths, patch counts and `max_new_tokens` are rounded up to buckets so that repeated
calls with similar inputs reuse one compiled program. Positions follow HF: the prompt's 3-D M-RoPE ids
come from `get_rope_index` (padding-aware), and generated token i sits at max prompt position
+ 1 + i on all three axes.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sr_jax.data.vocab import vocab_map_of
from sr_jax.models import family_of
from sr_jax.sharding import active_rules, constrain
from sr_jax.special_tokens import DEFAULT_STOP_IDS, PAD_ID  # noqa: F401  (also imported from here)

TRACE_COUNT: collections.Counter = collections.Counter()  # incremented when a program is (re)traced


def bucket_length(n: int, minimum: int = 64) -> int:
    """Powers of two up to 256, then multiples of 128 up to 2048, of 512 up to 8192, then of 2048:
    few compiled programs, and a long prompt carries little padding (608 tokens run as 640)."""
    if n <= minimum:
        return minimum
    if n <= 256:
        return 1 << (n - 1).bit_length()
    step = 128 if n <= 2048 else 512 if n <= 8192 else 2048
    return -(-n // step) * step


def bucket_new_tokens(n: int, minimum: int = 16) -> int:
    """The compiled decode length for a request of `n` new tokens: powers of two up to 256, then
    multiples of 256. The loop still stops after `n` steps (a traced limit), so a bucket costs only
    its KV-cache slots, and every `n` in a bucket shares one program."""
    if n <= minimum:
        return minimum
    if n <= 256:
        return 1 << (n - 1).bit_length()
    return -(-n // 256) * 256


@dataclasses.dataclass(frozen=True)
class _Static:
    max_new_tokens: int
    greedy: bool
    top_k: int
    use_top_p: bool
    use_repetition_penalty: bool
    segmented: bool = False  # the program returns its whole carry, to be continued


def _apply_repetition_penalty(logits, seen, penalty):
    penalised = jnp.where(logits > 0, logits / penalty, logits * penalty)
    return jnp.where(seen, penalised, logits)


def _nucleus(ordered, top_p):
    """For logits sorted in descending order: True on the smallest prefix whose probability
    reaches top_p (the most likely token is always kept)."""
    probs = jax.nn.softmax(ordered, axis=-1)
    return jnp.cumsum(probs, axis=-1) - probs < top_p


def _sample(logits, rng, temperature, top_p, static: _Static):
    if static.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if static.top_k > 0:
        # Top-k first, as HF's warpers run; top-p and the draw then work on k sorted candidates
        # instead of sorting the whole vocabulary every step (~1 s at 16 x 151936 on a CPU).
        candidates, index = jax.lax.top_k(logits, static.top_k)
        if static.use_top_p:
            candidates = jnp.where(_nucleus(candidates, top_p), candidates, -jnp.inf)
        choice = jax.random.categorical(rng, candidates, axis=-1)
        return jnp.take_along_axis(index, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    if static.use_top_p:
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]
        floor = jnp.min(jnp.where(_nucleus(ordered, top_p), ordered, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < floor, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _generate_program(state, ids, mask, positions, next_pos, pixel_values, vision, vision_layout, rng, temperature,
                      top_p, penalty, stop_ids, limit, *, graphdef, static: _Static):
    TRACE_COUNT["generate"] += 1
    model = nnx.merge(graphdef, state)
    tcfg = model.config.text
    batch, prompt_len = ids.shape
    n_new = static.max_new_tokens
    total = prompt_len + n_new
    dtype = model.model.language_model.dtype
    cache = [(jnp.zeros((batch, total, tcfg.num_key_value_heads, tcfg.head_dim), dtype),) * 2
             for _ in range(tcfg.num_hidden_layers)]
    key_valid = jnp.concatenate([mask.astype(bool), jnp.zeros((batch, n_new), bool)], axis=1)
    causal = jnp.arange(total)[None, :] <= jnp.arange(prompt_len)[:, None]
    out = model.features(ids, mask, pixel_values, position_ids=positions,
                         vision=vision, mask=causal[None] & key_valid[:, None, :], kv_cache=cache, cache_index=0,
                         vision_layout=vision_layout)
    last = prompt_len - 1 - jnp.argmax(mask[:, ::-1], axis=1)
    logits = model.logits(out.hidden[jnp.arange(batch), last]).astype(jnp.float32)

    vocab = logits.shape[-1]
    seen = jnp.zeros((batch, vocab), bool)
    if static.use_repetition_penalty:
        seen = seen.at[jnp.arange(batch)[:, None], ids].max(mask.astype(bool))
        logits = _apply_repetition_penalty(logits, seen, penalty)
    tok = _sample(logits, jax.random.fold_in(rng, 0), temperature, top_p, static)
    tokens = jnp.full((batch, n_new), PAD_ID, jnp.int32).at[:, 0].set(tok)
    done = jnp.isin(tok, stop_ids)
    if static.use_repetition_penalty:
        seen = seen.at[jnp.arange(batch), tok].set(True)

    carry = (jnp.int32(1), tok, tokens, done, out.kv_cache, key_valid, seen)
    carry = _decode_loop(model, carry, prompt_len, next_pos, rng, temperature, top_p, penalty, stop_ids, limit, static)
    if static.segmented:
        return carry
    # Under a mesh (`jax.set_mesh`) the activations follow the batch rules, so each device decodes
    # its own rows; the tokens come back whole on every device (and every process).
    return constrain(carry[2], (None, None))


def _continue_program(state, carry, next_pos, rng, temperature, top_p, penalty, stop_ids, limit, *, graphdef,
                      static: _Static):
    """More decode steps of a segmented generation, from the carry the previous program returned."""
    TRACE_COUNT["generate_continue"] += 1
    model = nnx.merge(graphdef, state)
    prompt_len = carry[5].shape[1] - static.max_new_tokens
    return _decode_loop(model, carry, prompt_len, next_pos, rng, temperature, top_p, penalty, stop_ids, limit, static)


def _decode_loop(model, carry, prompt_len, next_pos, rng, temperature, top_p, penalty, stop_ids, limit,
                 static: _Static):
    """Decode steps until step `limit` or until every row has stopped. Step i samples with
    fold_in(rng, i) whatever program runs it, so segmenting never changes a token."""
    batch = carry[1].shape[0]

    def cond(carry):
        i, _, _, done, _, _, _ = carry
        return (i < limit) & ~jnp.all(done)

    def body(carry):
        i, tok, tokens, done, cache, key_valid, seen = carry
        slot = prompt_len + i - 1  # where the previous token's keys/values go
        key_valid = key_valid.at[:, slot].set(True)
        pos = jnp.broadcast_to((next_pos + i - 1)[None, :, None], (3, batch, 1))
        step = model.features(tok[:, None], jnp.ones((batch, 1), jnp.int32), position_ids=pos,
                              mask=key_valid[:, None, :], kv_cache=cache, cache_index=slot)
        logits = model.logits(step.hidden[:, 0]).astype(jnp.float32)
        if static.use_repetition_penalty:
            logits = _apply_repetition_penalty(logits, seen, penalty)
        new = _sample(logits, jax.random.fold_in(rng, i), temperature, top_p, static)
        new = jnp.where(done, PAD_ID, new)
        if static.use_repetition_penalty:
            seen = seen.at[jnp.arange(batch), new].set(True)
        tokens = tokens.at[:, i].set(new)
        done = done | jnp.isin(new, stop_ids)
        return i + 1, new, tokens, done, step.kv_cache, key_valid, seen

    return jax.lax.while_loop(cond, body, carry)


# `rules` (the enclosing `use_mesh`'s) only keys the cache: the trace bakes them into the program.
@functools.lru_cache(maxsize=64)
def _compiled(graphdef, static: _Static, rules=None):
    return jax.jit(functools.partial(_generate_program, graphdef=graphdef, static=static))


@functools.lru_cache(maxsize=64)
def _compiled_continue(graphdef, static: _Static, rules=None):
    # The carry (KV cache included) is donated: a segment reuses its buffers instead of doubling them.
    return jax.jit(functools.partial(_continue_program, graphdef=graphdef, static=static), donate_argnums=(1,))


def generate(model, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None, max_new_tokens=128,
             temperature=0.0, top_p=1.0, top_k=0, seed=0, stop_ids=None, repetition_penalty=1.0,
             min_prompt_bucket: int = 64, should_stop: Callable[[], bool] | None = None,
             segment: int = 64) -> np.ndarray:
    """New token ids (batch, max_new_tokens); after a stop token the row holds PAD_ID.
    Ids in and out are full-vocabulary ids, also for a reduced-vocabulary model (`model.vocab_map`).

    Inputs are laid out as for the model call (left or right padding both work).
    `temperature == 0` is greedy decoding. With `should_stop`, decoding runs in segments of
    `segment` steps (identical tokens) and ends early once `should_stop()` is true between two
    segments (the rest of the rows is pad): how a server abandons work nobody waits for. It is a
    host-side decision, so under several processes leave it None (they must run the same steps).
    """
    ids = np.asarray(input_ids, np.int64)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be (batch, seq), got {ids.shape}")
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, np.int64)
    if (mask.sum(1) == 0).any():
        raise ValueError("a batch row has no real tokens")
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    if segment < 1:
        raise ValueError("segment must be >= 1")
    vmap = vocab_map_of(model)
    stop_ids = DEFAULT_STOP_IDS if stop_ids is None else list(stop_ids)
    pad_id = PAD_ID
    if vmap is not None:
        # A reduced-vocabulary model: full ids in, compact ids through the program, full ids out.
        # Stop ids outside the map can never be produced; PAD_ID stays the fill of finished rows
        # (no compact id reaches it), so it is told apart from generated tokens below.
        if len(vmap) > PAD_ID:
            raise ValueError(f"a vocabulary map of {len(vmap)} tokens leaves no room for the pad fill {PAD_ID}")
        ids = vmap.to_compact(np.where(mask > 0, ids, vmap.ids[0]))  # padding: any kept id (masked)
        stop_ids = [vmap.compact_id(i) for i in stop_ids if vmap.contains([i])[0]]
        pad_id = vmap.compact_id(PAD_ID) if vmap.contains([PAD_ID])[0] else 0
    cfg = model.config
    family = family_of(model)  # its position ids and host-side vision layout
    grids = None if image_grid_thw is None else np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
    positions, _ = family.module("rope_index").get_rope_index(
        ids, grids, mask, spatial_merge_size=cfg.vision.spatial_merge_size, image_token_id=cfg.image_token_id)
    next_pos = np.where(mask.astype(bool)[None], positions, -1).max(axis=(0, 2)) + 1

    batch, seq = ids.shape
    width = bucket_length(seq, min_prompt_bucket)
    pad = width - seq
    ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=pad_id)
    mask = np.pad(mask, ((0, 0), (0, pad)))
    positions = np.pad(positions, ((0, 0), (0, 0), (0, pad)))

    vision, layout = None, None
    if pixel_values is not None:
        if grids is None:
            raise ValueError("pixel_values given without image_grid_thw")
        pv = np.asarray(pixel_values, np.float32)
        num_patches = pv.shape[0]
        vision_host = family.module("vision")
        pv, vinputs = vision_host.pad_patches(pv, model.prepare_vision(grids), bucket_length(num_patches, 256))
        layout = vision_host.attention_slots(vinputs.segment, num_real=num_patches)
        pixel_values, vision = pv, vinputs.as_tuple()

    static = _Static(
        max_new_tokens=bucket_new_tokens(int(max_new_tokens)),
        greedy=temperature <= 0,
        top_k=int(top_k),
        use_top_p=top_p < 1.0,
        use_repetition_penalty=repetition_penalty != 1.0,
        segmented=should_stop is not None,
    )
    stops = jnp.asarray(np.asarray(stop_ids, np.int32).reshape(-1))
    graphdef, state = nnx.split(model)
    next_pos = jnp.asarray(next_pos, jnp.int32)
    rng, sampling = jax.random.PRNGKey(seed), (jnp.float32(max(temperature, 1e-6)), jnp.float32(top_p),
                                              jnp.float32(repetition_penalty), stops)
    first = max_new_tokens if should_stop is None else min(max_new_tokens, segment)
    out = _compiled(graphdef, static, active_rules())(
        state, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32), jnp.asarray(positions, jnp.int32),
        next_pos, pixel_values, vision, layout, rng, *sampling, jnp.int32(first))
    if should_stop is None:
        return _full_ids(np.asarray(out)[:, :max_new_tokens], vmap)
    # Segmented: between segments the host asks whether the caller still wants the answer; the
    # tokens of a stopped run end where it stopped (pad after).
    while (step := int(out[0])) < max_new_tokens and not bool(np.all(out[3])) and not should_stop():
        out = _compiled_continue(graphdef, static, active_rules())(state, out, next_pos, rng, *sampling,
                                                   jnp.int32(min(step + segment, max_new_tokens)))
    return _full_ids(np.asarray(out[2])[:, :max_new_tokens], vmap)


def _full_ids(tokens: np.ndarray, vmap) -> np.ndarray:
    """A reduced-vocabulary model's new tokens as full ids (the PAD_ID fill stays PAD_ID)."""
    if vmap is None:
        return tokens
    fill = tokens == PAD_ID
    return np.where(fill, PAD_ID, vmap.to_full(np.where(fill, 0, tokens))).astype(tokens.dtype)
