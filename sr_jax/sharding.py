"""Device mesh, the one table of logical-axis rules, and placement of parameters and batches.

The model names every parameter dimension with a logical axis (`nnx.Param(..., logical_axes=...)`)
and marks a few activations with `constrain(x, logical_axes)`. `LOGICAL_AXIS_RULES` is the only
place that maps those names onto the mesh axes `data`, `fsdp` and `tensor` by default; a run
changes any entry from its training YAML (`train.mesh.rules`, see `MeshConfig`):

- `data`: pure data parallelism (parameters replicated);
- `fsdp`: data parallelism with parameters, gradients and optimizer state sharded (ZeRO-3 style;
  XLA all-gathers a layer's weights when it runs);
- `tensor`: Megatron-style tensor parallelism over heads / MLP width / vocabulary.

A dimension whose size is not divisible by its mesh axes is replicated instead (logged at debug
level), so tiny test models run on any mesh.

Placement functions take `rules=` explicitly. Model code cannot (it only names axes), so
`constrain` and the attention kernels read the rules of the enclosing `use_mesh(mesh, rules)`,
which the trainers and `sr-jax plan` enter around every trace; outside one, the default table.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import math
import os
from typing import Any, Iterator, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sr_jax.config import ConfigError

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")



class AxisRules(Mapping[str, tuple[str, ...]]):
    """An immutable, hashable logical axis -> mesh axes table (hashable so that program caches can
    key on it: the same model traced under other rules is another program)."""

    def __init__(self, table: Mapping[str, Sequence[str]]):
        self._table = {name: tuple(axes) for name, axes in table.items()}
        self._hash = hash(tuple(sorted(self._table.items())))

    def __getitem__(self, name: str) -> tuple[str, ...]:
        return self._table[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._table)

    def __len__(self) -> int:
        return len(self._table)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        return isinstance(other, Mapping) and dict(self.items()) == {k: tuple(v) for k, v in other.items()}

    def __repr__(self) -> str:
        return f"AxisRules({self._table})"

    def replace(self, changes: Mapping[str, Any], where: str = "rules") -> "AxisRules":
        """This table with some entries replaced; `changes` maps a logical axis to a list of mesh
        axes (a single name for one axis; empty or null: replicated). Names that are not logical
        axes of this table or mesh axes are a `ConfigError` naming `where.<axis>`."""
        table = dict(self._table)
        for name, axes in changes.items():
            key = f"{where}.{name}"
            if name not in table:
                raise ConfigError(f"{key}: unknown logical axis {name!r}; known: {sorted(table)}")
            axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
            if not isinstance(axes, (list, tuple)) or not all(isinstance(a, str) for a in axes):
                raise ConfigError(f"{key}: expected a list of mesh axes {list(MESH_AXES)}, got {axes!r}")
            bad = [a for a in axes if a not in MESH_AXES]
            if bad:
                raise ConfigError(f"{key}: unknown mesh axis {bad[0]!r}; mesh axes are {list(MESH_AXES)}")
            if len(set(axes)) != len(axes):
                raise ConfigError(f"{key}: mesh axis listed twice in {list(axes)}")
            table[name] = tuple(axes)
        return AxisRules(table)


DEFAULT_RULES = AxisRules({
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
})
LOGICAL_AXIS_RULES = DEFAULT_RULES  # the name older code and tests import

# The rules `constrain` applies: set only by `use_mesh` (scoped to a `with` block), read at trace time.
_ACTIVE_RULES: contextvars.ContextVar[AxisRules | None] = contextvars.ContextVar("sr_jax_axis_rules", default=None)


def active_rules() -> AxisRules:
    """The rules of the enclosing `use_mesh`, else the default table."""
    return _ACTIVE_RULES.get() or DEFAULT_RULES


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Mapping[str, Sequence[str]] | None = None):
    """`jax.set_mesh(mesh)` plus the logical-axis rules that the model's activation constraints
    use while tracing inside the block (None: the default table)."""
    token = _ACTIVE_RULES.set(DEFAULT_RULES if rules is None else AxisRules(rules))
    try:
        with jax.set_mesh(mesh):
            yield mesh
    finally:
        _ACTIVE_RULES.reset(token)


@dataclasses.dataclass
class MeshConfig:
    """Mesh axis sizes (one of them may be -1 to take all remaining devices) and the run's changes
    to the default logical-axis rules: `rules: {mlp: [fsdp], embed: []}` in YAML, or
    `train.mesh.rules.mlp=[fsdp]` as an override (`[]` or `null`: replicated). Entries not named
    keep `DEFAULT_RULES`; `axis_rules()` is the resulting table."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    rules: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        self.axis_rules()  # unknown logical or mesh axes fail when the config is read, naming the key

    def axis_rules(self) -> AxisRules:
        return DEFAULT_RULES.replace(self.rules or {})

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
                    rules: Mapping[str, Sequence[str]] | None = None) -> PartitionSpec:
    """PartitionSpec for logical `axes` under `rules` (None: `active_rules()`). With `shape` and
    `mesh`, a dimension that its mesh axes do not divide is replicated; a mesh axis already used
    by an earlier dimension is dropped."""
    rules = active_rules() if rules is None else rules
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
            raise KeyError(f"logical axis {name!r} has no sharding rule; known: {sorted(rules)}")
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


