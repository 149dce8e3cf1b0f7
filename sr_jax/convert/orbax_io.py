"""Our converted model directory: an Orbax checkpoint of the parameters plus configs and tokenizer files.

Layout of a directory written by `write_model_dir`:
    sr_jax_model.json   marker + summary {"format": "sr_jax.orbax", "version": 1, "param_dtype", "num_params", "source"}
    model_config.yaml   our ModelConfig (architecture + dtypes the params were stored in)
    config.json         the Hugging Face config (copied from the source, else generated)
    params/             Orbax StandardCheckpointer tree = nnx.to_pure_dict(parameter state)
    tokenizer.json, tokenizer_config.json, vocab.json, merges.txt, preprocessor_config.json,
    chat_template*, generation_config.json, ...   copied from the HF directory when present

The directory appears only once complete: everything is written to a hidden sibling, fsynced,
then renamed into place.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path

import numpy as np

from sr_jax.config import dump_yaml, load_config
from sr_jax.data.tokenizer import load_tokenizer
from sr_jax.data.vocab import VOCAB_MAP_FILE, VocabMap, attach, vocab_map_of
from sr_jax.models import family_of, get_family
from sr_jax.special_tokens import DEFAULT_STOP_IDS, ENDOFTEXT_ID, PAD_ID

FORMAT, FORMAT_VERSION = "sr_jax.orbax", 1
MARKER, CONFIG_YAML, HF_CONFIG, PARAMS = "sr_jax_model.json", "model_config.yaml", "config.json", "params"
SIDECAR_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                 "added_tokens.json", "preprocessor_config.json", "video_preprocessor_config.json",
                 "generation_config.json")
SIDECAR_GLOBS = ("chat_template*",)
GENERATION_CONFIG = {"bos_token_id": ENDOFTEXT_ID, "eos_token_id": list(DEFAULT_STOP_IDS), "pad_token_id": PAD_ID,
                     "do_sample": False}


def generation_config(vocab_map=None) -> dict:
    """generation_config.json; a reduced-vocabulary model's holds its compact ids (what it emits)."""
    if vocab_map is None:
        return dict(GENERATION_CONFIG)
    kept = [int(i) for i in DEFAULT_STOP_IDS if vocab_map.contains([i])[0]]
    return {**GENERATION_CONFIG, "bos_token_id": vocab_map.compact_id(ENDOFTEXT_ID),
            "eos_token_id": [vocab_map.compact_id(i) for i in kept], "pad_token_id": vocab_map.compact_id(PAD_ID)}


def is_model_dir(path: str | Path) -> bool:
    return (Path(path) / MARKER).is_file()


def sidecar_files(hf_dir: Path) -> list[Path]:
    found = [hf_dir / name for name in SIDECAR_FILES if (hf_dir / name).is_file()]
    for pattern in SIDECAR_GLOBS:
        found += sorted(p for p in hf_dir.glob(pattern) if p.is_file())
    return found


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            _fsync(Path(dirpath) / name)
        _fsync(Path(dirpath))


def check_output_dir(out: str | Path, overwrite: bool) -> None:
    out = Path(out).absolute()
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not empty (use --overwrite to replace it)")


def _process_count() -> int:
    import jax

    return jax.process_count()


def _sync(name: str) -> None:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def _shared_tag() -> str:
    """A temporary-name tag every process agrees on (process 0's)."""
    from jax.experimental import multihost_utils

    draw = np.frombuffer(uuid.uuid4().bytes[:4], np.uint32).astype(np.int64)
    return f"{int(multihost_utils.broadcast_one_to_all(draw)[0]):08x}"


def _publish(tmp: Path, out: Path, tag: str) -> None:
    """Makes the finished `tmp` the directory `out` (replacing an older one) durably."""
    _fsync_tree(tmp)
    if out.exists():
        old = out.parent / f".{out.name}.old-{tag}"
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    else:
        os.rename(tmp, out)
    _fsync(out.parent)


@contextlib.contextmanager
def atomic_directory(out: str | Path, overwrite: bool = False):
    """Yields a fresh temporary directory beside `out` that becomes `out` when the block succeeds.

    In a multi-process job every process enters (collective writers such as Orbax's write their
    shards into the same directory on a shared filesystem): process 0 creates and renames it,
    the others wait at barriers; files written only once are process 0's job inside the block."""
    out = Path(out).absolute()
    check_output_dir(out, overwrite)
    if _process_count() > 1:
        import jax

        tag = _shared_tag()
        tmp = out.parent / f".{out.name}.tmp-{tag}"
        primary = jax.process_index() == 0
        if primary:
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
        _sync(f"atomic_directory:create:{tag}")
        yield tmp
        _sync(f"atomic_directory:written:{tag}")
        if primary:
            _publish(tmp, out, tag)
        _sync(f"atomic_directory:done:{tag}")
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = out.parent / f".{out.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        yield tmp
        _publish(tmp, out, tag)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def _quiet_orbax():
    # Orbax logs every step of a save at INFO/WARNING through absl; keep the CLI output readable.
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _checkpointer():
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer()


