"""`sr-jax plan`: size a training run from a laptop.

Builds the real SFT step (`sr_jax.train.step.TrainStep`) for a model preset, mesh and batch shape
with abstract inputs only (`jax.ShapeDtypeStruct`s carrying their shardings: no weights, no
optimizer state, no data are allocated), lowers and compiles it ahead of time on fake CPU
devices, and reports per device:

  params      trainable parameters held by one device (its shards)
  frozen      non-trainable parameters (base weights under LoRA, a frozen vision tower)
  optimizer   optax state (AdamW moments of the trainable parameters; clipping keeps none)
  batch       this device's slice of the input batch
  xla.*       XLA's `memory_analysis()` of the compiled per-device program:
              argument = every input buffer (params + frozen + optimizer + batch + step/rng),
              output   = every result buffer (the new state + metrics),
              alias    = outputs written in place of donated inputs (the state), counted once,
              temp     = activations, gradients and scratch live during the step,
              code     = generated code size
  total       argument + output - alias + temp + code: the peak a device must hold

and FLOPs per step from XLA's `cost_analysis()` (per-device program x devices) next to the
analytic count of `sr_jax.train.metrics.train_flops` (the one MFU uses).

With `--topology` (`v5p-64`, `v6e-16`, `v5p:4x4x2`, ...) and libtpu installed (`pip install -e
".[tpu]"`), the step is compiled for that TPU slice by the real TPU compiler on this CPU host
(`sr_jax.tpu`): the memory figures are then the TPU's own HBM plan per chip, checked against the
chip's HBM, and a roofline estimate of step time and MFU follows from the compiled FLOPs and
bytes and the generation's published peak FLOP/s and HBM bandwidth (`sr_jax.tpu.CHIPS`).
Without libtpu it falls back to fake CPU devices, and says so.

Caveats: on fake CPU devices XLA compiles for the CPU, so fusion and layout (and so temp memory)
differ from a TPU/GPU build; treat temp as an estimate. XLA's cost analysis counts a while
loop's body once, so with gradient accumulation (a scan over microbatches) or a chunked loss its
FLOPs are low. The roofline ignores communication and assumes compute and memory traffic overlap
perfectly: a lower bound on step time, an upper bound on MFU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sr_jax import tpu
from sr_jax.config import load_config
from sr_jax.lora import LoRAConfig
from sr_jax.models import get_family
from sr_jax.models.attention import resolve_backend
from sr_jax.rl.config import GRPOConfig
from sr_jax.rl.grpo import GRPOStep, rl_batch_shardings
from sr_jax.sharding import BATCH_AXES, MeshConfig, logical_sharding, tree_shardings, use_mesh
from sr_jax.sharding import MESH_AXES as MESH_KEYS  # importing JAX starts no backend: XLA_FLAGS still apply
from sr_jax.tpu import parse_topology
from sr_jax.train.checkpoint import abstract_with_shardings
from sr_jax.train.config import LossConfig, TrainConfig
from sr_jax.train.loss import IGNORE
from sr_jax.train.metrics import train_flops
from sr_jax.train.sft import ModelSection, SFTConfig, Trainer, model_config
from sr_jax.train.step import stack_microbatches, vision_arrays

IMAGE = get_family().image  # patch geometry of the planned model family
_CHILD_ENV = "SR_JAX_PLAN_CHILD"  # set in the re-executed process, so it never re-executes again


@dataclasses.dataclass
class BatchShape:
    """One optimizer step's input: `rows` is the global batch (all microbatches together)."""

    rows: int
    seq: int
    grad_accum: int = 1
    images_per_example: int = 0
    image_size: int = 512               # square images, side a multiple of 32 (one token per 32x32)
    label_tokens: int | None = None     # labelled tokens per row; None = the whole row

    def validate(self, batch_devices: int, vision_cfg) -> "BatchShape":
        if self.rows <= 0 or self.seq <= 0 or self.grad_accum <= 0:
            raise ValueError(f"batch, seq and grad_accum must be positive, got {self.rows}, {self.seq}, "
                             f"{self.grad_accum}")
        if self.rows % self.grad_accum:
            raise ValueError(f"batch {self.rows} is not divisible by grad_accum {self.grad_accum}")
        if self.micro_rows % batch_devices:
            raise ValueError(f"microbatch of {self.micro_rows} rows does not split over data x fsdp = "
                             f"{batch_devices} devices (each device needs a whole number of rows)")
        unit = vision_cfg.patch_size * vision_cfg.spatial_merge_size
        if self.images_per_example and self.image_size % unit:
            raise ValueError(f"image_size {self.image_size} must be a multiple of {unit} (patch x merge size)")
        used = self.image_tokens_per_row + (self.label_tokens or 0)
        if used > self.seq:
            raise ValueError(f"a row of {self.seq} tokens cannot hold {self.image_tokens_per_row} image tokens "
                             f"and {self.label_tokens or 0} label tokens")
        return self

    @property
    def micro_rows(self) -> int:
        return self.rows // self.grad_accum

    @property
    def grid(self) -> tuple[int, int, int]:
        side = self.image_size // IMAGE.patch_size
        return (1, side, side)

    @property
    def patches_per_image(self) -> int:
        return math.prod(self.grid)

    @property
    def image_tokens_per_row(self) -> int:
        # <|vision_start|> + one token per 2x2 patches + <|vision_end|>, per image
        return self.images_per_example * (self.patches_per_image // IMAGE.merge_unit + 2)

    @property
    def max_label_tokens(self) -> int | None:
        return None if self.label_tokens is None else self.micro_rows * self.label_tokens


def _batch_dtypes(shape: BatchShape) -> dict[str, tuple[tuple[int, ...], str]]:
    k, b, t = shape.grad_accum, shape.micro_rows, shape.seq
    out = {
        "input_ids": ((k, b, t), "int32"),
        "attention_mask": ((k, b, t), "int32"),
        "labels": ((k, b, t), "int32"),
        "position_ids": ((k, 3, b, t), "int32"),
    }
    if shape.images_per_example:
        p = b * shape.images_per_example * shape.patches_per_image
        out.update({
            "pixel_values": ((k, p, IMAGE.patch_dim), "float32"),
            "vision_interp_index": ((k, p, 4), "int32"),
            "vision_interp_weight": ((k, p, 4), "float32"),
            "vision_rope_hw": ((k, p, 2), "int32"),
            "vision_segment": ((k, p), "int32"),
        })
    return out


def abstract_batch(shape: BatchShape, mesh, rules=None) -> dict[str, Any]:
    """ShapeDtypeStructs of the step's batch (layout of `sr_jax.train.step`), with shardings."""
    return {key: jax.ShapeDtypeStruct(dims, np.dtype(dtype),
                                      sharding=logical_sharding(BATCH_AXES[key], dims, mesh, rules))
            for key, (dims, dtype) in _batch_dtypes(shape).items()}


def synthetic_batch(model_cfg, shape: BatchShape, seed: int = 0) -> dict[str, np.ndarray]:
    """Random host arrays with exactly `abstract_batch`'s shapes: every row full of real tokens,
    its images at the start (with M-RoPE positions as the model derives them), labels on the last
    `label_tokens` positions."""
    get_rope_index = get_family(model_cfg.model_type).module("rope_index").get_rope_index

    rng = np.random.default_rng(seed)
    b, t = shape.micro_rows, shape.seq
    vocab = min(model_cfg.text.vocab_size, model_cfg.image_token_id, model_cfg.vision_start_token_id,
                model_cfg.vision_end_token_id, model_cfg.video_token_id)
    n_tok = shape.patches_per_image // IMAGE.merge_unit
    image_span = [model_cfg.vision_start_token_id] + [model_cfg.image_token_id] * n_tok + [model_cfg.vision_end_token_id]
    microbatches = []
    for _ in range(shape.grad_accum):
        ids = rng.integers(0, vocab, (b, t), dtype=np.int64).astype(np.int32)
        for r in range(b):
            span = image_span * shape.images_per_example
            ids[r, 1:1 + len(span)] = span
        mask = np.ones((b, t), np.int32)
        labels = np.full((b, t), IGNORE, np.int32)
        n_label = t if shape.label_tokens is None else shape.label_tokens
        labels[:, t - n_label:] = ids[:, t - n_label:]
        grids = np.array([shape.grid] * (b * shape.images_per_example), np.int64).reshape(-1, 3)
        if shape.images_per_example:
            pos, _ = get_rope_index(ids, grids, mask, spatial_merge_size=model_cfg.vision.spatial_merge_size,
                                    image_token_id=model_cfg.image_token_id)
        else:
            pos = np.broadcast_to(np.arange(t, dtype=np.int32), (3, b, t))
        mb = dict(input_ids=ids, attention_mask=mask, labels=labels, position_ids=np.asarray(pos, np.int32))
        if shape.images_per_example:
            pixels = rng.uniform(-1, 1, (len(grids) * shape.patches_per_image, IMAGE.patch_dim)).astype(np.float32)
            mb.update(vision_arrays(pixels, grids, len(pixels), model_cfg.vision))
        microbatches.append(mb)
    return stack_microbatches(microbatches)


def analytic_flops(model_cfg, shape: BatchShape, *, vision_trainable: bool) -> float:
    grids = [shape.grid] * (shape.micro_rows * shape.images_per_example)
    labels = shape.micro_rows * (shape.seq if shape.label_tokens is None else shape.label_tokens)
    per_micro = train_flops(model_cfg, np.full(shape.micro_rows, shape.seq), labels, np.array(grids).reshape(-1, 3),
                            vision_trainable=vision_trainable)
    return shape.grad_accum * per_micro


# ---------------------------------------------------------------------------------------------
# the plan


@dataclasses.dataclass
class PlanSpec:
    model: str = "8b"                   # preset name or model YAML path
    mesh: dict = dataclasses.field(default_factory=lambda: {"fsdp": 1})
    rules: dict = dataclasses.field(default_factory=dict)  # changes to the logical-axis rules (MeshConfig.rules)
    batch: BatchShape = dataclasses.field(default_factory=lambda: BatchShape(rows=1, seq=1024))
    lora: bool = False
    lora_rank: int = 32
    remat: str = "none"
    dtype: str = "bfloat16"             # compute dtype
    param_dtype: str = "float32"        # stored parameters (and so optimizer moments)
    freeze_vision: bool = False
    model_overrides: list = dataclasses.field(default_factory=list)
    topology: str | None = None         # TPU slice to compile for (sr_jax.tpu.parse_topology); None: CPU
    stage: str = "sft"                  # sft: the SFT step; rl: the GRPO update; generate: prefill + decode step
    completion_tokens: int = 256        # rl / generate: the last tokens of each row are the completion
    train: Any = None                   # a TrainConfig (from a training YAML) to start from: LoRA targets, loss...
    attention_backend: str | None = None  # None: the model's (auto: splash on TPU)
    scan_layers: bool | None = None     # None: the model's (ModelConfig.scan_layers)

    def mesh_size(self) -> int:
        self.mesh_config()  # validates
        return math.prod(self._sizes())

    def _sizes(self) -> list[int]:
        return [int(self.mesh.get(k, 1)) for k in MESH_KEYS]

    def mesh_config(self):
        unknown = sorted(set(self.mesh) - set(MESH_KEYS))
        if unknown:
            raise ValueError(f"unknown mesh axes {unknown}; use {list(MESH_KEYS)}")
        sizes = self._sizes()
        if any(s < 1 for s in sizes):
            raise ValueError(f"mesh axis sizes must be >= 1, got {self.mesh}")
        return MeshConfig(*sizes, rules=dict(self.rules))

    def batch_devices(self) -> int:
        """Devices the batch rows split over: the mesh axes of the `batch` rule."""
        sizes = dict(zip(MESH_KEYS, self._sizes()))
        return math.prod(sizes[a] for a in self.mesh_config().axis_rules()["batch"])


def parse_mesh(text: str) -> dict[str, int]:
    """'fsdp=64' or 'data=2,fsdp=32,tensor=1' -> {'fsdp': 64}; unnamed axes are 1."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or key not in MESH_KEYS:
            raise ValueError(f"bad mesh entry {part!r}: expected AXIS=N with AXIS in {list(MESH_KEYS)}")
        try:
            out[key] = int(value)
        except ValueError:
            raise ValueError(f"bad mesh entry {part!r}: {value!r} is not an integer") from None
    if not out:
        raise ValueError(f"empty mesh {text!r}")
    return out


def sft_config(spec: PlanSpec):
    """The `SFTConfig` a real training run of this plan would use (model + train sections)."""
    if spec.train is None:
        train = TrainConfig(mesh=spec.mesh_config(), loss=LossConfig(max_label_tokens=spec.batch.max_label_tokens),
                            lora=LoRAConfig(enabled=spec.lora, rank=spec.lora_rank),
                            grad_accum_steps=spec.batch.grad_accum, remat=spec.remat, freeze_vision=spec.freeze_vision)
    else:  # the training config's own, with the plan's mesh and batch
        t = spec.train
        train = dataclasses.replace(
            t, mesh=spec.mesh_config(), grad_accum_steps=spec.batch.grad_accum, remat=spec.remat,
            freeze_vision=spec.freeze_vision, loss=dataclasses.replace(t.loss, max_label_tokens=spec.batch.max_label_tokens),
            lora=dataclasses.replace(t.lora, enabled=spec.lora, rank=spec.lora_rank))
    if os.path.isdir(spec.model):  # an HF or converted checkpoint: its architecture (weights are not read)
        model = ModelSection(init_from=spec.model, dtype=spec.dtype, param_dtype=spec.param_dtype,
                             attention_backend=spec.attention_backend, scan_layers=spec.scan_layers)
    else:
        model = ModelSection(preset=spec.model, dtype=spec.dtype, param_dtype=spec.param_dtype,
                             overrides=list(spec.model_overrides), attention_backend=spec.attention_backend,
                             scan_layers=spec.scan_layers)
    return SFTConfig(model=model, train=train)


def shard_bytes(tree) -> int:
    """Bytes one device holds of `tree` (abstract or real arrays with shardings): the largest
    per-device total, as uneven shardings may load one device more."""
    per_device: dict[Any, int] = {}
    for leaf in jax.tree.leaves(tree):
        sharding = leaf.sharding
        # `.itemsize` of the dtype itself: typed PRNG keys (LoRA dropout's rng state) are not numpy dtypes
        nbytes = math.prod(sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
        for device in sharding.device_set:
            per_device[device] = per_device.get(device, 0) + nbytes
    return max(per_device.values(), default=0)


def plan_devices(n: int):
    devices = jax.devices("cpu")
    if len(devices) < n:
        raise RuntimeError(f"the mesh needs {n} devices but this process has {len(devices)} CPU devices; run "
                           f"with XLA_FLAGS=--xla_force_host_platform_device_count={n} set before JAX starts "
                           f"(the `sr-jax plan` command does this itself)")
    return devices[:n]


def target_devices(spec: PlanSpec):
    """The devices the plan compiles for: the TPU topology's when one is given and libtpu is
    installed, else fake CPU devices."""
    if spec.topology and tpu.libtpu_available():
        devices = tpu.topology_devices(tpu.parse_topology(spec.topology))
        if len(devices) != spec.mesh_size():
            raise ValueError(f"mesh {spec.mesh} has {spec.mesh_size()} devices but topology {spec.topology} has "
                             f"{len(devices)}")
        return devices
    return plan_devices(spec.mesh_size())


def build_plan(spec: PlanSpec, *, devices=None, compiler_options: dict | None = None):
    """(trainer, abstract state, abstract batch) for the spec: nothing is allocated."""
    cfg = sft_config(spec)
    mcfg = model_config(cfg.model)
    n = spec.mesh_size()
    spec.batch.validate(spec.batch_devices(), mcfg.vision)
    devices = target_devices(spec) if devices is None else list(devices)[:n]
    if len(devices) < n:
        raise RuntimeError(f"the mesh {spec.mesh} needs {n} devices, {len(devices)} given")
    trainer = Trainer(cfg, devices=devices, abstract=True, total_steps=1000)
    if compiler_options:
        trainer.step.compiler_options = compiler_options
    return trainer, trainer.abstract_state(), abstract_batch(spec.batch, trainer.mesh, trainer.step.rules)


def memory_fields(stats) -> dict[str, int]:
    """XLA's per-device memory analysis as plain ints, plus the peak (see module doc)."""
    fields = {
        "argument": int(stats.argument_size_in_bytes),
        "output": int(stats.output_size_in_bytes),
        "alias": int(stats.alias_size_in_bytes),
        "temp": int(stats.temp_size_in_bytes),
        "code": int(stats.generated_code_size_in_bytes),
    }
    fields["total"] = fields["argument"] + fields["output"] - fields["alias"] + fields["temp"] + fields["code"]
    return fields


def _costs(compiled) -> dict:
    costs = compiled.cost_analysis()
    if isinstance(costs, (list, tuple)):  # older JAX: one dict per program
        costs = costs[0] if costs else None
    return costs or {}


def cost_flops(compiled) -> float | None:
    costs = _costs(compiled)
    return float(costs["flops"]) if "flops" in costs else None


def cost_bytes(compiled) -> float | None:
    costs = _costs(compiled)
    return float(costs["bytes accessed"]) if "bytes accessed" in costs else None


def roofline(report: dict, chip) -> dict:
    """Step time and MFU estimated from the compiled program and the chip's published peaks: the
    step takes at least its FLOPs at peak FLOP/s and its HBM traffic at peak bandwidth (whichever
    is longer), with no communication cost. Per device = per chip, scaled where the topology
    exposes several devices per chip. XLA's cost analysis counts a loop body once (the scan over
    microbatches, scanned layers): with loops, FLOPs are the larger of XLA's and the analytic count
    plus the forward pass that full remat recomputes, and the bytes (x microbatches) are a lower
    bound."""
    f = report["flops_per_step"]
    n, chips = report["devices"], report["target"]["chips"]
    per_chip = n / chips  # devices per chip
    k = report["batch"]["grad_accum"]
    loops = k > 1 or bool(report.get("scan_layers"))
    executed = f["analytic"] * (4.0 / 3.0 if report.get("remat") == "full" and report.get("stage", "sft") != "generate"
                                else 1.0)
    flops = max((f["xla_per_device"] or 0.0) * per_chip, executed / chips)
    bytes_ = (report["bytes_per_step"]["xla_per_device"] or 0.0) * per_chip * k
    compute_s, memory_s = flops / chip.peak_bf16_flops, bytes_ / chip.hbm_bandwidth
    step_s = max(compute_s, memory_s)
    return {
        "peak_flops_per_chip": chip.peak_bf16_flops, "hbm_bandwidth_per_chip": chip.hbm_bandwidth,
        "compute_seconds": compute_s, "memory_seconds": memory_s, "step_seconds": step_s,
        "bound": "compute" if compute_s >= memory_s else "HBM bandwidth",
        "mfu": f["analytic"] / (chips * chip.peak_bf16_flops * step_s) if step_s else None,
        "tokens_per_second_per_chip": report["tokens_per_step"] / step_s / chips if step_s else None,
        "loops": loops,
    }


def fits(report: dict) -> tuple[bool, str | None]:
    """(fits, one-line verdict) against the target chip's HBM; (True, None) without a chip."""
    hbm = report["target"].get("hbm_bytes_per_device")
    if not hbm:
        return True, None
    need = report["memory_per_device"]["xla"]["total"]
    per = "chip" if report["target"]["devices_per_chip"] == 1 else "device"
    line = f"needs {_short_gib(need)} of {hbm / 2**30:.3g} GiB HBM per {per}"  # v6e: 32 GB = 29.8 GiB
    return need <= hbm, line


def _short_gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**30:.3f} GiB"


