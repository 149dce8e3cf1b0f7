"""Reward parsing and aggregation: hand-written cases, hypothesis properties, hand-computed formulas."""

import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sr_jax.data.records import Region, SpatialExample
from sr_jax.reward import RewardWeights, aggregate, aggregate_batch, parse_output

GOOD_SC = (
    '{"edit_region": [{"id": 0, "label": "red hat", "bbox_2d": [120, 40, 480, 300]}], '
    '"reasoning": "The hat <|bbox_0|> was added; <|global|> the rest is intact.", "score": [20, 18]}'
)


def _ok(result, with_region=True):
    """Shape invariants every result must satisfy, plus: the safety net never fired."""
    assert isinstance(result["score"], list) and len(result["score"]) == 2
    assert all(type(s) is float and 0.0 <= s <= 25.0 for s in result["score"])
    assert isinstance(result["reasoning"], str)
    assert 0 <= result["missing_scores"] <= 2
    assert not any(e.startswith("internal:") for e in result["errors"]), result["errors"]
    if with_region:
        for r in result["edit_region"]:
            assert type(r["id"]) is int and isinstance(r["label"], str)
            x1, y1, x2, y2 = r["bbox_2d"]
            assert all(type(v) is int for v in r["bbox_2d"])
            assert 0 <= x1 < x2 <= 1000 and 0 <= y1 < y2 <= 1000
    else:
        assert "edit_region" not in result
    return result


# ---------------------------------------------------------------- parse_output: tolerated cases

def test_valid_sc_answer():
    r = _ok(parse_output(GOOD_SC))
    assert r["score"] == [20.0, 18.0] and r["missing_scores"] == 0 and r["parsed"]
    assert r["edit_region"] == [{"id": 0, "label": "red hat", "bbox_2d": [120, 40, 480, 300]}]
    assert r["reasoning"] == "The hat <|bbox_0|> was added; <|global|> the rest is intact."
    assert r["errors"] == []


def test_round_trip_of_training_targets():
    sc = SpatialExample("a", "sc", [b"x", b"y"], "add a hat",
                        [Region(0, "hat", (1, 2, 30, 40)), Region(1, "scarf \"wool\"", (500, 500, 999, 1000))],
                        "see <|bbox_0|> and <|bbox_1|>", (21.5, 3))
    r = _ok(parse_output(sc.target_json()))
    assert r["score"] == [21.5, 3.0] and r["reasoning"] == sc.reasoning
    assert r["edit_region"] == [reg.to_json() for reg in sc.edit_region]
    pq = SpatialExample("b", "pq", [b"y"], reasoning="natural", score=(24, 0))
    r = _ok(parse_output(pq.target_json(), with_region=False), with_region=False)
    assert r["score"] == [24.0, 0.0] and r["reasoning"] == "natural" and r["errors"] == []


def test_think_block_is_removed():
    # The score inside the thinking is a draft; only the answer after it counts.
    text = '<think>maybe {"score": [1, 2]}?</think>\n' + GOOD_SC
    assert _ok(parse_output(text))["score"] == [20.0, 18.0]
    assert _ok(parse_output("I think </think>" + GOOD_SC))["score"] == [20.0, 18.0]


def test_unclosed_think_prefix():
    r = _ok(parse_output("<think>the hat looks fine"))
    assert r["score"] == [12.5, 12.5] and "unclosed_think" in r["errors"] and not r["parsed"]
    r = _ok(parse_output("<think>the hat looks fine\n" + GOOD_SC))
    assert r["score"] == [20.0, 18.0] and "unclosed_think" in r["errors"]


def test_code_fences_and_surrounding_text():
    text = "Here is my evaluation:\n```json\n" + GOOD_SC + "\n```\nHope this helps {really}."
    r = _ok(parse_output(text))
    assert r["score"] == [20.0, 18.0] and len(r["edit_region"]) == 1


