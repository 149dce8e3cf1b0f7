"""ArrayRecord storage, record serialisation, importers and the `sr-jax data` commands."""

import io
import json
import pickle
from pathlib import Path

import msgpack
import numpy as np
import pytest
from PIL import Image

from sr_jax.cli import main
from sr_jax.data.cli import parse_splits
from sr_jax.data.importers import (
    DEFAULT_INSTRUCTION_PATTERNS,
    ImportOptions,
    ImportStats,
    extract_instruction,
    import_records,
    read_jsonl,
    read_parquet,
)
from sr_jax.data.records import RecordError, Region, SpatialExample
from sr_jax.data.storage import ArrayRecordSource, example_from_bytes, example_to_bytes, write_array_record
from sr_jax.data.synthetic import generate_examples

REPO = Path(__file__).resolve().parents[2]


def png(colour, size=(12, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def sc_answer(box=(10, 20, 300, 400), score=(20, 24)) -> str:
    return json.dumps({"edit_region": [{"id": 0, "label": "cat", "bbox_2d": list(box)}],
                       "reasoning": "<|bbox_0|> the cat is blue. <|global|> fine.", "score": list(score)})  # fmt: skip


def row(images, answer, n_tags=None, instruction="Make the cat blue.") -> dict:
    tags = "<image>" * (len(images) if n_tags is None else n_tags)
    prompt = f"{tags}Image 1 is the original; image 2 is it edited with this instruction: {instruction}\nJudge it."
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}], "images": images}


@pytest.fixture(scope="module")
def synth_examples():
    return list(generate_examples(12, seed=4, image_size=(48, 80)))


# ---------------------------------------------------------------- serialisation + ArrayRecord


def test_round_trip_through_array_record_files(tmp_path, synth_examples):
    extra = SpatialExample(
        id="hand-1", task="sc", images=["relative/a.png", png("red")], instruction="Make it red",
        edit_region=[Region(0, "dog", (1, 2, 3, 4)), Region(1, "sky", (0, 0, 1000, 300))],
        reasoning="<|bbox_0|> ok <|global|> ok", score=(12.5, 3.0),
        meta={"nested": {"a": [1, 2.5, None, True]}, "blob": b"\x00\xff", "np": np.int64(7)},
    )  # fmt: skip
    examples = synth_examples + [extra]
    assert write_array_record(tmp_path / "a.array_record", examples[:5]) == 5
    assert write_array_record(tmp_path / "b.array_record", examples[5:]) == len(examples) - 5
    source = ArrayRecordSource(tmp_path)  # a folder means its *.array_record files, sorted
    assert len(source) == len(examples)
    got = list(source)
    expected_extra = SpatialExample(**{**extra.__dict__, "meta": {**extra.meta, "np": 7}})
    assert got[:-1] == synth_examples and got[-1] == expected_extra
    assert got[3].images[0] == synth_examples[3].images[0]  # bytes kept verbatim
    assert source[-1] == expected_extra and source.__getitems__([6, 0]) == [got[6], got[0]]
    clone = pickle.loads(pickle.dumps(source))  # Grain workers receive the source pickled
    assert clone[7] == got[7] and repr(clone) == repr(source)
    with pytest.raises(IndexError):
        source[len(examples)]


def test_array_record_source_works_in_a_grain_pipeline(tmp_path, synth_examples):
    import grain

    write_array_record(tmp_path / "x.array_record", synth_examples)
    source = ArrayRecordSource(tmp_path / "x.array_record")
    assert isinstance(source, grain.sources.RandomAccessDataSource)
    ids = list(grain.MapDataset.source(source).shuffle(seed=1).map(lambda e: e.id))
    assert sorted(ids) == sorted(e.id for e in synth_examples) and ids != [e.id for e in synth_examples]


def test_decoding_is_safe_and_names_the_record():
    with pytest.raises(RecordError) as err:
        example_from_bytes(pickle.dumps({"format": "sr_jax.example"}), "f.array_record#3")
    assert err.value.reason == "bad_record" and "f.array_record#3" in str(err.value)
    ext = msgpack.packb({"format": "sr_jax.example", "v": 1, "x": msgpack.ExtType(1, b"evil")})
    with pytest.raises(RecordError, match="extension"):
        example_from_bytes(ext)
    good = msgpack.unpackb(example_to_bytes(SpatialExample("r9", "pq", [b"x"], score=(1, 2))))
    good["edit_region"] = [[0, "a"]]
    with pytest.raises(RecordError, match="r9"):
        example_from_bytes(msgpack.packb(good))
    with pytest.raises(RecordError, match="cannot serialise") as err:
        example_to_bytes(SpatialExample("r10", "pq", [b"x"], meta={"obj": object()}))
    assert err.value.record_id == "r10"


