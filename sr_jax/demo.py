"""`sr-jax demo`: the main job end to end on this machine, small enough for a CPU.

1. data     synthesise spatial-edit examples (train / validation) into ArrayRecord files
2. model    a tiny random Qwen3-VL exported as a Hugging Face checkpoint, imported back with
            `convert hf-to-jax`, both copies compared; with PyTorch installed, the parity report
            against `transformers` on the same weights
3. train    SFT of the tiny model on the synthetic examples (`configs/sft/demo_cpu.yaml`), with
            checkpoints, metrics and a loss-curve PNG
4. score    SpatialReward scoring of held-out edits with the trained model (SC + PQ prompts,
            parsing, reward, pixel grounding)
5. export   the trained model back to a Hugging Face directory (`convert jax-to-hf`)
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np

from sr_jax.config import load_config
from sr_jax.convert.hf_export import export_hf
from sr_jax.convert.loading import load_model
from sr_jax.convert.verify import run_verify
from sr_jax.data.image import open_image
from sr_jax.data.storage import ArrayRecordSource, write_array_record
from sr_jax.data.synthetic import generate_examples
from sr_jax.data.tokenizer import load_tokenizer
from sr_jax.train.metrics import plot_metrics, read_metrics


def register(sub) -> None:
    p = sub.add_parser("demo", help="run the main job end to end on a tiny model (CPU friendly)")
    p.add_argument("--workdir", default="runs/demo", help="where data, checkpoints and reports go")
    p.add_argument("--examples", type=int, default=200, help="synthetic training examples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-steps", type=int, default=40, help="SFT steps of the tiny model")
    p.set_defaults(func=run)


def _step(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def _done(t0: float) -> None:
    print(f"   ({time.perf_counter() - t0:.1f} s)", flush=True)


def run(args: argparse.Namespace) -> int:
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)

    t0 = _step("1. data: synthetic spatial-edit examples")
    data = work / "data"
    data.mkdir(exist_ok=True)
    splits = {"train": args.examples, "validation": max(4, args.examples // 10)}
    for split, n in splits.items():
        write_array_record(data / f"{split}.array_record",
                           generate_examples(n, seed=args.seed, split=split, image_size=(96, 160)))
    train = ArrayRecordSource([data / "train.array_record"])
    val = ArrayRecordSource([data / "validation.array_record"])
    kinds = {}
    for i in range(len(train)):
        ex = train[i]
        key = ex.task if ex.task == "pq" else f"sc/{ex.meta.get('edit_type', '?')}"
        kinds[key] = kinds.get(key, 0) + 1
    print(f"   {len(train)} train / {len(val)} validation examples in {data}")
    print("   " + ", ".join(f"{k}: {v}" for k, v in sorted(kinds.items())))
    print(f"   example target: {val[0].target_json()[:160]}...")
    _done(t0)

    t0 = _step("2. model: HF checkpoint -> sr_jax, parity")
    from sr_jax.cli import main as cli  # sr_jax.cli imports this module to register `sr-jax demo`
    from sr_jax.models.qwen3_vl import ModelConfig, init_model

    hf_dir, jax_dir = work / "tiny_hf", work / "tiny_jax"
    model = init_model(ModelConfig.preset("tiny"), seed=args.seed)
    export_hf(model, hf_dir, overwrite=True)
    load_tokenizer(None).save_tokenizer_dir(hf_dir)
    print(f"   wrote a Hugging Face checkpoint: {hf_dir}")
    cli(["convert", "hf-to-jax", "--hf", str(hf_dir), "--out", str(jax_dir), "--overwrite"])
    from_hf, from_jax = load_model(hf_dir), load_model(jax_dir)
    ids = np.random.default_rng(args.seed).integers(0, 150000, (1, 24))
    diff = float(np.abs(np.asarray(from_hf(ids)) - np.asarray(from_jax(ids))).max())
    print(f"   HF-dir model vs converted-dir model: max |logit diff| = {diff:.3g}")
    try:
        import torch  # noqa: F401
    except ImportError:
        print("   (PyTorch not installed: skipping the transformers parity report; `pip install -e .[test]`)")
    else:
        report = run_verify(hf_dir, jax_dir)
        print(f"   parity vs transformers (PyTorch): {report.summary()}")
    _done(t0)

    t0 = _step("3. train: SFT of the tiny model on the synthetic examples")
    from sr_jax.train.sft import SFTConfig, train

    run_dir = work / "sft"
    # A fresh run every time: a finished run left by an earlier demo would resume at its last step
    # and train nothing (and save no model).
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = load_config(SFTConfig, Path(__file__).resolve().parents[1] / "configs" / "sft" / "demo_cpu.yaml", [
        f"run.out_dir={run_dir}", f"run.total_steps={args.train_steps}", "run.checkpoint_every=20",
        f"data.sources=['{data / 'train.array_record'}']", "data.batch_size=2", "data.seq_lens=[512]",
        "data.patch_budgets=[512]", "train.loss.max_label_tokens=1024", "run.num_devices=1",
        "run.progress_bar=false", "data.max_pixels=16384"])
    summary = train(cfg)
    rows = read_metrics(run_dir / "metrics.jsonl")
    first, last = rows[0], rows[-1]
    print(f"   {len(rows)} steps: loss {first['loss']:.3f} -> {last['loss']:.3f}, token accuracy "
          f"{first['token_accuracy']:.1%} -> {last['token_accuracy']:.1%}, {last['tokens_per_s']:.0f} tokens/s")
    print(f"   checkpoints in {run_dir / 'checkpoints'}; loss curve {plot_metrics(run_dir / 'metrics.jsonl', run_dir / 'loss_curve.png')}")
    _done(t0)

    t0 = _step("4. score: the trained model on held-out edits")
    from sr_jax.reward.scorer import Scorer

    scorer = Scorer.from_pretrained(summary["model_dir"], max_new_tokens=96, max_pixels=16384)
    items = [val[i] for i in range(len(val)) if val[i].task == "sc"][:2]
    results = scorer.score([[open_image(b) for b in ex.images[:-1]] for ex in items],
                           [open_image(ex.images[-1]) for ex in items], [ex.instruction for ex in items])
    for ex, r in zip(items, results):
        print(f"   {ex.id}: '{ex.instruction}'")
        print(f"      reward {r['reward']:.3f} (SC {r['sc']:.2f}, PQ {r['pq']:.2f}), parsed {r['parsed']}, "
              f"grounding {r['grounding']['grounding_score']:.2f}")
        print(f"      answer: {json.dumps(r['raw']['sc'][:100], ensure_ascii=False)}")
    print("   (a few CPU steps teach the answer's shape, not yet the judgement: see tools/learning_check.py)")
    _done(t0)

    t0 = _step("5. export: the trained model back to Hugging Face")
    hf_out = work / "sft_hf"
    cli(["convert", "jax-to-hf", "--ckpt", str(run_dir), "--out", str(hf_out), "--overwrite"])
    print(f"   {sorted(p.name for p in hf_out.iterdir())}")
    try:
        import torch
        from transformers import Qwen3VLForConditionalGeneration
    except ImportError:
        print("   (PyTorch not installed: skipping the reload with transformers)")
    else:
        trained = load_model(summary["model_dir"])
        back = Qwen3VLForConditionalGeneration.from_pretrained(hf_out, dtype=torch.float32).eval()
        with torch.no_grad():
            ref = back(input_ids=torch.as_tensor(ids)).logits.numpy()
        err = float(np.abs(np.asarray(trained(ids)) - ref).max())
        print(f"   transformers reloads it: max |logit diff| vs sr_jax = {err:.3g}")
    _done(t0)
    return 0
