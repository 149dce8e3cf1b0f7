"""Benchmark loaders: MER-Bench, EditReward-Bench, MMRB2 image editing, our synthetic split.

A benchmark is a list of light `records` (ids, labels, ground truth; no pixels), each naming the
scoring `jobs` it needs. A job is one edited image scored against its original(s) with an
instruction (SC + PQ), or a PQ-only job (synthetic PQ examples have no original). Job ids are
stable strings, so results can be cached per job and a restart skips what is done. Images are
read from the files only when a job is scored (`iter_jobs`). `summarize(results)` maps
{job id: scorer result} to metrics (see `sr_jax.eval.metrics` for the definitions).

Local formats (see `sr_jax.eval.tables` for the file types):
  mer         rows {pair_id, label, instruction, original_image, edited_images: [best first]};
              the pair type (2pair/3pair/4pair) comes from the file or folder name
              (data/2pair-00000-of-00001.parquet, 2pair/data-00000-of-00001.arrow), else from
              the number of edited images.
  editreward  rows {key: [k1, k2], instruction, task_type, dimension, input_image,
              output_images: [2]} (EditScore/EditReward-Bench); an output image is scored once
              per key. TIGER-Lab/EditReward-Bench, another benchmark of the same name (2/3/4-way
              rankings of candidate_* images), is recognised and refused by name.
  mmrb2       the Hub release rl-research/multimodal-rewardbench-2, config `edit` (rows {pair_id,
              prompt_text with <image_N> markers, prompt_images, response_a_images,
              response_b_images, chosen, prompt_source, human_annotations as a JSON string}, as
              Parquet shards or a `datasets.save_to_disk` folder); or
              MMRB2's release file edit.json ({"pairs": [...]}) or JSONL/parquet rows with
              id (or pair_id), chosen (or human_preference) "A"/"B", prompt_source (optional),
              prompt_content: {"text": str, "images": [image, ...]} or the release's list
              [["text", str], ["image", path], ...], and response_a / response_b: an image or
              {"response_content": [["image", path]]}. Paths are relative to the file's folder.
  synthetic   SpatialExamples: `synthetic:N[:SEED]` (generated test split) or ArrayRecord files.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from sr_jax.data.records import SpatialExample
from sr_jax.data.storage import ArrayRecordSource
from sr_jax.data.synthetic import generate_examples
from sr_jax.eval import metrics as M
from sr_jax.eval.tables import BenchmarkError, iter_rows, load_image, require, table_files
from sr_jax.reward import RewardWeights, SCORE_RANGE, aggregate, parse_output

BENCHMARKS = ("mer", "editreward", "mmrb2", "synthetic")
RANKING_KEYS = ("exact_match", "kendall_tau", "spearman_rho", "ndcg", "top1", "top2", "position_error")
# Tie-aware variants of the MER-Bench metrics (exact_match is the same in both): a tie is not a
# correct decision, see `metrics.ranking_metrics`; the unprefixed columns are the official ones.
STRICT_RANKING_KEYS = tuple(f"strict_{k}" for k in RANKING_KEYS if k != "exact_match")
DIMENSIONS = ("prompt_following", "consistency", "overall")
# Task-type groups of EditReward-Bench as its authors (EditScore) report them.
EDITREWARD_GROUPS = {
    "object": ("subject-add", "subject-remove", "subject-replace"),
    "appearance": ("color_alter", "material_alter", "style_change", "tone_transfer"),
    "scene": ("background_change", "extract"),
    "advanced": ("ps_human", "text_change", "motion_change", "compose"),
}


@dataclasses.dataclass
class Job:
    id: str
    edited: Any                     # PIL image (or bytes / path)
    originals: list = dataclasses.field(default_factory=list)
    instruction: str = ""
    task: str = "sc"                # "sc": SC + PQ prompts; "pq": PQ prompt only


class Benchmark:
    name = ""

    def __init__(self):
        self.records: list[dict] = []

    def job_ids(self) -> list[str]:
        """All jobs in a fixed order (the order sharding is based on), each once."""
        return list(dict.fromkeys(j for r in self.records for j in r["jobs"]))

    def iter_jobs(self, wanted: set[str]) -> Iterator[Job]:
        raise NotImplementedError

    def summarize(self, results: dict[str, dict]) -> dict:
        """{"benchmark", "overall": {metric: value}, "tables": {title: {category: {metric: value}}},
        "plot": [[table title, [metrics]], ...], "items": per-record rows}."""
        raise NotImplementedError

    def _check_unique(self, rid: str, where: str, seen: dict) -> None:
        if rid in seen:
            raise BenchmarkError(f"{where}: duplicate id {rid!r} (also at {seen[rid]})")
        seen[rid] = where


def answer_counts(results: dict, jobs: Sequence[str]) -> dict:
    """How many generated answers (SC and PQ count apart) were cut off at max_new_tokens, and how
    many others gave no readable answer. None when the results do not say (a scorer that does
    not report it, or a cache written before it was recorded)."""
    truncated = unparsed = 0
    known = True
    for job in jobs:
        r = results.get(job) or {}
        cut, parsed = r.get("truncated"), r.get("parsed")
        if not isinstance(cut, dict) or not isinstance(parsed, dict):
            known = False
            continue
        for kind, ok in parsed.items():
            if cut.get(kind):
                truncated += 1
            elif ok is False:
                unparsed += 1
    return {"truncated_answers": truncated if known else None, "unparsed_answers": unparsed if known else None}


def _refuse_tiger_editreward(row) -> None:
    """TIGER-Lab/EditReward-Bench (2pair/3pair/4pair folders of rankings over source_image and
    candidate_1..k) shares its name with EditScore/EditReward-Bench and its folder names with
    MER-Bench; neither loader can read it, so say which benchmark it is instead of a missing key."""
    columns = sorted(row.data)
    if "source_image" in row.data and any(c.startswith("candidate_") for c in columns):
        raise BenchmarkError(
            f"{row.where}: this is TIGER-Lab/EditReward-Bench (columns {columns}), a different benchmark "
            "that shares the name; sr-jax does not evaluate it. `sr-jax eval editreward` reads "
            "EditScore/EditReward-Bench (rows with key, instruction, task_type, dimension, input_image, "
            "output_images), the one the SpatialReward paper reports, and `sr-jax eval mer` reads "
            "MER-Bench (rows with pair_id, instruction, original_image, edited_images)")


def _result(results: dict, job: str) -> dict:
    try:
        return results[job]
    except KeyError:
        raise BenchmarkError(f"no scorer result for job {job!r}") from None


# ---------------------------------------------------------------- MER-Bench

_PAIR_TYPE = re.compile(r"(?<![0-9])([0-9]+)pair")


def _pair_type_from_path(file: Path) -> str | None:
    for name in (file.name, file.parent.name):
        m = _PAIR_TYPE.search(name)
        if m:
            return m.group(0)
    return None


class MERBench(Benchmark):
    """Rank k edits of one image; every edited image is scored against the original."""

    name = "mer"

    def __init__(self, path: str | Path, limit: int | None = None):
        super().__init__()
        self.files = table_files(path)
        seen: dict = {}
        for row in iter_rows(self.files, drop=("original_image",), lengths=("edited_images",), limit=limit):
            _refuse_tiger_editreward(row)
            require(row, "pair_id", "instruction", "edited_images")
            k = row.data["edited_images"]
            pair_type = _pair_type_from_path(row.file) or f"{k}pair"
            if k < 2 or int(pair_type[:-4]) != k:
                raise BenchmarkError(f"{row.where}: {k} edited images in a {pair_type} record")
            rid = f"{pair_type}/{row.data['pair_id']}"
            self._check_unique(rid, row.where, seen)
            label = row.data.get("label")
            self.records.append({
                "id": rid, "row": row.index, "pair_type": pair_type, "k": k,
                "label": "unlabeled" if label in (None, "") else str(label),
                "jobs": [f"{rid}/{j}" for j in range(k)],
            })

    def iter_jobs(self, wanted: set[str]) -> Iterator[Job]:
        by_row = {r["row"]: r for r in self.records if wanted.intersection(r["jobs"])}
        if not by_row:
            return
        for row in iter_rows(self.files, limit=max(by_row) + 1):
            record = by_row.get(row.index)
            if record is None:
                continue
            require(row, "original_image")
            edited = row.data["edited_images"]
            if len(edited) != record["k"]:
                raise BenchmarkError(f"{row.where}: edited_images changed length while reading")
            original = load_image(row.data["original_image"], row.base, f"{row.where} original_image")
            for j, job in enumerate(record["jobs"]):
                if job in wanted:
                    image = load_image(edited[j], row.base, f"{row.where} edited_images[{j}]")
                    yield Job(job, image, [original], str(row.data["instruction"]))

    def summarize(self, results: dict[str, dict]) -> dict:
        items = []
        for r in self.records:
            scores = [float(_result(results, j)["reward"]) for j in r["jobs"]]
            strict = M.ranking_metrics(scores)
            items.append({"id": r["id"], "pair_type": r["pair_type"], "label": r["label"], "rewards": scores,
                          **M.official_ranking_metrics(scores),
                          **{f"strict_{k}": v for k, v in strict.items() if k != "exact_match"}})
        keys = RANKING_KEYS + STRICT_RANKING_KEYS
        return {
            "benchmark": self.name,
            "overall": M.mean_metrics(items, keys) | answer_counts(results, self.job_ids()),
            "tables": {"by pair type": M.grouped(items, "pair_type", keys),
                       "by label": M.grouped(items, "label", keys)},
            "plot": [["by pair type", ["exact_match", "top1", "kendall_tau", "ndcg"]],
                     ["by label", ["exact_match", "top1"]]],
            "items": items,
        }


# ---------------------------------------------------------------- EditReward-Bench


def _dimension_value(result: dict, dimension: str, unit: float) -> float:
    if dimension == "prompt_following":
        return float(result["sc_scores"][0]) / unit
    if dimension == "consistency":
        return float(result["sc_scores"][1]) / unit
    return float(result["reward"])


class EditRewardBench(Benchmark):
    """Pairs of outputs judged on one dimension; the first output is the preferred one."""

    name = "editreward"

    def __init__(self, path: str | Path, limit: int | None = None, score_range: float = SCORE_RANGE):
        super().__init__()
        self.files = table_files(path)
        self.unit = score_range / 10.0  # scores on 0..score_range -> 0..10, like SC/PQ
        self.first_row: dict[str, int] = {}
        instructions: dict[str, tuple[str, str]] = {}
        for row in iter_rows(self.files, drop=("input_image",), lengths=("output_images",), limit=limit):
            _refuse_tiger_editreward(row)
            require(row, "key", "instruction", "task_type", "dimension", "output_images")
            d = row.data
            if not isinstance(d["key"], list) or len(d["key"]) != 2 or d["output_images"] != 2:
                raise BenchmarkError(f"{row.where}: need key [k1, k2] and 2 output_images, got key "
                                     f"{d['key']!r} and {d['output_images']} images")
            if d["dimension"] not in DIMENSIONS:
                raise BenchmarkError(f"{row.where}: dimension {d['dimension']!r} is not one of {DIMENSIONS}")
            jobs = [f"out/{k}" for k in d["key"]]
            if jobs[0] == jobs[1]:
                raise BenchmarkError(f"{row.where}: both outputs have key {d['key'][0]!r}")
            for job in jobs:
                seen = instructions.setdefault(job, (d["instruction"], row.where))
                if seen[0] != d["instruction"]:
                    raise BenchmarkError(f"{row.where}: output {job} has instruction {d['instruction']!r}, "
                                         f"but {seen[1]} gives it {seen[0]!r}")
                self.first_row.setdefault(job, row.index)
            self.records.append({"id": f"{row.index}:{d['key'][0]}>{d['key'][1]}:{d['dimension']}",
                                 "task_type": str(d["task_type"]), "dimension": d["dimension"], "jobs": jobs})

    def iter_jobs(self, wanted: set[str]) -> Iterator[Job]:
        rows: dict[int, list[str]] = {}
        for job in wanted:
            if job in self.first_row:
                rows.setdefault(self.first_row[job], []).append(job)
        if not rows:
            return
        for row in iter_rows(self.files, limit=max(rows) + 1):
            if row.index not in rows:
                continue
            require(row, "input_image")
            source = load_image(row.data["input_image"], row.base, f"{row.where} input_image")
            keys = [f"out/{k}" for k in row.data["key"]]
            for job in sorted(rows[row.index], key=keys.index):
                slot = keys.index(job)
                image = load_image(row.data["output_images"][slot], row.base, f"{row.where} output_images[{slot}]")
                yield Job(job, image, [source], str(row.data["instruction"]))

    def summarize(self, results: dict[str, dict]) -> dict:
        items = []
        for r in self.records:
            first, second = (_dimension_value(_result(results, j), r["dimension"], self.unit) for j in r["jobs"])
            items.append({**{k: r[k] for k in ("id", "task_type", "dimension")}, "scores": [first, second],
                          "correct": M.pairwise_correct(first, second)})
        by_task: dict = {}
        for task in sorted({i["task_type"] for i in items}):
            rows = [i for i in items if i["task_type"] == task]
            cell: dict = {"n": len(rows)}
            for dim in DIMENSIONS:
                # A task type with no pair judged on a dimension scores 0.0 there, and that 0.0
                # enters the averages below: the official script counts it so.
                hits = [i["correct"] for i in rows if i["dimension"] == dim]
                cell[dim] = float(np.mean(hits)) if hits else 0.0
            by_task[task] = cell

        def across(tasks: Sequence[str]) -> dict:
            cell: dict = {"n": sum(by_task[t]["n"] for t in tasks), "task_types": len(tasks)}
            for dim in DIMENSIONS:
                cell[dim] = float(np.mean([by_task[t][dim] for t in tasks])) if tasks else None
            return cell

        known = {t for group in EDITREWARD_GROUPS.values() for t in group}
        groups = {g: [t for t in members if t in by_task] for g, members in EDITREWARD_GROUPS.items()}
        groups["other"] = [t for t in by_task if t not in known]
        overall = across(list(by_task))  # average across task types, as the benchmark reports it
        overall["micro_accuracy"] = float(np.mean([i["correct"] for i in items])) if items else None
        overall |= answer_counts(results, self.job_ids())
        return {
            "benchmark": self.name,
            "overall": overall,
            "tables": {"by task type": by_task,
                       "by group": {g: across(ts) for g, ts in groups.items() if ts}},
            "plot": [["by task type", list(DIMENSIONS)], ["by group", list(DIMENSIONS)]],
            "items": items,
        }


# ---------------------------------------------------------------- MMRB2 image editing


def _mmrb2_prompt(content: Any, where: str) -> tuple[str, list]:
    if isinstance(content, str):
        return content, []
    if isinstance(content, dict):
        images = content.get("images") or []
        if not isinstance(images, list):
            raise BenchmarkError(f"{where}: prompt_content.images must be a list")
        return str(content.get("text") or ""), images
    if isinstance(content, list):
        texts, images = [], []
        for n, part in enumerate(content):
            if isinstance(part, dict):  # {"type": "image", "image": ...} / {"type": "text", "text": ...}
                kind, value = part.get("type"), part.get(part.get("type") or "", part.get("value"))
            elif isinstance(part, (list, tuple)) and len(part) == 2:
                kind, value = part
            else:
                raise BenchmarkError(f"{where}: prompt_content[{n}] is not a [kind, value] pair")
            if kind == "text":
                texts.append(str(value))
            elif kind == "image":
                images.append(value)
            else:
                raise BenchmarkError(f"{where}: prompt_content[{n}] has unknown kind {kind!r}")
        return "\n".join(texts), images
    raise BenchmarkError(f"{where}: prompt_content must be text, {{text, images}} or a list of parts")


def _mmrb2_response(value: Any, where: str) -> Any:
    """The edited image of a response: the first image, as the official script takes it."""
    if isinstance(value, dict) and "response_content" in value:
        images = [v for kind, v in value["response_content"] if kind == "image"]
        if not images:
            raise BenchmarkError(f"{where}: an editing response needs an image, got none")
        return images[0]
    if value is None:
        raise BenchmarkError(f"{where}: missing")
    return value


_IMAGE_MARKER = re.compile(r"<image_\d+>")
_HF_RESPONSES = ("response_a_images", "response_b_images")


def _mmrb2_hf_prompt(data: dict, where: str) -> tuple[str, Any]:
    """The Hub release's prompt: `prompt_text` with one `<image_N>` marker where each image of
    `prompt_images` stands. Returns the text without markers (its pieces joined by newlines, as
    in the edit.json layout) and the images (their count in a metadata-only pass)."""
    parts = _IMAGE_MARKER.split(data.get("prompt_text") or "")
    images = data.get("prompt_images") or []
    count = images if isinstance(images, int) else len(images)
    if len(parts) > 1 and len(parts) - 1 != count:
        raise BenchmarkError(f"{where}: prompt_text has {len(parts) - 1} <image_N> markers but prompt_images "
                             f"holds {count} image(s)")
    return "\n".join(p.strip() for p in parts if p.strip()), images


def _mmrb2_hf_response(data: dict, side: str, where: str) -> Any:
    images = data.get(f"response_{side}_images")
    count = images if isinstance(images, int) else len(images or [])
    if not count:
        raise BenchmarkError(f"{where} response_{side}_images: an editing response needs an image, got none")
    return None if isinstance(images, int) else images[0]


def _mmrb2_human_annotations(value: Any, where: str) -> Any:
    """The Hub release stores human_annotations as a JSON string; edit.json as a list."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value) if value.strip() else None
    except ValueError as e:
        raise BenchmarkError(f"{where}: human_annotations is not valid JSON ({e})") from None