def remedies(spec: PlanSpec) -> list[str]:
    """Options that lower the per-device memory of this spec."""
    out = []
    sizes = dict(zip(MESH_KEYS, spec._sizes()))
    if sizes["data"] > 1 or sizes["tensor"] > 1:
        out.append("more fsdp: --mesh fsdp=N (shards parameters, gradients and optimizer state over every device)")
    if spec.remat != "full":
        out.append("--remat full (keeps only each layer's input for the backward pass)")
    rows = spec.batch.micro_rows // spec.batch_devices()
    if rows > 1:
        out.append(f"a smaller microbatch: --grad-accum {spec.batch.grad_accum * 2} ({rows} rows per device now)")
    else:
        out.append("shorter rows (--seq) or fewer/smaller images per row")
    if not spec.lora:
        out.append("--lora (adapters only: no optimizer state or gradients for the base weights)")
    if spec.param_dtype == "float32":
        out.append("--param-dtype bfloat16 (halves parameters and optimizer moments)")
    out.append("a larger slice (--topology) or one with more HBM per chip")
    return out


class DoesNotFit(Exception):
    """The state alone exceeds the target's HBM: nothing is compiled (a one-line verdict)."""


STAGES = ("sft", "rl", "generate")


def abstract_rl_batch(shape: BatchShape, mesh, completion_tokens: int, *, ref_logp: bool,
                      rules=None) -> dict[str, Any]:
    """The GRPO update's batch (`sr_jax.rl.grpo` layout): rows of `shape.seq` tokens, the last
    `completion_tokens` of them the completion."""
    k, b, n = shape.grad_accum, shape.micro_rows, completion_tokens
    dims = {key: value for key, value in _batch_dtypes(shape).items() if key != "labels"}
    dims.update({"completion_ids": ((k, b, n), "int32"), "completion_mask": ((k, b, n), "int32"),
                 "advantages": ((k, b), "float32")})
    if ref_logp:
        dims["ref_logp"] = ((k, b, n), "float32")
    plain = {key: jax.ShapeDtypeStruct(d, np.dtype(t)) for key, (d, t) in dims.items()}
    shardings = rl_batch_shardings(plain, mesh, rules)
    return {key: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[key]) for key, v in plain.items()}


