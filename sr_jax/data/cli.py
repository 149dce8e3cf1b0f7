"""`sr-jax data synth | import | inspect`.

synth   writes OUT/{split}.array_record for each split plus OUT/manifest.json:
        {"format": "sr_jax.synthdir", "version": 1, "generator", "seed", "config": {...},
         "splits": {name: {"file", "count", "tasks": {...}, "edit_types": {...}}}}
        --splits takes counts (train=900) or fractions of --n (train=0.9).
import  converts jsonl | parquet | synthdir into one ArrayRecord file (see importers.py).
inspect prints counts by task / edit type / outcome, image-size and text-length histograms, and
        token-length histograms from the Processor when it can be built.
vocab-map writes the reduced vocabulary (`sr_jax.data.vocab`) of one or more training configs'
        data (each config's sources formatted with its own templates and tokenizer), e.g. one map
        for every stage of a curriculum: `model.vocab_map=<that file>` in each stage.
"""

from __future__ import annotations

import collections
import io
import json
import sys
import time
from pathlib import Path

from PIL import Image

from sr_jax.config import ConfigError, apply_overrides, from_dict, load_config, load_yaml, to_dict
from sr_jax.data.grpo_import import import_command
from sr_jax.data.importers import DEFAULT_INSTRUCTION_PATTERNS, ImportOptions, import_records
from sr_jax.data.pipeline import DataConfig, make_processor
from sr_jax.data.processor import IGNORE_INDEX, Processor
from sr_jax.data.records import RecordError
from sr_jax.data.storage import ArrayRecordSource, write_array_record
from sr_jax.data.synthetic import GENERATOR, SynthConfig, generate_examples
from sr_jax.data.vocab import VocabMap, build_vocab_map

DEFAULT_SPLITS = "train=0.9,validation=0.05,test=0.05"


def parse_splits(text: str, n: int) -> dict[str, int]:
    """'train=0.9,validation=50' -> counts; fractions are of n, rounded down."""
    out: dict[str, int] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(f"split {item!r} is not NAME=COUNT or NAME=FRACTION")
        try:
            number = float(value) if "." in value else int(value)
        except ValueError:
            raise ValueError(f"split {name!r}: {value!r} is not a number") from None
        if number < 0 or (isinstance(number, float) and number > 1):
            raise ValueError(f"split {name!r}: a fraction must lie in [0, 1], a count be >= 0")
        out[name] = int(number * n) if isinstance(number, float) else number
    if not out:
        raise ValueError("no splits given")
    return out


def _synth(args) -> int:
    overrides = list(args.set or [])
    if args.image_size:
        overrides.append(f"image_size=[{args.image_size}]")
    if args.tasks:
        overrides.append(f"tasks=[{args.tasks}]")
    try:
        cfg = load_config(SynthConfig, args.config, overrides)
        splits = parse_splits(args.splits or DEFAULT_SPLITS, args.n)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"format": "sr_jax.synthdir", "version": 1, "generator": GENERATOR, "seed": args.seed,
                "config": to_dict(cfg), "splits": {}}  # fmt: skip
    for name, count in splits.items():
        tasks, edits = collections.Counter(), collections.Counter()

        def counted(examples):
            for e in examples:
                tasks[e.meta.get("synthetic_task", e.task)] += 1
                edits[e.meta.get("edit_type", "?")] += 1
                yield e

        start = time.perf_counter()
        file = f"{name}.array_record"
        written = write_array_record(out / file, counted(generate_examples(count, args.seed, name, config=cfg)))
        rate = written / max(1e-9, time.perf_counter() - start)
        manifest["splits"][name] = {"file": file, "count": written, "tasks": dict(tasks), "edit_types": dict(edits)}
        print(f"{name}: {written} examples -> {out / file} ({rate:.0f}/s)")
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return 0


