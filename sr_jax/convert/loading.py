"""`load_model`: one entry point for Hugging Face checkpoints and our converted directories."""

from __future__ import annotations

from pathlib import Path

from sr_jax.convert.hf_import import CheckpointError


def load_model(path: str | Path, dtype: str = "float32", *, device=None):
    """Qwen3VLForConditionalGeneration with weights from `path`.

    `path` is either a directory written by `sr-jax convert hf-to-jax` / `save_model` (it holds
    `sr_jax_model.json`) or a Hugging Face checkpoint directory (config.json + safetensors or
    pytorch_model*.bin, single or sharded). `dtype` is both the parameter and the compute dtype.
    Parameters are placed on `device` (a jax.Device; default: JAX's first device), one tensor at a time.
    """
    import jax

    from sr_jax.convert import orbax_io

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

    from sr_jax.convert.hf_import import import_params

    device = device or jax.devices()[0]
    _, graph, params = import_params(path, dtype, lambda _, array: jax.device_put(array, device))
    return nnx.merge(graph, params)


def load_checkpoint_model(path: str | Path, *, merge_lora: bool = False):
    """(model, directory holding tokenizer/processor files) for export.

    `path` is a converted sr_jax directory or a HF directory; training checkpoints are
    resolved by `sr_jax.train.checkpoint.model_from_checkpoint` when that module knows `path`.
    """
    path = Path(path)
    try:
        from sr_jax.train.checkpoint import is_train_checkpoint, model_from_checkpoint
    except ImportError:
        is_train_checkpoint = None
    if is_train_checkpoint is not None and is_train_checkpoint(path):
        return model_from_checkpoint(path, merge_lora=merge_lora)
    model = load_model(path)
    if merge_lora:
        raise CheckpointError(f"{path}: --merge-lora needs a training checkpoint with LoRA adapters; this "
                              "directory holds plain weights")
    return model, path
