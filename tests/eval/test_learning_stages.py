"""Issue 19's staged learning check: the colour and locate tasks, the single-region SC source, the
held-out figures of `sr_jax.eval.stages`, and each stage of `tools/learning_check.py` end to end
on the tiny model (a step or two: these runs prove the machinery works, never that it learns)."""

from __future__ import annotations

import collections
import hashlib
import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from sr_jax.data import synth_render as R
from sr_jax.data.pipeline import SyntheticSource
from sr_jax.data.processor import Processor
from sr_jax.data.synthetic import COLOUR_TASK_COLOURS, SynthConfig, generate_example, generate_examples
from sr_jax.eval import stages as S
from sr_jax.reward import parse_output
from sr_jax.rl.rewards import has_ground_truth, iou_reward

ROOT = Path(__file__).resolve().parents[2]
COLOUR = SynthConfig(image_size=(48, 80), tasks=("colour",))
LOCATE = SynthConfig(image_size=(64, 96), tasks=("locate",))


def _pixels(image: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(image)).convert("RGB"))


def _tool(name: str = "learning_check"):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- the synthetic tasks ------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [COLOUR, LOCATE], ids=["colour", "locate"])
def test_grounding_tasks_are_deterministic_and_splits_disjoint(cfg):
    a = list(generate_examples(6, seed=3, split="train", config=cfg))
    b = [generate_example(i, 3, "train", cfg) for i in range(6)]
    assert [(e.id, e.images, e.meta) for e in a] == [(e.id, e.images, e.meta) for e in b]
    assert [e.images for e in generate_examples(3, seed=4, split="train", config=cfg)] != [e.images for e in a[:3]]
    digests = {split: {hashlib.sha256(e.images[0]).hexdigest() for e in generate_examples(20, 3, split, config=cfg)}
               for split in ("train", "validation", "test")}
    assert not digests["train"] & digests["test"] and not digests["train"] & digests["validation"]
    kind = cfg.tasks[0]
    for e in a:
        assert e.id.startswith(f"synth-{kind}-train-") and e.meta["synthetic_task"] == kind and e.verbatim
        assert e.meta["prompt"].count("<image>") == len(e.images) == 1
        assert [list(_pixels(e.images[0]).shape[1::-1])] == e.meta["image_sizes"]


def test_colour_truth_matches_the_pixels():
    seen = collections.Counter()
    for e in generate_examples(40, seed=0, split="train", config=COLOUR):
        mean = _pixels(e.images[0]).reshape(-1, 3).mean(axis=0)
        nearest = min(COLOUR_TASK_COLOURS, key=lambda c: np.abs(mean - R.COLOURS[c]).sum())
        assert nearest == e.meta["colour"]
        assert json.loads(e.meta["answer"]) == {"colour": e.meta["colour"]}
        assert e.task == "pq" and not e.edit_region and not has_ground_truth(e)
        seen[e.meta["colour"]] += 1
    assert len(seen) >= 6  # the classes vary


def test_locate_box_is_the_bbox_of_the_object_pixels():
    checked = 0
    for e in generate_examples(40, seed=1, split="test", config=LOCATE):
        img = _pixels(e.images[0])
        h, w = img.shape[:2]
        region = e.edit_region[0]
        assert json.loads(e.meta["answer"]) == {"edit_region": [region.to_json()]}
        assert region.label == e.meta["object"] and e.meta["shape"] in e.meta["prompt"]
        assert e.meta["object"].split()[0] in e.meta["prompt"]  # the colour is named
        x0, y0, x1, y1 = e.meta["box_px"]
        assert tuple(region.bbox_2d) == R.normalize_box((x0, y0, x1, y1), w, h)
        if e.meta["background"] != "solid":
            continue
        # On a plain background the object is every pixel unlike the most common one.
        colours, counts = np.unique(img.reshape(-1, 3), axis=0, return_counts=True)
        mask = (img != colours[counts.argmax()]).any(axis=-1)
        assert R.mask_bbox(mask) == (x0, y0, x1, y1)
        checked += 1
    assert checked >= 10


