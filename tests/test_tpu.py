"""TPU readiness without a TPU: splash attention (Pallas interpret mode on the CPU) against the CPU
kernel, and the whole SFT step compiled for a TPU topology by the real TPU compiler (libtpu)."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sr_jax.models.attention import Segments, resolve_backend, text_attention, vision_attention
from sr_jax.models.qwen3_vl.text import attention_mask_3d
from sr_jax.models.qwen3_vl.vision import attention_slots
from sr_jax.sharding import MeshConfig, make_mesh
from sr_jax.tpu import libtpu_available, parse_topology

needs_libtpu = pytest.mark.skipif(not libtpu_available(),
                                  reason="libtpu is not installed (pip install -e '.[tpu]'): no TPU compiler")

SMALL_VOCAB = ["text.vocab_size=1024", "image_token_id=1000", "vision_start_token_id=1001",
               "vision_end_token_id=1002", "video_token_id=1003"]


def _values_and_grads(fn, args, weight):
    """fn(*args) and the gradients of sum(fn(*args) * weight) w.r.t. every arg."""
    loss = lambda *a: jnp.sum(fn(*a) * weight)
    return jax.jit(fn)(*args), jax.jit(jax.grad(loss, argnums=tuple(range(len(args)))))(*args)


def _assert_close(a, b):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("kv_heads, groups", [(2, 2), (1, 3)])  # GQA with 2 key/value heads; MQA-like 1 of 3
def test_splash_text_packed_rows_match_cpu_kernel(kv_heads, groups):
    """Causal attention over packed rows (several segments, right padding, a length that is not a
    multiple of the kernel's 128-row blocks): values and gradients in float32."""
    b, t, d = 2, 200, 32
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(b, t, kv_heads, groups, d)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(b, t, kv_heads, d)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, t, kv_heads, d)), jnp.float32)
    attention_mask = np.ones((b, t), np.int32)
    attention_mask[1, 170:] = 0
    segment_ids = np.zeros((b, t), np.int32)
    segment_ids[0, 60:] = 1
    segment_ids[0, 130:] = 2
    segment_ids[1, 100:] = 1
    real = attention_mask.astype(bool)
    # Only real queries count: a padding query's output is never used.
    weight = jnp.asarray(rng.normal(size=q.shape) * real[:, :, None, None, None], jnp.float32)
    scale = d**-0.5

    dense = attention_mask_3d(jnp.asarray(attention_mask), jnp.asarray(segment_ids))
    want, want_grads = _values_and_grads(
        lambda q, k, v: text_attention(q, k, v, dense, scale=scale, backend="cpu"), (q, k, v), weight)
    segments = Segments.from_masks(jnp.asarray(attention_mask), jnp.asarray(segment_ids))
    got, got_grads = _values_and_grads(
        lambda q, k, v: text_attention(q, k, v, segments, scale=scale, backend="splash"), (q, k, v), weight)

    _assert_close(got[real], want[real])
    for g, w in zip(got_grads, want_grads):
        _assert_close(g, w)
    # The segments really matter: the first token of segment 1 sees itself only.
    _assert_close(got[0, 60], v[0, 60][:, None, :].repeat(groups, axis=1))


def _vision_case(n=200, sizes=(64, 96, 40), heads=2, d=16):
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.normal(size=(n, heads, d)), jnp.float32) for _ in range(3))
    segment = np.repeat(np.arange(len(sizes)), sizes).astype(np.int32)
    weight = jnp.asarray(rng.normal(size=(n, heads, d)), jnp.float32)
    return q, k, v, segment, weight


@pytest.mark.parametrize("use_layout", [False, True])
def test_splash_vision_per_image_segments_match_cpu_kernel(use_layout):
    """Bidirectional attention within each image, over all patches at once or per image slot."""
    q, k, v, segment, weight = _vision_case()
    layout = attention_slots(segment, multiple=32) if use_layout else None
    if use_layout:
        assert layout is not None
        layout = tuple(jnp.asarray(a) for a in layout)
    seg = jnp.asarray(segment)
    scale = 0.25

    def run(backend):
        return _values_and_grads(lambda q, k, v: vision_attention(q, k, v, seg, layout, scale=scale, backend=backend),
                                 (q, k, v), weight)

    (want, want_grads), (got, got_grads) = run("cpu"), run("splash")
    _assert_close(got, want)
    for g, w in zip(got_grads, want_grads):
        _assert_close(g, w)
    # Per image: the last image's outputs do not depend on the first image's keys.
    other = vision_attention(q, k.at[:64].set(0.0), v.at[:64].set(0.0), seg, layout, scale=scale, backend="splash")
    _assert_close(other[64:], got[64:])