def test_bad_record_inside_a_file_names_file_and_index(tmp_path, synth_examples):
    from array_record.python.array_record_module import ArrayRecordWriter

    path = tmp_path / "bad.array_record"
    writer = ArrayRecordWriter(str(path), "group_size:1")
    writer.write(example_to_bytes(synth_examples[0]))
    writer.write(b"not a record")
    writer.close()
    source = ArrayRecordSource(path)
    assert source[0] == synth_examples[0]
    with pytest.raises(RecordError, match=r"bad\.array_record#1") as err:
        source[1]
    assert str(err.value).count("record record 1") == 1  # no "record X: record X:"


def test_missing_paths_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        ArrayRecordSource(tmp_path / "nope.array_record")
    with pytest.raises(FileNotFoundError, match="no"):
        ArrayRecordSource(tmp_path)


# ---------------------------------------------------------------- importers


def write_jsonl_fixture(root: Path) -> tuple[Path, dict]:
    (root / "imgs").mkdir()
    originals = {"orig.png": png("red"), "edit.png": png("blue"), "pq.png": png("green", (20, 10))}
    for name, data in originals.items():
        (root / "imgs" / name).write_bytes(data)
    (root / "imgs" / "corrupt.png").write_bytes(originals["orig.png"][:40] + b"garbage" * 8)
    good = ["imgs/orig.png", "imgs/edit.png"]
    lines = [
        json.dumps({**row(good, sc_answer()), "id": "good-sc"}),
        json.dumps({"messages": [{"role": "user", "content": "<image>Rate the quality."},
                                 {"role": "assistant", "content": '```json\n{"reasoning": "clean", "score": [25, 24]}\n```'}],
                    "images": ["imgs/pq.png"]}),  # fmt: skip
        "",
        json.dumps({"conversations": [{"from": "human", "value": row(good, "")["messages"][0]["content"]},
                                      {"from": "gpt", "value": sc_answer(box=(0, 0, 5, 5))}],
                    "images": good}),  # fmt: skip
        json.dumps(row(["imgs/orig.png", "imgs/missing.png"], sc_answer())),
        json.dumps(row(["imgs/orig.png", "imgs/corrupt.png"], sc_answer())),
        json.dumps({**row(good, sc_answer(box=(300, 20, 10, 400))), "id": "bad-box"}),
        json.dumps(row(good, sc_answer(score=(20, 30)))),
        '{"messages": [this is not json',
        json.dumps(row(good, "{'edit_region': oops")),
        json.dumps(row(good, sc_answer(), n_tags=1)),
        json.dumps(row(good, sc_answer(box=(1.5, 2, 3, 4)))),
    ]
    path = root / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    # Rows that cannot be trained on at all (images, tags, the line itself) are skipped; rows whose
    # answer's fields do not parse still train verbatim and are counted apart.
    expected_skips = {"missing_image": 1, "bad_image": 1, "bad_json": 1, "image_count": 1}
    expected_unparsed = {"box_order": 1, "score_range": 1, "bad_json": 1, "bad_box": 1}
    return path, {"originals": originals, "skips": expected_skips, "unparsed": expected_unparsed}


