"""The run frame every training stage shares: `sr-jax train` (SFT) and `sr-jax rl` (GRPO).

A stage's config has `model`, `train` and `run` sections (`sr_jax.train.config`) plus its own
(`data`; RL adds `grpo` and `rewards`). `Trainer` builds the model (sharded random init, then
`model.init_from` weights, LoRA), the mesh, the optimizer and the jitted step (`TrainStep` with
the stage's loss). `run` does the rest, the same for every stage: the run-directory lock, the run
config and tokenizer files, build or restore the state (with the batch producer's position),
iterate, checkpoint, metrics, progress bar, wall-clock budget, the final save with LoRA merged.
With `run.fit_schedule` the budget also sets the schedule's length: after 10 timed steps and 5% of
the budget the lr schedule is shortened to the steps the remaining time allows (recorded in
`schedule.json`, which a resumed run keeps), so a slower machine ends a complete schedule instead
of stopping mid-way.

What differs is a `Stage` object (built by the stage's `make_stage(cfg, devices)`):
  kind                        "sft" | "rl": recorded in every checkpoint's meta (see
                              `sr_jax.train.checkpoint.RUN_KINDS`), so exporting, evaluating
                              and resuming know which config the run directory holds
  trainer, total_steps, processor, progress_desc
  advance(state, step)        one training step: produce the batch (data pipeline, rollouts),
                              update; (state, metrics) or None when the data is used up
  get_state() / set_state(s)  the batch producer's position (checkpointed with the state)
  meta()                      extra JSON for the checkpoint's meta; skipped(): for the summary
  postfix(metrics)            the progress bar's fields

Multi-process runs: every process runs the same loop; process 0 writes the metrics, the run
config and the tokenizer; saves are collective (`TrainCheckpointer`), and so is the final save.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Protocol

import jax
from flax import nnx
from jax.experimental import multihost_utils
from tqdm import tqdm

from sr_jax import lora
from sr_jax.config import dump_yaml, load_config
from sr_jax.convert.hf_import import hf_family
from sr_jax.convert.loading import load_model
from sr_jax.convert.orbax_io import is_model_dir, read_model_config, save_model
from sr_jax.data.vocab import SYNTHETIC, VOCAB_MAP_FILE, VocabMap, attach, vocab_map_of
from sr_jax.lora import apply_lora, lora_layers, merge_lora
from sr_jax.models import family_of, get_family
from sr_jax.models.layers import redraw_params
from sr_jax.sharding import make_mesh, maybe_initialize_distributed, tree_shardings, use_mesh
from sr_jax.train.checkpoint import (
    CHECKPOINTS,
    RUN_CONFIG,
    TrainCheckpointer,
    abstract_with_shardings,
    load_run_config,
    run_dir_of,
    run_kind,
)
from sr_jax.train.metrics import MetricsWriter
from sr_jax.train.optim import make_optimizer
from sr_jax.train.runlock import RunDirLocked, RunLock
from sr_jax.train.step import TrainState, TrainStep, create_train_state, split_model

log = logging.getLogger(__name__)


def model_config(section, vocab_map: VocabMap | None = None):
    """The model config of a `model` section (`ModelSection`), of the family its weights name
    (HF config.json's `model_type`) or, for a preset, of the default family. With `vocab_map`
    (`run_vocab_map`), the compact model's config (an `init_from` that is compact already keeps its own)."""
    if section.init_from:
        if section.overrides or section.init_std:
            raise ValueError("model.overrides and model.init_std apply to presets, not to model.init_from weights")
        init_from = Path(section.init_from)
        cfg = read_model_config(init_from) if is_model_dir(init_from) \
            else hf_family(init_from).config_class.from_hf_dir(init_from)
    else:
        cfg = get_family().config_class.preset(section.preset, section.overrides)
    if vocab_map is not None and not init_from_map(section):
        cfg = vocab_map.remap_config(cfg)
    elif vocab_map is None and init_from_map(section):
        raise ValueError(f"model.init_from {section.init_from} is a reduced-vocabulary model ({VOCAB_MAP_FILE}): "
                         "set model.vocab_map (e.g. to that file)")
    cfg.dtype, cfg.param_dtype = section.dtype, section.param_dtype
    if section.attention_backend is not None:
        cfg.attention_backend = section.attention_backend
    if section.scan_layers is not None:
        cfg.scan_layers = section.scan_layers
    return cfg.validate()


def init_from_map(section) -> Path | None:
    """The vocab_map.json an `init_from` model directory holds (a compact model), else None."""
    if section.init_from and (Path(section.init_from) / VOCAB_MAP_FILE).is_file():
        return Path(section.init_from) / VOCAB_MAP_FILE
    return None


def run_vocab_map(cfg, tokenizer, run_dir: str | Path | None, build=None) -> VocabMap | None:
    """The reduced vocabulary of a run (None: full vocabulary), checked against `tokenizer`.

    The map a run directory holds wins (a resumed run keeps its map); then a compact
    `init_from`'s (also when `model.vocab_map` is unset); then `model.vocab_map` as a file, or
    `synthetic`: `build()` makes it. Two of these that disagree are an error rather than a silent
    renumbering of trained rows."""
    spec = cfg.model.vocab_map
    saved = Path(run_dir) / VOCAB_MAP_FILE if run_dir is not None else None
    if spec is None:
        if saved is not None and saved.is_file() and (Path(run_dir) / CHECKPOINTS).is_dir():
            raise ValueError(f"{run_dir} holds a reduced-vocabulary run ({VOCAB_MAP_FILE}): resume it with "
                             f"model.vocab_map set, or use another run.out_dir")
        if init_from_map(cfg.model):  # a compact model keeps its rows' meaning: it brings its own map
            return VocabMap.load(init_from_map(cfg.model), tokenizer)
        return None
    candidates = []
    if saved is not None and saved.is_file():
        candidates.append((str(saved), VocabMap.load(saved, tokenizer)))
    if init_from_map(cfg.model):
        candidates.append((f"model.init_from {cfg.model.init_from}", VocabMap.load(init_from_map(cfg.model), tokenizer)))
    if spec != SYNTHETIC:
        candidates.append((f"model.vocab_map {spec}", VocabMap.load(spec, tokenizer)))
    for where, other in candidates[1:]:
        if other != candidates[0][1]:
            raise ValueError(f"{candidates[0][0]} ({candidates[0][1]!r}) and {where} ({other!r}) are different "
                             "vocabulary maps; a run keeps one map (use another run.out_dir)")
    if candidates:
        return candidates[0][1]
    if build is None:
        raise ValueError(f"model.vocab_map={SYNTHETIC}: this stage cannot build a map (no answers in its data); "
                         "give a vocab_map.json or an init_from model that has one")
    return build()


class Trainer:
    """Model, mesh, optimizer and the jitted step for one config (any stage: it reads `model`,
    `train` and `run`). `make_step(model, optimizer, mesh, train_cfg)` builds the stage's step
    (default: the SFT `TrainStep`); `total_steps` counts optimizer updates (the schedule's length)."""

    def __init__(self, cfg, *, devices=None, abstract: bool = False, total_steps: int | None = None,
                 make_step: Callable | None = None, vocab_map: VocabMap | None = None):
        self.cfg = cfg
        if (cfg.model.vocab_map is not None or init_from_map(cfg.model)) and vocab_map is None:
            raise ValueError(f"model.vocab_map={cfg.model.vocab_map!r}: only `sr-jax train`/`sr-jax rl` runs and "
                             "their checkpoints resolve a reduced vocabulary (sr_jax.train.loop.run_vocab_map); "
                             "this entry point builds full-vocabulary models")
        self.vocab_map = vocab_map
        self.model_cfg = model_config(cfg.model, vocab_map)
        model_class = family_of(self.model_cfg).model_class
        if devices is None and cfg.run.num_devices:
            devices = jax.devices()[: cfg.run.num_devices]
        self.mesh = make_mesh(cfg.train.mesh, devices)
        self.num_devices = self.mesh.size

        def build():
            model = model_class(self.model_cfg, rngs=nnx.Rngs(cfg.train.seed))
            if cfg.model.init_std:
                redraw_params(model, cfg.model.init_std, cfg.train.seed)
            attach(model, vocab_map)
            if cfg.train.lora.enabled:
                apply_lora(model, cfg.train.lora)
            return model

        # Random init happens under jit with the target shardings, so an 8B model is created
        # directly in its sharded layout (never whole on one device).
        graphdef, abstract_state = nnx.split(nnx.eval_shape(build))
        if abstract:
            model = nnx.merge(graphdef, abstract_state)
        else:
            rules = cfg.train.mesh.axis_rules()
            shardings = tree_shardings(abstract_state, self.mesh, rules)
            with use_mesh(self.mesh, rules):
                state = jax.jit(lambda: nnx.split(build())[1], out_shardings=shardings)()
            model = nnx.merge(graphdef, state)
            if cfg.model.init_from:
                self._load_weights(model)
        self.total_steps = total_steps or cfg.run.total_steps or 1
        self.optimizer = make_optimizer(cfg.train.optim, self.total_steps)
        self.step = (make_step or TrainStep)(model, self.optimizer, self.mesh, cfg.train)
        self.model = model

    def set_total_steps(self, total_steps: int) -> None:
        """A new schedule length (optimizer updates) for the rest of the run: the optimizer's
        state has the same layout for any length, so only the step is traced again."""
        self.total_steps = total_steps
        self.optimizer = make_optimizer(self.cfg.train.optim, total_steps)
        self.step.use_optimizer(self.optimizer)

    def _load_weights(self, model) -> None:
        """Base weights from `init_from`, placed tensor by tensor into the sharded model."""
        loaded = load_model(self.cfg.model.init_from, dtype=self.cfg.model.param_dtype, device=jax.devices("cpu")[0])
        source = dict(nnx.to_flat_state(nnx.state(loaded, nnx.Param)))
        # A full-vocabulary checkpoint into a compact model: the kept rows of the vocabulary weights.
        slice_vocab = self.vocab_map is not None and vocab_map_of(loaded) is None
        full_vocab = loaded.config.text.vocab_size
        for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
            if path in source:  # LoRA factors are not in the base checkpoint and keep their init
                target = var.get_value()
                value = source[path].get_value()
                if slice_vocab and value.shape != target.shape:
                    axes = [a for a, (n, m) in enumerate(zip(value.shape, target.shape))
                            if n == full_vocab and m == len(self.vocab_map)]
                    if len(axes) == 1:
                        value = self.vocab_map.rows(jax.device_get(value), axis=axes[0])
                var.set_value(jax.device_put(value.astype(target.dtype), target.sharding))

    def abstract_state(self):
        _, params, frozen, _ = split_model(self.model, self.cfg.train)
        abstract = jax.eval_shape(
            lambda p, f: TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=p, frozen=f,
                                    opt_state=self.optimizer.tx.init(p),
                                    rng=jax.random.key_data(jax.random.key(0))), params, frozen)
        return abstract_with_shardings(abstract, self.step.state_shardings)

    def init_state(self):
        return create_train_state(self.model, self.optimizer, self.mesh, self.cfg.train)


