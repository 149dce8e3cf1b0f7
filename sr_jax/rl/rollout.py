"""Rollouts: prompt records -> G sampled completions each (our `generate`) -> rewards ->
the padded arrays of the GRPO update (layout in `sr_jax.rl.grpo`).

`PromptStream` walks the prompt sources epoch by epoch in a seeded order; its state (epoch,
position, skip counts) is a small dict saved with each checkpoint, so a resumed run sees the same
prompts. Rows of a rollout are grouped: rows g*G .. g*G+G-1 are the completions of prompt g.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from sr_jax.data.pipeline import Sources
from sr_jax.data.processor import Processor
from sr_jax.data.records import RecordError, SpatialExample
from sr_jax.data.vocab import VocabMissError, vocab_map_of
from sr_jax.generation import PAD_ID, bucket_length, generate
from sr_jax.models import family_of
from sr_jax.reward import parse_output
from sr_jax.train.step import vision_arrays

log = logging.getLogger(__name__)


class PromptStream:
    def __init__(self, sources, processor: Processor, *, seed: int, shuffle: bool, num_epochs: int,
                 max_prompt_tokens: int | None = None, vocab_map=None):
        self.sources = Sources(list(sources))
        self.vocab_map = vocab_map  # a compact model's: a prompt it cannot read is skipped here, not mid-rollout
        if len(self.sources) == 0:
            raise ValueError("the prompt sources hold no records")
        self.processor, self.seed, self.shuffle, self.num_epochs = processor, seed, shuffle, num_epochs
        self.max_prompt_tokens = max_prompt_tokens
        self.epoch, self.position, self.skipped = 0, 0, {}

    def __len__(self) -> int:
        return len(self.sources)

    def _order(self, epoch: int) -> np.ndarray:
        n = len(self.sources)
        return np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)

    def next_prompts(self, count: int) -> list[tuple[SpatialExample, dict]] | None:
        """`count` (record, encoded prompt) pairs, or None when the epochs are used up. Records that
        fail to decode/encode (or are too long) are skipped and counted by reason."""
        out = []
        while len(out) < count:
            if self.position >= len(self.sources):
                self.epoch, self.position = self.epoch + 1, 0
            if self.epoch >= self.num_epochs:
                return None
            index = int(self._order(self.epoch)[self.position])
            self.position += 1
            try:
                record = self.sources.fetch(index)
                encoded = self.processor.encode(record, with_target=False)
                if self.max_prompt_tokens and encoded["input_ids"].shape[1] > self.max_prompt_tokens:
                    raise RecordError("too_long", f"{encoded['input_ids'].shape[1]} prompt tokens exceed "
                                      f"data.max_prompt_tokens={self.max_prompt_tokens}", record.id)
                if self.vocab_map is not None:
                    try:
                        self.vocab_map.to_compact(encoded["input_ids"], record_id=record.id)
                    except VocabMissError as e:
                        raise RecordError("not_in_vocab_map", str(e), record.id) from None
            except RecordError as e:
                self.skipped[e.reason] = self.skipped.get(e.reason, 0) + 1
                log.warning("skipping prompt record %d: %s", index, e)
                continue
            out.append((record, encoded))
        return out

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "skipped": dict(self.skipped)}

    def set_state(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.skipped = dict(state.get("skipped", {}))


def left_pad(prompts: list[dict], width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Prompt ids/masks left-padded to `width` (default: the longest prompt)."""
    longest = max(p["input_ids"].shape[1] for p in prompts)
    width = longest if width is None else width
    if width < longest:
        raise ValueError(f"width {width} is shorter than the longest prompt ({longest} tokens)")
    ids = np.full((len(prompts), width), PAD_ID, np.int64)
    mask = np.zeros_like(ids)
    for row, p in enumerate(prompts):
        n = p["input_ids"].shape[1]
        ids[row, width - n:], mask[row, width - n:] = p["input_ids"][0], 1
    return ids, mask


def completion_mask(tokens: np.ndarray, stop_ids) -> np.ndarray:
    """1 for completion tokens up to and including the first stop token (all of a row without one)."""
    tokens = np.asarray(tokens)
    is_stop = np.isin(tokens, np.asarray(list(stop_ids)))
    first = np.where(is_stop.any(axis=1), is_stop.argmax(axis=1), tokens.shape[1] - 1)
    return (np.arange(tokens.shape[1])[None, :] <= first[:, None]).astype(np.int32)


def _pixels(prompts: list[dict]):
    with_images = [p for p in prompts if len(p["image_grid_thw"])]
    if not with_images:
        return None, None
    return (np.concatenate([p["pixel_values"] for p in with_images]),
            np.concatenate([p["image_grid_thw"] for p in with_images]))


