"""SFT step throughput: sr_jax's jitted train step vs HF PyTorch (forward + backward + AdamW),
eager and `torch.compile`, on the same ~100M-parameter Qwen3-VL, same batch, one run.

Config (issue 4): text hidden 512, 8 layers, 8 heads / 4 KV heads, MLP 1536; vision 256 wide,
4 deep; batch 2 x 1024 tokens, one 256x256 image per row, labels on the answer (last 128
tokens) only; float32. Prints tokens/s, the ratios, and useful-FLOP utilisation against this
machine's measured float32 matmul peak (FLOPs as in `sr_jax.train.metrics.train_flops`).

    python tools/bench_train.py [--steps 3] [--no-compile]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from sr_jax.batch import IGNORE_INDEX
from sr_jax.special_tokens import IMAGE_PAD_ID as IMAGE, VISION_END_ID as VEND, VISION_START_ID as VSTART


def hf_config():
    from transformers import Qwen3VLConfig

    text = dict(vocab_size=151936, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                num_attention_heads=8, num_key_value_heads=4, head_dim=64, max_position_embeddings=32768,
                rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [16, 8, 8],
                                 "mrope_interleaved": True})
    vision = dict(depth=4, hidden_size=256, intermediate_size=1024, num_heads=4, out_hidden_size=512,
                  num_position_embeddings=2304, deepstack_visual_indexes=[1, 2, 3])
    return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False)


def make_batch(rng, rows=2, seq=1024, answer=128, grid=(1, 16, 16)):
    n_img = grid[0] * grid[1] * grid[2] // 4
    ids = np.empty((rows, seq), np.int64)
    labels = np.full((rows, seq), IGNORE_INDEX, np.int64)
    for r in range(rows):
        text = rng.integers(0, 150000, seq - n_img - 2)
        ids[r] = np.concatenate([[text[0], VSTART], [IMAGE] * n_img, [VEND], text[1:]])
        labels[r, -answer:] = ids[r, -answer:]
    pixels = rng.uniform(-1, 1, (rows * grid[0] * grid[1] * grid[2], 1536)).astype(np.float32)
    return ids, labels, pixels, np.array([grid] * rows)


def time_steps(step, steps):
    step()  # warm-up / compile
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    args = ap.parse_args()

    import jax
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    from sr_jax.convert.loading import load_model
    from sr_jax.sharding import MeshConfig, make_mesh
    from sr_jax.train.config import LossConfig, OptimConfig, TrainConfig
    from sr_jax.train.metrics import measured_matmul_peak, train_flops
    from sr_jax.train.optim import make_optimizer
    from sr_jax.train.step import create_train_state, make_train_step, stack_microbatches, vision_arrays

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    ids, labels, pixels, grids = make_batch(rng)
    tokens = ids.size
    results = {}

    hf = Qwen3VLForConditionalGeneration(hf_config()).train()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = load_model(d)
    n_params = sum(p.numel() for p in hf.parameters())
    print(f"model: {n_params / 1e6:.0f}M params, float32; batch {ids.shape[0]} x {ids.shape[1]} tokens, "
          f"{len(grids)} images of 256x256, {int((labels != IGNORE_INDEX).sum())} label tokens")

    # ---- sr_jax ----
    cfg = TrainConfig(mesh=MeshConfig(fsdp=1), optim=OptimConfig(learning_rate=1e-5, warmup_ratio=0.0),
                      loss=LossConfig(max_label_tokens=int((labels != IGNORE_INDEX).sum())))
    mesh = make_mesh(cfg.mesh, jax.devices()[:1])
    optimizer = make_optimizer(cfg.optim, 100)
    step_fn = make_train_step(ours, optimizer, mesh, cfg)
    state = [create_train_state(ours, optimizer, mesh, cfg)]
    batch = {"input_ids": ids.astype(np.int32), "attention_mask": np.ones_like(ids, np.int32),
             "labels": labels.astype(np.int32),
             "position_ids": ours.prepare_positions(ids, None, grids).astype(np.int32),
             **vision_arrays(pixels, grids, pixels.shape[0], ours.config.vision)}
    batch = stack_microbatches([batch])

    def jax_step():
        state[0], m = step_fn(state[0], batch)
        jax.block_until_ready(m)

    results["sr_jax (jit)"] = time_steps(jax_step, args.steps)

    # ---- HF PyTorch ----
    inputs = dict(input_ids=torch.as_tensor(ids), attention_mask=torch.ones(ids.shape, dtype=torch.long),
                  pixel_values=torch.as_tensor(pixels), image_grid_thw=torch.as_tensor(grids),
                  mm_token_type_ids=torch.as_tensor(ids == IMAGE).int(), labels=torch.as_tensor(labels),
                  use_cache=False)  # training needs no KV cache; building one costs torch.compile recompiles
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-5)

    def torch_step(model):
        def run():
            opt.zero_grad(set_to_none=True)
            loss = model(**inputs).loss
            loss.backward()
            opt.step()
        return run

    results["HF eager"] = time_steps(torch_step(hf), args.steps)
    if not args.no_compile:
        compiled = torch.compile(hf)
        results["HF torch.compile"] = time_steps(torch_step(compiled), args.steps)

    flops = train_flops(ours.config, [ids.shape[1]] * ids.shape[0], int((labels != IGNORE_INDEX).sum()), grids)
    peak = measured_matmul_peak()
    print(f"useful FLOPs per step {flops / 1e12:.2f} TFLOP; measured float32 matmul peak {peak / 1e9:.0f} GFLOP/s\n")
    print(f"{'implementation':<20} {'step s':>8} {'tokens/s':>10} {'utilisation':>12} {'sr_jax speed-up':>16}")
    ours_t = results["sr_jax (jit)"]
    for name, t in results.items():
        print(f"{name:<20} {t:>8.2f} {tokens / t:>10.1f} {flops / t / peak:>11.1%} {t / ours_t:>15.2f}x")


if __name__ == "__main__":
    main()
