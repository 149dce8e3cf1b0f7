"""Device mesh, the one table of logical-axis rules, and placement of parameters and batches.

The model names every parameter dimension with a logical axis (`nnx.Param(..., logical_axes=...)`)
and marks a few activations with `constrain(x, logical_axes)`. `LOGICAL_AXIS_RULES` is the only
place that maps those names onto the mesh axes `data`, `fsdp` and `tensor`:

- `data`: pure data parallelism (parameters replicated);
- `fsdp`: data parallelism with parameters, gradients and optimizer state sharded (ZeRO-3 style;
  XLA all-gathers a layer's weights when it runs);
- `tensor`: Megatron-style tensor parallelism over heads / MLP width / vocabulary.

A dimension whose size is not divisible by its mesh axes is replicated instead (logged at debug
level), so tiny test models run on any mesh.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")

LOGICAL_AXIS_RULES: dict[str, tuple[str, ...]] = {
    # --- activations ---
    "batch": BATCH,               # example rows
    "seq": (),                    # token positions
    "act_embed": (),              # hidden features of (batch, seq, embed) activations
    "label_tokens": BATCH,        # the gathered labelled positions of the loss
    "patches": BATCH,             # vision patch rows (all images of a batch, concatenated)
    "act_vision_embed": (),
    # --- text decoder parameters ---
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "mlp": ("tensor",),
    "q_heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    # --- vision tower parameters ---
    "vision_embed": ("fsdp",),
    "vision_qkv": ("tensor",),
    "vision_heads": ("tensor",),
    "vision_mlp": ("tensor",),
    "vision_merge": ("fsdp",),
    "vision_pos": (),
    "patch": (),
    # --- adapters ---
    "lora_rank": (),
}


@dataclasses.dataclass
class MeshConfig:
    """Mesh axis sizes; one of them may be -1 to take all remaining devices."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1

    def resolve(self, num_devices: int) -> tuple[int, int, int]:
        sizes = [self.data, self.fsdp, self.tensor]
        if any(s == 0 or s < -1 for s in sizes):
            raise ValueError(f"mesh sizes must be positive or -1, got {dataclasses.asdict(self)}")
        if sizes.count(-1) > 1:
            raise ValueError(f"at most one mesh axis may be -1, got {dataclasses.asdict(self)}")
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if num_devices % known:
                raise ValueError(f"mesh {dataclasses.asdict(self)}: {num_devices} devices are not divisible "
                                 f"by the fixed axes' product {known}")
            sizes[sizes.index(-1)] = num_devices // known
        if math.prod(sizes) != num_devices:
            raise ValueError(f"mesh {dataclasses.asdict(self)} needs {math.prod(sizes)} devices, "
                             f"but {num_devices} are available")
        return tuple(sizes)


def maybe_initialize_distributed() -> bool:
    """Joins a multi-host job (`jax.distributed.initialize()`) when the environment says there is one.

    Recognised: an explicit coordinator (`JAX_COORDINATOR_ADDRESS` host:port, with
    `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` unless a cluster manager provides them), a multi-task
    SLURM or Open MPI launch, or a multi-host Cloud TPU slice (`TPU_WORKER_HOSTNAMES` with several
    hosts). Must run before anything touches a JAX device. Returns True when it initialised.
    """
    if jax.distributed.is_initialized():
        return False
    env = os.environ
    multi = (
        bool(env.get("JAX_COORDINATOR_ADDRESS"))
        or int(env.get("SLURM_NTASKS", "1")) > 1
        or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
        or len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1
    )
    if not multi:
        return False
    kwargs = {}
    if env.get("JAX_NUM_PROCESSES") or env.get("JAX_PROCESS_ID"):
        try:
            kwargs = {"num_processes": int(env["JAX_NUM_PROCESSES"]), "process_id": int(env["JAX_PROCESS_ID"])}
        except (KeyError, ValueError) as e:
            raise ValueError("JAX_NUM_PROCESSES and JAX_PROCESS_ID must both be integers when either is set "
                             f"(got {env.get('JAX_NUM_PROCESSES')!r}, {env.get('JAX_PROCESS_ID')!r})") from e
    jax.distributed.initialize(**kwargs)
    log.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
    return True


