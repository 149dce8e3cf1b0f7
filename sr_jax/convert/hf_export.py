"""Export to a Hugging Face checkpoint directory that `transformers` loads with `from_pretrained`.

Writes config.json, generation_config.json, size-capped `model-0000i-of-0000n.safetensors`
shards with `model.safetensors.index.json` (a single `model.safetensors` when one shard
suffices), plus tokenizer/processor files when a source directory has them. A model that still
has LoRA adapters gets its base weights there and the adapters as a PEFT adapter
(`adapter_model.safetensors` + `adapter_config.json`) beside them. The safetensors
files are written by hand, one tensor at a time (header first, from the known shapes), so
host memory stays at one tensor whatever the model size; bfloat16 goes out as BF16 bytes.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np

from sr_jax.models import family_of
from sr_jax.convert.orbax_io import GENERATION_CONFIG, atomic_directory, generation_config, sidecar_files  # noqa: F401
from sr_jax.data.vocab import VOCAB_MAP_FILE, vocab_map_of

_ST_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64", "int64": "I64",
              "int32": "I32"}


def _plan(model, dtype):
    """[(hf_key, our_path, variable, hf_shape, dtype_name)] in HF key order."""
    from flax import nnx

    from sr_jax.lora import LoRAParam

    cfg = model.config
    hf_key, hf_shape_of = family_of(cfg).names.hf_key, family_of(cfg).names.hf_shape_of
    # Adapters are not base weights: they are merged first (--merge-lora) or written in PEFT's format.
    _, state, _ = nnx.split(model, nnx.All(nnx.Param, nnx.Not(LoRAParam)), ...)
    entries = []
    for path, var in nnx.to_flat_state(state):
        value = var.get_value()
        name = str(np.dtype(dtype)) if dtype is not None else str(np.dtype(value.dtype))
        if name not in _ST_DTYPES:
            raise ValueError(f"cannot export dtype {name} (parameter {hf_key(path)})")
        entries.append((hf_key(path), path, var, hf_shape_of(path, value.shape, cfg), name))
    return sorted(entries, key=lambda e: e[0])


def _nbytes(shape, name) -> int:
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(name).itemsize


def _write_safetensors(path: Path, entries, to_hf) -> None:
    header, offset = {}, 0
    for key, _, _, shape, name in entries:
        size = _nbytes(shape, name)
        header[key] = {"dtype": _ST_DTYPES[name], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep tensor data 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, our_path, var, shape, name in entries:
            import jax

            array = np.asarray(jax.device_get(var.get_value())).astype(np.dtype(name), copy=False)
            f.write(np.ascontiguousarray(to_hf(our_path, array, shape)).tobytes())


def export_hf(model, out: str | Path, *, dtype: str | None = None, max_shard_bytes: int = 5 * 2**30,
              sidecar_dir: str | Path | None = None, overwrite: bool = False) -> Path:
    """Writes `model` (an NNX Qwen3-VL) as a HF checkpoint directory at `out`, atomically."""
    import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)

    entries = _plan(model, dtype)
    shards, current, size = [], [], 0
    for e in entries:
        n = _nbytes(e[3], e[4])
        if current and size + n > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(e)
        size += n
    shards.append(current)

    cfg = model.config
    hf_config = cfg.to_hf_dict()
    hf_config["dtype"] = dtype or cfg.param_dtype
    with atomic_directory(out, overwrite) as tmp:
        if len(shards) == 1:
            _write_safetensors(tmp / "model.safetensors", shards[0], family_of(cfg).names.to_hf)
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                _write_safetensors(tmp / name, shard, family_of(cfg).names.to_hf)
                weight_map.update({e[0]: name for e in shard})
            total = sum(_nbytes(e[3], e[4]) for e in entries)
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        vmap = vocab_map_of(model)
        (tmp / "generation_config.json").write_text(json.dumps(generation_config(vmap), indent=2))
        if vmap is not None:
            vmap.save(tmp / VOCAB_MAP_FILE)
        from sr_jax.convert.peft import export_peft_adapter
        from sr_jax.lora import lora_layers

        if lora_layers(model):  # unmerged adapters travel beside the base weights, PEFT-loadable
            export_peft_adapter(model, tmp)
        if sidecar_dir is not None:
            for f in sidecar_files(Path(sidecar_dir)):
                if f.name not in ("config.json", "generation_config.json"):
                    shutil.copy2(f, tmp / f.name)
    return Path(out)
