"""Benchmark evaluation: metrics against scipy / brute force / hand-computed values, loaders on
fixture files in the real formats, resumable + sharded runner, report and plot, and one
end-to-end `sr-jax eval` run with a tiny random model.

Most tests use scorers defined here whose answers are known: `PixelScorer` reads its scores off
the edited image's top-left pixel, so a fixture's colours fix every reward (ties included)."""

import io
import itertools
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from sr_jax.data.image import open_image
from sr_jax.eval import metrics as M
from sr_jax.eval.benchmarks import EditRewardBench, MERBench, MMRB2Bench, SyntheticBench
from sr_jax.eval.runner import evaluate, evaluate_synthetic, read_cache, run, shard_file
from sr_jax.eval.tables import BenchmarkError
from sr_jax.reward import aggregate

scipy_stats = pytest.importorskip("scipy.stats")


def png(r, g=0, b=0, size=(8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (r, g, b)).save(buf, format="PNG")
    return buf.getvalue()


def pixel(image) -> tuple[int, int, int]:
    return tuple(int(v) for v in np.asarray(open_image(image).convert("RGB"))[0, 0])


class PixelScorer:
    """success = R/10.2, overediting = G/10.2 (0..25); reward = (R + G) / 510."""

    def __init__(self):
        self.scored = []  # (instruction, R, G, number of originals) per scored edit

    def score(self, originals, edited, instructions):
        out = []
        for orig, edit, instr in zip(originals, edited, instructions):
            r, g, _ = pixel(edit)
            self.scored.append((instr, r, g, len(orig)))
            out.append({"reward": (r + g) / 510, "sc": None, "pq": None, "sc_scores": [r / 10.2, g / 10.2],
                        "pq_scores": [25.0, 25.0], "edit_region": [], "parsed": {"sc": True, "pq": True}})
        return out


class FailingScorer(PixelScorer):
    """Dies on its second call, like a host killed mid-run."""

    def score(self, originals, edited, instructions):
        if len(self.scored) > 0:
            raise KeyboardInterrupt("killed")
        return super().score(originals, edited, instructions)


# ---------------------------------------------------------------- metrics


@pytest.mark.filterwarnings("ignore::scipy.stats.ConstantInputWarning")
def test_rank_correlations_match_scipy_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(2, 9))
        x = rng.integers(0, 4, n).astype(float)  # many ties
        y = rng.integers(0, 4, n).astype(float)
        for ours, theirs in ((M.kendall_tau_b, scipy_stats.kendalltau), (M.spearman_rho, scipy_stats.spearmanr)):
            want = theirs(x, y)[0]
            got = ours(x, y)
            assert (math.isnan(want) and math.isnan(got)) or got == pytest.approx(want, abs=1e-12)


def _brute_force_ndcg(scores, gains):
    """Mean plain DCG over every order that breaks the ties, divided by the ideal DCG."""
    items = range(len(scores))
    dcgs = []
    for order in itertools.permutations(items):
        if all(scores[order[i]] >= scores[order[i + 1]] for i in range(len(order) - 1)):
            dcgs.append(sum(gains[j] / math.log2(p + 2) for p, j in enumerate(order)))
    ideal = sum(g / math.log2(p + 2) for p, g in enumerate(sorted(gains, reverse=True)))
    return np.mean(dcgs) / ideal


def test_ndcg_averages_over_tie_orders():
    rng = np.random.default_rng(1)
    for _ in range(30):
        n = int(rng.integers(2, 6))
        scores = rng.integers(0, 3, n).astype(float).tolist()
        gains = list(range(n - 1, -1, -1))
        assert M.ndcg(scores, gains) == pytest.approx(_brute_force_ndcg(scores, gains))


def test_ranking_metrics_by_hand():
    reversed_pair = M.ranking_metrics([1.0, 2.0])
    assert reversed_pair == pytest.approx({"exact_match": 0.0, "kendall_tau": -1.0, "spearman_rho": -1.0,
                                           "ndcg": 1 / math.log2(3), "top1": 0.0, "top2": None,
                                           "position_error": 1.0})
    tie = M.ranking_metrics([1.5, 1.5])
    assert tie["exact_match"] == 0 and tie["top1"] == 0 and tie["kendall_tau"] == 0 and tie["spearman_rho"] == 0
    assert tie["ndcg"] == pytest.approx((1 + 1 / math.log2(3)) / 2) and tie["position_error"] == 0.5
    m = M.ranking_metrics([250, 50, 100])  # best right, the other two swapped
    assert m["exact_match"] == 0 and m["top1"] == 1 and m["top2"] == 1
    assert m["kendall_tau"] == pytest.approx(1 / 3) and m["spearman_rho"] == pytest.approx(0.5)
    assert m["ndcg"] == pytest.approx(2.5 / (2 + 1 / math.log2(3)))
    assert m["position_error"] == pytest.approx(2 / 3)
    assert M.ranking_metrics([3, 2, 1, 0])["exact_match"] == 1
    two_rivals = M.ranking_metrics([100, 200, 200])  # two others tie above the best: not in the top 2
    assert two_rivals["top2"] == 0 and two_rivals["position_error"] == pytest.approx(4 / 3)


def test_hungarian_fallback_matches_scipy_and_brute_force():
    from scipy.optimize import linear_sum_assignment

    rng = np.random.default_rng(2)
    for _ in range(40):
        n, m = int(rng.integers(1, 5)), int(rng.integers(1, 5))
        cost = rng.random((n, m))
        rows, cols = M.hungarian(cost)
        assert len(rows) == min(n, m) and len(set(rows)) == len(rows) and len(set(cols)) == len(cols)
        r2, c2 = linear_sum_assignment(cost)
        assert cost[rows, cols].sum() == pytest.approx(cost[r2, c2].sum())
        small, large = (n, m) if n <= m else (m, n)
        best = min(sum((cost[i, p[i]] if n <= m else cost[p[i], i]) for i in range(small))
                   for p in itertools.permutations(range(large), small))
        assert cost[rows, cols].sum() == pytest.approx(best)


