"""Benchmark evaluation: loaders (`benchmarks`), metrics, the resumable sharded runner, `sr-jax eval`.

`evaluate_synthetic(scorer, examples)` scores SpatialExamples with ground truth and returns the
synthetic-benchmark metrics without any files; `evaluate(bench, scorer)` does the same for any
loaded benchmark. A scorer is anything with `score(originals, edited, instructions)` returning
`sr_jax.reward.scorer.Scorer`-style result dicts (PQ-only items also need `score_pq(edited)` unless it is
a real `Scorer`).
"""

from sr_jax.eval.benchmarks import (
    BENCHMARKS, EditRewardBench, Job, MERBench, MMRB2Bench, SyntheticBench, load_benchmark,
)
from sr_jax.eval.runner import evaluate, evaluate_synthetic, run, score_jobs
from sr_jax.eval.tables import BenchmarkError

__all__ = [
    "BENCHMARKS", "BenchmarkError", "EditRewardBench", "Job", "MERBench", "MMRB2Bench", "SyntheticBench",
    "evaluate", "evaluate_synthetic", "load_benchmark", "run", "score_jobs",
]