def test_splash_under_a_mesh_shards_rows_and_heads():
    """Inside jit on a data/fsdp/tensor mesh the kernel runs in shard_map over rows and heads
    (text) and over query patches (vision), with the same results as one plain call."""
    b, t, hkv, g, d = 2, 128, 2, 2, 16
    rng = np.random.default_rng(2)
    q = jnp.asarray(rng.normal(size=(b, t, hkv, g, d)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(b, t, hkv, d)), jnp.float32) for _ in range(2))
    segments = Segments.from_masks(jnp.ones((b, t), jnp.int32), jnp.asarray(np.arange(t)[None].repeat(b, 0) // 50))
    vq, vk, vv, vseg, _ = _vision_case(n=256, sizes=(128, 128))
    text = lambda q, k, v: text_attention(q, k, v, segments, scale=0.25, backend="splash")
    vision = lambda q, k, v: vision_attention(q, k, v, jnp.asarray(vseg), scale=0.25, backend="splash")
    want_text, want_vision = text(q, k, v), vision(vq, vk, vv)

    mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=2), jax.devices()[:4])
    with jax.set_mesh(mesh):
        lowered = jax.jit(text).lower(q, k, v)
        assert "shard_map" in lowered.as_text() or "sdy.manual_computation" in lowered.as_text()
        _assert_close(jax.jit(text)(q, k, v), want_text)
        _assert_close(jax.jit(vision)(vq, vk, vv), want_vision)


def test_backend_resolution_follows_the_compile_platform():
    assert resolve_backend("auto") == "cpu"  # this process compiles for its CPU
    assert resolve_backend("splash") == "splash"
    with pytest.raises(ValueError, match="unknown attention_backend 'flash'"):
        resolve_backend("flash")


def test_topology_names():
    assert parse_topology("v5p-64").name == "v5p:2x4x4"  # v5p counts TensorCores: 32 chips
    assert parse_topology("v5p:4x4x2").chips == 32
    assert parse_topology("v6e-16").name == "v6e:4x4"
    assert parse_topology("v6e:2x2").chips == 4
    assert parse_topology("v5litepod-8").name == "v5e:2x4"
    with pytest.raises(ValueError, match="unknown TPU topology 'v9-8'"):
        parse_topology("v9-8")
    with pytest.raises(ValueError, match="count TensorCores"):
        parse_topology("v5p-3")


@needs_libtpu
def test_sft_step_compiles_for_v6e_with_splash_attention():
    """The whole SFT step of the tiny model (one 64x64 image per row) compiled for a v6e:2x2 slice
    by the TPU compiler: attention is the splash kernel (a Mosaic custom call), no dense (T, T)
    mask exists in the program, and the plan reports the TPU's own memory figures."""
    from sr_jax.plan import BatchShape, PlanSpec, format_report, run_plan

    t = 256
    spec = PlanSpec(model="tiny", mesh={"fsdp": 2, "tensor": 2}, topology="v6e:2x2",
                    batch=BatchShape(rows=2, seq=t, images_per_example=1, image_size=64),
                    model_overrides=SMALL_VOCAB)
    report = run_plan(spec)
    assert report["target"]["platform"] == "tpu" and report["target"]["device_kind"].startswith("TPU v6")
    assert report["attention_backend"] == "splash"
    hlo = report["_compiled"].as_text()
    assert "tpu_custom_call" in hlo
    assert not re.search(rf"pred\[[0-9,]*{t},{t}\]", hlo)  # no boolean (.., T, T) mask on the TPU path
    x = report["memory_per_device"]["xla"]
    assert 0 < x["total"] < report["target"]["hbm_bytes_per_device"] and report["fits"]
    e = report["roofline"]
    assert e["step_seconds"] > 0 and 0 < e["mfu"] < 1
    text = format_report(report)
    assert "TPU topology v6e:2x2" in text and "roofline ESTIMATE" in text and "fits: needs" in text