def test_box_matching_is_optimal_not_greedy():
    # predicted box 0 overlaps truth 0 best, but taking it leaves predicted box 1 without a partner
    truth = [[0, 0, 100, 100], [60, 0, 160, 100]]
    predicted = [[30, 0, 130, 100], [0, 0, 90, 100]]
    iou = [[M.box_iou(p, t) for t in truth] for p in predicted]
    assert iou[0][0] == iou[0][1] and iou[1][0] > iou[1][1]
    match = M.match_boxes(predicted, truth)
    assert match["tp"] == 1 + (iou[0][1] >= 0.5)
    assert match["mean_iou"] == pytest.approx((iou[1][0] + iou[0][1]) / 2)
    assert M.match_boxes([], [])["mean_iou"] == 1.0
    assert M.match_boxes([[0, 0, 10, 10]], [])["mean_iou"] == 0.0
    extra = M.match_boxes([[0, 0, 10, 10], [500, 500, 600, 600]], [[0, 0, 10, 10]])
    assert extra["tp"] == 1 and extra["mean_iou"] == pytest.approx(0.5)


# ---------------------------------------------------------------- MER-Bench fixture

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
MER_SCHEMA = pa.schema([("pair_id", pa.string()), ("label", pa.string()), ("instruction", pa.string()),
                        ("original_image", IMAGE), ("edited_images", pa.list_(IMAGE))])
# pair_id, label, R of each edited image (best first); G = 0, so the reward orders by R
MER_ROWS = {
    "2pair": [("a", "color", [200, 100]), ("b", "color", [100, 200]), ("c", "object", [150, 150])],
    "3pair": [("d", "object", [250, 50, 100]), ("e", "style", [100, 200, 200])],
}


def _mer_table(split):
    rows = [{"pair_id": pid, "label": label, "instruction": f"edit {pid}",
             "original_image": {"bytes": png(7), "path": None},
             "edited_images": [{"bytes": png(r), "path": f"{pid}_{j}.png"} for j, r in enumerate(reds)]}
            for pid, label, reds in MER_ROWS[split]]
    return pa.Table.from_pylist(rows, MER_SCHEMA)


@pytest.fixture(scope="module")
def mer_parquet(tmp_path_factory):
    root = tmp_path_factory.mktemp("mer") / "MER-Bench"
    (root / "data").mkdir(parents=True)
    for split in MER_ROWS:
        pq.write_table(_mer_table(split), root / "data" / f"{split}-00000-of-00001.parquet", row_group_size=2)
    return root


@pytest.fixture(scope="module")
def mer_arrow(tmp_path_factory):
    """The layout `datasets.DatasetDict.save_to_disk` writes: one folder per split, IPC streams."""
    root = tmp_path_factory.mktemp("mer_arrow")
    (root / "dataset_dict.json").write_text(json.dumps({"splits": list(MER_ROWS)}))
    for split in MER_ROWS:
        (root / split).mkdir()
        table = _mer_table(split)
        with pa.ipc.new_stream(str(root / split / "data-00000-of-00001.arrow"), table.schema) as writer:
            writer.write_table(table, max_chunksize=1)
        (root / split / "state.json").write_text("{}")
    return root


