"""Training metrics: FLOP accounting (for MFU), JSONL + TensorBoard writers, the loss-curve plot.

FLOPs of one training step ("useful" FLOPs, the 6N convention: forward 2 per multiply-add,
backward twice the forward):
  decoder   2 * (attention + MLP weights per layer) * layers * real tokens
            + causal attention 2 * T^2 * heads * head_dim * layers per attention row (QK^T and PV,
              half the square because of the causal mask), T the tokens of a row or, in a
              packed row, of each segment (`attention_rows`): attention across segments is not useful
  lm head   2 * hidden * vocab * label tokens (the loss projects only labelled positions)
  vision    per patch: 2 * (patch embed + per block qkv/proj/MLP weights); attention
            4 * n_image^2 * width per block and image (not causal); mergers per merged token
  training  3 x forward.
Padding tokens and padding patches are not counted. MFU = FLOPs / (step time x devices x peak).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

# Dense bf16 peak FLOP/s per device, by `device_kind` prefix (vendor data sheets).
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H200": 989e12,
    "NVIDIA H100": 989e12,
    "NVIDIA A100": 312e12,
}


def measured_matmul_peak(n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of a float32 n x n matmul on the default device (the CPU's practical peak)."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def peak_flops_per_device(configured: float | None = None) -> float:
    if configured:
        return configured
    import jax

    kind = jax.devices()[0].device_kind
    for prefix, flops in PEAK_FLOPS.items():
        if kind.startswith(prefix):
            return flops
    return measured_matmul_peak()


def attention_rows(attention_mask, segment_ids=None) -> np.ndarray:
    """Real tokens of each row (B, T) or, with `segment_ids`, of each packed segment of each row:
    the lengths `train_flops` squares for attention."""
    mask = np.asarray(attention_mask) > 0
    if segment_ids is None:
        return mask.sum(axis=1)
    seg = np.asarray(segment_ids)
    counts = [np.bincount(seg[r][mask[r]]) for r in range(mask.shape[0])]
    return np.concatenate([c[c > 0] for c in counts]) if counts else np.zeros(0, np.int64)


def train_flops(model_cfg, row_tokens, label_tokens: int, image_grid_thw, *, vision_trainable: bool = True) -> float:
    """Useful FLOPs of one step over attention rows with `row_tokens` real tokens each (rows, or
    packed segments: `attention_rows`; see module doc)."""
    t, v = model_cfg.text, model_cfg.vision
    d, hd = t.hidden_size, t.head_dim
    attn_w = d * t.num_attention_heads * hd * 2 + d * t.num_key_value_heads * hd * 2
    mlp_w = 3 * d * t.intermediate_size
    tokens = float(np.sum(row_tokens))
    fwd = 2.0 * (attn_w + mlp_w) * t.num_hidden_layers * tokens
    fwd += 2.0 * float(np.sum(np.square(np.asarray(row_tokens, np.float64)))) * t.num_attention_heads * hd \
        * t.num_hidden_layers
    fwd += 2.0 * d * t.vocab_size * label_tokens
    grids = np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
    vis = 0.0
    if len(grids):
        per_image = grids.prod(axis=1).astype(np.float64)
        patches = per_image.sum()
        w, merged = v.hidden_size, patches / v.spatial_merge_size**2
        block_w = 4 * w * w + 2 * w * v.intermediate_size
        vis += 2.0 * patches * (v.patch_dim * w + v.depth * block_w)
        vis += 4.0 * float(np.sum(per_image**2)) * w * v.depth
        win = w * v.spatial_merge_size**2
        vis += 2.0 * merged * (win * win + win * v.out_hidden_size) * (1 + len(v.deepstack_visual_indexes))
    return 3.0 * fwd + (3.0 if vision_trainable else 2.0) * vis


class MetricsWriter:
    """Appends one JSON object per step to `metrics.jsonl`; mirrors scalars to TensorBoard."""

    def __init__(self, out_dir: str | Path, tensorboard: bool = True, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self._tb = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                try:
                    from tensorboardX import SummaryWriter
                except ImportError:  # optional: JSONL is the record of truth
                    SummaryWriter = None
                if SummaryWriter is not None:
                    self._tb = SummaryWriter(str(Path(out_dir) / "tensorboard"))

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(f"train/{k}", float(v), int(step))

    def truncate_after(self, step: int) -> None:
        """On resume, drops rows past the restored step so the file has one row per step."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [row for row in read_metrics(self.path) if row["step"] <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(row) + "\n" for row in kept))
        tmp.replace(self.path)  # a kill during the rewrite leaves the old file, never half of it

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a metrics file. A last line that is not JSON (torn by a kill during its write) is
    dropped with a warning; a bad line before the last one is corruption and raises, naming it."""
    path = Path(path)
    lines = [(n, line) for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1) if line.strip()]
    rows = []
    for k, (lineno, line) in enumerate(lines):
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError("not a metrics row with an integer 'step'")
        except ValueError as e:
            if k == len(lines) - 1:
                log.warning("%s:%d: dropping a torn last line (%d characters; the run was killed while "
                            "writing it)", path, lineno, len(line))
                break
            raise ValueError(f"{path}:{lineno}: corrupt metrics line ({e})") from None
        rows.append(row)
    return rows


def plot_metrics(path: str | Path, png: str | Path, keys=("loss", "token_accuracy")) -> Path:
    """Loss curve (and token accuracy) against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(path)
    keys = [k for k in keys if any(k in r for r in rows)]
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys):
        steps = [r["step"] for r in rows if key in r]
        values = [r[key] for r in rows if key in r]
        ax.plot(steps, values, lw=1, alpha=0.5, label=key)
        if len(values) >= 5:
            w = max(2, len(values) // 20)
            smooth = np.convolve(values, np.ones(w) / w, mode="valid")
            ax.plot(steps[w - 1:], smooth, lw=2, label=f"{key} (mean of {w})")
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return Path(png)
