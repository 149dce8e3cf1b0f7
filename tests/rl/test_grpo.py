"""GRPO (`sr_jax.rl`): advantages, k3 KL and masked token-level loss against hand-computed values;
zero gradient for identical completions with equal rewards; a rewarded completion gains
probability after one step; reward functions on hand-made answers (incl. an HTTP judge with a
timeout); `sr-jax rl` writes checkpoints and resumes exactly, and its run exports to HF and is
refused by `sr-jax train`; with LoRA the reference log-probs are
HF's base model and the policy's PEFT's adapted one; reused rollouts (num_iterations > 1) take
their ratio against the sampling policy's log-probs."""

import http.server
import json
import math
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sr_jax.config import load_config
from sr_jax.data.records import Region, SpatialExample
from sr_jax.reward import parse_output
from sr_jax.rl.config import RLConfig
from sr_jax.rl.grpo import group_advantages, grpo_token_sums, kl_k3
from sr_jax.rl.rewards import (GroundingReward, JudgeReward, RewardSet, empty_list_reward, format_reward,
                               iou_reward, score_error_reward)
from sr_jax.special_tokens import IM_END_ID, PAD_ID

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "configs" / "rl" / "demo_cpu.yaml"
SOURCE = "synthetic:n=16,seed=5,split=train,min_side=48,max_side=56,tasks=sc"


# ---- pure math -------------------------------------------------------------------------------

def test_group_advantages_hand_computed():
    adv = group_advantages([1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0], 4, eps=1e-4, ddof=1)
    std = math.sqrt((1.5**2 + 0.5**2 + 0.5**2 + 1.5**2) / 3)  # sample std of 1..4
    np.testing.assert_allclose(adv[:4], np.array([-1.5, -0.5, 0.5, 1.5]) / (std + 1e-4), rtol=1e-12)
    assert np.all(adv[4:] == 0.0)  # equal rewards: no signal
    pop = group_advantages([0.0, 1.0], 2, eps=0.0, ddof=0)
    np.testing.assert_allclose(pop, [-1.0, 1.0])
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages([1.0, 2.0, 3.0], 4)


def test_kl_k3_hand_computed():
    logp = jnp.array([-1.0, -2.0, -0.5])
    ref = jnp.array([-2.0, -2.0, -0.5 + math.log(2.0)])
    np.testing.assert_allclose(kl_k3(logp, ref), [math.exp(-1.0) + 1.0 - 1.0, 0.0, 2.0 - math.log(2.0) - 1.0],
                               rtol=1e-6)


def test_loss_sums_mask_clip_and_kl_hand_computed():
    big = 50.0  # masked positions carry garbage that must not count
    logp = jnp.array([[math.log(1.5), 0.0, big], [math.log(0.5), big, big]]) - 1.0
    old = jnp.full((2, 3), -1.0)
    ref = logp.at[0, 1].add(math.log(2.0))  # one token with KL 2 - ln2 - 1
    adv = jnp.array([1.0, -2.0])
    mask = jnp.array([[1, 1, 0], [1, 0, 0]])
    s = grpo_token_sums(logp, old, ref, adv, mask, beta=0.1, epsilon=0.2)
    # row 0: ratio 1.5 > 1.2 with A > 0 -> clipped, -1.2; ratio 1 -> -1. row 1: ratio 0.5 < 0.8, A < 0:
    # min(-1, -1.6) = -1.6 -> +1.6, clipped.
    kl = 2.0 - math.log(2.0) - 1.0
    np.testing.assert_allclose(float(s.loss_sum), -1.2 - 1.0 + 1.6 + 0.1 * kl, rtol=1e-6)
    assert float(s.tokens) == 3 and float(s.clipped) == 2
    np.testing.assert_allclose(float(s.kl_sum), kl, rtol=1e-6)
    np.testing.assert_allclose(float(s.ratio_sum), 1.5 + 1.0 + 0.5, rtol=1e-6)
    # asymmetric clip: epsilon_high 0.6 keeps ratio 1.5 unclipped
    s2 = grpo_token_sums(logp, old, ref, adv, mask, beta=0.0, epsilon=0.2, epsilon_high=0.6)
    np.testing.assert_allclose(float(s2.loss_sum), -1.5 - 1.0 + 1.6, rtol=1e-6)
    assert float(s2.clipped) == 1 and float(s2.kl_sum) == 0.0


