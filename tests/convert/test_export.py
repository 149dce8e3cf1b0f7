"""Export to HF: transformers loads our directory; HF -> JAX -> HF is bit-identical in the same dtype."""

import copy
import json

import numpy as np
import pytest
import torch
from transformers import Qwen3VLForConditionalGeneration

from hf_oracle import hf_inputs, image_prompt, random_hf_model, random_pixels, tiny_hf_config
from sr_jax import load_model
from sr_jax.convert.hf_export import export_hf


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_bit_identical(tmp_path, dtype, tiny_hf_model):
    hf = copy.deepcopy(tiny_hf_model).to(dtype)  # .to() casts in place
    hf.save_pretrained(tmp_path / "src")
    name = "float32" if dtype == torch.float32 else "bfloat16"
    export_hf(load_model(tmp_path / "src", dtype=name), tmp_path / "out", max_shard_bytes=3_000_000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    back = Qwen3VLForConditionalGeneration.from_pretrained(tmp_path / "out", dtype=dtype)
    a, b = hf.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype == dtype, k
        assert torch.equal(a[k], b[k]), k


def test_transformers_reproduces_our_logits_tied(tmp_path):
    hf = random_hf_model(tiny_hf_config(tie=True), seed=12)
    hf.save_pretrained(tmp_path / "src")
    ours = load_model(tmp_path / "src")
    export_hf(ours, tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").is_file()
    back = Qwen3VLForConditionalGeneration.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert back.config.tie_word_embeddings
    rng = np.random.default_rng(0)
    grids = [(1, 4, 6)]
    ids = image_prompt(rng, grids, [3, 4])[None]
    pv = random_pixels(rng, grids)
    with torch.no_grad():
        ref = back(**hf_inputs(ids, None, pv, grids)).logits.numpy()
    out = np.asarray(ours(ids, pixel_values=pv, image_grid_thw=np.array(grids)))
    assert np.abs(out - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


def test_existing_output_is_refused_and_nothing_half_written(tmp_path, tiny_pair):
    ours = tiny_pair[1]
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        export_hf(ours, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp dirs left behind


def test_cli_jax_to_hf_from_converted_dir(tmp_path, tiny_hf_model, tiny_hf_dir):
    from sr_jax.cli import main

    hf = tiny_hf_model
    assert (tiny_hf_dir / "tokenizer_config.json").is_file()
    assert main(["convert", "hf-to-jax", "--hf", str(tiny_hf_dir), "--out", str(tmp_path / "jax")]) == 0
    assert main(["convert", "jax-to-hf", "--ckpt", str(tmp_path / "jax"), "--out", str(tmp_path / "hf"),
                 "--max-shard-size", "2MB"]) == 0
    assert (tmp_path / "hf" / "tokenizer_config.json").is_file()  # sidecar files travel along
    back = Qwen3VLForConditionalGeneration.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    a, b = hf.state_dict(), back.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert main(["convert", "jax-to-hf", "--ckpt", str(tmp_path / "jax"), "--out", str(tmp_path / "hf2"),
                 "--merge-lora"]) == 1  # plain weights have no adapters to merge