def _import(args) -> int:
    if args.format == "grpo-json":  # GRPO prompt rows: their own module

        return import_command(args)

    patterns = tuple(args.instruction_regex or ()) + DEFAULT_INSTRUCTION_PATTERNS
    opts = ImportOptions(strict=args.strict, instruction_patterns=patterns, require_parsed=args.require_parsed)
    try:
        stats = import_records(args.format, args.src, args.out, opts, split=args.split)
    except (RecordError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        print(f"{args.out} was not written (an existing file there is unchanged)", file=sys.stderr)
        return 1
    print(f"{args.src} -> {args.out}: {stats.summary()}")
    return 0 if stats.written else 1


def _histogram(values, edges) -> str:
    counts = collections.Counter()
    for v in values:
        label = next((f"<{e}" for e in edges if v < e), f">={edges[-1]}")
        counts[label] += 1
    order = [f"<{e}" for e in edges] + [f">={edges[-1]}"]
    return "  ".join(f"{k}: {counts[k]}" for k in order if counts[k])


def _image_size(data) -> tuple[int, int]:
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
        return im.size


def _token_lengths(examples, limit: int) -> tuple[list[int], str]:
    """Total and answer token counts from the Processor on up to `limit` examples."""
    try:
        processor = Processor()
    except Exception as e:  # no processor yet, or no tokenizer files: report, do not fail
        return [], f"token lengths unavailable ({type(e).__name__}: {e})"
    totals, answers = [], []
    for e in examples[:limit]:
        try:
            enc = processor.encode(e)
        except RecordError as err:
            if err.reason != "no_answer":
                raise
            enc = processor.encode(e, with_target=False)  # prompt-only (GRPO) records: the prompt alone
        totals.append(int(enc["input_ids"].shape[1]))
        answers.append(int((enc["labels"] != IGNORE_INDEX).sum()) if "labels" in enc else 0)
    note = (f"(first {len(totals)} examples; max_pixels {processor.image_config.max_pixels}, imported rows "
            f"LLaMA-Factory's image_max_pixels {processor.llamafactory_pixels[0]})")
    return totals, note + "\n  answer tokens: " + _histogram(answers, [64, 128, 256, 512, 1024])


def _inspect(args) -> int:
    keys = {
        "task": lambda e: e.meta.get("synthetic_task", e.task),  # colour and locate records name theirs
        "edit type": lambda e: e.meta.get("edit_type", "-"),
        "outcome": lambda e: e.meta.get("outcome", e.meta.get("artifact", "-")),
        "images per record": lambda e: len(e.images),
        "regions per record": lambda e: len(e.edit_region),
        # imported rows train on their own text; say how many answers parsed into fields
        "answer": lambda e: ("parsed" if e.meta.get("answer_parsed") else "verbatim only")
        if e.meta.get("verbatim") else "sr_jax",
    }
    counts = {title: collections.Counter() for title in keys}
    long_sides, megapixels, words, answer_chars, sample = [], [], [], [], []
    try:
        source = ArrayRecordSource(args.files)
        for e in source:  # one pass: files may be larger than memory
            for title, key in keys.items():
                counts[title][key(e)] += 1
            for w, h in (_image_size(im) for im in e.images):
                long_sides.append(max(w, h))
                megapixels.append(w * h / 1e6)
            words.append(len(e.instruction.split()))
            verbatim = e.meta.get("verbatim")
            answer_chars.append(len(e.meta.get("answer") or "") if verbatim else len(e.target_json()))
            if len(sample) < args.token_sample:
                sample.append(e)
    except (FileNotFoundError, RecordError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{len(words)} records in {len(source.paths)} file(s)")
    for title, c in counts.items():
        print(f"{title}: " + ", ".join(f"{k}={v}" for k, v in sorted(c.items(), key=lambda kv: str(kv[0]))))
    print("image long side: " + _histogram(long_sides, [128, 256, 512, 1024, 2048]))
    print("image megapixels: " + _histogram(megapixels, [0.05, 0.25, 1, 4]))
    print("instruction words: " + _histogram(words, [5, 10, 20, 40]))
    print("answer characters: " + _histogram(answer_chars, [200, 400, 800, 1600]))
    totals, note = _token_lengths(sample, args.token_sample)
    if totals:
        print(f"tokens per example {note.splitlines()[0]}: " + _histogram(totals, [256, 512, 1024, 2048, 4096]))
        print("\n".join(note.splitlines()[1:]))
    else:
        print(note)
    return 0


def _vocab_map(args) -> int:
    maps = []
    for path in args.config:
        data = apply_overrides(load_yaml(path), args.overrides).get("data") or {}
        try:
            cfg = from_dict(DataConfig, data, f"{path}: data").validate()
        except (ConfigError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        sources = args.source or list(cfg.sources)
        maps.append(build_vocab_map(sources, make_processor(cfg), samples_per_source=args.samples))
        print(f"{path}: {len(maps[-1])} tokens from {sources}", file=sys.stderr)
    vmap = VocabMap.union(maps)
    vmap.save(args.out)
    print(json.dumps({"out": args.out, "size": len(vmap), "tokenizer_sha256": vmap.tokenizer_sha256}))
    return 0


def register(subparsers) -> None:
    data = subparsers.add_parser("data", help="synthetic data, imports and inspection")
    sub = data.add_subparsers(dest="data_command", required=True)

    p = sub.add_parser("synth", help="generate the synthetic edit dataset as ArrayRecord files")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n", type=int, default=1000, help="total examples that split fractions refer to")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--splits", help=f"NAME=COUNT or NAME=FRACTION list (default {DEFAULT_SPLITS})")
    p.add_argument("--image-size", help="MIN,MAX side in pixels (default 96,256)")
    p.add_argument("--tasks", help="sc,pq (default both)")
    p.add_argument("--config", help="YAML with SynthConfig fields")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="SynthConfig override, repeatable")
    p.set_defaults(func=_synth)

    p = sub.add_parser("import", help="convert jsonl / parquet / synthdir data to ArrayRecord")
    p.add_argument("--format", required=True, choices=("jsonl", "parquet", "synthdir", "grpo-json"),
                   help="grpo-json: ms-swift GRPO prompt rows (SpatialReward-Train rl/data.json), prompt-only")
    p.add_argument("--src", required=True)
    p.add_argument("--out", required=True, help="output .array_record file")
    p.add_argument("--strict", action="store_true", help="stop at the first bad record (the output is not written)")
    p.add_argument("--require-parsed", action="store_true",
                   help="skip rows whose answer does not parse as JSON (by default they train verbatim)")
    p.add_argument("--split", help="synthdir only: import just this split")
    p.add_argument("--image-root", help="grpo-json: folder that relative image paths start from (default: the file's)")
    p.add_argument("--instruction-regex", action="append",
                   help="regex with a group named 'instruction', tried before the defaults")  # fmt: skip
    p.set_defaults(func=_import)

    p = sub.add_parser("inspect", help="counts and histograms of ArrayRecord files")
    p.add_argument("files", nargs="+", help="ArrayRecord files or folders")
    p.add_argument("--token-sample", type=int, default=64, help="examples to tokenise for token lengths")
    p.set_defaults(func=_inspect)

    p = sub.add_parser("vocab-map", help="the reduced vocabulary of training configs' data (vocab_map.json)")
    p.add_argument("--config", action="append", required=True,
                   help="training YAML whose data section (sources, templates, tokenizer) is read; repeatable")
    p.add_argument("--source", action="append", help="use these sources instead of the configs' data.sources")
    p.add_argument("--samples", type=int, default=2000, help="examples sampled per source")
    p.add_argument("--out", required=True, help="output vocab_map.json")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="applied to every config, e.g. data.tokenizer=DIR")
    p.set_defaults(func=_vocab_map)
