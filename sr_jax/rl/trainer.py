"""`sr-jax rl`: GRPO on SpatialReward prompts, from an SFT model (full fine-tune or LoRA).

One step = one rollout (data.prompts_per_step prompts x grpo.group_size sampled completions,
scored by the configured rewards) followed by grpo.num_iterations optimizer updates on it. The
model, mesh, sharded init and optimizer come from the SFT `Trainer`; checkpoints (state +
prompt-stream position) and metrics (JSONL + TensorBoard) use the SFT classes, so resume is
exact: rollout sampling is seeded by (train.seed, step).

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

import dataclasses
import logging
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from sr_jax.config import dump_yaml, load_config
from sr_jax.rl.config import RLConfig
from sr_jax.sharding import use_mesh

log = logging.getLogger(__name__)


def _sft_view(cfg: RLConfig):
    """The SFT config the shared `Trainer` and tokenizer helper read (model, train, run)."""
    from sr_jax.data.pipeline import DataConfig
    from sr_jax.train.sft import SFTConfig

    return SFTConfig(model=cfg.model, train=cfg.train, run=cfg.run,
                     data=DataConfig(sources=list(cfg.data.sources), tokenizer=cfg.data.tokenizer))


def make_processor(cfg: RLConfig):
    from sr_jax.data.processor import Processor

    tokenizer = cfg.data.tokenizer
    if tokenizer is None and cfg.model.init_from and (Path(cfg.model.init_from) / "tokenizer.json").is_file():
        tokenizer = cfg.model.init_from
    # The official RL run used ms-swift, not LLaMA-Factory: its images keep sr_jax's one resize.
    return Processor(tokenizer, min_pixels=cfg.data.min_pixels, max_pixels=cfg.data.max_pixels,
                     templates=cfg.data.templates, image_resize="sr_jax")


class RLTrainer:
    """Model, mesh, optimizer, GRPO step and reference weights for one RL config."""

    def __init__(self, cfg: RLConfig, *, devices=None, total_steps: int = 1):
        from sr_jax.rl.grpo import GRPOStep
        from sr_jax.train.sft import Trainer
        from sr_jax.train.step import split_model

        cfg.grpo.validate()
        self.cfg = cfg
        base = Trainer(_sft_view(cfg), devices=devices, total_steps=total_steps * cfg.grpo.num_iterations)
        self.base, self.mesh, self.optimizer, self.model = base, base.mesh, base.optimizer, base.model
        self.step = GRPOStep(base.model, base.optimizer, base.mesh, cfg.train, cfg.grpo)
        base.step = self.step  # so `abstract_state` uses the GRPO step's shardings
        self.ref_params = None
        if cfg.grpo.beta > 0:
            _, params, _, _ = split_model(base.model, cfg.train)
            shardings = self.step.state_shardings.params
            # LoRA: adapters at zero = the base model. Full fine-tune: a copy, since the step donates the live weights.
            make = (lambda p: jax.tree.map(jnp.zeros_like, p)) if cfg.train.lora.enabled \
                else (lambda p: jax.tree.map(jnp.copy, p))
            with use_mesh(self.mesh, self.step.rules):
                self.ref_params = jax.jit(make, out_shardings=shardings)(params)

    def init_state(self):
        return self.base.init_state()

    def abstract_state(self):
        return self.base.abstract_state()


def total_rollout_steps(cfg: RLConfig, num_records: int) -> int:
    if cfg.run.total_steps:
        return cfg.run.total_steps
    return max(1, math.ceil(cfg.data.num_epochs * num_records / cfg.data.prompts_per_step))


def rollout(trainer: RLTrainer, state, stream, rewards, processor, step: int):
    """Samples, scores and prepares one step's rollout. Returns (Rollout, microbatches) or None at
    the end of the prompts."""
    from sr_jax.rl.grpo import group_advantages
    from sr_jax.rl.rollout import (Rollout, completion_mask, decode_completions, microbatches,
                                   parse_completions, sample_completions)

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
        from jax.experimental import multihost_utils

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


def train(cfg: RLConfig, *, devices=None, stop_after: int | None = None) -> dict:
    """Runs (or resumes) the config; returns a summary. `stop_after` ends after that many steps of
    this call (tests use it to simulate an interruption). The run directory is locked for the whole
    run (`sr_jax.train.runlock`): a second trainer on it raises RunDirLocked."""
    from sr_jax.sharding import maybe_initialize_distributed
    from sr_jax.train.runlock import RunLock

    maybe_initialize_distributed()
    with RunLock(cfg.run.out_dir, jax.process_index()):
        return _train_locked(cfg, devices=devices, stop_after=stop_after)


def _train_locked(cfg: RLConfig, *, devices=None, stop_after: int | None = None) -> dict:
    from tqdm import tqdm

    from sr_jax.rl.rewards import RewardSet, check_rewards_against_data
    from sr_jax.rl.rollout import PromptStream
    from sr_jax.sharding import maybe_initialize_distributed
    from sr_jax.train.checkpoint import RUN_CONFIG, TrainCheckpointer
    from sr_jax.train.metrics import MetricsWriter
    from sr_jax.train.sft import _save_tokenizer
    from sr_jax.train.step import stack_microbatches

    maybe_initialize_distributed()
    is_main = jax.process_index() == 0
    cfg.grpo.validate()
    out = Path(cfg.run.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    processor = make_processor(cfg)
    stream = PromptStream(cfg.data.sources, processor, seed=cfg.data.seed, shuffle=cfg.data.shuffle,
                          num_epochs=cfg.data.num_epochs, max_prompt_tokens=cfg.data.max_prompt_tokens)
    check_rewards_against_data(cfg.rewards, list(cfg.data.sources), stream.sources)
    rewards = RewardSet.from_config(cfg.rewards)
    rows = cfg.data.prompts_per_step * cfg.grpo.group_size
    if rows % cfg.train.grad_accum_steps:
        raise ValueError(f"prompts_per_step x group_size = {rows} rows must divide by train.grad_accum_steps="
                         f"{cfg.train.grad_accum_steps}")
    total = total_rollout_steps(cfg, len(stream))
    trainer = RLTrainer(cfg, devices=devices, total_steps=total)
    if is_main:
        dump_yaml(cfg, out / RUN_CONFIG)
        _save_tokenizer(_sft_view(cfg), processor, out / "tokenizer")

    ckpt = TrainCheckpointer(out, save_every=cfg.run.checkpoint_every, keep=cfg.run.keep_checkpoints,
                             async_save=cfg.run.async_checkpoint)
    start = ckpt.latest_step()
    if start is not None:
        state, data_state, _ = ckpt.restore(start, trainer.abstract_state())
        stream.set_state(data_state)
        log.info("resumed from step %d", start)
    else:
        state, start = trainer.init_state(), 0
    writer = MetricsWriter(out, tensorboard=cfg.run.tensorboard, enabled=is_main)
    writer.truncate_after(start)
    bar = tqdm(total=total, initial=start, disable=not (cfg.run.progress_bar and is_main), desc="rl",
               dynamic_ncols=True)
    began, step, last = time.perf_counter(), start, {}
    try:
        while step < total:
            t0 = time.perf_counter()
            made = rollout(trainer, state, stream, rewards, processor, step)
            if made is None:
                break  # prompts used up
            result, mbs = made
            t1 = time.perf_counter()
            batch = stack_microbatches(mbs)
            updates = []
            for _ in range(cfg.grpo.num_iterations):
                state, m = trainer.step(state, batch)
                updates.append({k: float(v) for k, v in jax.device_get(m).items()})
            step += 1
            metrics = rollout_metrics(result, cfg.grpo.group_size, cfg.grpo.stop_ids)
            metrics.update({k: float(np.mean([u[k] for u in updates])) for k in updates[0]})
            metrics.update(rollout_time_s=t1 - t0, update_time_s=time.perf_counter() - t1)
            writer.write(step, metrics)
            last = metrics
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['reward']:.3f}", kl=f"{metrics['kl']:.4f}",
                            len=f"{metrics['completion_length']:.0f}")
            ckpt.save(step, state, stream.get_state(), {"step": step})
            if stop_after is not None and step - start >= stop_after:
                break
            if cfg.run.max_seconds and time.perf_counter() - began > cfg.run.max_seconds:
                log.info("wall-clock budget of %.0f s reached at step %d", cfg.run.max_seconds, step)
                break
        if step > start and ckpt.latest_step() != step:
            ckpt.save(step, state, stream.get_state(), {"step": step}, force=True)
    finally:
        bar.close()
        ckpt.close()
        writer.close()
    summary = {"step": step, "total_steps": total, "resumed_from": start, "last": last,
               "skipped": dict(stream.skipped), "out_dir": str(out)}
    finished = step >= total or stop_after is None
    if cfg.run.save_model and finished and step > start:
        from sr_jax.convert.orbax_io import save_model
        from sr_jax.lora import lora_layers, merge_lora

        model = trainer.step.model(state)
        if lora_layers(model):
            merge_lora(model)
        save_model(model, out / "model", hf_dir=out / "tokenizer", overwrite=True)
        summary["model_dir"] = str(out / "model")
    return summary


# ---- CLI ----

def register(sub) -> None:
    p = sub.add_parser("rl", help="GRPO reinforcement learning of the reward model")
    p.add_argument("--config", required=True, help="YAML file, e.g. configs/rl/demo_cpu.yaml")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. run.total_steps=10 grpo.beta=0.04")
    p.set_defaults(func=_rl_command)


def _rl_command(args) -> int:
    import json
    import sys

    from sr_jax.rl.rewards import RewardDataError
    from sr_jax.train.runlock import RunDirLocked

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config(RLConfig, args.config, args.overrides)
    try:
        summary = train(cfg)
    except RunDirLocked as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except RewardDataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2, default=str))
    return 0
