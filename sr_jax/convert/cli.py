"""`sr-jax convert hf-to-jax|jax-to-hf` and `sr-jax verify`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from sr_jax.convert.hf_export import export_hf
from sr_jax.convert.hf_import import CheckpointError, convert_hf_to_jax
from sr_jax.convert.loading import load_model
from sr_jax.convert.orbax_io import MARKER
from sr_jax.convert.verify import DEFAULT_THRESHOLDS, run_verify

DTYPES = ("float32", "bfloat16")


def register(subparsers) -> None:
    convert = subparsers.add_parser("convert", help="convert checkpoints")
    kinds = convert.add_subparsers(dest="convert_kind", required=True)
    to_jax = kinds.add_parser("hf-to-jax", help="Hugging Face Qwen3-VL checkpoint -> sr_jax Orbax directory")
    to_jax.add_argument("--hf", required=True, help="HF checkpoint directory (config.json + weights)")
    to_jax.add_argument("--out", required=True, help="output directory (appears only when complete)")
    to_jax.add_argument("--dtype", choices=DTYPES + ("float16",), default=None,
                        help="stored parameter dtype (default: the dtype in config.json, else float32)")
    to_jax.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    to_jax.add_argument("--allow-nonfinite", action="store_true",
                        help="convert weights holding NaN/Inf (listed as a warning) instead of refusing them")
    to_jax.set_defaults(func=run_convert)

    to_hf = kinds.add_parser("jax-to-hf", help="sr_jax model or training checkpoint -> Hugging Face directory")
    to_hf.add_argument("--ckpt", required=True, help="converted sr_jax directory or a training checkpoint")
    to_hf.add_argument("--out", required=True, help="output directory (appears only when complete)")
    to_hf.add_argument("--merge-lora", action="store_true", help="fold LoRA adapters into the base weights")
    to_hf.add_argument("--dtype", choices=DTYPES + ("float16",), default=None,
                       help="exported dtype (default: the stored parameter dtype)")
    to_hf.add_argument("--max-shard-size", default="5GB", help="shard cap, e.g. 5GB, 500MB")
    to_hf.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    to_hf.set_defaults(func=run_export)

    verify = subparsers.add_parser("verify", help="compare our model's logits with the HF PyTorch model")
    verify.add_argument("--hf", required=True, help="HF checkpoint directory (the reference)")
    verify.add_argument("--jax", default=None, help="converted directory (default: import --hf directly)")
    verify.add_argument("--dtype", choices=DTYPES, default="float32", help="our parameter/compute dtype")
    verify.add_argument("--device", default=None, help="JAX platform for our model, e.g. cpu (default: JAX's)")
    verify.add_argument("--atol", type=float, default=None, help="max abs logit error (default: unchecked)")
    verify.add_argument("--rtol", type=float, default=None, help="max abs error / max |HF logit|")
    verify.add_argument("--max-kl", type=float, default=None, help="max mean KL(HF || ours)")
    verify.add_argument("--min-agreement", type=float, default=None, help="min greedy agreement, 0..1")
    verify.set_defaults(func=run_verify_command)


def run_convert(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    try:
        out = convert_hf_to_jax(args.hf, args.out, args.dtype, overwrite=args.overwrite,
                                allow_nonfinite=args.allow_nonfinite)
    except (CheckpointError, FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out} in {time.perf_counter() - start:.1f}s")
    return 0


def parse_size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    t = text.strip().upper()
    for unit, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * factor)
    return int(t)


def load_checkpoint_model(path: str | Path, *, merge_lora: bool = False):
    """(model, directory holding tokenizer/processor files) for export.

    `path` is a training run (`sr_jax.train.loop.model_from_checkpoint`), a converted sr_jax
    directory or a HF directory.
    """
    from sr_jax.train.checkpoint import is_train_checkpoint  # JAX: `sr-jax convert hf-to-jax` runs without it
    from sr_jax.train.loop import model_from_checkpoint

    path = Path(path)
    if is_train_checkpoint(path):
        return model_from_checkpoint(path, merge_lora=merge_lora)
    model = load_model(path)
    if merge_lora:
        raise CheckpointError(f"{path}: --merge-lora needs a training checkpoint with LoRA adapters; this "
                              "directory holds plain weights")
    return model, path


def run_export(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    try:
        model, sidecar_dir = load_checkpoint_model(args.ckpt, merge_lora=args.merge_lora)
        out = export_hf(model, args.out, dtype=args.dtype, max_shard_bytes=parse_size(args.max_shard_size),
                        sidecar_dir=sidecar_dir, overwrite=args.overwrite)
    except (CheckpointError, FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out} in {time.perf_counter() - start:.1f}s")
    return 0


def run_verify_command(args: argparse.Namespace) -> int:
    limits = DEFAULT_THRESHOLDS[args.dtype]
    overrides = {"max_rel": args.rtol, "max_kl": args.max_kl, "min_agreement": args.min_agreement,
                 "max_abs": args.atol}
    limits = dataclasses.replace(limits, **{k: v for k, v in overrides.items() if v is not None})
    if args.jax and args.dtype == "float32" and _stored_dtype(args.jax) not in (None, "float32"):
        print(f"note: {args.jax} stores {_stored_dtype(args.jax)} parameters; float32 thresholds assume "
              "float32 weights (try --dtype bfloat16)")
    try:
        report = run_verify(args.hf, args.jax, args.dtype, args.device)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(report.summary())
    failures = report.failures(limits)
    for failure in failures:
        print(f"FAIL: {failure}")
    if not failures:
        print(f"OK ({args.dtype} thresholds: {limits})")
    return 1 if failures else 0


def _stored_dtype(directory: str) -> str | None:
    marker = Path(directory) / MARKER
    return json.loads(marker.read_text()).get("param_dtype") if marker.is_file() else None
