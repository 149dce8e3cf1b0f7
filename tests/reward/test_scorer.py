"""Scorer: batched SC+PQ generation equals one-prompt-at-a-time generation; parsing, reward and
grounding are wired as documented; the CLI prints the same result."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from sr_jax.data.image import open_image
from sr_jax.generation import DEFAULT_STOP_IDS, PAD_ID, generate
from sr_jax.reward import aggregate, parse_output
from sr_jax.reward.scorer import Scorer


def picture(w, h, seed, square=None):
    rng = np.random.default_rng(seed)
    base = np.clip(rng.normal(128, 20, (h, w, 3)), 0, 255).astype(np.uint8)
    if square:
        x0, y0, x1, y1 = square
        base[y0:y1, x0:x1] = (220, 30, 30)
    return Image.fromarray(base)


@pytest.fixture(scope="module")
def scorer(tiny_hf_dir):
    return Scorer.from_pretrained(tiny_hf_dir, max_new_tokens=12, batch_size=4, max_pixels=128 * 128)


def test_batched_scoring_equals_single_prompts(scorer):
    originals = [picture(96, 64, 0), [picture(64, 64, 1), picture(80, 48, 2)], picture(64, 96, 3)]
    edited = [picture(96, 64, 4), picture(64, 64, 5), picture(64, 96, 6)]
    instructions = ["make the sky red", "put the cat from image 2 into image 1", "remove the tree"]
    results = scorer.score(originals, edited, instructions)
    assert len(results) == 3
    prompts = scorer._encode_prompts(originals, edited, instructions)
    for i, p in enumerate(prompts):  # each prompt alone, no padding
        new = generate(scorer.model, p["input_ids"], None, p["pixel_values"], p["image_grid_thw"],
                       max_new_tokens=12)[0]
        text = scorer.processor.tokenizer.decode([t for t in new.tolist() if t != PAD_ID], skip_special_tokens=True)
        kind, item = ("sc", i) if i < 3 else ("pq", i - 3)
        assert results[item]["raw"][kind] == text
        # cut off at max_new_tokens = no stop token (<|im_end|>, <|endoftext|>) among the new tokens
        assert results[item]["truncated"][kind] == (not (set(DEFAULT_STOP_IDS) & set(new.tolist())))
    for r in results:
        sc, pq = parse_output(r["raw"]["sc"]), parse_output(r["raw"]["pq"], with_region=False)
        assert r["sc_scores"] == sc["score"] and r["pq_scores"] == pq["score"]
        assert r["reward"] == pytest.approx(aggregate(sc["score"], pq["score"])[0])


def test_sc_only_scoring_asks_no_pq_prompt(scorer, monkeypatch):
    originals, edited, instructions = [picture(96, 64, 0)], [picture(96, 64, 4)], ["remove the tree"]
    asked = []
    real = scorer.generate_answers
    monkeypatch.setattr(scorer, "generate_answers", lambda prompts, *a, **k: asked.append(len(prompts)) or real(prompts, *a, **k))
    both = scorer.score(originals, edited, instructions)
    (sc_only,) = scorer.score(originals, edited, instructions, pq=False)
    assert asked == [2, 1]  # SC + PQ prompts, then the SC prompt alone
    assert sc_only["raw"]["sc"] == both[0]["raw"]["sc"] and sc_only["raw"]["pq"] == ""
    assert sc_only["pq_scores"] == parse_output("", with_region=False)["score"]  # missing: the default
    assert sc_only["sc_scores"] == both[0]["sc_scores"]


def test_result_from_known_answers(scorer):
    before = picture(100, 80, 7)
    after = picture(100, 80, 7, square=(20, 16, 60, 48))
    sc_text = ('{"edit_region": [{"id": 0, "label": "square", "bbox_2d": [200, 200, 600, 600]}], '
               '"reasoning": "<|bbox_0|> red square added <|global|> rest unchanged", "score": [20, 15]}')
    pq_text = '{"reasoning": "clean", "score": [25, 20]}'
    r = scorer._result(before, after, sc_text, pq_text, scorer.options)
    sc, pq = (0.6 * 20 + 0.4 * 15) / 2.5, (0.5 * 25 + 0.5 * 20) / 2.5  # 7.2 and 9.0
    assert r["sc"] == pytest.approx(sc) and r["pq"] == pytest.approx(pq)
    assert r["reward"] == pytest.approx(sc**0.8 * pq**0.2 / 10)
    assert r["edit_region"][0]["bbox_2d"] == [200, 200, 600, 600]
    assert r["grounding"]["coverage"] == pytest.approx(1.0) and r["grounding"]["grounding_score"] > 0.99
    folded = scorer._result(before, after, sc_text, pq_text, scorer.options.replace(grounding_weight=0.5))
    assert folded["reward"] == pytest.approx(0.5 * r["reward"] + 0.5 * r["grounding"]["grounding_score"])
    # the official evaluation's reading: a lone score twice, nothing clamped; [30] -> SC 30/2.5 = 12
    lone = '{"edit_region": [], "reasoning": "", "score": [30]}'
    strict = scorer._result(before, after, lone, pq_text, scorer.options.replace(grounding=False))
    assert strict["sc_scores"] == [25.0, 12.5] and strict["sc"] == pytest.approx(0.6 * 10 + 0.4 * 5)
    official = scorer._result(before, after, lone, pq_text,
                              scorer.options.replace(grounding=False, parse_mode="official_eval"))
    assert official["sc_scores"] == [30.0, 30.0] and official["sc"] == pytest.approx(12.0)
    assert official["reward"] == pytest.approx(12.0**0.8 * pq**0.2 / 10)
    server = scorer._result(before, after, lone, pq_text,
                            scorer.options.replace(grounding=False, parse_mode="official_server"))
    assert server["sc_scores"] == [30.0, 12.5] and server["sc"] == pytest.approx(9.2)  # (18 + 5) / 2.5


def test_score_cli_prints_the_same_result(tiny_hf_dir, scorer, tmp_path, capsys):
    from sr_jax.cli import main
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    picture(64, 64, 8).save(a)
    picture(64, 64, 9, square=(8, 8, 32, 32)).save(b)
    assert main(["score", "--model", str(tiny_hf_dir), "--original", str(a), "--edited", str(b),
                 "--instruction", "add a red square", "--max-new-tokens", "12",
                 "--set", "max_pixels=16384"]) == 0
    printed = json.loads(capsys.readouterr().out)
    direct = scorer.score([str(a)], [str(b)], ["add a red square"])[0]
    assert printed["raw"] == direct["raw"] and printed["reward"] == pytest.approx(direct["reward"])


def test_bad_option_values_are_rejected(scorer):
    for bad in [{"mode": "max"}, {"parse_mode": "loose"}, {"top_p": 0.0}, {"temperature": -1.0}, {"grounding_weight": 2.0}]:
        with pytest.raises(ValueError):
            scorer.validate_options(bad)
    with pytest.raises(ValueError, match="unknown"):
        scorer.validate_options({"no_such_option": 1})
    scorer.validate_options({"mode": "min_geometric", "max_new_tokens": 8})
    scorer.validate_options({"mode": "mean", "parse_mode": "official_eval"})


def test_option_numbers_are_finite_and_bounded():
    """Issue 16: NaN weights gave a null reward and huge seeds a 500; every number is bounded."""
    from sr_jax.reward.scorer import ScorerOptions

    nan, inf = float("nan"), float("inf")
    for bad in [{"w1": nan}, {"w3": inf}, {"score_range": inf}, {"score_range": nan}, {"temperature": nan},
                {"seed": 2**80}, {"seed": -1}, {"max_new_tokens": 10**6}, {"batch_size": 10**9}, {"a": nan}]:
        with pytest.raises(ValueError, match=next(iter(bad))):
            ScorerOptions().replace(**bad)
    ScorerOptions().replace(w1=0.3, seed=2**32 - 1, score_range=100.0, temperature=1.0)
