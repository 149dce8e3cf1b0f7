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

import numpy as np

MESH_KEYS = ("data", "fsdp", "tensor")
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
        side = self.image_size // 16
        return (1, side, side)

    @property
    def patches_per_image(self) -> int:
        return math.prod(self.grid)

    @property
    def image_tokens_per_row(self) -> int:
        # <|vision_start|> + one token per 2x2 patches + <|vision_end|>, per image
        return self.images_per_example * (self.patches_per_image // 4 + 2)

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
            "pixel_values": ((k, p, 1536), "float32"),
            "vision_interp_index": ((k, p, 4), "int32"),
            "vision_interp_weight": ((k, p, 4), "float32"),
            "vision_rope_hw": ((k, p, 2), "int32"),
            "vision_segment": ((k, p), "int32"),
        })
    return out


def abstract_batch(shape: BatchShape, mesh) -> dict[str, Any]:
    """ShapeDtypeStructs of the step's batch (layout of `sr_jax.train.step`), with shardings."""
    import jax

    from sr_jax.sharding import logical_sharding, BATCH_AXES

    return {key: jax.ShapeDtypeStruct(dims, np.dtype(dtype), sharding=logical_sharding(BATCH_AXES[key], dims, mesh))
            for key, (dims, dtype) in _batch_dtypes(shape).items()}


def synthetic_batch(model_cfg, shape: BatchShape, seed: int = 0) -> dict[str, np.ndarray]:
    """Random host arrays with exactly `abstract_batch`'s shapes: every row full of real tokens,
    its images at the start (with M-RoPE positions as the model derives them), labels on the last
    `label_tokens` positions."""
    from sr_jax.model.rope_index import get_rope_index
    from sr_jax.train.loss import IGNORE
    from sr_jax.train.step import stack_microbatches, vision_arrays

    rng = np.random.default_rng(seed)
    b, t = shape.micro_rows, shape.seq
    vocab = min(model_cfg.text.vocab_size, model_cfg.image_token_id, model_cfg.vision_start_token_id,
                model_cfg.vision_end_token_id, model_cfg.video_token_id)
    n_tok = shape.patches_per_image // 4
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
            pixels = rng.uniform(-1, 1, (len(grids) * shape.patches_per_image, 1536)).astype(np.float32)
            mb.update(vision_arrays(pixels, grids, len(pixels), model_cfg.vision))
        microbatches.append(mb)
    return stack_microbatches(microbatches)


def analytic_flops(model_cfg, shape: BatchShape, *, vision_trainable: bool) -> float:
    from sr_jax.train.metrics import train_flops

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
    batch: BatchShape = dataclasses.field(default_factory=lambda: BatchShape(rows=1, seq=1024))
    lora: bool = False
    lora_rank: int = 32
    remat: str = "none"
    dtype: str = "bfloat16"             # compute dtype
    param_dtype: str = "float32"        # stored parameters (and so optimizer moments)
    freeze_vision: bool = False
    model_overrides: list = dataclasses.field(default_factory=list)
    topology: str | None = None         # TPU slice to compile for (sr_jax.tpu.parse_topology); None: CPU
    attention_backend: str | None = None  # None: the model's (auto: splash on TPU)

    def mesh_size(self) -> int:
        self.mesh_config()  # validates
        return math.prod(self._sizes())

    def _sizes(self) -> list[int]:
        return [int(self.mesh.get(k, 1)) for k in MESH_KEYS]

    def mesh_config(self):
        from sr_jax.sharding import MeshConfig

        unknown = sorted(set(self.mesh) - set(MESH_KEYS))
        if unknown:
            raise ValueError(f"unknown mesh axes {unknown}; use {list(MESH_KEYS)}")
        sizes = self._sizes()
        if any(s < 1 for s in sizes):
            raise ValueError(f"mesh axis sizes must be >= 1, got {self.mesh}")
        return MeshConfig(*sizes)


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
    from sr_jax.lora import LoRAConfig
    from sr_jax.train.config import LossConfig, TrainConfig
    from sr_jax.train.sft import ModelSection, SFTConfig

    train = TrainConfig(mesh=spec.mesh_config(), loss=LossConfig(max_label_tokens=spec.batch.max_label_tokens),
                        lora=LoRAConfig(enabled=spec.lora, rank=spec.lora_rank), grad_accum_steps=spec.batch.grad_accum,
                        remat=spec.remat, freeze_vision=spec.freeze_vision)
    model = ModelSection(preset=spec.model, dtype=spec.dtype, param_dtype=spec.param_dtype,
                         overrides=list(spec.model_overrides), attention_backend=spec.attention_backend)
    return SFTConfig(model=model, train=train)