@pytest.fixture(scope="module")
def mer_jsonl(tmp_path_factory):
    root = tmp_path_factory.mktemp("mer_jsonl")
    (root / "img").mkdir()
    (root / "img" / "orig.png").write_bytes(png(7))
    for split in MER_ROWS:
        lines = []
        for pid, label, reds in MER_ROWS[split]:
            paths = []
            for j, r in enumerate(reds):
                (root / "img" / f"{pid}_{j}.png").write_bytes(png(r))
                paths.append(f"img/{pid}_{j}.png")
            lines.append(json.dumps({"pair_id": pid, "label": label, "instruction": f"edit {pid}",
                                     "original_image": "img/orig.png", "edited_images": paths}))
        (root / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_mer_metrics_by_hand(mer_parquet):
    scorer = PixelScorer()
    bench = MERBench(mer_parquet)
    assert [r["id"] for r in bench.records] == ["2pair/a", "2pair/b", "2pair/c", "3pair/d", "3pair/e"]
    summary = evaluate(bench, scorer, batch_size=3)
    assert len(scorer.scored) == 12 and all(n == 1 for *_, n in scorer.scored)
    overall = summary["overall"]
    assert overall["n"] == 5 and overall["exact_match"] == pytest.approx(1 / 5)
    # Official columns. Stable sort by descending reward, p = predicted order of the items:
    # a [200,100] p=[0,1]; b [100,200] p=[1,0]; c [150,150] tie -> p=[0,1];
    # d [250,50,100] p=[0,2,1]; e [100,200,200] p=[1,2,0].
    assert overall["top1"] == pytest.approx(3 / 5)  # a, c, d
    assert overall["top2"] == pytest.approx(3 / 5)  # a, b, c (2-pair groups always); d {0,2}, e {1,2}
    # tau = (C - D) / (k(k-1)/2): a 1, b -1, c 1, d (2-1)/3, e (1-2)/3
    assert overall["kendall_tau"] == pytest.approx((1 - 1 + 1 + 1 / 3 - 1 / 3) / 5)
    # rho = 1 - 6 sum (p_i - i)^2 / (k(k^2-1)): a 1, b -1, c 1, d 1 - 12/24, e 1 - 36/24
    assert overall["spearman_rho"] == pytest.approx((1 - 1 + 1 + 0.5 - 0.5) / 5)
    # ndcg = sum (k-i)/log2(p_i+2) / sum (k-i)/log2(i+2)
    l3 = math.log2(3)
    ndcg_b = (2 / l3 + 1) / (2 + 1 / l3)
    ndcg_d = (3 + 2 / 2 + 1 / l3) / (3 + 2 / l3 + 1 / 2)
    ndcg_e = (3 / l3 + 2 / 2 + 1) / (3 + 2 / l3 + 1 / 2)
    assert overall["ndcg"] == pytest.approx((1 + ndcg_b + 1 + ndcg_d + ndcg_e) / 5)
    assert overall["position_error"] == pytest.approx((0 + 1 + 0 + 2 / 3 + 4 / 3) / 5)
    # Tie-aware columns: a tie is never a correct decision (c and e lose), top2 undefined for k = 2.
    assert overall["strict_top1"] == pytest.approx(2 / 5) and overall["strict_top2"] == pytest.approx(1 / 2)
    tau_e = -2 / math.sqrt(6)  # tau-b: two discordant pairs, one tie in the predictions
    assert overall["strict_kendall_tau"] == pytest.approx((1 - 1 + 0 + 1 / 3 + tau_e) / 5)
    assert scipy_stats.kendalltau([100, 200, 200], [3, 2, 1])[0] == pytest.approx(tau_e)
    assert overall["strict_position_error"] == pytest.approx((0 + 1 + 0.5 + 2 / 3 + 4 / 3) / 5)
    assert overall["truncated_answers"] is None  # this scorer does not say
    by_type = summary["tables"]["by pair type"]
    assert by_type["2pair"]["n"] == 3 and by_type["2pair"]["exact_match"] == pytest.approx(1 / 3)
    assert by_type["2pair"]["top2"] == 1.0 and by_type["3pair"]["top2"] == 0.0
    assert by_type["2pair"]["strict_top2"] is None and by_type["3pair"]["strict_top2"] == pytest.approx(0.5)
    by_label = summary["tables"]["by label"]
    assert set(by_label) == {"color", "object", "style"} and by_label["color"]["top1"] == pytest.approx(0.5)
    assert by_label["object"]["ndcg"] == pytest.approx((1 + ndcg_d) / 2)
    assert by_label["object"]["strict_ndcg"] == pytest.approx(
        ((1 + 1 / l3) / 2 + 2.5 / (2 + 1 / l3)) / 2)


def test_official_mer_metrics_by_hand():
    # scores [0.9, 0.5, 0.7]: p = [0, 2, 1]
    # ndcg = (3/log2 2 + 2/log2 4 + 1/log2 3) / (3/log2 2 + 2/log2 3 + 1/log2 4) = 4.63093 / 4.76186
    m = M.official_ranking_metrics([0.9, 0.5, 0.7])
    assert m["ndcg"] == pytest.approx((3 + 1 + 1 / math.log2(3)) / (3 + 2 / math.log2(3) + 0.5))
    assert m["ndcg"] == pytest.approx(0.97250, abs=1e-5) and round(m["ndcg"], 3) == 0.973
    assert (m["top1"], m["top2"], m["exact_match"]) == (1.0, 0.0, 0.0)
    assert m["kendall_tau"] == pytest.approx(1 / 3) and m["spearman_rho"] == pytest.approx(0.5)
    assert m["position_error"] == pytest.approx(2 / 3)
    # all tied: the stable sort keeps the true order, so everything but exact_match is perfect
    assert M.official_ranking_metrics([0.4, 0.4, 0.4]) == {
        "exact_match": 0.0, "kendall_tau": 1.0, "spearman_rho": 1.0, "ndcg": 1.0, "top1": 1.0, "top2": 1.0,
        "position_error": 0.0}
    # ties resolve by true position only among the tied: [1, 3, 3, 2] -> p = [1, 2, 3, 0]
    m = M.official_ranking_metrics([1, 3, 3, 2])
    assert m["top1"] == 0 and m["top2"] == 0 and m["position_error"] == pytest.approx((1 + 1 + 1 + 3) / 4)
    # tau: pairs of p (1,2) C, (1,3) C, (1,0) D, (2,3) C, (2,0) D, (3,0) D -> 0
    assert m["kendall_tau"] == 0.0
    assert M.official_ranking_metrics([1.0, 2.0])["top2"] == 1.0  # any 2-pair group
    assert M.official_ranking_metrics([3, 2, 1, 0])["exact_match"] == 1.0


def test_mer_formats_agree(mer_parquet, mer_arrow, mer_jsonl):
    results = [evaluate(MERBench(path), PixelScorer())["tables"] for path in (mer_parquet, mer_arrow, mer_jsonl)]
    assert results[0] == results[1] == results[2]


def test_mer_bad_data_names_the_record(tmp_path):
    table = _mer_table("3pair")
    pq.write_table(table, tmp_path / "2pair-00000-of-00001.parquet")  # 3 edits in a file named 2pair
    with pytest.raises(BenchmarkError, match=r"2pair-00000-of-00001.parquet#row 0: 3 edited images in a 2pair"):
        MERBench(tmp_path)
    (tmp_path / "2pair-00000-of-00001.parquet").unlink()
    (tmp_path / "x.jsonl").write_text(json.dumps({"pair_id": "z", "instruction": "i", "original_image": "nope.png",
                                                  "edited_images": ["nope.png", "nope.png"]}) + "\n")
    bench = MERBench(tmp_path)
    assert bench.records[0]["pair_type"] == "2pair" and bench.records[0]["label"] == "unlabeled"
    with pytest.raises(BenchmarkError, match=r"x.jsonl:1 original_image: image file not found"):
        evaluate(bench, PixelScorer())
    (tmp_path / "x.jsonl").write_text(json.dumps({"pair_id": "z", "edited_images": []}) + "\n")
    with pytest.raises(BenchmarkError, match=r"x.jsonl:1: missing field\(s\) \['instruction'\]"):
        MERBench(tmp_path)


# ---------------------------------------------------------------- EditReward-Bench

# (task_type, dimension, key1, key2, (R, G) of output 1, (R, G) of output 2)
ER_ROWS = [
    ("subject-add", "prompt_following", "add1", "add2", (200, 50), (100, 100)),   # R 200 > 100: right
    ("subject-add", "consistency", "add1", "add2", (200, 50), (100, 100)),        # G 50 < 100: wrong
    ("subject-add", "overall", "add1", "add2", (200, 50), (100, 100)),            # 250 > 200: right
    ("color_alter", "prompt_following", "col1", "col2", (100, 30), (100, 20)),    # tie: wrong
    ("color_alter", "consistency", "col1", "col2", (100, 30), (100, 20)),         # right
    ("color_alter", "overall", "col1", "col2", (100, 30), (100, 20)),             # right
    ("weird_task", "overall", "w1", "w2", (10, 10), (20, 20)),                    # wrong
]


@pytest.fixture(scope="module")
def editreward_jsonl(tmp_path_factory):
    root = tmp_path_factory.mktemp("editreward")
    lines = []
    for task, dim, k1, k2, c1, c2 in ER_ROWS:
        (root / "input.png").write_bytes(png(1, 2, 3))
        for key, (r, g) in ((k1, c1), (k2, c2)):
            (root / f"{key}.png").write_bytes(png(r, g))
        lines.append(json.dumps({"key": [k1, k2], "instruction": f"do {task}", "task_type": task, "dimension": dim,
                                 "input_image": "input.png", "output_images": [f"{k1}.png", f"{k2}.png"]}))
    (root / "bench.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_editreward_accuracy_by_hand(editreward_jsonl):
    scorer = PixelScorer()
    summary = evaluate(EditRewardBench(editreward_jsonl), scorer)
    assert len(scorer.scored) == 6  # each output key scored once, whatever the number of dimensions
    by_task = summary["tables"]["by task type"]
    assert by_task["subject-add"] == {"n": 3, "prompt_following": 1.0, "consistency": 0.0, "overall": 1.0}
    assert by_task["color_alter"] == {"n": 3, "prompt_following": 0.0, "consistency": 1.0, "overall": 1.0}
    # weird_task has no pair judged on prompt_following or consistency: 0.0 there, as officially
    assert by_task["weird_task"] == {"n": 1, "prompt_following": 0.0, "consistency": 0.0, "overall": 0.0}
    overall = summary["overall"]  # averages across the three task types, the 0.0s included
    assert overall["prompt_following"] == pytest.approx((1 + 0 + 0) / 3)
    assert overall["consistency"] == pytest.approx((0 + 1 + 0) / 3)
    assert overall["overall"] == pytest.approx(2 / 3) and overall["micro_accuracy"] == pytest.approx(4 / 7)
    groups = summary["tables"]["by group"]
    assert set(groups) == {"object", "appearance", "other"}
    assert groups["object"]["consistency"] == 0.0 and groups["appearance"]["consistency"] == 1.0
    assert groups["other"]["prompt_following"] == 0.0


def test_tiger_lab_editreward_bench_is_refused_by_name(tmp_path):
    rows = [{"instruction": "make it blue", "source_image": {"bytes": png(1), "path": None},
             "candidate_1": {"bytes": png(2), "path": None}, "candidate_2": {"bytes": png(3), "path": None},
             "ranking": "1>2"}]
    (tmp_path / "2pair").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "2pair" / "train-00000-of-00001.parquet")
    for loader in (EditRewardBench, MERBench):
        with pytest.raises(BenchmarkError, match=r"row 0: this is TIGER-Lab/EditReward-Bench .*"
                                                 r"EditScore/EditReward-Bench"):
            loader(tmp_path)


def test_editreward_parquet_and_errors(editreward_jsonl, tmp_path):
    rows = [json.loads(line) for line in (editreward_jsonl / "bench.jsonl").read_text().splitlines()]
    for row in rows:  # the Hub layout: images embedded as {bytes, path}
        row["input_image"] = {"bytes": (editreward_jsonl / row["input_image"]).read_bytes(), "path": None}
        row["output_images"] = [{"bytes": (editreward_jsonl / p).read_bytes(), "path": p} for p in row["output_images"]]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train-00000-of-00001.parquet")
    from_parquet = evaluate(EditRewardBench(tmp_path), PixelScorer())
    from_jsonl = evaluate(EditRewardBench(editreward_jsonl), PixelScorer())
    assert from_parquet["tables"] == from_jsonl["tables"]
    bad = dict(rows[0], dimension="beauty")
    pq.write_table(pa.Table.from_pylist([bad]), tmp_path / "train-00000-of-00001.parquet")
    with pytest.raises(BenchmarkError, match="row 0: dimension 'beauty'"):
        EditRewardBench(tmp_path)
    clash = [rows[0], dict(rows[1], instruction="something else")]
    pq.write_table(pa.Table.from_pylist(clash), tmp_path / "train-00000-of-00001.parquet")
    with pytest.raises(BenchmarkError, match="output out/add1 has instruction 'something else'"):
        EditRewardBench(tmp_path)


# ---------------------------------------------------------------- MMRB2

# id, number of source images, chosen, R of response A, R of response B
MMRB2_PAIRS = [("p1", 1, "A", 200, 100), ("p2", 1, "B", 200, 100), ("p3", 2, "B", 50, 90),
               ("p4", 3, "A", 120, 120), ("p5", 1, "A", 90, 30)]


@pytest.fixture(scope="module")
def mmrb2_release(tmp_path_factory):
    """MMRB2's release layout: edit.json with list-style prompt/response content, relative paths."""
    root = tmp_path_factory.mktemp("mmrb2")
    (root / "images").mkdir()
    (root / "input_images").mkdir()
    pairs = []
    for pid, n_src, chosen, ra, rb in MMRB2_PAIRS:
        content = [["text", f"edit {pid}"]]
        for s in range(n_src):
            (root / "input_images" / f"{pid}_{s}.png").write_bytes(png(s))
            content.append(["image", f"input_images/{pid}_{s}.png"])
        for side, r in (("a", ra), ("b", rb)):
            (root / "images" / f"{pid}_{side}.png").write_bytes(png(r))
        pairs.append({"id": pid, "prompt_source": "emu-edit" if n_src == 1 else "new_synthetic_edit",
                      "prompt_content": content, "chosen": chosen,
                      "response_a": {"model_name": "m1", "response_content": [["image", f"images/{pid}_a.png"]]},
                      "response_b": {"model_name": "m2", "response_content": [["image", f"images/{pid}_b.png"]]}})
    (root / "edit.json").write_text(json.dumps({"pairs": pairs}))
    (root / "t2i.json").write_text("{}")  # other tasks' files in the same folder are ignored
    return root


def test_mmrb2_accuracy_and_multi_image(mmrb2_release, tmp_path):
    scorer = PixelScorer()
    summary = evaluate(MMRB2Bench(mmrb2_release), scorer)
    assert summary["overall"] == {"n": 5, "accuracy": pytest.approx(3 / 5), "truncated_answers": None,
                                  "unparsed_answers": None}
    assert summary["tables"]["by subset"] == {"multi-image": {"n": 2, "accuracy": 0.5},
                                              "single-image": {"n": 3, "accuracy": pytest.approx(2 / 3)}}
    # the official breakdowns: p1 right, p2 wrong, p5 right (1 image); p3 right (2); p4 tie, wrong (3)
    assert summary["tables"]["by input images"] == {"1": {"n": 3, "accuracy": pytest.approx(2 / 3)},
                                                    "2": {"n": 1, "accuracy": 1.0}, "3": {"n": 1, "accuracy": 0.0}}
    assert summary["tables"]["by source"] == {"emu-edit": {"n": 3, "accuracy": pytest.approx(2 / 3)},
                                              "new_synthetic_edit": {"n": 2, "accuracy": 0.5}}
    assert sorted((i, n) for i, _, _, n in scorer.scored) == sorted(
        (f"edit {pid}", n) for pid, n, *_ in MMRB2_PAIRS for _ in "ab")
    # the documented JSONL form gives the same numbers
    lines = []
    for pid, n_src, chosen, *_ in MMRB2_PAIRS:
        images = [str(mmrb2_release / "input_images" / f"{pid}_{s}.png") for s in range(n_src)]
        lines.append(json.dumps({"id": pid, "prompt_content": {"text": f"edit {pid}", "images": images},
                                 "response_a": str(mmrb2_release / "images" / f"{pid}_a.png"),
                                 "response_b": str(mmrb2_release / "images" / f"{pid}_b.png"), "chosen": chosen}))
    (tmp_path / "mmrb2.jsonl").write_text("\n".join(lines))
    again = evaluate(MMRB2Bench(tmp_path / "mmrb2.jsonl"), PixelScorer())
    assert again["overall"] == summary["overall"] and again["tables"]["by subset"] == summary["tables"]["by subset"]
    (tmp_path / "mmrb2.jsonl").write_text(lines[0].replace('"chosen": "A"', '"chosen": "tie"'))
    with pytest.raises(BenchmarkError, match="mmrb2.jsonl:1: chosen must be 'A' or 'B'"):
        MMRB2Bench(tmp_path / "mmrb2.jsonl")


LIST_OF_IMAGES = pa.list_(IMAGE)
MMRB2_HUB_SCHEMA = pa.schema([
    ("pair_id", pa.string()), ("prompt_text", pa.string()), ("prompt_images", LIST_OF_IMAGES),
    ("response_a_text", pa.string()), ("response_a_images", LIST_OF_IMAGES),
    ("response_b_text", pa.string()), ("response_b_images", LIST_OF_IMAGES), ("chosen", pa.string()),
    ("prompt_source", pa.string()), ("response_a_model", pa.string()), ("response_b_model", pa.string()),
    ("human_annotations", pa.string()), ("prompt_metadata", pa.string())])


def _mmrb2_hub_rows():
    """MMRB2_PAIRS in the Hub release's `edit` layout: images embedded, <image_N> markers."""
    rows = []
    for pid, n_src, chosen, ra, rb in MMRB2_PAIRS:
        markers = "".join(f"<image_{s + 1}>" for s in range(n_src))
        rows.append({
            "pair_id": pid, "prompt_text": f"{markers}\nedit {pid}",
            "prompt_images": [{"bytes": png(s), "path": f"{pid}_{s}.png"} for s in range(n_src)],
            "response_a_text": "", "response_a_images": [{"bytes": png(ra), "path": None}],
            "response_b_text": "", "response_b_images": [{"bytes": png(rb), "path": None}],
            "chosen": chosen.lower() if pid == "p2" else chosen,
            "prompt_source": "emu-edit" if n_src == 1 else "new_synthetic_edit",
            "response_a_model": "m1", "response_b_model": "m2", "human_annotations": json.dumps([6, 5, 6]),
            "prompt_metadata": json.dumps({"id": pid})})
    return rows


def test_mmrb2_hub_release(mmrb2_release, tmp_path):
    """The HF release read from local copies (Parquet shards of the repo, or save_to_disk arrow)
    gives the same records, instructions, images and numbers as edit.json."""
    rows = _mmrb2_hub_rows()
    repo = tmp_path / "multimodal-rewardbench-2"
    for config in ("edit", "t2i"):  # the repo holds every config; only edit/ is read
        (repo / config).mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(rows, MMRB2_HUB_SCHEMA), repo / config / "test-00000-of-00001.parquet",
                       row_group_size=2)
    saved = tmp_path / "saved"
    saved.mkdir()
    with pa.ipc.new_stream(str(saved / "data-00000-of-00001.arrow"), MMRB2_HUB_SCHEMA) as writer:
        writer.write_table(pa.Table.from_pylist(rows, MMRB2_HUB_SCHEMA), max_chunksize=1)
    (saved / "state.json").write_text("{}")
    reference_scorer = PixelScorer()
    reference = evaluate(MMRB2Bench(mmrb2_release), reference_scorer)
    for path in (repo, repo / "edit" / "test-00000-of-00001.parquet", saved):
        scorer = PixelScorer()
        bench = MMRB2Bench(path)
        assert [r["id"] for r in bench.records] == [p[0] for p in MMRB2_PAIRS]
        assert bench.records[0]["human_annotations"] == [6, 5, 6]
        summary = evaluate(bench, scorer)
        assert summary["overall"] == reference["overall"] and summary["tables"] == reference["tables"], path
        assert sorted(scorer.scored) == sorted(reference_scorer.scored)  # same text, pixels, image counts
    # bad rows are named
    bad = [dict(rows[0], prompt_text="<image_1><image_2> edit p1")]
    pq.write_table(pa.Table.from_pylist(bad, MMRB2_HUB_SCHEMA), tmp_path / "bad.parquet")
    with pytest.raises(BenchmarkError, match=r"bad.parquet#row 0: prompt_text has 2 <image_N> markers but "
                                             r"prompt_images holds 1 image"):
        MMRB2Bench(tmp_path / "bad.parquet")
    bad = [dict(rows[0], human_annotations="[6, 5,")]
    pq.write_table(pa.Table.from_pylist(bad, MMRB2_HUB_SCHEMA), tmp_path / "bad.parquet")
    with pytest.raises(BenchmarkError, match=r"bad.parquet#row 0: human_annotations is not valid JSON"):
        MMRB2Bench(tmp_path / "bad.parquet")
    bad = [dict(rows[0], response_b_images=[])]
    pq.write_table(pa.Table.from_pylist(bad, MMRB2_HUB_SCHEMA), tmp_path / "bad.parquet")
    with pytest.raises(BenchmarkError, match=r"bad.parquet#row 0 response_b_images: an editing response needs"):
        MMRB2Bench(tmp_path / "bad.parquet")


