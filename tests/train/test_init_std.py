"""`model.init_std`: redraw chosen parameters of a from-scratch model at another scale (issue 19's
init levers), leaving every other parameter exactly as the default init made it."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sr_jax.config import load_config
from sr_jax.models.layers import redraw_params
from sr_jax.models.qwen3_vl.config import ModelConfig
from sr_jax.models.qwen3_vl.model import init_model
from sr_jax.train.loop import Trainer
from sr_jax.train.sft import SFTConfig

from pathlib import Path

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "sft" / "demo_cpu.yaml"


def params(model):
    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_redraw_sets_the_scale_of_matching_parameters_only():
    model = init_model(ModelConfig.preset("tiny"), seed=0)
    before = params(model)
    counts = redraw_params(model, [r"model\.visual\.pos_embed=1.5", r".*merger.*\.linear_fc2\.bias=0"], seed=1)
    after = params(model)
    assert counts == {r"model\.visual\.pos_embed=1.5": 1, r".*merger.*\.linear_fc2\.bias=0": 3}
    assert abs(after["model.visual.pos_embed"].std() - 1.5) < 0.15  # 64x32 draws
    assert not after["model.visual.merger.linear_fc2.bias"].any()
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert changed == {"model.visual.pos_embed"}  # the fc2 biases were zero already


def test_redraw_refuses_specs_that_match_nothing_or_do_not_parse():
    model = init_model(ModelConfig.preset("tiny"), seed=0)
    with pytest.raises(ValueError, match="no parameter path matches"):
        redraw_params(model, [r"visual\.pos_embed=1.0"])  # fullmatch: the path starts with model.
    with pytest.raises(ValueError, match="regex=std"):
        redraw_params(model, ["model.visual.pos_embed"])
    with pytest.raises(ValueError, match="regex=std"):
        redraw_params(model, ["model.visual.pos_embed=big"])


def test_trainer_applies_init_std_to_presets_and_refuses_it_with_weights(tmp_path):
    base = [f"run.out_dir={tmp_path}", "model.preset=tiny"]
    plain = params(Trainer(load_config(SFTConfig, CONFIG, base)).model)
    cfg = load_config(SFTConfig, CONFIG, base + [r"model.init_std=['model\.language_model\.embed_tokens\.embedding=0.5']"])
    scaled = params(Trainer(cfg).model)
    emb = scaled["model.language_model.embed_tokens.embedding"]
    assert abs(float(jnp.std(emb)) - 0.5) < 0.01
    assert all(np.array_equal(plain[k], scaled[k]) for k in plain if "embed_tokens" not in k)
    with pytest.raises(ValueError, match="init_std apply to presets"):
        Trainer(load_config(SFTConfig, CONFIG, base + [f"model.init_from={tmp_path}",
                                                       "model.init_std=['x=1']"]))


def test_sincos_position_table_is_smooth_and_distinct():
    from sr_jax.models.layers import sincos_2d_table
    model = init_model(ModelConfig.preset("tiny"), seed=0)  # pos_embed (64, 32): an 8x8 grid
    redraw_params(model, [r"model\.visual\.pos_embed=sincos:2.0"])
    table = np.asarray(model.model.visual.pos_embed.get_value())
    np.testing.assert_allclose(table, 2.0 * np.asarray(sincos_2d_table(64, 32)))
    dist = lambda a, b: np.linalg.norm(table[a] - table[b])
    assert dist(0, 1) < dist(0, 3) and dist(0, 8) < dist(0, 24)  # neighbours closer than far cells
    assert len({tuple(np.round(r, 5)) for r in table}) == 64     # every cell its own code
    with pytest.raises(ValueError, match="not a .cells, features. table"):
        redraw_params(model, [r"model\.visual\.patch_embed\.proj\.bias=sincos:1.0"])
    with pytest.raises(ValueError, match="square number"):
        redraw_params(model, [r"model\.visual\.merger\.linear_fc1\.kernel=sincos:1.0"])  # 128 rows
