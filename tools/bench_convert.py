"""Benchmark `convert hf-to-jax` on a synthetic multi-GB checkpoint: peak memory and throughput.

Writes a random Qwen3-VL checkpoint (text-heavy config, bf16 matrices and fp32 norms/vision,
sharded safetensors with an index; no torch needed), then in separate child processes
  1. reads every tensor with safetensors alone (the read floor; files are in the page cache),
  2. copies the files and fsyncs them (the read + write floor),
  3. runs the converter to a bfloat16 Orbax directory,
  4. loads the model in bfloat16 from the HF directory and from the converted one,
and prints each child's time and peak RSS (its own `ru_maxrss`) against the checkpoint size.
Goal: converter peak RSS <= 1.1 x checkpoint bytes + 1 GiB.

    python tools/bench_convert.py [--layers 10] [--workdir /tmp/sr_jax_bench] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

GiB = 1024**3


def bench_config(layers: int) -> dict:
    """A 2B-wide text decoder (real vocabulary, untied head) with a small vision tower."""
    from sr_jax.special_tokens import IMAGE_PAD_ID, VIDEO_PAD_ID, VISION_END_ID, VISION_START_ID

    rope = {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20], "mrope_interleaved": True}
    return {
        "architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl", "dtype": "bfloat16",
        "image_token_id": IMAGE_PAD_ID, "video_token_id": VIDEO_PAD_ID, "vision_start_token_id": VISION_START_ID,
        "vision_end_token_id": VISION_END_ID, "tie_word_embeddings": False,
        "text_config": {"vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144,
                        "num_hidden_layers": layers, "num_attention_heads": 16, "num_key_value_heads": 8,
                        "head_dim": 128, "rms_norm_eps": 1e-6, "hidden_act": "silu", "attention_bias": False,
                        "max_position_embeddings": 262144, "tie_word_embeddings": False, "rope_parameters": rope},
        "vision_config": {"depth": 2, "hidden_size": 256, "intermediate_size": 512, "num_heads": 4,
                          "in_channels": 3, "patch_size": 16, "temporal_patch_size": 2, "spatial_merge_size": 2,
                          "out_hidden_size": 2048, "num_position_embeddings": 2304,
                          "deepstack_visual_indexes": [0], "hidden_act": "gelu_pytorch_tanh"},
    }


def write_checkpoint(directory: Path, layers: int, shard_bytes: int) -> int:
    """Random tensors for every HF key of the config, in shards of about `shard_bytes`."""
    import ml_dtypes
    import numpy as np
    from flax import nnx
    from safetensors.numpy import save_file

    from sr_jax.models.qwen3_vl.names import hf_key, hf_shape_of
    from sr_jax.models.qwen3_vl import ModelConfig, abstract_model

    directory.mkdir(parents=True)
    hf_config = bench_config(layers)
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2))
    cfg = ModelConfig.from_hf_dict(hf_config)
    _, params = nnx.split(abstract_model(cfg), nnx.Param)
    rng = np.random.default_rng(0)
    shard, shard_size, weight_map, names = {}, 0, {}, []

    def flush():
        nonlocal shard, shard_size
        name = f"model-{len(names) + 1:05d}.safetensors"
        save_file(shard, str(directory / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        names.append(name)
        shard, shard_size = {}, 0

    for path, var in nnx.to_flat_state(params):
        shape = hf_shape_of(path, var.get_value().shape, cfg)
        # Matrices in bf16 as released checkpoints store them; 1-D tensors and the vision tower in fp32.
        dtype = ml_dtypes.bfloat16 if len(shape) > 1 and path[1] != "visual" else np.float32
        tensor = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(dtype)
        shard[hf_key(path)] = tensor
        shard_size += tensor.nbytes
        if shard_size >= shard_bytes:
            flush()
    if shard:
        flush()
    total = sum((directory / n).stat().st_size for n in names)
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


def child_bare_read(hf: Path) -> dict:
    import ml_dtypes  # noqa: F401  (safetensors' numpy backend finds "bfloat16" only once this is imported)
    from safetensors import safe_open

    nbytes = 0
    for f in sorted(hf.glob("*.safetensors")):
        with safe_open(str(f), framework="numpy") as handle:
            for key in handle.keys():
                nbytes += handle.get_tensor(key).nbytes
    return {"tensor_bytes": nbytes}


def child_copy(hf: Path, out: Path) -> dict:
    """Plain file copy + fsync of the shards: the disk's read+write floor for a converter."""
    out.mkdir()
    for f in sorted(hf.glob("*.safetensors")):
        shutil.copyfile(f, out / f.name)
        with open(out / f.name, "rb") as handle:
            os.fsync(handle.fileno())
    return {}


