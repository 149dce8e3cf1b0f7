"""`sr-jax rl`: GRPO on SpatialReward prompts, from an SFT model (full fine-tune or LoRA).

One step = one rollout (data.prompts_per_step prompts x grpo.group_size sampled completions,
scored by the configured rewards) followed by grpo.num_iterations optimizer updates on it. The
run frame is SFT's (`sr_jax.train.loop`: model, mesh, sharded init, optimizer, checkpoints of
state + prompt-stream position, metrics, final save) and the update is the shared step with
`GRPOLoss`; this module holds the RL stage: rollouts as the batch producer and the reference
policy. Resume is exact: rollout sampling is seeded by (train.seed, step).

Several processes (a pod slice): every process runs the same rollout (the same prompts and
seeds, so the same completions from the globally sharded model; generation runs under the mesh,
so the rows are split over the batch axes as in training), process 0 computes the rewards and
broadcasts them (an external judge is called once per completion), and each process places its
devices' slices of the update batch; process 0 writes the metrics, the run config and the
tokenizer.

The reference policy is the starting weights: a frozen copy of the trainable parameters for a
full fine-tune (rebuilt from `model.init_from` on resume, not checkpointed), and for LoRA the
base model with the adapters zeroed (no second copy). beta = 0 skips it.
"""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from sr_jax.data.processor import Processor
from sr_jax.data.vocab import build_vocab_map
from sr_jax.rl.config import RLConfig
from sr_jax.rl.grpo import GRPOStep, group_advantages
from sr_jax.rl.rewards import RewardDataError, RewardSet, check_rewards_against_data
from sr_jax.rl.rollout import (
    PromptStream,
    Rollout,
    completion_mask,
    decode_completions,
    microbatches,
    parse_completions,
    sample_completions,
)
from sr_jax.sharding import use_mesh
from sr_jax.train.loop import Trainer, register_command, run, run_vocab_map, tokenizer_source
from sr_jax.train.step import split_model, stack_microbatches


def make_processor(cfg: RLConfig):
    # The official RL run used ms-swift, not LLaMA-Factory: its images keep sr_jax's one resize.
    return Processor(tokenizer_source(cfg), min_pixels=cfg.data.min_pixels, max_pixels=cfg.data.max_pixels,
                     templates=cfg.data.templates, image_resize="sr_jax")


class RLTrainer(Trainer):
    """The shared `Trainer` with the GRPO step, plus the reference weights. `total_steps` counts
    rollouts (each makes grpo.num_iterations optimizer updates)."""

    def __init__(self, cfg: RLConfig, *, devices=None, total_steps: int = 1, vocab_map=None):
        cfg.grpo.validate()
        super().__init__(cfg, devices=devices, total_steps=total_steps * cfg.grpo.num_iterations,
                         make_step=lambda model, opt, mesh, train: GRPOStep(model, opt, mesh, train, cfg.grpo),
                         vocab_map=vocab_map)
        self.ref_params = None
        if cfg.grpo.beta > 0:
            _, params, _, _ = split_model(self.model, cfg.train)
            shardings = self.step.state_shardings.params
            # LoRA: adapters at zero = the base model. Full fine-tune: a copy, since the step donates the live weights.
            make = (lambda p: jax.tree.map(jnp.zeros_like, p)) if cfg.train.lora.enabled \
                else (lambda p: jax.tree.map(jnp.copy, p))
            with use_mesh(self.mesh, self.step.rules):
                self.ref_params = jax.jit(make, out_shardings=shardings)(params)


def total_rollout_steps(cfg: RLConfig, num_records: int) -> int:
    if cfg.run.total_steps:
        return cfg.run.total_steps
    return max(1, math.ceil(cfg.data.num_epochs * num_records / cfg.data.prompts_per_step))


def rollout(trainer: RLTrainer, state, stream, rewards, processor, step: int):
    """Samples, scores and prepares one step's rollout. Returns (Rollout, microbatches) or None at
    the end of the prompts."""
    cfg, g = trainer.cfg, trainer.cfg.grpo.group_size
    pairs = stream.next_prompts(cfg.data.prompts_per_step)
    if pairs is None:
        return None
    records = [r for r, _ in pairs for _ in range(g)]
    prompts = [p for _, p in pairs for _ in range(g)]
    model = trainer.step.model(state)
    with use_mesh(trainer.mesh, trainer.step.rules):  # rows split over the batch axes: each device samples its share
        tokens = sample_completions(model, prompts, cfg.grpo, seed=cfg.train.seed * 1_000_003 + step)
    mask = completion_mask(tokens, cfg.grpo.stop_ids)
    texts = decode_completions(processor.tokenizer, tokens, mask)
    parsed = parse_completions(records, texts)
    # Process 0 scores (one call per completion to an external judge) and shares the totals.
    total, per_function = rewards.score(records, texts, parsed) if jax.process_index() == 0 \
        else (np.zeros(len(texts)), {})
    if jax.process_count() > 1:
        total = np.asarray(multihost_utils.broadcast_one_to_all(total))
    advantages = group_advantages(total, g, cfg.grpo.advantage_eps, cfg.grpo.advantage_std_ddof)
    result = Rollout(records, prompts, tokens, mask, texts, parsed, total, per_function, advantages)
    mbs = microbatches(result, cfg.train.grad_accum_steps, model)
    for mb in mbs:
        if trainer.ref_params is not None:
            mb["ref_logp"] = np.asarray(trainer.step.logprobs(trainer.ref_params, state.frozen, mb))
        if cfg.grpo.num_iterations > 1:
            mb["old_logp"] = np.asarray(trainer.step.logprobs(state.params, state.frozen, mb))
    return result, mbs