# ---------------------------------------------------------------- synthetic benchmark


class TruthScorer:
    """Answers from the examples' ground truth, keyed by the edited image's pixels. Options:
    `drop_boxes`: ids whose boxes are left out; `garbage`: ids answered with unparseable text;
    `delta`: added to every score."""

    def __init__(self, examples, drop_boxes=(), garbage=(), delta=(0.0, 0.0)):
        self.by_pixels = {np.asarray(open_image(ex.images[-1])).tobytes(): ex for ex in examples}
        self.drop, self.garbage, self.delta = set(drop_boxes), set(garbage), delta

    def _example(self, image):
        return self.by_pixels[np.asarray(image).tobytes()]

    def _answer(self, ex):
        scores = [s + d for s, d in zip(ex.score, self.delta)]
        if ex.id in self.garbage:
            return scores, False, "no json here"
        return scores, True, json.dumps({"reasoning": "r", "score": scores})

    def score(self, originals, edited, instructions):
        out = []
        for image in edited:
            ex = self._example(image)
            scores, parsed, raw = self._answer(ex)
            boxes = [] if ex.id in self.drop else [{"id": r.id, "label": r.label, "bbox_2d": list(r.bbox_2d)}
                                                   for r in ex.edit_region]
            reward, sc, pq = aggregate(scores, [25, 25])
            out.append({"reward": reward, "sc": sc, "pq": pq, "sc_scores": scores, "pq_scores": [25.0, 25.0],
                        "edit_region": boxes, "parsed": {"sc": parsed, "pq": True}, "raw": {"sc": raw, "pq": "{}"}})
        return out

    def score_pq(self, edited):
        out = []
        for image in edited:
            scores, parsed, raw = self._answer(self._example(image))
            out.append({"pq": aggregate([25, 25], scores)[2], "pq_scores": scores, "parsed": {"pq": parsed},
                        "raw": {"pq": raw}})
        return out


