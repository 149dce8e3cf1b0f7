"""Generation against HF `generate` (greedy, KV cache) on the same tiny random weights."""

import numpy as np
import pytest
import torch

from hf_oracle import hf_inputs, image_prompt, our_model_from_hf, random_pixels
from sr_jax.generation import PAD_ID, TRACE_COUNT, bucket_length, bucket_new_tokens, generate

IM_END = 151645


def hf_generate(hf, ids, mask=None, pv=None, grids=None, n=64, **kw):
    with torch.no_grad():
        out = hf.generate(**hf_inputs(ids, mask, pv, grids), max_new_tokens=n, do_sample=False,
                          eos_token_id=[IM_END], pad_token_id=PAD_ID, **kw)
    return out[:, ids.shape[1]:].numpy()


def padded(ref, n):
    """HF stops early when every row is done; fill up to n with pad like ours."""
    return np.pad(ref, ((0, 0), (0, n - ref.shape[1])), constant_values=PAD_ID)


def test_greedy_two_image_prompt_matches_hf(tiny_pair):
    hf, ours = tiny_pair
    rng = np.random.default_rng(0)
    grids = [(1, 6, 10), (1, 8, 4)]
    ids = image_prompt(rng, grids, [5, 7, 4])[None]
    pv = random_pixels(rng, grids)
    out = generate(ours, ids, None, pv, np.array(grids), max_new_tokens=64, stop_ids=[IM_END])
    np.testing.assert_array_equal(out, padded(hf_generate(hf, ids, None, pv, grids), 64))


def test_greedy_batch_of_mixed_lengths_matches_hf(tiny_pair):
    hf, ours = tiny_pair
    rng = np.random.default_rng(1)
    rows = [([(1, 4, 6)], [3, 9]), ([(1, 6, 6), (1, 4, 4)], [2, 4, 6]), ([], [17])]
    seqs = [image_prompt(rng, g, t) for g, t in rows]
    width = max(map(len, seqs))
    ids = np.full((len(seqs), width), PAD_ID)
    mask = np.zeros_like(ids)
    for b, s in enumerate(seqs):  # left padding, as HF generation expects
        ids[b, width - len(s):], mask[b, width - len(s):] = s, 1
    grids = [g for r in rows for g in r[0]]
    pv = random_pixels(rng, grids)
    out = generate(ours, ids, mask, pv, np.array(grids), max_new_tokens=64, stop_ids=[IM_END])
    np.testing.assert_array_equal(out, padded(hf_generate(hf, ids, mask, pv, grids), 64))


def test_long_padded_prompt_matches_hf(tiny_pair):
    """A 640-token prompt bucket: the prefill attends in causal query blocks over its own keys
    (not the whole cache); left padding of different lengths inside the blocks."""
    hf, ours = tiny_pair
    rng = np.random.default_rng(4)
    grids = [(1, 8, 8)]
    seqs = [image_prompt(rng, grids, [300, 290]), image_prompt(rng, [], [420])]
    width = max(map(len, seqs))
    assert bucket_length(width) == 640
    ids = np.full((2, width), PAD_ID)
    mask = np.zeros_like(ids)
    for b, s in enumerate(seqs):
        ids[b, width - len(s):], mask[b, width - len(s):] = s, 1
    pv = random_pixels(rng, grids)
    out = generate(ours, ids, mask, pv, np.array(grids), max_new_tokens=16, stop_ids=[IM_END])
    np.testing.assert_array_equal(out, padded(hf_generate(hf, ids, mask, pv, grids, n=16), 16))


def test_repetition_penalty_matches_hf(tiny_pair):
    hf, ours = tiny_pair
    ids = np.random.default_rng(2).integers(0, 151000, (1, 12))
    out = generate(ours, ids, max_new_tokens=24, repetition_penalty=1.3, stop_ids=[IM_END])
    np.testing.assert_array_equal(out, padded(hf_generate(hf, ids, n=24, repetition_penalty=1.3), 24))


def test_stop_token_is_kept_and_followed_by_pad(tiny_pair):
    _, ours = tiny_pair
    ids = np.random.default_rng(3).integers(0, 151000, (2, 9))
    free = generate(ours, ids, max_new_tokens=16, stop_ids=[])
    stop = int(free[0, 4])
    first = int(np.argmax(free[0] == stop))  # the first occurrence is where decoding must stop
    out = generate(ours, ids, max_new_tokens=16, stop_ids=[stop])
    np.testing.assert_array_equal(out[0, :first + 1], free[0, :first + 1])
    assert (out[0, first + 1:] == PAD_ID).all()
    row1_stop = np.flatnonzero(free[1] == stop)
    if row1_stop.size == 0:  # the other row is unaffected by row 0 stopping
        np.testing.assert_array_equal(out[1], free[1])


def test_prompt_buckets_avoid_recompilation(tiny_pair):
    _, ours = tiny_pair
    rng = np.random.default_rng(4)
    assert bucket_length(40) == bucket_length(60) == 64 and bucket_length(65) == 128
    generate(ours, rng.integers(0, 151000, (1, 40)), max_new_tokens=8)
    before = TRACE_COUNT["generate"]
    generate(ours, rng.integers(0, 151000, (1, 52)), max_new_tokens=8)
    generate(ours, rng.integers(0, 151000, (1, 61)), max_new_tokens=8)
    assert TRACE_COUNT["generate"] == before
    generate(ours, rng.integers(0, 151000, (1, 70)), max_new_tokens=8)
    assert TRACE_COUNT["generate"] == before + 1