def test_single_quotes_python_literals_trailing_commas():
    text = "{'edit_region': [{'id': 0, 'label': 'it\\'s', 'bbox_2d': (1, 2, 3, 4),},], 'reasoning': None, 'score': [True, 7,],}"
    r = _ok(parse_output(text))
    # True is not a score (booleans are rejected), so the first falls back to the middle.
    assert r["score"] == [12.5, 7.0] and r["missing_scores"] == 1
    assert r["edit_region"] == [{"id": 0, "label": "it's", "bbox_2d": [1, 2, 3, 4]}]
    assert r["reasoning"] == "" and "not_strict_json" in r["errors"]


def test_unescaped_quotes_inside_reasoning():
    r = _ok(parse_output('{"edit_region": [], "reasoning": "the "hat" is there", "score": [9, 8]}'))
    assert r["reasoning"] == 'the "hat" is there' and r["score"] == [9.0, 8.0]


@pytest.mark.parametrize("text, expected, missing", [
    ('{"edit_region": [], "reasoning": "cut here', [12.5, 12.5], 2),
    ('{"edit_region": [], "reasoning": "ok", "score": [20, 18', [20.0, 18.0], 0),
    ('{"edit_region": [], "reasoning": "ok", "score":[ "20", "18" ', [20.0, 18.0], 0),
    ('{"edit_region": [], "reasoning": "ok", "score": [20, ', [20.0, 12.5], 1),
    ('{"edit_region": [], "reasoning": "ok", "score": [', [12.5, 12.5], 2),
    # The object is unreadable, but the score is still found by pattern.
    ('{"edit_region": [{"id": 0, "bbox_2d": [1, 2, 3, 4]}] <junk> "score": [20, 18]', [20.0, 18.0], 0),
    ('the answer is "score":[ "20", "18" ] bye', [20.0, 18.0], 0),
    ("score = (3.5, 4", [3.5, 4.0], 0),
])
def test_truncated_and_broken_answers(text, expected, missing):
    r = _ok(parse_output(text))
    assert r["score"] == expected and r["missing_scores"] == missing


def test_truncation_keeps_complete_regions():
    r = _ok(parse_output('{"edit_region": [{"id": 0, "label": "a", "bbox_2d": [1, 2, 3, 4]}, {"id": 1, "label": "b", "bbox_2d": [5, 6'))
    assert r["edit_region"] == [{"id": 0, "label": "a", "bbox_2d": [1, 2, 3, 4]}]
    assert "truncated" in r["errors"] and r["score"] == [12.5, 12.5]


def test_numbers_as_strings_and_clamping():
    r = _ok(parse_output('{"score": ["20.5", "30"]}', with_region=False), with_region=False)
    assert r["score"] == [20.5, 25.0] and "score_clamped" in r["errors"]
    assert _ok(parse_output('{"score": [-3, 1e1]}'))["score"] == [0.0, 10.0]
    assert _ok(parse_output('{"score": "20, 18"}'))["score"] == [20.0, 18.0]
    assert _ok(parse_output('{"score": {"success": 4, "overediting": 5}}'))["score"] == [4.0, 5.0]


def test_missing_and_unreadable_scores_default_to_middle():
    for text in ['{"reasoning": "no score"}', '{"score": ["high", null]}', '{"score": [NaN, Infinity]}', "", "garbage"]:
        r = _ok(parse_output(text))
        assert r["score"] == [12.5, 12.5] and r["missing_scores"] == 2, text
    r = parse_output('{"score": [3]}', with_region=False, score_range=10)
    assert r["score"] == [3.0, 5.0] and r["missing_scores"] == 1
    assert parse_output('{"score": [30, 40]}', score_range=10)["score"] == [10.0, 10.0]