def shard_bytes(tree) -> int:
    """Bytes one device holds of `tree` (abstract or real arrays with shardings): the largest
    per-device total, as uneven shardings may load one device more."""
    import jax

    per_device: dict[Any, int] = {}
    for leaf in jax.tree.leaves(tree):
        sharding = leaf.sharding
        nbytes = math.prod(sharding.shard_shape(leaf.shape)) * np.dtype(leaf.dtype).itemsize
        for device in sharding.device_set:
            per_device[device] = per_device.get(device, 0) + nbytes
    return max(per_device.values(), default=0)


def plan_devices(n: int):
    import jax

    devices = jax.devices("cpu")
    if len(devices) < n:
        raise RuntimeError(f"the mesh needs {n} devices but this process has {len(devices)} CPU devices; run "
                           f"with XLA_FLAGS=--xla_force_host_platform_device_count={n} set before JAX starts "
                           f"(the `sr-jax plan` command does this itself)")
    return devices[:n]


def target_devices(spec: PlanSpec):
    """The devices the plan compiles for: the TPU topology's when one is given and libtpu is
    installed, else fake CPU devices."""
    from sr_jax import tpu

    if spec.topology and tpu.libtpu_available():
        devices = tpu.topology_devices(tpu.parse_topology(spec.topology))
        if len(devices) != spec.mesh_size():
            raise ValueError(f"mesh {spec.mesh} has {spec.mesh_size()} devices but topology {spec.topology} has "
                             f"{len(devices)}")
        return devices
    return plan_devices(spec.mesh_size())


def build_plan(spec: PlanSpec, *, devices=None, compiler_options: dict | None = None):
    """(trainer, abstract state, abstract batch) for the spec: nothing is allocated."""
    from sr_jax.train.sft import Trainer, model_config

    cfg = sft_config(spec)
    mcfg = model_config(cfg.model)
    n = spec.mesh_size()
    sizes = dict(zip(MESH_KEYS, spec._sizes()))
    spec.batch.validate(sizes["data"] * sizes["fsdp"], mcfg.vision)
    devices = target_devices(spec) if devices is None else list(devices)[:n]
    if len(devices) < n:
        raise RuntimeError(f"the mesh {spec.mesh} needs {n} devices, {len(devices)} given")
    trainer = Trainer(cfg, devices=devices, abstract=True, total_steps=1000)
    if compiler_options:
        trainer.step.compiler_options = compiler_options
    return trainer, trainer.abstract_state(), abstract_batch(spec.batch, trainer.mesh)


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
    exposes several devices per chip. With gradient accumulation XLA counts the scanned
    microbatch once: FLOPs are then the larger of XLA's and the analytic count, bytes x k."""
    f = report["flops_per_step"]
    n, chips = report["devices"], report["target"]["chips"]
    per_chip = n / chips  # devices per chip
    k = report["batch"]["grad_accum"]
    flops = max((f["xla_per_device"] or 0.0) * per_chip, f["analytic"] / chips)
    bytes_ = (report["bytes_per_step"]["xla_per_device"] or 0.0) * per_chip * k
    compute_s, memory_s = flops / chip.peak_bf16_flops, bytes_ / chip.hbm_bandwidth
    step_s = max(compute_s, memory_s)
    return {
        "peak_flops_per_chip": chip.peak_bf16_flops, "hbm_bandwidth_per_chip": chip.hbm_bandwidth,
        "compute_seconds": compute_s, "memory_seconds": memory_s, "step_seconds": step_s,
        "bound": "compute" if compute_s >= memory_s else "HBM bandwidth",
        "mfu": f["analytic"] / (chips * chip.peak_bf16_flops * step_s) if step_s else None,
        "tokens_per_second_per_chip": report["tokens_per_step"] / step_s / chips if step_s else None,
    }


