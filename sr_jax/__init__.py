"""sr_jax: SpatialReward (Qwen3-VL reward model for image editing) in JAX/Flax NNX."""

__version__ = "0.1.0"