def _rl_program(trainer, spec: PlanSpec, state):
    grpo = GRPOConfig()
    n = spec.completion_tokens
    if n >= spec.batch.seq - spec.batch.image_tokens_per_row:
        raise ValueError(f"--completion-tokens {n} leaves no room for the prompt in rows of {spec.batch.seq} tokens")
    step = GRPOStep(trainer.model, trainer.optimizer, trainer.mesh, trainer.cfg.train, grpo)
    batch = abstract_rl_batch(spec.batch, trainer.mesh, n, ref_logp=grpo.beta > 0, rules=step.rules)
    cfg = trainer.cfg.train
    vision_trainable = not (cfg.freeze_vision or (cfg.lora.enabled and not cfg.lora.vision))

    grids = [spec.batch.grid] * (spec.batch.micro_rows * spec.batch.images_per_example)
    flops = spec.batch.grad_accum * train_flops(trainer.model_cfg, np.full(spec.batch.micro_rows, spec.batch.seq),
                                                spec.batch.micro_rows * n, np.array(grids).reshape(-1, 3),
                                                vision_trainable=vision_trainable)
    return step.lower(state, batch), batch, flops


def _generate_programs(trainer, spec: PlanSpec):
    """A prefill of prompts of `seq - completion_tokens` tokens into a KV cache of `seq` slots,
    and one decode step against that cache (as `sr_jax.generation` runs them)."""
    mesh, mcfg, rules = trainer.mesh, trainer.model_cfg, trainer.step.rules
    tcfg = mcfg.text
    graphdef, params = nnx.split(trainer.model)
    params = abstract_with_shardings(params, tree_shardings(params, mesh, rules))
    b, total = spec.batch.micro_rows, spec.batch.seq
    width = total - spec.completion_tokens
    if width <= spec.batch.image_tokens_per_row:
        raise ValueError(f"--completion-tokens {spec.completion_tokens} leaves no room for the prompt")
    prompt = BatchShape(rows=b, seq=width, images_per_example=spec.batch.images_per_example,
                        image_size=spec.batch.image_size)
    inputs = {k: jax.ShapeDtypeStruct(v.shape[1:], v.dtype, sharding=_drop_lead(v.sharding))
              for k, v in abstract_batch(prompt, mesh, rules).items() if k != "labels"}
    dtype = jnp.dtype(spec.dtype)
    cache_sharding = logical_sharding(("batch", None, "kv_heads", "head_dim"),
                                      (b, total, tcfg.num_key_value_heads, tcfg.head_dim), mesh, rules)
    cache_one = jax.ShapeDtypeStruct((b, total, tcfg.num_key_value_heads, tcfg.head_dim), dtype, sharding=cache_sharding)
    cache = [(cache_one, cache_one) for _ in range(tcfg.num_hidden_layers)]
    row = lambda *axes: logical_sharding(("batch",) + axes, (b,) + (total,) * len(axes), mesh, rules)

    def prefill(params, inp):
        model = nnx.merge(graphdef, params)
        vision = tuple(inp[k] for k in ("vision_interp_index", "vision_interp_weight", "vision_rope_hw",
                                         "vision_segment")) if "pixel_values" in inp else None
        zeros = [(jnp.zeros(cache_one.shape, dtype),) * 2 for _ in range(tcfg.num_hidden_layers)]
        key_valid = jnp.concatenate([inp["attention_mask"].astype(bool), jnp.zeros((b, total - width), bool)], 1)
        causal = jnp.arange(total)[None, :] <= jnp.arange(width)[:, None]
        out = model.features(inp["input_ids"], inp["attention_mask"], inp.get("pixel_values"),
                             position_ids=inp["position_ids"], vision=vision, mask=causal[None] & key_valid[:, None],
                             kv_cache=zeros, cache_index=0)
        return model.logits(out.hidden[:, -1]).astype(jnp.float32), out.kv_cache

    def decode(params, cache, tok, key_valid, slot):
        model = nnx.merge(graphdef, params)
        pos = jnp.broadcast_to(slot[None, None, None], (3, b, 1))
        out = model.features(tok[:, None], jnp.ones((b, 1), jnp.int32), position_ids=pos,
                             mask=key_valid[:, None, :], kv_cache=cache, cache_index=slot)
        return model.logits(out.hidden[:, 0]).astype(jnp.float32), out.kv_cache

    tok = jax.ShapeDtypeStruct((b,), np.dtype("int32"), sharding=row())
    key_valid = jax.ShapeDtypeStruct((b, total), np.dtype("bool"), sharding=row(None))
    slot = jax.ShapeDtypeStruct((), np.dtype("int32"), sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    with use_mesh(mesh, rules):
        lowered_prefill = jax.jit(prefill).lower(params, inputs)
        lowered_decode = jax.jit(decode, donate_argnums=(1,)).lower(params, cache, tok, key_valid, slot)
    grids = np.array([prompt.grid] * (b * prompt.images_per_example)).reshape(-1, 3)
    prefill_flops = train_flops(mcfg, np.full(b, width), b, grids) / 3.0
    d, hd, layers = tcfg.hidden_size, tcfg.head_dim, tcfg.num_hidden_layers
    decode_flops = train_flops(mcfg, np.ones(b), b, np.zeros((0, 3))) / 3.0 \
        + 4.0 * b * total * tcfg.num_attention_heads * hd * layers
    return params, inputs, cache, [("prefill", lowered_prefill, prefill_flops), ("decode", lowered_decode, decode_flops)]


def _drop_lead(sharding):
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*sharding.spec[1:]))