def test_box_validation():
    regions = [
        {"id": 0, "label": "clamped", "bbox_2d": [-20, 10.4, 1100, 999.6]},
        {"id": 1, "label": "swapped", "bbox_2d": [400, 300, 100, 200]},
        {"id": 2, "label": "outside", "bbox_2d": [1200, 0, 1100, 50]},
        {"id": 3, "label": "flat", "bbox_2d": [10, 10, 10, 50]},
        {"id": 4, "label": "three", "bbox_2d": [1, 2, 3]},
        {"id": 5, "label": "word", "bbox_2d": [1, 2, "x", 4]},
        {"id": 6, "label": "nan", "bbox_2d": [1, 2, float("nan"), 4]},
        {"id": "7", "label": "strings", "bbox_2d": ["1", "2", "30", "40"]},
        [5, 5, 50, 50],
        "not a region",
    ]
    text = json.dumps({"edit_region": regions, "reasoning": "r", "score": [1, 2]})  # NaN is written as NaN
    r = _ok(parse_output(text))
    assert r["edit_region"] == [
        {"id": 0, "label": "clamped", "bbox_2d": [0, 10, 1000, 1000]},
        {"id": 1, "label": "swapped", "bbox_2d": [100, 200, 400, 300]},
        {"id": 7, "label": "strings", "bbox_2d": [1, 2, 30, 40]},
        {"id": 8, "label": "", "bbox_2d": [5, 5, 50, 50]},
    ]
    for code in ["region1:box_reordered", "region2:box_empty", "region3:box_empty", "region4:box_shape",
                 "region5:box_value", "region6:box_value", "region9:box_shape"]:
        assert code in r["errors"]


def test_empty_region_list_and_pq_mode():
    r = _ok(parse_output('{"edit_region": [], "reasoning": "failed", "score": [0, 25]}'))
    assert r["edit_region"] == [] and r["score"] == [0.0, 25.0] and r["errors"] == []
    r = _ok(parse_output(GOOD_SC, with_region=False), with_region=False)
    assert r["score"] == [20.0, 18.0]
    assert _ok(parse_output('{"edit_region": "none", "score": [1, 1]}'))["errors"] == ["edit_region_not_list"]


def test_last_answer_wins_over_an_echoed_example():
    text = 'Format: {"edit_region": [], "reasoning": "...", "score": [0, 0]}\nAnswer: ' + GOOD_SC
    assert _ok(parse_output(text))["score"] == [20.0, 18.0]


def test_odd_inputs_never_raise():
    for text in [None, b'{"score": [3, 4]}', 123, "{" * 3000, "[" * 3000, '{"a":' * 500, "\\", "'", '"score": [' + "1" * 500]:
        _ok(parse_output(text))
    assert parse_output(b'{"score": [3, 4]}')["score"] == [3.0, 4.0]


# ---------------------------------------------------------------- parse_output: properties

JSONISH = st.text(alphabet=list('{}[]()"\':,.-+ \n\t0123456789eE<>/`\\scoretTrueNnlaxbid_2kg'), max_size=80)


@settings(max_examples=10_000, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.one_of(st.text(max_size=120), JSONISH))
def test_never_raises_on_arbitrary_text(text):
    _ok(parse_output(text))
    _ok(parse_output(text, with_region=False), with_region=False)


def _expected_box(box):
    v = [int(round(min(max(x, 0), 1000))) for x in box]
    x1, x2 = sorted(v[0::2])
    y1, y2 = sorted(v[1::2])
    return [x1, y1, x2, y2] if x1 < x2 and y1 < y2 else None


score_value = st.one_of(st.integers(-10, 40), st.floats(-10, 40, allow_nan=False), st.integers(0, 25).map(str))
answers = st.fixed_dictionaries({
    "edit_region": st.lists(st.fixed_dictionaries({
        "id": st.integers(0, 9),
        "label": st.text(max_size=12).filter(lambda t: "think>" not in t.lower()),  # see "reasoning"
        "bbox_2d": st.lists(st.integers(-100, 1100), min_size=4, max_size=4),
    }), max_size=3),
    # Think tags are stripped wherever they stand (documented in parse_output), so a reasoning
    # text that holds one does not round-trip; hypothesis draws them from the parser's literals.
    "reasoning": st.text(max_size=60).filter(lambda t: "think>" not in t.lower()),
    "score": st.lists(score_value, min_size=2, max_size=2),
})


@settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck))
@given(answers, st.sampled_from(["json", "indent", "python", "trailing_commas"]),
       st.sampled_from(["", "fence", "think", "chatter"]), st.floats(0, 1))
