"""Prompt templates: defaults, user-provided files from config, image markers and errors."""

from __future__ import annotations

import pytest

from sr_jax.config import load_config
from sr_jax.data.records import RecordError, SpatialExample
from sr_jax.data.templates import IMAGE, PromptTemplates, TemplateError, chat_messages, user_text


def _sc(n_images: int = 2, instruction: str = 'make the "sky" {purple}') -> SpatialExample:
    return SpatialExample(id="t-1", task="sc", images=[b"x"] * n_images, instruction=instruction)


def _pq() -> SpatialExample:
    return SpatialExample(id="t-2", task="pq", images=[b"x"])


def test_defaults_put_images_first_and_fill_the_instruction():
    t = PromptTemplates()
    parts = t.render(_sc())
    assert parts[:2] == [IMAGE, IMAGE] and len(parts) == 3
    text = parts[2]
    # Plain replacement: braces and quotes in the instruction and in the JSON spec survive.
    assert 'make the "sky" {purple}' in text and "{instruction}" not in text
    assert '{"edit_region": [{"id": 0' in text
    assert t.render(_pq())[0] is IMAGE and len(t.render(_pq())) == 2


def test_template_choice_follows_image_count():
    t = PromptTemplates()
    assert t.kind_for(_sc(2)) == "sc" and t.kind_for(_sc(3)) == "sc_multi" and t.kind_for(_pq()) == "pq"
    assert t.render(_sc(3))[:3] == [IMAGE] * 3
    assert t.render(_sc(2))[-1] != t.render(_sc(3))[-1]


@pytest.mark.parametrize("kind", ["sc", "sc_multi", "pq"])
def test_default_templates_state_the_answer_format(kind):
    text = PromptTemplates().text(kind)
    for needle in ('"reasoning"', '"score"', "0 to 25", "25 ="):
        assert needle in text, needle
    if kind != "pq":
        for needle in ('"edit_region"', '"bbox_2d"', '"label"', '"id"', "0-1000", "[]", "<|bbox_i|>", "<|global|>",
                       "success", "overediting", "edited"):
            assert needle in text, needle
    else:
        assert "naturalness" in text and "artifacts" in text


def test_default_templates_are_concise(tokenizer):
    for kind in ("sc", "sc_multi", "pq"):
        n = len(tokenizer.encode(PromptTemplates().text(kind)))
        assert n < 215, f"{kind}: {n} tokens"


def test_user_files_from_config_with_image_markers(tmp_path):
    sc = tmp_path / "sc.txt"
    sc.write_text("Before: <image>\nAfter: <image>\nInstruction: {instruction}\n")
    pq = tmp_path / "pq.txt"
    pq.write_text("Rate <image> please.")
    cfg = tmp_path / "prompts.yaml"
    cfg.write_text(f"sc: {sc}\n")
    t = load_config(PromptTemplates, cfg, [f"pq={pq}"])
    parts = t.render(_sc(2, "add a hat"))
    # Whitespace is kept exactly: the file's final newline is part of the prompt.
    assert parts == ["Before: ", IMAGE, "\nAfter: ", IMAGE, "\nInstruction: add a hat\n"]
    assert user_text(parts) == (
        "Before: <|vision_start|><|image_pad|><|vision_end|>\nAfter: "
        "<|vision_start|><|image_pad|><|vision_end|>\nInstruction: add a hat\n"
    )
    assert t.render(_pq()) == ["Rate ", IMAGE, " please."]
    # Unset kinds fall back to the defaults.
    assert t.render(_sc(3))[:3] == [IMAGE] * 3


def test_marker_count_mismatch_is_a_record_error(tmp_path):
    sc_multi = tmp_path / "multi.txt"
    sc_multi.write_text("<image><image><image> {instruction}")
    t = PromptTemplates(sc_multi=str(sc_multi))
    assert len([p for p in t.render(_sc(3)) if p is IMAGE]) == 3
    with pytest.raises(RecordError, match="t-1") as err:
        t.render(_sc(4))
    assert err.value.reason == "image_count"


def test_bad_template_files(tmp_path):
    missing = PromptTemplates(sc=str(tmp_path / "nope.txt"))
    with pytest.raises(TemplateError, match="nope.txt"):
        missing.render(_sc())
    no_field = tmp_path / "nofield.txt"
    no_field.write_text("judge it")
    with pytest.raises(TemplateError, match="instruction"):
        PromptTemplates(sc=str(no_field)).render(_sc())
    pq_field = tmp_path / "pqfield.txt"
    pq_field.write_text("judge {instruction}")
    with pytest.raises(TemplateError, match="PQ"):
        PromptTemplates(pq=str(pq_field)).render(_pq())