def logical_sharding(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                     rules: Mapping[str, Sequence[str]] | None = None) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, shape=shape, mesh=mesh, rules=rules))


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical axes on an activation, under the rules of the enclosing
    `use_mesh`; a no-op when no mesh is set, so model code runs unchanged outside sharded training."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, shape=x.shape, mesh=mesh))


# ---------------------------------------------------------------------------------------------
# parameters


def _is_variable(x) -> bool:
    from flax import nnx  # local: keeps this module importable without building models

    return isinstance(x, nnx.Variable)


def tree_shardings(tree, mesh: Mesh, rules: Mapping[str, Sequence[str]] | None = None):
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
            return leaf.replace(logical_sharding(axes, shape, mesh, rules))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, tree, is_leaf=_is_variable)


def param_shardings(model_or_state, mesh: Mesh, rules: Mapping[str, Sequence[str]] | None = None):
    """NamedSharding per parameter (an `nnx.State` mirroring the model's state)."""
    from flax import nnx

    state = nnx.state(model_or_state) if isinstance(model_or_state, nnx.Module) else model_or_state
    return tree_shardings(state, mesh, rules)


def shard_model(model, mesh: Mesh, rules: Mapping[str, Sequence[str]] | None = None):
    """Places the model's variables on the mesh, in place; returns the model."""
    from flax import nnx

    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, param_shardings(state, mesh, rules)))
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


def batch_shardings(batch: Mapping[str, Any], mesh: Mesh,
                    rules: Mapping[str, Sequence[str]] | None = None) -> dict[str, NamedSharding]:
    out = {}
    for key, value in batch.items():
        if key not in BATCH_AXES:
            raise KeyError(f"batch key {key!r} has no sharding rule; known: {sorted(BATCH_AXES)}")
        shape = np.shape(value)
        out[key] = logical_sharding(BATCH_AXES[key], shape, mesh, rules)
    return out


def shard_batch(batch: Mapping[str, Any], mesh: Mesh,
                rules: Mapping[str, Sequence[str]] | None = None) -> dict[str, jax.Array]:
    """Host arrays -> global arrays on the mesh. Each process passes its own slice of the batch
    dimensions (on one host: the whole batch)."""
    if jax.process_count() == 1:
        shardings = batch_shardings(batch, mesh, rules)
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
        sharding = NamedSharding(mesh, logical_to_spec(BATCH_AXES[k], mesh=mesh, rules=rules))
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