@needs_libtpu
def test_plan_that_does_not_fit_says_so_and_exits_nonzero(capsys):
    from sr_jax.cli import main

    # 4 chips of v5e (16 GiB each) cannot hold the 8B model's float32 weights and AdamW moments.
    code = main(["plan", "--model", "8b", "--topology", "v5e:2x2", "--seq", "128"])
    out = capsys.readouterr()
    assert code == 1
    text = out.out + out.err
    assert re.search(r"DOES NOT FIT: needs [0-9.]+ GiB of 16 GiB HBM per (chip|device)", text)
    assert "--lora" in text and "--remat full" in text


@needs_libtpu
@pytest.mark.parametrize("stage, lora", [("rl", False), ("generate", False), ("generate", True)])
def test_plan_stages_compile_for_tpu(stage, lora):
    """`--stage rl` compiles the GRPO update and `--stage generate` a prefill and a decode step
    for the TPU, each with its memory figures and roofline estimate; with LoRA (the 8B SFT config)
    the model's state holds a typed PRNG key (dropout), which the byte count must take."""
    from sr_jax.plan import BatchShape, PlanSpec, format_report, run_plan

    spec = PlanSpec(model="tiny", mesh={"fsdp": 4}, topology="v6e:2x2", stage=stage, completion_tokens=32,
                    batch=BatchShape(rows=4, seq=128), model_overrides=SMALL_VOCAB, lora=lora)
    report = run_plan(spec)
    assert report["target"]["platform"] == "tpu" and report["fits"]
    assert report["memory_per_device"]["xla"]["total"] > 0 and report["roofline"]["step_seconds"] > 0
    text = format_report(report)
    if stage == "rl":
        assert report["memory_per_device"]["optimizer"] > 0 and "GRPO update" in text
        assert report["memory_per_device"]["batch"] > 0
    else:
        assert report["memory_per_device"]["optimizer"] == 0 and report["memory_per_device"]["kv_cache"] > 0
        assert report["decode"]["xla"]["total"] > 0 and "decode roofline ESTIMATE" in text


@needs_libtpu
def test_plan_reads_a_training_config(capsys):
    """`--config` takes the model, dtypes, mesh (fsdp over the whole slice), rows, images and the
    label buffer from a training YAML; key=value overrides apply to it."""
    from sr_jax.cli import main

    vocab = "[" + ",".join(SMALL_VOCAB) + "]"
    code = main(["plan", "--config", "configs/sft/demo_cpu.yaml", "--topology", "v6e:2x2", "--json",
                 "data.seq_lens=[256]", "data.patch_budgets=[256]", f"model.overrides={vocab}"])
    out = capsys.readouterr()
    assert code == 0, out.err
    report = json.loads(out.out)
    assert report["model"] == "tiny" and report["dtype"] == "float32" and not report["lora"]
    assert report["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    b = report["batch"]
    assert (b["rows"], b["seq"], b["images_per_example"], b["image_size"]) == (4, 256, 1, 96)
    assert "from configs/sft/demo_cpu.yaml" in out.err


@needs_libtpu
def test_scanned_lora_step_compiles_for_tpu():
    """model.scan_layers with LoRA and full remat: the TPU program holds the layer loop (a while
    loop) rather than one copy per layer, with splash attention inside it."""
    from sr_jax.plan import BatchShape, PlanSpec, run_plan

    spec = PlanSpec(model="tiny", mesh={"fsdp": 4}, topology="v6e:2x2", lora=True, lora_rank=4, remat="full",
                    scan_layers=True, batch=BatchShape(rows=4, seq=128),
                    model_overrides=SMALL_VOCAB + ["text.num_hidden_layers=5"])
    report = run_plan(spec)
    hlo = report["_compiled"].as_text()
    assert "while" in hlo and "tpu_custom_call" in hlo
    assert report["scan_layers"] and report["fits"]


def test_topology_without_libtpu_falls_back_to_cpu_and_says_so(capsys, monkeypatch):
    from sr_jax import tpu
    from sr_jax.cli import main

    monkeypatch.setattr(tpu, "libtpu_available", lambda: False)
    argv = ["plan", "--model", "tiny", "--topology", "v6e:2x2", "--seq", "64", "--dtype", "float32"]
    assert main(argv + [x for o in SMALL_VOCAB for x in ("--override", o)]) == 0
    out = capsys.readouterr()
    assert "libtpu is not installed" in out.err and "XLA:CPU's" in out.err
    assert "compiled for: 4 fake CPU devices" in out.out and "attention cpu" in out.out
    assert "HBM per device" in out.out and "roofline" not in out.out  # no TPU program, no TPU estimate