class MMRB2Bench(Benchmark):
    """Pairwise preference between two edits of the same prompt (one or several source images).

    Reads the Hub release (`rl-research/multimodal-rewardbench-2`, config `edit`: Parquet shards,
    or a `datasets.save_to_disk` folder; a folder holding the config folders is read from its
    `edit/`) and MMRB2's own edit.json. Results are broken down as the official script does:
    by number of input images and by prompt source."""

    name = "mmrb2"

    def __init__(self, path: str | Path, limit: int | None = None):
        super().__init__()
        path = Path(path)
        release = path / "edit.json"
        if path.is_dir() and release.is_file():
            self.files = [release]
        elif path.is_dir() and (path / "edit").is_dir():
            self.files = table_files(path / "edit")
        else:
            self.files = table_files(path)
        seen: dict = {}
        for row in iter_rows(self.files, lengths=("prompt_images",) + _HF_RESPONSES, limit=limit):
            d = row.data
            hub = "prompt_text" in d or "prompt_images" in d
            if hub:
                require(row, "pair_id", "prompt_text", "chosen")
                text, images = _mmrb2_hf_prompt(d, row.where)
                n_images = images if isinstance(images, int) else len(images)
                for side in "ab":
                    _mmrb2_hf_response(d, side, row.where)
            else:
                require(row, "prompt_content", "response_a", "response_b")
                text, images = _mmrb2_prompt(d["prompt_content"], f"{row.where} prompt_content")
                n_images = len(images)
                for side in ("a", "b"):
                    _mmrb2_response(d[f"response_{side}"], f"{row.where} response_{side}")
            chosen = str(d.get("chosen", d.get("human_preference", ""))).strip().upper()
            if chosen not in ("A", "B"):
                raise BenchmarkError(f"{row.where}: chosen must be 'A' or 'B', got {chosen!r}")
            if not n_images or not text.strip():
                raise BenchmarkError(f"{row.where}: an editing prompt needs source image(s) and text, "
                                     f"got {n_images} image(s) and text {text!r}")
            rid = str(d.get("id", d.get("pair_id", f"row{row.index}")))
            self._check_unique(rid, row.where, seen)
            self.records.append({
                "id": rid, "row": row.index, "chosen": chosen, "source": str(d.get("prompt_source") or "unknown"),
                "subset": "single-image" if n_images == 1 else "multi-image", "n_images": n_images,
                "human_annotations": _mmrb2_human_annotations(d.get("human_annotations"), row.where),
                "jobs": [f"{rid}/a", f"{rid}/b"],
            })

    def iter_jobs(self, wanted: set[str]) -> Iterator[Job]:
        by_row = {r["row"]: r for r in self.records if wanted.intersection(r["jobs"])}
        if not by_row:
            return
        for row in iter_rows(self.files, limit=max(by_row) + 1):
            record = by_row.get(row.index)
            if record is None:
                continue
            d = row.data
            if "prompt_text" in d or "prompt_images" in d:
                text, images = _mmrb2_hf_prompt(d, row.where)
                responses = {side: _mmrb2_hf_response(d, side, row.where) for side in "ab"}
                names = {side: f"{row.where} response_{side}_images[0]" for side in "ab"}
            else:
                text, images = _mmrb2_prompt(d["prompt_content"], row.where)
                names = {side: f"{row.where} response_{side}" for side in "ab"}
                responses = {side: _mmrb2_response(d[f"response_{side}"], names[side]) for side in "ab"}
            if len(images) != record["n_images"]:
                raise BenchmarkError(f"{row.where}: the number of prompt images changed while reading")
            originals = [load_image(im, row.base, f"{row.where} prompt image {n}") for n, im in enumerate(images)]
            for side, job in zip("ab", record["jobs"]):
                if job in wanted:
                    yield Job(job, load_image(responses[side], row.base, names[side]), originals, text)

    def summarize(self, results: dict[str, dict]) -> dict:
        items = []
        for r in self.records:
            a, b = (float(_result(results, j)["reward"]) for j in r["jobs"])
            preferred, other = (a, b) if r["chosen"] == "A" else (b, a)
            items.append({k: r[k] for k in ("id", "chosen", "source", "subset", "n_images")}
                         | {"rewards": [a, b], "accuracy": float(M.pairwise_correct(preferred, other))})
        return {
            "benchmark": self.name,
            "overall": M.mean_metrics(items, ["accuracy"]) | answer_counts(results, self.job_ids()),
            "tables": {"by input images": M.grouped(items, "n_images", ["accuracy"]),
                       "by source": M.grouped(items, "source", ["accuracy"]),
                       "by subset": M.grouped(items, "subset", ["accuracy"])},
            "plot": [["by input images", ["accuracy"]], ["by source", ["accuracy"]]],
            "items": items,
        }


