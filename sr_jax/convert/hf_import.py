"""Reading Hugging Face Qwen3-VL checkpoints tensor by tensor into our parameter layout.

A checkpoint directory holds `config.json` and weights in one of four layouts: `model.safetensors`,
sharded `*.safetensors` (+ `model.safetensors.index.json`), `pytorch_model.bin`, or sharded
`pytorch_model-*.bin` (+ `pytorch_model.bin.index.json`). Every problem is found from the file
headers alone (missing / unexpected / mis-shaped keys, unreadable files) before any tensor data is
read, so a bad checkpoint fails fast and with the full list. Tensors are then read one at a time
and converted (layout + dtype) on their own, so memory holds the target parameters plus one tensor.

Every parameter must be stored as a float tensor (an int or bool tensor in its place is refused from
the header, by name), and every converted value must be finite: NaN/Inf weights are listed by
tensor with their count and refused unless `allow_nonfinite` (`--allow-nonfinite`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import struct
from pathlib import Path
from typing import Callable, Iterator

import ml_dtypes
import numpy as np
from safetensors import safe_open

from sr_jax.config import ConfigError, read_hf_config
from sr_jax.convert.orbax_io import check_output_dir, read_vocab_map, write_model_dir
from sr_jax.models import ModelFamily, family_of, get_family

SAFE_SINGLE, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN_SINGLE, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
LM_HEAD, EMBED = "lm_head.weight", "model.language_model.embed_tokens.weight"
MAX_LISTED = 20
FLOAT_DTYPES = ("float64", "float32", "float16", "bfloat16")

log = logging.getLogger(__name__)

# Dtype names in safetensors headers.
_SAFE_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
                "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
                "BOOL": np.bool_}


class CheckpointError(ValueError):
    """A checkpoint that cannot be imported; the message names the file or keys at fault."""


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    key: str          # the name as stored in the file
    file: Path
    shape: tuple
    dtype: str = "float32"  # numpy-style name: float32, bfloat16, int32, bool, ...


def _listing(kind: str, items: list[str]) -> str:
    shown = items[:MAX_LISTED]
    more = f"\n    ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
    return f"  {len(items)} {kind}:\n" + "\n".join(f"    {s}" for s in shown) + more


def weight_files(directory: Path) -> tuple[str, list[Path]]:
    """('safetensors' | 'bin', files) for a HF checkpoint directory."""
    for index_name, kind in ((SAFE_INDEX, "safetensors"), (BIN_INDEX, "bin")):
        index = directory / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid weight index ({e})") from None
            files = [directory / name for name in sorted(set(weight_map.values()))]
            absent = [f.name for f in files if not f.is_file()]
            if absent:
                raise CheckpointError(f"{index} lists shard files that do not exist: {absent}")
            return kind, files
    if (directory / SAFE_SINGLE).is_file():
        return "safetensors", [directory / SAFE_SINGLE]
    shards = sorted(directory.glob("*.safetensors"))
    if shards:
        return "safetensors", shards
    if (directory / BIN_SINGLE).is_file():
        return "bin", [directory / BIN_SINGLE]
    raise CheckpointError(f"{directory}: no weights found (looked for {SAFE_SINGLE}, {SAFE_INDEX}, "
                          f"*.safetensors, {BIN_SINGLE}, {BIN_INDEX})")


class SafetensorsFile:
    """One .safetensors file. `safe_open` validates it (a truncated or corrupt file fails here, naming
    it); tensor data is then read with plain file reads into a fresh array. Reading through the
    library's memory map would leave every touched page of the file in our resident set until the
    file is closed, doubling peak memory on a full-checkpoint import."""

    def __init__(self, path: Path):
        self.path = path
        try:
            with safe_open(str(path), framework="numpy") as handle:
                self.shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
            with open(path, "rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(header_len))
        except Exception as e:  # the Rust reader raises its own error types for bad headers/lengths
            raise CheckpointError(f"{path}: cannot read safetensors file, it is truncated or corrupt ({e})") from None
        self.data_start = 8 + header_len
        self.header = {k: v for k, v in header.items() if k != "__metadata__"}
        unknown = sorted({v["dtype"] for v in self.header.values()} - set(_SAFE_DTYPES))
        if unknown:
            raise CheckpointError(f"{path}: unsupported tensor dtypes {unknown}")
        self.dtypes = {k: np.dtype(_SAFE_DTYPES[v["dtype"]]).name for k, v in self.header.items()}

    def read(self, key: str) -> np.ndarray:
        entry = self.header[key]
        start, end = entry["data_offsets"]
        array = np.empty(entry["shape"], dtype=_SAFE_DTYPES[entry["dtype"]])
        if array.nbytes != end - start:
            raise CheckpointError(f"{self.path}: tensor {key!r} has {end - start} bytes, its shape and dtype "
                                  f"need {array.nbytes}")
        with open(self.path, "rb") as f:
            f.seek(self.data_start + start)
            got = f.readinto(array.reshape(-1).view(np.uint8))
        if got != array.nbytes:
            raise CheckpointError(f"{self.path}: truncated inside tensor {key!r}")
        return array


class _TorchBinFile:
    def __init__(self, path: Path):
        import torch

        self.path = path
        try:
            try:  # zip-format files are memory-mapped: nothing is read until a tensor is used
                self.tensors = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                self.tensors = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read PyTorch weights file, it is truncated or corrupt ({e})") from None
        if not isinstance(self.tensors, dict):
            raise CheckpointError(f"{path}: expected a state dict, found {type(self.tensors).__name__}")
        self.shapes = {k: tuple(v.shape) for k, v in self.tensors.items()}
        self.dtypes = {k: str(v.dtype).removeprefix("torch.") for k, v in self.tensors.items()}

    def read(self, key: str) -> np.ndarray:
        import torch

        t = self.tensors[key].detach()
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the same 16-bit words
            return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()


def hf_family(directory: Path) -> ModelFamily:
    """The registered family of a HF checkpoint, by its config.json's `model_type` (none: the default
    family; an unreadable config.json is reported by the family's config reader)."""
    try:
        model_type = read_hf_config(directory).get("model_type")
    except (OSError, ValueError):
        model_type = None
    try:
        return get_family(model_type)
    except ValueError as e:
        raise CheckpointError(f"{directory / 'config.json'}: {e}") from None