def test_chat_messages_shape():
    msgs = chat_messages([IMAGE, "hi"], answer="{}")
    assert msgs == [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "{}"}]},
    ]


# Our own strings in the shape of the official prompts (str.format semantics, escaped braces,
# <|bbox_{{id}}|>, {score_range}, {num_input_images}, a final newline); the oracle is str.format.
SERVER_LIKE_SC = ('Judge the edit on 0 to {score_range}. Answer as\n{{\n"edit_region" : [...],\n"score" : [...]\n}}\n'
                  'Boxes: [{{"id": 0~n, "bbox_2d": [x1, y1, x2, y2]}}]. Mark regions with <|bbox_{{id}}|>.\n'
                  "Editing instruction: \n{instruction}")
EVAL_LIKE_MULTI = ("The first {num_input_images} images are inputs, the last is the result.\n"
                   '{{"score": [a, b]}}\nEditing instruction: {instruction}\n')
SERVER_LIKE_PQ = 'Rate naturalness and artifacts from 0 to {score_range}:\n{{{{\n"score" : [...]\n}}}}\n'


def test_official_shaped_strings_render_like_str_format(tmp_path):
    files = {}
    for name, text in (("sc", SERVER_LIKE_SC), ("sc_multi", EVAL_LIKE_MULTI), ("pq", SERVER_LIKE_PQ)):
        files[name] = tmp_path / f"{name}.txt"
        files[name].write_text(text, encoding="utf-8")
    t = PromptTemplates(**{k: str(v) for k, v in files.items()})
    instruction = 'Change the text "OPEN" to {CLOSED} <image>'
    assert t.render(_sc(2, instruction)) == [IMAGE, IMAGE, SERVER_LIKE_SC.format(score_range=25, instruction=instruction)]
    got = t.render(_sc(4, instruction))
    assert got == [IMAGE] * 4 + [EVAL_LIKE_MULTI.format(num_input_images=3, instruction=instruction)]
    assert got[-1].endswith(instruction + "\n") and got[-1].startswith("The first 3 images")
    pq = t.render(_pq())[1]
    assert pq == SERVER_LIKE_PQ.format(score_range=25) and "{{\n" in pq and pq.endswith("\n")
    assert "<|bbox_{id}|>" in t.render(_sc())[2] and "{{" not in t.render(_sc())[2]
    half = PromptTemplates(sc=str(files["sc"]), score_range=2.5)
    assert "0 to 2.5." in half.render(_sc())[2]


def test_unknown_or_malformed_placeholders_name_the_file_and_key(tmp_path):
    cases = {
        "Judge {instruction} with {score_rnage}": ("{score_rnage}",),
        'Judge {instruction}. Reply {"score": 1}': ('{"score"}', "{{ and }}"),  # JSON braces left single
        'Judge {instruction}. Reply {"a": {"b": 1}}': ("{{ and }}",),
        "Judge {instruction} }": ("Single '}'",),
        "Judge {instruction} {}": ("positional",),
        "Judge {instruction.upper}": ("{instruction.upper}",),
    }
    for k, (text, needles) in enumerate(cases.items()):
        path = tmp_path / f"t{k}.txt"
        path.write_text(text)
        with pytest.raises(TemplateError) as err:
            PromptTemplates(sc=str(path)).render(_sc())
        assert str(path) in str(err.value)
        for needle in needles:
            assert needle in str(err.value), (text, str(err.value))
    pq = tmp_path / "pq.txt"
    pq.write_text("{num_input_images} images")
    with pytest.raises(TemplateError, match=r"unknown placeholder \{num_input_images\}"):
        PromptTemplates(pq=str(pq)).render(_pq())


def test_default_templates_render_without_braces_doubled():
    text = PromptTemplates().render(_sc())[2]
    assert '{"edit_region": [{"id": 0' in text and "{{" not in text and not text.endswith("\n")


def test_scorer_options_take_template_files_from_a_cli_mapping(tmp_path):
    from sr_jax.config import load_config
    from sr_jax.reward.scorer import ScorerOptions

    path = tmp_path / "sc.txt"
    path.write_text(SERVER_LIKE_SC)
    opts = ScorerOptions().replace(templates={"sc": str(path)})  # `sr-jax score --set templates={sc: ...}`
    assert isinstance(opts.templates, PromptTemplates) and opts.templates.sc == str(path)
    assert load_config(ScorerOptions, None, [f"templates.sc={path}"]).templates.sc == str(path)  # eval --set
