"""Shared test helpers: tiny random HF Qwen3-VL models (the oracle) and our model with the same weights."""

from __future__ import annotations

import numpy as np
import torch
from flax import nnx
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration as HFModel

from sr_jax.models.qwen3_vl.names import from_hf, hf_key, normalize_hf_key
from sr_jax.models.qwen3_vl import ModelConfig, abstract_model

IMAGE, VSTART, VEND = 151655, 151652, 151653


def tiny_hf_config(*, tie=False, deepstack=(0, 1), mrope_section=(4, 2, 2), vocab=151936, text_layers=3,
                   vision_depth=3, num_pos=64, head_dim=16) -> Qwen3VLConfig:
    text = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=text_layers,
                num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim, rms_norm_eps=1e-6,
                max_position_embeddings=4096, tie_word_embeddings=tie,
                rope_parameters={"rope_type": "default", "rope_theta": 5e6,
                                 "mrope_section": list(mrope_section), "mrope_interleaved": True})
    vision = dict(depth=vision_depth, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
                  num_position_embeddings=num_pos, deepstack_visual_indexes=list(deepstack), patch_size=16,
                  temporal_patch_size=2, spatial_merge_size=2)
    return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tie,
                         image_token_id=IMAGE, vision_start_token_id=VSTART, vision_end_token_id=VEND)


def random_hf_model(config: Qwen3VLConfig, seed: int = 0) -> HFModel:
    """HF model with weights scaled up from the 0.02 init so logits are large enough to compare."""
    torch.manual_seed(seed)
    model = HFModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "norm1" in name or "norm2" in name or "_norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / max(p.shape[-1] if p.ndim > 1 else 1, 1) ** 0.5
                        * (1.0 if "embed" in name else 1.0))
    return model


def our_model_from_hf(hf: HFModel, dtype="float32"):
    cfg = ModelConfig.from_hf_dict(hf.config.to_dict())
    cfg.dtype = cfg.param_dtype = dtype
    model = abstract_model(cfg)
    # Copies: our arrays must not alias torch storage that HF code may later edit in place.
    tensors = {normalize_hf_key(k): v.detach().float().numpy().copy() for k, v in hf.state_dict().items()}
    graph, state = nnx.split(model)
    flat = dict(nnx.to_flat_state(state))
    for path, var in flat.items():
        key = hf_key(path)
        var.set_value(np.asarray(from_hf(path, tensors[key]), dtype=var.get_value().dtype))
    return nnx.merge(graph, nnx.from_flat_state(flat))


def hf_inputs(input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None) -> dict:
    ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
    kw = {"input_ids": ids}
    kw["attention_mask"] = torch.as_tensor(np.asarray(attention_mask)) if attention_mask is not None \
        else torch.ones_like(ids)
    if pixel_values is not None:
        kw["pixel_values"] = torch.as_tensor(np.asarray(pixel_values))
        kw["image_grid_thw"] = torch.as_tensor(np.asarray(image_grid_thw), dtype=torch.long)
        kw["mm_token_type_ids"] = (ids == IMAGE).int()
    return kw


def image_prompt(rng, grids, text_lens, vocab=151000, merge=2):
    """Token ids: text, then for each grid <vstart> <image_pad>*n <vend> text ..."""
    ids = list(rng.integers(0, min(vocab, 151000), text_lens[0]))
    for grid, n_after in zip(grids, text_lens[1:]):
        t, h, w = grid
        ids += [VSTART] + [IMAGE] * (t * h * w // merge**2) + [VEND]
        ids += list(rng.integers(0, min(vocab, 151000), n_after))
    return np.array(ids, dtype=np.int64)


def random_pixels(rng, grids, patch_dim=1536):
    n = sum(t * h * w for t, h, w in grids)
    return rng.uniform(-1, 1, (n, patch_dim)).astype(np.float32)
