"""sr_jax: SpatialReward (Qwen3-VL reward model for image editing) in JAX/Flax NNX.

Imports: modules import what they need at the top, and the load-time import graph has no cycles.
An import inside a function keeps a dependency out of its module's load: an optional or heavy
third-party package (torch, transformers, peft, tensorflow_datasets, grain, orbax, pyarrow,
matplotlib, ...), JAX/Flax in modules that data workers or the converter load without JAX, or an
sr_jax module that would bring those in; any other reason is a comment on the import itself.
`tests/test_imports.py` checks both rules.
"""

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
