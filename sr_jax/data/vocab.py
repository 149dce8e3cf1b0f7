"""A reduced vocabulary: the tokens a model actually sees, with ids remapped on the way in and out.

About 90% of the compact CPU model's step (configs/model/qwen3vl_learn_cpu.yaml) is the
151936-row vocabulary projection, yet the synthetic data uses a few hundred distinct tokens. A
`VocabMap` keeps the sorted list of full-vocabulary ids a model may use; the model is built with
`len(map)` rows (`remap_config`), its inputs and labels are mapped to compact ids
(`to_compact`) and what it generates is mapped back (`to_full`) before the real tokenizer decodes
it. The tokenizer, the prompts and the answer format are unchanged: the map is a renumbering.

Where it applies (one map per model, carried as the model's `vocab_map` attribute):
  training        `model.vocab_map` in the SFT/RL config (None = the full vocabulary); the data
                  pipeline maps input_ids and labels (`sr_jax.data.pipeline.EncodeStep`)
  files           `vocab_map.json` in the run directory, in every exported model directory
                  (sr_jax and HF formats); `load_model` attaches it to the model
  generation      `sr_jax.generation.generate` takes and returns full ids whatever the model:
                  prompts, pad and stop ids go in compact, the new tokens come back full

Coverage is by sampling (`build_vocab_map`): every token of the fully formatted training
sequences (chat and special tokens, prompt, answer) of a sample of each source's examples, plus
every special token and every printable ASCII character's own token (so any number and any JSON
punctuation can always be encoded, one character per token if need be). A token outside the map
is never replaced by a wrong id: `to_compact` raises `VocabMissError` naming the token id, its
text and the record; the data pipeline skips such a record with reason `not_in_vocab_map`
(`data.strict` raises), and generation refuses such a prompt.

The map records the tokenizer it was built with (`tokenizer_identity`, a hash of the token ->
id table), and loading it against another tokenizer is an error.
"""

from __future__ import annotations

import copy
import hashlib
import json
import string
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from sr_jax.data.records import RecordError
from sr_jax.data.tokenizer import SPECIAL_TOKENS

FORMAT, FORMAT_VERSION = "sr_jax.vocab_map", 1
VOCAB_MAP_FILE = "vocab_map.json"
SYNTHETIC = "synthetic"  # `model.vocab_map: synthetic`: build the map from `data.sources`
DEFAULT_SAMPLES = 2000   # examples sampled per source by `build_vocab_map`


class VocabMissError(ValueError):
    """A token the reduced vocabulary does not hold."""

    def __init__(self, message: str, token_id: int):
        super().__init__(message)
        self.token_id = token_id


def tokenizer_identity(tokenizer) -> str:
    """sha256 of the tokenizer's token -> id table (added tokens included): what ids mean."""
    backend = getattr(tokenizer, "backend", tokenizer)
    vocab = backend.get_vocab(with_added_tokens=True)
    table = json.dumps(sorted(vocab.items(), key=lambda kv: (kv[1], kv[0])), ensure_ascii=False)
    return hashlib.sha256(table.encode("utf-8")).hexdigest()