# ---------------------------------------------------------------- synthetic spatial benchmark

SCORE_NAMES = {"sc": ("success", "overediting"), "pq": ("naturalness", "artifacts")}


def _truth_weights(reward_options: dict | RewardWeights | None) -> RewardWeights:
    """The reward settings the ground truth is scored with: the run's mode, weights and score
    range (other keys, e.g. the rest of the scorer options, are ignored), always capped at 10,
    since the true scores lie on the scale whatever reading the model's answers get."""
    if isinstance(reward_options, RewardWeights):
        return dataclasses.replace(reward_options, clamp=True)
    return RewardWeights.from_options(reward_options or {}, clamp=True)


def parse_synthetic_spec(data: str) -> tuple[int, int] | None:
    """`synthetic:N` or `synthetic:N:SEED` -> (N, seed); anything else -> None."""
    if not data.startswith("synthetic:"):
        return None
    parts = data.split(":")[1:]
    try:
        n, seed = int(parts[0]), int(parts[1]) if len(parts) > 1 else 0
    except (ValueError, IndexError):
        raise BenchmarkError(f"--data {data!r}: expected synthetic:N or synthetic:N:SEED") from None
    if n < 1 or seed < 0 or len(parts) > 2:
        raise BenchmarkError(f"--data {data!r}: expected synthetic:N or synthetic:N:SEED with N >= 1")
    return n, seed