def _program_report(compiled, analytic: float, n: int, seconds: dict) -> dict:
    xla_flops = cost_flops(compiled)
    return {
        "xla": memory_fields(compiled.memory_analysis()),
        "flops": {"analytic": analytic, "xla": None if xla_flops is None else xla_flops * n,
                  "xla_per_device": xla_flops},
        "bytes": {"xla_per_device": cost_bytes(compiled)},
        "seconds": seconds,
    }


def _compile(lowered) -> tuple[Any, float]:
    t0 = time.perf_counter()
    compiled = lowered.compile()
    return compiled, time.perf_counter() - t0


def run_plan(spec: PlanSpec, *, devices=None, compiler_options: dict | None = None) -> dict:
    """Compiles the stage's program(s) ahead of time and returns the report (see module doc); all
    byte counts are per device. Raises `DoesNotFit` before compiling when the parameters,
    optimizer state and batch alone exceed a TPU target's HBM."""
    if spec.stage not in STAGES:
        raise ValueError(f"unknown stage {spec.stage!r}; use one of {list(STAGES)}")
    t0 = time.perf_counter()
    trainer, state, batch = build_plan(spec, devices=devices, compiler_options=compiler_options)
    n = trainer.mesh.size
    target = target_info(spec, trainer.mesh)
    cfg = trainer.cfg.train
    vision_trainable = not (cfg.freeze_vision or (cfg.lora.enabled and not cfg.lora.vision))
    decode = None
    if spec.stage == "generate":
        params, batch, cache, programs = _generate_programs(trainer, spec)
        memory = {"params": shard_bytes(params), "frozen": 0, "optimizer": 0, "batch": shard_bytes(batch),
                  "kv_cache": shard_bytes(cache)}
        num_params = num_trainable = sum(math.prod(x.shape) for x in jax.tree.leaves(params)
                                         if jnp.issubdtype(x.dtype, jnp.floating))  # not rng keys/counts
        t_build = time.perf_counter() - t0
        (_, lowered, analytic), (_, lowered_decode, decode_flops) = programs
        t_lower = 0.0
    else:
        memory = {"params": shard_bytes(state.params), "frozen": shard_bytes(state.frozen),
                  "optimizer": shard_bytes(state.opt_state)}
        num_params = sum(math.prod(x.shape) for x in jax.tree.leaves((state.params, state.frozen)))
        num_trainable = sum(math.prod(x.shape) for x in jax.tree.leaves(state.params))
        t_build = time.perf_counter() - t0
        t0 = time.perf_counter()
        if spec.stage == "rl":
            lowered, batch, analytic = _rl_program(trainer, spec, state)
        else:
            lowered = trainer.step.lower(state, batch)
            analytic = analytic_flops(trainer.model_cfg, spec.batch, vision_trainable=vision_trainable)
        t_lower = time.perf_counter() - t0
        memory["batch"] = shard_bytes(batch)
    hbm, per = target["hbm_bytes_per_device"], "chip" if target["devices_per_chip"] == 1 else "device"
    resident = sum(v for v in memory.values() if isinstance(v, int))
    if hbm and resident > hbm:
        raise DoesNotFit(f"needs {resident / 2**30:.1f} GiB of {hbm / 2**30:.3g} GiB HBM per {per} for the "
                         f"parameters, optimizer state and batch alone, before any activation")
    compiled, t_compile = _compile(lowered)
    main = _program_report(compiled, analytic, n, {"build": t_build, "lower": t_lower, "compile": t_compile})
    if spec.stage == "generate":
        compiled_decode, t_decode = _compile(lowered_decode)
        decode = _program_report(compiled_decode, decode_flops, n, {"compile": t_decode})
    memory["xla"] = main["xla"]

    report = {
        "model": spec.model,
        "stage": spec.stage,
        "target": target,
        "attention_backend": resolve_attention(trainer),
        "mesh": dict(zip(MESH_KEYS, spec._sizes())),
        "devices": n,
        "batch": dataclasses.asdict(spec.batch),
        "rules": {k: list(trainer.step.rules[k]) for k in spec.rules},  # changes to the default table
        "rows_per_device": spec.batch.micro_rows // spec.batch_devices(),
        "lora": spec.lora, "remat": spec.remat, "dtype": spec.dtype, "param_dtype": spec.param_dtype,
        "scan_layers": bool(trainer.model_cfg.scan_layers),
        "num_params": num_params,
        "num_trainable": num_trainable,
        "tokens_per_step": spec.batch.rows * (spec.batch.seq - spec.completion_tokens
                                              if spec.stage == "generate" else spec.batch.seq),
        "memory_per_device": memory,
        "flops_per_step": main["flops"],
        "bytes_per_step": main["bytes"],
        "seconds": main["seconds"],
        "_compiled": compiled,
    }
    if decode is not None:
        report["decode"] = decode
        report["decode"]["tokens"] = spec.batch.rows
    if target["platform"] == "tpu":
        chip = parse_topology(spec.topology).chip
        report["roofline"] = roofline(report, chip)
        if decode is not None:
            report["decode"]["roofline"] = roofline(
                dict(report, flops_per_step=decode["flops"], bytes_per_step=decode["bytes"],
                     tokens_per_step=spec.batch.rows, batch=dict(report["batch"], grad_accum=1)), chip)
    report["fits"], report["fit_line"] = fits(report)
    if decode is not None and report["fits"]:
        report["fits"], line = fits(dict(report, memory_per_device={"xla": decode["xla"]}))
        report["fit_line"] += f" (prefill); {line.split(' of ')[0].replace('needs ', '')} (decode step)"
    return report