@pytest.fixture(scope="module")
def synthetic_examples():
    from sr_jax.data.synthetic import generate_examples

    examples = list(generate_examples(24, seed=3, split="test", image_size=(48, 64)))
    tasks = {ex.task for ex in examples}
    assert tasks == {"sc", "pq"} and any(ex.task == "sc" and not ex.edit_region for ex in examples)
    return examples


def test_synthetic_perfect_scorer_and_baselines(synthetic_examples):
    summary = evaluate_synthetic(TruthScorer(synthetic_examples), synthetic_examples)
    sc = [ex for ex in synthetic_examples if ex.task == "sc"]
    pqs = [ex for ex in synthetic_examples if ex.task == "pq"]
    model = summary["overall"]
    assert (model["n_sc"], model["n_pq"]) == (len(sc), len(pqs))
    assert model["parse_rate"] == 1 and model["strict_json_rate"] == 1
    assert model["box_precision"] == model["box_recall"] == model["mean_iou"] == model["empty_agreement"] == 1
    assert all(model[f"mae_{k}"] == 0 for k in ("success", "overediting", "naturalness", "artifacts"))
    assert model["reward_spearman"] == pytest.approx(1) and model["sc_spearman"] == pytest.approx(1)
    assert model["pq_spearman"] == pytest.approx(1)

    table = summary["tables"]["model vs baselines"]
    empty, whole = table["empty boxes + mean scores"], table["whole image + mean scores"]
    n_boxes = sum(len(ex.edit_region) for ex in sc)
    no_box_share = np.mean([not ex.edit_region for ex in sc])
    assert empty["box_precision"] is None and empty["box_recall"] == 0
    assert empty["mean_iou"] == pytest.approx(no_box_share) and empty["empty_agreement"] == pytest.approx(no_box_share)
    full = [0, 0, 1000, 1000]
    best = [max(M.box_iou(full, r.bbox_2d) for r in ex.edit_region) for ex in sc if ex.edit_region]
    assert whole["box_precision"] == pytest.approx(sum(b >= 0.5 for b in best) / len(sc))
    assert whole["box_recall"] == pytest.approx(sum(b >= 0.5 for b in best) / n_boxes)
    success = np.array([ex.score[0] for ex in sc])
    artifacts = np.array([ex.score[1] for ex in pqs])
    for baseline in (empty, whole):
        assert baseline["mae_success"] == pytest.approx(np.abs(success - success.mean()).mean())
        assert baseline["mae_artifacts"] == pytest.approx(np.abs(artifacts - artifacts.mean()).mean())
        assert baseline["reward_spearman"] is None and baseline["parse_rate"] is None
    assert set(summary["tables"]["by outcome"]) == {f"sc:{ex.meta['outcome']}" for ex in sc} | {
        f"pq:{ex.meta['artifact']}" for ex in pqs}