def build_for_restore(cfg, devices=None, vocab_map: VocabMap | None = None) -> Trainer:
    """A trainer without weights (abstract model), enough to restore any stage's checkpoint into
    (the state's layout depends only on the `model` and `train` sections, and the run's map)."""
    return Trainer(cfg, devices=devices, abstract=True, vocab_map=vocab_map)


def model_from_checkpoint(path: str | Path, *, merge_lora: bool = False, step: int | None = None):
    """(model with the checkpoint's weights, directory with tokenizer files or None).

    `path` is a run directory, its `checkpoints/` or one `checkpoints/<step>` directory (that
    step is used; otherwise the latest). LoRA adapters stay separate unless `merge_lora`.
    """
    path = Path(path)
    run_dir = run_dir_of(path)
    if run_dir is None:
        raise FileNotFoundError(f"{path}: not a training run (no {RUN_CONFIG} with {CHECKPOINTS}/)")
    if step is None and path.parent.name == CHECKPOINTS and path.name.isdigit():
        step = int(path.name)
    ckpt = TrainCheckpointer(run_dir, save_every=1, keep=1, async_save=False)
    step = ckpt.latest_step() if step is None else step
    if step is None:
        ckpt.close()
        raise FileNotFoundError(f"{run_dir}: no complete checkpoint")
    cfg = load_run_config(run_dir, run_kind(run_dir, ckpt.read_meta(step)))
    cfg.train.mesh.data, cfg.train.mesh.fsdp, cfg.train.mesh.tensor = 1, 1, 1
    vmap = None
    if cfg.model.vocab_map is not None:
        if not (run_dir / VOCAB_MAP_FILE).is_file():
            raise FileNotFoundError(f"{run_dir}: model.vocab_map is set but the run holds no {VOCAB_MAP_FILE}")
        vmap = VocabMap.load(run_dir / VOCAB_MAP_FILE)
    # Any stage's state has the same layout (it depends on the model and train sections only).
    trainer = build_for_restore(cfg, devices=jax.devices()[:1], vocab_map=vmap)
    state, _, _ = ckpt.restore(step, trainer.abstract_state(), with_data=False)
    ckpt.close()
    model = trainer.step.model(state)
    if merge_lora:
        if not lora.lora_layers(model):
            raise ValueError(f"{run_dir}: --merge-lora, but this run trained no LoRA adapters")
        lora.merge_lora(model)  # through the module: the keyword `merge_lora` shadows the function
    tokenizer_dir = run_dir / "tokenizer"
    return model, (tokenizer_dir if tokenizer_dir.is_dir() else None)