def target_info(spec: PlanSpec, mesh) -> dict:
    """What the plan compiled for: platform, device kind, and the chip's HBM when known."""
    device = mesh.devices.flat[0]
    info = {"platform": device.platform, "device_kind": device.device_kind, "devices": mesh.size,
            "topology": None, "chips": mesh.size, "devices_per_chip": 1, "hbm_bytes_per_device": None}
    if spec.topology:
        topo = parse_topology(spec.topology)
        per_chip = mesh.size / topo.chips
        info.update(topology=topo.name, chips=topo.chips, devices_per_chip=per_chip,
                    hbm_bytes_per_device=int(topo.chip.hbm_bytes / per_chip))
    return info


def resolve_attention(trainer) -> str:
    """The attention kernel the compiled program uses (the step resolves it under its mesh too)."""
    with jax.set_mesh(trainer.mesh):
        return resolve_backend(trainer.model_cfg.attention_backend)


# ---------------------------------------------------------------------------------------------
# output


def _gib(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:10.3f} {unit}"
    return f"{n:10.0f} B  "


STAGE_TITLES = {"sft": "SFT step", "rl": "GRPO update", "generate": "generation (prefill + one decode step)"}


def _roofline_lines(e: dict, title: str, mfu: bool = True) -> list[str]:
    lines = [
        f"{title} (compiled FLOPs and bytes at the chip's published peaks; no communication, perfect overlap):",
        f"  peak per chip            {e['peak_flops_per_chip'] / 1e12:.0f} TFLOP/s bf16, "
        f"{e['hbm_bandwidth_per_chip'] / 1e9:.0f} GB/s HBM",
        f"  time                     {e['step_seconds'] * 1e3:.2f} ms ({e['bound']}-bound; compute "
        f"{e['compute_seconds'] * 1e3:.2f} ms, HBM {e['memory_seconds'] * 1e3:.2f} ms)",
    ]
    if e.get("loops"):
        lines.append("  (loops: XLA counts a loop body once, so compute uses the analytic FLOPs (+ remat's "
                     "recomputed forward) and the HBM time is a lower bound)")
    if mfu:
        lines.append(f"  MFU                      {100 * e['mfu']:.1f}%   (analytic FLOPs / (chips x peak x time))")
    lines.append(f"  tokens/s per chip        {e['tokens_per_second_per_chip']:.0f}")
    return lines