class HFCheckpoint:
    """The tensors of a HF checkpoint directory, indexed by normalized HF name."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise CheckpointError(f"{self.directory}: not a directory")
        try:
            self.family = hf_family(self.directory)
            self.config = self.family.config_class.from_hf_dir(self.directory)
        except ValueError as e:  # from_hf_dir names config.json in its message
            raise CheckpointError(str(e)) from None
        self.kind, files = weight_files(self.directory)
        opener = SafetensorsFile if self.kind == "safetensors" else _TorchBinFile
        self.files = {f: opener(f) for f in files}
        self.entries: dict[str, TensorEntry] = {}
        duplicates = []
        for path, handle in self.files.items():
            for key, shape in handle.shapes.items():
                name = self.family.names.normalize_hf_key(key)
                if name in self.entries:
                    duplicates.append(f"{name} ({self.entries[name].file.name} and {path.name})")
                self.entries[name] = TensorEntry(key, path, shape, handle.dtypes[key])
        if duplicates:
            raise CheckpointError(f"{self.directory}: tensors stored more than once\n"
                                  + _listing("duplicated keys", duplicates))

    def read(self, name: str) -> np.ndarray:
        entry = self.entries[name]
        return self.files[entry.file].read(entry.key)


def param_specs(abstract_flat, names) -> dict[str, tuple[tuple, tuple]]:
    """HF name -> (our parameter path, our shape) for every parameter of the abstract model
    (`names`: the family's name map)."""
    return {names.hf_key(path): (path, tuple(var.get_value().shape)) for path, var in abstract_flat}


def check_keys(ckpt: HFCheckpoint, cfg, abstract_flat) -> None:
    """Raises one CheckpointError listing every missing, unexpected and mis-shaped tensor."""
    names = family_of(cfg).names
    expected = param_specs(abstract_flat, names)
    available = dict(ckpt.entries)
    if cfg.tie_word_embeddings and LM_HEAD in available:
        tied_head = available.pop(LM_HEAD)  # allowed when equal to the embedding (checked on read)
        if EMBED in available and tied_head.shape != available[EMBED].shape:
            raise CheckpointError(f"{tied_head.file}: tied checkpoint has {LM_HEAD} of shape {tied_head.shape}, "
                                  f"embedding is {available[EMBED].shape}")
    missing = sorted(set(expected) - set(available))
    unexpected = sorted(set(available) - set(expected))
    not_float = [f"{name}: {available[name].dtype} ({available[name].file.name})"
                 for name in sorted(set(expected) & set(available)) if available[name].dtype not in FLOAT_DTYPES]
    mismatched = []
    for name in sorted(set(expected) & set(available)):
        path, shape = expected[name]
        want = names.hf_shape_of(path, shape, cfg)
        got = available[name].shape
        if tuple(got) != tuple(want):
            mismatched.append(f"{name}: checkpoint {list(got)}, model expects {list(want)} "
                              f"({available[name].file.name})")
    if not (missing or unexpected or mismatched or not_float):
        return
    parts = [f"{ckpt.directory}: checkpoint does not match the model in config.json"]
    if missing:
        parts.append(_listing("missing keys", missing))
        if LM_HEAD in missing:
            parts.append(f"  ({LM_HEAD} is required: config.json has tie_word_embeddings=false)")
    if unexpected:
        parts.append(_listing("unexpected keys", unexpected))
    if mismatched:
        parts.append(_listing("shape mismatches", mismatched))
    if not_float:
        parts.append(_listing("weights stored as non-float tensors (the model's parameters are floats)", not_float))
    raise CheckpointError("\n".join(parts))


def check_tied_head(ckpt: HFCheckpoint, cfg) -> None:
    if not (cfg.tie_word_embeddings and LM_HEAD in ckpt.entries):
        return
    if not np.array_equal(ckpt.read(LM_HEAD), ckpt.read(EMBED)):
        raise CheckpointError(f"{ckpt.entries[LM_HEAD].file}: config.json ties the embeddings but {LM_HEAD} "
                              f"differs from {EMBED}")


def contiguous(array: np.ndarray, dtype, block: int = 256) -> np.ndarray:
    """C-contiguous copy of `array` in `dtype`. A transposed (Fortran-ordered) matrix is copied in
    square tiles: numpy's element-wise strided copy of a large transpose is ~3x slower."""
    dtype = np.dtype(dtype)
    if array.ndim != 2 or array.flags.c_contiguous or min(array.shape) <= block:
        return np.ascontiguousarray(array, dtype=dtype)
    source = array
    out = np.empty(array.shape, dtype)
    target = out
    if array.dtype == dtype and dtype.itemsize in (2, 4):  # plain bits: skip the custom-dtype copy loop
        bits = np.dtype(f"u{dtype.itemsize}")
        source, target = array.view(bits), out.view(bits)
    rows, cols = array.shape
    for i in range(0, rows, block):
        for j in range(0, cols, block):
            target[i:i + block, j:j + block] = source[i:i + block, j:j + block]
    return out


_EXPONENT_MASKS = {"float16": 0x7C00, "bfloat16": 0x7F80}


def nonfinite_count(array: np.ndarray) -> int:
    """How many NaN/Inf values `array` holds. 16-bit floats are tested on their exponent bits (all
    ones), which is several times faster than `isfinite` on ml_dtypes' bfloat16."""
    mask = _EXPONENT_MASKS.get(array.dtype.name)
    if mask is not None:
        bits = np.ascontiguousarray(array).reshape(-1).view(np.uint16)
        return int(np.count_nonzero((bits & mask) == mask))
    return int(array.size - np.count_nonzero(np.isfinite(array)))


def converted_tensors(ckpt: HFCheckpoint, cfg, abstract_flat, dtype,
                      nonfinite: dict | None = None) -> Iterator[tuple[tuple, np.ndarray]]:
    """(our path, contiguous array in our layout and `dtype`) for every parameter, one at a time.
    With `nonfinite` (a dict), each tensor holding NaN/Inf after conversion is recorded in it as
    name -> (count, whether the checkpoint itself had them or the conversion to `dtype` overflowed)."""
    names = family_of(cfg).names
    for name, (path, shape) in param_specs(abstract_flat, names).items():
        raw = ckpt.read(name)
        tensor = names.from_hf(path, raw)
        array = contiguous(tensor, dtype)  # one copy: layout and dtype together
        del tensor
        if array.shape != shape:  # names.from_hf and the header check disagree: a bug, not bad input
            raise AssertionError(f"{name}: converted to {array.shape}, parameter is {shape}")
        if nonfinite is not None:
            bad = nonfinite_count(array)
            if bad:
                nonfinite[name] = (bad, "in the checkpoint" if nonfinite_count(raw) else
                                   f"overflow converting {raw.dtype.name} to {array.dtype.name}")
        del raw
        yield path, array


def _nonfinite_report(directory, found: dict, allowed: bool) -> str:
    rows = [f"{name}: {count} non-finite values ({where})" for name, (count, where) in sorted(found.items())]
    verdict = "kept because non-finite values are allowed" if allowed else \
        "refused (pass --allow-nonfinite / allow_nonfinite=True to convert anyway)"
    return f"{directory}: NaN/Inf weights, {verdict}\n" + _listing("tensors with NaN/Inf", rows)


def import_params(directory: str | Path, dtype: str | None, place: Callable[[tuple, np.ndarray], object],
                  allow_nonfinite: bool = False):
    """Reads a HF checkpoint into the abstract model's parameters.

    Returns (ModelConfig with dtype applied, graphdef, filled nnx.State). `place(path, array)`
    turns each converted numpy array into the stored leaf (a device array, or the array itself).
    NaN/Inf weights raise CheckpointError listing every such tensor (after all are read, so the
    list is complete) unless `allow_nonfinite`, which logs the same list as a warning.
    """
    from flax import nnx

    ckpt = HFCheckpoint(directory)
    cfg, family = ckpt.config, ckpt.family
    if dtype is not None:
        cfg.dtype = cfg.param_dtype = dtype
    graph, params = nnx.split(family.abstract_model(cfg), nnx.Param)
    flat = list(nnx.to_flat_state(params))
    check_keys(ckpt, cfg, flat)
    check_tied_head(ckpt, cfg)
    variables = dict(flat)
    target = family.resolve_dtype(cfg.param_dtype)
    nonfinite: dict = {}
    for path, array in converted_tensors(ckpt, cfg, flat, target, nonfinite):
        variables[path].set_value(place(path, array))
    if nonfinite:
        report = _nonfinite_report(ckpt.directory, nonfinite, allow_nonfinite)
        if not allow_nonfinite:
            raise CheckpointError(report)
        log.warning("%s", report)
    return cfg, graph, nnx.from_flat_state(variables)


def source_dtype(directory: str | Path) -> str:
    """The dtype config.json declares (`dtype`, or `torch_dtype` before transformers 5), else float32."""
    try:
        cfg = read_hf_config(directory)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    declared = cfg.get("dtype") or cfg.get("torch_dtype") or text.get("dtype") or text.get("torch_dtype")
    return declared if declared in ("float32", "bfloat16", "float16") else "float32"


def convert_hf_to_jax(hf_dir: str | Path, out: str | Path, dtype: str | None = None, overwrite: bool = False,
                      allow_nonfinite: bool = False) -> Path:
    """HF checkpoint directory -> our converted directory (see `sr_jax.convert.orbax_io`)."""
    from flax import nnx

    check_output_dir(out, overwrite)  # before reading gigabytes, not after
    dtype = dtype or source_dtype(hf_dir)
    cfg, _, params = import_params(hf_dir, dtype, lambda _, array: array,  # host numpy: no device copy
                                   allow_nonfinite=allow_nonfinite)
    return write_model_dir(out, cfg, nnx.to_pure_dict(params), hf_dir=hf_dir, overwrite=overwrite,
                           source=str(Path(hf_dir).absolute()), vocab_map=read_vocab_map(hf_dir))
