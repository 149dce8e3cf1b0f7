"""Our Qwen3-VL against HF transformers (the oracle) on the same tiny random weights, float32."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from hf_oracle import (IMAGE, hf_inputs, image_prompt, our_model_from_hf, random_hf_model, random_pixels,
                       tiny_hf_config)
from sr_jax.models import family_of
from sr_jax.models.qwen3_vl import ModelConfig, get_rope_index

TOL = 1e-4


def assert_close(ours, ref, tol=TOL):
    ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
    assert ours.shape == ref.shape
    scale = max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(ours - ref).max())
    assert err <= tol * scale, f"max abs error {err:.3g} > {tol} x scale {scale:.3g}"


@pytest.fixture(scope="module")
def untied():
    """Untied head, deepstack on 2 of 3 layers, non-default mrope sections (4, 2, 2)."""
    hf = random_hf_model(tiny_hf_config(tie=False, deepstack=(0, 2), mrope_section=(4, 2, 2)), seed=1)
    return hf, our_model_from_hf(hf)


@pytest.fixture(scope="module")
def tied():
    """Tied embeddings, deepstack on all 3 layers, uneven sections (2, 3, 3) where the w slice is cut short."""
    hf = random_hf_model(tiny_hf_config(tie=True, deepstack=(0, 1, 2), mrope_section=(2, 3, 3)), seed=2)
    return hf, our_model_from_hf(hf)


def hf_logits(hf, ids, mask=None, pv=None, grids=None, **kw):
    with torch.no_grad():
        return hf(**hf_inputs(ids, mask, pv, grids), **kw)


def test_text_only(untied):
    hf, ours = untied
    ids = np.random.default_rng(0).integers(0, 151000, (2, 13))
    assert_close(ours(ids), hf_logits(hf, ids).logits.numpy())


def test_one_image(untied):
    hf, ours = untied
    rng = np.random.default_rng(1)
    grids = [(1, 6, 8)]
    ids = image_prompt(rng, grids, [4, 6])[None]
    pv = random_pixels(rng, grids)
    assert_close(ours(ids, pixel_values=pv, image_grid_thw=np.array(grids)),
                 hf_logits(hf, ids, None, pv, grids).logits.numpy())


def test_two_non_square_images_and_each_layer(untied):
    hf, ours = untied
    rng = np.random.default_rng(2)
    grids = [(1, 6, 10), (1, 12, 4)]
    ids = image_prompt(rng, grids, [5, 7, 4])[None]
    pv = random_pixels(rng, grids)
    ref = hf_logits(hf, ids, None, pv, grids, output_hidden_states=True)
    out = ours.features(ids, pixel_values=pv, image_grid_thw=np.array(grids), output_hidden_states=True)
    # HF records [embeddings, layer 0 .. layer L-2 outputs, final normed output].
    for i, h in enumerate(out.hidden_states[:-1]):
        assert_close(h, ref.hidden_states[i + 1].numpy())
    assert_close(out.hidden, ref.hidden_states[-1].numpy())
    assert_close(ours.logits(out.hidden), ref.logits.numpy())


def test_long_padded_rows_take_the_blocked_causal_path(untied):
    """512-token rows (two 256-row query blocks, upper triangle skipped), one left-padded."""
    hf, ours = untied
    rng = np.random.default_rng(11)
    ids = rng.integers(0, 151000, (2, 512))
    mask = np.ones_like(ids)
    mask[1, :200] = 0
    ids[1, :200] = 151643
    real = mask.astype(bool)
    assert_close(np.asarray(ours(ids, mask))[real], hf_logits(hf, ids, mask).logits.numpy()[real])


def test_causal_attention_equals_masked_attention_with_gradients():
    import jax
    import jax.numpy as jnp

    from sr_jax.models.layers import causal_attention, masked_softmax_attention
    from sr_jax.models.qwen3_vl.text import attention_mask_3d

    rng = np.random.default_rng(12)
    q = jnp.asarray(rng.standard_normal((2, 512, 2, 3, 16)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((2, 512, 2, 16)), jnp.float32) for _ in range(2))
    padding = jnp.asarray(np.arange(512)[None] >= np.array([[0], [77]]), jnp.int32)
    segments = jnp.asarray(np.repeat(np.arange(4), 128)[None].repeat(2, 0) + (np.arange(512) > 300)[None], jnp.int32)
    mask = attention_mask_3d(padding, segments)
    live = mask.any(-1)[:, :, None, None, None]  # padding queries see no key: their output is unused

    def loss(f, q, k, v):
        return (jnp.where(live, f(q, k, v, mask, scale=0.25), 0) ** 2 * jnp.arange(16)).sum()

    def textbook(q, k, v, mask, scale):  # softmax(q k^T * scale) v, differentiated by JAX itself
        s = jnp.einsum("bqhgd,bkhd->bhgqk", q, k) * scale
        s = jnp.where(mask[:, None, None], s, jnp.finfo(jnp.float32).min)
        return jnp.einsum("bhgqk,bkhd->bqhgd", jax.nn.softmax(s, axis=-1), v)

    blocked = jax.value_and_grad(lambda *a: loss(functools.partial(causal_attention, block=128), *a), (0, 1, 2))
    # No segment reaches over more than 128 positions: block i needs keys from i * 128 - 127 on.
    windowed = jax.value_and_grad(lambda *a: loss(functools.partial(causal_attention, block=128, span=128), *a),
                                  (0, 1, 2))
    plain = jax.value_and_grad(lambda *a: loss(masked_softmax_attention, *a), (0, 1, 2))
    reference = jax.value_and_grad(lambda *a: loss(textbook, *a), (0, 1, 2))
    (lr, gr) = reference(q, k, v)
    for lx, gx in (blocked(q, k, v), windowed(q, k, v), plain(q, k, v)):
        assert_close(lx, lr, 1e-5)
        for a, b in zip(gx, gr):
            assert_close(a, b, 1e-5)
    # A padding query (no visible key) averages all the values it is given, as a softmax over the
    # fill does (the blocked path gives it its block's keys only; the output is unused either way).
    dead = np.asarray(masked_softmax_attention(q, k, v, mask, scale=0.25))[1, 10]
    np.testing.assert_allclose(dead, np.asarray(v[1]).mean(0)[:, None].repeat(3, 1), atol=1e-5)
    # bfloat16 inputs: gradients within bfloat16 precision of the float32 reference.
    bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    _, gbf = jax.value_and_grad(lambda *a: loss(functools.partial(causal_attention, block=128), *a), (0, 1, 2))(*bf)
    for a, b in zip(gbf, gr):
        assert a.dtype == jnp.bfloat16
        assert_close(a, b, 3e-2)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch(untied, side):
    hf, ours = untied
    rng = np.random.default_rng(3)
    rows = [([(1, 4, 6), (1, 8, 4)], [3, 5, 2]), ([(1, 6, 6)], [6, 9])]
    seqs = [image_prompt(rng, g, t) for g, t in rows]
    width = max(len(s) for s in seqs)
    ids = np.full((2, width), 151643, np.int64)
    mask = np.zeros((2, width), np.int64)
    for b, s in enumerate(seqs):
        sl = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[b, sl], mask[b, sl] = s, 1
    grids = [g for r in rows for g in r[0]]
    pv = random_pixels(rng, grids)
    ref = hf_logits(hf, ids, mask, pv, grids).logits.numpy()
    out = np.asarray(ours(ids, mask, pv, np.array(grids)))
    real = mask.astype(bool)
    assert_close(out[real], ref[real])


def test_tied_embeddings(tied):
    hf, ours = tied
    assert ours.lm_head is None
    rng = np.random.default_rng(4)
    grids = [(1, 4, 4), (1, 6, 8)]
    ids = image_prompt(rng, grids, [2, 3, 5])[None]
    pv = random_pixels(rng, grids)
    assert_close(ours(ids, pixel_values=pv, image_grid_thw=np.array(grids)),
                 hf_logits(hf, ids, None, pv, grids).logits.numpy())


def test_vision_tower_and_deepstack(tied):
    hf, ours = tied
    rng = np.random.default_rng(5)
    grids = [(1, 10, 6), (1, 4, 12)]
    pv = random_pixels(rng, grids)
    with torch.no_grad():
        ref = hf.model.visual(torch.as_tensor(pv), grid_thw=torch.as_tensor(grids))
    merged, deep = ours.model.visual(pv, ours.prepare_vision(np.array(grids)))
    assert_close(merged, ref.pooler_output.numpy())
    assert len(deep) == len(ref.deepstack_features) == 3
    for a, b in zip(deep, ref.deepstack_features):
        assert_close(a, b.numpy())


def test_per_image_vision_attention_matches_hf(tied):
    """Many images of different sizes plus budget padding: attention per image slot (what
    generation uses for big batches) equals HF's per-image attention."""
    import jax

    from sr_jax.models.qwen3_vl.vision import attention_slots, pad_patches

    hf, ours = tied
    rng = np.random.default_rng(6)
    grids = [(1, 10, 6), (1, 4, 12), (1, 2, 2), (1, 8, 8), (2, 4, 4), (1, 6, 10)] * 3 + [(1, 12, 12)]  # 2 frames: 2 segments
    pv = random_pixels(rng, grids)
    with torch.no_grad():
        ref = hf.model.visual(torch.as_tensor(pv), grid_thw=torch.as_tensor(grids))
    n = pv.shape[0]
    padded, inputs = pad_patches(pv, ours.prepare_vision(np.array(grids)), 2048)
    layout = attention_slots(inputs.segment, num_real=n)
    assert layout is not None and layout[0].shape == (32, 192)  # 22 frames -> 32 slots of 192 rows (2 query blocks)
    assert attention_slots(inputs.segment) is None  # counting the padding as an image: not worth it
    with pytest.raises(ValueError, match="non-decreasing"):
        attention_slots(inputs.segment[:n][::-1].copy())
    merged, deep = jax.jit(ours.model.visual)(padded, inputs.as_tuple(), layout)
    assert_close(merged[: n // 4], ref.pooler_output.numpy())
    for a, b in zip(deep, ref.deepstack_features):
        assert_close(a[: n // 4], b.numpy())
    assert np.isfinite(np.asarray(merged)).all()  # padding rows too
    # The training step's form: all patches in one array, each query block meeting only the keys
    # within the largest frame's reach (12 x 12 = 144 patches: span 256) instead of all 2048.
    def windowed(span):
        model = nnx.clone(ours)
        family_of(model).set_attention_spans(model, None, span)
        return jax.jit(lambda p, v: model.model.visual(p, v))(padded, inputs.as_tuple())

    merged, deep = windowed(256)
    assert_close(merged[: n // 4], ref.pooler_output.numpy())
    for a, b in zip(deep, ref.deepstack_features):
        assert_close(a[: n // 4], b.numpy())
    assert np.isfinite(np.asarray(merged)).all()
    # A span shorter than the largest frame cuts keys off it: not the same (the test can fail).
    error = lambda out: float(np.abs(np.asarray(out[0][: n // 4]) - ref.pooler_output.numpy()).max())
    assert error(windowed(64)) > 10 * error((merged, deep)) + 1e-5


def test_position_ids_match_hf_get_rope_index(untied):
    hf, _ = untied
    rng = np.random.default_rng(6)
    grids = [(1, 4, 10), (1, 8, 2), (1, 6, 6)]
    a = image_prompt(rng, grids[:2], [3, 4, 5])
    b = image_prompt(rng, grids[2:], [7, 1])
    width = max(len(a), len(b)) + 2
    ids = np.full((2, width), 151643, np.int64)
    mask = np.zeros_like(ids)
    ids[0, -len(a):], mask[0, -len(a):] = a, 1
    ids[1, :len(b)], mask[1, :len(b)] = b, 1
    ref_pos, ref_delta = hf.model.get_rope_index(
        torch.as_tensor(ids), mm_token_type_ids=torch.as_tensor(ids == IMAGE).int(),
        image_grid_thw=torch.as_tensor(grids), attention_mask=torch.as_tensor(mask))
    pos, delta = get_rope_index(ids, np.array(grids), mask)
    np.testing.assert_array_equal(pos, ref_pos.numpy())
    np.testing.assert_array_equal(delta, ref_delta.numpy())


def test_jit_with_precomputed_inputs_equals_eager(untied):
    """The training path: positions and vision tables computed on the host, the network jitted."""
    _, ours = untied
    rng = np.random.default_rng(7)
    grids = np.array([(1, 6, 4)])
    ids = image_prompt(rng, grids, [3, 3])[None]
    pv = random_pixels(rng, grids)
    eager = ours(ids, pixel_values=pv, image_grid_thw=grids)
    pos = ours.prepare_positions(ids, None, grids)
    vis = ours.prepare_vision(grids).as_tuple()

    @nnx.jit
    def run(model, ids, pv, pos, vis):
        return model(ids, pixel_values=pv, position_ids=pos, vision=vis)

    assert_close(run(ours, ids, pv, pos, vis), eager, tol=1e-5)


def test_host_blocks_side_by_side_match_hf(untied):
    """A multi-host batch is the hosts' batches side by side, each with its own patch padding and
    image ids counted from 0 (`shard_batch` offsets the ids): host 1's image tokens must take host
    1's features, not host 0's padding. Each row equals HF on that row's own inputs."""
    from sr_jax.models.qwen3_vl.vision import pad_patches

    hf, ours = untied
    rng = np.random.default_rng(11)
    hosts, budget = [([(1, 4, 6)], [5, 9]), ([(1, 4, 4), (1, 2, 4)], [3, 3, 6])], 64
    ids, pixels, tables, refs = [], [], [], []
    for h, (grids, lens) in enumerate(hosts):
        row = image_prompt(rng, grids, lens)[None]
        pv = random_pixels(rng, grids)
        refs.append(hf_logits(hf, row, None, pv, grids).logits.numpy())
        pv, vis = pad_patches(pv, ours.prepare_vision(np.array(grids)), budget)
        vis = vis.as_tuple()
        ids.append(row)
        pixels.append(pv)
        tables.append(vis[:3] + (vis[3] + h * budget,))
    assert ids[0].shape == ids[1].shape and refs[0].shape == refs[1].shape
    ids = np.concatenate(ids)
    vision = tuple(np.concatenate(parts) for parts in zip(*tables))
    positions = np.concatenate([ours.prepare_positions(ids[i:i + 1], None, np.array(hosts[i][0])) for i in range(2)],
                               axis=1)
    out = ours(ids, pixel_values=np.concatenate(pixels), position_ids=positions, vision=vision)
    for i in range(2):
        assert_close(out[i:i + 1], refs[i])


def test_bfloat16_kl_against_fp32_reference(untied):
    hf, _ = untied
    ours_bf16 = our_model_from_hf(hf, dtype="bfloat16")
    rng = np.random.default_rng(8)
    grids = [(1, 6, 8), (1, 4, 4)]
    ids = image_prompt(rng, grids, [6, 5, 6])[None]
    pv = random_pixels(rng, grids)
    ref = torch.log_softmax(hf_logits(hf, ids, None, pv, grids).logits.double(), -1).numpy()
    out = np.asarray(ours_bf16(ids, pixel_values=pv, image_grid_thw=np.array(grids)), np.float64)
    out = out - out.max(-1, keepdims=True)
    out = out - np.log(np.exp(out).sum(-1, keepdims=True))
    kl = float((np.exp(ref) * (ref - out)).sum(-1).mean())
    agree = float((ref.argmax(-1) == out.argmax(-1)).mean())
    print(f"bf16 vs HF fp32: mean KL {kl:.2e}, greedy agreement {agree:.1%}")
    assert kl < 2e-2 and agree >= 0.9


def test_config_round_trip_and_presets(untied):
    hf, _ = untied
    cfg = ModelConfig.from_hf_dict(hf.config.to_dict())
    again = ModelConfig.from_hf_dict(cfg.to_hf_dict())
    assert again == cfg
    from transformers import Qwen3VLConfig
    rebuilt = Qwen3VLConfig(**cfg.to_hf_dict())
    assert rebuilt.text_config.rope_parameters["mrope_section"] == [4, 2, 2]
    assert rebuilt.vision_config.deepstack_visual_indexes == [0, 2]
    for name in ["tiny", "2b", "4b", "8b", "32b"]:
        ModelConfig.preset(name).validate()
    big = ModelConfig.preset("8b")
    assert (big.text.hidden_size, big.text.num_hidden_layers, big.text.intermediate_size) == (4096, 36, 12288)
    assert big.vision.deepstack_visual_indexes == [8, 16, 24] and not big.tie_word_embeddings


@pytest.fixture(scope="module")
def deep():
    """6 decoder layers and 6 vision blocks, deepstack taps (1, 3): with model.scan_layers the
    decoder runs 2 layers one by one and 4 as a scan, the vision tower runs scans between taps."""
    hf = random_hf_model(tiny_hf_config(tie=False, deepstack=(1, 3), text_layers=6, vision_depth=6), seed=3)
    return hf, our_model_from_hf(hf)


def _set_scan(model, on: bool):
    model.model.language_model.scan_layers = model.model.visual.scan_layers = on


def test_scanned_layers_match_hf_logits_and_each_layer(deep):
    hf, ours = deep
    rng = np.random.default_rng(7)
    grids = [(1, 6, 8), (1, 4, 4)]
    ids = image_prompt(rng, grids, [4, 6, 3])[None]
    pv = random_pixels(rng, grids)
    ref = hf_logits(hf, ids, None, pv, grids, output_hidden_states=True)
    _set_scan(ours, True)
    try:
        pos, vis = ours.prepare_positions(ids, None, np.array(grids)), ours.prepare_vision(np.array(grids))
        jaxpr = str(jax.make_jaxpr(lambda p: ours.features(ids, pixel_values=p, position_ids=pos, vision=vis).hidden)(pv))
        assert jaxpr.count("scan[") >= 3  # the decoder's scan and the vision tower's runs between taps
        out = ours.features(ids, pixel_values=pv, image_grid_thw=np.array(grids), output_hidden_states=True)
    finally:
        _set_scan(ours, False)
    assert len(out.hidden_states) == 6
    for i, h in enumerate(out.hidden_states[:-1]):
        assert_close(h, ref.hidden_states[i + 1].numpy())
    assert_close(ours.logits(out.hidden), ref.logits.numpy())


def test_scanned_layers_have_the_same_gradients_with_remat(deep):
    _, ours = deep
    rng = np.random.default_rng(8)
    grids = [(1, 4, 6)]
    ids = image_prompt(rng, grids, [5, 9])[None]
    pv = random_pixels(rng, grids)
    graphdef, params = nnx.split(ours)

    def grads(scan: bool):
        def loss(params):
            model = nnx.merge(graphdef, params)
            _set_scan(model, scan)
            model.model.language_model.remat = model.model.visual.remat = "full"
            return jnp.sum(model(ids, pixel_values=pv, image_grid_thw=np.array(grids))[0, -4:] ** 2) * 1e-3
        return jax.grad(loss)(params)

    scanned, unrolled = nnx.to_flat_state(grads(True)), nnx.to_flat_state(grads(False))
    assert [p for p, _ in scanned] == [p for p, _ in unrolled]
    for (_, g), (_, w) in zip(scanned, unrolled):
        assert_close(g.get_value(), w.get_value())
    # Not vacuous: every decoder layer's weights get a gradient.
    assert all(float(jnp.abs(g.get_value()).max()) > 0 for p, g in scanned if "layers" in p and "kernel" in p)


def test_compact_learning_preset_is_a_qwen3_vl_that_transformers_matches():
    """configs/model/qwen3vl_compact.yaml (issue 19) through HF's own config and model classes."""
    from transformers import Qwen3VLConfig
    cfg = ModelConfig.preset("compact")
    hf = random_hf_model(Qwen3VLConfig(**cfg.to_hf_dict()), seed=5)
    assert hf.config.text_config.head_dim == 64 and hf.config.text_config.rope_parameters["rope_theta"] == 1e4
    ours = our_model_from_hf(hf)
    rng = np.random.default_rng(5)
    grids = [(1, 16, 16)]  # a 256 px image: the position table's own 16x16 grid
    ids = image_prompt(rng, grids, [5, 7])[None]
    pv = random_pixels(rng, grids)
    assert_close(ours(ids, pixel_values=pv, image_grid_thw=np.array(grids)),
                 hf_logits(hf, ids, None, pv, grids).logits.numpy())