def tokenizer_source(cfg) -> str | None:
    """The tokenizer a config names: `data.tokenizer`, else `model.init_from` when it has one."""
    if cfg.data.tokenizer:
        return cfg.data.tokenizer
    if cfg.model.init_from and (Path(cfg.model.init_from) / "tokenizer.json").is_file():
        return cfg.model.init_from
    return None


def save_tokenizer(cfg, processor, out: Path) -> None:
    if out.is_dir():
        return
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    source = tokenizer_source(cfg)
    if source:
        shutil.copytree(source, tmp, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "params"))
    else:
        processor.tokenizer.save_tokenizer_dir(tmp)
    tmp.rename(out)


class Stage(Protocol):
    kind: str
    trainer: Trainer
    total_steps: int
    processor: Any
    progress_desc: str

    def advance(self, state, step: int) -> tuple[Any, dict] | None: ...
    def get_state(self) -> Any: ...
    def set_state(self, state) -> None: ...
    def meta(self) -> dict: ...
    def skipped(self) -> dict: ...
    def postfix(self, metrics: dict) -> dict: ...


SCHEDULE_FILE = "schedule.json"  # a run's fitted schedule length (run.fit_schedule)
FIT_AFTER_STEPS = 10  # timed steps (after the first, which compiles) before the schedule is fitted
# ... and at least this share of the budget timed: a short window misses the checkpoint saves and
# the slower packs (stage 3: 0.74 s per step over steps 2-11, 0.81 s over the first 800).
FIT_WINDOW_SHARE = 0.05
_clock = time.perf_counter  # the loop's clock (tests substitute their own)