def test_jsonl_import_keeps_good_records_and_counts_bad_ones(tmp_path):
    path, info = write_jsonl_fixture(tmp_path)
    stats = ImportStats()
    got = list(read_jsonl(path, stats))
    assert [e.task for e in got] == ["sc", "pq", "sc", "sc", "sc", "sc", "sc"]
    assert stats.read == 11 and dict(stats.skipped) == info["skips"]
    assert stats.parsed == 3 and dict(stats.unparsed) == info["unparsed"]
    sc, pq, sharegpt, bad_box = got[:4]
    assert sc.id == "good-sc" and pq.id == "data.jsonl:2" and sharegpt.id == "data.jsonl:4"
    assert sc.images == [info["originals"]["orig.png"], info["originals"]["edit.png"]]  # verbatim bytes
    assert sc.instruction == "Make the cat blue." and sc.meta["instruction_extracted"] is True
    assert sc.meta["prompt"].startswith("<image><image>Image 1") and sc.meta["verbatim"] is True
    assert sc.meta["answer"] == sc_answer() and sc.meta["answer_parsed"] is True  # the text as given
    assert sc.edit_region == [Region(0, "cat", (10, 20, 300, 400))] and sc.score == (20.0, 24.0)
    assert pq.score == (25.0, 24.0) and pq.reasoning == "clean" and pq.instruction == ""
    assert pq.meta["answer"].startswith("```json\n")
    assert sharegpt.edit_region[0].bbox_2d == (0, 0, 5, 5)
    assert bad_box.id == "bad-box" and bad_box.meta["answer_parsed"] is False and bad_box.edit_region == []
    assert bad_box.meta["parse_error"] == "box_order" and bad_box.meta["answer"] == sc_answer(box=(300, 20, 10, 400))

    out = tmp_path / "out.array_record"
    stats = import_records("jsonl", path, out)
    assert stats.written == 7 and list(ArrayRecordSource(out)) == got
    assert "answers parsed 3" in stats.summary()

    strict_fields = ImportOptions(require_parsed=True)
    stats = ImportStats()
    assert len(list(read_jsonl(path, stats, strict_fields))) == 3
    assert dict(stats.skipped) == {"missing_image": 1, "bad_image": 1, "box_order": 1, "score_range": 1,
                                   "bad_json": 2, "image_count": 1, "bad_box": 1}  # fmt: skip


def test_jsonl_strict_mode_names_record_and_line(tmp_path):
    path, _ = write_jsonl_fixture(tmp_path)
    with pytest.raises(RecordError) as err:
        list(read_jsonl(path, opts=ImportOptions(strict=True)))
    assert err.value.reason == "missing_image" and "data.jsonl:5" in str(err.value)
    assert str(err.value).count("record data.jsonl:5:") == 1  # the prefix once, not "record X: record X:"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], lines[6]]) + "\n")
    with pytest.raises(RecordError, match=r"record bad-box: .*data\.jsonl:2") as err:
        list(read_jsonl(path, opts=ImportOptions(strict=True, require_parsed=True)))
    assert str(err.value).count("record bad-box") == 1


def test_released_sft_row_shapes_are_all_kept_verbatim(tmp_path):
    """The shapes LLaMA-Factory accepts: image/images (one or a list), messages/conversations,
    role/from, content/value, a system turn, several exchanges; answers kept as given."""
    for name, colour in (("a.png", "red"), ("b.png", "blue"), ("c.png", "green")):
        (tmp_path / name).write_bytes(png(colour))
    quoted = '<image><image>Image 1 is the original; image 2 is it edited with this instruction: Change the text "OPEN" to “CLOSED”\nJudge it.'
    thinking = "<think>\nThe sign now reads CLOSED.\n</think>\n\n" + sc_answer()
    rows = [
        {"image": ["a.png", "b.png"], "messages": [{"role": "user", "content": quoted},
                                                   {"role": "assistant", "content": thinking}]},
        {"image": "c.png", "conversations": [{"from": "system", "value": "You rate images."},
                                             {"from": "human", "value": "Rate <image> please."},
                                             {"from": "gpt", "value": "It looks fine to me."}]},
        {"images": ["a.png", "b.png", "c.png"], "system": "Be brief.", "messages": [
            {"role": "user", "content": "Originals <image> and <image>."}, {"role": "assistant", "content": "Seen."},
            {"role": "user", "content": "Edited <image>. Instruction: “Put a hat on the dog”"},
            {"role": "assistant", "content": sc_answer()}]},
        {"image": "a.png", "images": "b.png", "messages": row(["a.png"], sc_answer())["messages"]},  # differ
        {"image": ["a.png", "b.png"], "messages": list(reversed(row(["a.png", "b.png"], sc_answer())["messages"]))},
        {"image": "a.png", "messages": [{"role": "user", "content": "<image>Rate."}]},  # no answer
        {"image": "a.png", "messages": [{"role": "user", "content": "<image>Rate."},
                                        {"role": "observation", "content": "x"}]},
    ]
    (tmp_path / "sft").mkdir()
    for r in rows:
        for key in ("image", "images"):
            if key in r:
                r[key] = [f"../{p}" for p in r[key]] if isinstance(r[key], list) else f"../{r[key]}"
    path = tmp_path / "sft" / "data.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    stats = ImportStats()
    quoted_row, single, multi = list(read_jsonl(path, stats))
    assert dict(stats.skipped) == {"bad_image": 1, "bad_messages": 3}
    assert stats.parsed == 2 and dict(stats.unparsed) == {"bad_json": 1}

    assert quoted_row.meta["prompt"] == quoted and quoted_row.meta["answer"] == thinking
    assert quoted_row.instruction == 'Change the text "OPEN" to “CLOSED”' and quoted_row.meta["answer_parsed"]
    assert quoted_row.score == (20.0, 24.0) and len(quoted_row.images) == 2  # parsed past the think block
    assert single.task == "pq" and single.meta["system"] == "You rate images." and len(single.images) == 1
    assert single.meta["answer"] == "It looks fine to me." and single.meta["answer_parsed"] is False
    assert multi.meta["history"] == [["Originals <image> and <image>.", "Seen."]] and multi.meta["system"] == "Be brief."
    assert multi.meta["prompt"].startswith("Edited <image>.") and multi.instruction == "Put a hat on the dog"
    assert [bytes(i) for i in multi.images] == [png("red"), png("blue"), png("green")]