class VocabMap:
    """The sorted full-vocabulary ids a compact model keeps; compact id i is full id `ids[i]`.

    Hashable and comparable by content: a model carries it as a static attribute (part of its
    graph definition), so two models with the same map share compiled programs."""

    def __init__(self, ids: Iterable[int], tokenizer_sha256: str, *, source: str = "", tokenizer=None):
        kept = np.unique(np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, np.int64))
        if kept.size == 0:
            raise ValueError("a vocabulary map needs at least one token")
        if kept[0] < 0:
            raise ValueError(f"negative token id {int(kept[0])} in a vocabulary map")
        self.ids = kept
        self.ids.setflags(write=False)
        self.tokenizer_sha256 = str(tokenizer_sha256)
        self.source = source
        self.tokenizer = tokenizer  # optional: names a missing token's text in errors
        self._table = np.full(int(kept[-1]) + 1, -1, np.int64)
        self._table[kept] = np.arange(kept.size)
        self._hash = hash((hashlib.sha256(kept.tobytes()).hexdigest(), self.tokenizer_sha256))

    # ---- identity ----
    def __len__(self) -> int:
        return int(self.ids.size)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        return (isinstance(other, VocabMap) and self.tokenizer_sha256 == other.tokenizer_sha256
                and np.array_equal(self.ids, other.ids))

    def __repr__(self) -> str:
        return f"VocabMap({len(self)} tokens, tokenizer {self.tokenizer_sha256[:12]})"

    def __getstate__(self):  # pickled into data-pipeline workers: the table is rebuilt there
        return {"ids": self.ids, "tokenizer_sha256": self.tokenizer_sha256, "source": self.source,
                "tokenizer": self.tokenizer}

    def __setstate__(self, state):
        self.__init__(state["ids"], state["tokenizer_sha256"], source=state["source"], tokenizer=state["tokenizer"])

    # ---- mapping ----
    def contains(self, full_ids) -> np.ndarray:
        full = np.asarray(full_ids, np.int64)
        inside = (full >= 0) & (full < self._table.size)
        return inside & (self._table[np.where(inside, full, 0)] >= 0)

    def describe(self, token_id: int) -> str:
        """`id 1234 ('text')`, the text decoded by the attached tokenizer when there is one."""
        if self.tokenizer is None:
            return f"id {token_id}"
        try:
            return f"id {token_id} ({self.tokenizer.decode([token_id])!r})"
        except Exception:  # an id the tokenizer does not know
            return f"id {token_id} (not in the tokenizer)"

    def to_compact(self, full_ids, *, record_id: str | None = None, keep: int | None = None) -> np.ndarray:
        """Full ids -> compact ids (same shape, int64). `keep`: a value passed through unchanged
        (the labels' ignore index). Raises VocabMissError on the first id the map does not hold."""
        full = np.asarray(full_ids, np.int64)
        passthrough = (full == keep) if keep is not None else np.zeros(full.shape, bool)
        ok = self.contains(full) | passthrough
        if not ok.all():
            bad = int(full[~ok].flat[0])
            where = f"record {record_id}: " if record_id is not None else ""
            raise VocabMissError(
                f"{where}token {self.describe(bad)} is not in the reduced vocabulary ({len(self)} tokens, "
                f"{self.source or 'vocab_map.json'}); rebuild the map with this data or train with the full "
                "vocabulary (model.vocab_map=null)", bad)
        out = self._table[np.where(passthrough, 0, full)]
        return np.where(passthrough, full, out) if keep is not None else out

    def to_full(self, compact_ids) -> np.ndarray:
        compact = np.asarray(compact_ids, np.int64)
        bad = (compact < 0) | (compact >= len(self))
        if bad.any():
            raise ValueError(f"compact token id {int(compact[bad].flat[0])} outside the reduced vocabulary "
                             f"(0..{len(self) - 1})")
        return self.ids[compact]

    def compact_id(self, full_id: int) -> int:
        return int(self.to_compact(np.asarray([full_id]))[0])

    # ---- files ----
    def to_json(self) -> dict:
        return {"format": FORMAT, "version": FORMAT_VERSION, "tokenizer_sha256": self.tokenizer_sha256,
                "size": len(self), "source": self.source, "ids": [int(i) for i in self.ids]}

    def save(self, path: str | Path) -> Path:
        """Writes the map as JSON (`path` may be a directory: `path/vocab_map.json`)."""
        path = Path(path)
        if path.is_dir():
            path = path / VOCAB_MAP_FILE
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_json()))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path, tokenizer=None) -> "VocabMap":
        """Reads a map (`path` may be a directory holding vocab_map.json). With `tokenizer`, checks
        that the map was made for it and attaches it (errors then name tokens by their text)."""
        path = Path(path)
        if path.is_dir():
            path = path / VOCAB_MAP_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no vocabulary map") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path}: not a vocabulary map of format {FORMAT!r} version {FORMAT_VERSION}")
        ids = data.get("ids")
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise ValueError(f"{path}: 'ids' must be a list of integers")
        if len(set(ids)) != len(ids) or ids != sorted(ids) or data.get("size") != len(ids):
            raise ValueError(f"{path}: 'ids' must be sorted, unique and 'size' long")
        vmap = cls(ids, data.get("tokenizer_sha256", ""), source=str(data.get("source", "")))
        if tokenizer is not None:
            vmap.check_tokenizer(tokenizer, where=str(path))
        return vmap

    def check_tokenizer(self, tokenizer, where: str = "vocabulary map") -> "VocabMap":
        """Raises unless `tokenizer` is the one the map was built with; attaches it."""
        found = tokenizer_identity(tokenizer)
        if found != self.tokenizer_sha256:
            raise ValueError(f"{where}: made for tokenizer {self.tokenizer_sha256[:12]}, not for this one "
                             f"({found[:12]}); its ids would mean other tokens")
        self.tokenizer = tokenizer
        return self

    # ---- the model ----
    def remap_config(self, model_config):
        """A copy of a full-vocabulary ModelConfig for the compact model: `len(map)` vocabulary
        rows, the image/video/vision-boundary ids renumbered (so M-RoPE and the image scatter
        find them). Still a Qwen3-VL config that transformers loads."""
        if model_config.text.vocab_size < int(self.ids[-1]) + 1:
            raise ValueError(f"vocabulary map holds id {int(self.ids[-1])}, beyond the model's vocabulary "
                             f"({model_config.text.vocab_size}); is the config already compact?")
        cfg = copy.deepcopy(model_config)
        cfg.text.vocab_size = len(self)
        for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
            full = getattr(model_config, name)
            if not self.contains([full])[0]:
                raise ValueError(f"vocabulary map lacks the model's {name} ({self.describe(full)})")
            setattr(cfg, name, self.compact_id(full))
        return cfg

    @classmethod
    def union(cls, maps: Sequence["VocabMap"]) -> "VocabMap":
        """One map holding every token of `maps` (all made for one tokenizer): e.g. the sources of
        every stage of a curriculum, so that stage k can start from stage k-1's model."""
        if not maps or len({m.tokenizer_sha256 for m in maps}) != 1:
            raise ValueError("union of vocabulary maps: need at least one map, all of one tokenizer")
        return cls(np.concatenate([m.ids for m in maps]), maps[0].tokenizer_sha256,
                   source="; ".join(m.source for m in maps), tokenizer=maps[0].tokenizer)

    def rows(self, weight: np.ndarray, axis: int = 0) -> np.ndarray:
        """A full vocabulary weight's kept rows (embedding: axis 0; untied lm_head kernel: axis 1)."""
        return np.take(np.asarray(weight), self.ids, axis=axis)


