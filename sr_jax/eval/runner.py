"""Running a benchmark: scoring jobs in batches with a per-job cache, sharding, report and plot.

Layout of `--out DIR`:
  run.json                    what the cached results were computed with (benchmark, data, model,
                              scorer options); a different configuration in the same DIR is refused
  cache/scores-IIIII-of-NNNNN.jsonl
                              one line {"id": job id, "result": scorer result} per finished job,
                              appended and flushed batch by batch; host I of N writes only its
                              own file, and every file in cache/ counts as finished work, so a
                              restart (even with another host count) scores only what is missing
  results.json, items.jsonl, report.md, plot.png
                              written once every job has a result (by host 0 when sharded)
Jobs are split over hosts by position: host i takes jobs i, i+N, i+2N, ... of `job_ids()`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from tqdm import tqdm

from sr_jax.data.image import open_image
from sr_jax.data.records import SpatialExample
from sr_jax.eval.benchmarks import Benchmark, Job, SyntheticBench
from sr_jax.eval.tables import BenchmarkError
from sr_jax.reward import RewardWeights, aggregate, parse_output

CACHE_DIR = "cache"


# ---------------------------------------------------------------- scoring


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def score_pq_only(scorer, edited: Sequence[Any]) -> list[dict]:
    """PQ prompt alone for each image (no original exists). Uses `scorer.score_pq` when the scorer
    has one; a `sr_jax.reward.scorer.Scorer` is driven through its processor and generator."""
    if hasattr(scorer, "score_pq"):
        return list(scorer.score_pq(list(edited)))
    from sr_jax.reward.scorer import Scorer

    if not isinstance(scorer, Scorer):
        raise TypeError(f"{type(scorer).__name__} cannot score PQ-only items: give it a score_pq(edited) method")
    opts = scorer.options
    prompts = [scorer.processor.encode(SpatialExample(id=f"pq-{i}", task="pq", images=[open_image(im)]),
                                       with_target=False) for i, im in enumerate(edited)]
    out = []
    for text, cut in zip(*scorer.generate_answers(prompts, opts)):
        pq = parse_output(text, with_region=False, score_range=opts.score_range, mode=opts.parse_mode)
        top = [opts.score_range] * 2  # SC does not enter the PQ component
        _, _, pq_value = aggregate(top, pq["score"], opts.weights)
        out.append({"reward": None, "sc": None, "pq": pq_value, "sc_scores": None, "pq_scores": list(pq["score"]),
                    "edit_region": None, "reasoning": {"pq": pq["reasoning"]}, "grounding": None,
                    "parsed": {"pq": pq["parsed"]}, "truncated": {"pq": cut}, "raw": {"pq": text}})
    return out


def score_jobs(scorer, jobs: Sequence[Job]) -> list[dict]:
    """Scorer results in job order: SC jobs through `scorer.score`, PQ jobs through `score_pq_only`."""
    results: list = [None] * len(jobs)
    sc = [i for i, j in enumerate(jobs) if j.task == "sc"]
    pq = [i for i, j in enumerate(jobs) if j.task == "pq"]
    for indices, call in ((sc, lambda items: scorer.score([j.originals for j in items], [j.edited for j in items],
                                                           [j.instruction for j in items])),
                          (pq, lambda items: score_pq_only(scorer, [j.edited for j in items]))):
        if not indices:
            continue
        out = list(call([jobs[i] for i in indices]))
        if len(out) != len(indices) or not all(isinstance(r, dict) for r in out):
            raise RuntimeError(f"the scorer returned {len(out)} results for {len(indices)} items "
                               f"(first job {jobs[indices[0]].id})")
        for i, r in zip(indices, out):
            results[i] = r
    return [_jsonable(r) for r in results]


def _batches(items: Iterable, size: int):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def evaluate(bench: Benchmark, scorer, batch_size: int = 8) -> dict:
    """Scores every job in memory (no cache, no files) and returns `bench.summarize(...)`."""
    results: dict = {}
    for batch in _batches(bench.iter_jobs(set(bench.job_ids())), batch_size):
        results.update(zip([j.id for j in batch], score_jobs(scorer, batch)))
    return bench.summarize(results)


def reward_options_of(scorer) -> dict:
    options = getattr(scorer, "options", None)
    if options is None or not dataclasses.is_dataclass(options):
        return {}
    return RewardWeights.from_options(options).options()


def evaluate_synthetic(scorer, examples: Iterable, batch_size: int = 8) -> dict:
    """Synthetic spatial benchmark on `examples` (SpatialExamples with ground truth): parse rate,
    box precision/recall at IoU 0.5, mean IoU, score MAEs, Spearman of the reward against the
    true reward, and the same for two constant baselines (see `SyntheticBench`)."""
    examples = examples if hasattr(examples, "__getitem__") else list(examples)
    bench = SyntheticBench(examples, reward_options=reward_options_of(scorer))
    return evaluate(bench, scorer, batch_size)


# ---------------------------------------------------------------- cache and sharding


def shard_file(out_dir: Path, index: int, count: int) -> Path:
    return out_dir / CACHE_DIR / f"scores-{index:05d}-of-{count:05d}.jsonl"


def read_cache(out_dir: str | Path) -> dict[str, dict]:
    """Every finished job in every shard file. A line cut short (a host killed mid-write, or a
    file another host is appending to) is ignored: that job simply counts as not done."""
    results: dict = {}
    folder = Path(out_dir) / CACHE_DIR
    for file in sorted(folder.glob("*.jsonl")) if folder.is_dir() else []:
        with open(file, encoding="utf-8") as handle:
            for line in handle:
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(entry, dict) and "id" in entry and "result" in entry:
                    results[entry["id"]] = entry["result"]
    return results


def check_run_config(out_dir: Path, config: dict) -> None:
    """Cached results are only valid for the configuration that produced them."""
    path = out_dir / "run.json"
    config = _jsonable(config)
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        changed = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
        if changed:
            detail = "; ".join(f"{k}: {old.get(k)!r} -> {config.get(k)!r}" for k in changed)
            raise BenchmarkError(f"{out_dir} holds results of another run ({detail}); use a new --out")
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")


def my_jobs(job_ids: Sequence[str], process_index: int, process_count: int) -> list[str]:
    if not 0 <= process_index < process_count:
        raise ValueError(f"process index {process_index} is outside 0..{process_count - 1}")
    return list(job_ids[process_index::process_count])


def run(bench: Benchmark, make_scorer: Callable[[], Any], out_dir: str | Path, *, config: dict,
        process_index: int = 0, process_count: int = 1, batch_size: int = 4, progress: bool = True,
        score: bool = True, barrier: Callable[[], None] | None = None, title: str = "") -> dict | None:
    """Scores this host's unfinished jobs (the scorer is built only if there are any), then, on
    host 0 and once every job has a result, writes results.json, items.jsonl, report.md and
    plot.png and returns the summary. Returns None when results are still missing. `barrier`
    (e.g. a JAX multi-host sync) runs after scoring, before host 0 looks for the other shards."""
    out_dir = Path(out_dir)
    check_run_config(out_dir, config)
    all_jobs = bench.job_ids()
    done = read_cache(out_dir)
    if score:
        todo = [j for j in my_jobs(all_jobs, process_index, process_count) if j not in done]
        if todo:
            _score_into_cache(bench, make_scorer(), todo, shard_file(out_dir, process_index, process_count),
                              batch_size, progress)
    if barrier is not None:
        barrier()
    done = read_cache(out_dir)
    missing = [j for j in all_jobs if j not in done]
    if missing or process_index != 0:
        if missing:
            print(f"{len(missing)} of {len(all_jobs)} jobs have no result yet (first: {missing[0]}); "
                  "run the other hosts, then `--merge`", file=sys.stderr)
        return None
    summary = bench.summarize(done)
    write_outputs(summary, out_dir, title=title or bench.name, info=config)
    return summary


def _score_into_cache(bench: Benchmark, scorer, todo: list[str], shard: Path, batch_size: int,
                      progress: bool) -> None:
    shard.parent.mkdir(parents=True, exist_ok=True)
    if shard.is_file() and shard.stat().st_size:  # a line cut short by a crash must not swallow the next one
        with open(shard, "rb") as tail:
            tail.seek(-1, 2)
            cut = tail.read(1) != b"\n"
        if cut:
            with open(shard, "ab") as handle:
                handle.write(b"\n")
    bar = tqdm(total=len(todo), desc=f"scoring {bench.name}", unit="edit", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    with open(shard, "a", encoding="utf-8") as handle, bar:
        for batch in _batches(bench.iter_jobs(set(todo)), batch_size):
            for job, result in zip(batch, score_jobs(scorer, batch)):
                handle.write(json.dumps({"id": job.id, "result": result}, ensure_ascii=False) + "\n")
            handle.flush()
            bar.update(len(batch))


# ---------------------------------------------------------------- report and plot


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _markdown_table(rows: dict[str, dict], first: str) -> list[str]:
    columns = list(dict.fromkeys(k for cell in rows.values() for k in cell))
    lines = [f"| {first} | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 1)]
    for name, cell in rows.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(cell.get(c)) for c in columns) + " |")
    return lines


def markdown_report(summary: dict, title: str, info: dict | None = None) -> str:
    lines = [f"# {title}", ""]
    for key, value in (info or {}).items():
        lines.append(f"- {key}: `{value}`")
    lines += ["", "## Overall", ""]
    lines += _markdown_table({"all": summary["overall"]}, "set")
    for name, table in summary["tables"].items():
        lines += ["", f"## {name[0].upper() + name[1:]}", ""]
        lines += _markdown_table(table, name)
    lines += ["", "![per-category results](plot.png)", ""]
    return "\n".join(lines)


def plot_summary(summary: dict, path: str | Path) -> None:
    """One panel per entry of summary["plot"]: grouped bars, one group per category."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = summary["plot"]
    widths = [max(4.0, 0.9 * len(summary["tables"][t]) * max(1, len(m)) * 0.5 + 2) for t, m in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(min(max(widths), 24), 3.6 * len(panels)), squeeze=False)
    for ax, (table_name, metric_names) in zip(axes[:, 0], panels):
        table = summary["tables"][table_name]
        categories = list(table)
        x = np.arange(len(categories))
        width = 0.8 / len(metric_names)
        for n, metric in enumerate(metric_names):
            values = [table[c].get(metric) for c in categories]
            ax.bar(x + (n - (len(metric_names) - 1) / 2) * width,
                   [np.nan if v is None else v for v in values], width, label=metric)
        ax.set_xticks(x, categories, rotation=30 if len(categories) > 4 else 0, ha="right" if len(categories) > 4 else "center")
        ax.set_title(f"{summary['benchmark']}: {table_name}")
        ax.axhline(0, color="black", linewidth=0.5)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(summary: dict, out_dir: str | Path, title: str = "", info: dict | None = None) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    compact = {k: v for k, v in summary.items() if k != "items"}
    (out_dir / "results.json").write_text(json.dumps(_jsonable(compact), indent=2), encoding="utf-8")
    with open(out_dir / "items.jsonl", "w", encoding="utf-8") as handle:
        for item in summary.get("items", []):
            handle.write(json.dumps(_jsonable(item), ensure_ascii=False) + "\n")
    (out_dir / "report.md").write_text(markdown_report(summary, title or summary["benchmark"], info), encoding="utf-8")
    plot_summary(summary, out_dir / "plot.png")
