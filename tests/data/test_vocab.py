"""Reduced vocabulary (sr_jax.data.vocab): the id mapping is exact, a missing token is an error
naming it, a compact model computes the full model's logits restricted to the kept rows, and a
compact run trains, saves, loads, generates (full ids out) and exports to transformers."""

import json
import pickle
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from tokenizers import Tokenizer, models

from hf_oracle import random_pixels
from sr_jax import load_model
from sr_jax.config import load_config
from sr_jax.convert.hf_export import export_hf
from sr_jax.data.pipeline import EncodeStep, Sources
from sr_jax.data.processor import IGNORE_INDEX, Processor
from sr_jax.data.tokenizer import load_tokenizer
from sr_jax.data.vocab import (
    VOCAB_MAP_FILE,
    VocabMap,
    VocabMissError,
    build_vocab_map,
    tokenizer_identity,
)
from sr_jax.generation import PAD_ID, generate
from sr_jax.models.qwen3_vl.config import ModelConfig
from sr_jax.models.qwen3_vl.model import init_model
from sr_jax.special_tokens import IM_END_ID, IMAGE_PAD_ID, VISION_END_ID, VISION_START_ID
from sr_jax.train.sft import SFTConfig, train

ROOT = Path(__file__).resolve().parents[2]
SOURCE = "synthetic:n=64,seed=3,split=train,min_side=48,max_side=64"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def test_round_trip_is_exact_on_random_kept_ids():
    rng = np.random.default_rng(0)
    kept = rng.choice(151669, 500, replace=False)
    vmap = VocabMap(kept, "t")
    assert list(vmap.ids) == sorted(kept) and len(vmap) == 500
    full = rng.choice(kept, (4, 37))
    compact = vmap.to_compact(full)
    assert compact.min() >= 0 and compact.max() < 500
    np.testing.assert_array_equal(vmap.to_full(compact), full)
    np.testing.assert_array_equal(vmap.to_compact(vmap.to_full(np.arange(500))), np.arange(500))
    # order kept: compact ids are ranks of the sorted kept ids
    np.testing.assert_array_equal(vmap.to_compact(np.sort(kept)), np.arange(500))
    labels = np.where(rng.random(full.shape) < 0.3, IGNORE_INDEX, full)
    mapped = vmap.to_compact(labels, keep=IGNORE_INDEX)
    assert ((mapped == IGNORE_INDEX) == (labels == IGNORE_INDEX)).all()
    np.testing.assert_array_equal(vmap.to_full(mapped[labels != IGNORE_INDEX]), labels[labels != IGNORE_INDEX])
    with pytest.raises(ValueError, match="outside the reduced vocabulary"):
        vmap.to_full([500])


def test_a_missing_token_raises_naming_it(tokenizer):
    hello = tokenizer.encode("hello")[0]
    world = tokenizer.encode(" world")[0]
    vmap = VocabMap([hello, IM_END_ID], tokenizer_identity(tokenizer), tokenizer=tokenizer)
    with pytest.raises(VocabMissError, match=rf"record ex-7: token id {world} \(' world'\)") as e:
        vmap.to_compact([[hello, world]], record_id="ex-7")
    assert e.value.token_id == world
    with pytest.raises(VocabMissError, match=f"token id {IMAGE_PAD_ID}"):
        vmap.to_compact([IMAGE_PAD_ID])
    assert vmap.to_compact([IM_END_ID, hello]).tolist() == [1, 0]


def test_pipeline_maps_ids_and_skips_a_record_with_a_missing_token(tokenizer):
    processor = Processor(tokenizer, 3136, 9216)
    sources = Sources([SOURCE])
    vmap = build_vocab_map([SOURCE], processor, samples_per_source=64)
    example = sources.fetch(5)
    plain = EncodeStep(sources, processor, 4096, 4096, "drop")(5)
    mapped = EncodeStep(sources, processor, 4096, 4096, "drop", vmap)(5)
    assert "input_ids" in mapped, mapped
    np.testing.assert_array_equal(vmap.to_full(mapped["input_ids"]), plain["input_ids"])
    labelled = plain["labels"] != IGNORE_INDEX
    assert ((mapped["labels"] == IGNORE_INDEX) == ~labelled).all()
    np.testing.assert_array_equal(vmap.to_full(mapped["labels"][labelled]), plain["labels"][labelled])
    # a map without one of this example's answer tokens: the record is skipped, naming the token
    answer_token = int(plain["labels"][labelled][3])
    smaller = VocabMap([i for i in vmap.ids if i != answer_token], vmap.tokenizer_sha256, tokenizer=tokenizer)
    skipped = EncodeStep(sources, processor, 4096, 4096, "drop", smaller)(5)
    assert skipped.get("id") == example.id and f"token id {answer_token}" in skipped["message"], skipped


