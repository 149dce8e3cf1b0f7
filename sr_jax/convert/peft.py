"""PEFT interop: a LoRA adapter directory (`adapter_config.json` + `adapter_model.safetensors`)
into our `LoRA` modules and back, with module names mapped through the model family's HF name map."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from sr_jax.convert.hf_import import SafetensorsFile
from sr_jax.lora import add_lora, linear_layers, lora_layers
from sr_jax.models import family_of

PEFT_PREFIX = "base_model.model."


def _our_path(hf_module: str, names) -> tuple:
    key = names.normalize_hf_key(hf_module + ".weight")[: -len(".weight")]
    return tuple(int(p) if p.isdigit() else p for p in key.split("."))


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank/alpha_pattern lookup: a key matches when it ends the module name at a dot."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?(?:{pattern})$", module):
            return value
    return default


def _read_adapter_tensors(path: Path) -> dict[str, np.ndarray]:
    f = SafetensorsFile(path)  # validates the file; bfloat16-aware
    return {key: f.read(key) for key in f.header}


def import_peft_adapter(model, directory: str | Path, *, dropout: float | None = None) -> list[tuple]:
    """Loads a PEFT LoRA adapter (`adapter_config.json` + `adapter_model.safetensors`) into `model`
    as LoRA modules (call `merge_lora` to fold them in). Returns the adapted layer paths."""
    directory = Path(directory)
    cfg_path, weights = directory / "adapter_config.json", directory / "adapter_model.safetensors"
    for p in (cfg_path, weights):
        if not p.is_file():
            raise FileNotFoundError(f"{directory}: missing {p.name} (not a PEFT LoRA adapter directory)")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r} is not LORA")
    unsupported = {"use_dora": cfg.get("use_dora"), "fan_in_fan_out": cfg.get("fan_in_fan_out"),
                   "lora_bias": cfg.get("lora_bias"), "modules_to_save": cfg.get("modules_to_save"),
                   "bias": cfg.get("bias", "none") != "none"}
    bad = {k: v for k, v in unsupported.items() if v}
    if bad:
        raise ValueError(f"{cfg_path}: unsupported adapter options {bad}")
    tensors = _read_adapter_tensors(weights)
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.\w+)?\.weight", key)
        if m is None:
            raise ValueError(f"{weights}: unexpected tensor {key!r} (only lora_A / lora_B weights are supported)")
        pairs.setdefault(m.group(1), {})[m.group(2)] = value
    linears = linear_layers(model)
    use_rslora = bool(cfg.get("use_rslora", False))
    rate = float(cfg.get("lora_dropout", 0.0)) if dropout is None else dropout
    stream = nnx.Rngs(dropout=0).dropout if rate > 0 else None
    loaded = []
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{weights}: {module} has lora_{''.join(ab)} without its pair")
        path = _our_path(module, family_of(model).names)
        if path not in linears:
            raise ValueError(f"{weights}: adapter for {module!r} has no matching linear layer in the model")
        linear = linears[path]
        a, b = np.asarray(ab["A"], np.float32).T, np.asarray(ab["B"], np.float32).T
        kin, kout = linear.kernel.get_value().shape
        rank = a.shape[1]
        if a.shape != (kin, rank) or b.shape != (rank, kout):
            raise ValueError(f"{weights}: {module} lora_A {ab['A'].shape} / lora_B {ab['B'].shape} do not fit "
                             f"a ({kout}, {kin}) layer")
        alpha = float(_pattern_value(cfg.get("alpha_pattern") or {}, module, cfg["lora_alpha"]))
        scale = alpha / (rank**0.5 if use_rslora else rank)
        add_lora(linear, rank=rank, scale=scale, dropout=rate, key=jax.random.key(0), dropout_stream=stream, a=a, b=b)
        loaded.append(path)
    if not loaded:
        raise ValueError(f"{weights}: no LoRA tensors found")
    return loaded


def export_peft_adapter(model, directory: str | Path) -> Path:
    """Writes the model's adapters in PEFT's format (loadable by `PeftModel.from_pretrained`)."""
    hf_key = family_of(model).names.hf_key
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA adapters to export")
    ranks = {m.lora.lora_a.get_value().shape[1] for m in layers.values()}
    scales = {m.lora.scale for m in layers.values()}
    if len(ranks) != 1 or len(scales) != 1:
        raise ValueError(f"PEFT export needs one rank and scale for all adapters, got ranks {ranks}, scales {scales}")
    rank, scale = ranks.pop(), scales.pop()
    tensors = {}
    for path, linear in layers.items():
        module = hf_key(path + ("kernel",))[: -len(".weight")]
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = np.asarray(linear.lora.lora_a.get_value(), np.float32).T.copy()
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = np.asarray(linear.lora.lora_b.get_value(), np.float32).T.copy()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    dropout = next(iter(layers.values())).lora.dropout
    modules = sorted(hf_key(path + ("kernel",))[: -len(".weight")] for path in layers)
    config = {
        "peft_type": "LORA", "r": rank, "lora_alpha": scale * rank, "lora_dropout": dropout,
        # A string is a full-match regex for PEFT: exactly the adapted modules, nothing more.
        "target_modules": "|".join(re.escape(m) for m in modules), "bias": "none", "use_rslora": False,
        "use_dora": False, "fan_in_fan_out": False, "task_type": None, "inference_mode": True,
    }
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return directory