def _positions(model, ids, mask, grids) -> np.ndarray:
    """M-RoPE ids that skip the left padding (as `generate` numbers the prompt and completion)."""
    positions, _ = family_of(model).module("rope_index").get_rope_index(
        ids, grids, mask, spatial_merge_size=model.config.vision.spatial_merge_size,
        image_token_id=model.config.image_token_id)
    return np.asarray(positions, np.int32)


def sample_completions(model, prompts: list[dict], grpo, seed: int) -> np.ndarray:
    """(len(prompts), max_completion_tokens) new tokens, PAD_ID after the stop token."""
    size = grpo.generation_batch_size or len(prompts)
    chunks = []
    for start in range(0, len(prompts), size):
        part = prompts[start:start + size]
        ids, mask = left_pad(part)
        pixels, grids = _pixels(part)
        chunks.append(generate(model, ids, mask, pixels, grids, max_new_tokens=grpo.max_completion_tokens,
                               temperature=grpo.temperature, top_p=grpo.top_p, top_k=grpo.top_k,
                               seed=seed * 7919 + start, stop_ids=grpo.stop_ids,
                               repetition_penalty=grpo.repetition_penalty))
    return np.concatenate(chunks)


def decode_completions(tokenizer, tokens: np.ndarray, mask: np.ndarray) -> list[str]:
    return [tokenizer.decode([int(t) for t, m in zip(row, mrow) if m], skip_special_tokens=True)
            for row, mrow in zip(tokens, mask)]


def parse_completions(records: list[SpatialExample], texts: list[str]) -> list[dict]:
    return [parse_output(t, with_region=r.task == "sc") for r, t in zip(records, texts)]


@dataclasses.dataclass
class Rollout:
    records: list[SpatialExample]    # one per row (each prompt's record repeated G times)
    prompts: list[dict]              # encoded prompts, one per row
    tokens: np.ndarray               # (R, N) completion tokens
    mask: np.ndarray                 # (R, N) completion mask
    texts: list[str]
    parsed: list[dict]
    rewards: np.ndarray              # (R,) weighted total
    per_function: dict               # name -> (R,) with NaN where not applicable
    advantages: np.ndarray           # (R,)


def _compact(vmap, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Full ids as a compact model's; masked slots get the compact pad (any kept id without one)."""
    fill = PAD_ID if vmap.contains([PAD_ID])[0] else int(vmap.ids[0])
    return vmap.to_compact(np.where(mask > 0, ids, fill))


def microbatches(rollout: Rollout, k: int, model, *, prompt_bucket: int = 64, patch_bucket: int = 256) -> list[dict]:
    """k microbatch dicts of equal shapes (prompt width and patch budget bucketed so repeated
    steps reuse one compiled program)."""
    rows = len(rollout.prompts)
    if rows % k:
        raise ValueError(f"{rows} rollout rows do not split into grad_accum_steps={k} microbatches")
    per = rows // k
    width = bucket_length(max(p["input_ids"].shape[1] for p in rollout.prompts), prompt_bucket)
    patch_counts = [sum(int(p["pixel_values"].shape[0]) for p in rollout.prompts[i * per:(i + 1) * per])
                    for i in range(k)]
    budget = bucket_length(max(max(patch_counts), 4), patch_bucket)
    vmap = vocab_map_of(model)
    out = []
    for i in range(k):
        sl = slice(i * per, (i + 1) * per)
        prompts = rollout.prompts[sl]
        ids, pmask = left_pad(prompts, width)
        tokens, cmask = rollout.tokens[sl], rollout.mask[sl]
        ids = np.concatenate([ids, np.where(cmask > 0, tokens, PAD_ID)], axis=1)
        attn = np.concatenate([pmask, cmask], axis=1)
        completion = np.where(cmask > 0, tokens, PAD_ID)
        if vmap is not None:  # prompts and `generate` speak full ids; a compact model reads its own
            ids, completion = _compact(vmap, ids, attn), _compact(vmap, completion, cmask)
        pixels, grids = _pixels(prompts)
        mb = {"input_ids": ids.astype(np.int32), "attention_mask": attn.astype(np.int32),
              "position_ids": _positions(model, ids, attn, grids),
              "completion_ids": completion.astype(np.int32),
              "completion_mask": cmask.astype(np.int32),
              "advantages": rollout.advantages[sl].astype(np.float32)}
        if pixels is not None:
            mb.update(vision_arrays(pixels, grids, budget, model.config.vision))
        out.append(mb)
    return out
