"""LoRA: target selection, dropout, PEFT import/export parity with HF + peft, merge, and a
LoRA train step that changes only the adapters."""

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

from hf_oracle import hf_inputs, image_prompt, our_model_from_hf, random_hf_model, random_pixels, tiny_hf_config
from sr_jax.convert.peft import export_peft_adapter, import_peft_adapter
from sr_jax.lora import LoRA, LoRAConfig, LoRAParam, apply_lora, lora_layers, merge_lora
from sr_jax.models.qwen3_vl import init_model
from sr_jax.train.config import LossConfig, OptimConfig, TrainConfig
from sr_jax.train.step import stack_microbatches
from tiny import build_batch, compiled_logits, make_examples, patch_count, run_step, tiny_config

peft = pytest.importorskip("peft")

DECODER = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def assert_close(ours, ref, tol=1e-4):
    ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
    scale = max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(ours - ref).max())
    assert err <= tol * scale, f"max abs error {err:.3g} > {tol} x scale {scale:.3g}"


def randomise_adapters(model, seed):
    """Non-zero adapter weights (a fresh B is zero, which would hide every mistake)."""
    key = jax.random.key(seed)
    for i, (_, linear) in enumerate(sorted(lora_layers(model).items(), key=lambda kv: str(kv[0]))):
        ka, kb = jax.random.split(jax.random.fold_in(key, i))
        for var, k in ((linear.lora.lora_a, ka), (linear.lora.lora_b, kb)):
            var.set_value(0.3 * jax.random.normal(k, var.get_value().shape))


# ---------------------------------------------------------------------------------------------
# targets, fresh adapters, dropout


def test_targets_and_fresh_adapter_is_identity(make_tiny_model):
    model = init_model(tiny_config(**{"text.num_hidden_layers": 2}), seed=0)
    ids = np.random.default_rng(0).integers(0, 900, (2, 9))
    before = compiled_logits(model, ids)
    paths = apply_lora(model, LoRAConfig(rank=4, alpha=8, dropout=0.0))
    assert sorted(str(p[-1]) for p in paths) == sorted(DECODER * 2)
    assert all("language_model" in p for p in paths)
    np.testing.assert_array_equal(compiled_logits(model, ids), before)  # B starts at zero
    assert len(jax.tree.leaves(nnx.state(model, LoRAParam))) == 2 * 14
    randomise_adapters(model, seed=0)
    unmerged = compiled_logits(model, ids)
    assert np.abs(unmerged - before).max() > 1e-2
    merge_lora(model)
    assert not lora_layers(model)
    assert_close(compiled_logits(model, ids), unmerged, tol=1e-5)

    vision = apply_lora(make_tiny_model(), LoRAConfig(rank=2, vision=True, dropout=0.0))
    vision_names = sorted(".".join(map(str, p[2:])) for p in vision if "visual" in p)
    assert vision_names == ["blocks.0.attn.proj", "blocks.0.attn.qkv", "blocks.0.mlp.linear_fc1",
                            "blocks.0.mlp.linear_fc2", "deepstack_merger_list.0.linear_fc1",
                            "deepstack_merger_list.0.linear_fc2", "merger.linear_fc1", "merger.linear_fc2"]
    some = apply_lora(make_tiny_model(),
                      LoRAConfig(targets=["v_proj", r"model\.visual\.blocks\.\d+\.attn\.qkv"], dropout=0.0))
    assert sorted(map(str, (p[-1] for p in some))) == ["qkv", "v_proj"]
    with pytest.raises(ValueError, match="match no linear layer"):
        apply_lora(make_tiny_model(), LoRAConfig(targets=["nonexistent_proj"]))


def test_lora_dropout_is_keyed_and_off_when_deterministic():
    stream = nnx.Rngs(dropout=0).dropout
    lora = LoRA(16, 8, rank=4, scale=2.0, dropout=0.5, axes=("embed", "mlp"), dtype=jnp.float32,
                param_dtype=jnp.float32, key=jax.random.key(1), dropout_stream=stream)
    lora.lora_b.set_value(jax.random.normal(jax.random.key(2), (4, 8)))
    x = jax.random.normal(jax.random.key(3), (64, 16))
    plain = np.asarray(x @ lora.lora_a[...] @ lora.lora_b[...] * 2.0)
    np.testing.assert_allclose(np.asarray(lora(x)), plain, rtol=1e-6)  # deterministic by default
    lora.deterministic = False
    first, second = np.asarray(lora(x)), np.asarray(lora(x))
    assert not np.allclose(first, plain) and not np.allclose(first, second)
    nnx.reseed(lora, dropout=7)
    again = np.asarray(lora(x))
    nnx.reseed(lora, dropout=7)
    np.testing.assert_array_equal(np.asarray(lora(x)), again)


# ---------------------------------------------------------------------------------------------
# PEFT interop (the oracle: transformers + peft)


@pytest.fixture(scope="module")
def prompt():
    rng = np.random.default_rng(9)
    grids = [(1, 4, 6)]
    ids = image_prompt(rng, grids, [4, 7])[None]
    return ids, random_pixels(rng, grids), grids


def hf_logits(model, prompt):
    ids, pv, grids = prompt
    with torch.no_grad():
        return model(**hf_inputs(ids, None, pv, grids)).logits.numpy()


def our_logits(model, prompt):
    ids, pv, grids = prompt
    return compiled_logits(model, ids, pv, np.array(grids))


