"""The Grain pipeline: fixed bucket shapes, packing equals separate encoding (and the same
per-example loss through the model), bad records skipped and counted, resume, host sharding,
determinism, and independence of the worker count."""

import dataclasses
import io

import numpy as np
import pytest
from PIL import Image

from sr_jax.config import load_config
from sr_jax.data import Processor, RecordError
from sr_jax.data.packing import VISION_KEYS, vision_tuple
from sr_jax.data.pipeline import DataConfig, DataPipeline, truncate
from sr_jax.data.processor import IGNORE_INDEX
from sr_jax.data.storage import ARRAY_RECORD_OPTIONS, example_to_bytes, write_array_record
from sr_jax.data.synthetic import generate_examples
from sr_jax.models.qwen3_vl.config import VisionConfig
from sr_jax.special_tokens import IMAGE_PAD_ID

N_GOOD = 24
SMALL = "min_side=64,max_side=96"


@pytest.fixture(scope="module")
def proc(tokenizer):
    return Processor(tokenizer)


@pytest.fixture(scope="module")
def examples():
    return list(generate_examples(N_GOOD, seed=3, image_size=(64, 96)))


@pytest.fixture(scope="module")
def record_file(tmp_path_factory, examples):
    path = tmp_path_factory.mktemp("records") / "good.array_record"
    write_array_record(path, examples)
    return str(path)


@pytest.fixture(scope="module")
def encoded(proc, examples):
    return [proc.encode(e) for e in examples]


def run(cfg: DataConfig, proc, **kw):
    pipe = DataPipeline(cfg, processor=proc, process_index=kw.pop("process_index", 0),
                        process_count=kw.pop("process_count", 1), **kw)
    it = iter(pipe)
    batches = list(it)
    it.close()
    return batches, pipe.stats()


def segments(batch):
    """(row, start, length, record index) of every example in the batch, in flattened order."""
    out = []
    for r in range(batch["segment_ids"].shape[0]):
        seg = batch["segment_ids"][r]
        for s in range(1, seg.max() + 1):
            where = np.flatnonzero(seg == s)
            assert (np.diff(where) == 1).all(), "a segment must be contiguous"
            out.append((r, int(where[0]), len(where), int(batch["record_index"][r, s - 1])))
    return out


def check_batch_against_encodes(batch, encoded, vision_cfg):
    """Every segment equals its example encoded alone; patches follow flattened token order."""
    B, T = batch["input_ids"].shape
    patches, grids, ids_in_order = [], [], []
    for r, start, n, idx in segments(batch):
        enc = encoded[idx]
        span = slice(start, start + n)
        assert n == enc["input_ids"].shape[1]
        np.testing.assert_array_equal(batch["input_ids"][r, span], enc["input_ids"][0])
        np.testing.assert_array_equal(batch["position_ids"][:, r, span], enc["position_ids"][:, 0])
        np.testing.assert_array_equal(batch["attention_mask"][r, span], 1)
        want = enc["labels"][0].copy()
        assert want[0] == IGNORE_INDEX  # a prompt token starts every example
        np.testing.assert_array_equal(batch["labels"][r, span], want)
        patches.append(enc["pixel_values"])
        grids.append(enc["image_grid_thw"])
        ids_in_order.append(idx)
    real = batch["segment_ids"] > 0
    np.testing.assert_array_equal(batch["attention_mask"], real.astype(np.int32))
    assert (batch["labels"][~real] == IGNORE_INDEX).all()
    assert (batch["position_ids"][:, ~real] == 0).all()
    assert int(batch["num_examples"]) == len(ids_in_order)
    assert int(batch["num_label_tokens"]) == int((batch["labels"] != IGNORE_INDEX).sum())
    # Patches: concatenated in flattened token order, then zero padding up to the budget.
    p = int(batch["num_patches"])
    np.testing.assert_array_equal(batch["pixel_values"][:p], np.concatenate(patches))
    assert not batch["pixel_values"][p:].any()
    grid = np.concatenate(grids)
    np.testing.assert_array_equal(batch["image_grid_thw"], grid)
    assert int((batch["input_ids"] == IMAGE_PAD_ID).sum()) * 4 == p == int(grid.prod(1).sum())
    # Vision tables: those of the images in order, padding patches in one extra segment.
    from sr_jax.models.qwen3_vl.vision import vision_inputs

    want = vision_inputs(grid, vision_cfg)
    for key, table in zip(VISION_KEYS, want.as_tuple()):
        np.testing.assert_array_equal(batch[key][:p], table)
    seg = batch["vision_segment"]
    assert (seg[p:] == len(grid)).all() and (np.diff(seg[:p]) >= 0).all() and seg[p - 1] == len(grid) - 1
    assert not batch["vision_interp_weight"][p:].any()
    return ids_in_order


