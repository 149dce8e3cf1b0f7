"""The model-family registry: lookup by HF model_type, and the family's facts agree with its config."""

import json

import pytest

from sr_jax.convert.hf_import import CheckpointError, hf_family
from sr_jax.models import family_of, get_family
from sr_jax.models.qwen3_vl import ModelConfig


def test_family_by_model_type_and_config():
    family = get_family("qwen3_vl")
    assert get_family() is family and family_of(ModelConfig()) is family
    assert family.config_class is ModelConfig
    assert family.model_class.__name__ == "Qwen3VLForConditionalGeneration"
    vision = ModelConfig().vision
    assert (family.image.patch_size, family.image.temporal_patch_size, family.image.merge_size) == \
        (vision.patch_size, vision.temporal_patch_size, vision.spatial_merge_size)
    assert family.image.patch_dim == vision.patch_dim == 1536


def test_unknown_model_type_is_named(tmp_path):
    with pytest.raises(ValueError, match="unknown model_type 'no_such_vl'"):
        get_family("no_such_vl")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no_such_vl"}))
    with pytest.raises(CheckpointError, match="config.json.*no_such_vl"):
        hf_family(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {}}))  # no model_type: the default
    assert hf_family(tmp_path) is get_family()