def test_near_valid_answers(answer, style, wrap, cut):
    # The answer format's key order, score last: the last "score" in the text is then the key
    # (fixed_dictionaries does not promise an order, and reasoning may contain the word).
    answer = {k: answer[k] for k in ("edit_region", "reasoning", "score")}
    if style == "python":
        body = repr(answer)
    else:
        body = json.dumps(answer, ensure_ascii=style == "indent", indent=2 if style == "indent" else None)
    close = body.index("]", body.rindex("score") if style != "python" else body.rindex("'score'")) + 1
    if style == "trailing_commas":
        body = body[: close - 1] + ",]" + body[close:-1] + ",}"
        close += 1
    prefix, suffix = {"": ("", ""), "fence": ("```json\n", "\n```"),
                      "think": ('<think>draft {"score": [1, 1]}</think>', ""),
                      "chatter": ("My verdict: ", " -- done.")}[wrap]
    expected_scores = [min(max(float(s), 0.0), 25.0) for s in answer["score"]]
    expected_regions = [
        {"id": r["id"], "label": r["label"], "bbox_2d": b}
        for r in answer["edit_region"] if (b := _expected_box(r["bbox_2d"])) is not None
    ]

    whole = _ok(parse_output(prefix + body + suffix))
    assert whole["score"] == pytest.approx(expected_scores) and whole["missing_scores"] == 0
    assert whole["edit_region"] == expected_regions
    assert whole["reasoning"] == answer["reasoning"]

    # Truncated anywhere: still a valid result; cut after the score list, the scores survive.
    k = int(cut * len(body))
    truncated = _ok(parse_output(prefix + body[:k]))
    if k >= close:
        assert truncated["score"] == pytest.approx(expected_scores)


# ---------------------------------------------------------------- aggregate

def test_weighted_hand_computed():
    # SC = (0.6*20 + 0.4*15) / 2.5 = 18 / 2.5 = 7.2 ; PQ = (0.5*20 + 0.5*10) / 2.5 = 15 / 2.5 = 6.0
    reward, sc, pq = aggregate([20, 15], [20, 10])
    assert sc == pytest.approx(7.2) and pq == pytest.approx(6.0)
    # exp(0.8*ln 7.2 + 0.2*ln 6) = exp(0.8*1.97408 + 0.2*1.79176) = exp(1.93762) = 6.9422
    assert reward == pytest.approx(7.2**0.8 * 6.0**0.2 / 10)
    assert reward == pytest.approx(0.69422, abs=1e-5)


def test_perfect_and_zero_scores():
    assert aggregate([25, 25], [25, 25]) == pytest.approx((1.0, 10.0, 10.0))
    # PQ = 0 makes the reward 0 (0**0.2 = 0), without NaN.
    reward, sc, pq = aggregate([25, 25], [0, 0])
    assert (reward, sc, pq) == (0.0, 10.0, 0.0)
    assert aggregate([0, 0], [0, 0]) == (0.0, 0.0, 0.0)
    # a = 1 ignores PQ entirely: 0**0 = 1.  SC = (0.6*25 + 0.4*0)/2.5 = 6 -> reward 0.6
    assert aggregate([25, 0], [0, 0], a=1.0)[0] == pytest.approx(0.6)


def test_min_geometric_hand_computed():
    # Official: reward = sqrt(min SC * min PQ) / 2.5 / 10, exponent 0.5 whatever `a` is.
    # SC [20, 10], PQ [25, 25]: sqrt(10 * 25) / 2.5 = 15.8114 / 2.5 = 6.3246 -> 0.632
    for a in (0.8, 0.3, 1.0):
        reward, sc, pq = aggregate([20, 10], [25, 25], mode="min_geometric", a=a)
        assert (sc, pq) == pytest.approx((4.0, 10.0))
        assert reward == pytest.approx(0.63246, abs=1e-5)
    # SC = min(20, 15) / 2.5 = 6.0 ; PQ = min(20, 10) / 2.5 = 4.0 ; sqrt(24) = 4.89898
    assert aggregate([20, 15], [20, 10], mode="min_geometric")[0] == pytest.approx(0.489898, abs=1e-6)


