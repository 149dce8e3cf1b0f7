"""`load_model`: one entry point for Hugging Face checkpoints and our converted directories."""

from __future__ import annotations

from pathlib import Path

from sr_jax.convert import orbax_io
from sr_jax.convert.hf_import import CheckpointError, import_params
from sr_jax.data.vocab import attach


def load_model(path: str | Path, dtype: str = "float32", *, device=None):
    """Qwen3VLForConditionalGeneration with weights from `path`.

    `path` is either a directory written by `sr-jax convert hf-to-jax` / `save_model` (it holds
    `sr_jax_model.json`) or a Hugging Face checkpoint directory (config.json + safetensors or
    pytorch_model*.bin, single or sharded). `dtype` is both the parameter and the compute dtype.
    A directory with a vocab_map.json holds a reduced-vocabulary model: the map comes attached
    (`model.vocab_map`), and `generate` takes and returns full-vocabulary ids with it.
    Parameters are placed on `device` (a jax.Device; default: JAX's first device), one tensor at a time.
    """
    import jax

    path = Path(path)
    if orbax_io.is_model_dir(path):
        sharding = None if device is None else jax.sharding.SingleDeviceSharding(device)
        return orbax_io.read_model_dir(path, dtype, sharding)
    if (path / "config.json").is_file():
        return load_hf_model(path, dtype, device=device)
    raise CheckpointError(f"{path}: neither a converted sr_jax model ({orbax_io.MARKER}) nor a Hugging Face "
                          "checkpoint (config.json)")


def load_hf_model(path: str | Path, dtype: str = "float32", *, device=None):
    import jax
    from flax import nnx

    device = device or jax.devices()[0]
    _, graph, params = import_params(path, dtype, lambda _, array: jax.device_put(array, device))
    return attach(nnx.merge(graph, params), orbax_io.read_vocab_map(path))
