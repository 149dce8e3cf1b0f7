"""Checkpoint import, the Orbax converter and `sr-jax verify`, against HF Qwen3-VL (the oracle)."""

from __future__ import annotations

import json
import shutil

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

import sr_jax
from hf_oracle import image_prompt, random_hf_model, random_pixels, tiny_hf_config
from sr_jax.cli import main as cli_main
from sr_jax.convert import orbax_io
from sr_jax.convert.hf_import import CheckpointError, SafetensorsFile, contiguous, convert_hf_to_jax
from sr_jax.convert.verify import model_logits

GRIDS = [(1, 4, 6), (1, 8, 4)]  # two non-square images
REL_TOL = 1e-4


def _inputs():
    rng = np.random.default_rng(0)
    ids = image_prompt(rng, GRIDS, [5, 4, 3])[None]
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "pixel_values": random_pixels(rng, GRIDS),
            "image_grid_thw": np.asarray(GRIDS, np.int64)}


def _hf_reference(hf, inputs):
    ids = torch.as_tensor(inputs["input_ids"])
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=torch.as_tensor(inputs["attention_mask"]),
                  pixel_values=torch.as_tensor(inputs["pixel_values"]),
                  image_grid_thw=torch.as_tensor(inputs["image_grid_thw"]),
                  mm_token_type_ids=(ids == hf.config.image_token_id).long()).logits[0].numpy()


def _assert_matches(model, oracle):
    hf, inputs, reference = oracle
    ours = model_logits(model, inputs)
    rel = np.abs(ours - reference).max() / np.abs(reference).max()
    assert rel < REL_TOL, f"relative logit error {rel:.3g}"


def _numpy_state(hf):
    return {k: v.detach().numpy().copy() for k, v in hf.state_dict().items()}


def _write_checkpoint(directory, hf, tensors):
    directory.mkdir(parents=True)
    hf.config.save_pretrained(directory)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


@pytest.fixture(scope="module")
def oracle(tiny_hf_model):
    hf = tiny_hf_model
    inputs = _inputs()
    return hf, inputs, _hf_reference(hf, inputs)


