"""Model families, one folder each (`qwen3_vl/`), the building blocks they share (`layers.py`,
`attention.py`) and the registry that the rest of sr_jax asks for a family.

A family is found by the Hugging Face `model_type` of its config.json. Everything outside a
family's folder (loading, conversion, training, LoRA, planning, the processor) reaches the model
only through its `ModelFamily`, so a new family is a new folder plus one line in `_BUILTIN`.
This module imports neither JAX nor the family's modules: data workers look up image constants
without paying for the model.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

# Modules that call `register_family` when imported; the first one is the default family
# (for configs that carry no `model_type`).
_BUILTIN = ("sr_jax.models.qwen3_vl.family",)
_FAMILIES: dict[str, "ModelFamily"] = {}


@dataclasses.dataclass(frozen=True)
class ImageConstants:
    """How a family cuts images into patches (the processor and the planner size batches by these)."""

    patch_size: int
    temporal_patch_size: int
    merge_size: int
    in_channels: int = 3

    @property
    def factor(self) -> int:
        """Image sides are multiples of this (one merged visual token per factor x factor pixels)."""
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        """Width of one flattened patch row of `pixel_values`."""
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    @property
    def merge_unit(self) -> int:
        """Patches per merged visual token."""
        return self.merge_size ** 2


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """What the generic code needs to know about one architecture.

    `package` holds `config.py` (the config class), `model.py` (the model class, `init_model`,
    `abstract_model`, `resolve_dtype`), `names.py` (the HF name map), `rope_index.py` and
    `vision.py` (host-side inputs); they are imported on first use.
    """

    model_type: str
    package: str
    config_class_name: str
    model_class_name: str
    image: ImageConstants
    lora_targets: tuple[str, ...]   # the linears LoRA target "all" adapts in the decoder
    decoder_scope: str              # path component of the language model's parameters
    vision_scope: str               # path component of the vision tower's parameters
    freeze_vision: str              # regex over dotted parameter paths: the whole vision tower
    set_remat: Callable[[Any, str], None]  # (model, policy): the remat policy of every layer stack
    # (model, text, vision): the longest packed text segment and image (positions, patches) a
    # full pass will see, or None; the portable attention kernels then skip the blocks no segment
    # reaches (sr_jax.train.step.attention_spans)
    set_attention_spans: Callable[[Any, int | None, int | None], None] = lambda model, text, vision: None

    def module(self, name: str):
        return importlib.import_module(f"{self.package}.{name}")

    @property
    def config_class(self):
        return getattr(self.module("config"), self.config_class_name)

    @property
    def model_class(self):
        return getattr(self.module("model"), self.model_class_name)

    @property
    def names(self):
        """The HF <-> ours name map: `hf_key`, `normalize_hf_key`, `from_hf`, `to_hf`, `hf_shape_of`."""
        return self.module("names")

    def abstract_model(self, cfg):
        return self.module("model").abstract_model(cfg)

    def resolve_dtype(self, name):
        return self.module("model").resolve_dtype(name)


def register_family(family: ModelFamily) -> ModelFamily:
    if _FAMILIES.get(family.model_type, family) is not family:
        raise ValueError(f"model family {family.model_type!r} is already registered")
    _FAMILIES[family.model_type] = family
    return family


def _load_builtins() -> None:
    for module in _BUILTIN:
        importlib.import_module(module)


def families() -> dict[str, ModelFamily]:
    _load_builtins()
    return dict(_FAMILIES)


def get_family(model_type: str | None = None) -> ModelFamily:
    """The family registered under `model_type` (HF config.json's); None: the default family."""
    _load_builtins()
    if model_type is None:
        model_type = importlib.import_module(_BUILTIN[0]).FAMILY.model_type
    try:
        return _FAMILIES[model_type]
    except KeyError:
        raise ValueError(f"unknown model_type {model_type!r}; sr_jax knows {sorted(_FAMILIES)}") from None


def family_of(cfg_or_model) -> ModelFamily:
    """The family of a model config (its class's `model_type`) or of a model (its `config`)."""
    cfg = getattr(cfg_or_model, "config", cfg_or_model)
    return get_family(getattr(cfg, "model_type", None))