def test_pad_mode_uses_the_smallest_fitting_bucket(proc, record_file, encoded):
    cfg = DataConfig(sources=[record_file], batch_size=3, seq_lens=[256, 384, 512], patch_budgets=[512, 768, 1024],
                     shuffle=True, seed=1)
    batches, stats = run(cfg, proc)
    assert stats == {}
    seen = []
    for batch in batches:
        B, T = batch["input_ids"].shape
        P = batch["pixel_values"].shape[0]
        assert B == 3 and (T, P) in [(256, 512), (384, 768), (512, 1024)]
        longest = batch["attention_mask"].sum(1).max()
        smaller = [(t, b) for t, b in zip(cfg.seq_lens, cfg.patch_budgets) if t < T]
        assert longest <= T and not any(longest <= t and int(batch["num_patches"]) <= b for t, b in smaller)
        assert batch["record_index"].shape == (3, 1) and batch["segment_ids"].max() <= 1
        seen += check_batch_against_encodes(batch, encoded, VisionConfig())
    assert sorted(seen) == list(range(N_GOOD))
    assert len({b["input_ids"].shape[1] for b in batches}) > 1, "the data should exercise several buckets"


def test_packed_rows_equal_separately_encoded_examples(proc, record_file, encoded):
    vision = VisionConfig(num_position_embeddings=64)
    cfg = DataConfig(sources=[record_file], mode="pack", batch_size=2, seq_lens=[1024], patch_budgets=[1200],
                     max_segments=4)
    batches, _ = run(cfg, proc, vision=vision)
    seen = []
    for batch in batches:
        assert batch["input_ids"].shape == (2, 1024) and batch["pixel_values"].shape == (1200, 1536)
        assert batch["record_index"].shape == (2, 4)
        assert int(batch["num_patches"]) <= 1200
        seen += check_batch_against_encodes(batch, encoded, vision)
    assert sorted(seen) == list(range(N_GOOD))
    assert max(int(b["num_examples"]) for b in batches) > 2, "rows should hold several examples"
    assert any(b["segment_ids"].max() == 4 for b in batches), "max_segments should bind"

    # The model's attention mask built from these ids joins tokens of one segment only.
    from sr_jax.models.qwen3_vl.text import attention_mask_3d

    b = batches[0]
    mask = np.asarray(attention_mask_3d(b["attention_mask"], b["segment_ids"]))
    seg = b["segment_ids"]
    same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] > 0)
    causal = np.tril(np.ones(mask.shape[1:], bool))
    np.testing.assert_array_equal(mask, same & causal)


def test_patch_budget_starts_a_new_batch(proc, record_file, encoded):
    cfg = DataConfig(sources=[record_file], mode="pack", batch_size=4, seq_lens=[2048], patch_budgets=[400],
                     shuffle=False)
    batches, _ = run(cfg, proc)
    assert all(int(b["num_patches"]) <= 400 for b in batches)
    # The budget, not the rows, closes batches: the next example would have overflowed it.
    order = [i for b in batches for i in check_batch_against_encodes(b, encoded, VisionConfig())]
    assert sorted(order) == list(range(N_GOOD))
    patches = [encoded[i]["pixel_values"].shape[0] for i in range(N_GOOD)]
    for b, nxt in zip(batches, batches[1:]):
        first_next = segments(nxt)[0][3]
        assert int(b["num_patches"]) + patches[first_next] > 400


