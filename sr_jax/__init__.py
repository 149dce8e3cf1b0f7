"""sr_jax: SpatialReward (Qwen3-VL reward model for image editing) in JAX/Flax NNX."""

__version__ = "0.1.0"


def __getattr__(name):
    # `load_model` pulls in JAX and Flax; import it on first use so `import sr_jax` stays light.
    if name == "load_model":
        from sr_jax.loading import load_model

        return load_model
    raise AttributeError(f"module 'sr_jax' has no attribute {name!r}")
