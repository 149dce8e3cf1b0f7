"""`sr-jax demo`'s learn step (issue 19): a model trained from scratch on the colour task, asked
about held-out images. Two steps here: this proves the step trains, answers, scores and draws,
never that it learns (`tools/learning_check.py --stage 1` is that check)."""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

from sr_jax.config import load_config
from sr_jax.data.pipeline import SyntheticSource
from sr_jax.data.synthetic import generate_example
from sr_jax.demo import LEARN_CONFIG, LEARN_EVAL_SEED, learn
from sr_jax.eval import stages as S
from sr_jax.train.sft import SFTConfig


def test_learn_step_trains_answers_and_draws(tmp_path, capsys):
    out = tmp_path / "learn"
    (out / "stale").mkdir(parents=True)  # a previous demo's run: the step starts from scratch
    report = learn(out, steps=2, max_seconds=None, eval_examples=3, max_new_tokens=6,
                   overrides=["run.async_checkpoint=false"])
    printed = capsys.readouterr().out

    assert report["train_summary"]["step"] == 2 and report["train_summary"]["resumed_from"] == 0
    assert not (out / "stale").exists()
    # The answers are those of the held-out records, parsed by the stage-1 parser.
    assert LEARN_CONFIG.name == "learn_stage1_colour.yaml"
    config = SyntheticSource(load_config(SFTConfig, LEARN_CONFIG).data.sources[0]).config
    truth = [generate_example(i, LEARN_EVAL_SEED, "test", config).meta["colour"] for i in range(3)]
    answers = report["answers"]
    assert [a["truth"] for a in answers] == truth
    assert [a["parsed"] for a in answers] == [S.parse_colour(a["answer"]) for a in answers]
    figures = report["figures"]
    assert figures["examples"] == 3
    assert figures["accuracy"] == np.mean([a["parsed"] == a["truth"] for a in answers])
    assert figures["parse_rate"] == np.mean([a["parsed"] is not None for a in answers])
    assert figures["majority_accuracy"] == np.mean([t == figures["majority_class"] for t in truth])
    assert report["learned"] == (figures["accuracy"] >= 0.9 and figures["accuracy"] >= figures["majority_accuracy"] + 0.5)
    reliance = report["image_reliance"]
    assert set(reliance) == {"true images", "blank images"} and all(math.isfinite(v) and v > 0 for v in reliance.values())

    # The figures are printed, with a verdict and the way further.
    assert f"accuracy {figures['accuracy']:.3f}" in printed and f"{figures['majority_accuracy']:.3f}" in printed
    assert f"{reliance['true images']:.4f} with the true images" in printed
    assert ("LEARNED:" in printed) != ("NOT LEARNED" in printed)
    assert "tools/learning_check.py --stage 1" in printed
    assert f"{truth[0]:>8} -> " in printed

    # The picture holds one captioned tile per held-out image; the loss curve is written.
    sizes = [Image.open(io.BytesIO(generate_example(i, LEARN_EVAL_SEED, "test", config).images[0])).size
             for i in range(3)]
    with Image.open(report["picture"]) as sheet:
        assert sheet.size == (sum(2 * w for w, _ in sizes) + 8 * 4, max(2 * h + 14 for _, h in sizes) + 16)
    assert (out / "loss_curve.png").is_file() and report["loss_curve"] == str(out / "loss_curve.png")
    # The trained model was exported with its reduced vocabulary.
    assert (out / "model" / "vocab_map.json").is_file()


def test_demo_flags():
    from sr_jax.cli import build_parser
    from sr_jax.demo import LEARN_SECONDS, LEARN_STEPS, run

    args = build_parser().parse_args(["demo"])
    assert (args.learn_steps, args.learn_seconds, args.func) == (LEARN_STEPS, LEARN_SECONDS, run)
    args = build_parser().parse_args(["demo", "--learn-steps", "0", "--learn-seconds", "30"])
    assert (args.learn_steps, args.learn_seconds) == (0, 30.0)