def test_synthetic_imperfect_scorer(synthetic_examples):
    sc = [ex for ex in synthetic_examples if ex.task == "sc"]
    boxed = [ex for ex in sc if ex.edit_region]
    dropped = {boxed[0].id, boxed[1].id}
    garbage = {synthetic_examples[0].id}
    scorer = TruthScorer(synthetic_examples, drop_boxes=dropped, garbage=garbage, delta=(-2.0, 1.5))
    model = evaluate_synthetic(scorer, synthetic_examples, batch_size=5)["overall"]
    n_boxes = sum(len(ex.edit_region) for ex in sc)
    lost = sum(len(ex.edit_region) for ex in sc if ex.id in dropped)
    assert model["box_precision"] == 1 and model["box_recall"] == pytest.approx((n_boxes - lost) / n_boxes)
    assert model["mean_iou"] == pytest.approx(1 - 2 / len(sc))
    assert model["parse_rate"] == pytest.approx(1 - 1 / len(synthetic_examples))
    assert model["strict_json_rate"] == pytest.approx(1 - 1 / len(synthetic_examples))
    assert model["mae_success"] == pytest.approx(2.0) and model["mae_overediting"] == pytest.approx(1.5)
    assert model["mae_naturalness"] == pytest.approx(2.0) and model["mae_artifacts"] == pytest.approx(1.5)
    # the per-edit-type table: every SC example once, the dropped boxes in their own edit type's IoU
    by_type = evaluate_synthetic(scorer, synthetic_examples, batch_size=5)["tables"]["by edit type"]
    kinds = {ex.id: f"sc:{ex.meta['edit_type']}" for ex in sc}
    assert set(by_type) == set(kinds.values()) and garbage.isdisjoint(kinds)
    for kind, row in by_type.items():
        members = [i for i, k in kinds.items() if k == kind]
        assert row["n_sc"] == len(members)
        assert row["mean_iou"] == pytest.approx(1 - len(dropped & set(members)) / len(members))