def test_mean_mode_hand_computed():
    # The evaluation's "mean": SC = (20 + 10) / 2 / 2.5 = 6 ; PQ = (25 + 15) / 2 / 2.5 = 8 ; sqrt(48) = 6.9282
    reward, sc, pq = aggregate([20, 10], [25, 15], mode="mean", a=0.1)
    assert (sc, pq) == pytest.approx((6.0, 8.0)) and reward == pytest.approx(0.69282, abs=1e-5)


def test_clamp_off_is_the_evaluation_arithmetic():
    # weighted: SC = 0.6*30/2.5 + 0.4*30/2.5 = 12 (not capped), PQ = 10:
    # 12^0.8 * 10^0.2 = exp(0.8*2.484907 + 0.2*2.302585) = exp(2.448442) = 11.5703
    assert aggregate([30, 30], [25, 25])[0] == 1.0
    reward, sc, pq = aggregate([30, 30], [25, 25], clamp=False)
    assert sc == pytest.approx(12.0) and reward == pytest.approx(1.15703, abs=1e-5)
    # geometric modes cap the combined score: sqrt(20 * 20) = 20 -> 1.0 capped, 2.0 without the cap
    assert aggregate([50, 50], [50, 60], mode="min_geometric")[0] == 1.0
    assert aggregate([50, 50], [50, 60], mode="min_geometric", clamp=False)[0] == pytest.approx(2.0)
    # a part above 10 with a combined score below 10: sqrt(20 * 2) = 6.3246 either way, as officially
    assert aggregate([50, 50], [5, 5], mode="min_geometric")[0] == pytest.approx(0.63246, abs=1e-5)
    assert aggregate([-5, 10], [25, 25], mode="min_geometric", clamp=False)[0] == 0.0


def test_other_score_range_and_clamping():
    # score_range 10: unit = 1.  SC = 0.6*10 + 0.4*5 = 8 ; PQ = 0.5*12 + 0.5*12 = 12 -> clamped to 10
    reward, sc, pq = aggregate([10, 5], [12, 12], score_range=10)
    assert (sc, pq) == pytest.approx((8.0, 10.0))
    assert reward == pytest.approx(8.0**0.8 * 10.0**0.2 / 10)
    assert aggregate([-5, -5], [25, 25])[1] == 0.0


def test_grounding_blend():
    base = aggregate([20, 15], [20, 10])[0]
    # (1 - 0.25) * base + 0.25 * 0.4
    assert aggregate([20, 15], [20, 10], grounding=0.4, grounding_weight=0.25)[0] == pytest.approx(0.75 * base + 0.1)
    assert aggregate([20, 15], [20, 10], grounding=None, grounding_weight=0.25)[0] == base
    with pytest.raises(ValueError, match="grounding"):
        aggregate([20, 15], [20, 10], grounding=1.5, grounding_weight=0.5)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="mode"):
        aggregate([1, 2], [3, 4], mode="median")
    with pytest.raises(ValueError, match="sc_scores"):
        aggregate([1, float("nan")], [3, 4])
    with pytest.raises(ValueError, match="pq_scores"):
        aggregate([1, 2], [3, 4, 5])
    with pytest.raises(ValueError, match="a must"):
        aggregate([1, 2], [3, 4], a=1.5)


def test_batch_matches_scalar():
    rng = np.random.default_rng(0)
    sc = rng.uniform(-2, 27, size=(64, 2))
    pq = rng.uniform(-2, 27, size=(64, 2))
    sc[0] = 0.0
    g = rng.uniform(0, 1, size=64)
    for mode in ["weighted", "min_geometric", "mean"]:
        reward, sc10, pq10 = aggregate_batch(sc, pq, mode=mode, grounding=g, grounding_weight=0.3)
        assert reward.shape == (64,) and np.isfinite(reward).all()
        assert ((reward >= 0) & (reward <= 1)).all()
        for i in range(64):
            expected = aggregate(sc[i], pq[i], mode=mode, grounding=g[i], grounding_weight=0.3)
            assert (reward[i], sc10[i], pq10[i]) == pytest.approx(expected)
    with pytest.raises(ValueError, match="rows"):
        aggregate_batch(sc, pq[:3])


