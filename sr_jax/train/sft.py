"""`sr-jax train`: supervised fine-tuning (full or LoRA) on the Grain pipeline.

One config file (`configs/sft/*.yaml`, `key=value` overrides) holds four sections: `model`
(architecture preset or weights to start from), `train` (mesh, optimizer, loss, LoRA, remat),
`data` (the pipeline) and `run` (steps, checkpoints, logging). The same code runs on one CPU
and on a pod: the step is jitted with the state's shardings over the mesh.

Resume is exact: a restart in the same `run.out_dir` restores params, optimizer state, step,
RNG and the data iterator from the latest complete checkpoint (onto whatever mesh this run
has) and continues the identical trajectory.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import time
from pathlib import Path

import jax
import numpy as np

from sr_jax.config import dump_yaml, load_config
from sr_jax.data.pipeline import DataConfig
from sr_jax.train.config import TrainConfig

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ModelSection:
    preset: str = "tiny"                # architecture for random init: preset name or YAML path
    init_from: str | None = None        # start from weights: HF checkpoint or converted directory
    dtype: str = "float32"              # compute dtype
    param_dtype: str = "float32"        # stored parameter dtype
    overrides: list[str] = dataclasses.field(default_factory=list)  # key=value on the ModelConfig
    attention_backend: str | None = None  # auto | cpu | splash | cudnn (sr_jax.model.attention); None: the preset's
    scan_layers: bool | None = None     # run layers as lax.scans (ModelConfig.scan_layers); None: the preset's


@dataclasses.dataclass
class RunSection:
    out_dir: str = "runs/sft"
    total_steps: int | None = None      # None: epochs x records / global batch (pad-mode estimate)
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    async_checkpoint: bool = True
    tensorboard: bool = True
    progress_bar: bool = True
    num_devices: int | None = None      # use the first N devices (default: all)
    peak_flops_per_device: float | None = None  # for MFU; default: known accelerators, else measured
    max_seconds: float | None = None    # wall-clock budget; stops (and checkpoints) when exceeded
    save_model: bool = True             # write `out_dir/model` (LoRA merged) at the end


@dataclasses.dataclass
class SFTConfig:
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    run: RunSection = dataclasses.field(default_factory=RunSection)


def model_config(section: ModelSection):
    from sr_jax.model import ModelConfig

    if section.init_from:
        from sr_jax.convert.orbax_io import is_model_dir, read_model_config

        cfg = read_model_config(section.init_from) if is_model_dir(section.init_from) \
            else ModelConfig.from_hf_dir(section.init_from)
        if section.overrides:
            raise ValueError("model.overrides apply to presets, not to model.init_from weights")
    else:
        cfg = ModelConfig.preset(section.preset, section.overrides)
    cfg.dtype, cfg.param_dtype = section.dtype, section.param_dtype
    if section.attention_backend is not None:
        cfg.attention_backend = section.attention_backend
    if section.scan_layers is not None:
        cfg.scan_layers = section.scan_layers
    return cfg.validate()


class Trainer:
    """Model, mesh, optimizer and the jitted step for one SFT config."""

    def __init__(self, cfg: SFTConfig, *, devices=None, abstract: bool = False, total_steps: int | None = None):
        from flax import nnx

        from sr_jax.lora import apply_lora
        from sr_jax.model.qwen3vl import Qwen3VLForConditionalGeneration
        from sr_jax.sharding import make_mesh, tree_shardings, use_mesh
        from sr_jax.train.optim import make_optimizer
        from sr_jax.train.step import TrainStep

        self.cfg = cfg
        self.model_cfg = model_config(cfg.model)
        if devices is None and cfg.run.num_devices:
            devices = jax.devices()[: cfg.run.num_devices]
        self.mesh = make_mesh(cfg.train.mesh, devices)
        self.num_devices = self.mesh.size

        def build():
            model = Qwen3VLForConditionalGeneration(self.model_cfg, rngs=nnx.Rngs(cfg.train.seed))
            if cfg.train.lora.enabled:
                apply_lora(model, cfg.train.lora)
            return model

        # Random init happens under jit with the target shardings, so an 8B model is created
        # directly in its sharded layout (never whole on one device).
        graphdef, abstract_state = nnx.split(nnx.eval_shape(build))
        if abstract:
            model = nnx.merge(graphdef, abstract_state)
        else:
            shardings = tree_shardings(abstract_state, self.mesh, cfg.train.mesh.axis_rules())
            with use_mesh(self.mesh, cfg.train.mesh.axis_rules()):
                state = jax.jit(lambda: nnx.split(build())[1], out_shardings=shardings)()
            model = nnx.merge(graphdef, state)
            if cfg.model.init_from:
                self._load_weights(model)
        self.total_steps = total_steps or cfg.run.total_steps or 1
        self.optimizer = make_optimizer(cfg.train.optim, self.total_steps)
        self.step = TrainStep(model, self.optimizer, self.mesh, cfg.train)
        self.model = model

    def _load_weights(self, model) -> None:
        """Base weights from `init_from`, placed tensor by tensor into the sharded model."""
        from flax import nnx

        from sr_jax.loading import load_model

        loaded = load_model(self.cfg.model.init_from, dtype=self.cfg.model.param_dtype, device=jax.devices("cpu")[0])
        source = dict(nnx.to_flat_state(nnx.state(loaded, nnx.Param)))
        for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
            if path in source:  # LoRA factors are not in the base checkpoint and keep their init
                target = var.get_value()
                var.set_value(jax.device_put(source[path].get_value().astype(target.dtype), target.sharding))

    def abstract_state(self):
        from sr_jax.train.checkpoint import abstract_with_shardings
        from sr_jax.train.step import TrainState, split_model

        _, params, frozen, _ = split_model(self.model, self.cfg.train)
        abstract = jax.eval_shape(
            lambda p, f: TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=p, frozen=f,
                                    opt_state=self.optimizer.tx.init(p),
                                    rng=jax.random.key_data(jax.random.key(0))), params, frozen)
        return abstract_with_shardings(abstract, self.step.state_shardings)

    def init_state(self):
        from sr_jax.train.step import create_train_state

        return create_train_state(self.model, self.optimizer, self.mesh, self.cfg.train)


def build_for_restore(cfg: SFTConfig, devices=None) -> Trainer:
    """A trainer without weights (abstract model), enough to restore a checkpoint into."""
    return Trainer(cfg, devices=devices, abstract=True)


def estimate_total_steps(cfg: SFTConfig, num_records: int) -> int:
    if cfg.run.total_steps:
        return cfg.run.total_steps
    if cfg.data.num_epochs is None:
        raise ValueError("data.num_epochs is null (repeat forever): set run.total_steps")
    per_step = cfg.data.batch_size * cfg.train.grad_accum_steps * jax.process_count()
    return max(1, math.ceil(cfg.data.num_epochs * num_records / per_step))


def _save_tokenizer(cfg: SFTConfig, processor, out: Path) -> None:
    if out.is_dir():
        return
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    source = cfg.data.tokenizer or (cfg.model.init_from if cfg.model.init_from and
                                    (Path(cfg.model.init_from) / "tokenizer.json").is_file() else None)
    if source:
        shutil.copytree(source, tmp, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "params"))
    else:
        processor.tokenizer.save_tokenizer_dir(tmp)
    tmp.rename(out)


def train(cfg: SFTConfig, *, devices=None, stop_after: int | None = None) -> dict:
    """Runs (or resumes) the config; returns a summary. `stop_after` ends the loop after that many
    steps of this call (tests use it to simulate an interruption). The run directory is locked for
    the whole run (`sr_jax.train.runlock`): a second trainer on it raises RunDirLocked."""
    from sr_jax.sharding import maybe_initialize_distributed
    from sr_jax.train.runlock import RunLock

    maybe_initialize_distributed()
    with RunLock(cfg.run.out_dir, jax.process_index()):
        return _train_locked(cfg, devices=devices, stop_after=stop_after)


def _train_locked(cfg: SFTConfig, *, devices=None, stop_after: int | None = None) -> dict:
    from tqdm import tqdm

    from sr_jax.data.packing import model_inputs
    from sr_jax.data.pipeline import DataPipeline
    from sr_jax.sharding import maybe_initialize_distributed, shard_batch
    from sr_jax.train.checkpoint import RUN_CONFIG, TrainCheckpointer
    from sr_jax.train.metrics import MetricsWriter, peak_flops_per_device, train_flops
    from sr_jax.train.step import count_step_labels, stack_microbatches

    maybe_initialize_distributed()
    out = Path(cfg.run.out_dir)
    is_main = jax.process_index() == 0
    out.mkdir(parents=True, exist_ok=True)

    mcfg = model_config(cfg.model)
    data_cfg = cfg.data
    if data_cfg.tokenizer is None and cfg.model.init_from and (Path(cfg.model.init_from) / "tokenizer.json").is_file():
        data_cfg = dataclasses.replace(data_cfg, tokenizer=cfg.model.init_from)
    pipeline = DataPipeline(data_cfg, vision=mcfg.vision)
    total = estimate_total_steps(cfg, len(pipeline.sources))
    trainer = Trainer(cfg, devices=devices, total_steps=total)
    if is_main:
        dump_yaml(cfg, out / RUN_CONFIG)
        _save_tokenizer(cfg, pipeline.processor, out / "tokenizer")

    ckpt = TrainCheckpointer(out, save_every=cfg.run.checkpoint_every, keep=cfg.run.keep_checkpoints,
                             async_save=cfg.run.async_checkpoint)
    iterator = iter(pipeline)
    start = ckpt.latest_step()
    if start is not None:
        state, data_state, meta = ckpt.restore(start, trainer.abstract_state())
        iterator.set_state(data_state)
        log.info("resumed from step %d", start)
    else:
        state, start = trainer.init_state(), 0
    writer = MetricsWriter(out, tensorboard=cfg.run.tensorboard, enabled=is_main)
    writer.truncate_after(start)
    peak = peak_flops_per_device(cfg.run.peak_flops_per_device)
    vision_trainable = not (cfg.train.freeze_vision or (cfg.train.lora.enabled and not cfg.train.lora.vision))
    k = cfg.train.grad_accum_steps
    bar = tqdm(total=total, initial=start, disable=not (cfg.run.progress_bar and is_main), desc="train",
               dynamic_ncols=True)
    began, step, last = time.perf_counter(), start, {}
    try:
        while step < total:
            microbatches = []
            for _ in range(k):
                batch = next(iterator, None)
                if batch is None:
                    break
                microbatches.append(batch)
            if len(microbatches) < k:
                break  # end of data
            stacked = stack_microbatches([model_inputs(b) for b in microbatches])
            label_counts = count_step_labels(stacked, all_processes=True) if cfg.train.loss.label_bucket else None
            if jax.process_count() > 1:
                stacked = shard_batch(stacked, trainer.mesh, cfg.train.mesh.axis_rules())
            t0 = time.perf_counter()
            state, metrics = trainer.step(state, stacked, label_counts)
            metrics = {key: float(v) for key, v in jax.device_get(metrics).items()}
            dt = time.perf_counter() - t0
            step += 1
            tokens = sum(int(b["num_tokens"]) for b in microbatches) * jax.process_count()
            images = sum(int(b["num_images"]) for b in microbatches) * jax.process_count()
            flops = jax.process_count() * sum(
                train_flops(mcfg, np.asarray(b["attention_mask"]).sum(axis=1), int(b["num_label_tokens"]),
                            b["image_grid_thw"], vision_trainable=vision_trainable) for b in microbatches)
            metrics.update(tokens_per_s=tokens / dt, images_per_s=images / dt, step_time_s=dt,
                           mfu=flops / (dt * trainer.num_devices * peak), examples=float(
                               sum(int(b["num_examples"]) for b in microbatches)))
            writer.write(step, metrics)
            last = metrics
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['token_accuracy']:.3f}",
                            tok_s=f"{metrics['tokens_per_s']:.0f}", mfu=f"{metrics['mfu']:.1%}")
            ckpt.save(step, state, iterator.get_state(), {"skipped": iterator.stats(), "step": step})
            if stop_after is not None and step - start >= stop_after:
                break
            if cfg.run.max_seconds and time.perf_counter() - began > cfg.run.max_seconds:
                log.info("wall-clock budget of %.0f s reached at step %d", cfg.run.max_seconds, step)
                break
        if step > start and ckpt.latest_step() != step:
            ckpt.save(step, state, iterator.get_state(), {"skipped": iterator.stats(), "step": step}, force=True)
    finally:
        bar.close()
        ckpt.close()
        writer.close()
    summary = {"step": step, "total_steps": total, "resumed_from": start, "last": last,
               "skipped": iterator.stats(), "out_dir": str(out)}
    finished = step >= total or (stop_after is None)
    if cfg.run.save_model and finished and step > start:  # every process: the weights may span hosts
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
    p = sub.add_parser("train", help="supervised fine-tuning (full or LoRA)")
    p.add_argument("--config", required=True, help="YAML file, e.g. configs/sft/demo_cpu.yaml")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. run.total_steps=100 train.optim.learning_rate=2e-5")
    p.set_defaults(func=_train_command)


def _train_command(args) -> int:
    import json
    import sys

    from sr_jax.train.runlock import RunDirLocked

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config(SFTConfig, args.config, args.overrides)
    try:
        summary = train(cfg)
    except RunDirLocked as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    print(json.dumps(summary, indent=2, default=str))
    return 0