HF_CFG = dict(text_layers=2, vision_depth=1, deepstack=(0,))


def test_peft_adapter_import_matches_peft_merged_hf(tmp_path, prompt):
    hf = random_hf_model(tiny_hf_config(**HF_CFG), seed=11)
    ours = our_model_from_hf(copy.deepcopy(hf))  # our_model_from_hf shares memory with torch; PEFT edits in place
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=DECODER + ["qkv"], lora_dropout=0.0,
                             rank_pattern={"o_proj": 2}, alpha_pattern={"v_proj": 16})
    wrapped = peft.get_peft_model(hf, config)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn_like(p))
    wrapped.save_pretrained(tmp_path)
    unmerged_ref = hf_logits(wrapped, prompt)
    merged_ref = hf_logits(wrapped.merge_and_unload(), prompt)
    assert_close(unmerged_ref, merged_ref)
    assert np.abs(merged_ref - our_logits(ours, prompt)).max() > 1e-2  # the adapter matters

    paths = import_peft_adapter(ours, tmp_path)
    assert len(paths) == 2 * 7 + 1
    assert lora_layers(ours)[("model", "language_model", "layers", 0, "self_attn", "o_proj")].lora.lora_a[...].shape[1] == 2
    assert_close(our_logits(ours, prompt), merged_ref)
    merge_lora(ours)
    assert not lora_layers(ours)
    assert_close(our_logits(ours, prompt), merged_ref)


def test_exported_adapter_loads_in_peft(tmp_path, prompt):
    base = random_hf_model(tiny_hf_config(**HF_CFG), seed=12)
    ours = our_model_from_hf(copy.deepcopy(base))
    apply_lora(ours, LoRAConfig(rank=3, alpha=6, dropout=0.0, vision=True))
    randomise_adapters(ours, seed=1)
    export_peft_adapter(ours, tmp_path)
    loaded = peft.PeftModel.from_pretrained(base, tmp_path)
    assert_close(hf_logits(loaded, prompt), our_logits(ours, prompt))

    # ...and reads back into a fresh copy of our model.
    again = our_model_from_hf(random_hf_model(tiny_hf_config(**HF_CFG), seed=12))
    import_peft_adapter(again, tmp_path)
    assert_close(our_logits(again, prompt), our_logits(ours, prompt), tol=1e-6)


def test_peft_import_errors(tmp_path, make_tiny_model):
    model = make_tiny_model()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        import_peft_adapter(model, tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    key = "base_model.model.model.language_model.layers.7.self_attn.q_proj"
    save_file({f"{key}.lora_A.weight": np.zeros((2, 64), np.float32),
               f"{key}.lora_B.weight": np.zeros((64, 2), np.float32)}, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="layers.7.self_attn.q_proj"):
        import_peft_adapter(model, tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                              "use_dora": True}))
    with pytest.raises(ValueError, match="use_dora"):
        import_peft_adapter(model, tmp_path)
    assert load_file(str(tmp_path / "adapter_model.safetensors"))  # the file itself was fine


# ---------------------------------------------------------------------------------------------
# a LoRA train step


def test_lora_step_changes_only_adapters_and_merges(tmp_path, tiny_model):
    cfg = TrainConfig(optim=OptimConfig(learning_rate=1e-2, warmup_steps=0, schedule="constant"),
                      loss=LossConfig(max_label_tokens=64),
                      lora=LoRAConfig(enabled=True, rank=4, alpha=8, dropout=0.1, vision=True))
    rows = [[e] for e in make_examples(np.random.default_rng(13), 4)]
    batch = stack_microbatches([build_batch(tiny_model, rows, t=24, budget=patch_count(rows), packed=False)])

    # Two decoder layers: with one, deepstack features (added after layer 0) never reach a label.
    model_cfg = tiny_config(**{"text.num_hidden_layers": 2})
    base = init_model(model_cfg, 0)
    apply_lora(base, cfg.lora)
    lora_before = {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(base, LoRAParam))}
    base_before = {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(base, nnx.Param))
                   if k[-2] != "lora"}

    def lora_model(seed):
        model = init_model(model_cfg, seed)
        apply_lora(model, cfg.lora)
        return model

    metrics, params, state, step = run_step(cfg, batch, (1, 1, 1), model_factory=lora_model)
    assert set(params) == set(lora_before)
    assert all(k[-1] in ("lora_a", "lora_b") for k in params)
    adam_leaves = [x for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0]
    assert len(adam_leaves) == 2 * len(params)  # mu and nu for the adapters, nothing for base weights
    for k, v in params.items():
        # B starts at zero, so A's first gradient is exactly zero; every B moves.
        assert np.array_equal(v, lora_before[k]) if k[-1] == "lora_a" else not np.allclose(v, lora_before[k]), k
    state, second = step(state, batch)
    assert second["loss"] < metrics["loss"]
    for k, v in nnx.to_flat_state(state.params):
        assert not np.allclose(np.asarray(v.get_value()), params[k]), k  # now A moves as well
    frozen = {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(state.frozen)}
    assert frozen.keys() == base_before.keys()
    for k, v in frozen.items():
        np.testing.assert_array_equal(v, base_before[k], err_msg=str(k))
    assert np.isfinite(metrics["loss"]) and metrics["label_tokens"] > 0

    model = step.model(state)  # for evaluation / export: dropout off, adapters in place
    assert all(linear.lora.deterministic for linear in lora_layers(model).values())
    assert len(lora_layers(model)) == len(params) // 2
