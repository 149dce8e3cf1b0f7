"""The released RL data path: ms-swift GRPO rows (`rl/data.json`: messages, images, `solution` =
"sc"/"pq", instruction, id) imported as prompt-only verbatim records; `sr-jax rl` trains on them
with an HTTP judge (a loopback stub scoring by a rule and counting its calls) and the format
reward; rewards that need ground truth are refused by name before anything is built."""

import hashlib
import http.server
import io
import json
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sr_jax.cli import main
from sr_jax.data.storage import ArrayRecordSource
from sr_jax.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "configs" / "rl" / "demo_cpu.yaml"
# Our own prompt words, in the shape of the released rows (tags first, then the request).
SC_PROMPT = "<image><image>Look at the source picture and its edit. The request was: {}. Answer in JSON."
PQ_PROMPT = "<image>Judge how natural this edited picture looks. Answer in JSON."


def _png(path: Path, seed: int, size=(52, 48)) -> str:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path.name


def _rows(folder: Path) -> list:
    img = [_png(folder / f"im{i}.png", i) for i in range(6)]
    rows = [
        {"id": "sc-1", "messages": [{"role": "user", "content": SC_PROMPT.format('change the sign "OPEN" to "CLOSED"')}],
         "images": [img[0], img[1]], "solution": "sc", "instruction": 'change the sign "OPEN" to "CLOSED"'},
        {"id": "pq-1", "messages": [{"role": "user", "content": PQ_PROMPT}], "images": [img[2]],
         "solution": "pq", "instruction": ""},
        # No tags: ms-swift puts the images first. A trailing assistant turn is dropped (GRPO samples it).
        {"id": "sc-2", "messages": [{"role": "user", "content": "Compare the two pictures for the request."},
                                    {"role": "assistant", "content": "{}"}],
         "images": [img[3], {"path": img[4]}], "solution": " SC ", "instruction": "add a red hat"},
        {"id": "pq-2", "conversations": [{"from": "human", "value": PQ_PROMPT}], "images": img[5], "solution": "pq"},
        # bad rows, each skipped with its reason
        {"id": "bad-task", "messages": [{"role": "user", "content": PQ_PROMPT}], "images": [img[2]], "solution": "qa"},
        {"id": "bad-image", "messages": [{"role": "user", "content": PQ_PROMPT}], "images": ["nope.png"],
         "solution": "pq"},
        {"id": "bad-count", "messages": [{"role": "user", "content": SC_PROMPT.format("x")}], "images": [img[0]],
         "solution": "sc", "instruction": "x"},
        5,
    ]
    return rows


def _write_data(folder: Path) -> Path:
    text = json.dumps(_rows(folder), indent=1)
    # a row with a 5000-digit number: not readable by json, isolated like the others
    text = text[:-2] + ',\n {"id": "huge", "solution": "pq", "n": ' + "9" * 5000 + "}\n]"
    path = folder / "data.json"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rl_data")
    src = _write_data(folder)
    out = folder / "rl.array_record"
    return src, out