def fit_window(seconds_per_step: float, budget: float) -> int:
    """Timed steps to fit the schedule on: FIT_AFTER_STEPS, or more where those took under
    FIT_WINDOW_SHARE of the budget. A step count, not a time, so that every host fits at the
    same step."""
    if seconds_per_step <= 0:
        return FIT_AFTER_STEPS
    return max(FIT_AFTER_STEPS, math.ceil(FIT_WINDOW_SHARE * budget / seconds_per_step))


def fitted_total(total: int, step: int, elapsed: float, seconds_per_step: float, budget: float,
                 retrace_seconds: float = 0.0) -> int:
    """The schedule length (loop steps) that ends within `budget` seconds: the `step` steps done
    after `elapsed` seconds, plus what the rest of the budget allows at `seconds_per_step` once the
    step is traced again (`retrace_seconds`); never more than `total`, never fewer than `step` + 1."""
    remaining = budget - elapsed - max(retrace_seconds, 0.0)
    more = int(remaining // seconds_per_step) if seconds_per_step > 0 else total
    return max(step + 1, min(total, step + more))


def _apply_schedule_length(stage: Stage, steps: int) -> int:
    """Sets the loop's and the optimizer's horizon (a GRPO rollout makes several updates), no
    shorter than an explicit `train.optim.warmup_steps`; returns the loop's."""
    per_step = max(1, stage.trainer.total_steps // max(stage.total_steps, 1))
    warmup = stage.trainer.cfg.train.optim.warmup_steps or 0
    steps = max(steps, -(-int(warmup) // per_step))
    stage.total_steps = steps
    stage.trainer.set_total_steps(steps * per_step)
    return steps


def _read_schedule(out: Path) -> dict | None:
    path = out / SCHEDULE_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        return {"total_steps": int(record["total_steps"]), "configured_steps": int(record["configured_steps"])}
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: unreadable schedule record ({e}); delete it to fit the schedule again") from e


def _agreed(value: int) -> int:
    """One process's decision for all (step times differ between hosts)."""
    if jax.process_count() == 1:
        return value
    return int(multihost_utils.broadcast_one_to_all(jax.numpy.asarray(value, jax.numpy.int32)))


def run(cfg, make_stage: Callable[..., Stage], *, devices=None, stop_after: int | None = None) -> dict:
    """Runs (or resumes) `cfg` with the stage `make_stage(cfg, devices)` builds; returns a summary.
    `stop_after` ends the loop after that many steps of this call (tests use it to simulate an
    interruption). The run directory is locked for the whole run (`sr_jax.train.runlock`): a
    second trainer on it raises RunDirLocked."""
    maybe_initialize_distributed()
    with RunLock(cfg.run.out_dir, jax.process_index()):
        return _run_locked(cfg, make_stage, devices=devices, stop_after=stop_after)


def _run_locked(cfg, make_stage, *, devices=None, stop_after: int | None = None) -> dict:
    out = Path(cfg.run.out_dir)
    is_main = jax.process_index() == 0
    out.mkdir(parents=True, exist_ok=True)
    stage = make_stage(cfg, devices)
    trainer, total = stage.trainer, stage.total_steps
    ckpt = TrainCheckpointer(out, save_every=cfg.run.checkpoint_every, keep=cfg.run.keep_checkpoints,
                             async_save=cfg.run.async_checkpoint)
    start = ckpt.latest_step()
    if start is not None:
        kind = run_kind(out, ckpt.read_meta(start))
        if kind != stage.kind:  # the state would fit (same layout), the data position and config would not
            ckpt.close()
            raise ValueError(f"{out}: holds a {kind!r} run; this is a {stage.kind!r} run (use another run.out_dir)")
    if is_main:
        dump_yaml(cfg, out / RUN_CONFIG)
        save_tokenizer(cfg, stage.processor, out / "tokenizer")
        if trainer.vocab_map is not None and not (out / VOCAB_MAP_FILE).is_file():
            trainer.vocab_map.save(out / VOCAB_MAP_FILE)
    configured = total
    fit = bool(cfg.run.fit_schedule and cfg.run.max_seconds)
    record = _read_schedule(out)
    if record is not None:  # fitted by an earlier call: the schedule the saved state follows
        if record["configured_steps"] != total:
            ckpt.close()
            raise ValueError(f"{out / SCHEDULE_FILE}: fitted from {record['configured_steps']} steps, but this run is "
                             f"configured for {total}; use another run.out_dir or delete the file")
        total, fit = _apply_schedule_length(stage, record["total_steps"]), False
    if start is not None:
        state, data_state, _ = ckpt.restore(start, trainer.abstract_state())
        stage.set_state(data_state)
        log.info("resumed from step %d", start)
    else:
        state, start = trainer.init_state(), 0
    writer = MetricsWriter(out, tensorboard=cfg.run.tensorboard, enabled=is_main)
    writer.truncate_after(start)
    bar = tqdm(total=total, initial=start, disable=not (cfg.run.progress_bar and is_main),
               desc=stage.progress_desc, dynamic_ncols=True)

    def meta(step):
        return {"kind": stage.kind, **stage.meta(), "step": step}

    began, step, last = _clock(), start, {}
    first_done = None  # clock after this call's first step (compilation included)
    window = FIT_AFTER_STEPS  # timed steps the schedule is fitted on (fit_window)
    try:
        while step < total:
            made = stage.advance(state, step)
            if made is None:
                break  # data (prompts) used up
            state, metrics = made
            step += 1
            now = _clock()
            if first_done is None:
                first_done = now
            elif fit and step - start - 1 == FIT_AFTER_STEPS:
                window = _agreed(fit_window((now - first_done) / FIT_AFTER_STEPS, cfg.run.max_seconds))
            if fit and step - start - 1 == window:
                per_step = (now - first_done) / window
                fitted = _agreed(fitted_total(total, step, now - began, per_step, cfg.run.max_seconds,
                                              retrace_seconds=(first_done - began) - per_step))
                if fitted < total:
                    log.info("run.fit_schedule: %.2f s per step, so the schedule ends at step %d of %d", per_step,
                             fitted, total)
                    total = _apply_schedule_length(stage, fitted)
                    bar.total = total
                    bar.refresh()
                if is_main:
                    (out / SCHEDULE_FILE).write_text(json.dumps({
                        "total_steps": total, "configured_steps": configured, "seconds_per_step": round(per_step, 4),
                        "fitted_at_step": step, "max_seconds": cfg.run.max_seconds}, indent=2))
                fit = False
            writer.write(step, metrics)
            last = metrics
            bar.update(1)
            bar.set_postfix(**stage.postfix(metrics))
            ckpt.save(step, state, stage.get_state(), meta(step))
            if stop_after is not None and step - start >= stop_after:
                break
            if cfg.run.max_seconds and _clock() - began > cfg.run.max_seconds:
                log.info("wall-clock budget of %.0f s reached at step %d", cfg.run.max_seconds, step)
                break
        if step > start and ckpt.latest_step() != step:
            ckpt.save(step, state, stage.get_state(), meta(step), force=True)
    finally:
        bar.close()
        ckpt.close()
        writer.close()
    summary = {"step": step, "total_steps": total, "configured_steps": configured, "resumed_from": start, "last": last,
               "skipped": stage.skipped(), "out_dir": str(out)}
    finished = step >= total or stop_after is None
    if cfg.run.save_model and finished and step > start:  # every process: the weights may span hosts

        model = trainer.step.model(state)
        if lora_layers(model):
            merge_lora(model)
        save_model(model, out / "model", hf_dir=out / "tokenizer", overwrite=True)
        summary["model_dir"] = str(out / "model")
    return summary


# ---- CLI ----

def register_command(sub, name: str, *, help: str, config_cls, train: Callable, example_config: str,
                     example_overrides: str, errors: dict | None = None) -> None:
    """`sr-jax <name> --config X.yaml [key=value ...]`: loads `config_cls`, runs `train(cfg)` and
    prints its summary. Exit codes: 3 when the run directory is locked, `errors[type]` for a
    stage's own refusals (message on stderr)."""
    p = sub.add_parser(name, help=help)
    p.add_argument("--config", required=True, help=f"YAML file, e.g. {example_config}")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=f"e.g. {example_overrides}")
    p.set_defaults(func=lambda args: _command(args, config_cls, train, errors or {}))


def _command(args, config_cls, train, errors: dict) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config(config_cls, args.config, args.overrides)
    codes = {RunDirLocked: 3, **errors}
    try:
        summary = train(cfg)
    except tuple(codes) as e:
        print(f"error: {e}", file=sys.stderr)
        return next(code for kind, code in codes.items() if isinstance(e, kind))
    print(json.dumps(summary, indent=2, default=str))
    return 0