def child_convert(hf: Path, out: Path) -> dict:
    from sr_jax.convert.hf_import import convert_hf_to_jax

    convert_hf_to_jax(hf, out, "bfloat16")
    return {"out_bytes": sum(p.stat().st_size for p in out.rglob("*") if p.is_file())}


def child_load(path: Path) -> dict:
    import jax

    from sr_jax.convert.loading import load_model

    model = load_model(path, "bfloat16")
    jax.block_until_ready(jax.tree.leaves(model))
    return {}


def run_child(*args: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"child {args} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def child_main(kind: str, hf: str, out: str | None) -> None:
    start = time.perf_counter()
    if kind == "write":
        result = {"ckpt_bytes": write_checkpoint(Path(hf), int(out.split(",")[0]), int(out.split(",")[1]))}
    elif kind == "read":
        result = child_bare_read(Path(hf))
    elif kind == "copy":
        result = child_copy(Path(hf), Path(out))
    elif kind == "convert":
        result = child_convert(Path(hf), Path(out))
    else:
        result = child_load(Path(hf))
    result["seconds"] = time.perf_counter() - start
    result["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=10, help="decoder layers (~100 MB each in bf16)")
    parser.add_argument("--shard-mb", type=int, default=500)
    parser.add_argument("--workdir", default="/tmp/sr_jax_bench_convert")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint and output")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, hf, *out = args.child
        return child_main(kind, hf, out[0] if out else None)

    work = Path(args.workdir)
    if work.exists():
        shutil.rmtree(work)
    hf, out = work / "hf", work / "jax"
    try:
        # Everything heavy runs in children: Linux carries a parent's peak RSS over fork+exec into
        # the child's ru_maxrss, so this process must stay small for the children's figures to hold.
        written = run_child("write", str(hf), f"{args.layers},{args.shard_mb * 1024**2}")
        ckpt = written["ckpt_bytes"]
        print(f"synthetic checkpoint: {ckpt / GiB:.2f} GiB in {len(list(hf.glob('*.safetensors')))} shards "
              f"(written in {written['seconds']:.0f}s)")
        runs = {"bare safetensors read": run_child("read", str(hf)),
                "file copy + fsync": run_child("copy", str(hf), str(work / "copy")),
                "convert hf-to-jax": run_child("convert", str(hf), str(out)),
                "load_model(hf dir)": run_child("load", str(hf)),
                "load_model(converted)": run_child("load", str(out))}
        for name, r in runs.items():
            print(f"{name:22s} {r['seconds']:7.1f}s  {ckpt / 1e6 / r['seconds']:7.0f} MB/s  "
                  f"peak RSS {r['peak_rss'] / GiB:5.2f} GiB = {r['peak_rss'] / ckpt:4.2f} x checkpoint")
        conv = runs["convert hf-to-jax"]
        print(f"convert time / bare read: {conv['seconds'] / runs['bare safetensors read']['seconds']:.1f}x, "
              f"/ file copy: {conv['seconds'] / runs['file copy + fsync']['seconds']:.1f}x; "
              f"output {conv['out_bytes'] / GiB:.2f} GiB")
        limit = 1.1 * ckpt + GiB
        verdict = "OK" if conv["peak_rss"] <= limit else "OVER"
        print(f"memory goal: convert peak RSS <= 1.1 x checkpoint + 1 GiB = {limit / GiB:.2f} GiB: {verdict}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
