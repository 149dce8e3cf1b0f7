"""Loss, optimizer and the jitted train step: against full-logits / HF / torch references, and
sharded or accumulated steps against the single-device step (float32, a tiny model)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from hf_oracle import hf_inputs, image_prompt, our_model_from_hf, random_hf_model, random_pixels, tiny_hf_config
from sr_jax.models.qwen3_vl import init_model
from sr_jax.sharding import batch_shardings
from sr_jax.train.config import LossConfig, OptimConfig, TrainConfig
from sr_jax.train.loss import IGNORE, count_label_tokens, label_loss
from sr_jax.train.optim import lr_schedule, make_optimizer
from sr_jax.train.step import VISION_KEYS, attention_spans, count_step_labels, stack_microbatches, validate_batch
from tiny import FAST_COMPILE, build_batch, make_examples, patch_count, run_step, tiny_config

TOL = 1e-5


# ---------------------------------------------------------------------------------------------
# loss


def full_logits_loss(w, hidden, labels, segment_ids, weighting):
    """Reference: every position's logits, shifted targets, masked mean (token or per example).
    `labels` and `segment_ids` are numpy arrays (the masks are built on the host)."""
    b = labels.shape[0]
    targets = np.concatenate([labels[:, 1:], np.full((b, 1), IGNORE)], axis=1)
    valid = (targets >= 0) & np.concatenate([segment_ids[:, 1:] == segment_ids[:, :-1], np.zeros((b, 1), bool)], 1)
    logp = jax.nn.log_softmax((hidden @ w).astype(jnp.float32), -1)
    nll = -jnp.take_along_axis(logp, jnp.asarray(np.maximum(targets, 0))[..., None], -1)[..., 0]
    if weighting == "token":
        return jnp.sum(jnp.where(valid, nll, 0)) / valid.sum()
    per_example = []
    for r in range(b):
        for s in np.unique(segment_ids[r]):
            m = valid[r] & (segment_ids[r] == s)
            if m.sum():
                per_example.append(jnp.sum(jnp.where(m, nll[r], 0)) / m.sum())
    return sum(per_example) / len(per_example)


@pytest.mark.parametrize("weighting,chunk", [("token", 0), ("token", 8), ("example", 0), ("example", 8)])
def test_loss_matches_full_logits_reference(weighting, chunk):
    rng = np.random.default_rng(0)
    b, t, h, v = 3, 20, 16, 50
    hidden = jnp.asarray(rng.normal(size=(b, t, h)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(h, v)), jnp.float32)
    labels = rng.integers(0, v, (b, t))
    labels[rng.uniform(size=(b, t)) < 0.5] = IGNORE
    seg = np.sort(rng.integers(0, 3, (b, t)), axis=1)
    labels, seg = jnp.asarray(labels), jnp.asarray(seg)
    n = count_label_tokens(labels, seg)

    def ours(w, hidden):
        s = label_loss(lambda x: x @ w, hidden, labels, segment_ids=seg, max_label_tokens=n + 3, chunk_size=chunk,
                       weighting=weighting)
        return s.loss_sum / s.weight, s

    (loss, stats), grads = jax.jit(jax.value_and_grad(ours, argnums=(0, 1), has_aux=True))(w, hidden)
    reference = functools.partial(full_logits_loss, labels=np.asarray(labels), segment_ids=np.asarray(seg),
                                  weighting=weighting)
    ref, ref_grads = jax.jit(jax.value_and_grad(reference, argnums=(0, 1)))(w, hidden)
    np.testing.assert_allclose(loss, ref, rtol=1e-6)
    for g, rg in zip(grads, ref_grads):
        np.testing.assert_allclose(g, rg, atol=1e-6)
    assert float(stats.tokens) == n and float(stats.dropped) == 0
    logits = np.asarray(hidden @ w)
    targets = np.concatenate([np.asarray(labels)[:, 1:], np.full((b, 1), IGNORE)], 1)
    valid = (targets >= 0) & np.concatenate([np.asarray(seg)[:, 1:] == np.asarray(seg)[:, :-1],
                                            np.zeros((b, 1), bool)], 1)
    assert float(stats.correct) == int(((logits.argmax(-1) == targets) & valid).sum())

    # A buffer smaller than the label count scores the first rows and reports the rest.
    small = label_loss(lambda x: x @ w, hidden, labels, segment_ids=seg, max_label_tokens=n - 5)
    assert float(small.tokens) == n - 5 and float(small.dropped) == 5


def right_padded(rows, width, answer):
    """(ids, mask, labels) for token rows right-padded to `width`; the last `answer` tokens of
    each row are its labels."""
    ids = np.full((len(rows), width), 151643, np.int64)
    mask = np.zeros_like(ids)
    labels = np.full_like(ids, IGNORE)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = r, 1
        labels[i, len(r) - answer:len(r)] = r[-answer:]
    return ids, mask, labels


def test_loss_matches_hf():
    """Our loss (label rows only) == HF's Qwen3VLForConditionalGeneration(labels=...).loss."""
    hf = random_hf_model(tiny_hf_config(text_layers=1, vision_depth=1, deepstack=(0,)), seed=3)
    ours = our_model_from_hf(hf)
    rng = np.random.default_rng(3)
    grids = [(1, 4, 6)]
    rows = [image_prompt(rng, grids, [3, 6]), rng.integers(0, 151000, 9)]
    ids, mask, labels = right_padded(rows, max(len(r) for r in rows), answer=4)
    pv = random_pixels(rng, grids)
    with torch.no_grad():
        ref = hf(**hf_inputs(ids, mask, pv, grids), labels=torch.as_tensor(labels)).loss.item()
    positions = ours.prepare_positions(ids, mask, np.array(grids))
    graphdef, state = nnx.split(ours)

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def loss(state, vision):
        m = nnx.merge(graphdef, state)
        out = m.features(ids, mask, pv, position_ids=positions, vision=vision)
        return label_loss(m.logits, out.hidden, jnp.asarray(labels), max_label_tokens=16)

    stats = loss(state, ours.prepare_vision(np.array(grids)).as_tuple())
    assert float(stats.tokens) == 8  # 4 labels per row, each predicted from the position before it
    np.testing.assert_allclose(float(stats.loss_sum / stats.weight), ref, rtol=1e-5)


