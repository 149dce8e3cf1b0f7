"""SpatialReward scoring: SC and PQ prompts generated as one batch, parsed and aggregated.

For each (original(s), edited, instruction) item the model answers two prompts: SC on
[originals..., edited] with the instruction, and PQ on [edited]. Answers are parsed leniently
(`sr_jax.reward.parse_output`), turned into a reward (`aggregate`) and, beyond the original
method, checked against the pixels that actually changed (`sr_jax.reward.grounding`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import yaml

from sr_jax.config import from_dict
from sr_jax.convert.loading import load_model
from sr_jax.data.image import EVAL_MAX_PIXELS, MIN_PIXELS, open_image, smart_resize
from sr_jax.data.processor import Processor
from sr_jax.data.records import SpatialExample
from sr_jax.data.templates import PromptTemplates
from sr_jax.data.vocab import VOCAB_MAP_FILE, vocab_map_of
from sr_jax.generation import DEFAULT_STOP_IDS, PAD_ID, generate
from sr_jax.reward.aggregate import AGGREGATION_MODES, RewardWeights, aggregate
from sr_jax.reward.grounding import grounding_check
from sr_jax.reward.parse import PARSE_MODES, parse_output

_REWARD = RewardWeights()  # the reward options' defaults live in RewardWeights only


@dataclasses.dataclass
class ScorerOptions:
    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    batch_size: int = 8            # prompts per generate call (SC and PQ prompts count separately)
    mode: str = _REWARD.mode       # or "min_geometric", "mean" (sr_jax.reward.AGGREGATION_MODES)
    # How answers are read (sr_jax.reward.PARSE_MODES): "strict" (sr_jax's own, clamped to the
    # score range), "official_eval" (the official evaluation scripts' reading, and their
    # arithmetic: no cap at 10), "official_server" (the released reward server's reading).
    parse_mode: str = "strict"
    # The reward settings, flat so that requests and `--set` name them as before; `weights`
    # gathers them into the RewardWeights that `aggregate` reads.
    w1: float = _REWARD.w1
    w2: float = _REWARD.w2
    w3: float = _REWARD.w3
    w4: float = _REWARD.w4
    a: float = _REWARD.a
    score_range: float = _REWARD.score_range
    grounding: bool = True          # compute the changed-pixel check
    # False: only the SC prompt is asked (edit localisation and scores); the PQ scores are then
    # missing and read as the parser's default, like an unparsed answer. For SC-only evaluation,
    # and for models that never learned the PQ prompt (e.g. a reduced vocabulary without it).
    pq: bool = True
    grounding_weight: float = 0.0   # > 0 folds the grounding score into the reward
    min_pixels: int = MIN_PIXELS
    max_pixels: int = EVAL_MAX_PIXELS  # SpatialReward's evaluation budget
    dtype: str = "float32"
    templates: PromptTemplates = dataclasses.field(default_factory=PromptTemplates)

    def replace(self, **overrides) -> "ScorerOptions":
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown scorer option(s): {sorted(unknown)}")
        if isinstance(overrides.get("templates"), dict):  # `--set templates={sc: file.txt}` from a CLI

            overrides["templates"] = from_dict(PromptTemplates, overrides["templates"], "templates")
        return dataclasses.replace(self, **overrides).validate()

    @property
    def weights(self) -> RewardWeights:
        """The reward settings of these options; the `official_eval` reading drops the caps at 10."""
        return RewardWeights.from_options(self)

    def validate(self) -> "ScorerOptions":
        """Value checks, so a bad option is the caller's error (HTTP 400), not a model failure.
        Every number is bounded (comparisons are False for NaN, so NaN fails each of them)."""
        checks = [
            (self.parse_mode in PARSE_MODES, f"parse_mode must be one of {PARSE_MODES}"),
            (1 <= self.max_new_tokens <= MAX_NEW_TOKENS_LIMIT,
             f"max_new_tokens must be in [1, {MAX_NEW_TOKENS_LIMIT}]"),
            (0 <= self.temperature <= 100, "temperature must be in [0, 100]"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.top_k <= 1 << 20, "top_k must be in [0, 2**20]"),
            (0 <= self.seed < 1 << 32, "seed must be in [0, 2**32)"),  # JAX keys keep 32 bits of it
            (1 <= self.batch_size <= 4096, "batch_size must be in [1, 4096]"),
            (0 <= self.grounding_weight <= 1, "grounding_weight must be in [0, 1]"),
            (0 < self.min_pixels <= self.max_pixels, "need 0 < min_pixels <= max_pixels"),
        ]
        errors = self.weights.option_errors() + [msg for ok, msg in checks if not ok]
        if errors:
            raise ValueError("; ".join(errors))
        return self


MAX_NEW_TOKENS_LIMIT = 1 << 16
# Options fixed when the model and processor are built; a different value per call cannot be honoured.
LOAD_TIME_OPTIONS = ("min_pixels", "max_pixels", "dtype", "templates")


def _as_list(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


class Scorer:
    def __init__(self, model, processor: Processor, options: ScorerOptions | None = None):
        self.model = model
        self.processor = processor
        self.options = options or ScorerOptions()

    @classmethod
    def from_pretrained(cls, path: str | Path, **options) -> "Scorer":
        """`path`: a HF checkpoint dir or a converted sr_jax dir; tokenizer files there are used when present."""
        opts = ScorerOptions().replace(**options)
        path = Path(path)
        model = load_model(path, dtype=opts.dtype)
        tokenizer = path if (path / "tokenizer.json").is_file() else None
        # {score_range} in a prompt template says the scale the answers are parsed on.
        templates = dataclasses.replace(opts.templates, score_range=opts.score_range)
        processor = Processor(tokenizer, min_pixels=opts.min_pixels, max_pixels=opts.max_pixels,
                              templates=templates)
        if vocab_map_of(model) is not None:  # a reduced vocabulary: its ids must mean this tokenizer's
            vocab_map_of(model).check_tokenizer(processor.tokenizer, where=str(path / VOCAB_MAP_FILE))
        return cls(model, processor, opts)

    def validate_options(self, options: dict) -> None:
        """Raises ValueError for unknown options, ill-typed or bad values (the server calls this per
        request); messages name the option, e.g. `options.max_new_tokens: expected int`."""
        fixed = sorted(set(options) & set(LOAD_TIME_OPTIONS))
        if fixed:
            raise ValueError(f"options.{fixed[0]}: set when the model is loaded (sr-jax serve --option "
                             f"{fixed[0]}=...), not per request")
        typed = from_dict(ScorerOptions, options, "options")  # names and types
        opts = self._per_call({k: getattr(typed, k) for k in options})  # values
        vocab = getattr(getattr(getattr(self.model, "config", None), "text", None), "vocab_size", None)
        if vocab is not None and opts.top_k > vocab:
            raise ValueError(f"options.top_k: {opts.top_k} exceeds the vocabulary ({vocab})")

    def _per_call(self, overrides: dict) -> ScorerOptions:
        """The options of one call; a load-time option may only repeat the loaded value."""
        for name in LOAD_TIME_OPTIONS:
            if name in overrides and overrides[name] != getattr(self.options, name):
                raise ValueError(f"options.{name}: fixed when the scorer was built ({getattr(self.options, name)!r}); "
                                 f"a call cannot change it")
        return self.options.replace(**overrides) if overrides else self.options

    def check_image_size(self, width: int, height: int) -> None:
        """Raises ValueError (ImageError) for a size the image processor cannot resize, e.g. an
        aspect ratio over 200:1 (HF's `smart_resize` rule), before any model call sees it."""
        cfg = self.processor.image_config
        smart_resize(height, width, cfg.factor, cfg.min_pixels, cfg.max_pixels)

    @property
    def max_batch_size(self) -> int:
        return max(1, self.options.batch_size // 2)  # items per call: each item makes two prompts

    # ---- generation ----
    def _encode_prompts(self, originals, edited, instructions, pq: bool = True) -> list[dict]:
        prompts = []
        for i, (orig, edit, instr) in enumerate(zip(originals, edited, instructions)):
            origs = [open_image(o) for o in _as_list(orig)]
            edit = open_image(edit)
            sc = SpatialExample(id=f"item-{i}-sc", task="sc", images=origs + [edit], instruction=instr)
            prompts.append(self.processor.encode(sc, with_target=False))
        for i, edit in enumerate(edited if pq else []):
            example = SpatialExample(id=f"item-{i}-pq", task="pq", images=[open_image(edit)])
            prompts.append(self.processor.encode(example, with_target=False))
        return prompts

    def generate_texts(self, prompts: list[dict], opts: ScorerOptions, should_stop=None) -> list[str]:
        """Greedy/sampled answers for encoded prompts, batched by similar length (left padding)."""
        return self.generate_answers(prompts, opts, should_stop)[0]

    def generate_answers(self, prompts: list[dict], opts: ScorerOptions,
                         should_stop=None) -> tuple[list[str], list[bool]]:
        """(answers, truncated): an answer is truncated when it reached max_new_tokens without a
        stop token, i.e. it was cut off rather than finished. `should_stop()` true (checked
        between decode segments) abandons the rest: texts are cut."""
        order = sorted(range(len(prompts)), key=lambda i: prompts[i]["input_ids"].shape[1])
        texts: list[str] = [""] * len(prompts)
        truncated: list[bool] = [False] * len(prompts)
        for start in range(0, len(order), opts.batch_size):
            if should_stop is not None and should_stop():
                break
            chunk = [prompts[i] for i in order[start:start + opts.batch_size]]
            width = max(p["input_ids"].shape[1] for p in chunk)
            ids = np.full((len(chunk), width), PAD_ID, np.int64)
            mask = np.zeros_like(ids)
            for row, p in enumerate(chunk):
                n = p["input_ids"].shape[1]
                ids[row, width - n:], mask[row, width - n:] = p["input_ids"][0], 1
            pixels = [p["pixel_values"] for p in chunk if len(p["image_grid_thw"])]
            grids = [p["image_grid_thw"] for p in chunk if len(p["image_grid_thw"])]
            new = generate(self.model, ids, mask, np.concatenate(pixels) if pixels else None,
                           np.concatenate(grids) if grids else None, max_new_tokens=opts.max_new_tokens,
                           temperature=opts.temperature, top_p=opts.top_p, top_k=opts.top_k, seed=opts.seed,
                           should_stop=should_stop)
            for row, idx in enumerate(order[start:start + opts.batch_size]):
                texts[idx] = self.processor.tokenizer.decode(
                    [t for t in new[row].tolist() if t != PAD_ID], skip_special_tokens=True)
                truncated[idx] = not np.isin(new[row], DEFAULT_STOP_IDS).any()
        return texts, truncated

    # ---- the public call ----
    def score(self, originals: Sequence[Any], edited: Sequence[Any], instructions: Sequence[str],
              should_stop=None, **overrides) -> list[dict]:
        """One result per item, in order. `originals[i]` is an image or a list of images (several
        originals for multi-input edits); images are PIL images, encoded bytes or file paths.
        `should_stop`: a callable the reward server passes; once it returns True generation stops
        early and the results (of cut answers) are not meant to be used."""
        opts = self._per_call(overrides)
        if not (len(originals) == len(edited) == len(instructions)):
            raise ValueError(f"originals ({len(originals)}), edited ({len(edited)}) and instructions "
                             f"({len(instructions)}) must have the same length")
        if not edited:
            return []
        texts, cut = self.generate_answers(self._encode_prompts(originals, edited, instructions, opts.pq), opts,
                                           should_stop)
        n = len(edited)
        if not opts.pq:
            texts, cut = texts + [""] * n, cut + [False] * n
        return [self._result(originals[i], edited[i], texts[i], texts[n + i], opts,
                             {"sc": cut[i], "pq": cut[n + i]}) for i in range(n)]

    def _result(self, original, edited, sc_text: str, pq_text: str, opts: ScorerOptions,
                truncated: dict | None = None) -> dict:
        sc = parse_output(sc_text, with_region=True, score_range=opts.score_range, mode=opts.parse_mode)
        pq = parse_output(pq_text, with_region=False, score_range=opts.score_range, mode=opts.parse_mode)
        grounding = None
        if opts.grounding:
            grounding = grounding_check(open_image(_as_list(original)[0]), open_image(edited), sc["edit_region"])
        reward, sc_value, pq_value = aggregate(
            sc["score"], pq["score"], opts.weights,
            grounding=None if grounding is None else grounding["grounding_score"],
            grounding_weight=opts.grounding_weight if grounding is not None else 0.0)
        return {
            "reward": reward,
            "sc": sc_value,
            "pq": pq_value,
            "sc_scores": list(sc["score"]),
            "pq_scores": list(pq["score"]),
            "edit_region": sc["edit_region"],
            "reasoning": {"sc": sc["reasoning"], "pq": pq["reasoning"]},
            "grounding": grounding,
            "parsed": {"sc": sc["parsed"], "pq": pq["parsed"]},
            "truncated": truncated or {"sc": False, "pq": False},
            "raw": {"sc": sc_text, "pq": pq_text},
        }


# ---- CLI: sr-jax score ----
def register(sub) -> None:
    p = sub.add_parser("score", help="score one edit with a SpatialReward model and print JSON")
    p.add_argument("--model", required=True, help="HF checkpoint dir or converted sr_jax dir")
    p.add_argument("--original", required=True, action="append", help="original image (repeat for several)")
    p.add_argument("--edited", required=True, help="edited image")
    p.add_argument("--instruction", required=True)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--mode", default=_REWARD.mode, choices=list(AGGREGATION_MODES))
    p.add_argument("--parse-mode", default="strict", choices=list(PARSE_MODES),
                   help="answer reading: sr_jax's strict one, or the official evaluation's / server's")
    p.add_argument("--grounding-weight", type=float, default=0.0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any ScorerOptions field")
    p.set_defaults(func=_score_command)


def _score_command(args) -> int:
    extra = {}
    for item in args.set:
        key, _, raw = item.partition("=")
        extra[key] = yaml.safe_load(raw)
    scorer = Scorer.from_pretrained(args.model, max_new_tokens=args.max_new_tokens, dtype=args.dtype,
                                    mode=args.mode, parse_mode=args.parse_mode,
                                    grounding_weight=args.grounding_weight, **extra)
    result = scorer.score([args.original], [args.edited], [args.instruction])[0]
    print(json.dumps(result, indent=2, ensure_ascii=False))
    return 0