def test_import_keeps_prompts_verbatim_and_counts_bad_rows(imported, capsys):
    src, out = imported
    assert main(["data", "import", "--format", "grpo-json", "--src", str(src), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "read 9, kept 4, skipped 5 (bad_json=2, bad_task=1, image_count=1, missing_image=1)" in printed
    records = {r.id: r for r in ArrayRecordSource(out)}
    assert sorted(records) == ["pq-1", "pq-2", "sc-1", "sc-2"]
    sc = records["sc-1"]
    assert sc.task == "sc" and sc.instruction == 'change the sign "OPEN" to "CLOSED"'
    assert sc.meta["verbatim"] is True and sc.meta["ground_truth"] is False and "answer" not in sc.meta
    assert sc.meta["prompt"] == SC_PROMPT.format('change the sign "OPEN" to "CLOSED"')
    assert sc.images[0] == (src.parent / "im0.png").read_bytes()
    assert records["sc-2"].meta["prompt"] == "<image><image>Compare the two pictures for the request."
    assert records["sc-2"].meta["answer_dropped"] and records["sc-2"].task == "sc"
    assert records["pq-2"].task == "pq" and len(records["pq-2"].images) == 1
    # the prompt the policy sees is the row's own text, images where its tags stand
    from sr_jax.data.processor import Processor

    processor = Processor(max_pixels=9216)
    ids = processor.encode(records["sc-1"], with_target=False)["input_ids"][0]
    text = processor.tokenizer.decode([int(t) for t in ids if t != processor.tokenizer.image_pad_id])
    assert text == ("<|im_start|>user\n" + SC_PROMPT.format('change the sign "OPEN" to "CLOSED"').replace(
        "<image>", "<|vision_start|><|vision_end|>") + "<|im_end|>\n<|im_start|>assistant\n")

    assert main(["data", "inspect", str(out), "--token-sample", "2"]) == 0  # prompt-only records inspect too
    assert "task: pq=2, sc=2" in capsys.readouterr().out

    # strict: the first bad row is named, and the existing output stays as it was
    before = out.read_bytes()
    assert main(["data", "import", "--format", "grpo-json", "--src", str(src), "--out", str(out), "--strict"]) == 1
    err = capsys.readouterr().err
    assert "record bad-task: 'solution' must be 'sc' or 'pq'" in err
    row_line = next(i for i, line in enumerate(src.read_text().splitlines(), 1) if '"bad-task"' in line) - 1
    assert f"[{src} line {row_line} column 2]" in err  # where the row's "{" stands
    assert out.read_bytes() == before


def test_a_broken_array_keeps_the_rows_before_the_break(tmp_path):
    from sr_jax.data.grpo_import import GRPOImportStats, read_grpo_json

    _png(tmp_path / "a.png", 0)
    good = {"id": "ok", "messages": [{"role": "user", "content": PQ_PROMPT}], "images": ["a.png"], "solution": "pq"}
    (tmp_path / "d.json").write_text("[" + json.dumps(good) + ', {"id": "torn", "messages": [{"role": "us')
    stats = GRPOImportStats()
    assert [r.id for r, _ in read_grpo_json(tmp_path / "d.json", stats)] == ["ok"]
    assert stats.read == 2 and stats.skipped == {"bad_json": 1}
    (tmp_path / "d.jsonl").write_bytes(json.dumps(good).encode() + b'\n{"id": "x\xff", "solution": "pq"}\n')
    stats = GRPOImportStats()
    assert [r.id for r, _ in read_grpo_json(tmp_path / "d.jsonl", stats)] == ["ok"]  # JSON lines too
    assert stats.skipped == {"bad_messages": 1}


class _Judge(http.server.BaseHTTPRequestHandler):
    """Scores by a rule of the completion text (so completions of a prompt differ) and counts calls."""
    calls: list = []
    constant: float | None = None

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert body["task"] in ("sc", "pq") and body["images"]
        for image in body["images"]:
            import base64

            Image.open(io.BytesIO(base64.b64decode(image))).load()
        rule = int(hashlib.sha1(body["completion"].encode()).hexdigest(), 16) % 1000 / 1000
        value = rule if _Judge.constant is None else _Judge.constant
        _Judge.calls.append((body["record_id"], body["task"], body["instruction"], value))
        reply = json.dumps({"reward": value}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


@pytest.fixture
def judge():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Judge.calls, _Judge.constant = [], None
    yield f"http://127.0.0.1:{server.server_address[1]}/judge"
    server.shutdown()


def _rl(out, data, rewards, steps=2):
    return main(["rl", "--config", str(DEMO), f"run.out_dir={out}", f"run.total_steps={steps}",
                 "run.progress_bar=false", "run.tensorboard=false", "run.async_checkpoint=false",
                 "run.save_model=false", "run.checkpoint_every=10", f"data.sources=['{data}']",
                 "data.prompts_per_step=2", "data.shuffle=false", "grpo.max_completion_tokens=8",
                 f"rewards={json.dumps(rewards)}"])


def test_rl_trains_on_imported_prompts_with_the_judge(imported, judge, tmp_path):
    src, out = imported
    if not out.exists():
        assert main(["data", "import", "--format", "grpo-json", "--src", str(src), "--out", str(out)]) == 0
    rewards = [{"name": "judge", "weight": 1.0, "options": {"url": judge, "send_images": True, "timeout_s": 30}},
               {"name": "format", "weight": 0.2, "options": {"allow_think": True}}]
    assert _rl(tmp_path / "run", out, rewards) == 0
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    # one judge call per completion: 2 steps x 2 prompts x 4 samples, with each prompt's own task/instruction
    assert len(_Judge.calls) == 16
    seen = {(rid, task, instr) for rid, task, instr, _ in _Judge.calls}
    assert seen == {("sc-1", "sc", 'change the sign "OPEN" to "CLOSED"'), ("pq-1", "pq", ""),
                    ("sc-2", "sc", "add a red hat"), ("pq-2", "pq", "")}
    for step, row in enumerate(rows):
        values = [v for *_, v in _Judge.calls[8 * step: 8 * step + 8]]
        assert row["reward/judge"] == pytest.approx(np.mean(values), abs=1e-9)
        assert row["reward"] == pytest.approx(np.mean(values) + 0.2 * row["reward/format"], abs=1e-9)
    assert rows[0]["grad_norm"] > 1e-3  # the judge's differences within each group drive the update

    # The same first step with a judge that scores everything alike: no advantage, no gradient.
    _Judge.calls, _Judge.constant = [], 0.5
    assert _rl(tmp_path / "flat", out, rewards[:1], steps=1) == 0
    (flat,) = read_metrics(tmp_path / "flat" / "metrics.jsonl")
    assert len(_Judge.calls) == 8 and flat["reward/judge"] == 0.5 and flat["grad_norm"] < 1e-6


@pytest.mark.parametrize("name", ["iou", "score_error", "empty_list"])
def test_rewards_needing_ground_truth_are_refused_by_name(imported, tmp_path, capsys, name):
    src, out = imported
    if not out.exists():
        assert main(["data", "import", "--format", "grpo-json", "--src", str(src), "--out", str(out)]) == 0
    rewards = [{"name": "judge", "options": {"url": "http://127.0.0.1:1/x"}}, {"name": name, "weight": 0.5}]
    assert _rl(tmp_path / "run", out, rewards) == 2
    err = capsys.readouterr().err
    assert f"reward '{name}' needs ground-truth answers" in err and str(out) in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_format_reward_can_accept_a_leading_think_block():
    from sr_jax.data.records import SpatialExample
    from sr_jax.rl.rewards import build_reward

    record = SpatialExample("p", "pq", [b""], meta={"verbatim": True, "prompt": "<image>x", "ground_truth": False})
    answer = '{"reasoning": "clean", "score": [20, 21]}'
    strict, lenient = build_reward("format"), build_reward("format", {"allow_think": True})
    assert strict(record, answer, {}) == 1.0 and lenient(record, answer, {}) == 1.0
    assert strict(record, "<think>\n\n</think>\n\n" + answer, {}) == 0.0
    assert lenient(record, "<think>\n\n</think>\n\n" + answer, {}) == 1.0
    assert lenient(record, "<think>a</think>" + answer + "<think>b</think>", {}) == 0.0


def test_official_config_mirrors_the_released_recipe_with_the_judge_url_as_a_setting(imported):
    from sr_jax.config import load_config
    from sr_jax.data.pipeline import Sources
    from sr_jax.rl.config import RLConfig
    from sr_jax.rl.rewards import check_rewards_against_data

    cfg = load_config(RLConfig, ROOT / "configs" / "rl" / "spatialreward_8b_grpo_official.yaml",
                      ["rewards.0.options.url=http://judge.example:9000/score"])
    assert [(r.name, r.weight) for r in cfg.rewards] == [("judge", 1.0)]
    assert cfg.rewards[0].options["url"] == "http://judge.example:9000/score" and cfg.rewards[0].options["send_images"]
    g, o = cfg.grpo, cfg.train.optim
    assert (o.learning_rate, o.warmup_ratio, g.beta, g.group_size, g.temperature, g.top_p, g.top_k) == \
        (5e-7, 0.03, 0.02, 4, 0.9, 0.9, 50)
    assert (g.repetition_penalty, g.max_completion_tokens, g.num_iterations, cfg.data.num_epochs) == (1.05, 1024, 1, 1)
    assert (cfg.data.max_pixels, cfg.run.checkpoint_every, cfg.train.lora.enabled) == (401408, 50, False)
    _, out = imported
    if out.exists():  # the judge alone needs no answers: accepted on the prompt-only records
        check_rewards_against_data(cfg.rewards, [str(out)], Sources([str(out)]))


def test_relative_image_paths_can_start_from_an_image_root(tmp_path):
    from sr_jax.data.grpo_import import GRPOImportStats, read_grpo_json

    (tmp_path / "pics").mkdir()
    (tmp_path / "meta").mkdir()
    _png(tmp_path / "pics" / "e.png", 3)
    row = {"id": "r", "messages": [{"role": "user", "content": PQ_PROMPT}], "images": ["e.png"], "solution": "pq"}
    (tmp_path / "meta" / "data.json").write_text(json.dumps([row]))
    stats = GRPOImportStats()
    assert list(read_grpo_json(tmp_path / "meta" / "data.json", stats)) == [] and stats.skipped == {"missing_image": 1}
    (record, _), = read_grpo_json(tmp_path / "meta" / "data.json", image_root=tmp_path / "pics")
    assert record.images == [(tmp_path / "pics" / "e.png").read_bytes()]


def test_a_bad_image_path_costs_its_row_and_no_usable_row_keeps_the_old_output(tmp_path):
    from sr_jax.data.grpo_import import import_grpo_json

    _png(tmp_path / "a.png", 0)
    good = {"id": "ok", "messages": [{"role": "user", "content": PQ_PROMPT}], "images": ["a.png"], "solution": "pq"}
    nul = dict(good, id="nul", images=["a\u0000.png"])  # a NUL byte: the OS refuses the path (ValueError)
    (tmp_path / "d.json").write_text(json.dumps([nul, good]))
    stats = import_grpo_json(tmp_path / "d.json", tmp_path / "out.array_record")
    assert (stats.read, stats.written, dict(stats.skipped)) == (2, 1, {"missing_image": 1})
    before = (tmp_path / "out.array_record").read_bytes()
    (tmp_path / "bad.json").write_text(json.dumps([nul]))
    stats = import_grpo_json(tmp_path / "bad.json", tmp_path / "out.array_record")
    assert stats.written == 0 and (tmp_path / "out.array_record").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []  # no temporary file left