def test_gradients_match_hf():
    """d(loss)/d(every weight) == HF's loss.backward() on the same weights and batch: two images
    (vision attention and deepstack), a padded row, rows long enough for the blocked causal path."""
    from sr_jax.models.qwen3_vl.names import hf_key, normalize_hf_key, to_hf

    hf = random_hf_model(tiny_hf_config(text_layers=2, vision_depth=2, deepstack=(0, 1)), seed=7)
    ours = our_model_from_hf(hf)
    rng = np.random.default_rng(7)
    grids = [(1, 12, 16), (1, 4, 6)]  # 216 patches: vision attention in 2 query blocks
    rows = [image_prompt(rng, grids[:1], [40, 166]), image_prompt(rng, grids[1:], [30, 120])]
    ids, mask, labels = right_padded(rows, 256, answer=24)
    pv = random_pixels(rng, grids)
    hf.zero_grad()
    hf(**hf_inputs(ids, mask, pv, grids), labels=torch.as_tensor(labels)).loss.backward()
    ref = {normalize_hf_key(k): p.grad.numpy() for k, p in hf.named_parameters()}

    positions = ours.prepare_positions(ids, mask, np.array(grids))
    graphdef, state = nnx.split(ours)

    def loss(state, vision):
        m = nnx.merge(graphdef, state)
        out = m.features(ids, mask, pv, position_ids=positions, vision=vision)
        stats = label_loss(m.logits, out.hidden, jnp.asarray(labels), max_label_tokens=64)
        return stats.loss_sum / stats.weight

    grads = jax.jit(jax.grad(loss), compiler_options=FAST_COMPILE)(state, ours.prepare_vision(np.array(grids)).as_tuple())
    checked = 0
    for path, g in nnx.to_flat_state(grads):
        want = ref[hf_key(path)]
        got = to_hf(path, np.asarray(g.get_value()), want.shape)
        scale = max(float(np.abs(want).max()), 1e-3)
        err = float(np.abs(got - want).max())
        assert err <= 1e-4 * scale, f"{hf_key(path)}: max abs error {err:.3g}, gradient scale {scale:.3g}"
        checked += 1
    assert checked == len(ref)


