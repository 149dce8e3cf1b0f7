"""The sharded, jitted training step every stage shares (SFT here; GRPO passes its own loss).

Batch layout (host arrays; every array has a leading microbatch axis k = grad_accum_steps):
  input_ids       (k, B, T) int32
  attention_mask  (k, B, T) int32    1 = real token
  labels          (k, B, T) int32    HF-aligned, -100 = ignored (the shift happens in the loss)
  position_ids    (k, 3, B, T) int32 M-RoPE positions (`model.prepare_positions`, per example)
  segment_ids     (k, B, T) int32    optional: packed rows; attention and the label shift stay
                                     inside a segment; ids in [0, T)
  pixel_values    (k, P, patch_dim) float optional: all patches of the microbatch, padded to a fixed
                                     budget P (multiple of 4) with `vision_arrays`
  vision_interp_index (k, P, 4) int32, vision_interp_weight (k, P, 4) float32,
  vision_rope_hw (k, P, 2) int32, vision_segment (k, P) int32: the `VisionInputs` tables
Padding patches sit at the end, form their own attention segment and are never gathered by an
image token, so they do not change the result.

`TrainState` holds only arrays (checkpointable as is): step, trainable params, frozen params,
optimizer state over the trainable params, and the base RNG key data. The model's graph
definition and its non-parameter state (the LoRA dropout stream, re-keyed every step from
(rng, step, microbatch)) live in the `TrainStep` object.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sr_jax.batch import SFT_REQUIRED_KEYS as REQUIRED_KEYS, VISION_KEYS
from sr_jax.lora import LoRAParam, set_lora_dropout
from sr_jax.models import family_of, get_family
from sr_jax.sharding import BATCH_AXES, batch_shardings, tree_shardings, use_mesh
from sr_jax.train.config import LossConfig, TrainConfig
from sr_jax.train.loss import LossStats, count_label_tokens, label_loss
from sr_jax.train.optim import Optimizer


class TrainState(struct.PyTreeNode):
    step: jax.Array        # int32: optimizer updates applied so far
    params: nnx.State      # trainable parameters
    frozen: nnx.State      # every other parameter (base weights under LoRA, a frozen tower)
    opt_state: Any         # optax state over `params` only
    rng: jax.Array         # uint32 key data; step keys are fold_in(rng, step)


# ---------------------------------------------------------------------------------------------
# which parameters train


def _dotted(path) -> str:
    return ".".join(str(p) for p in path)


def trainable_filter(cfg: TrainConfig, family=None):
    """nnx filter of the parameters the optimizer updates (`family`: the model's, for its vision tower)."""
    frozen = [re.compile(p) for p in cfg.freeze]
    if cfg.freeze_vision:
        frozen.append(re.compile((family or get_family()).freeze_vision))

    def is_trainable(path, value) -> bool:
        if not isinstance(value, nnx.Param):
            return False
        if cfg.lora.enabled and not isinstance(value, LoRAParam):
            return False
        return not any(p.fullmatch(_dotted(path)) for p in frozen)

    return is_trainable


def split_model(model, cfg: TrainConfig):
    """(graphdef, trainable, frozen, rest) with training-time settings (remat, LoRA dropout on)."""
    family = family_of(model)
    family.set_remat(model, cfg.remat)
    set_lora_dropout(model, True)
    try:
        graphdef, trainable, frozen, rest = nnx.split(model, trainable_filter(cfg, family), nnx.Param, ...)
    finally:
        set_lora_dropout(model, False)
    if not jax.tree.leaves(trainable):
        raise ValueError("no trainable parameters: check lora.enabled / freeze / freeze_vision")
    return graphdef, trainable, frozen, rest


def _rekey(rest, key):
    """Non-parameter state with every RNG stream reset to `key` (deterministic per microbatch)."""
    def one(v):
        if isinstance(v, nnx.RngKey):
            return v.replace(key)
        if isinstance(v, nnx.RngCount):
            return v.replace(jnp.zeros_like(v.get_value()))
        return v
    return jax.tree.map(one, rest, is_leaf=lambda x: isinstance(x, nnx.Variable))


def create_train_state(model, optimizer: Optimizer, mesh: Mesh, cfg: TrainConfig) -> TrainState:
    """Splits the model and places params, frozen weights and a fresh optimizer state on the mesh.
    The returned state shares (and the step then donates) the model's arrays."""
    _, params, frozen, _ = split_model(model, cfg)
    rules = cfg.mesh.axis_rules()
    params = jax.device_put(params, tree_shardings(params, mesh, rules))
    frozen = jax.device_put(frozen, tree_shardings(frozen, mesh, rules))
    opt_shardings = tree_shardings(jax.eval_shape(optimizer.tx.init, params), mesh, rules)
    opt_state = jax.jit(optimizer.tx.init, out_shardings=opt_shardings)(params)
    replicated = NamedSharding(mesh, PartitionSpec())
    return TrainState(
        step=jax.device_put(jnp.zeros((), jnp.int32), replicated),
        params=params,
        frozen=frozen,
        opt_state=opt_state,
        rng=jax.device_put(jax.random.key_data(jax.random.key(cfg.seed)), replicated),
    )


# ---------------------------------------------------------------------------------------------
# the step


def forward_loss(model, batch: Mapping[str, jax.Array], cfg: LossConfig, token_weights: tuple = ()) -> LossStats:
    """Loss sums of one microbatch (arrays without the microbatch axis); token_weights: `cfg.token_weights`
    as ((model id, weight), ...) (`sr_jax.train.loss.resolve_token_weights`)."""
    pixel_values, vision = batch.get("pixel_values"), None
    if pixel_values is not None:
        vision = tuple(batch[k] for k in VISION_KEYS)
    segment_ids = batch.get("segment_ids")
    out = model.features(batch["input_ids"], batch["attention_mask"], pixel_values,
                         position_ids=batch["position_ids"], vision=vision, segment_ids=segment_ids)
    return label_loss(model.logits, out.hidden, batch["labels"], segment_ids=segment_ids,
                      max_label_tokens=cfg.max_label_tokens, chunk_size=cfg.chunk_size, weighting=cfg.weighting,
                      token_weights=token_weights)


class SFTLoss:
    """The SFT objective for the shared step: label cross-entropy (`train.loss`), summed per
    microbatch and divided once by the whole batch's weight."""

    has_label_buffer = True  # the loss gathers labelled rows into a buffer (`loss.label_bucket` sizes it)

    def __init__(self, cfg: LossConfig, token_weights: tuple = ()):
        # `cfg.token_weights` names tokens by text; the SFT stage (sr_jax.train.sft) resolves them to
        # model ids (`resolve_token_weights`) and passes them here (a restore-only step needs none).
        self.cfg, self.token_weights = cfg, tuple(token_weights)

    def with_label_capacity(self, capacity: int) -> "SFTLoss":
        return SFTLoss(dataclasses.replace(self.cfg, max_label_tokens=capacity), self.token_weights)

    def zeros(self) -> LossStats:
        return LossStats.zeros()

    def __call__(self, model, microbatch) -> LossStats:
        return forward_loss(model, microbatch, self.cfg, self.token_weights)

    def denominator(self, stats: LossStats):
        return jnp.maximum(stats.weight, 1.0)

    def metrics(self, stats: LossStats, denom) -> dict:
        return {"loss": stats.loss_sum / denom, "token_accuracy": stats.correct / jnp.maximum(stats.tokens, 1.0),
                "label_tokens": stats.tokens, "label_tokens_dropped": stats.dropped, "loss_weight": stats.weight}

    def batch_shardings(self, batch, mesh, rules=None) -> dict:
        return batch_shardings(batch, mesh, rules)


def _train_step(graphdef, optimizer: Optimizer, loss, state: TrainState, rest, batch, spans=(None, None)):
    """One optimizer update over the batch's k microbatches for any stage's `loss` (`SFTLoss`,
    `sr_jax.rl.grpo.GRPOLoss`): its per-microbatch sums are accumulated (scanned), then divided
    once by `loss.denominator`, so the gradient is exactly that of the whole batch. `spans`:
    the batch's `attention_spans`."""
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

    def micro_grads(mb, index):
        def loss_fn(params, frozen):
            # Fresh Variables for the frozen weights in this trace: nnx.remat writes back every
            # Variable of a layer, which is only allowed within the trace that created it.
            frozen = jax.tree.map(lambda x: x, frozen)
            model = nnx.merge(graphdef, params, frozen, _rekey(rest, jax.random.fold_in(key, index)))
            family_of(model).set_attention_spans(model, *spans)
            stats = loss(model, mb)
            return stats.loss_sum, stats
        (_, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, state.frozen)
        return jax.tree.map(lambda g: g.astype(jnp.float32), grads), stats

    k = batch["input_ids"].shape[0]
    if k == 1:
        grads, stats = micro_grads(jax.tree.map(lambda x: x[0], batch), 0)
    else:
        def body(carry, xs):
            g, s = micro_grads(*xs)
            return (jax.tree.map(jnp.add, carry[0], g), carry[1] + s), None
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        (grads, stats), _ = jax.lax.scan(body, (zeros, loss.zeros()), (batch, jnp.arange(k)))

    denom = loss.denominator(stats)
    grads = jax.tree.map(lambda g: g / denom, grads)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = optimizer.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {**loss.metrics(stats, denom), "grad_norm": grad_norm,
               "learning_rate": optimizer.schedule(state.step)}
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics


class TrainStep:
    """`state, metrics = step(state, batch)`: one optimizer update over k microbatches.

    Jitted with the state's shardings (donated) and the batch's shardings; one compilation per
    batch signature (keys and shapes) and labelled-row buffer size. `loss` is the stage's
    objective (default: `SFTLoss(cfg.loss)`); it also says how its batch is sharded."""

    def __init__(self, model, optimizer: Optimizer, mesh: Mesh, cfg: TrainConfig,
                 compiler_options: dict | None = None, loss=None):
        self.mesh, self.cfg, self.optimizer = mesh, cfg, optimizer
        self.loss = SFTLoss(cfg.loss) if loss is None else loss
        self.rules = cfg.mesh.axis_rules()  # the run's logical-axis rules (train.mesh.rules)
        self.compiler_options = compiler_options  # XLA options, e.g. a lower CPU optimisation level in tests
        self.graphdef, params, frozen, self.rest = split_model(model, cfg)
        abstract = jax.eval_shape(
            lambda p, f: TrainState(step=jnp.zeros((), jnp.int32), params=p, frozen=f,
                                    opt_state=optimizer.tx.init(p),
                                    rng=jax.random.key_data(jax.random.key(0))), params, frozen)
        self.state_shardings = tree_shardings(abstract, mesh, self.rules)
        self.rest_shardings = tree_shardings(self.rest, mesh, self.rules)
        self._compiled: dict[tuple, Any] = {}

    def use_optimizer(self, optimizer: Optimizer) -> None:
        """Steps from now on update with `optimizer` (e.g. a shorter schedule); its state must have
        the layout of the one the state was built with."""
        self.optimizer = optimizer
        self._compiled.clear()

    def _jitted(self, batch, label_capacity: int | None = None, spans=(None, None)):
        signature = tuple(sorted((k, np.shape(v), str(v.dtype) if hasattr(v, "dtype") else str(np.asarray(v).dtype))
                                 for k, v in batch.items())) + (label_capacity, tuple(spans))
        if signature not in self._compiled:
            replicated = NamedSharding(self.mesh, PartitionSpec())
            loss = self.loss if label_capacity is None else self.loss.with_label_capacity(label_capacity)
            fn = lambda state, rest, b: _train_step(self.graphdef, self.optimizer, loss, state, rest, b, tuple(spans))
            self._compiled[signature] = jax.jit(
                fn,
                in_shardings=(self.state_shardings, self.rest_shardings, self.loss.batch_shardings(batch, self.mesh, self.rules)),
                out_shardings=(self.state_shardings, replicated),
                donate_argnums=(0,),
                compiler_options=self.compiler_options,
            )
        return self._compiled[signature]

    def label_capacity(self, label_counts) -> int | None:
        """The labelled-row buffer for a step whose microbatches hold `label_counts` label tokens
        (whole global microbatches), or None for the fixed `max_label_tokens`."""
        bucket, cap = self.cfg.loss.label_bucket, self.cfg.loss.max_label_tokens
        if not bucket:
            return None
        size = max(bucket, -(-max(int(n) for n in label_counts) // bucket) * bucket)
        return size if cap is None else min(size, cap)

    def __call__(self, state: TrainState, batch: Mapping[str, Any], label_counts=None, spans=None):
        """`label_counts`: label tokens per (global) microbatch, as `count_step_labels` gives;
        counted here from the host arrays when not given (single process). `spans`: the
        batch's `attention_spans` (all hosts' when several run); measured here from the host
        arrays when not given in a single process, otherwise none (attention over whole rows)."""
        capacity = None
        if getattr(self.loss, "has_label_buffer", False) and self.cfg.loss.label_bucket:
            capacity = self.label_capacity(count_step_labels(batch) if label_counts is None else label_counts)
        if spans is None:
            spans = attention_spans(batch) if jax.process_count() == 1 else (None, None)
        with use_mesh(self.mesh, self.rules):
            return self._jitted(batch, capacity, spans)(state, self.rest, dict(batch))

    def lower(self, state, batch: Mapping[str, Any]):
        """The step lowered for this state and batch without running it; both may be abstract
        (`jax.ShapeDtypeStruct`s with shardings). `.compile()` gives XLA's memory and cost
        analyses (used by `sr_jax.plan`); the buffer is the fixed `max_label_tokens`."""
        with use_mesh(self.mesh, self.rules):
            return self._jitted(batch).lower(state, self.rest, dict(batch))

    def model(self, state: TrainState):
        """The network with the state's weights (sharing its arrays; LoRA dropout off), e.g. to
        evaluate or to `merge_lora` and export. A later step donates those arrays."""
        model = nnx.merge(self.graphdef, state.params, state.frozen, self.rest)
        set_lora_dropout(model, False)
        return model


def make_train_step(model, optimizer: Optimizer, mesh: Mesh, cfg: TrainConfig,
                    compiler_options: dict | None = None) -> TrainStep:
    return TrainStep(model, optimizer, mesh, cfg, compiler_options)


# ---------------------------------------------------------------------------------------------
# host-side batch helpers


def vision_arrays(pixel_values, image_grid_thw, patch_budget: int, vision_cfg) -> dict[str, np.ndarray]:
    """The vision entries of one microbatch: patches and tables padded to `patch_budget` rows."""
    vision = get_family(getattr(vision_cfg, "model_type", None)).module("vision")
    pad_patches, vision_inputs = vision.pad_patches, vision.vision_inputs
    pixel_values = np.asarray(pixel_values, np.float32)
    tables = vision_inputs(image_grid_thw, vision_cfg)
    if tables.segment.shape[0] != pixel_values.shape[0]:
        raise ValueError(f"image_grid_thw describes {tables.segment.shape[0]} patches but pixel_values has "
                         f"{pixel_values.shape[0]} rows")
    pixel_values, tables = pad_patches(pixel_values, tables, patch_budget)
    return {"pixel_values": pixel_values, **dict(zip(VISION_KEYS, tables.as_tuple()))}


def count_step_labels(batch: Mapping[str, Any], *, all_processes: bool = False) -> list[int]:
    """Label tokens the loss scores in each microbatch of a host batch (leading axis k). With
    `all_processes`, every host passes its own part and gets the sums over all hosts."""
    labels, seg = np.asarray(batch["labels"]), batch.get("segment_ids")
    counts = np.array([count_label_tokens(labels[i], None if seg is None else np.asarray(seg[i]))
                       for i in range(labels.shape[0])], np.int64)
    if all_processes and jax.process_count() > 1:
        counts = np.asarray(multihost_utils.process_allgather(counts)).reshape(-1, counts.size).sum(axis=0)
    return [int(n) for n in counts]


def _reach(ids: np.ndarray, valid: np.ndarray) -> int:
    """The most positions one id covers in a 1-D array, first to last occurrence (valid entries only)."""
    where = np.nonzero(valid)[0]
    if where.size == 0:
        return 0
    order = np.argsort(ids[where], kind="stable")
    values, where = ids[where][order], where[order]
    starts = np.r_[0, np.nonzero(np.diff(values))[0] + 1]
    ends = np.r_[starts[1:], values.size] - 1
    return int((where[ends] - where[starts]).max()) + 1


def _bucket(reach: int, floor: int, whole: int) -> int | None:
    """`reach` rounded up to a power of two (at least `floor`: few distinct compiled steps), or
    None when that is no shorter than the whole axis."""
    span = max(floor, 1 << max(reach - 1, 0).bit_length())
    return None if span >= whole else span


def attention_spans(batch: Mapping[str, Any], *, all_processes: bool = False) -> tuple[int | None, int | None]:
    """(text, vision): the longest packed segment (positions, first to last real token) and the
    largest image frame (patch rows) of a host batch, rounded up to powers of two, or None where
    that covers a whole row or patch budget. The step's portable attention kernels then meet
    only the keys within that reach of each query block (`family.set_attention_spans`): the
    same result for every real token and patch, less work for rows packed with short examples.
    With `all_processes`, every host passes its own part and gets the spans of the global batch."""
    mask = np.asarray(batch["attention_mask"]) > 0
    seg = np.asarray(batch["segment_ids"]) if "segment_ids" in batch else np.zeros(mask.shape, np.int64)
    text = max(_reach(s, m) for s, m in zip(seg.reshape(-1, mask.shape[-1]), mask.reshape(-1, mask.shape[-1])))
    vision = 0
    if "vision_segment" in batch:
        real = np.asarray(batch["vision_interp_weight"]).sum(-1) > 0  # padding patches weigh 0 (`pad_patches`)
        vision = max(_reach(s, r) for s, r in zip(np.asarray(batch["vision_segment"]), real))
    if all_processes and jax.process_count() > 1:
        text, vision = (int(x) for x in np.asarray(
            multihost_utils.process_allgather(np.array([text, vision], np.int64))).reshape(-1, 2).max(axis=0))
    patches = np.shape(batch["vision_segment"])[-1] if "vision_segment" in batch else 0
    return _bucket(text, 128, mask.shape[-1]), _bucket(vision, 16, patches) if vision else None


def stack_microbatches(microbatches: list[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """k microbatch dicts (same keys and shapes) -> one batch with the leading microbatch axis."""
    keys = set(microbatches[0])
    for i, mb in enumerate(microbatches):
        if set(mb) != keys:
            raise ValueError(f"microbatch {i} has keys {sorted(mb)}, microbatch 0 has {sorted(keys)}")
    return {k: np.stack([np.asarray(mb[k]) for mb in microbatches]) for k in sorted(keys)}


def validate_batch(batch: Mapping[str, Any], cfg: TrainConfig) -> None:
    """Clear errors for malformed batches, before they reach the compiled step."""
    for key in REQUIRED_KEYS:
        if key not in batch:
            raise KeyError(f"batch is missing {key!r}")
    unknown = sorted(set(batch) - set(BATCH_AXES))
    if unknown:
        raise KeyError(f"batch has unknown keys {unknown}; known: {sorted(BATCH_AXES)}")
    k, b, t = np.shape(batch["input_ids"])
    if k != cfg.grad_accum_steps:
        raise ValueError(f"batch has {k} microbatches, grad_accum_steps is {cfg.grad_accum_steps}")
    for key in ("attention_mask", "labels", "segment_ids"):
        if key in batch and np.shape(batch[key]) != (k, b, t):
            raise ValueError(f"batch[{key!r}] has shape {np.shape(batch[key])}, expected {(k, b, t)}")
    if np.shape(batch["position_ids"]) != (k, 3, b, t):
        raise ValueError(f"batch['position_ids'] has shape {np.shape(batch['position_ids'])}, expected {(k, 3, b, t)}")
    has_vision = [key in batch for key in ("pixel_values",) + VISION_KEYS]
    if any(has_vision) and not all(has_vision):
        raise KeyError("batch must hold pixel_values and all of " + ", ".join(VISION_KEYS) + " together")
    if all(has_vision):
        patches = np.shape(batch["pixel_values"])[1]
        if patches % 4:
            raise ValueError(f"patch budget {patches} must be a multiple of 4 (2x2 merge windows)")
    seg = batch.get("segment_ids")
    if seg is not None and (np.min(seg) < 0 or np.max(seg) >= t):
        raise ValueError(f"segment_ids must lie in [0, {t}), got [{np.min(seg)}, {np.max(seg)}]")
    if cfg.loss.max_label_tokens is not None:
        for i, n in enumerate(count_step_labels(batch)):
            if n > cfg.loss.max_label_tokens:
                raise ValueError(f"microbatch {i}: {n} label tokens exceed loss.max_label_tokens="
                                 f"{cfg.loss.max_label_tokens}")