def test_map_file_round_trip_and_tokenizer_identity(tmp_path, tokenizer):
    processor = Processor(tokenizer, 3136, 9216)
    vmap = build_vocab_map([SOURCE], processor, samples_per_source=16)
    # specials, every printable ASCII character, and the image/vision ids are always kept
    for full in (IMAGE_PAD_ID, VISION_START_ID, VISION_END_ID, IM_END_ID, PAD_ID):
        assert vmap.contains([full])[0]
    for text in ("0123456789", '{"a": [1, 0.5]}', "Ab-Z_!?"):
        for ch in text:
            assert vmap.contains(tokenizer.encode(ch)).all(), ch
    path = vmap.save(tmp_path)
    assert path.name == VOCAB_MAP_FILE and json.loads(path.read_text())["size"] == len(vmap)
    back = VocabMap.load(tmp_path, tokenizer)
    assert back == vmap and hash(back) == hash(vmap)
    shipped = pickle.loads(pickle.dumps(back))  # as data-pipeline worker processes receive it
    assert shipped == back and shipped.to_compact([IM_END_ID]) == back.to_compact([IM_END_ID])
    other = Tokenizer(models.WordLevel({"a": 0, "b": 1}, unk_token="a"))
    with pytest.raises(ValueError, match="made for tokenizer"):
        VocabMap.load(path, other)
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "ids": data["ids"][::-1]}))
    with pytest.raises(ValueError, match="sorted"):
        VocabMap.load(path)


def _copy_kept_rows(full_model, compact_model, vmap):
    """The compact model with the full model's weights (vocabulary weights: the kept rows)."""
    vocab = full_model.config.text.vocab_size
    source = dict(nnx.to_flat_state(nnx.state(full_model, nnx.Param)))
    for path, var in nnx.to_flat_state(nnx.state(compact_model, nnx.Param)):
        value = np.asarray(source[path].get_value())
        if value.shape != var.get_value().shape:
            value = vmap.rows(value, axis=value.shape.index(vocab))
        var.set_value(jax.numpy.asarray(value))


@pytest.mark.parametrize("tie", [False, True])
def test_compact_logits_equal_full_logits_on_kept_rows(tie):
    cfg = ModelConfig.preset("tiny", [f"tie_word_embeddings={str(tie).lower()}"])
    full = init_model(cfg, seed=1)
    rng = np.random.default_rng(0)
    text = rng.choice(151000, 40, replace=False)
    vmap = VocabMap(np.concatenate([text, rng.choice(151000, 200), [IMAGE_PAD_ID, VISION_START_ID, VISION_END_ID,
                                                                      151656]]), "t")
    compact = init_model(vmap.remap_config(cfg), seed=2)
    assert compact.config.text.vocab_size == len(vmap)
    assert vmap.to_full([compact.config.image_token_id])[0] == IMAGE_PAD_ID
    _copy_kept_rows(full, compact, vmap)
    grids = np.array([(1, 4, 6)])
    ids = np.concatenate([text[:10], [VISION_START_ID], [IMAGE_PAD_ID] * 6, [VISION_END_ID], text[10:30]])[None]
    ids = np.concatenate([ids, np.concatenate([text[5:35], [VISION_START_ID], [IMAGE_PAD_ID] * 6,
                                               [VISION_END_ID]])[None]])
    pv = random_pixels(rng, np.concatenate([grids, grids]))
    grids = np.concatenate([grids, grids])
    ref = np.asarray(full(ids, pixel_values=pv, image_grid_thw=grids))[..., vmap.ids]
    out = np.asarray(compact(vmap.to_compact(ids), pixel_values=pv, image_grid_thw=grids))
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def small(out, **extra):
    overrides = [f"run.out_dir={out}", "run.total_steps=3", "run.checkpoint_every=2", "run.progress_bar=false",
                 "run.tensorboard=false", "run.async_checkpoint=false", f"data.sources=['{SOURCE}']",
                 "data.batch_size=2", "data.seq_lens=[512]", "data.patch_budgets=[256]",
                 "train.loss.max_label_tokens=512", "train.optim.warmup_ratio=0.0", "model.vocab_map=synthetic"]
    overrides += [f"{k}={v}" for k, v in extra.items()]
    return load_config(SFTConfig, ROOT / "configs" / "sft" / "demo_cpu.yaml", overrides)