def test_synthetic_sources(synthetic_examples, tmp_path):
    from sr_jax.data.storage import write_array_record
    from sr_jax.eval.benchmarks import parse_synthetic_spec

    write_array_record(tmp_path / "test.array_record", synthetic_examples[:10])
    stored = SyntheticBench.from_data(str(tmp_path), limit=7)
    assert [r["id"] for r in stored.records] == [ex.id for ex in synthetic_examples[:7]]
    direct = evaluate_synthetic(TruthScorer(synthetic_examples), iter(synthetic_examples[:7]))
    assert evaluate(stored, TruthScorer(synthetic_examples))["tables"] == direct["tables"]
    from sr_jax.data.synthetic import generate_examples

    generated = SyntheticBench.from_data("synthetic:3:3", limit=2)
    assert [r["id"] for r in generated.records] == ["synth-test-000000", "synth-test-000001"]
    assert [ex.images for ex in generated.examples] == [ex.images for ex in generate_examples(2, 3, split="test")]
    assert parse_synthetic_spec("synthetic:5") == (5, 0) and parse_synthetic_spec("other") is None
    with pytest.raises(BenchmarkError, match="expected synthetic:N"):
        parse_synthetic_spec("synthetic:many")
    with pytest.raises(BenchmarkError, match="not found"):
        SyntheticBench.from_data(str(tmp_path / "missing.array_record"))


# ---------------------------------------------------------------- runner: cache, resume, shards, report

CONFIG = {"benchmark": "mer", "data": "fixture", "model": "pixels"}


def _lines(path):
    return path.read_text().splitlines() if path.exists() else []


def test_resume_after_limit_and_after_a_crash(mer_parquet, tmp_path):
    first = PixelScorer()
    summary = run(MERBench(mer_parquet, limit=2), lambda: first, tmp_path, config=CONFIG, batch_size=2, progress=False)
    assert summary["overall"]["n"] == 2 and len(first.scored) == 4
    second = PixelScorer()
    summary = run(MERBench(mer_parquet), lambda: second, tmp_path, config=CONFIG, batch_size=2, progress=False)
    assert summary["overall"]["n"] == 5 and len(second.scored) == 8  # only the 8 edits not scored before
    assert not {s[:3] for s in first.scored} & {s[:3] for s in second.scored}
    third = PixelScorer()
    again = run(MERBench(mer_parquet), lambda: third, tmp_path, config=CONFIG, progress=False)
    assert third.scored == [] and again["overall"] == summary["overall"]

    crash_dir = tmp_path / "crash"
    with pytest.raises(KeyboardInterrupt):
        run(MERBench(mer_parquet), FailingScorer, crash_dir, config=CONFIG, batch_size=3, progress=False)
    shard = shard_file(crash_dir, 0, 1)
    assert len(_lines(shard)) == 3
    with open(shard, "a") as handle:  # a line cut off mid-write is not a result
        handle.write('{"id": "3pair/e/2", "result": {"rew')
    resumed = PixelScorer()
    summary = run(MERBench(mer_parquet), lambda: resumed, crash_dir, config=CONFIG, batch_size=3, progress=False)
    assert len(resumed.scored) == 9 and summary["overall"]["n"] == 5
    assert len(read_cache(crash_dir)) == 12


def test_other_configuration_is_refused(mer_parquet, tmp_path):
    run(MERBench(mer_parquet, limit=1), PixelScorer, tmp_path, config=CONFIG, progress=False)
    with pytest.raises(BenchmarkError, match="model: 'pixels' -> 'other'"):
        run(MERBench(mer_parquet), PixelScorer, tmp_path, config=dict(CONFIG, model="other"), progress=False)


