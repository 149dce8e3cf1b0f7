"""Scaling sweep: the real SFT step over a grid of model size x batch x sequence x mesh.

    python tools/scaling_sweep.py --grid small --out runs/scaling     # CPU: tiny configs, fake devices
    python tools/scaling_sweep.py --grid real --out runs/scaling      # accelerators: 2B/4B/8B

Each grid point builds the model (random init, sharded) and `TrainStep` on a mesh over the first
`data x fsdp x tensor` devices, compiles the step for a synthetic batch (`sr_jax.plan.synthetic_batch`:
full rows of random tokens with images and M-RoPE positions, labels on the answer tail), runs one
warm-up step and then `--steps` timed steps. One CSV row per point:

  tokens_per_s   real tokens (rows x seq) per second of step time
  mfu            analytic FLOPs (`train_flops`) / (step time x devices x peak FLOP/s per device)
  peak_mem_per_device, temp_per_device  XLA's memory analysis of the compiled step (bytes; see
                 `sr_jax.plan`)
  compile_s      lower + compile of the step

Peak FLOP/s: `--peak-flops`, else the accelerator's data-sheet figure, else (CPU) a measured float32
matmul rate of this process divided by the mesh size: fake CPU devices share one host's cores.
A point that fails (out of memory, a mesh larger than the machine) gets its error in the `error`
column and the sweep goes on. Plots: tokens/s and MFU against batch, one line per model/seq/mesh.
Single host only (the synthetic batch is global).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import itertools
import math
import os
import sys
import time
from pathlib import Path

SMALL_FAKE_DEVICES = 2

# A step up from the tiny preset: wider and deeper decoder, same vision tower width.
TINY_WIDE = ["text.hidden_size=128", "text.intermediate_size=384", "text.num_hidden_layers=4",
             "text.num_attention_heads=4", "text.num_key_value_heads=2", "text.head_dim=32",
             "text.mrope_section=[8,4,4]", "vision.out_hidden_size=128"]


@dataclasses.dataclass
class Point:
    model: str                 # label in the CSV
    preset: str
    overrides: list
    batch: int
    seq: int
    mesh: dict
    images_per_example: int = 1
    image_size: int = 64
    label_tokens: int = 64
    dtype: str = "float32"
    remat: str = "none"

    @property
    def mesh_label(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.mesh.items())


def small_grid() -> list[Point]:
    models = [("tiny", "tiny", []), ("tiny-wide", "tiny", TINY_WIDE)]
    return [Point(label, preset, over, batch, seq, mesh)
            for (label, preset, over), seq, batch, mesh in itertools.product(
                models, (256, 512), (2, 4), ({"fsdp": 1}, {"fsdp": 2}))]


def real_grid(num_devices: int) -> list[Point]:
    """2B/4B/8B in bfloat16 with full remat, two 512px images per row, over all devices."""
    meshes = [{"fsdp": num_devices}]
    if num_devices >= 4:
        meshes.append({"data": 2, "fsdp": num_devices // 2})
    return [Point(size, size, [], per_device * num_devices, seq, mesh, images_per_example=2, image_size=512,
                  label_tokens=1024, dtype="bfloat16", remat="full")
            for size, seq, per_device, mesh in itertools.product(("2b", "4b", "8b"), (2048, 8192), (1, 2), meshes)]


def peak_per_device(override: float | None, mesh_size: int, cache: dict) -> float:
    import jax

    from sr_jax.train.metrics import PEAK_FLOPS, measured_matmul_peak

    if override:
        return override
    kind = jax.devices()[0].device_kind
    for prefix, flops in PEAK_FLOPS.items():
        if kind.startswith(prefix):
            return flops
    if "cpu" not in cache:
        cache["cpu"] = measured_matmul_peak()
    return cache["cpu"] / mesh_size


def measure(point: Point, steps: int, peak_override: float | None, cache: dict) -> dict:
    import jax
    import numpy as np

    from sr_jax.plan import BatchShape, PlanSpec, analytic_flops, memory_fields, sft_config, synthetic_batch
    from sr_jax.sharding import shard_batch
    from sr_jax.train.sft import Trainer, model_config

    shape = BatchShape(rows=point.batch, seq=point.seq, images_per_example=point.images_per_example,
                       image_size=point.image_size, label_tokens=point.label_tokens)
    spec = PlanSpec(model=point.preset, mesh=point.mesh, batch=shape, remat=point.remat, dtype=point.dtype,
                    param_dtype="float32", model_overrides=point.overrides)
    n = spec.mesh_size()
    if n > len(jax.devices()):
        raise RuntimeError(f"mesh {point.mesh} needs {n} devices, {len(jax.devices())} exist")
    cfg = sft_config(spec)
    shape.validate(spec.mesh.get("data", 1) * spec.mesh.get("fsdp", 1), model_config(cfg.model).vision)
    trainer = Trainer(cfg, devices=jax.devices()[:n], total_steps=1000)
    state = trainer.init_state()
    batch = shard_batch(synthetic_batch(trainer.model_cfg, shape), trainer.mesh, trainer.step.rules)

    t0 = time.perf_counter()
    compiled = trainer.step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    memory = memory_fields(compiled.memory_analysis())

    state, metrics = compiled(state, trainer.step.rest, batch)  # warm-up
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, trainer.step.rest, batch)
    jax.block_until_ready((state, metrics))
    step_s = (time.perf_counter() - t0) / steps

    flops = analytic_flops(trainer.model_cfg, shape, vision_trainable=True)
    peak = peak_per_device(peak_override, n, cache)
    return {
        "params": sum(math.prod(x.shape) for x in jax.tree.leaves(state.params)),
        "devices": n,
        "compile_s": round(compile_s, 2),
        "step_s": round(step_s, 4),
        "tokens_per_s": round(point.batch * point.seq / step_s, 1),
        "flops_per_step": f"{flops:.4e}",
        "mfu": round(flops / (step_s * n * peak), 4),
        "peak_flops_per_device": f"{peak:.3e}",
        "peak_mem_per_device": memory["total"],
        "temp_per_device": memory["temp"],
        "loss": round(float(np.asarray(metrics["loss"])), 4),
    }


COLUMNS = ["model", "params", "batch", "seq", "mesh", "devices", "images_per_example", "image_size", "dtype", "remat",
           "compile_s", "step_s", "tokens_per_s", "flops_per_step", "mfu", "peak_flops_per_device",
           "peak_mem_per_device", "temp_per_device", "loss", "error"]


def plot(rows: list[dict], png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if not r.get("error")]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, title in ((axes[0], "tokens_per_s", "tokens / s"), (axes[1], "mfu", "MFU")):
        groups = sorted({(r["model"], r["seq"], r["mesh"]) for r in ok})
        for model, seq, mesh in groups:
            pts = sorted((int(r["batch"]), float(r[key])) for r in ok
                         if (r["model"], r["seq"], r["mesh"]) == (model, seq, mesh))
            ax.plot(*zip(*pts), marker="o", label=f"{model} seq {seq} {mesh}")
        ax.set_xlabel("global batch (rows)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--grid", choices=["small", "real"], default="small")
    p.add_argument("--out", default="runs/scaling")
    p.add_argument("--steps", type=int, default=3, help="timed steps per point (after one warm-up step)")
    p.add_argument("--peak-flops", type=float, default=None, help="peak FLOP/s per device for MFU")
    p.add_argument("--limit", type=int, default=None, help="run only the first N grid points")
    args = p.parse_args(argv)

    if args.grid == "small" and "jax" not in sys.modules:
        # Fake CPU devices for the fsdp=2 points; must be set before JAX starts.
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_force_host_platform_device_count" not in flags:
            os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={SMALL_FAKE_DEVICES}".strip()
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    grid = small_grid() if args.grid == "small" else real_grid(len(jax.devices()))
    grid = grid[: args.limit] if args.limit else grid
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / f"scaling_{args.grid}.csv"
    rows, cache = [], {}
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for i, point in enumerate(grid):
            row = {"model": point.model, "batch": point.batch, "seq": point.seq, "mesh": point.mesh_label,
                   "images_per_example": point.images_per_example, "image_size": point.image_size,
                   "dtype": point.dtype, "remat": point.remat, "error": ""}
            try:
                row.update(measure(point, args.steps, args.peak_flops, cache))
            except Exception as e:  # keep sweeping: one point out of memory must not end the grid
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            rows.append(row)
            writer.writerow(row)
            f.flush()
            print(f"[{i + 1}/{len(grid)}] " + " ".join(f"{k}={row.get(k, '')}" for k in (
                "model", "batch", "seq", "mesh", "compile_s", "tokens_per_s", "mfu", "peak_mem_per_device", "error")),
                flush=True)
    png = plot(rows, out / f"scaling_{args.grid}.png")
    print(f"wrote {csv_path} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
