"""Benchmark the Grain input pipeline against the image-decoding floor.

Writes synthetic examples to an ArrayRecord file, then measures in one run
  floor     record decode + image decode + resize + patchify of the same images, one process
  pipeline  the whole `DataPipeline` (shuffle, encode, tokenize, pack/pad, vision tables) with
            N = 0, 1, 2 worker processes, read by a consumer that copies every array once (as a
            device transfer would); steady state: after the first batch, which pays for
            starting the workers
and prints examples/s of each, the ratio pipeline/floor and the CPU time per example of all
processes (the machine is shared, so each figure is the best of `--rounds` interleaved rounds,
and the load average is printed). Goal on a 2-core machine: the best pipeline >= 0.7 x floor. Headroom over a train step: an estimate of what one accelerator consumes,
6 * (decoder-block params * tokens + vision-block params * patches) FLOPs per example at
`--device-tflops` x `--mfu` (defaults: Qwen3-VL-8B blocks, H100 bf16 dense, 40%), with the
measured tokens and patches per example; or, with `--step-seconds S`, a measured step time.

    python tools/bench_data.py [--examples 256] [--min-side 256 --max-side 640] [--mode pack]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def write_records(path: Path, n: int, min_side: int, max_side: int, seed: int) -> None:
    from sr_jax.data.storage import write_array_record
    from sr_jax.data.synthetic import generate_examples

    write_array_record(path, generate_examples(n, seed, image_size=(min_side, max_side)))


def cpu_seconds() -> float:
    """CPU time of this process and its children (Grain workers), user + system."""
    try:
        import psutil
    except ImportError:
        return float("nan")
    me = psutil.Process()
    total = 0.0
    for proc in [me] + me.children(recursive=True):
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def floor_rate(path: Path, min_pixels: int, max_pixels: int) -> tuple[float, float, int]:
    """Examples/s of decoding records and their images alone (what any pipeline must do)."""
    from sr_jax.data.image import ImageConfig, preprocess_images
    from sr_jax.data.storage import ArrayRecordSource

    source = ArrayRecordSource(path)
    cfg = ImageConfig(min_pixels=min_pixels, max_pixels=max_pixels)
    preprocess_images(source[0].images, cfg)  # warm caches (lookup tables, imports)
    patches = 0
    start, cpu = time.perf_counter(), cpu_seconds()
    for i in range(len(source)):
        pixel_values, _ = preprocess_images(source[i].images, cfg)
        patches += len(pixel_values)
    return len(source) / (time.perf_counter() - start), (cpu_seconds() - cpu) / len(source), patches


def consume(batch: dict, sinks: dict) -> None:
    """Reads every array once, as a host-to-device copy would (into reused buffers)."""
    for key, value in batch.items():
        value = np.asarray(value)
        sink = sinks.get(key)
        if sink is None or sink.shape != value.shape:
            sink = sinks[key] = np.empty_like(value)
        np.copyto(sink, value)


def pipeline_rate(args, path: Path, workers: int, processor) -> dict:
    from sr_jax.data.pipeline import DataConfig, DataPipeline

    seq_lens = [args.seq_len] if args.mode == "pack" else [args.seq_len // 2, args.seq_len]
    budget = args.patch_budget or (16384 if args.mode == "pack" else 4 * round(1.25 * args.batch_size * args.mean_patches / 4))
    cfg = DataConfig(sources=[str(path)], batch_size=args.batch_size, mode=args.mode, seq_lens=seq_lens,
                     patch_budgets=[budget] * len(seq_lens), num_epochs=None, workers=workers,
                     read_threads=args.read_threads, min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    pipe = DataPipeline(cfg, processor=processor, process_index=0, process_count=1)
    start = time.perf_counter()
    it = iter(pipe)
    next(it)
    startup = time.perf_counter() - start
    examples = tokens = capacity = batches = patches = 0
    sinks: dict = {}
    start, cpu = time.perf_counter(), cpu_seconds()
    while examples < args.examples * args.epochs:
        batch = next(it)
        consume(batch, sinks)
        examples += int(batch["num_examples"])
        tokens += int(batch["num_tokens"])
        patches += int(batch["num_patches"])
        capacity += batch["input_ids"].size
        batches += 1
    elapsed, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    it.close()
    return {"rate": examples / elapsed, "startup": startup, "fill": tokens / capacity,
            "per_batch": examples / batches, "cpu": cpu / examples, "tokens": tokens / examples,
            "patches": patches / examples}


def main(argv=None) -> int:
    from sr_jax.data.image import MAX_PIXELS, MIN_PIXELS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=256, help="records written (and timed per epoch)")
    ap.add_argument("--epochs", type=int, default=1, help="epochs timed per pipeline run")
    ap.add_argument("--min-side", type=int, default=256)
    ap.add_argument("--max-side", type=int, default=640)
    ap.add_argument("--min-pixels", type=int, default=MIN_PIXELS)
    ap.add_argument("--max-pixels", type=int, default=MAX_PIXELS)
    ap.add_argument("--mode", choices=["pad", "pack"], default="pack")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--patch-budget", type=int, default=None,
                    help="patches per batch (default: pack 16384, pad 1.25 x batch x the mean example's patches)")
    ap.add_argument("--read-threads", type=int, default=1)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--step-seconds", type=float, default=None, help="measured train step time for the headroom line")
    ap.add_argument("--text-params", type=float, default=6.95e9, help="decoder-block params (8B: 36 x 193M)")
    ap.add_argument("--vision-params", type=float, default=0.45e9, help="vision-block params (8B: 27 x 15M + mergers)")
    ap.add_argument("--device-tflops", type=float, default=989.0, help="accelerator peak (H100 SXM bf16 dense)")
    ap.add_argument("--mfu", type=float, default=0.4)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved repetitions; the best of each is shown")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from sr_jax.data import Processor

    with tempfile.TemporaryDirectory(prefix="sr_jax_bench_data_") as tmp:
        path = Path(tmp) / "bench.array_record"
        t = time.perf_counter()
        write_records(path, args.examples, args.min_side, args.max_side, args.seed)
        print(f"wrote {args.examples} synthetic examples ({args.min_side}-{args.max_side} px sides) "
              f"in {time.perf_counter() - t:.1f} s; cpus available: {len(os.sched_getaffinity(0))}")
        processor = Processor(min_pixels=args.min_pixels, max_pixels=args.max_pixels)
        floor, runs = None, {w: None for w in args.workers}
        for _ in range(args.rounds):
            f = floor_rate(path, args.min_pixels, args.max_pixels)
            args.mean_patches = f[2] / args.examples
            floor = f if floor is None or f[0] > floor[0] else floor
            for workers in args.workers:
                r = pipeline_rate(args, path, workers, processor)
                runs[workers] = r if runs[workers] is None or r["rate"] > runs[workers]["rate"] else runs[workers]
        rate, floor_cpu, patches = floor
        print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus; best of {args.rounds} rounds")
        print(f"floor (decode + resize + patchify, 1 process): {rate:6.1f} examples/s  "
              f"cpu {1e3 * floor_cpu:5.1f} ms/example  ({patches / args.examples:.0f} patches/example)")
        for workers, r in runs.items():
            print(f"pipeline {args.mode}, workers={workers}:          {r['rate']:6.1f} examples/s  "
                  f"cpu {1e3 * r['cpu']:5.1f} ms/example  ratio {r['rate'] / rate:4.2f}x floor  "
                  f"(startup {r['startup']:.1f} s, token fill {r['fill']:.0%}, {r['per_batch']:.1f} examples/batch)")
        best = max(r["rate"] for r in runs.values())
        print(f"best ratio: {best / rate:.2f}x floor (goal >= 0.70x)")
        last = runs[args.workers[-1]]
        flops = 6 * (args.text_params * last["tokens"] + args.vision_params * last["patches"])
        per_device = args.device_tflops * 1e12 * args.mfu / flops
        print(f"train step estimate: {flops / 1e12:.1f} TFLOP/example ({last['tokens']:.0f} tokens, "
              f"{last['patches']:.0f} patches) -> {per_device:.1f} examples/s per accelerator at "
              f"{args.device_tflops:g} TFLOP/s x {args.mfu:g} MFU; this pipeline feeds {best / per_device:.1f} of them")
        if args.step_seconds:
            need = last["per_batch"] / args.step_seconds
            print(f"measured step: {args.step_seconds:g} s per {last['per_batch']:.1f}-example batch consumes "
                  f"{need:.1f} examples/s; headroom {best / need:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