def fits(report: dict) -> tuple[bool, str | None]:
    """(fits, one-line verdict) against the target chip's HBM; (True, None) without a chip."""
    hbm = report["target"].get("hbm_bytes_per_device")
    if not hbm:
        return True, None
    need = report["memory_per_device"]["xla"]["total"]
    per = "chip" if report["target"]["devices_per_chip"] == 1 else "device"
    line = f"needs {need / 2**30:.1f} GiB of {hbm / 2**30:.0f} GiB HBM per {per}"
    return need <= hbm, line


def remedies(spec: PlanSpec) -> list[str]:
    """Options that lower the per-device memory of this spec."""
    out = []
    sizes = dict(zip(MESH_KEYS, spec._sizes()))
    if sizes["data"] > 1 or sizes["tensor"] > 1:
        out.append("more fsdp: --mesh fsdp=N (shards parameters, gradients and optimizer state over every device)")
    if spec.remat != "full":
        out.append("--remat full (keeps only each layer's input for the backward pass)")
    rows = spec.batch.micro_rows // (sizes["data"] * sizes["fsdp"])
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


def run_plan(spec: PlanSpec, *, devices=None, compiler_options: dict | None = None) -> dict:
    """Compiles the step ahead of time and returns the report (see module doc); all byte counts
    are per device. Raises `DoesNotFit` before compiling when the parameters, optimizer state and
    batch alone exceed a TPU target's HBM."""
    t0 = time.perf_counter()
    trainer, state, batch = build_plan(spec, devices=devices, compiler_options=compiler_options)
    t_build = time.perf_counter() - t0
    target = target_info(spec, trainer.mesh)
    hbm, per = target["hbm_bytes_per_device"], "chip" if target["devices_per_chip"] == 1 else "device"
    resident = shard_bytes(state) + shard_bytes(batch)
    if hbm and resident > hbm:
        raise DoesNotFit(f"needs {resident / 2**30:.1f} GiB of {hbm / 2**30:.0f} GiB HBM per {per} for the "
                         f"parameters, optimizer state and batch alone, before any activation")
    t0 = time.perf_counter()
    lowered = trainer.step.lower(state, batch)
    t_lower = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = lowered.compile()
    t_compile = time.perf_counter() - t0
    target = target_info(spec, trainer.mesh)

    n = trainer.mesh.size
    cfg = trainer.cfg.train
    vision_trainable = not (cfg.freeze_vision or (cfg.lora.enabled and not cfg.lora.vision))
    xla_flops = cost_flops(compiled)
    memory = {
        "params": shard_bytes(state.params),
        "frozen": shard_bytes(state.frozen),
        "optimizer": shard_bytes(state.opt_state),
        "batch": shard_bytes(batch),
        "xla": memory_fields(compiled.memory_analysis()),
    }
    import jax

    report = {
        "model": spec.model,
        "target": target,
        "attention_backend": resolve_attention(trainer),
        "mesh": dict(zip(MESH_KEYS, spec._sizes())),
        "devices": n,
        "batch": dataclasses.asdict(spec.batch),
        "rows_per_device": spec.batch.micro_rows // (trainer.mesh.shape["data"] * trainer.mesh.shape["fsdp"]),
        "lora": spec.lora, "remat": spec.remat, "dtype": spec.dtype, "param_dtype": spec.param_dtype,
        "num_params": sum(math.prod(x.shape) for x in jax.tree.leaves((state.params, state.frozen))),
        "num_trainable": sum(math.prod(x.shape) for x in jax.tree.leaves(state.params)),
        "tokens_per_step": spec.batch.rows * spec.batch.seq,
        "memory_per_device": memory,
        "flops_per_step": {
            "analytic": analytic_flops(trainer.model_cfg, spec.batch, vision_trainable=vision_trainable),
            "xla": None if xla_flops is None else xla_flops * n,
            "xla_per_device": xla_flops,
        },
        "bytes_per_step": {"xla_per_device": cost_bytes(compiled)},
        "seconds": {"build": t_build, "lower": t_lower, "compile": t_compile},
        "_compiled": compiled,
    }
    if target["platform"] == "tpu":
        from sr_jax.tpu import parse_topology

        report["roofline"] = roofline(report, parse_topology(spec.topology).chip)
    report["fits"], report["fit_line"] = fits(report)
    return report