def attach(model, vmap: VocabMap | None):
    """Makes `vmap` the model's map (a static attribute: generation and saving read it)."""
    if vmap is not None and model.config.text.vocab_size != len(vmap):
        raise ValueError(f"vocabulary map of {len(vmap)} tokens, model of {model.config.text.vocab_size} rows")
    model.vocab_map = vmap
    return model


def vocab_map_of(model) -> VocabMap | None:
    return getattr(model, "vocab_map", None)


def _single_char_ids(tokenizer) -> set[int]:
    """The ids of every printable ASCII character (digits, punctuation, letters, whitespace) alone."""
    out = set()
    for ch in string.printable:
        ids = tokenizer.encode(ch)
        if len(ids) == 1:
            out.add(ids[0])
    return out


def _special_ids(tokenizer) -> set[int]:
    return {i for i, content, _ in SPECIAL_TOKENS if tokenizer.token_to_id(content) == i}


def build_vocab_map(sources: Sequence[str], processor, *, samples_per_source: int = DEFAULT_SAMPLES,
                    extra_ids: Iterable[int] = ()) -> VocabMap:
    """The map of the tokens the data in `sources` (data-pipeline source specs: `synthetic:...`
    or ArrayRecord paths) uses, formatted by `processor` (its tokenizer, templates and chat
    layout): up to `samples_per_source` examples spread over each source, each tokenized with
    and without its answer, plus every special token, every printable ASCII character's token
    and `extra_ids`. Unreadable records are left out (they are skipped in training too)."""
    from sr_jax.data.pipeline import Sources  # the pipeline maps with VocabMap: imported on use

    tok = processor.tokenizer
    ids = set(_special_ids(tok)) | _single_char_ids(tok) | {int(i) for i in extra_ids}
    seen, failed = 0, 0
    for spec in sources:
        part = Sources([spec])
        n = len(part)
        picks = np.unique(np.linspace(0, n - 1, min(n, samples_per_source)).round().astype(np.int64)) if n else []
        for index in picks:
            try:
                example = part.fetch(int(index))
                ids.update(processor.token_ids(example, with_target=False)[0])
            except (RecordError, ValueError, OSError):
                failed += 1
                continue
            seen += 1
            try:  # a prompt-only record (GRPO prompts) has no answer to add
                ids.update(processor.token_ids(example, with_target=True)[0])
            except (RecordError, ValueError):
                pass
    if seen == 0:
        raise ValueError(f"no readable example in {list(sources)} to build a vocabulary map from "
                         f"({failed} failed)")
    return VocabMap(sorted(ids), tokenizer_identity(tok), tokenizer=tok,
                    source=f"built from {seen} examples of {list(sources)}")
