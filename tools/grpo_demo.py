"""Issue 7's before/after check: held-out verifiable rewards of the starting model, a GRPO run
within a wall-clock budget, then the same rewards of the trained model.

    python tools/grpo_demo.py --config configs/rl/learn_synthetic_cpu.yaml --budget 1200
    python tools/grpo_demo.py --config configs/rl/learn_synthetic_cpu.yaml --model DIR   # evaluate only
    python tools/grpo_demo.py --config configs/rl/learn_synthetic_cpu.yaml --skip-train  # re-evaluate a run

Held-out prompts are synthetic SC examples of the validation split (a random stream the training
split never uses), with the image sizes, pixel limits and prompt templates of the config. Answers
are greedy (`grpo.max_completion_tokens` new tokens) and scored by the GRPO reward functions:
iou (Hungarian matching, no boxes on both sides = 1), empty_list, format, score_error; plus the
parse rate. `--samples K` adds the same rewards of K sampled answers per prompt drawn with the
rollout settings (temperature, top-p, top-k, repetition penalty; fixed seeds): the expected
reward of the policy GRPO optimises, on prompts it never trained on. Also printed: the rollouts'
own mean reward, IoU reward and KL over the first and last steps of the run. The report goes to
`<run.out_dir>/grpo_demo.json`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

METRICS = ("iou", "empty_list", "format", "score_error", "parse_rate")


def evaluate(model_dir: str, cfg, n: int, *, seed: int = 20261128, batch_size: int = 8, samples: int = 0) -> dict:
    """Mean held-out reward per function (and parse rate) of the model in `model_dir`: greedy
    answers, and with `samples` > 0 also under `"sampled"` those of `samples` draws per prompt."""
    from sr_jax.data.pipeline import SyntheticSource
    from sr_jax.data.processor import Processor
    from sr_jax.data.synthetic import generate_example
    from sr_jax.generation import generate
    from sr_jax.convert.loading import load_model
    from sr_jax.rl.rewards import RewardSet, build_reward
    from sr_jax.rl.rollout import (_pixels, completion_mask, decode_completions, left_pad, parse_completions,
                                   sample_completions)

    source = SyntheticSource(cfg.data.sources[0])
    model = load_model(model_dir)
    tokenizer = model_dir if (Path(model_dir) / "tokenizer.json").is_file() else None
    processor = Processor(tokenizer, min_pixels=cfg.data.min_pixels, max_pixels=cfg.data.max_pixels,
                          templates=cfg.data.templates)
    records = [generate_example(i, seed, "validation", source.config) for i in range(n)]
    rewards = RewardSet([(name, 1.0, build_reward(name)) for name in METRICS if name != "parse_rate"])

    def score(recs, texts) -> dict:
        parsed = parse_completions(recs, texts)
        _, per = rewards.score(recs, texts, parsed)
        out = {name: float(np.nanmean(v)) for name, v in per.items()}
        out["parse_rate"] = float(np.mean([p["parsed"] for p in parsed]))
        out["answers"] = len(texts)
        return out

    texts, drawn = [], []
    for start in range(0, n, batch_size):
        prompts = [processor.encode(r, with_target=False) for r in records[start:start + batch_size]]
        ids, mask = left_pad(prompts)
        pixels, grids = _pixels(prompts)
        tokens = generate(model, ids, mask, pixels, grids, max_new_tokens=cfg.grpo.max_completion_tokens,
                          temperature=0.0, stop_ids=cfg.grpo.stop_ids)
        texts += decode_completions(processor.tokenizer, tokens, completion_mask(tokens, cfg.grpo.stop_ids))
        if samples:
            repeated = [p for p in prompts for _ in range(samples)]
            tokens = sample_completions(model, repeated, cfg.grpo, seed=seed + start)
            drawn += decode_completions(processor.tokenizer, tokens, completion_mask(tokens, cfg.grpo.stop_ids))
    out = score(records, texts)
    out["first_answer"] = texts[0]
    if samples:
        out["sampled"] = score([r for r in records for _ in range(samples)], drawn)
    return out


def rollout_trend(metrics_file: Path, keys=("reward", "reward/iou", "kl"), window: int = 10) -> tuple[dict, int]:
    """(key -> (mean over the first, mean over the last `window` GRPO steps), the window used)."""
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    w = max(1, min(window, len(rows) // 2))
    return {k: (float(np.mean([r[k] for r in rows[:w]])), float(np.mean([r[k] for r in rows[-w:]])))
            for k in keys}, w


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/rl/learn_synthetic_cpu.yaml")
    ap.add_argument("--model", help="only evaluate this model directory")
    ap.add_argument("--budget", type=float, default=1200.0, help="GRPO wall-clock seconds")
    ap.add_argument("--n", type=int, default=48, help="held-out prompts")
    ap.add_argument("--samples", type=int, default=0,
                    help="also score this many answers per prompt sampled with the rollout settings")
    ap.add_argument("--skip-train", action="store_true", help="re-evaluate the run in run.out_dir without training")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = ap.parse_args()

    from sr_jax.config import load_config
    from sr_jax.rl.config import RLConfig
    from sr_jax.rl.trainer import train

    cfg = load_config(RLConfig, args.config, [f"run.max_seconds={args.budget}"] + args.overrides)
    if args.model:
        print(json.dumps(evaluate(args.model, cfg, args.n, samples=args.samples), indent=2))
        return
    if not cfg.model.init_from or not Path(cfg.model.init_from).is_dir():
        raise SystemExit(f"model.init_from={cfg.model.init_from!r} is not a model directory: train it first "
                         "(python tools/learning_check.py for the default config)")
    run_dir = Path(cfg.run.out_dir)
    before = evaluate(cfg.model.init_from, cfg, args.n, samples=args.samples)
    t0 = time.perf_counter()
    summary = {"step": None, "model_dir": str(run_dir / "model")} if args.skip_train else train(cfg)
    train_s = time.perf_counter() - t0
    after = evaluate(summary["model_dir"], cfg, args.n, samples=args.samples) if Path(summary.get("model_dir", "")).is_dir() else None
    trend, window = rollout_trend(run_dir / "metrics.jsonl")

    print(f"\nheld-out SC prompts: {args.n}; GRPO steps this call: {summary['step']} ({train_s / 60:.1f} min)")
    print(f"{'held-out':<14}{'before':>10}{'after':>10}")
    for m in METRICS:
        print(f"{m:<14}{before[m]:>10.3f}" + (f"{after[m]:>10.3f}" if after else f"{'-':>10}"))
    if args.samples:
        print(f"{'sampled x' + str(args.samples):<14}{'before':>10}{'after':>10}")
        for m in METRICS:
            b = before["sampled"][m]
            print(f"{m:<14}{b:>10.3f}" + (f"{after['sampled'][m]:>10.3f}" if after else f"{'-':>10}"))
    print(f"rollouts (first vs last {window} steps): " + ", ".join(f"{k} {a:.3f} -> {b:.3f}" for k, (a, b) in trend.items()))
    report = {"before": before, "after": after, "train_seconds": train_s, "steps": summary["step"],
              "rollout_trend": trend, "config": args.config, "overrides": args.overrides,
              "init_from": cfg.model.init_from}
    out = run_dir / "grpo_demo.json"
    out.write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