# ---- the update on the tiny model --------------------------------------------------------------

def _cfg(tmp, **extra):
    overrides = [f"run.out_dir={tmp}", "run.progress_bar=false", "run.tensorboard=false",
                 "run.async_checkpoint=false", f"data.sources=['{SOURCE}']", "grpo.max_completion_tokens=8"]
    return load_config(RLConfig, DEMO, overrides + [f"{k}={v}" for k, v in extra.items()])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from sr_jax.data.synthetic import generate_example, SynthConfig
    from sr_jax.rl.trainer import RLTrainer, make_processor

    cfg = _cfg(tmp_path_factory.mktemp("tiny"), **{"train.optim.learning_rate": 3e-3})
    trainer = RLTrainer(cfg, devices=jax.devices()[:1], total_steps=4)
    processor = make_processor(cfg)
    record = generate_example(0, 5, "train", SynthConfig(image_size=(48, 56), tasks=("sc",)))
    pristine = trainer.init_state()
    # The update donates its input state: each test step starts from a fresh copy.
    trainer.fresh_state = lambda: jax.tree.map(jnp.copy, pristine)
    return cfg, trainer, processor, record


def _rollout(cfg, trainer, processor, record, texts, rewards):
    from sr_jax.rl.rollout import Rollout, completion_mask, microbatches

    n = cfg.grpo.max_completion_tokens
    tokens = np.full((len(texts), n), PAD_ID, np.int64)
    for i, t in enumerate(texts):
        ids = processor.tokenizer.encode(t)[: n - 1] + [IM_END_ID]
        tokens[i, : len(ids)] = ids
    prompt = processor.encode(record, with_target=False)
    g = len(texts)
    adv = group_advantages(rewards, g, cfg.grpo.advantage_eps, cfg.grpo.advantage_std_ddof)
    r = Rollout([record] * g, [prompt] * g, tokens, completion_mask(tokens, cfg.grpo.stop_ids), list(texts),
                [{}] * g, np.asarray(rewards, float), {}, adv)
    return microbatches(r, 1, trainer.model)


def _update(trainer, state, mb):
    from sr_jax.train.step import stack_microbatches

    mb = dict(mb)
    mb["ref_logp"] = np.asarray(trainer.step.logprobs(trainer.ref_params, state.frozen, mb))
    return trainer.step(state, stack_microbatches([mb]))


def test_identical_completions_with_equal_rewards_give_zero_gradient(tiny):
    cfg, trainer, processor, record = tiny
    same = ['{"edit_region": []'] * 4
    (mb,) = _rollout(cfg, trainer, processor, record, same, [0.7] * 4)
    assert np.all(mb["advantages"] == 0.0)
    _, metrics = _update(trainer, trainer.fresh_state(), mb)
    # The policy term vanishes exactly (A = 0); the k3 term has zero gradient at policy == reference
    # (up to the float difference between the two programs computing the same log-probs).
    assert float(metrics["grad_norm"]) < 1e-6
    assert abs(float(metrics["kl"])) < 1e-6
    (mb2,) = _rollout(cfg, trainer, processor, record, same, [0.0, 1.0, 0.0, 0.0])
    _, metrics2 = _update(trainer, trainer.fresh_state(), mb2)
    assert float(metrics2["grad_norm"]) > 1e3 * max(float(metrics["grad_norm"]), 1e-9)