def test_instruction_extractor_keeps_quoted_text():
    pats = DEFAULT_INSTRUCTION_PATTERNS
    assert extract_instruction('Instruction: Change the text "OPEN" to "CLOSED"\nRate it.', pats) == 'Change the text "OPEN" to "CLOSED"'
    assert extract_instruction("Instruction: Change the text “OPEN” to “CLOSED”", pats) == "Change the text “OPEN” to “CLOSED”"
    assert extract_instruction("The instruction: “make it blue”\n", pats) == "make it blue"
    assert extract_instruction('The editing instruction is "Replace "A" with "B"". Rate it.', pats) == 'Replace "A" with "B"'
    assert extract_instruction("The instruction is “make the sky ‘stormy’”. Go.", pats) == "make the sky ‘stormy’"
    # The official prompts' shape: the instruction alone on the line after the label.
    assert extract_instruction('Rate the edit.\nEditing instruction: \nChange the text "OPEN" to "CLOSED"', pats) == 'Change the text "OPEN" to "CLOSED"'


def _lines_fixture(root: Path) -> tuple[Path, list[bytes]]:
    (root / "a.png").write_bytes(png("red"))
    good = json.dumps(row(["a.png", "a.png"], sc_answer())).encode()
    huge_score = sc_answer().replace("[20, 24]", "[1" + "0" * 400 + ", 3]").encode()
    huge_box = sc_answer().replace("300", "9" * 400).encode()
    lines = [
        good,
        b'{"messages": "caf\xe9 \xff"}',  # not UTF-8
        b"[" * 100000 + b"]" * 100000,  # nested too deep
        b'{"id": ' + b"7" * 5000 + b"}",  # an integer past the 4300-digit limit
        json.dumps(row(["a.png", "a.png"], "ANSWER")).encode().replace(b'"ANSWER"', json.dumps(huge_score.decode()).encode()),
        json.dumps(row(["a.png", "a.png"], "ANSWER")).encode().replace(b'"ANSWER"', json.dumps(huge_box.decode()).encode()),
        json.dumps(row(["a.png", "a.png"], sc_answer(score=(1e400, 2)).replace("Infinity", "1e400"))).encode(),
        good,
    ]
    path = root / "hostile.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path, lines


def test_every_jsonl_row_is_isolated(tmp_path):
    path, _ = _lines_fixture(tmp_path)
    stats = ImportStats()
    got = list(read_jsonl(path, stats))
    assert len(got) == 5 and stats.read == 8
    assert dict(stats.skipped) == {"bad_utf8": 1, "bad_json": 2}
    # Answers whose numbers overflow a float still train verbatim; their fields are left unset.
    assert stats.parsed == 2 and dict(stats.unparsed) == {"score_range": 2, "box_range": 1}
    assert all(e.meta["answer_parsed"] is False for e in got[1:4])
    out = tmp_path / "o.array_record"
    assert import_records("jsonl", path, out).written == 5 and len(ArrayRecordSource(out)) == 5
    stats = ImportStats()
    assert len(list(read_jsonl(path, stats, ImportOptions(require_parsed=True)))) == 2
    assert dict(stats.skipped) == {"bad_utf8": 1, "bad_json": 2, "score_range": 2, "box_range": 1}