@pytest.fixture(scope="module")
def compact_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("compact")
    first = train(small(out), stop_after=2)
    saved = (out / VOCAB_MAP_FILE).read_text()
    summary = train(small(out))
    return out, first, summary, saved


def test_compact_run_resumes_with_its_map_and_refuses_another(compact_run, tmp_path):
    out, first, summary, saved = compact_run
    assert first["step"] == 2 and summary["resumed_from"] == 2 and summary["step"] == 3
    assert (out / VOCAB_MAP_FILE).read_text() == saved
    vmap = VocabMap.load(out)
    assert len(vmap) < 2000
    model_dir = Path(summary["model_dir"])
    assert VocabMap.load(model_dir) == vmap
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["text_config"]["vocab_size"] == len(vmap)
    assert cfg["image_token_id"] == vmap.compact_id(IMAGE_PAD_ID)
    assert json.loads((model_dir / "generation_config.json").read_text())["eos_token_id"] == \
        [vmap.compact_id(IM_END_ID), vmap.compact_id(PAD_ID)]
    other = VocabMap(vmap.ids[:-1], vmap.tokenizer_sha256)
    other.save(tmp_path / "other.json")
    with pytest.raises(ValueError, match="different vocabulary maps"):
        train(small(out, **{"model.vocab_map": str(tmp_path / "other.json"), "run.total_steps": 4}))
    with pytest.raises(ValueError, match="holds a reduced-vocabulary run"):
        train(small(out, **{"model.vocab_map": "null", "run.total_steps": 4}))


def _restricted_greedy(model, vmap, ids, pv, grids, steps):
    """Greedy decoding of a full-vocabulary model, one whole forward per token, with the argmax
    taken over the kept ids only: the reference the compact model must reproduce."""
    width = ids.shape[1] + steps
    seq = np.full((1, width), PAD_ID, np.int64)
    seq[0, : ids.shape[1]] = ids[0]
    mask = np.zeros_like(seq)
    n, new = ids.shape[1], []
    for _ in range(steps):
        mask[0, :n] = 1
        logits = np.asarray(model(seq, mask, pixel_values=pv, image_grid_thw=grids))[0, n - 1]
        token = int(vmap.ids[np.argmax(logits[vmap.ids])])
        new.append(token)
        if token in (IM_END_ID, PAD_ID):
            break
        seq[0, n] = token
        n += 1
    return new


def test_compact_model_loads_and_generates_what_the_full_model_would(compact_run):
    out, _, summary, _ = compact_run
    model = load_model(summary["model_dir"])
    vmap = model.vocab_map
    assert vmap is not None and vmap == VocabMap.load(out) and vmap.tokenizer is not None
    processor = Processor(Path(summary["model_dir"]), 3136, 9216)
    enc = processor.encode(Sources([SOURCE.replace("split=train", "split=test")]).fetch(0), with_target=False)
    steps = 12
    tokens = generate(model, enc["input_ids"], pixel_values=enc["pixel_values"],
                      image_grid_thw=enc["image_grid_thw"], max_new_tokens=steps)[0]
    assert vmap.contains(tokens).all()  # full ids out
    # The same weights in a full-vocabulary model (other rows random): restricted greedy agrees.
    full_cfg = ModelConfig.preset("tiny")
    full = init_model(full_cfg, seed=5)
    source = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    for path, var in nnx.to_flat_state(nnx.state(full, nnx.Param)):
        value = np.asarray(source[path].get_value())
        target = np.array(var.get_value())
        if value.shape != target.shape:
            axis = target.shape.index(full_cfg.text.vocab_size)
            index = [slice(None)] * target.ndim
            index[axis] = vmap.ids
            target[tuple(index)] = value
            value = target
        var.set_value(jax.numpy.asarray(value))
    ref = _restricted_greedy(full, vmap, enc["input_ids"], enc["pixel_values"], enc["image_grid_thw"], steps)
    assert tokens[: len(ref)].tolist() == ref
    assert (tokens[len(ref):] == PAD_ID).all()
    text = processor.tokenizer.decode([t for t in tokens if t != PAD_ID], skip_special_tokens=True)
    assert text == processor.tokenizer.decode(ref, skip_special_tokens=True)
    # a prompt with a token the map lacks is refused, naming it
    outside = next(i for i in range(1000, 151000) if not vmap.contains([i])[0])
    with pytest.raises(VocabMissError, match=f"token id {outside}"):
        generate(model, np.concatenate([enc["input_ids"][:, :5], [[outside]]], axis=1), max_new_tokens=2)


