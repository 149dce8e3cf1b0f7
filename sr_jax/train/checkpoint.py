"""Training checkpoints with Orbax's CheckpointManager.

A run directory holds `run_config.yaml` (the full config of the stage that wrote it: SFT or RL)
and `checkpoints/<step>/` with three items: `state` (params, frozen weights, optimizer state,
step, RNG: one pytree, restored straight onto the current mesh, whatever its shape), `data` (the
batch producer's position: Grain iterator or prompt stream) and `meta` (`kind`, the stage that
wrote it, a key of `RUN_KINDS`; step; skip counters). Exporting and evaluating read `kind` to
parse `run_config.yaml` with the right config class; resuming refuses another stage's run.
In a multi-process run each host reads its own share of the data, so `data` holds every host's
iterator state (`{"hosts": [...]}`, gathered at save time) and a restore needs the same number of
processes. Orbax writes each step to a temporary directory and renames it when complete, and
`latest_step()` only sees finalised steps, so a save killed half way is
never restored.
"""

from __future__ import annotations

import base64
import importlib
import json
import logging
from pathlib import Path

import jax
import numpy as np
import yaml
from jax.experimental import multihost_utils

from sr_jax.config import load_config

RUN_CONFIG = "run_config.yaml"
CHECKPOINTS = "checkpoints"
# The kinds of run a checkpoint's meta names, with the config class of their run_config.yaml.
RUN_KINDS = {"sft": ("sr_jax.train.sft", "SFTConfig"), "rl": ("sr_jax.rl.config", "RLConfig")}


def _jsonable(value):
    """Grain iterator states may hold bytes; JSON carries them base64-encoded."""
    if isinstance(value, bytes):
        return {"__bytes__": base64.b64encode(value).decode()}
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _gather_json(value) -> list:
    """Every process's JSON-able `value`, in process order (on every process)."""
    blob = np.frombuffer(json.dumps(value).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([blob.size], np.int64))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: blob.size] = blob
    rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    return [json.loads(row[:n].tobytes().decode()) for row, n in zip(rows, sizes)]


def _from_jsonable(value):
    if isinstance(value, dict):
        if set(value) == {"__bytes__"}:
            return base64.b64decode(value["__bytes__"])
        return {k: _from_jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_jsonable(v) for v in value]
    return value


class TrainCheckpointer:
    def __init__(self, run_dir: str | Path, *, save_every: int, keep: int, async_save: bool = True):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = (Path(run_dir) / CHECKPOINTS).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=save_every,
                                               enable_async_checkpointing=async_save, create=True)
        logging.getLogger("absl").setLevel(logging.ERROR)  # Orbax logs every save at INFO
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state, meta: dict, *, force: bool = False) -> bool:
        ocp = self._ocp
        data = _jsonable(data_state)
        if jax.process_count() > 1 and (force or self.manager.should_save(step)):
            # Orbax writes JSON items from process 0 only: it gets every host's position (a
            # collective; every process decides the same way for the same step).
            data = {"hosts": _gather_json(data)}
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data),
            meta=ocp.args.JsonSave(meta)), force=force)

    def restore(self, step: int, abstract_state, *, with_data: bool = True):
        """`abstract_state`: ShapeDtypeStructs with the target shardings (any mesh). Without
        `with_data` the data position comes back as None (e.g. exporting a multi-host run's
        weights on one machine)."""
        ocp = self._ocp
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore()))
        data = out.data
        hosts = data.get("hosts") if isinstance(data, dict) and set(data) == {"hosts"} else None
        if not with_data:
            return out.state, None, out.meta
        if hosts is not None or jax.process_count() > 1:
            count = 1 if hosts is None else len(hosts)
            if count != jax.process_count():
                raise ValueError(f"{self.directory / str(step)}: saved by {count} process(es), restored by "
                                 f"{jax.process_count()}; each host's data position only carries over to "
                                 "the same number of hosts")
            data = hosts[jax.process_index()]
        return out.state, _from_jsonable(data), out.meta

    def read_meta(self, step: int) -> dict:
        """The `meta` item of one step alone (no state, no data position)."""
        return self.manager.restore(step, args=self._ocp.args.Composite(meta=self._ocp.args.JsonRestore())).meta

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_with_shardings(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


# ---- export support: a training run -> a plain model ----

def run_dir_of(path: str | Path) -> Path | None:
    path = Path(path)
    for candidate in (path, path.parent, path.parent.parent):
        if (candidate / RUN_CONFIG).is_file() and (candidate / CHECKPOINTS).is_dir():
            return candidate
    return None


def is_train_checkpoint(path: str | Path) -> bool:
    return run_dir_of(path) is not None


def run_kind(run_dir: str | Path, meta: dict) -> str:
    """The kind of run (`RUN_KINDS` key) that wrote a checkpoint with this `meta`."""
    kind = meta.get("kind") if isinstance(meta, dict) else None
    if kind is None:
        # Checkpoints from before the kind was recorded: only RL configs have these sections.

        raw = yaml.safe_load((Path(run_dir) / RUN_CONFIG).read_text()) or {}
        kind = "rl" if {"grpo", "rewards"} & set(raw) else "sft"
    if kind not in RUN_KINDS:
        raise ValueError(f"{run_dir}: checkpoint written by an unknown kind of run {kind!r}; "
                         f"known: {sorted(RUN_KINDS)}")
    return kind


def load_run_config(run_dir: str | Path, kind: str):
    """`run_dir/run_config.yaml` as the config class of runs of `kind`."""
    module, name = RUN_KINDS[kind]
    return load_config(getattr(importlib.import_module(module), name), Path(run_dir) / RUN_CONFIG)