def format_report(r: dict) -> str:
    m, x, f = r["memory_per_device"], r["memory_per_device"]["xla"], r["flops_per_step"]
    b = r["batch"]
    images = f", {b['images_per_example']} image(s) {b['image_size']}px per row" if b["images_per_example"] else ""
    t = r["target"]
    if t["platform"] == "tpu":
        target = (f"compiled for: TPU topology {t['topology']} ({t['chips']} chips, {t['devices']} devices of kind "
                  f"{t['device_kind']!r}) by the TPU compiler; attention {r['attention_backend']}")
    else:
        target = (f"compiled for: {t['devices']} fake {t['platform'].upper()} devices: these are XLA:"
                  f"{t['platform'].upper()}'s figures (fusion, layout and temp memory differ on a TPU); "
                  f"attention {r['attention_backend']}")
    lines = [
        target,
        f"plan: {STAGE_TITLES[r.get('stage', 'sft')]}, model {r['model']}, mesh {r['mesh']} ({r['devices']} devices), "
        f"global batch {b['rows']} x "
        f"{b['seq']} tokens{images}, grad_accum {b['grad_accum']}, {r['rows_per_device']} row(s) per device "
        f"per microbatch",
        f"      {'LoRA' if r['lora'] else 'full'} fine-tuning, remat {r['remat']}, "
        f"{'scanned' if r.get('scan_layers') else 'unrolled'} layers, compute {r['dtype']}, "
        f"params {r['param_dtype']}; {r['num_params'] / 1e9:.3f} B parameters, "
        f"{r['num_trainable'] / 1e9:.4f} B trainable",
        "memory per device:",
        f"  parameters (trainable)   {_gib(m['params'])}",
        f"  parameters (frozen)      {_gib(m['frozen'])}",
        f"  optimizer state          {_gib(m['optimizer'])}",
        f"  batch slice              {_gib(m['batch'])}",
        f"  XLA arguments            {_gib(x['argument'])}   (all inputs above + step/rng)",
        f"  XLA outputs              {_gib(x['output'])}   (new state + metrics)",
        f"  XLA aliased (donated)    {_gib(x['alias'])}   (outputs reusing input buffers)",
        f"  activations/temporaries  {_gib(x['temp'])}   (XLA temp: activations, grads, scratch)",
        f"  generated code           {_gib(x['code'])}",
        f"  total (peak estimate)    {_gib(x['total'])}   (arguments + outputs - aliased + temp + code)",
        "FLOPs per step:",
        f"  analytic (train_flops)   {f['analytic']:.4e}",
        "  XLA cost analysis        " + ("n/a" if f["xla"] is None else
                                         f"{f['xla']:.4e}   ({f['xla_per_device']:.4e} per device)"),
        f"compile: {r['seconds']['compile']:.1f} s (lower {r['seconds']['lower']:.1f} s, build "
        f"{r['seconds']['build']:.1f} s)",
    ]
    if r.get("rules"):
        lines.insert(lines.index("memory per device:"), "      sharding rules changed from the default: " + ", ".join(
            f"{name} -> [{', '.join(axes)}]" for name, axes in r["rules"].items()))
    if t["hbm_bytes_per_device"]:
        lines.insert(lines.index("FLOPs per step:"),
                     f"  HBM per device           {_gib(t['hbm_bytes_per_device'])}   (published; "
                     f"{100 * x['total'] / t['hbm_bytes_per_device']:.0f}% used)")
    if r["bytes_per_step"]["xla_per_device"] is not None:
        lines.insert(lines.index("FLOPs per step:") + 3,
                     f"  HBM bytes accessed       {r['bytes_per_step']['xla_per_device']:.4e} per device (XLA cost "
                     f"analysis)")
    if "kv_cache" in m:
        lines.insert(lines.index("memory per device:") + 5, f"  KV cache                 {_gib(m['kv_cache'])}")
    if "roofline" in r:
        title = "prefill roofline ESTIMATE" if "decode" in r else "roofline ESTIMATE"
        lines += _roofline_lines(r["roofline"], title)
    if "decode" in r:
        d = r["decode"]
        lines += [
            "decode step (one token per row against the full KV cache):",
            f"  XLA temp / total         {_gib(d['xla']['temp'])} / {_gib(d['xla']['total'])}",
            f"  FLOPs                    analytic {d['flops']['analytic']:.4e}, XLA "
            + ("n/a" if d["flops"]["xla"] is None else f"{d['flops']['xla']:.4e}"),
            f"  compile                  {d['seconds']['compile']:.1f} s",
        ]
        if "roofline" in d:
            lines += _roofline_lines(d["roofline"], "decode roofline ESTIMATE", mfu=False)
    if r["fit_line"]:
        lines.append(("fits: " if r["fits"] else "DOES NOT FIT: ") + r["fit_line"])
    return "\n".join(lines)