def test_transformers_loads_the_compact_export_and_matches_its_logits(compact_run, tmp_path):
    from transformers import Qwen3VLForConditionalGeneration

    _, _, summary, _ = compact_run
    model = load_model(summary["model_dir"])
    vmap = model.vocab_map
    export_hf(model, tmp_path / "hf", sidecar_dir=summary["model_dir"])
    assert VocabMap.load(tmp_path / "hf") == vmap
    back = load_model(tmp_path / "hf")
    assert back.vocab_map == vmap  # the HF directory keeps the map, and so does converting it back
    from sr_jax.convert.hf_import import convert_hf_to_jax
    assert load_model(convert_hf_to_jax(tmp_path / "hf", tmp_path / "jax")).vocab_map == vmap
    hf = Qwen3VLForConditionalGeneration.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert hf.config.text_config.vocab_size == len(vmap)
    processor = Processor(Path(summary["model_dir"]), 3136, 9216)
    enc = processor.encode(Sources([SOURCE]).fetch(1), with_target=True)
    ids = vmap.to_compact(enc["input_ids"])
    grids = enc["image_grid_thw"]
    with torch.no_grad():
        ref = hf(input_ids=torch.as_tensor(ids), attention_mask=torch.ones(ids.shape, dtype=torch.long),
                 pixel_values=torch.as_tensor(enc["pixel_values"]), image_grid_thw=torch.as_tensor(grids),
                 mm_token_type_ids=torch.as_tensor(ids == hf.config.image_token_id).int()).logits.numpy()
    out = np.asarray(model(ids, pixel_values=enc["pixel_values"], image_grid_thw=grids))
    assert ref.shape[-1] == len(vmap)
    assert np.abs(out - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


def test_checkpoint_export_and_grpo_rollouts_keep_the_map(compact_run, tmp_path):
    """A run directory restores with its map; GRPO's update rows hold the compact ids of what
    `generate` returned (teacher-forced argmax = the greedy tokens); `sr-jax rl` from the compact
    model takes its map."""
    from sr_jax.data.synthetic import SynthConfig, generate_example
    from sr_jax.rl.config import RLConfig
    from sr_jax.rl.rollout import Rollout, _pixels, completion_mask, left_pad, microbatches
    from sr_jax.rl.trainer import train as rl_train
    from sr_jax.train.loop import model_from_checkpoint
    from sr_jax.train.step import VISION_KEYS

    out, _, summary, _ = compact_run
    vmap = VocabMap.load(out)
    restored, _ = model_from_checkpoint(out)
    assert restored.vocab_map == vmap and restored.config.text.vocab_size == len(vmap)

    model = load_model(summary["model_dir"])
    processor = Processor(Path(summary["model_dir"]), 3136, 9216)
    records = [generate_example(i, 5, "train", SynthConfig(image_size=(48, 64), tasks=("sc",))) for i in range(2)]
    prompts = [processor.encode(r, with_target=False) for r in records]
    ids, mask = left_pad(prompts)
    tokens = generate(model, ids, mask, *_pixels(prompts), max_new_tokens=6)
    cmask = completion_mask(tokens, [IM_END_ID])
    r = Rollout(records, prompts, tokens, cmask, [], [], np.zeros(2), {}, np.zeros(2))
    (mb,) = microbatches(r, 1, model)
    assert mb["input_ids"].max() < len(vmap)
    np.testing.assert_array_equal(vmap.to_full(mb["completion_ids"])[cmask > 0], tokens[cmask > 0])
    hidden = model.features(mb["input_ids"], mb["attention_mask"], mb["pixel_values"],
                            position_ids=mb["position_ids"], vision=tuple(mb[k] for k in VISION_KEYS)).hidden
    width = mb["input_ids"].shape[1] - tokens.shape[1]
    logits = np.asarray(model.logits(hidden[:, width - 1: width - 1 + tokens.shape[1]]))
    assert np.array_equal(vmap.to_full(logits.argmax(-1))[cmask > 0], tokens[cmask > 0])

    cfg = load_config(RLConfig, ROOT / "configs" / "rl" / "demo_cpu.yaml", [
        f"run.out_dir={tmp_path / 'rl'}", "run.total_steps=1", "run.progress_bar=false", "run.tensorboard=false",
        "run.async_checkpoint=false", f"model.init_from={summary['model_dir']}",  # no model.vocab_map: it brings its own
        "data.sources=['synthetic:n=8,seed=5,split=train,min_side=48,max_side=56,tasks=sc']",
        "data.prompts_per_step=1", "grpo.group_size=2", "grpo.max_completion_tokens=8"])
    rl = rl_train(cfg)
    assert rl["step"] == 1 and np.isfinite(rl["last"]["loss"])
    assert VocabMap.load(tmp_path / "rl") == vmap == VocabMap.load(rl["model_dir"])


def test_scorer_reads_a_compact_model_and_refuses_another_tokenizer(compact_run, tmp_path):
    import shutil

    from sr_jax.data.synthetic import SynthConfig, generate_example
    from sr_jax.reward.scorer import Scorer

    _, _, summary, _ = compact_run
    scorer = Scorer.from_pretrained(summary["model_dir"], max_new_tokens=8, max_pixels=9216)
    assert scorer.model.vocab_map is not None
    ex = generate_example(0, 9, "test", SynthConfig(image_size=(48, 64), tasks=("sc",)))
    (result,) = scorer.score([ex.images[:-1]], [ex.images[-1]], [ex.instruction])
    assert isinstance(result["raw"]["sc"], str) and isinstance(result["raw"]["pq"], str)
    # the same model directory with another tokenizer's files: refused, naming the map
    other = tmp_path / "other"
    shutil.copytree(summary["model_dir"], other)
    data = json.loads((other / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]  # same tokens, two ids swapped: another tokenizer
    (other / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="made for tokenizer"):
        load_model(other)


def test_a_full_vocabulary_init_from_gives_the_compact_model_its_kept_rows(tmp_path):
    from sr_jax.convert.orbax_io import save_model
    from sr_jax.train.sft import SFTStage

    cfg = ModelConfig.preset("tiny")
    full = init_model(cfg, seed=4)
    save_model(full, tmp_path / "full")
    stage = SFTStage(small(tmp_path / "run", **{"model.init_from": str(tmp_path / "full")}))
    vmap, model = stage.vocab_map, stage.trainer.model
    assert model.vocab_map == vmap and model.config.text.vocab_size == len(vmap)
    np.testing.assert_array_equal(np.asarray(model.model.language_model.embed_tokens.embedding.get_value()),
                                  vmap.rows(np.asarray(full.model.language_model.embed_tokens.embedding.get_value())))
    np.testing.assert_array_equal(np.asarray(model.lm_head.kernel.get_value()),
                                  vmap.rows(np.asarray(full.lm_head.kernel.get_value()), axis=1))
    source = dict(nnx.to_flat_state(nnx.state(full, nnx.Param)))
    same = 0
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if source[path].get_value().shape == var.get_value().shape:
            np.testing.assert_array_equal(np.asarray(var.get_value()), np.asarray(source[path].get_value()))
            same += 1
    assert same == len(source) - 2  # every weight but the embedding and the LM head, as it was


def test_data_vocab_map_command_covers_every_config(tmp_path, tokenizer):
    from sr_jax.cli import main
    from sr_jax.data.templates import PromptTemplates

    out = tmp_path / "stages.json"
    learn = ROOT / "configs" / "sft" / "learn_synthetic_cpu.yaml"
    rl_source = "synthetic:n=16,seed=1,split=train,min_side=48,max_side=56,tasks=pq"
    assert main(["data", "vocab-map", "--config", str(ROOT / "configs" / "sft" / "demo_cpu.yaml"), "--config",
                 str(learn), "--samples", "40", "--out", str(out)]) == 0
    vmap = VocabMap.load(out, tokenizer)
    default = build_vocab_map(["synthetic:n=2000,seed=0,split=train,min_side=64,max_side=96"],
                              Processor(tokenizer), samples_per_source=40)
    templates = PromptTemplates(**{k: str(ROOT / f"configs/prompts/learn/{k}.txt") for k in ("sc", "sc_multi", "pq")})
    own = build_vocab_map(["synthetic:n=200000,seed=0,split=train,min_side=64,max_side=128"],
                          Processor(tokenizer, templates=templates), samples_per_source=40)
    assert set(default.ids) | set(own.ids) == set(vmap.ids)
    assert main(["data", "vocab-map", "--config", str(learn), "--source", rl_source, "--samples", "8",
                 "--out", str(out)]) == 0
    assert VocabMap.load(out) == build_vocab_map([rl_source], Processor(tokenizer, templates=templates),
                                                 samples_per_source=8)
