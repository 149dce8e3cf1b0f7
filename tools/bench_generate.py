"""Generation throughput: sr_jax `generate` vs HF `generate` (KV cache) on the same model and prompts.

One run, same machine, same random weights (float32), a two-image prompt of about 600 tokens and
128 new tokens (no early stop), at batch 1 and batch 8. Prints new tokens/s and the ratio.

    python tools/bench_generate.py [--batches 1 8] [--new 128] [--repeats 2] [--sampling-only]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np


def bench_config():
    from transformers import Qwen3VLConfig

    text = dict(vocab_size=151936, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                num_attention_heads=8, num_key_value_heads=4, head_dim=64, max_position_embeddings=32768,
                rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [16, 8, 8],
                                 "mrope_interleaved": True})
    vision = dict(depth=4, hidden_size=256, intermediate_size=1024, num_heads=4, out_hidden_size=512,
                  num_position_embeddings=2304, deepstack_visual_indexes=[1, 2, 3])
    return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False)


def prompts(batch: int, rng):
    """Two 448x448-ish images (196 + 168 visual tokens) and ~240 text tokens per row."""
    from sr_jax.special_tokens import IMAGE_PAD_ID, VISION_END_ID, VISION_START_ID

    grids = []
    rows = []
    for _ in range(batch):
        g = [(1, 28, 28), (1, 24, 28)]
        ids = list(rng.integers(0, 150000, 100))
        for t, h, w in g:
            ids += [VISION_START_ID] + [IMAGE_PAD_ID] * (t * h * w // 4) + [VISION_END_ID]
            ids += list(rng.integers(0, 150000, 70))
        rows.append(ids)
        grids += g
    ids = np.array(rows, np.int64)
    pixels = rng.uniform(-1, 1, (sum(t * h * w for t, h, w in grids), 1536)).astype(np.float32)
    return ids, pixels, np.array(grids)


def bench_sampling(rows: int = 16, vocab: int = 151936, repeats: int = 10) -> tuple[float, float]:
    """ms per sampling step (temperature 0.9, top-k 50, top-p 0.9, as GRPO rollouts sample) over
    `rows` logit rows: ours (jitted) and HF's warpers + torch.multinomial."""
    import jax
    import torch
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    from sr_jax.generation import _sample, _Static

    logits = np.random.default_rng(0).normal(0, 3, (rows, vocab)).astype(np.float32)
    static = _Static(max_new_tokens=1, greedy=False, top_k=50, use_top_p=True, use_repetition_penalty=False)
    ours = jax.jit(lambda x, key: _sample(x, key, 0.9, 0.9, static))
    x = jax.numpy.asarray(logits)
    ours(x, jax.random.PRNGKey(0)).block_until_ready()
    t0 = time.perf_counter()
    for i in range(repeats):
        ours(x, jax.random.PRNGKey(i)).block_until_ready()
    ours_ms = 1e3 * (time.perf_counter() - t0) / repeats
    warpers = (TemperatureLogitsWarper(0.9), TopKLogitsWarper(50), TopPLogitsWarper(0.9))
    xt = torch.from_numpy(logits)
    t0 = time.perf_counter()
    for _ in range(repeats):
        y = xt
        for w in warpers:
            y = w(None, y)
        torch.multinomial(torch.softmax(y, -1), 1)
    return ours_ms, 1e3 * (time.perf_counter() - t0) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--torch-threads", type=int, default=os.cpu_count())
    ap.add_argument("--sampling-only", action="store_true", help="only the sampling-step comparison")
    args = ap.parse_args()
    if args.sampling_only:
        ours_ms, hf_ms = bench_sampling()
        print(f"sampling step, 16 x 151936 logits, top-k 50 + top-p 0.9: sr_jax {ours_ms:.1f} ms, HF warpers {hf_ms:.1f} ms")
        return

    import jax
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    from sr_jax import load_model
    from sr_jax.generation import generate
    from sr_jax.special_tokens import IMAGE_PAD_ID

    torch.set_num_threads(args.torch_threads)
    torch.manual_seed(0)
    hf = Qwen3VLForConditionalGeneration(bench_config()).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = load_model(d)
    n_params = sum(p.numel() for p in hf.parameters())
    print(f"model: {n_params / 1e6:.0f}M params, float32; jax {jax.__version__} on {jax.devices()[0].platform}, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
    from sr_jax.train.metrics import train_flops

    rng = np.random.default_rng(0)
    rows, prefill_flops = [], {}
    for batch in args.batches:
        ids, pixels, grids = prompts(batch, rng)
        # Useful prefill FLOPs: the forward pass, LM head on the last position only.
        prefill_flops[batch] = train_flops(ours.config, [ids.shape[1]] * batch, batch, grids) / 3
        t0 = time.perf_counter()
        out = generate(ours, ids, None, pixels, grids, max_new_tokens=args.new, stop_ids=[])
        compile_s = time.perf_counter() - t0
        ours_s = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = generate(ours, ids, None, pixels, grids, max_new_tokens=args.new, stop_ids=[])
            ours_s.append(time.perf_counter() - t0)
        assert out.shape == (batch, args.new)
        kw = dict(input_ids=torch.as_tensor(ids), attention_mask=torch.ones(ids.shape, dtype=torch.long),
                  pixel_values=torch.as_tensor(pixels), image_grid_thw=torch.as_tensor(grids),
                  mm_token_type_ids=torch.as_tensor(ids == IMAGE_PAD_ID).int())
        hf_s = []
        with torch.no_grad():
            hf.generate(**kw, max_new_tokens=4, min_new_tokens=4, do_sample=False)  # warm-up
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                ref = hf.generate(**kw, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False)
                hf_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            hf.generate(**kw, max_new_tokens=1, do_sample=False)
            hf_prefill = time.perf_counter() - t0
        assert ref.shape[1] - ids.shape[1] == args.new
        generate(ours, ids, None, pixels, grids, max_new_tokens=1, stop_ids=[])  # compile the 1-token program
        t0 = time.perf_counter()
        generate(ours, ids, None, pixels, grids, max_new_tokens=1, stop_ids=[])
        ours_prefill = time.perf_counter() - t0
        same = float((ref[:, ids.shape[1]:].numpy() == out).mean())
        ours_tps = batch * args.new / min(ours_s)
        hf_tps = batch * args.new / min(hf_s)
        step_ms = [1e3 * (min(t) - p) / (args.new - 1) for t, p in ((ours_s, ours_prefill), (hf_s, hf_prefill))]
        rows.append((batch, ids.shape[1], ours_tps, hf_tps, compile_s, same, ours_prefill, hf_prefill, *step_ms))
    print(f"\n{'batch':>5} {'prompt':>6} {'sr_jax tok/s':>13} {'HF tok/s':>9} {'ratio':>6} {'first call s':>12} "
          f"{'same tokens':>11} {'prefill s (ours/HF)':>20} {'decode ms/step (ours/HF)':>25}")
    for batch, plen, o, h, c, same, op, hp, os_, hs in rows:
        print(f"{batch:>5} {plen:>6} {o:>13.1f} {h:>9.1f} {o / h:>5.1f}x {c:>12.1f} {same:>11.1%} "
              f"{op:>10.2f}/{hp:<9.2f} {os_:>12.1f}/{hs:<12.1f}")
    # Floors: the prefill's useful FLOPs at this machine's measured float32 matmul peak, and the
    # LM-head product every decode step runs (it reads the whole vocabulary matrix).
    from sr_jax.train.metrics import measured_matmul_peak

    peak = measured_matmul_peak()
    head = jax.jit(ours.logits)
    head_bytes = ours.lm_head.kernel[...].nbytes
    for batch in args.batches:
        flops = prefill_flops[batch]
        hidden = jax.numpy.ones((batch, ours.config.text.hidden_size), jax.numpy.float32)
        head(hidden).block_until_ready()
        times = []
        for _ in range(10):
            t0 = time.perf_counter()
            head(hidden).block_until_ready()
            times.append(time.perf_counter() - t0)
        print(f"batch {batch}: prefill {flops / 1e9:.0f} GFLOP = {flops / peak:.2f} s at the measured float32 "
              f"matmul peak ({peak / 1e9:.0f} GFLOP/s); LM-head product {1e3 * min(times):.1f} ms "
              f"({head_bytes / 1e6:.0f} MB of weights, {head_bytes / min(times) / 1e9:.1f} GB/s)")
    ours_ms, hf_ms = bench_sampling()
    print(f"\nsampling step, 16 x 151936 logits, top-k 50 + top-p 0.9: sr_jax {ours_ms:.1f} ms, HF warpers {hf_ms:.1f} ms")
    print("\n(greedy decoding, prefill included in the tokens/s of both; the first sr_jax call includes "
          "compilation;\n prefill = a 1-token call, decode ms/step = the rest of the timed call / (new - 1))")


if __name__ == "__main__":
    main()
