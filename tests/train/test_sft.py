"""`sr-jax train`: exact resume (also onto another device count and after SIGKILL), partial
checkpoints never restored, the final model usable by the scorer."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from sr_jax.config import load_config
from sr_jax.train.metrics import read_metrics
from sr_jax.train.sft import SFTConfig, train

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "sft" / "demo_cpu.yaml"


def small(out, **extra):
    overrides = [f"run.out_dir={out}", "run.total_steps=4", "run.checkpoint_every=2", "run.progress_bar=false",
                 "run.tensorboard=false", "run.async_checkpoint=false",
                 "data.sources=['synthetic:n=64,seed=3,split=train,min_side=48,max_side=64']",
                 "data.batch_size=2", "data.seq_lens=[512]", "data.patch_budgets=[256]",
                 "train.loss.max_label_tokens=512", "train.optim.warmup_ratio=0.0"]
    overrides += [f"{k}={v}" for k, v in extra.items()]
    return load_config(SFTConfig, CONFIG, overrides)


def losses(out):
    return [(r["step"], r["loss"]) for r in read_metrics(Path(out) / "metrics.jsonl")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    summary = train(small(out))
    return out, summary


def test_uninterrupted_run_learns_and_saves_a_model(reference):
    out, summary = reference
    rows = losses(out)
    assert [s for s, _ in rows] == [1, 2, 3, 4]
    assert rows[-1][1] < rows[0][1]
    assert summary["model_dir"] and (Path(summary["model_dir"]) / "sr_jax_model.json").is_file()
    assert (Path(summary["model_dir"]) / "tokenizer.json").is_file()
    from sr_jax import load_model
    load_model(summary["model_dir"])  # loads as a plain model directory


def test_resume_gives_the_identical_trajectory_and_ignores_partial_saves(reference, tmp_path):
    ref_out, _ = reference
    first = train(small(tmp_path), stop_after=2)
    assert first["step"] == 2
    # What a save killed half way leaves behind: Orbax's temporary directory. Never restored.
    fake = tmp_path / "checkpoints" / "3.orbax-checkpoint-tmp-1234567"
    (fake / "state").mkdir(parents=True)
    (fake / "state" / "garbage").write_bytes(b"\0" * 100)
    second = train(small(tmp_path))
    assert second["resumed_from"] == 2 and second["step"] == 4
    np.testing.assert_allclose([l for _, l in losses(tmp_path)], [l for _, l in losses(ref_out)], rtol=1e-6)


def test_resume_onto_another_device_count(reference, tmp_path):
    ref_out, _ = reference
    train(small(tmp_path, **{"run.num_devices": 8}), stop_after=2)  # fsdp over 8 devices
    resumed = train(small(tmp_path, **{"run.num_devices": 1}))
    assert resumed["resumed_from"] == 2
    np.testing.assert_allclose([l for _, l in losses(tmp_path)], [l for _, l in losses(ref_out)], rtol=1e-4)


def test_sigkill_mid_training_then_resume(reference, tmp_path):
    ref_out, _ = reference
    cfg = small(tmp_path, **{"run.checkpoint_every": 1})
    from sr_jax.config import dump_yaml
    dump_yaml(cfg, tmp_path / "cfg.yaml")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, "-m", "sr_jax.cli", "train", "--config", str(tmp_path / "cfg.yaml")],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            done = [p for p in (tmp_path / "checkpoints").glob("[0-9]*") if p.name.isdigit()]
            if any(int(p.name) >= 2 for p in done):
                break
            if proc.poll() is not None:
                pytest.fail("training exited before it could be killed")
            time.sleep(0.05)
        else:
            pytest.fail("no checkpoint within the deadline")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    resumed = train(small(tmp_path, **{"run.checkpoint_every": 1}))
    assert 2 <= resumed["resumed_from"] < 4 and resumed["step"] == 4
    rows = losses(tmp_path)
    assert [s for s, _ in rows] == [1, 2, 3, 4]  # one row per step, none lost or repeated
    np.testing.assert_allclose([l for _, l in rows], [l for _, l in losses(ref_out)], rtol=1e-6)


def test_lora_run_exports_merged_weights_to_hf(tmp_path):
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    from sr_jax.cli import main
    from sr_jax.train.loop import model_from_checkpoint

    cfg = small(tmp_path / "run", **{"run.total_steps": 2, "train.lora.enabled": "true", "train.lora.rank": 4,
                                     "train.lora.alpha": 8, "train.lora.dropout": 0.0})
    train(cfg)
    adapted, _ = model_from_checkpoint(tmp_path / "run")  # adapters kept separate
    assert main(["convert", "jax-to-hf", "--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "hf"),
                 "--merge-lora"]) == 0
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    hf = Qwen3VLForConditionalGeneration.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids = np.random.default_rng(0).integers(0, 150000, (1, 16))
    with torch.no_grad():
        ref = hf(input_ids=torch.as_tensor(ids)).logits.numpy()
    ours = np.asarray(adapted(ids))
    assert np.abs(ours - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())
    assert main(["convert", "jax-to-hf", "--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "hf2")]) == 0
    # Without merging: the base weights, plus the adapters in PEFT's format beside them.
    from safetensors.numpy import load_file
    key = "model.language_model.layers.0.self_attn.q_proj.weight"
    merged_w, base_w = load_file(tmp_path / "hf" / "model.safetensors")[key], load_file(tmp_path / "hf2" / "model.safetensors")[key]
    assert np.abs(merged_w - base_w).max() > 1e-4
    assert (tmp_path / "hf2" / "adapter_config.json").is_file()
    # transformers (with peft installed) applies an adapter found beside the weights: the tuned model again.
    tuned = Qwen3VLForConditionalGeneration.from_pretrained(tmp_path / "hf2", dtype=torch.float32).eval()
    with torch.no_grad():
        peft_logits = tuned(input_ids=torch.as_tensor(ids)).logits.numpy()
    assert np.abs(peft_logits - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


def test_multi_host_data_positions_need_the_same_host_count(tmp_path):
    """A checkpoint written by two hosts holds both data positions: one process cannot resume
    from it (its share of the data would differ), but can still restore the weights."""
    import jax.numpy as jnp

    from sr_jax.train.checkpoint import TrainCheckpointer

    ckpt = TrainCheckpointer(tmp_path, save_every=1, keep=1, async_save=False)
    state = {"w": jnp.arange(3.0)}
    # What `save` writes on two processes (every host's position, gathered by process 0).
    ckpt.save(1, state, {"hosts": [{"next_index": 5}, {"next_index": 6}]}, {"step": 1})
    ckpt.wait()
    abstract = {"w": jax_struct(state["w"])}
    with pytest.raises(ValueError, match="saved by 2 process"):
        ckpt.restore(1, abstract)
    restored, data, _ = ckpt.restore(1, abstract, with_data=False)
    assert data is None and np.array_equal(restored["w"], np.arange(3.0))
    ckpt.save(2, state, {"next_index": 7}, {"step": 2})  # one process: the position as it is
    ckpt.wait()
    assert ckpt.restore(2, abstract)[1] == {"next_index": 7}
    ckpt.close()


def jax_struct(x):
    import jax

    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)


def test_sft_run_applies_train_loss_token_weights(tmp_path):
    """`train.loss.token_weights` (tests/train/test_token_weights.py): `sr-jax train` resolves the
    texts and its step weighs those targets; each weighted target adds (weight - 1) to the step's
    loss normaliser (token weighting)."""
    cfg = small(tmp_path, **{"run.total_steps": 1, "train.loss.token_weights": "{' [],': 10, ' [{\"': 10}"})
    assert cfg.train.loss.token_weights == {' [],': 10.0, ' [{"': 10.0}
    train(cfg)
    (row,) = read_metrics(tmp_path / "metrics.jsonl")
    extra = row["loss_weight"] - row["label_tokens"]
    assert extra > 0 and extra % 9 == 0  # one region-list opening per SC answer in the batch