def _save_params(directory: Path, params: dict) -> None:
    """Orbax save of a parameter tree, bounded to about one copy of the parameters in memory.

    Two orbax defaults are off: the defensive deep copy of host (numpy) arrays (the tree is ours and
    unchanged until the save returns), and zstd compression: it saved ~23% of disk on the synthetic
    bf16 weights of tools/bench_convert.py, but its encoded chunks stay buffered until the commit,
    which cost +0.8 x checkpoint bytes of peak memory there."""
    import jax
    import orbax.checkpoint as ocp

    try:
        numpy_handler = ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)
    except TypeError:  # orbax releases without the option always copy: more memory, same bytes
        numpy_handler = ocp.type_handlers.NumpyHandler()
    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, numpy_handler),
        (jax.Array, ocp.type_handlers.ArrayHandler()),
    )
    handler = ocp.PyTreeCheckpointHandler(type_handler_registry=registry, save_concurrent_gb=1,
                                          use_compression=False)
    checkpointer = ocp.Checkpointer(handler)
    try:
        checkpointer.save(directory, args=ocp.args.PyTreeSave(params))
    finally:
        checkpointer.close()


def write_model_dir(out: str | Path, cfg, params: dict, *, hf_dir: str | Path | None = None,
                    overwrite: bool = False, source: str = "", vocab_map=None) -> Path:
    """Writes `params` (nested dict of arrays, as from nnx.to_pure_dict) and configs atomically to `out`.
    `vocab_map` (a reduced vocabulary's `VocabMap`) is written as vocab_map.json."""
    import jax

    leaves = jax.tree.leaves(params)
    dtypes = sorted({str(np.dtype(leaf.dtype)) for leaf in leaves})
    summary = {"format": FORMAT, "version": FORMAT_VERSION, "model_type": cfg.model_type, "param_dtype": cfg.param_dtype, "leaf_dtypes": dtypes,
               "num_params": int(sum(int(np.prod(leaf.shape)) for leaf in leaves)), "source": source}
    with atomic_directory(out, overwrite) as tmp:
        with _quiet_orbax():
            _save_params(tmp / PARAMS, params)  # collective when several processes hold the parameters
        if jax.process_index() == 0:  # files written once (atomic_directory renames after this)
            _write_sidecars(tmp, cfg, hf_dir, summary, vocab_map)
    return Path(out)


def _write_sidecars(tmp: Path, cfg, hf_dir, summary: dict, vocab_map=None) -> None:
    dump_yaml(cfg, tmp / CONFIG_YAML)
    hf_dir = Path(hf_dir) if hf_dir is not None else None
    # A compact model's config and generation ids are its own, never the full source's.
    if hf_dir is not None and (hf_dir / HF_CONFIG).is_file() and vocab_map is None:
        shutil.copy2(hf_dir / HF_CONFIG, tmp / HF_CONFIG)
    else:
        (tmp / HF_CONFIG).write_text(json.dumps(cfg.to_hf_dict(), indent=2))
    for f in sidecar_files(hf_dir) if hf_dir is not None else []:
        if vocab_map is None or f.name != "generation_config.json":
            shutil.copy2(f, tmp / f.name)
    if vocab_map is not None:
        vocab_map.save(tmp / VOCAB_MAP_FILE)
        (tmp / "generation_config.json").write_text(json.dumps(generation_config(vocab_map), indent=2))
    (tmp / MARKER).write_text(json.dumps(summary, indent=2))  # last: its presence means complete


def read_model_config(path: str | Path):
    """The model config (its family's config class) of a directory written by `write_model_dir`."""
    path = Path(path)
    marker = json.loads((path / MARKER).read_text())
    if marker.get("format") != FORMAT or marker.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path / MARKER}: unsupported format {marker.get('format')!r} "
                         f"version {marker.get('version')!r} (expected {FORMAT!r} {FORMAT_VERSION})")
    try:  # directories written before the registry carry no model_type: the default family's
        family = get_family(marker.get("model_type"))
    except ValueError as e:
        raise ValueError(f"{path / MARKER}: {e}") from None
    return load_config(family.config_class, path / CONFIG_YAML)