@pytest.mark.parametrize("bad_line", range(2, 8))
def test_each_hostile_line_costs_only_itself(tmp_path, bad_line):
    path, lines = _lines_fixture(tmp_path)
    path.write_bytes(b"\n".join([lines[0], lines[bad_line - 1], lines[0]]) + b"\n")
    stats = ImportStats()
    got = list(read_jsonl(path, stats))
    assert stats.read == 3 and [e.id for e in got if e.meta["answer_parsed"]] == ["hostile.jsonl:1", "hostile.jsonl:3"]


@pytest.mark.parametrize("bad_line, reason", [(2, "bad_utf8"), (3, "bad_json"), (4, "bad_json")])
def test_strict_import_names_the_bad_line_once(tmp_path, bad_line, reason):
    path, lines = _lines_fixture(tmp_path)
    path.write_bytes(lines[0] + b"\n" + lines[bad_line - 1] + b"\n")
    with pytest.raises(RecordError) as err:
        list(read_jsonl(path, opts=ImportOptions(strict=True)))
    assert err.value.reason == reason and err.value.record_id == "hostile.jsonl:2"
    assert str(err.value).startswith("record hostile.jsonl:2: ") and str(err.value).count("record ") == 1
    assert str(err.value).endswith(f"[{path}:2]")


def test_failed_import_leaves_the_existing_output_untouched(tmp_path, capsys):
    path, info = write_jsonl_fixture(tmp_path)
    out = tmp_path / "out" / "data.array_record"
    n = import_records("jsonl", path, out).written
    before = out.read_bytes()
    # Strict stops at line 5 after writing two records: the old file must survive whole.
    assert main(["data", "import", "--format", "jsonl", "--src", str(path), "--out", str(out), "--strict"]) == 1
    assert "data.jsonl:5" in capsys.readouterr().err
    assert out.read_bytes() == before and len(ArrayRecordSource(out)) == n
    assert sorted(p.name for p in out.parent.iterdir()) == ["data.array_record"]  # no temporary left

    def failing():
        yield from list(ArrayRecordSource(out))[:2]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_array_record(out, failing())
    assert out.read_bytes() == before and sorted(p.name for p in out.parent.iterdir()) == ["data.array_record"]


def test_unmatched_instruction_falls_back_to_the_prompt(tmp_path):
    (tmp_path / "a.png").write_bytes(png("red"))
    r = row(["a.png", "a.png"], sc_answer())
    r["messages"][0]["content"] = "<image><image>please turn the cat blue"
    (tmp_path / "d.jsonl").write_text(json.dumps(r) + "\n")
    (e,) = read_jsonl(tmp_path / "d.jsonl")
    assert e.instruction == "please turn the cat blue" and e.meta["instruction_extracted"] is False
    custom = ImportOptions(instruction_patterns=(r"please (?P<instruction>.+)",))
    (e,) = read_jsonl(tmp_path / "d.jsonl", opts=custom)
    assert e.instruction == "turn the cat blue"


def test_instruction_extraction_reads_our_own_templates():
    for name in ("sc.txt", "sc_multi.txt"):
        text = (REPO / "configs" / "prompts" / name).read_text().replace("{instruction}", "Put a hat on the dog.")
        assert extract_instruction("<image><image>" + text, DEFAULT_INSTRUCTION_PATTERNS) == "Put a hat on the dog."
    assert extract_instruction('The editing instruction is "add a hat". Rate it.', DEFAULT_INSTRUCTION_PATTERNS) == "add a hat"


def test_parquet_import_with_image_structs(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "e.png").write_bytes(png("blue"))
    a, b = png("red"), png("blue")
    rows = [
        row([{"bytes": a, "path": "a.png"}, {"bytes": None, "path": "e.png"}], sc_answer()),
        row([{"bytes": a, "path": None}, {"bytes": b"\x89PNGbroken", "path": None}], sc_answer()),
        row([{"bytes": a, "path": None}, {"bytes": None, "path": "nowhere.png"}], sc_answer()),
        row([{"bytes": a, "path": None}, {"bytes": b, "path": None}], sc_answer(score=(-1, 3))),
    ]
    schema = pa.schema([
        ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        ("images", pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))),
    ])  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp_path / "t.parquet")
    stats = ImportStats()
    got = list(read_parquet(tmp_path / "t.parquet", stats))
    assert len(got) == 2 and got[0].images == [a, b] and got[0].id == "t.parquet#0"
    assert dict(stats.skipped) == {"bad_image": 1, "missing_image": 1}
    assert got[1].id == "t.parquet#3" and dict(stats.unparsed) == {"score_range": 1}
    with pytest.raises(RecordError, match=r"t\.parquet#1.*row 1"):
        list(read_parquet(tmp_path / "t.parquet", opts=ImportOptions(strict=True)))


