"""3-D (temporal, height, width) position ids for Qwen3-VL's multimodal RoPE, in numpy.

Text tokens advance all three axes together. An image occupies a grid of merged patches: its
temporal ids are the start position, its height/width ids count rows/columns from the start,
and the text after it continues from start + max(grid_h, grid_w) (merged units). Padding
(attention_mask == 0) gets position 0. Runs on the host before `jit`, like a tokenizer.
"""

from __future__ import annotations

import numpy as np

from sr_jax.special_tokens import IMAGE_PAD_ID as IMAGE_TOKEN_ID, VISION_START_ID as VISION_START_TOKEN_ID


def _runs(flags: np.ndarray) -> list[tuple[int, int, bool]]:
    """Maximal runs of equal booleans as (start, end, value)."""
    if flags.size == 0:
        return []
    cuts = np.flatnonzero(np.diff(flags.astype(np.int8))) + 1
    starts = np.concatenate([[0], cuts])
    ends = np.concatenate([cuts, [flags.size]])
    return [(int(s), int(e), bool(flags[s])) for s, e in zip(starts, ends)]


def get_rope_index(
    input_ids,
    image_grid_thw=None,
    attention_mask=None,
    *,
    spatial_merge_size: int = 2,
    image_token_id: int = IMAGE_TOKEN_ID,
    vision_start_token_id: int = VISION_START_TOKEN_ID,  # kept for API symmetry; runs of image tokens suffice
) -> tuple[np.ndarray, np.ndarray]:
    """Returns (position_ids (3, B, T) int64, deltas (B, 1) int64).

    `deltas[b]` = (largest position + 1) - (number of real tokens): the offset that decoding adds
    to plain token counts so generated tokens continue after the prompt's positions.
    Images are consumed from `image_grid_thw` in order, across the batch.
    """
    del vision_start_token_id
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be (batch, seq), got shape {ids.shape}")
    batch, seq = ids.shape
    mask = np.ones_like(ids, dtype=bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    grids = np.zeros((0, 3), np.int64) if image_grid_thw is None else np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
    m = spatial_merge_size
    positions = np.zeros((3, batch, seq), np.int64)
    deltas = np.zeros((batch, 1), np.int64)
    next_image = 0
    for b in range(batch):
        row = ids[b][mask[b]]
        pieces, cur = [], 0
        for start, end, is_image in _runs(row == image_token_id):
            n = end - start
            if not is_image:
                pieces.append(np.broadcast_to(np.arange(cur, cur + n), (3, n)))
                cur += n
                continue
            if next_image >= len(grids):
                raise ValueError(f"batch row {b}: more image-token runs than image_grid_thw rows ({len(grids)})")
            t, h, w = (int(x) for x in grids[next_image])
            gh, gw = h // m, w // m
            if t * gh * gw != n:
                raise ValueError(
                    f"batch row {b}: image {next_image} has {n} <|image_pad|> tokens but its grid {t}x{h}x{w} "
                    f"needs {t * gh * gw}"
                )
            tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
            pieces.append(np.stack([tt.ravel() + cur, hh.ravel() + cur, ww.ravel() + cur]))
            cur += max(h, w) // m
            next_image += 1
        if pieces:
            full = np.concatenate(pieces, axis=1)
            positions[:, b, mask[b]] = full
            deltas[b, 0] = full.max() + 1 - row.size
    if next_image != len(grids):
        raise ValueError(f"image_grid_thw has {len(grids)} rows but the prompt holds {next_image} images")
    return positions, deltas


def text_position_ids(attention_mask=None, shape=None) -> np.ndarray:
    """Plain positions (3, B, T) for text-only input: 0..T-1 on every axis (as HF's forward does)."""
    if shape is None:
        shape = np.asarray(attention_mask).shape
    batch, seq = shape
    return np.broadcast_to(np.arange(seq, dtype=np.int64), (3, batch, seq)).copy()