def test_packed_rows_weigh_examples_like_separate_rows(tiny_model):
    model = tiny_model
    examples = make_examples(np.random.default_rng(4), 5)
    packed = build_batch(model, [examples[:3], examples[3:]], t=64, budget=48, packed=True)
    separate = build_batch(model, [[e] for e in examples], t=24, budget=48, packed=False)
    graphdef, state = nnx.split(model)

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def stats(state, batch):
        m = nnx.merge(graphdef, state)
        out = m.features(batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                         position_ids=batch["position_ids"], vision=tuple(batch[k] for k in VISION_KEYS),
                         segment_ids=batch.get("segment_ids"))
        return [label_loss(m.logits, out.hidden, batch["labels"], segment_ids=batch.get("segment_ids"), weighting=w)
                for w in ("token", "example")]

    for example, a, b in zip((False, True), stats(state, packed), stats(state, separate)):
        assert float(a.weight) == float(b.weight) == (5.0 if example else float(b.tokens))
        np.testing.assert_allclose(float(a.loss_sum), float(b.loss_sum), rtol=2e-6)
        assert float(a.tokens) == float(b.tokens) and float(a.correct) == float(b.correct)


# ---------------------------------------------------------------------------------------------
# optimizer


def test_lr_schedules_match_hf():
    from transformers import (get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup,
                              get_cosine_with_min_lr_schedule_with_warmup, get_linear_schedule_with_warmup)
    total, ratio, peak = 37, 0.1, 3e-4
    warm = math.ceil(total * ratio)
    cases = {
        ("cosine", 0.0): lambda o: get_cosine_schedule_with_warmup(o, warm, total),
        ("cosine", 0.1): lambda o: get_cosine_with_min_lr_schedule_with_warmup(o, warm, total, min_lr_rate=0.1),
        ("linear", 0.0): lambda o: get_linear_schedule_with_warmup(o, warm, total),
        ("constant", 0.0): lambda o: get_constant_schedule_with_warmup(o, warm),
    }
    for (kind, floor), make in cases.items():
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
        sched = make(opt)
        ref = []
        for _ in range(total + 1):
            ref.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        ours = lr_schedule(OptimConfig(learning_rate=peak, schedule=kind, warmup_ratio=ratio, min_lr_ratio=floor), total)
        np.testing.assert_allclose([float(ours(s)) for s in range(total + 1)], ref, rtol=1e-5, atol=1e-12,
                                   err_msg=kind)


def test_optimizer_matches_torch_adamw_with_clipping_and_decay_mask():
    from transformers import get_cosine_schedule_with_warmup
    rng = np.random.default_rng(5)
    shapes = {"kernel": (4, 3), "bias": (3,), "scale": (4,), "embedding": (6, 4)}
    params = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    grads = [{k: (3 * rng.normal(size=s)).astype(np.float32) for k, s in shapes.items()} for _ in range(6)]
    cfg = OptimConfig(learning_rate=1e-2, warmup_steps=2, weight_decay=0.1, max_grad_norm=1.0, b2=0.99, eps=1e-7)
    opt = make_optimizer(cfg, total_steps=6)

    tp = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in params.items()}
    torch_opt = torch.optim.AdamW([{"params": [tp["kernel"]], "weight_decay": 0.1},
                                   {"params": [tp["bias"], tp["scale"], tp["embedding"]], "weight_decay": 0.0}],
                                  lr=1e-2, betas=(0.9, 0.99), eps=1e-7)
    sched = get_cosine_schedule_with_warmup(torch_opt, 2, 6)
    state, p = opt.tx.init(params), {k: jnp.asarray(v) for k, v in params.items()}
    for g in grads:
        for k in tp:
            tp[k].grad = torch.tensor(g[k])
        torch.nn.utils.clip_grad_norm_(list(tp.values()), 1.0)
        torch_opt.step()
        sched.step()
        updates, state = opt.tx.update({k: jnp.asarray(v) for k, v in g.items()}, state, p)
        p = jax.tree.map(lambda a, u: a + u, p, updates)
    for k in params:
        np.testing.assert_allclose(np.asarray(p[k]), tp[k].detach().numpy(), atol=1e-6, err_msg=k)


# ---------------------------------------------------------------------------------------------
# the step: sharded / accumulated / frozen == the single-device step