@pytest.fixture(scope="module")
def hf_dir(oracle, tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf") / "ckpt"
    oracle[0].save_pretrained(directory)
    # Tokenizer/processor side files a real checkpoint ships; the converter must carry them along.
    (directory / "tokenizer_config.json").write_text('{"model_max_length": 262144}')
    (directory / "chat_template.jinja").write_text("{{ messages }}")
    return directory


def test_load_single_safetensors(oracle, hf_dir):
    assert (hf_dir / "model.safetensors").is_file()
    _assert_matches(sr_jax.load_model(hf_dir), oracle)


def test_load_sharded_safetensors(oracle, tmp_path):
    oracle[0].save_pretrained(tmp_path, max_shard_size="20MB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    _assert_matches(sr_jax.load_model(tmp_path), oracle)


def test_load_pytorch_bin_single_and_sharded(oracle, tmp_path):
    hf = oracle[0]
    state = hf.state_dict()
    single = tmp_path / "single"
    single.mkdir()
    hf.config.save_pretrained(single)
    torch.save(state, single / "pytorch_model.bin", _use_new_zipfile_serialization=False)  # legacy: no mmap
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    hf.config.save_pretrained(sharded)
    keys = sorted(state)
    weight_map = {}
    for i, part in enumerate((keys[::2], keys[1::2])):
        name = f"pytorch_model-{i + 1:05d}-of-00002.bin"
        torch.save({k: state[k] for k in part}, sharded / name)
        weight_map.update({k: name for k in part})
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    _assert_matches(sr_jax.load_model(single), oracle)
    _assert_matches(sr_jax.load_model(sharded), oracle)


def test_legacy_key_layout(oracle, tmp_path):
    """Older Qwen-VL exports name tensors `visual.*` and `model.layers.*`; they load the same."""
    def legacy(key):
        return key.replace("model.visual.", "visual.").replace("model.language_model.", "model.")

    state = {legacy(k): v for k, v in _numpy_state(oracle[0]).items()}
    assert "visual.patch_embed.proj.weight" in state and "model.layers.0.mlp.up_proj.weight" in state
    _assert_matches(sr_jax.load_model(_write_checkpoint(tmp_path / "legacy", oracle[0], state)), oracle)


def test_tied_checkpoint_with_and_without_lm_head(tmp_path):
    hf = random_hf_model(tiny_hf_config(tie=True), seed=2)
    inputs = _inputs()
    tied = (hf, inputs, _hf_reference(hf, inputs))
    hf.save_pretrained(tmp_path / "absent")
    with __import__("safetensors").safe_open(str(tmp_path / "absent" / "model.safetensors"), "numpy") as f:
        assert "lm_head.weight" not in f.keys()
    _assert_matches(sr_jax.load_model(tmp_path / "absent"), tied)

    state = _numpy_state(hf)
    embed = state["model.language_model.embed_tokens.weight"]
    state["lm_head.weight"] = embed.copy()
    _assert_matches(sr_jax.load_model(_write_checkpoint(tmp_path / "equal", hf, state)), tied)

    state["lm_head.weight"] = embed + 1.0
    with pytest.raises(CheckpointError, match="ties the embeddings but lm_head.weight differs"):
        sr_jax.load_model(_write_checkpoint(tmp_path / "different", hf, state))


def test_convert_cli_and_load(oracle, hf_dir, tmp_path):
    out = tmp_path / "jax"
    assert cli_main(["convert", "hf-to-jax", "--hf", str(hf_dir), "--out", str(out)]) == 0
    for name in ("sr_jax_model.json", "model_config.yaml", "config.json", "params", "generation_config.json"):
        assert (out / name).exists(), name
    for name in ("config.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (hf_dir / name).read_bytes(), name
    assert json.loads((out / "sr_jax_model.json").read_text())["leaf_dtypes"] == ["float32"]
    _assert_matches(sr_jax.load_model(out), oracle)

    # An existing non-empty output is refused unless --overwrite.
    assert cli_main(["convert", "hf-to-jax", "--hf", str(hf_dir), "--out", str(out), "--dtype", "bfloat16"]) == 1
    assert json.loads((out / "sr_jax_model.json").read_text())["param_dtype"] == "float32"
    assert cli_main(["convert", "hf-to-jax", "--hf", str(hf_dir), "--out", str(out), "--dtype", "bfloat16",
                     "--overwrite"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["jax"]  # no temporary siblings left behind

    import orbax.checkpoint as ocp

    stored = ocp.StandardCheckpointer().metadata(out / "params").item_metadata.tree
    dtypes = {str(leaf.dtype) for leaf in __import__("jax").tree.leaves(stored)}
    assert dtypes == {"bfloat16"}
    model = sr_jax.load_model(out, dtype="bfloat16")
    kernel = np.asarray(model.model.language_model.layers[1].mlp.up_proj.kernel[...])
    hf_weight = oracle[0].state_dict()["model.language_model.layers.1.mlp.up_proj.weight"].numpy()
    assert kernel.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(kernel, hf_weight.T.astype(ml_dtypes.bfloat16))
    # A float32 load of bf16-stored params gives the bf16 values exactly.
    widened = sr_jax.load_model(out).model.language_model.layers[1].mlp.up_proj.kernel[...]
    assert widened.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(widened), kernel.astype(np.float32))


def _bad_state(kind, state):
    state = dict(state)
    if kind == "missing":
        del state["model.language_model.layers.1.mlp.up_proj.weight"], state["lm_head.weight"]
    elif kind == "many_missing":
        for key in [k for k in state if k.startswith("model.visual.")]:
            del state[key]
    elif kind == "extra":
        state["model.language_model.layers.7.mlp.up_proj.weight"] = np.zeros((96, 64), np.float32)
    elif kind == "shape":
        state["model.visual.blocks.0.attn.qkv.weight"] = np.zeros((96, 31), np.float32)
    elif kind == "int_and_bool":
        key = "model.language_model.layers.1.mlp.up_proj.weight"
        state[key] = state[key].astype(np.int32)
        state["model.visual.blocks.0.norm1.weight"] = state["model.visual.blocks.0.norm1.weight"] > 0
    elif kind == "nonfinite":
        state["model.language_model.layers.0.self_attn.o_proj.weight"][0, :3] = [np.nan, np.inf, -np.inf]
        state["model.visual.merger.norm.bias"][1] = np.nan
    return state


BAD = {
    "missing": r"2 missing keys:\n    lm_head.weight\n    model.language_model.layers.1.mlp.up_proj.weight"
               r"(.|\n)*lm_head.weight is required",
    "many_missing": r"missing keys:(.|\n)*\.\.\. and \d+ more",
    "extra": r"1 unexpected keys:\n    model.language_model.layers.7.mlp.up_proj.weight",
    "shape": r"model.visual.blocks.0.attn.qkv.weight: checkpoint \[96, 31\], model expects \[96, 32\] "
             r"\(model.safetensors\)",
    "truncated": r"model.safetensors: cannot read safetensors file, it is truncated or corrupt",
    "truncated_bin": r"pytorch_model.bin: cannot read PyTorch weights file, it is truncated or corrupt",
    "missing_shard": r"model.safetensors.index.json lists shard files that do not exist: \['model-00002.safetensors'\]",
    "int_and_bool": r"2 weights stored as non-float tensors(.|\n)*"
                    r"model.language_model.layers.1.mlp.up_proj.weight: int32 \(model.safetensors\)(.|\n)*"
                    r"model.visual.blocks.0.norm1.weight: bool",
    "nonfinite": r"NaN/Inf weights, refused \(pass --allow-nonfinite(.|\n)*2 tensors with NaN/Inf:\n"
                 r"    model.language_model.layers.0.self_attn.o_proj.weight: 3 non-finite values \(in the checkpoint\)"
                 r"\n    model.visual.merger.norm.bias: 1 non-finite values",
    "bad_config_json": r"hf/config.json: not valid JSON",
    "config_missing_key": r"hf/config.json: missing key 'hidden_size'",
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_checkpoint_is_named_error_and_leaves_no_output(kind, oracle, tmp_path):
    hf = oracle[0]
    directory = _write_checkpoint(tmp_path / "hf", hf, _bad_state(kind, _numpy_state(hf)))
    if kind == "truncated":
        data = (directory / "model.safetensors").read_bytes()
        (directory / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif kind == "truncated_bin":
        (directory / "model.safetensors").unlink()
        torch.save(hf.state_dict(), directory / "pytorch_model.bin")
        data = (directory / "pytorch_model.bin").read_bytes()
        (directory / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    elif kind == "missing_shard":
        weight_map = {k: "model.safetensors" for k in hf.state_dict()}
        weight_map["lm_head.weight"] = "model-00002.safetensors"
        (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    elif kind == "bad_config_json":
        text = (directory / "config.json").read_text()
        (directory / "config.json").write_text(text[: len(text) // 2])
    elif kind == "config_missing_key":
        config = json.loads((directory / "config.json").read_text())
        del config["text_config"]["hidden_size"]
        (directory / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=BAD[kind]):
        convert_hf_to_jax(directory, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    assert cli_main(["convert", "hf-to-jax", "--hf", str(directory), "--out", str(out)]) == 1
    assert not out.exists()


def test_nonfinite_weights_convert_when_allowed(oracle, tmp_path, caplog):
    hf = oracle[0]
    directory = _write_checkpoint(tmp_path / "hf", hf, _bad_state("nonfinite", _numpy_state(hf)))
    out = tmp_path / "out"
    with caplog.at_level("WARNING", logger="sr_jax.convert.hf_import"):
        assert cli_main(["convert", "hf-to-jax", "--hf", str(directory), "--out", str(out), "--allow-nonfinite"]) == 0
    assert "kept because non-finite values are allowed" in caplog.text
    assert "model.visual.merger.norm.bias: 1 non-finite values" in caplog.text
    kernel = np.asarray(sr_jax.load_model(out).model.language_model.layers[0].self_attn.o_proj.kernel[...])
    assert np.isnan(kernel[0, 0]) and np.isposinf(kernel[1, 0]) and np.isneginf(kernel[2, 0])
    # bfloat16 output: overflow-free values stay finite, the NaN/Inf ones are found on the 16-bit words too
    with pytest.raises(CheckpointError, match="3 non-finite values"):
        convert_hf_to_jax(directory, tmp_path / "bf16", dtype="bfloat16")


def test_float16_overflow_is_named_as_such(oracle, tmp_path):
    hf = oracle[0]
    state = _numpy_state(hf)
    state["model.language_model.layers.1.mlp.down_proj.weight"][0, 0] = 1e6  # finite in float32, not in float16
    directory = _write_checkpoint(tmp_path / "hf", hf, state)
    with pytest.raises(CheckpointError, match=r"layers.1.mlp.down_proj.weight: 1 non-finite values \(overflow "
                                              r"converting float32 to float16\)"):
        convert_hf_to_jax(directory, tmp_path / "out", dtype="float16")


def test_safetensors_reader_matches_library(tmp_path):
    from safetensors import safe_open

    rng = np.random.default_rng(3)
    tensors = {"bf16": rng.normal(size=(5, 7)).astype(ml_dtypes.bfloat16), "f32": np.arange(3, dtype=np.float32),
               "f16": rng.normal(size=(2, 3, 4)).astype(np.float16), "i64": np.arange(4, dtype=np.int64)}
    save_file(tensors, str(tmp_path / "x.safetensors"))
    reader = SafetensorsFile(tmp_path / "x.safetensors")
    with safe_open(str(tmp_path / "x.safetensors"), "numpy") as lib:
        for key in tensors:
            got = reader.read(key)
            assert got.dtype == lib.get_tensor(key).dtype
            np.testing.assert_array_equal(got, lib.get_tensor(key))


@pytest.mark.parametrize("source, target", [(ml_dtypes.bfloat16, ml_dtypes.bfloat16), (np.float32, np.float32),
                                            (ml_dtypes.bfloat16, np.float32), (np.float32, ml_dtypes.bfloat16)])
def test_tiled_transpose_copy(source, target):
    matrix = np.random.default_rng(5).normal(size=(300, 529)).astype(source)
    for view in (matrix.T, matrix, matrix[:, 3:]):
        out = contiguous(view, target, block=64)
        assert out.flags.c_contiguous and out.dtype == np.dtype(target)
        np.testing.assert_array_equal(out, np.ascontiguousarray(view, dtype=target))


def test_verify_passes_on_good_and_fails_on_corrupted(hf_dir, tmp_path, capsys):
    good = tmp_path / "good"
    convert_hf_to_jax(hf_dir, good)
    assert cli_main(["verify", "--hf", str(hf_dir), "--jax", str(good), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "greedy agreement 100.00%" in printed and "OK" in printed

    model = sr_jax.load_model(good)
    kernel = model.model.language_model.layers[2].self_attn.o_proj.kernel
    noise = np.random.default_rng(4).normal(0, 0.05, kernel[...].shape).astype(np.float32)
    kernel.set_value(kernel[...] + noise)
    orbax_io.save_model(model, tmp_path / "bad", hf_dir=hf_dir)
    assert cli_main(["verify", "--hf", str(hf_dir), "--jax", str(tmp_path / "bad")]) == 1
    assert "FAIL: max relative error" in capsys.readouterr().out
    shutil.rmtree(tmp_path / "bad")