def test_rewarded_completion_gains_log_prob_after_one_step(tiny):
    cfg, trainer, processor, record = tiny
    texts = ['{"edit_region": []', '{"score": [3, 4]}', '{"edit_region": [{"id"', 'no json here']
    (mb,) = _rollout(cfg, trainer, processor, record, texts, [0.0, 0.0, 1.0, 0.0])
    state = trainer.fresh_state()

    def seq_logp(st):
        lp = np.asarray(trainer.step.logprobs(st.params, st.frozen, mb))
        return (lp * mb["completion_mask"]).sum(axis=1)

    before = seq_logp(state)
    state, metrics = _update(trainer, state, mb)
    after = seq_logp(state)
    gain = after - before
    assert gain[2] > 0.05, (before, after)
    assert gain[2] > gain[[0, 1, 3]].max()
    assert 0.0 <= float(metrics["clip_fraction"]) <= 1.0 and float(metrics["completion_tokens"]) == mb["completion_mask"].sum()


# ---- reward functions --------------------------------------------------------------------------

def _sc(regions, score=(20.0, 25.0)):
    return SpatialExample(id="r1", task="sc", images=[b"x", b"y"], instruction="do it",
                          edit_region=[Region(i, "thing", tuple(b)) for i, b in enumerate(regions)], score=score)


def _answer(boxes, score=(20, 25)):
    return json.dumps({"edit_region": [{"id": i, "label": "a", "bbox_2d": b} for i, b in enumerate(boxes)],
                       "reasoning": "ok", "score": list(score)})


def test_iou_reward_uses_hungarian_matching():
    rec = _sc([[0, 0, 100, 100], [500, 500, 700, 700]])
    text = _answer([[500, 500, 700, 600], [0, 0, 100, 100]])  # swapped order; IoUs 0.5 and 1
    assert iou_reward(rec, text, parse_output(text)) == pytest.approx(0.75)
    extra = _answer([[500, 500, 700, 600], [0, 0, 100, 100], [900, 900, 950, 950]])
    assert iou_reward(rec, extra, parse_output(extra)) == pytest.approx(1.5 / 3)  # unmatched box counts 0
    pq = SpatialExample(id="p", task="pq", images=[b"x"], score=(10.0, 10.0))
    assert iou_reward(pq, text, parse_output(text, with_region=False)) is None


def test_empty_list_rewards_for_a_failed_edit():
    failed = _sc([], score=(0.0, 25.0))
    empty, boxed = _answer([], (0, 25)), _answer([[10, 10, 50, 50]], (0, 25))
    assert empty_list_reward(failed, empty, parse_output(empty)) == 1.0
    assert empty_list_reward(failed, boxed, parse_output(boxed)) == 0.0
    assert iou_reward(failed, empty, parse_output(empty)) == 1.0
    assert iou_reward(failed, boxed, parse_output(boxed)) == 0.0
    done = _sc([[10, 10, 50, 50]])
    assert empty_list_reward(done, empty, parse_output(empty)) == 0.0
    assert empty_list_reward(done, boxed, parse_output(boxed)) == 1.0


def test_format_and_score_error_rewards():
    rec = _sc([[0, 0, 100, 100]])
    good = _answer([[0, 0, 100, 100]], (10, 20))
    assert format_reward(rec, good, parse_output(good)) == 1.0
    for bad in ("sure! " + good, good[:-1], json.dumps({"reasoning": "x", "score": [1, 2]}),
                _answer([[100, 0, 0, 100]]), _answer([[0, 0, 100, 100]], (30, 2))):
        assert format_reward(rec, bad, parse_output(bad)) == 0.0, bad
    pq = SpatialExample(id="p", task="pq", images=[b"x"], score=(10.0, 10.0))
    pq_good = json.dumps({"reasoning": "fine", "score": [12, 5]})
    assert format_reward(pq, pq_good, parse_output(pq_good, with_region=False)) == 1.0
    # |10 - 20| = 10 and |20 - 25| = 5 -> mean 7.5 -> 1 - 7.5/25
    assert score_error_reward(rec, good, parse_output(good)) == pytest.approx(1 - 7.5 / 25)
    # weighted total, NaN for a function that does not apply
    total, per = RewardSet([("iou", 2.0, iou_reward), ("score", 1.0, score_error_reward)]).score(
        [rec, pq], [good, pq_good], [parse_output(good), parse_output(pq_good, with_region=False)])
    np.testing.assert_allclose(total, [2.0 * 1.0 + 0.7, 1 - 3.5 / 25])
    assert np.isnan(per["iou"][1])