def test_new_token_buckets_share_a_program_and_stop_at_the_request(tiny_pair):
    """Hostile max_new_tokens values must not each compile a program (issue 16); a bucket's extra
    slots are never decoded, so n tokens are exactly the first n of a longer run."""
    _, ours = tiny_pair
    ids = np.random.default_rng(5).integers(0, 151000, (2, 30))
    assert [bucket_new_tokens(n) for n in (1, 16, 17, 200, 256, 257, 512, 20000)] == \
        [16, 16, 32, 256, 256, 512, 512, 20224]
    longest = generate(ours, ids, max_new_tokens=32, stop_ids=[])
    before = TRACE_COUNT["generate"]
    for n in (17, 23, 31):
        out = generate(ours, ids, max_new_tokens=n, stop_ids=[])
        assert out.shape == (2, n)
        np.testing.assert_array_equal(out, longest[:, :n])
    assert TRACE_COUNT["generate"] == before


def test_segmented_generation_is_identical_and_stops_when_asked(tiny_pair):
    """A server cancels generation nobody waits for between segments (issue 16); segmenting
    itself never changes a token, sampled ones included."""
    _, ours = tiny_pair
    ids = np.random.default_rng(6).integers(0, 151000, (2, 30))
    for kw in ({}, {"temperature": 1.2, "top_k": 50, "seed": 3}):
        whole = generate(ours, ids, max_new_tokens=23, stop_ids=[], **kw)
        asked = []
        segmented = generate(ours, ids, max_new_tokens=23, stop_ids=[], segment=5,
                             should_stop=lambda: asked.append(1) and False, **kw)
        np.testing.assert_array_equal(segmented, whole)
        assert len(asked) == 4  # after steps 5, 10, 15 and 20
    calls = []
    stopped = generate(ours, ids, max_new_tokens=23, stop_ids=[], segment=5,
                       should_stop=lambda: calls.append(1) or len(calls) >= 2)
    np.testing.assert_array_equal(stopped[:, :10], generate(ours, ids, max_new_tokens=10, stop_ids=[]))
    assert (stopped[:, 10:] == PAD_ID).all() and len(calls) == 2


def test_sampling_is_seeded_and_filters_reduce_to_greedy(tiny_pair):
    _, ours = tiny_pair
    ids = np.random.default_rng(5).integers(0, 151000, (2, 10))
    greedy = generate(ours, ids, max_new_tokens=12, stop_ids=[])
    a = generate(ours, ids, max_new_tokens=12, temperature=1.5, seed=1, stop_ids=[])
    b = generate(ours, ids, max_new_tokens=12, temperature=1.5, seed=1, stop_ids=[])
    c = generate(ours, ids, max_new_tokens=12, temperature=1.5, seed=2, stop_ids=[])
    np.testing.assert_array_equal(a, b)
    assert (a != c).any() and (a != greedy).any()
    np.testing.assert_array_equal(generate(ours, ids, max_new_tokens=12, temperature=0.9, top_k=1, stop_ids=[]),
                                  greedy)
    np.testing.assert_array_equal(generate(ours, ids, max_new_tokens=12, temperature=0.9, top_p=1e-6, stop_ids=[]),
                                  greedy)


@pytest.mark.parametrize("top_k,top_p", [(20, 0.8), (0, 0.8), (20, 1.0)])
def test_sampling_distribution_matches_hf_warpers(top_k, top_p):
    """Our sampler draws from the distribution HF's temperature -> top-k -> top-p warpers leave
    (20k draws; total variation distance within sampling noise)."""
    import jax
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    from sr_jax.generation import _sample, _Static

    logits = np.random.default_rng(7).normal(0, 2, (1, 300)).astype(np.float32)
    warped = torch.from_numpy(logits)
    for warper in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(top_k) if top_k else None,
                   TopPLogitsWarper(top_p) if top_p < 1 else None):
        if warper is not None:
            warped = warper(None, warped)
    expected = torch.softmax(warped, -1)[0].numpy()
    static = _Static(max_new_tokens=1, greedy=False, top_k=top_k, use_top_p=top_p < 1, use_repetition_penalty=False)
    n = 20000
    draws = jax.jit(jax.vmap(lambda key: _sample(jax.numpy.asarray(logits), key, 0.7, top_p, static)[0]))(
        jax.random.split(jax.random.PRNGKey(0), n))
    freq = np.bincount(np.asarray(draws), minlength=300) / n
    assert set(np.flatnonzero(freq)) <= set(np.flatnonzero(expected))  # never outside HF's support
    assert 0.5 * np.abs(freq - expected).sum() < 0.03


def test_sharded_params_generate_the_same_tokens(tiny_pair):
    """The same call works on a model whose parameters are sharded over a (fsdp, tensor) mesh."""
    import jax
    from flax import nnx

    from sr_jax.sharding import MeshConfig, make_mesh, shard_model

    hf, ours = tiny_pair
    sharded = our_model_from_hf(hf)
    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    with jax.set_mesh(mesh):
        shard_model(sharded, mesh)
    kernel = sharded.model.language_model.layers[0].mlp.up_proj.kernel.get_value()
    assert len(kernel.sharding.device_set) == 8
    rng = np.random.default_rng(6)
    grids = [(1, 4, 6)]
    ids = image_prompt(rng, grids, [4, 5])[None]
    pv = random_pixels(rng, grids)
    expected = generate(ours, ids, None, pv, np.array(grids), max_new_tokens=16, stop_ids=[])
    with jax.set_mesh(mesh):
        got = generate(sharded, ids, None, pv, np.array(grids), max_new_tokens=16, stop_ids=[])
    np.testing.assert_array_equal(got, expected)


def test_public_entry_point_is_the_function():
    import sr_jax
    import sr_jax.reward.scorer  # noqa: F401  (importing other modules must not shadow the function)

    assert sr_jax.generate is generate
