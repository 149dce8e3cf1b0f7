"""Issue 8: does the whole loop learn? Train a small SpatialReward from scratch on synthetic
spatial edits within a wall-clock budget, then evaluate it on held-out examples (unseen seeds).

    python tools/learning_check.py                       # 30-minute CPU budget (the default)
    python tools/learning_check.py --budget 600 --eval-examples 60 run.out_dir=runs/lc_quick

Prints parse rate, mean IoU (Hungarian matching, empty-vs-empty = 1), box recall at IoU 0.5,
score MAE for each score, Spearman of the reward against the ground-truth reward, and the same
for two trivial baselines, and the held-out answer loss with the true images and with blank ones
(equal losses = the model ignores its images); writes the loss curve and a picture of held-out examples (true boxes
green, predicted red) next to a JSON report. A second run in the same out_dir resumes training
(or, with --skip-train, only re-evaluates).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

GOALS = {"parse_rate": (">=", 1.0), "mean_iou": (">=", 0.5), "mae_success": ("<=", 3.0),
         "mae_overediting": ("<=", 3.0), "mae_naturalness": ("<=", 3.0), "mae_artifacts": ("<=", 3.0),
         "reward_spearman": (">=", 0.7)}


def _fmt(v):
    return "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))


def draw_examples(scorer, examples, path: Path, n: int = 6) -> None:
    from PIL import Image, ImageDraw

    from sr_jax.data.image import open_image

    sc = [ex for ex in examples if ex.task == "sc"][:n]
    if not sc:
        return  # nothing to box (an image-quality-only run)
    results = scorer.score([[open_image(b) for b in ex.images[:-1]] for ex in sc],
                           [open_image(ex.images[-1]) for ex in sc], [ex.instruction for ex in sc])
    scale = 2
    tiles = []
    for ex, r in zip(sc, results):
        img = open_image(ex.images[-1]).convert("RGB")
        w, h = img.size
        img = img.resize((w * scale, h * scale), Image.NEAREST)
        draw = ImageDraw.Draw(img)
        for boxes, colour in ((ex.edit_region, (0, 200, 0)), (r["edit_region"], (230, 0, 0))):
            for reg in boxes:
                b = reg.bbox_2d if hasattr(reg, "bbox_2d") else reg["bbox_2d"]
                draw.rectangle([b[0] * w * scale / 1000, b[1] * h * scale / 1000,
                                b[2] * w * scale / 1000, b[3] * h * scale / 1000], outline=colour, width=2)
        tiles.append(img)
    width = sum(t.width for t in tiles) + 8 * (len(tiles) + 1)
    height = max(t.height for t in tiles) + 16
    sheet = Image.new("RGB", (width, height), "white")
    x = 8
    for t in tiles:
        sheet.paste(t, (x, 8))
        x += t.width + 8
    sheet.save(path)


def image_reliance(model, data_cfg, source: str, tokenizer: str) -> dict:
    """Held-out teacher-forced loss with the true images and with every image blanked (all patches
    at the normalised value 0, a flat grey): a model that reads its images loses accuracy without
    them; one that answers from the text prior alone scores the same either way."""
    import dataclasses

    import jax

    from sr_jax.data.packing import model_inputs
    from sr_jax.data.pipeline import DataPipeline
    from sr_jax.train.config import LossConfig
    from sr_jax.train.step import forward_loss

    cfg = dataclasses.replace(data_cfg, sources=[source], shuffle=False, num_epochs=1, workers=0, tokenizer=tokenizer)
    loss_cfg = LossConfig(max_label_tokens=max(cfg.seq_lens) * cfg.batch_size)
    run = jax.jit(lambda b: forward_loss(model, b, loss_cfg))
    totals = {"true images": [0.0, 0.0], "blank images": [0.0, 0.0]}
    for batch in DataPipeline(cfg, vision=model.config.vision):
        inputs = model_inputs(batch)
        blank = {**inputs, "pixel_values": np.zeros_like(inputs["pixel_values"])}
        for name, b in (("true images", inputs), ("blank images", blank)):
            stats = run(b)
            totals[name][0] += float(stats.loss_sum)
            totals[name][1] += float(stats.weight)
    return {name: s / max(w, 1.0) for name, (s, w) in totals.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/sft/learn_synthetic_cpu.yaml")
    ap.add_argument("--budget", type=float, default=1800.0, help="training wall-clock seconds")
    ap.add_argument("--eval-examples", type=int, default=100)
    ap.add_argument("--eval-seed", type=int, default=20261123, help="held-out seed (never used in training)")
    ap.add_argument("--max-new-tokens", type=int, default=192)
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = ap.parse_args()

    from sr_jax.config import load_config
    from sr_jax.data.pipeline import SyntheticSource
    from sr_jax.data.processor import Processor
    from sr_jax.data.synthetic import generate_examples
    from sr_jax.eval import evaluate_synthetic
    from sr_jax.convert.loading import load_model
    from sr_jax.reward.scorer import Scorer, ScorerOptions
    from sr_jax.train.metrics import plot_metrics
    from sr_jax.train.sft import SFTConfig, train

    cfg = load_config(SFTConfig, args.config, [f"run.max_seconds={args.budget}"] + args.overrides)
    out = Path(cfg.run.out_dir)
    t0 = time.perf_counter()
    summary = None if args.skip_train else train(cfg)
    train_s = time.perf_counter() - t0

    data = cfg.data
    synth = SyntheticSource(data.sources[0]).config  # held-out examples follow the training mix
    processor = Processor(out / "tokenizer", data.min_pixels, data.max_pixels, templates=data.templates)
    options = ScorerOptions(max_new_tokens=args.max_new_tokens, batch_size=16, grounding=False,
                            min_pixels=data.min_pixels, max_pixels=data.max_pixels, templates=data.templates)
    scorer = Scorer(load_model(out / "model"), processor, options)
    examples = list(generate_examples(args.eval_examples, seed=args.eval_seed, split="test", config=synth))
    t1 = time.perf_counter()
    result = evaluate_synthetic(scorer, examples, batch_size=8)
    eval_s = time.perf_counter() - t1

    held_out = (f"synthetic:n={args.eval_examples},seed={args.eval_seed},split=test,min_side={synth.image_size[0]},"
                f"max_side={synth.image_size[1]},tasks={'+'.join(synth.tasks)},pq_fraction={synth.pq_fraction}")
    reliance = image_reliance(scorer.model, data, held_out, str(out / "tokenizer"))  # the same examples

    table = result["tables"]["model vs baselines"]
    metrics = ["parse_rate", "mean_iou", "box_recall", "box_precision", "mae_success", "mae_overediting",
               "mae_naturalness", "mae_artifacts", "reward_spearman"]
    print(f"\nheld-out synthetic examples: {len(examples)} (seed {args.eval_seed}); training {train_s / 60:.1f} min, "
          f"evaluation {eval_s / 60:.1f} min")
    names = list(table)
    print(f"{'metric':<18}" + "".join(f"{n[:26]:>28}" for n in names) + f"{'goal':>10}")
    for m in metrics:
        goal = GOALS.get(m)
        print(f"{m:<18}" + "".join(f"{_fmt(table[n].get(m)):>28}" for n in names)
              + (f"{goal[0] + ' ' + str(goal[1]):>10}" if goal else ""))
    print(f"held-out answer loss (teacher forced): {reliance['true images']:.4f} with the true images, "
          f"{reliance['blank images']:.4f} with blank images")
    model = table[names[0]]
    met = {m: (model.get(m) is not None and (model[m] >= g if op == ">=" else model[m] <= g))
           for m, (op, g) in GOALS.items()}
    print("goals met: " + ", ".join(f"{m} {'yes' if ok else 'no'}" for m, ok in met.items()))

    plot_metrics(out / "metrics.jsonl", out / "loss_curve.png")
    draw_examples(scorer, examples, out / "heldout_examples.png")  # SC examples only
    report = {"train_summary": summary, "train_seconds": train_s, "eval_seconds": eval_s,
              "eval_examples": len(examples), "eval_seed": args.eval_seed, "table": table, "goals_met": met,
              "image_reliance": reliance,
              "config": args.config, "overrides": args.overrides}
    (out / "learning_check.json").write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {out / 'learning_check.json'}, {out / 'loss_curve.png'}, {out / 'heldout_examples.png'}")


if __name__ == "__main__":
    main()