def test_grounding_reward_prefers_the_true_boxes():
    from sr_jax.data.synthetic import generate_examples

    rec = next(r for r in generate_examples(20, 1, "validation", (64, 64), ("sc",)) if r.edit_region)
    truth = _answer([list(r.bbox_2d) for r in rec.edit_region])
    wrong = _answer([[0, 0, 40, 40]] if rec.edit_region[0].bbox_2d[0] > 100 else [[900, 900, 1000, 1000]])
    g = GroundingReward()
    assert g(rec, truth, parse_output(truth)) > 0.5
    assert g(rec, truth, parse_output(truth)) > g(rec, wrong, parse_output(wrong)) + 0.3


class _Judge(http.server.BaseHTTPRequestHandler):
    seen: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Judge.seen.append(body)
        if self.path == "/slow":
            time.sleep(1.5)
        reply = b"not json" if self.path == "/broken" else json.dumps({"reward": len(body["completion"]) / 10}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


def test_http_judge_with_timeout_and_fallback():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        rec = _sc([[0, 0, 100, 100]])
        text = "abcdefghij" * 2
        judge = JudgeReward(base + "/judge", timeout_s=5, fallback=-1.0, send_images=True)
        assert judge(rec, text, parse_output(text)) == pytest.approx(2.0)
        assert _Judge.seen[-1]["record_id"] == "r1" and _Judge.seen[-1]["images"] == ["eA==", "eQ=="]
        assert judge.many([(rec, "abc", {}), (rec, "abcde", {})]) == [pytest.approx(0.3), pytest.approx(0.5)]
        t0 = time.perf_counter()
        slow = JudgeReward(base + "/slow", timeout_s=0.3, fallback=-1.0)
        assert slow(rec, text, {}) == -1.0 and time.perf_counter() - t0 < 1.4 and slow.failures == 1
        assert JudgeReward(base + "/broken", fallback=0.25)(rec, text, {}) == 0.25
        assert JudgeReward("http://127.0.0.1:1/x", timeout_s=1, fallback=0.5)(rec, text, {}) == 0.5
        with pytest.raises(ValueError, match="http"):
            JudgeReward("ftp://x")
    finally:
        server.shutdown()


# ---- the command ------------------------------------------------------------------------------

def _cli(out, steps):
    from sr_jax.cli import main

    return main(["rl", "--config", str(DEMO), f"run.out_dir={out}", f"run.total_steps={steps}",
                 "run.checkpoint_every=1", "run.progress_bar=false", "run.tensorboard=false",
                 "run.async_checkpoint=false", f"data.sources=['{SOURCE}']", "grpo.max_completion_tokens=8",
                 "data.prompts_per_step=1", "run.save_model=false"])


def test_rl_command_writes_checkpoints_and_resumes_exactly(tmp_path):
    """...and the interrupted run, a training checkpoint like an SFT one (its run_config.yaml is an
    RLConfig, its checkpoints' meta says kind "rl"), exports with `jax-to-hf --ckpt` to weights HF
    loads with our logits, and is refused by `sr-jax train` (both stages' states have one layout,
    so it would otherwise resume silently) before the resume."""
    from sr_jax.rl.trainer import train
    from sr_jax.train.metrics import read_metrics

    ref, part = tmp_path / "ref", tmp_path / "part"
    assert _cli(ref, 2) == 0
    assert sorted(p.name for p in (ref / "checkpoints").iterdir()) == ["1", "2"]
    first = train(_cfg(part, **{"run.total_steps": 2, "run.checkpoint_every": 1, "data.prompts_per_step": 1,
                                "run.save_model": False}), stop_after=1)
    assert first["step"] == 1
    _export_round_trip(part, tmp_path / "hf")
    _refused_by_sft(part)
    assert _cli(part, 2) == 0
    rows_ref, rows_part = read_metrics(ref / "metrics.jsonl"), read_metrics(part / "metrics.jsonl")
    assert [r["step"] for r in rows_part] == [1, 2]
    for key in ("reward", "loss", "kl", "completion_length", "reward/iou", "grad_norm"):
        np.testing.assert_allclose([r[key] for r in rows_part], [r[key] for r in rows_ref], rtol=1e-5, atol=1e-9,
                                   err_msg=key)
    for key in ("reward/format", "parse_rate", "clip_fraction"):
        assert key in rows_ref[-1]


def _export_round_trip(run, out):
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    from sr_jax.cli import main
    from sr_jax.train.loop import model_from_checkpoint

    ours, _ = model_from_checkpoint(run)
    assert main(["convert", "jax-to-hf", "--ckpt", str(run), "--out", str(out)]) == 0
    assert (out / "tokenizer.json").is_file()
    hf = Qwen3VLForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    ids = np.random.default_rng(0).integers(0, 150000, (1, 16))
    with torch.no_grad():
        ref = hf(input_ids=torch.as_tensor(ids)).logits.numpy()
    assert np.abs(np.asarray(ours(ids)) - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


def _refused_by_sft(run):
    from sr_jax.train.checkpoint import RUN_CONFIG, TrainCheckpointer
    from sr_jax.train.sft import SFTConfig, train as sft_train

    ckpt = TrainCheckpointer(run, save_every=1, keep=1, async_save=False)
    assert ckpt.read_meta(1)["kind"] == "rl"
    ckpt.close()
    before = (run / RUN_CONFIG).read_text()
    sft = load_config(SFTConfig, ROOT / "configs" / "sft" / "demo_cpu.yaml",
                      [f"run.out_dir={run}", "run.total_steps=2", "run.progress_bar=false", "run.tensorboard=false",
                       "data.sources=['synthetic:n=8,seed=3,split=train,min_side=48,max_side=64']"])
    with pytest.raises(ValueError, match="holds a 'rl' run; this is a 'sft' run"):
        sft_train(sft)
    assert (run / RUN_CONFIG).read_text() == before


def test_checkpoints_without_a_recorded_kind_are_told_apart_by_their_config(tmp_path):
    from sr_jax.config import dump_yaml
    from sr_jax.train.checkpoint import RUN_CONFIG, run_kind
    from sr_jax.train.sft import SFTConfig

    dump_yaml(_cfg(tmp_path / "rl"), tmp_path / RUN_CONFIG)
    assert run_kind(tmp_path, {"step": 3}) == "rl"
    dump_yaml(SFTConfig(), tmp_path / RUN_CONFIG)
    assert run_kind(tmp_path, {"step": 3}) == "sft"
    assert run_kind(tmp_path, {"kind": "rl"}) == "rl"  # the record wins
    with pytest.raises(ValueError, match="unknown kind of run 'dpo'"):
        run_kind(tmp_path, {"kind": "dpo"})


def test_teacher_forced_completion_matches_greedy_generation(tiny):
    """Left padding, images and positions of the update's layout agree with `generate`: the argmax
    of the completion-position logits reproduces the greedy tokens, whose log-probs are the max."""
    from sr_jax.data.synthetic import SynthConfig, generate_example
    from sr_jax.generation import generate
    from sr_jax.rl.rollout import Rollout, _pixels, completion_mask, left_pad, microbatches

    cfg, trainer, processor, _ = tiny
    records = [generate_example(i, 5, "train", SynthConfig(image_size=(48, 64), tasks=("sc",))) for i in range(2)]
    prompts = [processor.encode(r, with_target=False) for r in records]
    assert prompts[0]["input_ids"].shape != prompts[1]["input_ids"].shape  # one row is left-padded
    ids, mask = left_pad(prompts)
    tokens = generate(trainer.model, ids, mask, *_pixels(prompts), max_new_tokens=6, temperature=0.0)
    r = Rollout(records, prompts, tokens, completion_mask(tokens, [IM_END_ID]), [], [], np.zeros(2), {}, np.zeros(2))
    (mb,) = microbatches(r, 1, trainer.model)
    state = trainer.fresh_state()
    logp = np.asarray(trainer.step.logprobs(state.params, state.frozen, mb))
    assert logp.shape == tokens.shape and np.all(logp <= 0)
    model = trainer.step.model(state)
    from sr_jax.train.step import VISION_KEYS
    out = model.features(mb["input_ids"], mb["attention_mask"], mb["pixel_values"], position_ids=mb["position_ids"],
                         vision=tuple(mb[k] for k in VISION_KEYS))
    width = mb["input_ids"].shape[1] - tokens.shape[1]
    logits = np.asarray(model.logits(out.hidden[:, width - 1: width - 1 + tokens.shape[1]]))
    assert np.array_equal(logits.argmax(-1), tokens)


# ---- reference policy with LoRA, and rollout reuse (num_iterations > 1) ------------------------

def _hf_completion_logprobs(hf, prompt, tokens, mask, temperature):
    """Per-row log-probs of each completion under a HF model, one unpadded row at a time."""
    import torch
    from hf_oracle import hf_inputs

    out = np.zeros(tokens.shape, np.float64)
    ids = np.asarray(prompt["input_ids"])[0]
    for i in range(len(tokens)):
        n = int(mask[i].sum())
        row = np.concatenate([ids, tokens[i, :n]])[None]
        with torch.no_grad():
            logits = hf(**hf_inputs(row, None, prompt["pixel_values"], prompt["image_grid_thw"])).logits[0].double()
        logp = torch.log_softmax(logits[len(ids) - 1: len(ids) - 1 + n] / temperature, dim=-1)
        out[i, :n] = logp.gather(1, torch.from_numpy(tokens[i, :n])[:, None])[:, 0].numpy()
    return out


def test_lora_reference_is_the_base_model_and_policy_the_adapted_one(tmp_path):
    """With LoRA the reference log-probs come from the adapters at zero (no second copy of the
    model): they equal HF's base model, while the policy's equal PEFT with our exported adapter."""
    import transformers
    peft = pytest.importorskip("peft")
    from sr_jax.convert.hf_export import export_hf
    from sr_jax.data.synthetic import SynthConfig, generate_example
    from sr_jax.lora import LoRAParam
    from sr_jax.rl.trainer import RLTrainer, make_processor

    cfg = _cfg(tmp_path / "run", **{"train.lora.enabled": "true", "train.lora.rank": 4, "train.lora.alpha": 8,
                                    "train.lora.dropout": 0.1})
    trainer = RLTrainer(cfg, devices=jax.devices()[:1], total_steps=2)
    processor = make_processor(cfg)
    state = trainer.init_state()
    leaves = jax.tree.leaves(state.params)
    trainable = nnx.to_flat_state(state.params)
    assert len(trainable) == len(leaves) > 0 and all(isinstance(v, LoRAParam) for _, v in trainable)
    ref_leaves = jax.tree.leaves(trainer.ref_params)
    assert sum(x.size for x in ref_leaves) == sum(x.size for x in leaves)  # adapters only, not a model copy
    assert all(not np.any(np.asarray(x)) for x in ref_leaves)
    # Non-zero adapters (a fresh B is zero, so policy == reference would prove nothing).
    keys = jax.random.split(jax.random.key(3), len(leaves))
    state = state.replace(params=jax.tree.unflatten(jax.tree.structure(state.params),
                                                    [0.2 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]))

    record = generate_example(1, 5, "train", SynthConfig(image_size=(48, 56), tasks=("sc",)))
    (mb,) = _rollout(cfg, trainer, processor, record, ['{"edit_region": [{"id": 0', '{"score": [3, 4]}'], [0.0, 1.0])
    policy = np.asarray(trainer.step.logprobs(state.params, state.frozen, mb))
    reference = np.asarray(trainer.step.logprobs(trainer.ref_params, state.frozen, mb))
    m = mb["completion_mask"].astype(bool)
    assert np.abs(policy - reference)[m].max() > 1e-2

    # export_hf writes unmerged adapters beside the base weights; the base model is loaded without them.
    export_hf(trainer.step.model(state), tmp_path / "base")
    (tmp_path / "adapter").mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (tmp_path / "base" / name).rename(tmp_path / "adapter" / name)
    hf = transformers.Qwen3VLForConditionalGeneration.from_pretrained(tmp_path / "base", dtype="float32").eval()
    prompt = processor.encode(record, with_target=False)
    tokens = np.asarray(mb["completion_ids"])
    t = cfg.grpo.temperature
    np.testing.assert_allclose(reference[m], _hf_completion_logprobs(hf, prompt, tokens, m, t)[m], atol=2e-4)
    adapted = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    np.testing.assert_allclose(policy[m], _hf_completion_logprobs(adapted, prompt, tokens, m, t)[m], atol=2e-4)


def test_second_iteration_uses_the_rollout_policy_log_probs(tiny):
    """num_iterations > 1: every update on a rollout takes its ratio against the log-probs of the
    policy that sampled it. The first update equals the single-iteration one (ratio 1); the
    second's loss and ratio are those of the updated policy against the rollout's log-probs."""
    from sr_jax.train.step import stack_microbatches

    cfg, trainer, processor, record = tiny
    texts = ['{"edit_region": []', '{"score": [3, 4]}', '{"edit_region": [{"id"', 'no json here']
    (mb,) = _rollout(cfg, trainer, processor, record, texts, [0.0, 0.3, 1.0, 0.1])
    state = trainer.fresh_state()
    mb["ref_logp"] = np.asarray(trainer.step.logprobs(trainer.ref_params, state.frozen, mb))
    mb["old_logp"] = np.asarray(trainer.step.logprobs(state.params, state.frozen, mb))
    batch = stack_microbatches([mb])

    plain = {k: v for k, v in batch.items() if k != "old_logp"}
    _, single = trainer.step(trainer.fresh_state(), plain)
    state, first = trainer.step(state, batch)
    np.testing.assert_allclose(float(first["ratio_mean"]), 1.0, atol=1e-5)
    np.testing.assert_allclose(float(first["loss"]), float(single["loss"]), rtol=1e-5, atol=1e-7)

    logp = trainer.step.logprobs(state.params, state.frozen, mb)  # before the step donates `state`
    _, second = trainer.step(state, batch)
    expect = grpo_token_sums(logp, mb["old_logp"], mb["ref_logp"], mb["advantages"], mb["completion_mask"],
                             beta=cfg.grpo.beta, epsilon=cfg.grpo.epsilon, epsilon_high=cfg.grpo.epsilon_high)
    tokens = float(expect.tokens)
    np.testing.assert_allclose(float(second["loss"]), float(expect.loss_sum) / tokens, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(float(second["ratio_mean"]), float(expect.ratio_sum) / tokens, rtol=1e-5)
    np.testing.assert_allclose(float(second["clip_fraction"]), float(expect.clipped) / tokens, atol=1e-6)
    assert abs(float(second["ratio_mean"]) - 1.0) > 1e-3  # the policy moved: the ratio is not trivially 1


def test_rollout_keeps_the_sampling_policy_log_probs_when_reused(tiny):
    """The loop's rollout stores old log-probs (those of the state that sampled) only when the
    rollout feeds more than one update."""
    import dataclasses

    from sr_jax.rl.rewards import RewardSet
    from sr_jax.rl.rollout import PromptStream
    from sr_jax.rl.trainer import rollout

    cfg, trainer, processor, _ = tiny
    state = trainer.fresh_state()
    for iterations in (1, 2):
        trainer.cfg = dataclasses.replace(cfg, grpo=dataclasses.replace(cfg.grpo, num_iterations=iterations),
                                          data=dataclasses.replace(cfg.data, prompts_per_step=1))
        stream = PromptStream(cfg.data.sources, processor, seed=0, shuffle=False, num_epochs=1,
                              max_prompt_tokens=cfg.data.max_prompt_tokens)
        try:
            _, (mb,) = rollout(trainer, state, stream, RewardSet.from_config(cfg.rewards), processor, step=0)
        finally:
            trainer.cfg = cfg
        assert "ref_logp" in mb and ("old_logp" in mb) == (iterations > 1)
    np.testing.assert_array_equal(mb["old_logp"], np.asarray(trainer.step.logprobs(state.params, state.frozen, mb)))