def test_reward_weights_one_home():
    """aggregate takes the settings as a RewardWeights, a mode name or keywords, all alike;
    keywords override the dataclass; the scorer's options build the same weights, with the
    official_eval reading dropping the cap at 10 (clamp follows the parse mode)."""
    from sr_jax.reward.scorer import ScorerOptions

    w = RewardWeights(w1=0.3, w2=0.7, w3=0.9, w4=0.1, a=0.6, score_range=10.0)
    kw = dict(w1=0.3, w2=0.7, w3=0.9, w4=0.1, a=0.6, score_range=10.0)
    assert aggregate([7, 3], [9, 4], w) == aggregate([7, 3], [9, 4], **kw) == aggregate([7, 3], [9, 4], weights=w)
    assert aggregate([7, 3], [9, 4], w)[1] == pytest.approx((0.3 * 7 + 0.7 * 3))
    assert aggregate([7, 3], [9, 4], w, mode="mean") == aggregate([7, 3], [9, 4], mode="mean", **kw)
    assert aggregate([20, 10], [25, 15], "min_geometric") == aggregate([20, 10], [25, 15], mode="min_geometric")
    assert aggregate([30, 30], [25, 25], RewardWeights(clamp=False))[0] > 1.0
    with pytest.raises(TypeError, match="w5"):
        aggregate([1, 2], [3, 4], w5=1.0)
    with pytest.raises(ValueError, match="a must lie"):
        aggregate([1, 2], [3, 4], RewardWeights(a=2.0))

    opts = ScorerOptions(w1=0.3, w2=0.7, w3=0.9, w4=0.1, a=0.6, score_range=10.0, mode="mean")
    assert opts.weights == RewardWeights(mode="mean", **kw)
    assert ScorerOptions(parse_mode="official_eval").weights == RewardWeights(clamp=False)
    assert ScorerOptions(parse_mode="official_server").weights == RewardWeights()
    assert {f: getattr(ScorerOptions(), f) for f in RewardWeights().options()} == RewardWeights().options()
    with pytest.raises(ValueError, match="w2 must be a finite number"):
        ScorerOptions().replace(w2=float("nan"))


def test_parse_then_aggregate():
    sc = parse_output(GOOD_SC)
    pq = parse_output('{"reasoning": "clean", "score": [25, 20]}', with_region=False)
    reward, s, p = aggregate(sc["score"], pq["score"])
    # SC = (0.6*20 + 0.4*18)/2.5 = 19.2/2.5 = 7.68 ; PQ = (12.5 + 10)/2.5 = 9.0
    assert (s, p) == pytest.approx((7.68, 9.0))
    assert reward == pytest.approx(7.68**0.8 * 9.0**0.2 / 10)
    assert math.isfinite(reward)


# ---------------------------------------------------------------- the official readings

EVAL, SERVER = "official_eval", "official_server"


def test_official_eval_reading():
    # think blocks go; a lone score is used twice (strict: the other score is missing)
    text = '<think>draft {"score": [1, 1]}</think>\n{"reasoning": "fine", "score": [21]}'
    r = parse_output(text, with_region=False, mode=EVAL)
    assert r["score"] == [21.0, 21.0] and r["reasoning"] == "fine" and r["missing_scores"] == 0 and r["parsed"]
    assert parse_output(text, with_region=False)["score"] == [21.0, 12.5]
    # no clamping: [30, 0] gives SC = 0.6 * 30 / 2.5 = 7.2 (strict clamps 30 to 25: SC 6.0)
    r = parse_output('{"edit_region": [], "reasoning": "", "score": [30, 0]}', mode=EVAL)
    assert r["score"] == [30.0, 0.0] and r["edit_region"] == []
    assert aggregate(r["score"], [25, 25])[1] == pytest.approx(7.2)
    assert aggregate(parse_output('{"score": [30, 0]}')["score"], [25, 25])[1] == pytest.approx(6.0)
    # invalid JSON: the "score": [a, b, ...] pattern, first two
    broken = '{"reasoning": "a "quoted" word", "score": [19.5, 7, 3]}'
    r = parse_output(broken, with_region=False, mode=EVAL)
    assert r["score"] == [19.5, 7.0] and r["parsed"] and "score_by_pattern" in r["errors"]
    # the pattern's limits are theirs: a space before the comma, single quotes -> nothing read
    for text in ('{"reasoning": "x" "score": [19.5 , 7]}', "{'score': [5, 6]}"):
        r = parse_output(text, with_region=False, mode=EVAL)
        assert r["score"] == [12.5, 12.5] and not r["parsed"] and r["missing_scores"] == 2, text
    # no braces, or a score list with nothing in it: the middle of the scale
    assert parse_output("score: [20, 18]", mode=EVAL)["score"] == [12.5, 12.5]
    assert parse_output('{"score": []}', mode=EVAL)["score"] == [12.5, 12.5]
    # a score that is text (the official arithmetic would fail) counts as missing
    r = parse_output('{"score": ["20", 18]}', mode=EVAL)
    assert r["score"] == [12.5, 18.0] and r["missing_scores"] == 1
    assert parse_output('{"score": 17}', mode=EVAL)["score"] == [17.0, 17.0]
    assert parse_output('{"score": [4, 5]}', score_range=10, mode=EVAL)["score"] == [4.0, 5.0]
    assert parse_output("nothing", score_range=10, mode=EVAL)["score"] == [5.0, 5.0]


