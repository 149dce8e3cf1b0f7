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

REPO = Path(__file__).resolve().parents[1]


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
    with pytest.raises(RecordError, match=r"bad\.array_record#1"):
        source[1]


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
    expected_skips = {"missing_image": 1, "bad_image": 1, "box_order": 1, "score_range": 1, "bad_json": 2,
                      "image_count": 1, "bad_box": 1}  # fmt: skip
    return path, {"originals": originals, "skips": expected_skips}


def test_jsonl_import_keeps_good_records_and_counts_bad_ones(tmp_path):
    path, info = write_jsonl_fixture(tmp_path)
    stats = ImportStats()
    got = list(read_jsonl(path, stats))
    assert [e.task for e in got] == ["sc", "pq", "sc"]
    assert stats.read == 11 and dict(stats.skipped) == info["skips"]
    sc, pq, sharegpt = got
    assert sc.id == "good-sc" and pq.id == "data.jsonl:2" and sharegpt.id == "data.jsonl:4"
    assert sc.images == [info["originals"]["orig.png"], info["originals"]["edit.png"]]  # verbatim bytes
    assert sc.instruction == "Make the cat blue." and sc.meta["instruction_extracted"] is True
    assert sc.meta["prompt"].startswith("<image><image>Image 1")
    assert sc.edit_region == [Region(0, "cat", (10, 20, 300, 400))] and sc.score == (20.0, 24.0)
    assert pq.score == (25.0, 24.0) and pq.reasoning == "clean" and pq.instruction == ""
    assert sharegpt.edit_region[0].bbox_2d == (0, 0, 5, 5)

    out = tmp_path / "out.array_record"
    stats = import_records("jsonl", path, out)
    assert stats.written == 3 and list(ArrayRecordSource(out)) == got


def test_jsonl_strict_mode_names_record_and_line(tmp_path):
    path, _ = write_jsonl_fixture(tmp_path)
    with pytest.raises(RecordError) as err:
        list(read_jsonl(path, opts=ImportOptions(strict=True)))
    assert err.value.reason == "missing_image" and "data.jsonl:5" in str(err.value)
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], lines[6]]) + "\n")
    with pytest.raises(RecordError, match=r"record bad-box: .*data\.jsonl:2"):
        list(read_jsonl(path, opts=ImportOptions(strict=True)))


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
    assert len(got) == 1 and got[0].images == [a, b] and got[0].id == "t.parquet#0"
    assert dict(stats.skipped) == {"bad_image": 1, "missing_image": 1, "score_range": 1}
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