def target_info(spec: PlanSpec, mesh) -> dict:
    """What the plan compiled for: platform, device kind, and the chip's HBM when known."""
    from sr_jax.tpu import parse_topology

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
    from sr_jax.model.attention import resolve_backend

    with jax_mesh(trainer.mesh):
        return resolve_backend(trainer.model_cfg.attention_backend)


def jax_mesh(mesh):
    import jax

    return jax.set_mesh(mesh)


# ---------------------------------------------------------------------------------------------
# output


def _gib(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:10.3f} {unit}"
    return f"{n:10.0f} B  "


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
        f"plan: model {r['model']}, mesh {r['mesh']} ({r['devices']} devices), global batch {b['rows']} x "
        f"{b['seq']} tokens{images}, grad_accum {b['grad_accum']}, {r['rows_per_device']} row(s) per device "
        f"per microbatch",
        f"      {'LoRA' if r['lora'] else 'full'} fine-tuning, remat {r['remat']}, compute {r['dtype']}, "
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
    if t["hbm_bytes_per_device"]:
        lines.insert(lines.index("FLOPs per step:"),
                     f"  HBM per device           {_gib(t['hbm_bytes_per_device'])}   (published; "
                     f"{100 * x['total'] / t['hbm_bytes_per_device']:.0f}% used)")
    if r["bytes_per_step"]["xla_per_device"] is not None:
        lines.insert(lines.index("FLOPs per step:") + 3,
                     f"  HBM bytes accessed       {r['bytes_per_step']['xla_per_device']:.4e} per device (XLA cost "
                     f"analysis)")
    if "roofline" in r:
        e = r["roofline"]
        lines += [
            "roofline ESTIMATE (compiled FLOPs and bytes at the chip's published peaks; no communication, "
            "perfect overlap):",
            f"  peak per chip            {e['peak_flops_per_chip'] / 1e12:.0f} TFLOP/s bf16, "
            f"{e['hbm_bandwidth_per_chip'] / 1e9:.0f} GB/s HBM",
            f"  step time                {e['step_seconds'] * 1e3:.1f} ms ({e['bound']}-bound; compute "
            f"{e['compute_seconds'] * 1e3:.1f} ms, HBM {e['memory_seconds'] * 1e3:.1f} ms)",
            f"  MFU                      {100 * e['mfu']:.1f}%   (analytic FLOPs / (chips x peak x step time))",
            f"  tokens/s per chip        {e['tokens_per_second_per_chip']:.0f}",
        ]
    if r["fit_line"]:
        lines.append(("fits: " if r["fits"] else "DOES NOT FIT: ") + r["fit_line"])
    return "\n".join(lines)


def public(report: dict) -> dict:
    return {k: v for k, v in report.items() if not k.startswith("_")}


# ---------------------------------------------------------------------------------------------
# CLI