def test_official_server_reading():
    r = parse_output('{"reasoning": "ok", "score": [21]}', with_region=False, mode=SERVER)
    assert r["score"] == [21.0, 12.5] and r["missing_scores"] == 1 and r["reasoning"] == "ok"
    # numbers kept, other items dropped; more than two: the first two
    assert parse_output('{"score": ["20", 15, 10, 9]}', mode=SERVER)["score"] == [15.0, 10.0]
    assert parse_output('{"score": 30}', mode=SERVER)["score"] == [30.0, 12.5]
    # single quotes are retried as double quotes
    r = parse_output("{'reason': 'fine', 'score': [5, 6]}", with_region=False, mode=SERVER)
    assert r["score"] == [5.0, 6.0] and r["reasoning"] == "fine" and r["parsed"]
    # no think handling: the first { is inside the think block, so the JSON fails and the first
    # two numbers of the whole text are taken (here the "1" of "step 1" and 20)
    r = parse_output('<think>step 1 {draft}</think>{"score": [20, 18]}', mode=SERVER)
    assert r["score"] == [1.0, 20.0] and not r["parsed"] and "score_by_numbers" in r["errors"]
    # no braces at all: the defaults, numbers are not searched
    assert parse_output("scores 20 and 18", mode=SERVER)["score"] == [12.5, 12.5]
    assert parse_output("   ", mode=SERVER)["score"] == [12.5, 12.5]


def test_parse_mode_is_checked():
    with pytest.raises(ValueError, match="parse mode"):
        parse_output("{}", mode="lenient")


@pytest.mark.parametrize("mode", ["strict", EVAL, SERVER])
def test_one_rule_for_huge_numbers(mode):
    """A number too large for a float (401 digits, 5000 digits, 1e400) is a missing score in its
    place, whatever its spelling; the rest of the answer is kept."""
    results = []
    for huge in ("9" * 401, "9" * 5000, "1e400", "-1e400"):
        text = ('{"edit_region": [{"id": 0, "label": "hat", "bbox_2d": [10, 20, 300, 400]}], '
                f'"reasoning": "kept", "score": [{huge}, 18]}}')
        r = parse_output(text, mode=mode)
        assert r["score"] == [12.5, 18.0] and r["missing_scores"] == 1 and r["parsed"], (huge, r)
        assert r["reasoning"] == "kept" and r["edit_region"][0]["bbox_2d"] == [10, 20, 300, 400]
        assert not any(e.startswith("internal:") for e in r["errors"])
        results.append(r)
    assert all(r == results[0] for r in results)
    # as a box coordinate it drops that region only
    text = f'{{"edit_region": [{{"bbox_2d": [0, 0, {"9" * 401}, 5]}}, {{"bbox_2d": [1, 1, 9, 9]}}], "score": [3, 4]}}'
    r = parse_output(text, mode=mode)
    assert r["score"] == [3.0, 4.0] and [reg["bbox_2d"] for reg in r["edit_region"]] == [[1, 1, 9, 9]]