# Adam's first update is lr * g / (|g| + eps): for gradients near zero it amplifies float32
# reduction-order noise (which differs between meshes) by up to lr / eps. eps = 1e-6 keeps that
# amplification at 1e3, so parameter differences measure the step, not the optimizer's conditioning.
STEP_CFG = dict(
    optim=OptimConfig(learning_rate=1e-3, warmup_steps=0, schedule="constant", weight_decay=0.1, max_grad_norm=100.0,
                      eps=1e-6),
    loss=LossConfig(max_label_tokens=96, chunk_size=32),
)


@pytest.fixture(scope="module")
def data(tiny_model):
    model = tiny_model
    rows = [[e] if i % 3 else [e, f] for i, (e, f) in
            enumerate(zip(make_examples(np.random.default_rng(6), 8), make_examples(np.random.default_rng(7), 8)))]
    budget = patch_count(rows) + 8  # some padding patches
    full = build_batch(model, rows, t=40, budget=budget, packed=True)
    halves = [build_batch(model, rows[i:i + 4], t=40, budget=patch_count(rows[i:i + 4]) + 4, packed=True)
              for i in (0, 4)]
    return stack_microbatches([full]), stack_microbatches(halves)


@pytest.fixture(scope="module")
def reference(data):
    return run_step(TrainConfig(**STEP_CFG), data[0], (1, 1, 1))


def assert_same_step(a, b, tol=TOL):
    (ma, pa), (mb, pb) = a[:2], b[:2]
    for key in ("loss", "grad_norm", "label_tokens", "token_accuracy", "learning_rate"):
        assert abs(ma[key] - mb[key]) <= tol * max(1.0, abs(ma[key])), (key, ma[key], mb[key])
    assert pa.keys() == pb.keys()
    worst = max((float(np.abs(pa[k] - pb[k]).max()), k) for k in pa)
    assert worst[0] <= tol, f"largest parameter difference {worst}"


@pytest.mark.parametrize("mesh_shape", [(2, 2, 2), (1, 8, 1)], ids=["data2-fsdp2-tensor2", "fsdp8"])
def test_sharded_step_equals_single_device(data, reference, mesh_shape):
    result = run_step(TrainConfig(**STEP_CFG), data[0], mesh_shape)
    assert result[0]["label_tokens"] > 40 and result[0]["label_tokens_dropped"] == 0
    assert_same_step(reference, result)
    # The state really is sharded by the rules: q_proj kernel (embed, q_heads) -> (fsdp, tensor).
    q = dict(nnx.to_flat_state(result[2].params))[("model", "language_model", "layers", 0, "self_attn", "q_proj", "kernel")]
    assert q.get_value().sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")


def test_rules_from_the_training_yaml_move_the_weights_not_the_step(data, reference, tmp_path):
    """`train.mesh.rules` (YAML, then a key=value override) re-lays the parameters, the optimizer
    moments and the batch; the step itself is the same."""
    import dataclasses

    from sr_jax.config import load_config
    from sr_jax.train.sft import SFTConfig

    path = tmp_path / "run.yaml"
    path.write_text("train:\n  mesh:\n    rules:\n      mlp: [fsdp]\n      embed: []\n")
    cfg = load_config(SFTConfig, path, ["train.mesh.rules.vocab=[data]", "train.mesh.rules.batch=[fsdp]"]).train
    result = run_step(dataclasses.replace(cfg, **STEP_CFG), data[0], (2, 2, 2))
    assert_same_step(reference, result)
    P = jax.sharding.PartitionSpec
    layer = ("model", "language_model", "layers", 0)
    specs = {k: v.get_value().sharding.spec for k, v in nnx.to_flat_state(result[2].params)}
    assert specs[layer + ("mlp", "gate_proj", "kernel")] == P(None, "fsdp")        # default (fsdp, tensor)
    assert specs[layer + ("self_attn", "q_proj", "kernel")] == P(None, "tensor")   # default (fsdp, tensor)
    assert specs[("model", "language_model", "embed_tokens", "embedding")] == P("data", None)  # default (tensor, fsdp)
    gate = dict(nnx.to_flat_state(result[2].params))[layer + ("mlp", "gate_proj", "kernel")].get_value()
    moments = [x for x in jax.tree.leaves(result[2].opt_state) if x.shape == gate.shape]
    assert moments and all(x.sharding.spec == P(None, "fsdp") for x in moments)  # Adam's mu and nu follow
    step = result[3]
    assert step.rules["mlp"] == ("fsdp",) and step.rules["head_dim"] == ()
    sharded = {k: s.spec for k, s in batch_shardings(data[0], step.mesh, step.rules).items()}
    assert sharded["input_ids"] == P(None, "fsdp", None)


