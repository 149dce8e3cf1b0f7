"""`sr-jax train`: supervised fine-tuning (full or LoRA) on the Grain pipeline.

One config file (`configs/sft/*.yaml`, `key=value` overrides) holds four sections: `model`
(architecture preset or weights to start from), `train` (mesh, optimizer, loss, LoRA, remat),
`data` (the pipeline) and `run` (steps, checkpoints, logging). The same code runs on one CPU
and on a pod: the step is jitted with the state's shardings over the mesh.

Resume is exact: a restart in the same `run.out_dir` restores params, optimizer state, step,
RNG and the data iterator from the latest complete checkpoint (onto whatever mesh this run
has) and continues the identical trajectory.

The run frame (state, checkpoints, metrics, budget, final save) is `sr_jax.train.loop`'s, shared
with `sr-jax rl`; this module holds what is SFT's own: the config, the step's batches from the
data pipeline (k microbatches stacked for the accumulation scan) and the throughput metrics.
"""

from __future__ import annotations

import dataclasses
import math
import time

import jax
import numpy as np

from sr_jax.data.pipeline import DataConfig, DataPipeline, make_processor
from sr_jax.data.vocab import build_vocab_map
from sr_jax.sharding import shard_batch
from sr_jax.train.config import ModelSection, RunSection, TrainConfig
from sr_jax.train.loss import resolve_token_weights
from sr_jax.train.loop import run_vocab_map, tokenizer_source
# Re-exported: these were defined here before the loop was shared with RL.
from sr_jax.train.loop import Trainer, build_for_restore, model_config, register_command, run
from sr_jax.train.metrics import attention_rows, peak_flops_per_device, train_flops
from sr_jax.train.step import SFTLoss, TrainStep, attention_spans, count_step_labels, stack_microbatches

__all__ = ["ModelSection", "RunSection", "SFTConfig", "SFTStage", "Trainer", "build_for_restore",
           "estimate_total_steps", "model_config", "register", "train"]


@dataclasses.dataclass
class SFTConfig:
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    run: RunSection = dataclasses.field(default_factory=RunSection)


def estimate_total_steps(cfg: SFTConfig, num_records: int) -> int:
    if cfg.run.total_steps:
        return cfg.run.total_steps
    if cfg.data.num_epochs is None:
        raise ValueError("data.num_epochs is null (repeat forever): set run.total_steps")
    per_step = cfg.data.batch_size * cfg.train.grad_accum_steps * jax.process_count()
    return max(1, math.ceil(cfg.data.num_epochs * num_records / per_step))