def make_mesh(cfg: MeshConfig | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: every device of every process)."""
    cfg = cfg or MeshConfig()
    devices = list(jax.devices() if devices is None else devices)
    shape = cfg.resolve(len(devices))
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    if len(devices) == len(jax.devices()) or devices[0].platform == "tpu":
        # Topology-aware device order (ICI rings on TPU) when the mesh spans everything, or spans
        # a TPU topology compiled for ahead of time (`sr-jax plan --topology`).
        try:
            return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
        except (ValueError, NotImplementedError, AssertionError):
            if len(devices) == len(jax.devices()):
                raise
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


# ---------------------------------------------------------------------------------------------
# logical axes -> PartitionSpec


def _axis_sizes(mesh) -> Mapping[str, int]:
    return dict(mesh.shape)


def logical_to_spec(axes: Sequence[str | None], *, shape: Sequence[int] | None = None, mesh=None,
                    rules: Mapping[str, tuple[str, ...]] = LOGICAL_AXIS_RULES) -> PartitionSpec:
    """PartitionSpec for logical `axes`. With `shape` and `mesh`, a dimension that its mesh axes
    do not divide is replicated; a mesh axis already used by an earlier dimension is dropped."""
    if shape is not None and len(shape) != len(axes):
        raise ValueError(f"logical axes {tuple(axes)} do not match shape {tuple(shape)}")
    sizes = _axis_sizes(mesh) if mesh is not None else None
    used: set[str] = set()
    spec = []
    for dim, name in enumerate(axes):
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise KeyError(f"logical axis {name!r} has no rule in LOGICAL_AXIS_RULES")
        mesh_axes = tuple(a for a in rules[name] if a not in used and (sizes is None or a in sizes))
        if sizes is not None and shape is not None and mesh_axes:
            parts = math.prod(sizes[a] for a in mesh_axes)
            if shape[dim] % parts:
                log.debug("dimension %d (%s, size %d) not divisible by mesh axes %s (%d): replicated",
                          dim, name, shape[dim], mesh_axes, parts)
                mesh_axes = ()
        used.update(mesh_axes)
        spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*spec)


def logical_sharding(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, shape=shape, mesh=mesh))


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical axes on an activation; a no-op when no mesh is set
    (`jax.set_mesh`), so model code runs unchanged outside sharded training."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, shape=x.shape, mesh=mesh))


# ---------------------------------------------------------------------------------------------
# parameters


def _is_variable(x) -> bool:
    from flax import nnx  # local: keeps this module importable without building models

    return isinstance(x, nnx.Variable)


def tree_shardings(tree, mesh: Mesh):
    """Shardings for any pytree holding `nnx.Variable`s (a model state, an optax state built on
    one, a train state): a Variable with `logical_axes` metadata is placed by the rules, every
    other array is replicated. Variables stay Variables, so the result matches `tree`."""

    def one(leaf):
        if _is_variable(leaf):
            value = leaf.get_value()
            axes = leaf.get_metadata().get("logical_axes")
            shape = getattr(value, "shape", ())
            if axes is None or len(axes) != len(shape):
                return leaf.replace(NamedSharding(mesh, PartitionSpec()))
            return leaf.replace(logical_sharding(axes, shape, mesh))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, tree, is_leaf=_is_variable)


def param_shardings(model_or_state, mesh: Mesh):
    """NamedSharding per parameter (an `nnx.State` mirroring the model's state)."""
    from flax import nnx

    state = nnx.state(model_or_state) if isinstance(model_or_state, nnx.Module) else model_or_state
    return tree_shardings(state, mesh)


def shard_model(model, mesh: Mesh):
    """Places the model's variables on the mesh, in place; returns the model."""
    from flax import nnx

    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, param_shardings(state, mesh)))
    return model


# ---------------------------------------------------------------------------------------------
# batches

# Logical axes of each batch array. Every array carries a leading microbatch axis (gradient
# accumulation steps, possibly 1) that is never sharded.
BATCH_AXES: dict[str, tuple[str | None, ...]] = {
    "input_ids": (None, "batch", "seq"),
    "attention_mask": (None, "batch", "seq"),
    "labels": (None, "batch", "seq"),
    "segment_ids": (None, "batch", "seq"),
    "position_ids": (None, None, "batch", "seq"),
    "pixel_values": (None, "patches", None),
    "vision_interp_index": (None, "patches", None),
    "vision_interp_weight": (None, "patches", None),
    "vision_rope_hw": (None, "patches", None),
    "vision_segment": (None, "patches"),
}


def batch_shardings(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, NamedSharding]:
    out = {}
    for key, value in batch.items():
        if key not in BATCH_AXES:
            raise KeyError(f"batch key {key!r} has no sharding rule; known: {sorted(BATCH_AXES)}")
        shape = np.shape(value)
        out[key] = logical_sharding(BATCH_AXES[key], shape, mesh)
    return out


def shard_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """Host arrays -> global arrays on the mesh. Each process passes its own slice of the batch
    dimensions (on one host: the whole batch)."""
    if jax.process_count() == 1:
        shardings = batch_shardings(batch, mesh)
        return {k: jax.device_put(np.asarray(v), shardings[k]) for k, v in batch.items()}
    # Several hosts: no replication fallback (the global shape is not known here); the batch
    # dimensions must divide over the data axes.
    out = {}
    for k, v in batch.items():
        if k not in BATCH_AXES:
            raise KeyError(f"batch key {k!r} has no sharding rule; known: {sorted(BATCH_AXES)}")
        v = np.asarray(v)
        if k == "vision_segment":
            # Image ids count from 0 on every host: offset them so that images (and padding) of
            # different hosts never share a vision-attention block. A host's ids are < its patch count.
            v = v + jax.process_index() * v.shape[-1]
        sharding = NamedSharding(mesh, logical_to_spec(BATCH_AXES[k], mesh=mesh))
        out[k] = jax.make_array_from_process_local_data(sharding, v)
    return out


def global_from_full(batch: Mapping[str, Any], shardings: Mapping[str, NamedSharding]) -> dict:
    """Host arrays that every process holds in full (the same values everywhere) -> global arrays
    with `shardings`; each process places only its devices' slices. One process: unchanged (jit
    places host arrays itself)."""
    if jax.process_count() == 1:
        return dict(batch)
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        out[k] = jax.make_array_from_callback(v.shape, shardings[k], lambda index, v=v: v[index])
    return out