def test_locate_records_feed_the_grpo_iou_reward_and_the_parser():
    e = generate_example(0, 0, "test", LOCATE)
    answer = e.meta["answer"]
    assert has_ground_truth(e)
    assert iou_reward(e, answer, parse_output(answer, with_region=True)) == 1.0
    x0, y0, x1, y1 = e.edit_region[0].bbox_2d
    half = json.dumps({"edit_region": [{"id": 0, "label": "x", "bbox_2d": [x0, y0, (x0 + x1) // 2, y1]}]})
    assert 0.3 < iou_reward(e, half, parse_output(half, with_region=True)) < 0.7
    assert S.parse_regions(answer) == [list(e.edit_region[0].bbox_2d)]


@pytest.mark.parametrize("cfg", [COLOUR, LOCATE], ids=["colour", "locate"])
def test_grounding_records_train_on_their_own_prompt_and_answer(cfg):
    """sr_jax's own verbatim records keep sr_jax's chat layout and image resize under `auto`."""
    processor = Processor(None, 3136, 16384)
    e = generate_example(2, 0, "train", cfg)
    assert processor.layout(e) == "sr_jax" and processor.resize_mode(e) == "sr_jax"
    out = processor.encode(e)
    tok = processor.tokenizer
    labels = out["labels"][0]
    assert tok.decode([int(t) for t in labels if t >= 0]) == e.meta["answer"] + "<|im_end|>"
    text = tok.decode([int(t) for t in out["input_ids"][0] if t != tok.image_pad_id])
    assert text.startswith("<|im_start|>user\n<|vision_start|><|vision_end|>" + e.meta["prompt"].replace("<image>", ""))
    plain = processor("<|vision_start|><|image_pad|><|vision_end|>", [Image.open(io.BytesIO(e.images[0]))])
    assert out["image_grid_thw"].tolist() == plain["image_grid_thw"].tolist()  # sr_jax's one resize
    imported = dict(e.meta, source="import")
    assert processor.layout(type(e)(**{**e.__dict__, "meta": imported})) == "qwen3_vl"


def test_single_region_sc_source():
    spec = ("synthetic:n=12,seed=5,split=train,min_side=96,max_side=96,tasks=sc,"
            "edit_types=add+remove+recolor+resize,min_objects=1,max_objects=3,outcome_weights=1+0+0+0+1")
    source = SyntheticSource(spec)
    assert source.config.edit_types == ("add", "remove", "recolor", "resize")
    assert (source.config.min_objects, source.config.max_objects) == (1, 3)
    for i in range(len(source)):
        e = source.fetch(i)
        assert e.task == "sc" and e.meta["edit_type"] in source.config.edit_types
        assert e.meta["outcome"] in ("full", "overedit") and len(e.edit_region) == 1
        assert e.meta["image_sizes"] == [[96, 96], [96, 96]]
    scoped = SyntheticSource(spec + ",backgrounds=solid+gradient,object_size=0.3+0.4").config
    assert scoped.backgrounds == ("solid", "gradient") and scoped.object_size == (0.3, 0.4)
    # The defaults leave the SC/PQ stream exactly as it was.
    plain = SyntheticSource("synthetic:n=3,seed=5,min_side=96,max_side=96")
    assert [plain.fetch(i).images for i in range(3)] == \
        [generate_example(i, 5, "train", SynthConfig(image_size=(96, 96))).images for i in range(3)]


DIFF = ("synthetic:n=40,seed=2,split=test,min_side=96,max_side=96,tasks=diff,edit_types=add+remove+recolor+resize,"
        "min_objects=1,max_objects=2,outcome_weights=0.4+0.3+0.3+0+0")


def test_diff_boxes_are_where_the_two_images_differ():
    """The diff task's truth is read off the pixels: each box bounds the pixels that differ
    between its two images, a failed edit has no box, and the answer is the record's own."""
    source = SyntheticSource(DIFF)
    outcomes = collections.Counter()
    for i in range(len(source)):
        e = source.fetch(i)
        original, edited = (_pixels(im).astype(np.int16) for im in e.images)
        answer = json.loads(e.meta["answer"])
        assert e.task == "sc" and e.verbatim and e.meta["synthetic_task"] == "diff" and not e.instruction
        assert e.meta["prompt"].count("<image>") == 2 and e.meta["image_sizes"] == [[96, 96], [96, 96]]
        assert answer["edit_region"] == [r.to_json() for r in e.edit_region]
        diff = (np.abs(original - edited) > R.CHANGE_TOL).any(axis=-1)
        outcomes[e.meta["outcome"]] += 1
        if e.meta["outcome"] == "failed":
            assert not diff.any() and answer["edit_region"] == [] and "original" in answer["reasoning"]
            assert np.abs(original - edited).max() <= 3
            continue
        assert len(e.edit_region) == 1 and answer["reasoning"].startswith("<|bbox_0|> ")
        assert tuple(e.edit_region[0].bbox_2d) == R.normalize_box(R.mask_bbox(diff), 96, 96)
    assert set(outcomes) == {"full", "partial", "failed"}
    # the same stream of scenes and edits as the SC task: only the prompt and answer differ
    sc = SyntheticSource(DIFF.replace("tasks=diff", "tasks=sc")).fetch(3)
    assert sc.images == source.fetch(3).images and sc.edit_region == source.fetch(3).edit_region


def test_stage3_sources_fit_the_stage_vocabulary(tokenizer):
    """Stage k starts from stage k-1's model, so every stage's data must encode inside the one
    reduced vocabulary (configs/vocab/learn_stages.json) the stages share; the diff task's too."""
    from sr_jax.data.templates import PromptTemplates
    from sr_jax.data.vocab import VocabMap, build_vocab_map

    cfg = yaml.safe_load((ROOT / "configs" / "sft" / "learn_stage3_sc_single.yaml").read_text())
    stage_map = VocabMap.load(ROOT / cfg["model"]["vocab_map"], tokenizer)
    templates = PromptTemplates(**{k: str(ROOT / v) for k, v in cfg["data"]["templates"].items()})
    sc = cfg["data"]["sources"][0]
    diff = sc.replace("tasks=sc", "tasks=diff").replace("0.4+0.1+0.35+0+0.15", "0.5+0.15+0.35+0+0")
    for spec in [*cfg["data"]["sources"], diff]:  # the diff task's words are the SC task's (README, stage 3 v15)
        seen = build_vocab_map([spec], Processor(tokenizer, templates=templates), samples_per_source=60)
        assert set(seen.ids) <= set(stage_map.ids), spec


@pytest.mark.parametrize("spec, named", [
    ("synthetic:n=4,min_objects=two", "min_objects='two' is not an integer"),
    ("synthetic:n=4,edit_types=add+fly", "unknown or empty edit_types: ['fly']"),
    ("synthetic:n=4,tasks=colour+sc", "task 'colour' cannot be mixed"),
    ("synthetic:n=4,tasks=paint", "unknown or empty tasks: ['paint']"),
    ("synthetic:n=4,outcome_weights=1+x", "outcome_weights='1+x' is not numbers"),
    ("synthetic:n=4,outcome_weights=1+2", "outcome_weights needs 5"),
    ("synthetic:n=4,min_objects=3,max_objects=2", "need 1 <= min_objects <= max_objects"),
    ("synthetic:n=4,colours=3", "unknown keys ['colours']"),
    ("synthetic:n=4,backgrounds=solid+plaid", "unknown or empty backgrounds: ['plaid']"),
    ("synthetic:n=4,object_size=0.3", "object_size must be two numbers"),
    ("synthetic:n=4,object_size=big+1", "object_size='big+1' is not two numbers"),
    ("synthetic:n=4,tasks=diff+sc", "task 'diff' cannot be mixed"),
    ("synthetic:n=4,tasks=diff", "task 'diff' boxes only the requested edit: outcome_weights for ['wrong', 'overedit']"),
])
def test_source_spec_errors_name_the_key(spec, named):
    with pytest.raises(ValueError) as e:
        SyntheticSource(spec)
    assert named in str(e.value) and spec in str(e.value)


# ---- held-out figures on hand-made answers -------------------------------------------------------

def test_strict_answer_parsers():
    assert S.parse_colour('{"colour": "red"}') == "red"
    for bad in ('{"colour": "red", "x": 1}', '{"color": "red"}', '"red"', '{"colour": 3}', '{"colour": "red"'):
        assert S.parse_colour(bad) is None
    good = '{"edit_region": [{"id": 0, "label": "a", "bbox_2d": [1, 2, 30, 40]}]}'
    assert S.parse_regions(good) == [[1, 2, 30, 40]]
    assert S.parse_regions('{"edit_region": []}') == []
    for bad in ('{"edit_region": [{"id": 0, "label": "a", "bbox_2d": [30, 2, 1, 40]}]}',
                '{"edit_region": [{"id": 0, "label": "a", "bbox_2d": [1, 2, 30, 1001]}]}',
                '{"edit_region": [{"id": 0, "label": "a", "bbox_2d": [1.5, 2, 30, 40]}]}',
                '{"edit_region": [{"id": 0, "bbox_2d": [1, 2, 30, 40]}]}',
                '{"edit_region": [], "score": [1, 2]}', 'no json'):
        assert S.parse_regions(bad) is None, bad
    assert S.answers_no_region('{"edit_region": [], "reasoning": "<|global|> The image has no red star"}')
    for bad in (good, '{"edit_region": {}}', '{"region": []}', '[]', 'no json', '{"edit_region": [], '):
        assert not S.answers_no_region(bad), bad


def test_colour_metrics_and_majority_baseline():
    truth = ["red", "blue", "red", "green"]
    perfect = S.colour_metrics(truth, truth, ["red", "red", "blue"])
    assert perfect["accuracy"] == 1.0 and perfect["parse_rate"] == 1.0
    assert perfect["majority_class"] == "red" and perfect["majority_accuracy"] == 0.5
    half = S.colour_metrics(["red", None, "red", "blue"], truth, ["green"])
    assert half["accuracy"] == 0.5 and half["parse_rate"] == 0.75 and half["majority_accuracy"] == 0.25


def test_box_metrics_and_baselines():
    truth = [[[100, 100, 300, 300]], [[500, 500, 700, 900]], [[0, 0, 1000, 1000]]]
    perfect = S.box_metrics([t for t in truth], truth)
    assert perfect == {"parse_rate": 1.0, "mean_iou": 1.0, "box_recall": 1.0, "box_precision": 1.0, "examples": 3}
    # One exact, one half box (IoU 0.5), one unparsed (no boxes: IoU 0).
    mixed = S.box_metrics([[[100, 100, 300, 300]], [[500, 500, 700, 700]], None], truth)
    assert mixed["parse_rate"] == pytest.approx(2 / 3) and mixed["mean_iou"] == pytest.approx(0.5)
    assert mixed["box_recall"] == pytest.approx(2 / 3) and mixed["box_precision"] == 1.0
    base = S.box_baselines([[0, 0, 200, 100], [600, 600, 1000, 900]], [[[350, 400, 650, 600]], [[300, 300, 600, 500]]])
    assert base["centre box"]["box"] == [350, 400, 650, 600]
    assert base["mean train box"]["box"] == [300, 300, 600, 500]
    inter = (600 - 350) * (500 - 400)
    other = inter / (2 * 300 * 200 - inter)
    assert base["centre box"]["mean_iou"] == pytest.approx((1 + other) / 2)
    assert base["mean train box"]["mean_iou"] == pytest.approx((1 + other) / 2)
    assert base["centre box"]["parse_rate"] == 1.0 and base["centre box"]["box_recall"] == 0.5


def test_tool_helpers():
    tool = _tool()
    spec = "synthetic:n=200000,seed=0,split=train,min_side=128,max_side=128,tasks=locate"
    assert tool.heldout_spec(spec, 7, 99) == "synthetic:n=7,seed=99,split=test,min_side=128,max_side=128,tasks=locate"
    with pytest.raises(ValueError, match="synthetic training source"):
        tool.heldout_spec("data/train.array_record", 7, 99)
    table = {"model": {"mean_iou": 0.6, "mae_success": 2.0},
             "a": {"mean_iou": 0.2, "mae_success": 5.0}, "b": {"mean_iou": 0.1, "mae_success": 1.0}}
    assert tool.beats_baselines(table, ["mean_iou"]) and not tool.beats_baselines(table, ["mean_iou", "mae_success"])
    assert not tool.beats_baselines({"model": {"mean_iou": None}, "a": {"mean_iou": 0.1}}, ["mean_iou"])
    assert tool.goal_met(0.95, (">=", 0.95)) and not tool.goal_met(3.1, ("<=", 3.0))
    assert not tool.goal_met(None, (">=", 0.0))
    for stage, config in tool.STAGE_CONFIGS.items():
        assert (ROOT / config).is_file(), (stage, config)
    for stage, (config, _) in tool.STAGE_GRPO.items():
        assert (ROOT / config).is_file(), (stage, config)


# ---- each stage end to end on the tiny model ------------------------------------------------------

TINY = ["model.preset=tiny", "run.total_steps=1", "run.progress_bar=false", "run.tensorboard=false",
        "run.async_checkpoint=false"]


def _run(tool, tmp: Path, stage: int, *extra, overrides=()):
    argv = ["--stage", str(stage), "--eval-examples", "2", "--budget", "300", *extra,
            *overrides, f"run.out_dir={tmp}"]
    code = tool.main(argv)
    report = json.loads((tmp / "learning_check.json").read_text())
    assert code == (0 if report["passed"] else 1)  # the exit code follows the goals
    assert (tmp / "heldout_examples.png").is_file()
    return report


@pytest.fixture(scope="module")
def tool():
    return _tool()


@pytest.mark.slow  # about a minute on 2 shared cores (compiles)
def test_stage1_end_to_end(tool, tmp_path):
    report = _run(tool, tmp_path / "s1", 1, "--max-new-tokens", "4", overrides=TINY)
    figures = report["figures"]
    assert report["stage"] == 1 and figures["examples"] == 2 and len(report["answers"]) == 2
    assert 0.0 <= figures["accuracy"] <= 1.0 and figures["majority_class"] in COLOUR_TASK_COLOURS
    # The figures are those of the answers the report lists.
    predicted = [S.parse_colour(a["answer"]) for a in report["answers"]]
    truth = [generate_example(i, 20261123, "test", SyntheticSource(
        "synthetic:n=1,min_side=64,max_side=96,tasks=colour").config).meta["colour"] for i in range(2)]
    assert figures["accuracy"] == np.mean([p == t for p, t in zip(predicted, truth)])
    assert set(report["image_reliance"]) == {"true images", "blank images"}
    assert report["goals_met"] == {"accuracy": figures["accuracy"] >= 0.95}
    # A second run in the same out_dir resumes the training run.
    again = _run(tool, tmp_path / "s1", 1, "--max-new-tokens", "4", overrides=[*TINY, "run.total_steps=2"])
    assert again["train_summary"]["resumed_from"] == 1 and again["train_summary"]["step"] == 2


@pytest.mark.slow  # about three minutes on 2 shared cores (compiles)
def test_stages_2_3_and_4_end_to_end(tool, tmp_path):
    s2 = _run(tool, tmp_path / "s2", 2, "--max-new-tokens", "4", overrides=TINY)
    assert set(s2["figures"]["baselines"]) == {"centre box", "mean train box"}
    assert s2["goals_met"].keys() == {"parse_rate", "mean_iou"}
    assert s2["figures"]["parse_rate"] == np.mean([S.parse_regions(a["answer"]) is not None for a in s2["answers"]])
    # Stage 3 starts from stage 2's exported model (init_from), trains a step, evaluates that model,
    # runs its GRPO phase from it and evaluates the GRPO phase's model.
    grpo = ["run.total_steps=1", "run.progress_bar=false", "run.tensorboard=false", "run.async_checkpoint=false",
            "grpo.max_completion_tokens=4", "grpo.group_size=2", "data.prompts_per_step=1"]
    s3 = _run(tool, tmp_path / "s3", 3, "--max-new-tokens", "4", "--init-from", str(tmp_path / "s2" / "model"),
              "--grpo-budget", "100", *[f"--grpo-set={o}" for o in grpo], overrides=TINY[1:])
    assert "beats baselines" in s3["goals_met"] and s3["init_from"].endswith("model")
    assert {"model", "empty boxes + mean scores"} <= set(s3["table"])
    assert s3["grpo_summary"]["step"] == 1 and s3["evaluated_model"] == str(tmp_path / "s3" / "grpo" / "model")
    assert set(s3["sft_figures"]) >= {"mean_iou", "mae_success"}
    # The SFT phase gets the stage's budget less the GRPO phase's.
    assert yaml.safe_load((tmp_path / "s3" / "run_config.yaml").read_text())["run"]["max_seconds"] == 200
    _check_decision_margin(tmp_path / "s3")
    # Stage 4: held-out greedy IoU before and after one GRPO step from stage 2's model.
    s4 = _run(tool, tmp_path / "s4", 4, "--init-from", str(tmp_path / "s2" / "model"),
              overrides=["run.total_steps=1", "run.progress_bar=false", "run.tensorboard=false",
                         "run.async_checkpoint=false", "grpo.max_completion_tokens=4", "grpo.group_size=2",
                         "data.prompts_per_step=1"])
    for side in ("before", "after"):
        assert len(s4[side]["per_example_iou"]) == 2
        assert s4[side]["iou"] == pytest.approx(np.mean(s4[side]["per_example_iou"]))
    gain = s4["iou_gain"]
    assert gain["mean"] == pytest.approx(s4["after"]["iou"] - s4["before"]["iou"])
    assert s4["goals_met"] == {"iou gain > 0 (95% interval)": gain["low"] > 0}
    assert s4["seeds"]["eval_seed"] == 20261123 and s4["seeds"]["train_data_seed"] == 7


def test_paired_gain_needs_the_interval_above_zero():
    from sr_jax.eval.stages import paired_gain
    before = np.linspace(0.0, 0.5, 100)
    clear = paired_gain(before, before + 0.1)
    assert clear["mean"] == pytest.approx(0.1) and clear["low"] == pytest.approx(0.1) and clear["better"] == 1.0
    noisy = np.random.default_rng(0).normal(0.0, 0.2, 100)
    flat = paired_gain(before, before + noisy - noisy.mean() + 0.005)  # a +0.005 mean gain in noise
    assert flat["mean"] == pytest.approx(0.005) and flat["low"] < 0 < flat["high"]


def _check_decision_margin(run_dir: Path) -> None:
    """tools/decision_margin.py on stage 3's model: its probabilities of the region list's first token
    (padded rows, one example each) against the training loss (packed rows): weighing the two
    tokens 2 instead of 1 adds exactly their negative log-likelihoods once more."""
    import dataclasses

    from sr_jax.config import load_config
    from sr_jax.convert.loading import load_model
    from sr_jax.data.packing import model_inputs
    from sr_jax.data.pipeline import DataPipeline
    from sr_jax.data.vocab import vocab_map_of
    from sr_jax.train.config import LossConfig
    from sr_jax.train.loss import resolve_token_weights
    from sr_jax.train.sft import SFTConfig
    from sr_jax.train.step import forward_loss

    margin = _tool("decision_margin")
    cfg = load_config(SFTConfig, run_dir / "run_config.yaml")
    source, tokenizer = S.heldout_spec(cfg.data.sources[0], 3, 20261123), str(run_dir / "tokenizer")
    model = load_model(run_dir / "model")
    probs = margin.decision_probabilities(model, cfg.data, source, tokenizer)
    examples = list(generate_examples(3, seed=20261123, split="test", config=SyntheticSource(source).config))
    assert sorted(probs) == [0, 1, 2]
    assert all(0 < p_boxes < 1 and 0 < p_none < 1 and p_boxes + p_none <= 1 for p_boxes, p_none in probs.values())
    nll = sum(-np.log(probs[i][0] if ex.edit_region else probs[i][1]) for i, ex in enumerate(examples))

    data = dataclasses.replace(cfg.data, sources=[source], shuffle=False, num_epochs=1, workers=0, tokenizer=tokenizer)
    twice = resolve_token_weights({margin.BOXES: 2.0, margin.NO_EDIT: 2.0}, Processor(tokenizer).tokenizer,
                                  vocab_map_of(model))
    loss_cfg = LossConfig(max_label_tokens=max(data.seq_lens) * data.batch_size)
    plain = weighted = 0.0
    for batch in DataPipeline(data, vision=model.config.vision, vocab_map=vocab_map_of(model)):
        inputs = model_inputs(batch)
        plain += float(forward_loss(model, inputs, loss_cfg).loss_sum)
        weighted += float(forward_loss(model, inputs, loss_cfg, twice).loss_sum)
    assert weighted - plain == pytest.approx(nll, rel=1e-3)

    # A training checkpoint reads like the model exported from it (how a run's curve is read).
    from sr_jax.convert.cli import load_checkpoint_model

    last = max((p for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    from_ckpt = margin.decision_probabilities(load_checkpoint_model(last)[0], cfg.data, source, tokenizer)
    assert sorted(from_ckpt) == sorted(probs)
    assert all(np.allclose(from_ckpt[i], probs[i], rtol=1e-5) for i in probs)
    assert margin.main(["--model", str(run_dir / "model"), str(last), "--config", str(run_dir / "run_config.yaml"),
                        "--examples", "3"]) == 0