# ---------------------------------------------------------------- CLI + synthdir


def test_parse_splits():
    assert parse_splits("train=0.8,validation=0.1,test=5", 100) == {"train": 80, "validation": 10, "test": 5}
    for bad in ("train", "train=x", "train=1.5", ""):
        with pytest.raises(ValueError):
            parse_splits(bad, 10)


def test_synth_import_and_inspect_commands(tmp_path, capsys):
    out = tmp_path / "synth"
    code = main(["data", "synth", "--out", str(out), "--n", "10", "--seed", "3",
                 "--splits", "train=6,validation=0.2,test=2", "--image-size", "48,64"])  # fmt: skip
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert {k: v["count"] for k, v in manifest["splits"].items()} == {"train": 6, "validation": 2, "test": 2}
    assert manifest["config"]["image_size"] == [48, 64]
    expected = list(generate_examples(6, 3, "train", image_size=(48, 64)))
    assert list(ArrayRecordSource(out / "train.array_record")) == expected

    # A corrupt file and an invalid record listed in the manifest are skipped and counted.
    bad = expected[0].__class__(**{**expected[0].__dict__, "id": "broken", "score": (99.0, 1.0)})
    write_array_record(out / "extra.array_record", [bad], validate=False)
    manifest["splits"]["extra"] = {"file": "extra.array_record", "count": 1}
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert main(["data", "import", "--format", "synthdir", "--src", str(out), "--out", str(tmp_path / "all.array_record")]) == 0
    assert "read 11, kept 10, skipped 1 (score_range=1)" in capsys.readouterr().out
    assert main(["data", "import", "--format", "synthdir", "--src", str(out), "--strict",
                 "--out", str(tmp_path / "s.array_record")]) == 1  # fmt: skip
    assert "record broken" in capsys.readouterr().err
    assert main(["data", "import", "--format", "synthdir", "--src", str(out), "--split", "test",
                 "--out", str(tmp_path / "test.array_record")]) == 0  # fmt: skip
    assert len(ArrayRecordSource(tmp_path / "test.array_record")) == 2

    assert main(["data", "inspect", str(tmp_path / "all.array_record"), "--token-sample", "2"]) == 0
    text = capsys.readouterr().out
    every = list(ArrayRecordSource(tmp_path / "all.array_record"))
    n_sc = sum(e.task == "sc" for e in every)
    assert "10 records in 1 file(s)" in text
    assert f"sc={n_sc}" in text and "image long side: <128: " in text


def test_tfds_builder_round_trip(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    from sr_jax.data.tfds_builder import SynthBuilderConfig, build, load_split

    config = SynthBuilderConfig(name="tiny", seed=3, image_size=(48, 64), split_sizes=(("train", 4), ("test", 2)))
    builder = build(str(tmp_path), config)
    for split, n in config.split_sizes:
        got = sorted(load_split(builder, split), key=lambda e: e.id)
        assert got == list(generate_examples(n, 3, split, image_size=(48, 64)))  # bytes, boxes, meta


def test_lone_surrogates_skip_the_row_and_unparsed_rows_give_no_eval_truth(tmp_path):
    from sr_jax.eval.benchmarks import SyntheticBench

    (tmp_path / "a.png").write_bytes(png("red"))
    bad = row(["a.png", "a.png"], sc_answer())
    bad["messages"][0]["content"] += "\ud800"
    rows = [row(["a.png", "a.png"], sc_answer()), bad, row(["a.png", "a.png"], "no JSON here")]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    stats = ImportStats()
    got = list(read_jsonl(tmp_path / "d.jsonl", stats))
    assert dict(stats.skipped) == {"bad_utf8": 1} and len(got) == 2
    bench = SyntheticBench(got)
    assert [r["id"] for r in bench.records] == ["d.jsonl:1"] and bench.skipped_unparsed == 1
