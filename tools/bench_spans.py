"""Attention spans on a training config's own packed batches: sr_jax's train step with the spans
`sr_jax.train.step.attention_spans` measures (the portable kernels skip the key blocks no packed
segment or image reaches) vs the same step over whole rows and patch budgets. Same batches,
same initial weights, one run; prints the step times, the speed-up, the spans and the largest
loss difference between the two (they compute the same function).

    python tools/bench_spans.py [--config configs/sft/learn_stage3_sc_single.yaml] [--steps 20] [KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/sft/learn_stage3_sc_single.yaml")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per variant (after one warm-up pass)")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = ap.parse_args(argv)

    import jax

    from sr_jax.config import load_config
    from sr_jax.data.packing import model_inputs
    from sr_jax.train.metrics import measured_matmul_peak
    from sr_jax.train.sft import SFTConfig, SFTStage
    from sr_jax.train.step import attention_spans, stack_microbatches

    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(SFTConfig, args.config, [f"run.out_dir={out}", "model.init_from=null"] + args.overrides)
        stage = SFTStage(cfg)
        k = cfg.train.grad_accum_steps
        batches = [stack_microbatches([model_inputs(next(stage.iterator)) for _ in range(k)]) for _ in range(args.steps)]
        spans = [attention_spans(b) for b in batches]
        results = {}
        initial = stage.trainer.init_state()  # the steps donate their state: each variant starts from a copy
        for name, use in (("whole rows", False), ("attention spans", True)):
            state = jax.tree.map(lambda x: x.copy(), initial)
            losses, times = [], []
            for timed in (False, True):  # the first pass compiles every span bucket the batches use
                for batch, s in zip(batches, spans):
                    t0 = time.perf_counter()
                    state, metrics = stage.trainer.step(state, batch, spans=s if use else (None, None))
                    loss = float(jax.device_get(metrics["loss"]))
                    if timed:
                        times.append(time.perf_counter() - t0)
                    else:
                        losses.append(loss)
            results[name] = (float(np.median(times)), losses)
    (t_whole, l_whole), (t_span, l_span) = results["whole rows"], results["attention spans"]
    diff = max(abs(a - b) / max(abs(b), 1e-6) for a, b in zip(l_span, l_whole))
    buckets = sorted({s for s in spans}, key=str)
    print(f"{args.config}: {args.steps} batches, spans (text, vision) {buckets}; "
          f"float32 matmul peak {measured_matmul_peak() / 1e9:.0f} GFLOP/s")
    print(f"{'attention':<18} {'step s (median)':>16}")
    print(f"{'whole rows':<18} {t_whole:>16.3f}")
    print(f"{'attention spans':<18} {t_span:>16.3f}")
    print(f"speed-up {t_whole / t_span:.2f}x; largest relative loss difference over the first pass {diff:.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