def rollout_metrics(result, group_size: int, stop_ids) -> dict:
    lengths = result.mask.sum(axis=1)
    stopped = np.isin(result.tokens, np.asarray(list(stop_ids))).any(axis=1)
    groups = result.rewards.reshape(-1, group_size)
    out = {"reward": float(result.rewards.mean()), "reward_std": float(result.rewards.std()),
           "parse_rate": float(np.mean([p["parsed"] for p in result.parsed])),
           "completion_length": float(lengths.mean()), "truncated_fraction": float(1.0 - stopped.mean()),
           "zero_std_groups": float(np.mean(groups.std(axis=1) == 0))}
    for name, values in result.per_function.items():
        if not np.isnan(values).all():
            out[f"reward/{name}"] = float(np.nanmean(values))
    return out


class RLStage:
    """The RL side of the shared loop: rollouts as the batch producer, the GRPO update."""

    kind = "rl"
    progress_desc = "rl"

    def __init__(self, cfg: RLConfig, devices=None):
        cfg.grpo.validate()
        self.cfg = cfg
        self.processor = processor = make_processor(cfg)
        # A reduced vocabulary: a compact init_from model's (usual: GRPO after a compact SFT stage),
        # a file, or `synthetic`: built from the prompt sources' records (answers included).
        self.vocab_map = run_vocab_map(cfg, processor.tokenizer, cfg.run.out_dir,
                                       build=lambda: build_vocab_map(cfg.data.sources, processor))
        self.stream = PromptStream(cfg.data.sources, self.processor, seed=cfg.data.seed, shuffle=cfg.data.shuffle,
                                   num_epochs=cfg.data.num_epochs, max_prompt_tokens=cfg.data.max_prompt_tokens,
                                   vocab_map=self.vocab_map)
        check_rewards_against_data(cfg.rewards, list(cfg.data.sources), self.stream.sources)
        self.rewards = RewardSet.from_config(cfg.rewards)
        rows = cfg.data.prompts_per_step * cfg.grpo.group_size
        if rows % cfg.train.grad_accum_steps:
            raise ValueError(f"prompts_per_step x group_size = {rows} rows must divide by train.grad_accum_steps="
                             f"{cfg.train.grad_accum_steps}")
        self.total_steps = total_rollout_steps(cfg, len(self.stream))
        self.trainer = RLTrainer(cfg, devices=devices, total_steps=self.total_steps, vocab_map=self.vocab_map)

    def advance(self, state, step: int):
        cfg, trainer = self.cfg, self.trainer
        t0 = time.perf_counter()
        made = rollout(trainer, state, self.stream, self.rewards, self.processor, step)
        if made is None:
            return None  # prompts used up
        result, mbs = made
        t1 = time.perf_counter()
        batch = stack_microbatches(mbs)
        updates = []
        for _ in range(cfg.grpo.num_iterations):
            state, m = trainer.step(state, batch)
            updates.append({k: float(v) for k, v in jax.device_get(m).items()})
        metrics = rollout_metrics(result, cfg.grpo.group_size, cfg.grpo.stop_ids)
        metrics.update({k: float(np.mean([u[k] for u in updates])) for k in updates[0]})
        metrics.update(rollout_time_s=t1 - t0, update_time_s=time.perf_counter() - t1)
        return state, metrics

    def get_state(self):
        return self.stream.get_state()

    def set_state(self, state) -> None:
        self.stream.set_state(state)

    def skipped(self) -> dict:
        return dict(self.stream.skipped)

    def meta(self) -> dict:
        return {}

    def postfix(self, metrics: dict) -> dict:
        return dict(reward=f"{metrics['reward']:.3f}", kl=f"{metrics['kl']:.4f}",
                    len=f"{metrics['completion_length']:.0f}")


def train(cfg: RLConfig, *, devices=None, stop_after: int | None = None) -> dict:
    """Runs (or resumes) the config; returns a summary. `stop_after` ends after that many steps of
    this call (tests use it to simulate an interruption). The run directory is locked for the whole
    run (`sr_jax.train.runlock`): a second trainer on it raises RunDirLocked."""
    return run(cfg, RLStage, devices=devices, stop_after=stop_after)


# ---- CLI ----

def register(sub) -> None:
    register_command(sub, "rl", help="GRPO reinforcement learning of the reward model", config_cls=RLConfig,
                     train=train, example_config="configs/rl/demo_cpu.yaml",
                     example_overrides="run.total_steps=10 grpo.beta=0.04", errors={RewardDataError: 2})