def test_grad_accumulation_equals_one_big_batch(data, reference):
    """Two microbatches of 4 rows (each with its own patch budget) == one batch of 8 rows."""
    result = run_step(TrainConfig(**STEP_CFG, grad_accum_steps=2), data[1], (1, 1, 1))
    assert_same_step(reference, result)


def test_label_buffer_sized_per_step(data, reference):
    """label_bucket: the buffer is the step's label count rounded up (capped), the step equals the
    fixed-buffer one, and one compiled step serves every count of the same size."""
    counts = count_step_labels(data[1])
    assert counts == count_step_labels(data[1], all_processes=True) and sum(counts) == reference[0]["label_tokens"]
    cfg = TrainConfig(**{**STEP_CFG, "loss": LossConfig(max_label_tokens=96, chunk_size=16, label_bucket=16)},
                      grad_accum_steps=2)
    metrics, params, _, step = run_step(cfg, data[1], (1, 1, 1))
    size = -(-max(counts) // 16) * 16
    assert size < 96 and step.label_capacity(counts) == size
    assert step.label_capacity([1]) == 16 and step.label_capacity([500]) == 96  # at least one bucket; capped
    assert list(step._compiled)[0][-2] == size  # the signature ends (label buffer, attention spans)
    assert metrics["label_tokens_dropped"] == 0
    assert_same_step(reference, (metrics, params))


def test_frozen_vision_and_remat(data, reference, tiny_model):
    """The vision tower gets no update and no optimizer state; the decoder's update is unchanged
    (no active clipping; AdamW is per parameter); full remat does not change numbers."""
    cfg = TrainConfig(**STEP_CFG, freeze_vision=True, remat="full")
    metrics, params, state, _ = run_step(cfg, data[0], (1, 1, 1))
    assert params and not any("visual" in k for k in params)
    ref_params = reference[1]
    for k, v in params.items():
        np.testing.assert_allclose(v, ref_params[k], atol=TOL, err_msg=str(k))
    opt_paths = {tuple(str(p) for p in path) for path, _ in jax.tree_util.tree_leaves_with_path(state.opt_state)}
    assert not any("visual" in "/".join(p) for p in opt_paths)
    base = dict(nnx.to_flat_state(nnx.state(tiny_model)))  # run_step's model: init_model(tiny_config(), 0)
    for path, var in nnx.to_flat_state(state.frozen):
        assert path[1] == "visual"
        expected = base[path].get_value()
        np.testing.assert_array_equal(np.asarray(var.get_value()), np.asarray(expected))
    assert abs(metrics["loss"] - reference[0]["loss"]) < TOL


def test_attention_spans_skip_blocks_without_changing_the_step(tiny_model):
    """Rows packed with short examples, a patch budget of many small images: the step whose
    attention meets only the keys within the longest segment's and image's reach equals the one
    over whole rows and patch budgets, and its program does less work."""
    examples = make_examples(np.random.default_rng(9), 60)
    rows = [examples[:30], examples[30:]]
    batch = stack_microbatches([build_batch(tiny_model, rows, t=640, budget=patch_count(rows) + 40, packed=True)])
    longest = max(len(e["ids"]) for e in examples)
    assert longest <= 128 and attention_spans(batch) == (128, 16)  # images of 16 patches at most
    cfg = TrainConfig(**{**STEP_CFG, "loss": LossConfig(max_label_tokens=640, chunk_size=64)})
    windowed = run_step(cfg, batch, (1, 1, 1))
    whole = run_step(cfg, batch, (1, 1, 1), spans=(None, None))
    assert_same_step(windowed, whole, tol=1e-5)
    step, state = windowed[3], windowed[2]
    flops = {spans: step._jitted(batch, None, spans).lower(state, step.rest, dict(batch)).compile().cost_analysis()["flops"]
             for spans in ((128, 16), (None, None))}
    assert flops[(128, 16)] < 0.9 * flops[(None, None)], flops
    # Spans from the longest segment and image, in powers of two; none where they would cover all.
    one = {"attention_mask": np.ones((1, 1, 640), np.int32), "segment_ids": np.zeros((1, 1, 640), np.int32)}
    assert attention_spans(one) == (None, None)  # one segment over the whole row
    one["attention_mask"][..., 300:] = 0  # now 300 positions: span 512 of 640
    assert attention_spans(one) == (512, None)
    assert attention_spans({"attention_mask": one["attention_mask"]}) == (512, None)  # unpacked rows
    one["segment_ids"][..., 100:] = 1  # segments of 100 and 200 real positions (the padding does not count)
    assert attention_spans(one) == (256, None)
    no_images = {k: v for k, v in batch.items() if k not in ("pixel_values",) + VISION_KEYS}
    assert attention_spans(no_images) == (128, None)


def test_useful_flops_count_attention_within_packed_segments():
    from sr_jax.train.metrics import attention_rows, train_flops

    mask = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    seg = np.array([[1, 1, 2, 2, 0, 0], [1, 1, 1, 1, 1, 2]])  # 0: padding
    assert attention_rows(mask).tolist() == [4, 6]
    assert attention_rows(mask, seg).tolist() == [2, 2, 5, 1]
    cfg = tiny_config()
    t = cfg.text
    per_square = 2.0 * t.num_attention_heads * t.head_dim * t.num_hidden_layers * 3  # forward and backward
    rows, segments = (train_flops(cfg, n, 4, np.zeros((0, 3))) for n in (attention_rows(mask), attention_rows(mask, seg)))
    assert rows - segments == pytest.approx(per_square * ((16 + 36) - (4 + 4 + 25 + 1)))


def test_validate_batch_errors(data):
    cfg = TrainConfig(**STEP_CFG)
    batch = dict(data[0])
    with pytest.raises(ValueError, match="microbatches"):
        validate_batch(data[1], cfg)
    tight = TrainConfig(**{**STEP_CFG, "loss": LossConfig(max_label_tokens=10)})
    with pytest.raises(ValueError, match="exceed loss.max_label_tokens=10"):
        validate_batch(batch, tight)
    with pytest.raises(KeyError, match="labels"):
        validate_batch({k: v for k, v in batch.items() if k != "labels"}, cfg)
    with pytest.raises(KeyError, match="together"):
        validate_batch({k: v for k, v in batch.items() if k != "vision_segment"}, cfg)


def test_remat_policies_keep_gradients():
    from sr_jax.models.layers import call_layer
    from sr_jax.models.qwen3_vl.text import TextDecoderLayer, attention_mask_3d, text_rope
    cfg = tiny_config().text
    layer = TextDecoderLayer(cfg, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 8, cfg.hidden_size))
    cos, sin = text_rope(jnp.broadcast_to(jnp.arange(8), (3, 2, 8)), cfg, jnp.float32)
    mask = attention_mask_3d(jnp.ones((2, 8), jnp.int32))
    graphdef, params = nnx.split(layer)

    def grads(remat):
        def loss(p, x):
            return jnp.sum(call_layer(nnx.merge(graphdef, p), remat, x, cos, sin, mask) ** 2)
        return jax.jit(jax.grad(loss, argnums=(0, 1)), compiler_options=FAST_COMPILE)(params, x)

    ref = grads("none")
    for policy in ("full", "save_dots"):
        for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(grads(policy))):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6, err_msg=policy)
    with pytest.raises(ValueError, match="unknown remat policy"):
        grads("sometimes")


def test_scanned_layers_step_equals_unrolled(data):
    """model.scan_layers (5 decoder layers: 1 deepstack layer, then a scan of 4; 5 vision blocks: the
    tap, then a scan of 4) with full remat on a data x fsdp x tensor mesh == the unrolled step on
    one device."""
    def factory(scan):
        def make(seed):
            cfg = tiny_config()
            cfg.text.num_hidden_layers, cfg.vision.depth, cfg.scan_layers = 5, 5, scan
            return init_model(cfg, seed)
        return make

    cfg = TrainConfig(**STEP_CFG, remat="full")
    unrolled = run_step(cfg, data[0], (1, 1, 1), model_factory=factory(False))
    scanned = run_step(cfg, data[0], (2, 2, 2), model_factory=factory(True))
    assert unrolled[0]["label_tokens"] > 40
    assert_same_step(unrolled, scanned)