class SFTStage:
    """The SFT side of the shared loop: batches from the Grain pipeline, the label loss."""

    kind = "sft"
    progress_desc = "train"

    def __init__(self, cfg: SFTConfig, devices=None):
        self.cfg = cfg
        data_cfg = cfg.data
        if data_cfg.tokenizer is None and tokenizer_source(cfg):
            data_cfg = dataclasses.replace(data_cfg, tokenizer=tokenizer_source(cfg))
        processor = make_processor(data_cfg.validate())
        self.vocab_map = run_vocab_map(cfg, processor.tokenizer, cfg.run.out_dir,
                                       build=lambda: build_vocab_map(data_cfg.sources, processor))
        mcfg = self.model_cfg = model_config(cfg.model, self.vocab_map)
        pipeline = DataPipeline(data_cfg, processor=processor, vision=mcfg.vision, vocab_map=self.vocab_map)
        self.processor = pipeline.processor
        self.total_steps = estimate_total_steps(cfg, len(pipeline.sources))
        # train.loss.token_weights name tokens by text: their ids are known only now (vocabulary map)
        weights = resolve_token_weights(cfg.train.loss.token_weights, processor.tokenizer, self.vocab_map)
        self.trainer = Trainer(cfg, devices=devices, total_steps=self.total_steps, vocab_map=self.vocab_map,
                               make_step=lambda model, opt, mesh, train: TrainStep(
                                   model, opt, mesh, train, loss=SFTLoss(train.loss, weights)))
        self.iterator = iter(pipeline)
        self._ahead = None  # the next step's batch, built during a step (see `_take`)
        self.peak = peak_flops_per_device(cfg.run.peak_flops_per_device)
        self.vision_trainable = not (cfg.train.freeze_vision or (cfg.train.lora.enabled and not cfg.train.lora.vision))

    def advance(self, state, step: int):
        from sr_jax.data.packing import model_inputs

        cfg, trainer = self.cfg, self.trainer
        _, microbatches = self._ahead or self._take()
        self._ahead = None
        if microbatches is None:
            return None  # end of data
        stacked = stack_microbatches([model_inputs(b) for b in microbatches])
        label_counts = count_step_labels(stacked, all_processes=True) if cfg.train.loss.label_bucket else None
        spans = attention_spans(stacked, all_processes=True)
        if jax.process_count() > 1:
            stacked = shard_batch(stacked, trainer.mesh, cfg.train.mesh.axis_rules())
        t0 = time.perf_counter()
        state, metrics = trainer.step(state, stacked, label_counts, spans)
        # The step runs asynchronously: the host builds the next batch meanwhile (the data
        # workers of small runs are this process) and only then waits for the step's metrics.
        self._ahead = self._take()
        metrics = {key: float(v) for key, v in jax.device_get(metrics).items()}
        dt = time.perf_counter() - t0
        tokens = sum(int(b["num_tokens"]) for b in microbatches) * jax.process_count()
        images = sum(int(b["num_images"]) for b in microbatches) * jax.process_count()
        flops = jax.process_count() * sum(
            train_flops(self.model_cfg, attention_rows(b["attention_mask"], b.get("segment_ids")),
                        int(b["num_label_tokens"]), b["image_grid_thw"], vision_trainable=self.vision_trainable)
            for b in microbatches)
        metrics.update(tokens_per_s=tokens / dt, images_per_s=images / dt, step_time_s=dt,
                       mfu=flops / (dt * trainer.num_devices * self.peak), examples=float(
                           sum(int(b["num_examples"]) for b in microbatches)))
        return state, metrics

    def _take(self):
        """((data position, skipped records) before them, the next step's k microbatches or None
        at the end of data)."""
        before = (self.iterator.get_state(), self.iterator.stats())
        microbatches = []
        for _ in range(self.cfg.train.grad_accum_steps):
            batch = next(self.iterator, None)
            if batch is None:
                return before, None
            microbatches.append(batch)
        return before, microbatches

    # A batch built ahead is not trained on yet: the saved position and the skipped-record
    # counts are those from before it.
    def get_state(self):
        return self._ahead[0][0] if self._ahead is not None else self.iterator.get_state()

    def set_state(self, state) -> None:
        self.iterator.set_state(state)
        self._ahead = None

    def skipped(self) -> dict:
        return self._ahead[0][1] if self._ahead is not None else self.iterator.stats()

    def meta(self) -> dict:
        return {"skipped": self.skipped()}

    def postfix(self, metrics: dict) -> dict:
        return dict(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['token_accuracy']:.3f}",
                    tok_s=f"{metrics['tokens_per_s']:.0f}", mfu=f"{metrics['mfu']:.1%}")


def train(cfg: SFTConfig, *, devices=None, stop_after: int | None = None) -> dict:
    """Runs (or resumes) the config; returns a summary. `stop_after` ends the loop after that many
    steps of this call (tests use it to simulate an interruption). The run directory is locked for
    the whole run (`sr_jax.train.runlock`): a second trainer on it raises RunDirLocked."""
    return run(cfg, SFTStage, devices=devices, stop_after=stop_after)


# ---- CLI ----

def register(sub) -> None:
    register_command(sub, "train", help="supervised fine-tuning (full or LoRA)", config_cls=SFTConfig, train=train,
                     example_config="configs/sft/demo_cpu.yaml",
                     example_overrides="run.total_steps=100 train.optim.learning_rate=2e-5")