def png(size=(64, 64), colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def non_utf8_record(example) -> bytes:
    marker = "QQQQQQQQ"
    data = example_to_bytes(dataclasses.replace(example, instruction=f"Make it {marker} blue."))
    assert data.count(marker.encode()) == 1
    return data.replace(marker.encode(), b"\xff\xfe\xfd\xfc\xfb\xfa\xf9\xf8")


def bad_records(good, tmp_path):
    """(raw record bytes, expected reason) for every kind of bad record that can be stored."""
    sc = next(e for e in good if e.task == "sc" and e.edit_region)
    img = sc.images[0]
    rep = dataclasses.replace
    region = sc.edit_region[0]
    cases = [
        (rep(sc, id="corrupt", images=[b"definitely not an image", img]), "bad_image"),
        (rep(sc, id="truncated", images=[img[: len(img) // 2], img]), "bad_image"),
        (rep(sc, id="missing", images=[str(tmp_path / "nope.png"), img]), "missing_image"),
        (rep(sc, id="one-image-sc", images=[img]), "image_count"),
        (rep(sc, id="box-range", edit_region=[rep(region, bbox_2d=(0, 0, 1200, 50))]), "box_range"),
        (rep(sc, id="box-order", edit_region=[rep(region, bbox_2d=(500, 0, 400, 50))]), "box_order"),
        (rep(sc, id="score-range", score=(30, 5)), "score_range"),
        (rep(sc, id="score-three", score=(1, 2, 3)), "bad_score"),
        (rep(sc, id="score-text", score=("high", 2)), "bad_score"),
        (rep(sc, id="empty-instruction", instruction="  "), "empty_instruction"),
    ]
    raw = [(example_to_bytes(ex), reason) for ex, reason in cases]
    raw.append((non_utf8_record(rep(sc, id="non-utf8")), "bad_utf8"))
    raw.append((b"\x93garbage", "bad_record"))
    return raw


@pytest.fixture(scope="module")
def mixed_file(tmp_path_factory, examples):
    """Good examples with every kind of bad record interleaved; returns (path, expected stats)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    root = tmp_path_factory.mktemp("mixed")
    bad = bad_records(examples, root)
    path = root / "mixed.array_record"
    writer = ArrayRecordWriter(str(path), ARRAY_RECORD_OPTIONS)
    expected = {}
    for i, ex in enumerate(examples[:12]):
        writer.write(example_to_bytes(ex))
        if i < len(bad):
            writer.write(bad[i][0])
            expected[bad[i][1]] = expected.get(bad[i][1], 0) + 1
    for data, reason in bad[12:]:
        writer.write(data)
        expected[reason] = expected.get(reason, 0) + 1
    writer.close()
    return str(path), expected


def test_bad_records_are_skipped_and_counted_also_with_workers(proc, mixed_file, encoded):
    path, expected = mixed_file
    assert set(expected) >= {"bad_image", "missing_image", "image_count", "box_range", "box_order", "score_range",
                             "bad_score", "empty_instruction", "bad_utf8", "bad_record"}
    by_index = {2 * k: encoded[k] for k in range(12)}  # good example k sits at record 2k of the file
    cfg = DataConfig(sources=[path], batch_size=4, seq_lens=[512], patch_budgets=[1600], seed=5)
    for workers in (0, 2):
        # With workers the skip markers ride along with the batches to the main process.
        batches, stats = run(dataclasses.replace(cfg, workers=workers), proc)
        assert stats == expected
        seen = [i for b in batches for i in check_batch_against_encodes(b, by_index, VisionConfig())]
        assert sorted(seen) == sorted(by_index)


def test_surrogate_text_is_skipped_in_memory_records(proc, tmp_path, examples):
    # A str with a lone surrogate cannot be stored; it can still come from a synthetic/in-memory source.
    from sr_jax.data.pipeline import EncodeStep, Sources

    sc = next(e for e in examples if e.task == "sc")
    in_memory = [dataclasses.replace(sc, id="surrogate", instruction="Make it \udcff blue."),
                 dataclasses.replace(sc, id="verbatim-surrogate", meta={  # the texts a verbatim record trains on
                     "verbatim": True, "prompt": "<image><image>Rate.", "answer": "Fine \udcff."})]

    class Memory:
        def __len__(self):
            return 2

        def fetch(self, i):
            return in_memory[i]

    sources = Sources([f"synthetic:n=1,{SMALL}"])
    sources.parts = [Memory()]
    sources.offsets = np.cumsum([0, len(in_memory)])
    step = EncodeStep(sources, proc, 2048, 10**6, "drop")
    out = step(0)
    assert out["skip"] == "bad_utf8" and out["id"] == "surrogate"
    out = step(1)
    assert out["skip"] == "bad_utf8" and out["id"] == "verbatim-surrogate", out


def test_strict_mode_raises_with_the_record_id(proc, mixed_file):
    path, _ = mixed_file
    cfg = DataConfig(sources=[path], batch_size=4, seq_lens=[512], patch_budgets=[1600], shuffle=False, strict=True)
    with pytest.raises(RecordError) as err:
        run(cfg, proc)
    assert err.value.record_id == "corrupt" and "corrupt" in str(err.value)
    assert err.value.reason == "bad_image"


def test_too_long_drop_or_truncate(proc, record_file, encoded):
    lengths = [e["input_ids"].shape[1] for e in encoded]
    limit = int(np.percentile(lengths, 60))
    n_long = sum(n > limit for n in lengths)
    base = DataConfig(sources=[record_file], batch_size=4, seq_lens=[limit], patch_budgets=[4000], shuffle=False)
    dropped, stats = run(base, proc)
    assert stats == {"too_long": n_long}
    assert sum(int(b["num_examples"]) for b in dropped) == N_GOOD - n_long

    pipe = DataPipeline(dataclasses.replace(base, too_long="truncate"), processor=proc, process_index=0,
                        process_count=1)
    it = iter(pipe)
    kept = list(it)
    # Truncation never cuts an image (the text after the images is long, so all are kept here).
    assert pipe.stats() == {} and it.counters()["truncated"] == n_long
    for batch in kept:
        for r, start, n, idx in segments(batch):
            full = encoded[idx]
            assert n == min(lengths[idx], limit)
            np.testing.assert_array_equal(batch["input_ids"][r, start:start + n], full["input_ids"][0, :n])
            np.testing.assert_array_equal(batch["position_ids"][:, r, start:start + n], full["position_ids"][:, 0, :n])
            np.testing.assert_array_equal(batch["labels"][r, start + 1:start + n], full["labels"][0, 1:n])


def test_truncate_refuses_to_cut_an_image_or_every_label():
    ids = np.array([1, 5, 7, 7, 6, 2, 3, 4], np.int32)  # 5 = vision start, 7 = image pad, 6 = vision end
    labels = np.array([-100] * 6 + [3, 4], np.int32)
    ex = {"input_ids": ids, "labels": labels, "position_ids": np.tile(np.arange(8, dtype=np.int32), (3, 1))}
    assert truncate(ex, 4, (5, 6, 7)) is None  # would cut the vision end
    assert truncate(ex, 6, (5, 6, 7)) is None  # images fit, no label left
    cut = truncate(ex, 7, (5, 6, 7))
    np.testing.assert_array_equal(cut["input_ids"], ids[:7])
    np.testing.assert_array_equal(cut["position_ids"], ex["position_ids"][:, :7])


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.mark.parametrize("mode,workers", [("pad", 0), ("pack", 0), ("pack", 2)])
def test_resume_mid_epoch_yields_the_same_batches(proc, mixed_file, mode, workers):
    path, expected = mixed_file
    cfg = DataConfig(sources=[path, f"synthetic:n=6,seed=9,{SMALL}"], mode=mode, batch_size=2,
                     seq_lens=[1024] if mode == "pack" else [512, 1024], patch_budgets=[800] if mode == "pack" else [],
                     num_epochs=2, workers=workers, seed=11)
    pipe = DataPipeline(cfg, processor=proc, process_index=0, process_count=1)
    it = iter(pipe)
    head = [next(it) for _ in range(5)]
    state = it.get_state()
    tail = list(it)
    final_stats = it.stats()
    it.close()
    assert head and tail and final_stats == {k: 2 * v for k, v in expected.items()}

    import json

    state = json.loads(json.dumps(state))  # checkpoints store the state as JSON
    again = iter(pipe)
    again.set_state(state)
    resumed = list(again)
    assert again.stats() == final_stats
    again.close()
    assert_same_batches(tail, resumed)


def test_hosts_get_disjoint_shards_covering_the_data(proc, record_file):
    cfg = DataConfig(sources=[record_file], batch_size=4, seq_lens=[1024], patch_budgets=[2000], seed=2)
    shards = []
    for host in range(2):
        batches, _ = run(cfg, proc, process_index=host, process_count=2)
        shards.append([int(i) for b in batches for i in b["record_index"].ravel() if i >= 0])
    assert len(shards[0]) == len(shards[1]) == N_GOOD // 2
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == list(range(N_GOOD))


def test_order_is_determined_by_the_seed(proc, record_file):
    def order(seed, epochs=1):
        cfg = DataConfig(sources=[record_file], batch_size=4, seq_lens=[1024], patch_budgets=[2000], seed=seed,
                         num_epochs=epochs)
        batches, _ = run(cfg, proc)
        return [int(i) for b in batches for i in b["record_index"].ravel() if i >= 0]

    a, b, c = order(7), order(7), order(8)
    assert a == b and a != c and sorted(a) == sorted(c) == list(range(N_GOOD))
    two = order(7, epochs=2)
    assert two[:N_GOOD] == a and sorted(two[N_GOOD:]) == sorted(a) and two[N_GOOD:] != a  # reshuffled per epoch


def test_config_loads_from_yaml(tmp_path):
    path = tmp_path / "data.yaml"
    path.write_text("sources: [synthetic:n=8]\nmode: pack\nseq_lens: [2048]\nnum_epochs: null\n"
                    "templates: {pq: my_pq.txt}\n")
    cfg = load_config(DataConfig, path, ["batch_size=2", "too_long=truncate"])
    assert cfg.mode == "pack" and cfg.seq_lens == [2048] and cfg.num_epochs is None and cfg.batch_size == 2
    assert cfg.templates.pq == "my_pq.txt" and cfg.too_long == "truncate"
    assert [(b.seq_len, b.patch_budget) for b in cfg.buckets()] == [(2048, 4 * 2 * 2048)]
    with pytest.raises(ValueError, match="one seq_len"):
        dataclasses.replace(cfg, seq_lens=[512, 1024]).validate()
    with pytest.raises(ValueError, match="multiple of 4"):
        dataclasses.replace(cfg, patch_budgets=[1001]).validate()
    with pytest.raises(ValueError, match="needs n="):
        DataPipeline(DataConfig(sources=["synthetic:seed=1"]), processor=object(), process_index=0,
                     process_count=1)


def test_packed_batch_gives_the_per_example_loss_of_unpacked_examples(proc, examples, encoded):
    """End to end through the tiny model: packing changes nothing for any example's loss."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from sr_jax.models.qwen3_vl import ModelConfig, init_model, pad_patches, vision_inputs

    mcfg = ModelConfig.preset("tiny")
    model = init_model(mcfg, seed=0)
    T, P = 1024, 640
    cfg = DataConfig(sources=[f"synthetic:n=5,seed=3,{SMALL}"], mode="pack", batch_size=2, seq_lens=[T],
                     patch_budgets=[P], shuffle=False)
    batches, _ = run(cfg, proc, vision=mcfg.vision)
    batch = batches[0]
    check_batch_against_encodes(batch, encoded, mcfg.vision)  # source record i is example i
    assert int(batch["num_examples"]) >= 3 and batch["segment_ids"].max() >= 2

    @nnx.jit
    def hidden_states(model, ids, mask, pixels, positions, vision, segments):
        return model.features(ids, mask, pixels, position_ids=positions, vision=vision, segment_ids=segments).hidden

    def token_losses(hidden, labels):
        """Cross-entropy of each supervised next token: token t predicts labels[t + 1]."""
        targets = np.asarray(labels)[1:]
        where = np.flatnonzero(targets != IGNORE_INDEX)
        logp = jax.nn.log_softmax(model.logits(hidden[where]).astype(jnp.float32), axis=-1)
        return -np.asarray(jnp.take_along_axis(logp, jnp.asarray(targets[where])[:, None], -1)[:, 0])

    packed = hidden_states(model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                           batch["position_ids"], vision_tuple(batch), batch["segment_ids"])
    checked = 0
    for r, start, n, idx in segments(batch):
        # The example alone: its own row, no segment ids; trailing padding (masked, causal) and
        # padded patches (their own vision segment) only give every example one compiled shape.
        enc = encoded[idx]
        ids = np.zeros((1, T), np.int32)
        ids[0, :n] = enc["input_ids"][0]
        positions = np.zeros((3, 1, T), np.int32)
        positions[:, :, :n] = enc["position_ids"]
        pixels, vision = pad_patches(enc["pixel_values"], vision_inputs(enc["image_grid_thw"], mcfg.vision), P)
        alone = hidden_states(model, ids, (np.arange(T) < n)[None].astype(np.int32), pixels, positions,
                              vision.as_tuple(), None)
        want = token_losses(alone[0, :n], enc["labels"][0])
        got = token_losses(packed[r, start:start + n], batch["labels"][r, start:start + n])
        assert len(want) > 10 and np.isfinite(got).all()
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)
        checked += 1
    assert checked == int(batch["num_examples"])


def test_imported_verbatim_rows_train_through_the_pipeline(proc, tmp_path):
    """Rows imported from the released SFT shape: encoded from their own text (qwen3_vl layout under
    `auto`), packed like any record; `chat_template` reaches the pipeline's processor."""
    import json

    from sr_jax.data.importers import import_records
    from sr_jax.data.storage import ArrayRecordSource

    rng = np.random.default_rng(0)
    for k in range(3):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (64, 64 + 16 * k, 3), dtype=np.uint8)).save(buf, format="PNG")
        (tmp_path / f"{k}.png").write_bytes(buf.getvalue())
    answer = '{"reasoning": "fine", "score": [20, 21]}'
    rows = [
        {"image": ["0.png", "1.png"], "messages": [
            {"role": "user", "content": 'Before <image> after <image>. Instruction: Change "A" to "B"'},
            {"role": "assistant", "content": answer}]},
        {"image": "2.png", "conversations": [{"from": "system", "value": "Rate."}, {"from": "human", "value": "<image>?"},
                                            {"from": "gpt", "value": "<think>\nhm\n</think>\n\nnot json"}]},
    ]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "imported.array_record"
    assert import_records("jsonl", tmp_path / "data.jsonl", out).written == 2
    records = list(ArrayRecordSource(out))
    encoded = [proc.encode(e) for e in records]
    think = proc.tokenizer.encode("<think>\n\n</think>\n\n")
    sup = encoded[0]["labels"][0][encoded[0]["labels"][0] != IGNORE_INDEX]
    assert list(sup[: len(think)]) == think  # qwen3_vl: the empty think block is trained
    cfg = DataConfig(sources=[str(out)], batch_size=2, mode="pack", seq_lens=[512], shuffle=False)
    batches, stats = run(cfg, proc)
    assert stats == {} and sorted(i for b in batches for i in check_batch_against_encodes(b, encoded, VisionConfig())) == [0, 1]
    pipe = DataPipeline(dataclasses.replace(cfg, chat_template="qwen3_vl_nothink"), process_index=0, process_count=1)
    assert pipe.processor.chat_template == "qwen3_vl_nothink"
    with pytest.raises(ValueError, match="chat_template"):
        dataclasses.replace(cfg, chat_template="chatml").validate()
    # auto: LLaMA-Factory's image path, so 64x64 and 80x64 rise to the checkpoint's 65536-pixel
    # minimum (256x256 and 288x256), where the direct resize keeps them at 64x64 and 64x64.
    assert encoded[0]["image_grid_thw"].tolist() == [[1, 16, 16], [1, 16, 18]]
    settings = dict(image_resize="sr_jax", image_max_pixels=4096, image_min_pixels=64, processor_min_pixels=1024,
                    processor_max_pixels=8192)
    pipe = DataPipeline(dataclasses.replace(cfg, **settings), process_index=0, process_count=1)
    assert pipe.processor.image_resize == "sr_jax" and pipe.processor.llamafactory_pixels == (4096, 64, 1024, 8192)
    assert pipe.processor.encode(records[0])["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 4]]
    with pytest.raises(ValueError, match="image_resize"):
        dataclasses.replace(cfg, image_resize="pil").validate()
    with pytest.raises(ValueError, match="image_min_pixels 9 exceeds"):
        dataclasses.replace(cfg, image_min_pixels=9, image_max_pixels=8).validate()


def test_batch_layout_names_the_vision_tables_in_model_order():
    """`sr_jax.batch` is the one list of batch keys: the vision keys follow VisionInputs' fields
    (the model's `vision=` tuple), and every stage reads that same list."""
    import dataclasses

    from sr_jax import batch
    from sr_jax.data import packing
    from sr_jax.models.qwen3_vl.vision import VisionInputs
    from sr_jax.rl import grpo
    from sr_jax.train import step

    assert batch.VISION_KEYS == tuple(f"vision_{f.name}" for f in dataclasses.fields(VisionInputs))
    assert packing.VISION_KEYS is step.VISION_KEYS is grpo.VISION_KEYS is batch.VISION_KEYS
    assert set(batch.POLICY_KEYS) == set(batch.SFT_KEYS) - {"labels", "segment_ids"}


def test_shuffle_group_keeps_contrast_pairs_together(proc):
    """`shuffle_group: 2` shuffles pairs of consecutive records as units (a `failed_pairs` source's
    failed / done couples), every record once per epoch, reshuffled per epoch, whole pairs per host."""
    paired = f"synthetic:n=8,seed=5,{SMALL},tasks=sc,outcome_weights=0.4+0.1+0.35+0+0.15,failed_pairs=1"
    cfg = DataConfig(sources=[f"synthetic:n=6,seed=1,{SMALL}", paired], shuffle_group=2, batch_size=2,
                     seq_lens=[1024], patch_budgets=[2000], seed=3, num_epochs=2)

    def order(batches):
        return [int(i) for b in batches for i in b["record_index"].ravel() if i >= 0]

    stream = order(run(cfg, proc)[0])
    first, second = stream[:14], stream[14:]
    assert sorted(first) == sorted(second) == list(range(14)) and first != second
    assert all(a % 2 == 0 and b == a + 1 for a, b in zip(stream[::2], stream[1::2]))  # pairs adjacent, in order
    assert first != sorted(first)  # and shuffled
    hosts = [order(run(dataclasses.replace(cfg, num_epochs=1), proc, process_index=h, process_count=2)[0])
             for h in range(2)]
    assert sorted(hosts[0] + hosts[1]) == list(range(14)) and len(hosts[0]) == len(hosts[1]) + 2 == 8
    assert all(b == a + 1 for host in hosts for a, b in zip(host[::2], host[1::2]))
    with pytest.raises(ValueError, match=r"holds 7 records, not a multiple of data.shuffle_group 2"):
        DataPipeline(dataclasses.replace(cfg, sources=[f"synthetic:n=7,seed=1,{SMALL}", paired]), processor=proc,
                     process_index=0, process_count=1)