def test_sharded_hosts_and_merge(mer_parquet, tmp_path):
    from sr_jax.cli import main

    single = run(MERBench(mer_parquet), PixelScorer, tmp_path / "one", config=CONFIG, progress=False)
    config = dict(CONFIG, data=str(mer_parquet.resolve()))
    out = tmp_path / "two"
    hosts = [PixelScorer(), PixelScorer()]
    assert run(MERBench(mer_parquet), lambda: hosts[1], out, config=config, process_index=1, process_count=2,
               progress=False) is None
    assert not (out / "report.md").exists()
    summary = run(MERBench(mer_parquet), lambda: hosts[0], out, config=config, process_index=0, process_count=2,
                  progress=False)
    assert len(hosts[0].scored) == len(hosts[1].scored) == 6
    ids = [[json.loads(line)["id"] for line in _lines(shard_file(out, i, 2))] for i in range(2)]
    jobs = MERBench(mer_parquet).job_ids()
    assert ids == [jobs[0::2], jobs[1::2]]
    assert summary["overall"] == single["overall"] and summary["tables"] == single["tables"]

    (out / "report.md").unlink()
    assert main(["eval", "mer", "--data", str(mer_parquet), "--out", str(out), "--merge"]) == 0
    assert "| 2pair |" in (out / "report.md").read_text()
    assert main(["eval", "mer", "--data", str(mer_parquet), "--out", str(tmp_path / "nothing"), "--merge"]) == 2


def test_report_and_plot(mer_parquet, tmp_path):
    summary = run(MERBench(mer_parquet), PixelScorer, tmp_path, config=CONFIG, progress=False)
    report = (tmp_path / "report.md").read_text()
    assert "## By pair type" in report and "## By label" in report and "![per-category results](plot.png)" in report
    row = next(line for line in report.splitlines() if line.startswith("| 3pair |"))
    assert f"{summary['tables']['by pair type']['3pair']['top2']:.4f}" in row
    with Image.open(tmp_path / "plot.png") as im:
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["overall"] == pytest.approx(summary["overall"])
    items = [json.loads(line) for line in _lines(tmp_path / "items.jsonl")]
    assert [i["id"] for i in items] == [r["id"] for r in MERBench(mer_parquet).records]


# ---------------------------------------------------------------- end to end with a real (tiny) model


def test_eval_defaults_are_the_official_evaluation_settings():
    from sr_jax.eval.cli import _scorer_options

    opts = _scorer_options([], batch_size=3)
    assert (opts.max_new_tokens, opts.parse_mode, opts.batch_size) == (4096, "official_eval", 6)
    opts = _scorer_options(["max_new_tokens=64", "parse_mode=strict", "batch_size=5"], batch_size=3)
    assert (opts.max_new_tokens, opts.parse_mode, opts.batch_size) == (64, "strict", 5)
    with pytest.raises(ValueError, match="parse_mode"):
        _scorer_options(["parse_mode=lenient"], batch_size=3)


def test_truncated_answers_are_counted_apart_from_parse_failures(mer_parquet):
    class CutScorer(PixelScorer):
        """Every edit whose red is 100 was cut off in its SC answer; red 50 gave no JSON."""

        def score(self, originals, edited, instructions):
            out = super().score(originals, edited, instructions)
            for image, r in zip(edited, out):
                red = pixel(image)[0]
                r["truncated"] = {"sc": red == 100, "pq": False}
                r["parsed"] = {"sc": red != 100 and red != 50, "pq": True}
            return out

    overall = evaluate(MERBench(mer_parquet), CutScorer())["overall"]
    # reds over all 12 edits: 200 100 | 100 200 | 150 150 | 250 50 100 | 100 200 200
    assert overall["truncated_answers"] == 4 and overall["unparsed_answers"] == 1


def test_eval_cli_end_to_end_with_tiny_model(tiny_hf_dir, tmp_path, monkeypatch):
    from sr_jax.cli import main
    from sr_jax.data.synthetic import generate_examples
    from sr_jax.eval.runner import score_pq_only
    from sr_jax.reward.scorer import Scorer

    n = 2
    examples = list(generate_examples(n, seed=0, split="test"))
    assert {ex.task for ex in examples} == {"sc", "pq"}  # both scoring paths run
    args = ["eval", "synthetic", "--model", str(tiny_hf_dir), "--data", f"synthetic:{n}", "--out", str(tmp_path),
            "--batch-size", "2", "--set", "max_new_tokens=6", "--set", "max_pixels=16384",
            "--process-index", "0", "--process-count", "1", "--no-progress"]
    assert main(args) == 0
    for name in ("run.json", "results.json", "items.jsonl", "report.md", "plot.png"):
        assert (tmp_path / name).is_file()
    cache = read_cache(tmp_path)
    assert sorted(cache) == sorted(ex.id for ex in examples)
    results = json.loads((tmp_path / "results.json").read_text())
    # answers cut at max_new_tokens are counted from the generator's own flag
    flags = [cut for r in cache.values() for cut in r["truncated"].values()]
    assert len(flags) == 3 and results["overall"]["truncated_answers"] == sum(flags)
    assert "truncated_answers" in (tmp_path / "report.md").read_text()
    options = json.loads((tmp_path / "run.json").read_text())["scorer_options"]
    assert options["max_new_tokens"] == 6 and options["parse_mode"] == "official_eval"
    assert (results["overall"]["n_sc"], results["overall"]["n_pq"]) == (
        sum(ex.task == "sc" for ex in examples), sum(ex.task == "pq" for ex in examples))
    assert 0 <= results["overall"]["parse_rate"] <= 1
    with monkeypatch.context() as patch:  # everything cached: no model is loaded, nothing scored again
        patch.setattr(Scorer, "from_pretrained", classmethod(lambda *a, **k: pytest.fail("model loaded")))
        assert main(args) == 0
    assert len(_lines(shard_file(tmp_path, 0, 1))) == n

    # the PQ-only path gives the same answer as the PQ half of a full SC+PQ call
    scorer = Scorer.from_pretrained(tiny_hf_dir, max_new_tokens=6, max_pixels=16384, batch_size=4)
    pq_example = next(ex for ex in examples if ex.task == "pq")
    image = open_image(pq_example.images[0])
    full = scorer.score([image], [image], ["keep it"])[0]
    assert score_pq_only(scorer, [image])[0]["raw"]["pq"] == full["raw"]["pq"]
    assert cache[pq_example.id]["raw"]["pq"] == full["raw"]["pq"]
