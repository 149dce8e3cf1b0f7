"""Test environment and the fixtures many test folders share: a tiny JAX model, a tiny random HF
checkpoint (torch model, directory with tokenizer, and our model from the same weights) and the
offline tokenizer. Each is built once per session.

The session fixtures are read-only: a test that needs to change one takes a copy
(`make_tiny_model()`, `copy.deepcopy(tiny_hf_model)`, `shutil.copytree(tiny_hf_dir, ...)`).
Teardown checks they are unchanged, so a test that edits one in place fails the session.

Heavy imports (jax, torch, transformers) stay inside the fixtures: a run of pure-Python tests
does not load them."""

import hashlib
import os
import tempfile
from pathlib import Path

import pytest

# Multi-device tests need 8 fake CPU devices; the flag must be set before JAX starts.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# libtpu takes /tmp/libtpu_lockfile to keep a second process off the TPU chips. The tests only
# compile for a described topology (no chips), and two pytest-xdist workers load libtpu at once.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Many tests compile the same programs (one model config, several runs): a persistent
# compilation cache turns the repeats into cache hits.
# JAX writes cache entries in place, so parallel workers (pytest-xdist) each keep their own: one
# worker could otherwise read another's half-written entry.
_CACHE = os.environ.get("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "sr_jax_test_jax_cache"))
_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
os.environ["JAX_COMPILATION_CACHE_DIR"] = f"{_CACHE}_{_WORKER}" if _WORKER else _CACHE
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")

TINY_HF_SEED = 5


def _digest(arrays) -> str:
    """One hash over numpy arrays' bytes, whatever their dtype."""
    import numpy as np

    h = hashlib.sha1()
    for a in arrays:
        h.update(np.ascontiguousarray(a).reshape(-1).view(np.uint8))
    return h.hexdigest()


def _dir_digest(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _model_digest(model) -> str:
    import numpy as np
    from flax import nnx

    return _digest(np.ascontiguousarray(np.asarray(v.get_value())) for _, v in sorted(
        nnx.to_flat_state(nnx.state(model)), key=lambda kv: str(kv[0])))


def _torch_digest(model) -> str:
    import torch

    return _digest(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
                   for _, t in sorted(model.state_dict().items()))


# ---------------------------------------------------------------- the offline tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    """The offline Qwen tokenizer (`load_tokenizer(None)`), read-only."""
    from sr_jax.data.tokenizer import load_tokenizer

    return load_tokenizer(None)


# ---------------------------------------------------------------- a tiny JAX model (small vocabulary)


@pytest.fixture(scope="session")
def tiny_model():
    """`init_model(tiny.tiny_config(), seed=0)`, read-only (see `make_tiny_model` for a copy to change)."""
    from sr_jax.models.qwen3_vl import init_model
    from tiny import tiny_config

    model = init_model(tiny_config(), seed=0)
    before = _model_digest(model)
    yield model
    assert _model_digest(model) == before, "a test changed the shared tiny_model; use make_tiny_model()"


@pytest.fixture
def make_tiny_model(tiny_model):
    """Returns a function giving an independent copy of `tiny_model` (new modules, new arrays:
    train steps donate their input buffers, so sharing arrays with the original is not enough)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    def make():
        graphdef, state = nnx.split(tiny_model)
        return nnx.merge(graphdef, jax.tree.map(jnp.copy, state))

    return make


# ---------------------------------------------------------------- a tiny random HF checkpoint


@pytest.fixture(scope="session")
def tiny_hf_model():
    """`random_hf_model(tiny_hf_config(), seed=TINY_HF_SEED)`: the transformers oracle, read-only."""
    from hf_oracle import random_hf_model, tiny_hf_config

    model = random_hf_model(tiny_hf_config(), seed=TINY_HF_SEED)
    before = _torch_digest(model)
    yield model
    assert _torch_digest(model) == before, "a test changed the shared tiny_hf_model; deepcopy it first"


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory, tiny_hf_model, tokenizer):
    """`tiny_hf_model` saved as an HF checkpoint directory with the offline tokenizer's files
    (what `Scorer.from_pretrained`, `sr-jax convert hf-to-jax` and `sr-jax serve` read), read-only."""
    directory = tmp_path_factory.mktemp("tiny_hf") / "ckpt"
    tiny_hf_model.save_pretrained(directory)
    tokenizer.save_tokenizer_dir(directory)
    before = _dir_digest(directory)
    yield directory
    assert _dir_digest(directory) == before, "a test wrote into the shared tiny_hf_dir; copy it first"


@pytest.fixture(scope="session")
def tiny_pair(tiny_hf_model):
    """(tiny_hf_model, our float32 model with the same weights), both read-only."""
    from hf_oracle import our_model_from_hf

    ours = our_model_from_hf(tiny_hf_model)
    before = _model_digest(ours)
    yield tiny_hf_model, ours
    assert _model_digest(ours) == before, "a test changed the shared JAX model of tiny_pair"
