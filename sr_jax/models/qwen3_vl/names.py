"""The name map between Hugging Face Qwen3-VL tensors and our NNX parameters.

Our module tree mirrors HF's, so a parameter path such as
('model', 'language_model', 'layers', 3, 'mlp', 'up_proj', 'kernel') corresponds to the HF key
'model.language_model.layers.3.mlp.up_proj.weight'. Only the leaf name and layout differ:
  kernel    <-> weight, transposed (torch Linear is (out, in)); the patch-embedding Conv3d
                weight (out, C, T, P, P) is flattened to (C*T*P*P, out) first
  scale     <-> weight (norms)
  embedding <-> weight (token embedding)
  bias      <-> bias
"""

from __future__ import annotations

import re

import numpy as np

_LEAF_TO_HF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


def hf_key(path: tuple) -> str:
    *parents, leaf = path
    if leaf == "pos_embed":  # a bare table on the vision model, stored as an nn.Embedding in HF
        return ".".join(map(str, path)) + ".weight"
    if leaf not in _LEAF_TO_HF:
        raise KeyError(f"no Hugging Face name for parameter {'/'.join(map(str, path))}")
    return ".".join(map(str, parents)) + "." + _LEAF_TO_HF[leaf]


def normalize_hf_key(key: str) -> str:
    """Accepts the older layouts (`visual.*`, `model.layers.*`) some Qwen-VL exports use."""
    if key.startswith("visual."):
        return "model." + key
    if key.startswith("model.") and not re.match(r"model\.(language_model|visual)\.", key):
        return "model.language_model." + key[len("model."):]
    if key.startswith("language_model."):
        return "model." + key
    return key


def from_hf(path: tuple, tensor: np.ndarray) -> np.ndarray:
    """HF tensor -> our layout for the parameter at `path`."""
    if path[-1] == "kernel":
        return tensor.reshape(tensor.shape[0], -1).T
    return tensor


def to_hf(path: tuple, array: np.ndarray, hf_shape: tuple | None = None) -> np.ndarray:
    """Our array -> HF layout; `hf_shape` restores the Conv3d shape of the patch embedding."""
    if path[-1] == "kernel":
        out = array.T
        return out.reshape(hf_shape) if hf_shape is not None else out
    return array


def hf_shape_of(path: tuple, shape: tuple, cfg) -> tuple:
    """The HF tensor shape for our parameter of `shape` (needs the config for the patch embedding)."""
    if path[-1] != "kernel":
        return tuple(shape)
    if path[-3:] == ("patch_embed", "proj", "kernel"):
        v = cfg.vision
        return (v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    return (shape[1], shape[0])