def public(report: dict) -> dict:
    return {k: v for k, v in report.items() if not k.startswith("_")}


# ---------------------------------------------------------------------------------------------
# CLI


DEFAULTS = {"seq": 1024, "grad_accum": 1, "images_per_example": 0, "image_size": 512, "lora_rank": 32,
            "remat": "none", "dtype": "bfloat16", "param_dtype": "float32"}


def register(sub) -> None:
    p = sub.add_parser("plan", help="memory and FLOPs of a training step, compiled ahead of time for a TPU "
                                    "topology (with libtpu) or on fake CPU devices")
    p.add_argument("--config", default=None,
                   help="a training YAML (configs/sft/*.yaml): model, mesh, LoRA, remat, dtypes, batch, rows and "
                        "images come from it; flags given explicitly win")
    p.add_argument("config_overrides", nargs="*", metavar="KEY=VALUE", help="overrides of the --config file")
    p.add_argument("--model", default=None, help="preset (tiny, 2b, 4b, 8b, 32b), model YAML path or model "
                                                 "directory (default 8b)")
    p.add_argument("--topology", default=None,
                   help="TPU slice to compile for: v5p-64, v6e-16, v5e-8, v4-32 (Cloud TPU accelerator types) or "
                        "v5p:4x4x2, v6e:2x2 (chips per axis); needs libtpu (pip install -e '.[tpu]'), else "
                        "fake CPU devices")
    p.add_argument("--mesh", default=None, help="e.g. fsdp=64 or data=2,fsdp=16,tensor=2 (unnamed axes are 1); "
                                                "default: fsdp over every device")
    p.add_argument("--batch", type=int, default=None,
                   help="global batch (rows per optimizer step); default: one row per data x fsdp device")
    p.add_argument("--seq", type=int, default=None, help="tokens per row (default 1024)")
    p.add_argument("--grad-accum", type=int, default=None, help="microbatches per step (the batch is split)")
    p.add_argument("--images-per-example", type=int, default=None)
    p.add_argument("--image-size", type=int, default=None, help="square image side in pixels (multiple of 32)")
    p.add_argument("--label-tokens", type=int, default=None,
                   help="labelled (answer) tokens per row; sets loss.max_label_tokens (default: the whole row)")
    p.add_argument("--lora", action="store_true", help="LoRA on the decoder's linear layers")
    p.add_argument("--lora-rank", type=int, default=None)
    p.add_argument("--freeze-vision", action="store_true")
    p.add_argument("--remat", default=None, choices=["none", "full", "save_dots"])
    p.add_argument("--dtype", default=None, help="compute dtype (default bfloat16)")
    p.add_argument("--param-dtype", default=None, help="stored parameter dtype (default float32)")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE", help="model config override")
    p.add_argument("--attention-backend", default=None, choices=["auto", "cpu", "splash", "cudnn"],
                   help="attention kernel (default: the model's; auto = splash on TPU)")
    p.add_argument("--scan-layers", action="store_true", default=None,
                   help="run the layers as lax.scans (model.scan_layers): faster, leaner compiles")
    p.add_argument("--stage", default="sft", choices=list(STAGES),
                   help="sft: the SFT step; rl: the GRPO update; generate: a prefill and one decode step")
    p.add_argument("--completion-tokens", type=int, default=256,
                   help="rl/generate: completion tokens at the end of each --seq row (the rest is the prompt)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_plan_command)


def _target_device_count(topology: str | None) -> int | None:
    if not topology:
        return None

    topo = parse_topology(topology)
    return topo.chips * (2 if topo.chip.name == "v4" else 1)  # v4 topologies list each TensorCore


def _hosts(topology: str | None) -> int:
    """Processes (hosts) of the slice: from libtpu's description, else 4 chips per host."""
    if not topology:
        return 1
    if tpu.libtpu_available():
        return len({d.process_index for d in tpu.topology_devices(tpu.parse_topology(topology))})
    return max(1, tpu.parse_topology(topology).chips // 4)


def _from_config(args) -> tuple[dict, list[str]]:
    """PlanSpec fields from a training YAML, and notes on what was assumed."""
    cfg = load_config(SFTConfig, args.config, list(getattr(args, "config_overrides", None) or []))
    notes, fields = [], {}
    m = cfg.model
    if m.init_from and os.path.isdir(m.init_from):
        fields["model"] = m.init_from
    elif m.init_from:
        fields["model"] = args.model or "8b"
        notes.append(f"model.init_from {m.init_from} is not on this machine: planning the {fields['model']} "
                     f"preset's architecture (--model)")
    else:
        fields["model"] = m.preset
    fields.update(dtype=m.dtype, param_dtype=m.param_dtype, model_overrides=list(m.overrides),
                  attention_backend=m.attention_backend, scan_layers=m.scan_layers)
    t = cfg.train
    fields.update(train=t, lora=t.lora.enabled, lora_rank=t.lora.rank, remat=t.remat, freeze_vision=t.freeze_vision,
                  grad_accum=t.grad_accum_steps)
    n = _target_device_count(args.topology)
    if n is None:
        n = cfg.run.num_devices or math.prod(s for s in (t.mesh.data, t.mesh.fsdp, t.mesh.tensor) if s > 0)
    fields["mesh"] = dict(zip(MESH_KEYS, t.mesh.resolve(n)))
    fields["rules"] = dict(t.mesh.rules)
    hosts = _hosts(args.topology)
    d = cfg.data
    fields["rows"] = d.batch_size * hosts * t.grad_accum_steps
    fields["seq"] = max(d.seq_lens)
    side = max(IMAGE.factor, int(math.isqrt(d.max_pixels)) // IMAGE.factor * IMAGE.factor)
    budget = max(b.patch_budget for b in d.buckets())
    per_row = budget // d.batch_size
    fields["image_size"] = side
    fields["images_per_example"] = per_row // (side // IMAGE.patch_size) ** 2
    if t.loss.max_label_tokens:
        room = fields["seq"] - fields["images_per_example"] * ((side // IMAGE.patch_size) ** 2 // IMAGE.merge_unit + 2)
        fields["label_tokens"] = max(1, min(t.loss.max_label_tokens // (d.batch_size * hosts), room))
    notes.append(f"from {args.config}: {hosts} host(s) x data.batch_size {d.batch_size} x grad_accum "
                 f"{t.grad_accum_steps} rows of {fields['seq']} tokens; the patch budget {budget} per host batch "
                 f"as {fields['images_per_example']} image(s) of {side}x{side} (data.max_pixels) per row")
    return fields, notes


def spec_from_args(args) -> PlanSpec:
    topology = getattr(args, "topology", None)
    if getattr(args, "config_overrides", None) and not getattr(args, "config", None):
        raise ValueError(f"overrides {list(args.config_overrides)} apply to a training config: give --config")
    fields, notes = _from_config(args) if getattr(args, "config", None) else ({}, [])
    args._notes = notes

    def pick(name):
        value = getattr(args, name, None)
        return value if value is not None else fields.get(name, DEFAULTS.get(name))

    if getattr(args, "mesh", None):
        mesh = parse_mesh(args.mesh)
    elif "mesh" in fields:
        mesh = fields["mesh"]
    elif topology:
        mesh = {"fsdp": _target_device_count(topology)}
    else:
        mesh = {"fsdp": 1}
    grad_accum = pick("grad_accum")
    rows = getattr(args, "batch", None) or fields.get("rows")
    if rows is None:
        rows = int(mesh.get("data", 1)) * int(mesh.get("fsdp", 1)) * grad_accum
    batch = BatchShape(rows=rows, seq=pick("seq"), grad_accum=grad_accum,
                       images_per_example=pick("images_per_example"), image_size=pick("image_size"),
                       label_tokens=pick("label_tokens"))
    return PlanSpec(model=getattr(args, "model", None) or fields.get("model") or "8b", mesh=mesh,
                    rules=fields.get("rules", {}), batch=batch,
                    lora=bool(args.lora or fields.get("lora")), lora_rank=pick("lora_rank"), remat=pick("remat"),
                    dtype=pick("dtype"), param_dtype=pick("param_dtype"),
                    freeze_vision=bool(args.freeze_vision or fields.get("freeze_vision")),
                    model_overrides=fields.get("model_overrides", []) + list(args.override), topology=topology,
                    attention_backend=getattr(args, "attention_backend", None) or fields.get("attention_backend"),
                    stage=getattr(args, "stage", "sft"), completion_tokens=getattr(args, "completion_tokens", 256),
                    train=fields.get("train"), scan_layers=getattr(args, "scan_layers", None) or fields.get("scan_layers"))


def _jax_started() -> bool:
    from jax._src import xla_bridge  # JAX's private module: only this check depends on it

    return xla_bridge.backends_are_initialized()


def _with_device_count(flags: str, n: int) -> str:
    kept = [f for f in flags.split() if not f.startswith("--xla_force_host_platform_device_count")]
    return " ".join(kept + [f"--xla_force_host_platform_device_count={n}"])


def _plan_command(args) -> int:
    try:
        spec = spec_from_args(args)
        n = spec.mesh_size()
    except ValueError as e:
        print(f"sr-jax plan: {e}", file=sys.stderr)
        return 2
    for note in [] if os.environ.get(_CHILD_ENV) else getattr(args, "_notes", []):
        print(f"note: {note}", file=sys.stderr)
    on_tpu = bool(spec.topology) and tpu.libtpu_available()
    if spec.topology and not on_tpu and not os.environ.get(_CHILD_ENV):
        print(f"sr-jax plan: libtpu is not installed (pip install -e '.[tpu]'): compiling for {n} fake CPU "
              f"devices instead of {spec.topology}; the memory and FLOP figures are XLA:CPU's", file=sys.stderr)
    if on_tpu:
        pass  # the TPU devices come from libtpu's topology description: no fake CPU devices needed
    elif not _jax_started():
        # JAX reads the fake device count when its CPU backend starts: set it now, in-process.
        os.environ["XLA_FLAGS"] = _with_device_count(os.environ.get("XLA_FLAGS", ""), n)
    else:
        if len(jax.devices("cpu")) < n and not os.environ.get(_CHILD_ENV):
            # Too late for this process: run the same plan in a fresh one with the flag set.
            env = dict(os.environ, XLA_FLAGS=_with_device_count(os.environ.get("XLA_FLAGS", ""), n),
                       **{_CHILD_ENV: "1"})
            return subprocess.run([sys.executable, "-m", "sr_jax.plan", json.dumps(vars(args), default=str)],
                                  env=env).returncode
    try:
        report = run_plan(spec)
    except DoesNotFit as e:
        print(f"DOES NOT FIT: {e}")
        print("options that would help:\n" + "\n".join(f"  - {o}" for o in remedies(spec)))
        return 1
    except Exception as e:  # noqa: BLE001 - the TPU compiler's out-of-memory is an XlaRuntimeError
        text = str(e)
        if "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text:
            first = next((ln.strip() for ln in text.splitlines() if "memory" in ln.lower()), text.splitlines()[0])
            print(f"DOES NOT FIT: the TPU compiler ran out of HBM: {first}", file=sys.stderr)
            print("options that would help:\n" + "\n".join(f"  - {o}" for o in remedies(spec)), file=sys.stderr)
            return 1
        if isinstance(e, (ValueError, RuntimeError)):
            print(f"sr-jax plan: {e}", file=sys.stderr)
            return 2
        raise
    print(json.dumps(public(report), indent=2) if args.json else format_report(report))
    if not report["fits"]:
        print("options that would help:\n" + "\n".join(f"  - {o}" for o in remedies(spec)))
        return 1
    return 0


if __name__ == "__main__":  # the re-executed child: argv[1] is the parent's parsed arguments
    sys.exit(_plan_command(argparse.Namespace(**json.loads(sys.argv[1]))))
