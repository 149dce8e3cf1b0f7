"""sr_jax: SpatialReward (Qwen3-VL reward model for image editing) in JAX/Flax NNX."""

__version__ = "0.1.0"


def __getattr__(name):
    # `load_model` and `generate` pull in JAX and Flax; import them on first use so `import sr_jax` stays light.
    if name == "load_model":
        from sr_jax.convert.loading import load_model

        return load_model
    if name == "generate":
        from sr_jax.generation import generate

        return generate
    raise AttributeError(f"module 'sr_jax' has no attribute {name!r}")
