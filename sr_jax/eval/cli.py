"""`sr-jax eval {mer,editreward,mmrb2,synthetic} --model DIR --data PATH --out DIR`.

Every host of a multi-host job runs the same command; each scores its share of the jobs
(`--process-index/--process-count`, by default JAX's) into its own cache file, and host 0 writes
the report once all shares are in (after a barrier when JAX runs distributed). `--merge` only
aggregates what the cache holds (no model needed).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from sr_jax.config import load_config
from sr_jax.eval.benchmarks import BENCHMARKS, load_benchmark, parse_synthetic_spec
from sr_jax.eval.runner import run
from sr_jax.eval.tables import BenchmarkError


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a SpatialReward model on a benchmark (resumable, shardable)")
    p.add_argument("benchmark", choices=BENCHMARKS)
    p.add_argument("--model", help="HF checkpoint dir or converted sr_jax dir (not needed with --merge)")
    p.add_argument("--data", required=True,
                   help="local benchmark copy (file or folder); synthetic: synthetic:N[:SEED] or ArrayRecord path(s)")
    p.add_argument("--out", required=True, help="output folder: cache, results.json, report.md, plot.png")
    p.add_argument("--limit", type=int, default=None, help="only the first N records")
    p.add_argument("--batch-size", type=int, default=4, help="edits scored per call (each makes an SC and a PQ prompt)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any ScorerOptions field; eval defaults: max_new_tokens=4096, parse_mode=official_eval")
    p.add_argument("--process-index", type=int, default=None, help="this host (default: jax.process_index())")
    p.add_argument("--process-count", type=int, default=None, help="number of hosts (default: jax.process_count())")
    p.add_argument("--merge", action="store_true", help="no scoring: aggregate the cached results of all hosts")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_eval_command)


# Evaluation defaults that differ from the scorer's: the official evaluation scripts let an answer
# run to 4096 new tokens and read it with their own fallbacks, so a score file from the official
# checkpoint gives the published numbers. `--set` overrides either.
EVAL_DEFAULTS = {"max_new_tokens": 4096, "parse_mode": "official_eval"}


def _scorer_options(overrides: list[str], batch_size: int):
    from sr_jax.reward.scorer import ScorerOptions

    opts = load_config(ScorerOptions, None, overrides)
    given = {o.partition("=")[0].strip() for o in overrides}
    defaults = {k: v for k, v in EVAL_DEFAULTS.items() if k not in given}
    if "batch_size" not in given:
        defaults["batch_size"] = 2 * batch_size  # one generate call per batch of edits
    return dataclasses.replace(opts, **defaults).validate()


def _hosts(args) -> tuple[int, int, bool]:
    if args.process_index is not None and args.process_count is not None:
        return args.process_index, args.process_count, False
    import jax

    index = jax.process_index() if args.process_index is None else args.process_index
    count = jax.process_count() if args.process_count is None else args.process_count
    return index, count, jax.process_count() > 1


def _eval_command(args) -> int:
    if args.batch_size < 1:
        raise SystemExit("--batch-size must be >= 1")
    if not args.merge and not args.model:
        raise SystemExit("--model is required (unless --merge)")
    opts = _scorer_options(args.set, args.batch_size)
    reward_options = opts.weights.options()
    data = args.data if parse_synthetic_spec(args.data) else str(Path(args.data).resolve())
    out = Path(args.out)
    try:
        bench = load_benchmark(args.benchmark, data, args.limit, reward_options)
        if args.merge:
            stored = out / "run.json"
            if not stored.is_file():
                raise BenchmarkError(f"{out} has no run.json: nothing to merge")
            config = json.loads(stored.read_text(encoding="utf-8"))
            if (config.get("benchmark"), config.get("data")) != (args.benchmark, data):
                raise BenchmarkError(f"{stored} is for {config.get('benchmark')} on {config.get('data')}")
            summary = run(bench, lambda: None, out, config=config, score=False, title=f"{args.benchmark} evaluation")
            return 0 if summary is not None else 1
        index, count, distributed = _hosts(args)
        options = {f.name: getattr(opts, f.name) for f in dataclasses.fields(opts) if f.name != "batch_size"}
        config = {"benchmark": args.benchmark, "data": data, "model": str(Path(args.model).resolve()),
                  "scorer_options": dataclasses.asdict(opts) | {"batch_size": None}}

        def make_scorer():
            from sr_jax.reward.scorer import Scorer

            return Scorer.from_pretrained(args.model, batch_size=opts.batch_size, **options)

        def barrier():
            if distributed:
                from jax.experimental import multihost_utils

                multihost_utils.sync_global_devices("sr_jax eval: all shards scored")

        summary = run(bench, make_scorer, out, config=config, process_index=index, process_count=count,
                      batch_size=args.batch_size, progress=not args.no_progress, barrier=barrier,
                      title=f"{args.benchmark} evaluation")
    except BenchmarkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if summary is not None:
        print(json.dumps(summary["overall"], indent=2))
        cut = summary["overall"].get("truncated_answers")
        if cut:
            print(f"warning: {cut} answer(s) reached max_new_tokens={opts.max_new_tokens} before finishing; "
                  "they are scored as read (see truncated_answers in the report)", file=sys.stderr)
        print(f"report: {out / 'report.md'}", file=sys.stderr)
    return 0
