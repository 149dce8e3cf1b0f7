"""Held-out verifiable rewards of a model directory: greedy answers to synthetic SC prompts of
the validation split, scored with the GRPO reward functions (mean per function).

    python tools/grpo_demo.py --model runs/demo_cpu/model --n 16 --max-new-tokens 48
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from sr_jax.data.processor import Processor
from sr_jax.data.synthetic import SynthConfig, generate_example
from sr_jax.generation import generate
from sr_jax.loading import load_model
from sr_jax.rl.rewards import RewardSet, build_reward
from sr_jax.rl.rollout import _pixels, completion_mask, decode_completions, left_pad, parse_completions


def evaluate(model_dir: str, n: int, max_new_tokens: int, *, seed: int = 0, min_side: int = 64, max_side: int = 96,
             max_pixels: int = 9216, batch_size: int = 8) -> dict:
    model = load_model(model_dir)
    processor = Processor(model_dir, min_pixels=3136, max_pixels=max_pixels)
    synth = SynthConfig(image_size=(min_side, max_side), tasks=("sc",))
    records = [generate_example(i, seed, "validation", synth) for i in range(n)]
    texts = []
    for start in range(0, n, batch_size):
        prompts = [processor.encode(r, with_target=False) for r in records[start:start + batch_size]]
        ids, mask = left_pad(prompts)
        pixels, grids = _pixels(prompts)
        tokens = generate(model, ids, mask, pixels, grids, max_new_tokens=max_new_tokens, temperature=0.0)
        texts += decode_completions(processor.tokenizer, tokens, completion_mask(tokens, (151645, 151643)))
    parsed = parse_completions(records, texts)
    rewards = RewardSet([(name, 1.0, build_reward(name)) for name in ("iou", "empty_list", "format", "score_error")])
    _, per = rewards.score(records, texts, parsed)
    out = {name: float(np.nanmean(v)) for name, v in per.items()}
    out["parse_rate"] = float(np.mean([p["parsed"] for p in parsed]))
    out["example"] = texts[0]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=48)
    args = p.parse_args()
    print(json.dumps(evaluate(args.model, args.n, args.max_new_tokens), indent=2))


if __name__ == "__main__":
    main()
