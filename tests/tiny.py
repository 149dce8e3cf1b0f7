"""A tiny JAX Qwen3-VL with a small vocabulary, and synthetic SFT batches for it (shared by the
train-step, LoRA and sharding tests; `conftest.py` serves a ready model as the `tiny_model` fixture)."""

from __future__ import annotations

import functools

import jax
import numpy as np
from flax import nnx

from sr_jax.models.qwen3_vl import ModelConfig, init_model
from sr_jax.sharding import MeshConfig, make_mesh
from sr_jax.train.loss import IGNORE
from sr_jax.train.optim import make_optimizer
from sr_jax.train.step import create_train_state, make_train_step, validate_batch, vision_arrays

IMG, VSTART, VEND = 1000, 1001, 1002
FAST_COMPILE = {"xla_backend_optimization_level": 0}  # CPU compile time dominates these tests


def tiny_config(**over) -> ModelConfig:
    """Small vocabulary (fast) with the vision token ids remapped below it; one layer each."""
    items = ["text.vocab_size=1024", f"image_token_id={IMG}", f"vision_start_token_id={VSTART}",
             f"vision_end_token_id={VEND}", "video_token_id=1003", "text.num_hidden_layers=1", "vision.depth=1",
             "vision.deepstack_visual_indexes=[0]"] + [f"{k}={v}" for k, v in over.items()]
    return ModelConfig.preset("tiny", items)


@functools.lru_cache(maxsize=None)
def _compiled_forward(graphdef):
    def run(state, ids, pixel_values, positions, vision):
        return nnx.merge(graphdef, state)(ids, pixel_values=pixel_values, position_ids=positions, vision=vision)
    return jax.jit(run, compiler_options=FAST_COMPILE)


def compiled_logits(model, input_ids, pixel_values=None, image_grid_thw=None):
    """model(...) through one jit (host-side positions and vision tables); one compile per structure."""
    positions = model.prepare_positions(input_ids, None, image_grid_thw)
    vision = None if image_grid_thw is None else model.prepare_vision(np.asarray(image_grid_thw)).as_tuple()
    graphdef, state = nnx.split(model)
    return np.asarray(_compiled_forward(graphdef)(state, input_ids, pixel_values, positions, vision))


# ---------------------------------------------------------------------------------------------
# synthetic SFT batches: prompt (maybe with an image), answer tokens labelled


GRIDS = [(1, 4, 4), (1, 4, 2), (1, 2, 4)]


def make_examples(rng, n):
    out = []
    for i in range(n):
        grid = GRIDS[i % 3] if i % 2 == 0 else None
        prompt = list(rng.integers(0, 900, rng.integers(3, 7)))
        if grid:
            prompt[1:1] = [VSTART] + [IMG] * (grid[1] * grid[2] // 4) + [VEND]
        answer = list(rng.integers(0, 900, rng.integers(3, 7)))
        ids = np.array(prompt + answer, np.int32)
        labels = np.array([IGNORE] * len(prompt) + answer, np.int32)
        pixels = rng.uniform(-1, 1, (grid[1] * grid[2], 1536)).astype(np.float32) if grid else None
        out.append(dict(ids=ids, labels=labels, grid=grid, pixels=pixels))
    return out


def build_batch(model, rows, t, budget, packed):
    """rows: list of lists of examples; each row packs its examples (segment ids when `packed`)."""
    b = len(rows)
    ids, mask = np.zeros((b, t), np.int32), np.zeros((b, t), np.int32)
    labels, seg = np.full((b, t), IGNORE, np.int32), np.zeros((b, t), np.int32)
    pos = np.zeros((3, b, t), np.int32)
    grids, pixels = [], []
    for r, examples in enumerate(rows):
        off = 0
        for j, ex in enumerate(examples):
            n = len(ex["ids"])
            ids[r, off:off + n], labels[r, off:off + n], mask[r, off:off + n] = ex["ids"], ex["labels"], 1
            seg[r, off:off + n] = j
            grid = None if ex["grid"] is None else np.array([ex["grid"]])
            pos[:, r, off:off + n] = model.prepare_positions(ex["ids"][None], None, grid)[:, 0]
            if ex["grid"]:
                grids.append(ex["grid"])
                pixels.append(ex["pixels"])
            off += n
        assert off <= t
        seg[r, off:] = len(examples)
    batch = dict(input_ids=ids, attention_mask=mask, labels=labels, position_ids=pos)
    if packed:
        batch["segment_ids"] = seg
    if grids:
        batch.update(vision_arrays(np.concatenate(pixels), np.array(grids), budget, model.config.vision))
    return batch


def patch_count(rows):
    return sum(ex["pixels"].shape[0] for row in rows for ex in row if ex["grid"])


def run_step(cfg, batch, mesh_shape, seed=0, model_factory=None, spans=None):
    """One optimizer step from a fresh tiny model; returns (metrics, trainable params, state, step).
    `spans`: the step's attention spans (None: measured from the batch)."""
    model = (model_factory or (lambda s: init_model(tiny_config(), s)))(seed)
    n = int(np.prod(mesh_shape))
    mesh = make_mesh(MeshConfig(*mesh_shape), devices=jax.devices()[:n])
    opt = make_optimizer(cfg.optim, total_steps=10)
    validate_batch(batch, cfg)
    state = create_train_state(model, opt, mesh, cfg)
    step = make_train_step(model, opt, mesh, cfg, compiler_options=FAST_COMPILE)
    state, metrics = step(state, batch, spans=spans)
    flat = {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(state.params)}
    return {k: float(v) for k, v in metrics.items()}, flat, state, step