def read_model_dir(path: str | Path, dtype: str | None = None, sharding=None):
    """Restores a model written by `write_model_dir` straight into the abstract module (no random init).

    `dtype` (compute and parameter dtype) casts on restore; `sharding` defaults to the default device.
    """
    import jax
    from flax import nnx

    path = Path(path).absolute()
    cfg = read_model_config(path)
    if dtype is not None:
        cfg.dtype = cfg.param_dtype = dtype
    graph, params = nnx.split(family_of(cfg).abstract_model(cfg), nnx.Param)
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                          nnx.to_pure_dict(params))
    with _quiet_orbax():
        checkpointer = _checkpointer()
        try:
            stored = checkpointer.metadata(path / PARAMS).item_metadata.tree
        except Exception as e:
            raise ValueError(f"{path / PARAMS}: cannot read checkpoint metadata ({type(e).__name__}: {e})") from None
        finally:
            checkpointer.close()
        _check_stored_shapes(path / PARAMS, stored, target)
        try:
            restored = _restore_in_groups(path / PARAMS, target)
        except Exception as e:
            raise ValueError(f"{path / PARAMS}: cannot restore parameters ({type(e).__name__}: {e})") from None
    nnx.replace_by_pure_dict(params, restored)
    return attach(nnx.merge(graph, params), read_vocab_map(path))


def _byte_groups(leaves, group_bytes: int) -> list[list[int]]:
    groups, current, size = [], [], 0
    for i, leaf in enumerate(leaves):
        nbytes = int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
        if current and size + nbytes > group_bytes:
            groups.append(current)
            current, size = [], 0
        current.append(i)
        size += nbytes
    return groups + [current] if current else groups


def _restore_in_groups(directory: Path, target, group_bytes: int = 128 * 2**20):
    """Restores `target` (ShapeDtypeStructs with shardings) a few arrays at a time.

    One orbax restore of the whole tree reads every array into host buffers concurrently (peak
    ~1.9 x the parameters on CPU, measured); partial restores of ~128 MB keep the transient small."""
    import jax
    import orbax.checkpoint as ocp

    leaves, treedef = jax.tree.flatten(target)
    restored = [None] * len(leaves)
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
    try:
        for group in _byte_groups(leaves, group_bytes):
            chosen = set(group)

            def only_group(make):
                return jax.tree.unflatten(treedef, [make(s) if i in chosen else ocp.PLACEHOLDER
                                                    for i, s in enumerate(leaves)])

            args = ocp.args.PyTreeRestore(
                item=only_group(lambda s: s),
                restore_args=only_group(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding, dtype=s.dtype,
                                                                        global_shape=s.shape)))
            out = jax.tree.leaves(checkpointer.restore(directory, args=args), is_leaf=lambda x: x is ocp.PLACEHOLDER)
            for i in group:
                restored[i] = out[i]
    finally:
        checkpointer.close()
    return jax.tree.unflatten(treedef, restored)


def _check_stored_shapes(where: Path, stored, target) -> None:
    """Orbax may pad or slice on a shape change; a checkpoint from another config must fail instead."""
    import jax

    def flat(tree):
        return {"/".join(str(getattr(k, "key", k)) for k in p): leaf
                for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}

    have, want = flat(stored), flat(target)
    problems = [f"missing {k}" for k in sorted(set(want) - set(have))]
    problems += [f"unexpected {k}" for k in sorted(set(have) - set(want))]
    problems += [f"{k}: stored {tuple(have[k].shape)}, model expects {tuple(want[k].shape)}"
                 for k in sorted(set(want) & set(have)) if tuple(have[k].shape) != tuple(want[k].shape)]
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise ValueError(f"{where}: parameters do not match {CONFIG_YAML} ({len(problems)} problems)\n  {shown}")


def save_model(model, out: str | Path, *, hf_dir: str | Path | None = None, overwrite: bool = False) -> Path:
    """Writes an NNX model (e.g. after fine-tuning) in the converted-directory format."""
    from flax import nnx

    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return write_model_dir(out, model.config, params, hf_dir=hf_dir, overwrite=overwrite, source="save_model",
                           vocab_map=vocab_map_of(model))


def read_vocab_map(path: str | Path):
    """The reduced vocabulary a model directory holds (vocab_map.json), else None; checked against
    the directory's tokenizer.json when there is one."""
    path = Path(path)
    if not (path / VOCAB_MAP_FILE).is_file():
        return None
    tokenizer = None
    if (path / "tokenizer.json").is_file():
        tokenizer = load_tokenizer(path)
    return VocabMap.load(path / VOCAB_MAP_FILE, tokenizer)