class SyntheticBench(Benchmark):
    """Our held-out spatial examples with exact ground truth (boxes and all four scores)."""

    name = "synthetic"

    def __init__(self, examples: Sequence[SpatialExample], limit: int | None = None,
                 reward_options: dict | RewardWeights | None = None):
        super().__init__()
        self.examples = examples
        self.weights = _truth_weights(reward_options)
        self.skipped_unparsed = 0
        seen: dict = {}
        count = len(examples) if limit is None else min(limit, len(examples))
        for index in range(count):
            ex = examples[index]
            if ex.meta.get("verbatim") and not ex.meta.get("answer_parsed"):
                self.skipped_unparsed += 1  # an imported row whose answer gave no ground truth
                continue
            self._check_unique(ex.id, f"example {index}", seen)
            group = ex.meta.get("outcome") if ex.task == "sc" else ex.meta.get("artifact")
            self.records.append({
                "id": ex.id, "index": index, "task": ex.task, "truth_score": [float(s) for s in ex.score],
                "truth_boxes": [list(r.bbox_2d) for r in ex.edit_region],
                "group": f"{ex.task}:{group or 'unknown'}", "jobs": [ex.id],
                "edit_type": f"sc:{ex.meta.get('edit_type') or 'unknown'}" if ex.task == "sc" else None,
            })

    @classmethod
    def from_data(cls, data: str, limit: int | None = None,
                  reward_options: dict | RewardWeights | None = None) -> "SyntheticBench":
        spec = parse_synthetic_spec(data)
        if spec is not None:
            n, seed = spec
            n = n if limit is None else min(n, limit)
            return cls(list(generate_examples(n, seed, split="test")), reward_options=reward_options)

        try:
            source = ArrayRecordSource(data)
        except FileNotFoundError as e:
            raise BenchmarkError(f"--data {data!r}: {e}") from None
        return cls(source, limit, reward_options)

    def iter_jobs(self, wanted: set[str]) -> Iterator[Job]:
        for r in self.records:
            if r["id"] not in wanted:
                continue
            ex = self.examples[r["index"]]
            where = f"{ex.id} image"
            images = [load_image(im, Path("."), f"{where} {n}") for n, im in enumerate(ex.images)]
            if ex.task == "pq":
                yield Job(ex.id, images[0], [], "", task="pq")
            else:
                yield Job(ex.id, images[-1], images[:-1], ex.instruction)

    # -- metrics
    def _truth_values(self, record: dict) -> tuple[float, float]:
        """(truth reward or None, truth SC-or-PQ value on 0..10) for a record."""
        top = float(self.weights.score_range)
        if record["task"] == "sc":  # SC examples are clean renders: their true PQ is the top score
            reward, sc, _ = aggregate(record["truth_score"], [top, top], self.weights)
            return reward, sc
        _, _, pq = aggregate([top, top], record["truth_score"], self.weights)
        return None, pq

    def _metrics(self, records: Sequence[dict], predictions: Sequence[dict]) -> dict:
        out: dict = {"n_sc": sum(r["task"] == "sc" for r in records), "n_pq": sum(r["task"] == "pq" for r in records)}
        parsed = [p.get("parsed", {}).get(r["task"]) for r, p in zip(records, predictions)]
        out["parse_rate"] = float(np.mean(parsed)) if parsed and None not in parsed else None
        raws = [(p.get("raw") or {}).get(r["task"]) for r, p in zip(records, predictions)]
        if raws and None not in raws:
            strict = [not {"no_json", "not_strict_json", "truncated"} & set(parse_output(t, with_region=False)["errors"])
                      for t in raws]
            out["strict_json_rate"] = float(np.mean(strict))
        else:
            out["strict_json_rate"] = None
        sc = [(r, p) for r, p in zip(records, predictions) if r["task"] == "sc"]
        matches = [M.match_boxes([reg["bbox_2d"] for reg in p["edit_region"]], r["truth_boxes"]) for r, p in sc]
        out.update(M.detection_summary(matches))
        for task, key in (("sc", "sc_scores"), ("pq", "pq_scores")):
            pairs = [(r, p) for r, p in zip(records, predictions) if r["task"] == task]
            for slot, name in enumerate(SCORE_NAMES[task]):
                out[f"mae_{name}"] = M.mae([p[key][slot] for _, p in pairs], [r["truth_score"][slot] for r, _ in pairs])
        truth = [self._truth_values(r) for r, _ in sc]
        out["reward_spearman"] = M.correlation_or_none([p["reward"] for _, p in sc], [t[0] for t in truth])
        out["sc_spearman"] = M.correlation_or_none([p["sc"] for _, p in sc], [t[1] for t in truth])
        pq = [(r, p) for r, p in zip(records, predictions) if r["task"] == "pq"]
        out["pq_spearman"] = M.correlation_or_none([p["pq"] for _, p in pq], [self._truth_values(r)[1] for r, _ in pq])
        return out

    def _baseline(self, boxes: list) -> list[dict]:
        """Constant predictions: fixed boxes and, per score, the mean true score of its task."""
        means = {}
        for task in ("sc", "pq"):
            scores = [r["truth_score"] for r in self.records if r["task"] == task]
            means[task] = np.mean(scores, axis=0).tolist() if scores else [0.0, 0.0]
        reward, sc, pq = aggregate(means["sc"], means["pq"], self.weights)
        constant = {"edit_region": [{"id": i, "label": "", "bbox_2d": b} for i, b in enumerate(boxes)],
                    "sc_scores": means["sc"], "pq_scores": means["pq"], "reward": reward, "sc": sc, "pq": pq}
        return [constant] * len(self.records)

    def summarize(self, results: dict[str, dict]) -> dict:
        predictions = [_result(results, r["id"]) for r in self.records]
        model = self._metrics(self.records, predictions)
        overall = model | answer_counts(results, self.job_ids())
        groups: dict = {}
        edit_types: dict = {}  # SC only: which requested edits the model misses (a recolor vs an add)
        for r, p in zip(self.records, predictions):
            for table, key in ((groups, r["group"]), (edit_types, r["edit_type"])):
                if key is not None:
                    table.setdefault(key, ([], []))
                    table[key][0].append(r)
                    table[key][1].append(p)
        items = []
        for r, p in zip(self.records, predictions):
            item = {"id": r["id"], "task": r["task"], "group": r["group"], "truth_score": r["truth_score"],
                    "predicted_score": p["sc_scores"] if r["task"] == "sc" else p["pq_scores"]}
            if r["task"] == "sc":
                boxes = [reg["bbox_2d"] for reg in p["edit_region"]]
                item.update(truth_boxes=r["truth_boxes"], predicted_boxes=boxes,
                            iou=M.match_boxes(boxes, r["truth_boxes"])["mean_iou"])
            items.append(item)
        return {
            "benchmark": self.name,
            "overall": overall,
            "tables": {
                "model vs baselines": {
                    "model": model,
                    "empty boxes + mean scores": self._metrics(self.records, self._baseline([])),
                    "whole image + mean scores": self._metrics(self.records, self._baseline([[0, 0, 1000, 1000]])),
                },
                "by outcome": {g: self._metrics(*groups[g]) for g in sorted(groups)},
                "by edit type": {g: self._metrics(*edit_types[g]) for g in sorted(edit_types)},
            },
            "plot": [["model vs baselines", ["box_precision", "box_recall", "mean_iou"]],
                     ["model vs baselines", ["mae_success", "mae_overediting", "mae_naturalness", "mae_artifacts"]]],
            "items": items,
        }


def load_benchmark(name: str, data: str, limit: int | None = None,
                   reward_options: dict | RewardWeights | None = None) -> Benchmark:
    if limit is not None and limit < 1:
        raise BenchmarkError(f"--limit must be >= 1, got {limit}")
    if name == "mer":
        return MERBench(data, limit)
    if name == "editreward":
        return EditRewardBench(data, limit, float(_truth_weights(reward_options).score_range))
    if name == "mmrb2":
        return MMRB2Bench(data, limit)
    if name == "synthetic":
        return SyntheticBench.from_data(data, limit, reward_options)
    raise BenchmarkError(f"unknown benchmark {name!r}; choose from {BENCHMARKS}")