def register(sub) -> None:
    p = sub.add_parser("plan", help="memory and FLOPs of a training step, compiled ahead of time for a TPU "
                                    "topology (with libtpu) or on fake CPU devices")
    p.add_argument("--model", default="8b", help="preset (tiny, 2b, 4b, 8b, 32b) or model YAML path")
    p.add_argument("--topology", default=None,
                   help="TPU slice to compile for: v5p-64, v6e-16, v5e-8, v4-32 (Cloud TPU accelerator types) or "
                        "v5p:4x4x2, v6e:2x2 (chips per axis); needs libtpu (pip install -e '.[tpu]'), else "
                        "fake CPU devices")
    p.add_argument("--mesh", default=None, help="e.g. fsdp=64 or data=2,fsdp=16,tensor=2 (unnamed axes are 1); "
                                                "default: fsdp over every device")
    p.add_argument("--batch", type=int, default=None,
                   help="global batch (rows per optimizer step); default: one row per data x fsdp device")
    p.add_argument("--seq", type=int, default=1024, help="tokens per row")
    p.add_argument("--grad-accum", type=int, default=1, help="microbatches per step (the batch is split)")
    p.add_argument("--images-per-example", type=int, default=0)
    p.add_argument("--image-size", type=int, default=512, help="square image side in pixels (multiple of 32)")
    p.add_argument("--label-tokens", type=int, default=None,
                   help="labelled (answer) tokens per row; sets loss.max_label_tokens (default: the whole row)")
    p.add_argument("--lora", action="store_true", help="LoRA on the decoder's linear layers")
    p.add_argument("--lora-rank", type=int, default=32)
    p.add_argument("--freeze-vision", action="store_true")
    p.add_argument("--remat", default="none", choices=["none", "full", "save_dots"])
    p.add_argument("--dtype", default="bfloat16", help="compute dtype")
    p.add_argument("--param-dtype", default="float32", help="stored parameter dtype")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE", help="model config override")
    p.add_argument("--attention-backend", default=None, choices=["auto", "cpu", "splash", "cudnn"],
                   help="attention kernel (default: the model's; auto = splash on TPU)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_plan_command)


def spec_from_args(args) -> PlanSpec:
    topology = getattr(args, "topology", None)
    if getattr(args, "mesh", None):
        mesh = parse_mesh(args.mesh)
    elif topology:
        from sr_jax.tpu import parse_topology

        topo = parse_topology(topology)
        devices = topo.chips * (2 if topo.chip.name == "v4" else 1)  # v4 topologies list each TensorCore
        mesh = {"fsdp": devices}
    else:
        mesh = {"fsdp": 1}
    rows = getattr(args, "batch", None)
    if rows is None:
        rows = int(mesh.get("data", 1)) * int(mesh.get("fsdp", 1)) * args.grad_accum
    batch = BatchShape(rows=rows, seq=args.seq, grad_accum=args.grad_accum,
                       images_per_example=args.images_per_example, image_size=args.image_size,
                       label_tokens=args.label_tokens)
    return PlanSpec(model=args.model, mesh=mesh, batch=batch, lora=args.lora,
                    lora_rank=args.lora_rank, remat=args.remat, dtype=args.dtype, param_dtype=args.param_dtype,
                    freeze_vision=args.freeze_vision, model_overrides=list(args.override), topology=topology,
                    attention_backend=getattr(args, "attention_backend", None))


def _jax_started() -> bool:
    from jax._src import xla_bridge

    return xla_bridge.backends_are_initialized()


def _with_device_count(flags: str, n: int) -> str:
    kept = [f for f in flags.split() if not f.startswith("--xla_force_host_platform_device_count")]
    return " ".join(kept + [f"--xla_force_host_platform_device_count={n}"])


def _plan_command(args) -> int:
    from sr_jax import tpu

    try:
        spec = spec_from_args(args)
        n = spec.mesh_size()
    except ValueError as e:
        print(f"sr-jax plan: {e}", file=sys.stderr)
        return 2
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
        import jax

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
