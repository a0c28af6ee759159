"""Chat templates rendered by runtimes/chat.py (jinja2 only) equal transformers' apply_chat_template."""

from __future__ import annotations

import json

import pytest

from xpack.errors import XpackError
from xpack.packager.demo.base_model import demo_base_dir, demo_gguf_path
from xpack.runtimes.chat import ChatTemplate, find_chat_template, render_chat_template, special_tokens_of

TWINS = ["llama", "gemma2", "gemma3", "gemma3_vision", "mllama"]

SYSTEM_USER = [
    {"role": "system", "content": "You are an expert radiologist. Answer briefly."},
    {"role": "user", "content": "Chest X-ray, 54-year-old female with cough and fever. Describe the findings."},
]
MULTI_TURN = [
    {"role": "user", "content": "  What is the capital of France?  "},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy? Answer with \"quotes\" & <tags>, café, 日本語."},
]
SYSTEM_MULTI_TURN = [{"role": "system", "content": "Be brief."}, *MULTI_TURN, {"role": "assistant", "content": "Rome."}]
IMAGE_TURN = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]},
]
CONVERSATIONS = {"system_user": SYSTEM_USER, "multi_turn": MULTI_TURN, "system_multi_turn": SYSTEM_MULTI_TURN}


def _reference(templater, messages, add_generation_prompt):
    import jinja2

    try:
        return templater.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except jinja2.exceptions.TemplateError as exc:
        return ("error", str(exc))


def _ours(template, messages, add_generation_prompt):
    try:
        return template.render(messages, add_generation_prompt)
    except XpackError as exc:
        return ("error", str(exc).rsplit(": ", 1)[-1])


def _check_folder(folder, templater, conversations):
    template = ChatTemplate.from_folder(folder)
    assert template is not None, f"no chat template found in {folder}"
    for name, messages in conversations.items():
        for add in (True, False):
            expected = _reference(templater, messages, add)
            assert _ours(template, messages, add) == expected, (name, add)


@pytest.mark.parametrize("name", TWINS)
def test_twin_templates_render_like_transformers(twin_factory, name):
    import twins  # imports torch: this module's other tests run without it

    twin = twin_factory.get(name)
    tokenizer = twins.load_tokenizer(twin)
    _check_folder(twin.model_dir, tokenizer, CONVERSATIONS)
    if name in twins.VISION_TWINS:
        processor = twins.load_processor(twin)
        _check_folder(twin.model_dir, processor, {**CONVERSATIONS, "image": IMAGE_TURN})


def test_gemma2_refuses_a_system_message_in_one_line(twin_factory):
    template = ChatTemplate.from_folder(twin_factory.get("gemma2").model_dir)
    with pytest.raises(XpackError, match="^the model's chat template rejected the conversation: System role not supported$"):
        template.render(SYSTEM_USER)


def test_demo_model_template_renders_like_transformers():
    from transformers import AutoTokenizer

    folder = demo_base_dir()
    _check_folder(folder, AutoTokenizer.from_pretrained(str(folder)), CONVERSATIONS)


def test_demo_gguf_metadata_template_renders_like_transformers():
    """The GGUF's own tokenizer.chat_template + bos/eos from its metadata give transformers' text."""
    import llama_cpp
    from transformers import AutoTokenizer

    llm = llama_cpp.Llama(model_path=str(demo_gguf_path()), vocab_only=True, verbose=False)
    try:
        template = ChatTemplate.from_gguf_metadata(llm.metadata, lambda i: llm._model.token_get_text(i))
    finally:
        llm.close()
    assert template is not None and template.special_tokens["eos_token"] == "<|im_end|>"
    tokenizer = AutoTokenizer.from_pretrained(str(demo_base_dir()))
    for name, messages in CONVERSATIONS.items():
        assert _ours(template, messages, True) == _reference(tokenizer, messages, True), name


def test_template_lookup_order_and_special_tokens(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "{{ bos_token }}D"}],
                "bos_token": {"content": "<s>", "lstrip": False},
                "eos_token": "</s>",
                "pad_token": None,
                "added_tokens_decoder": {},
            }
        )
    )
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<ignored>", "unk_token": "<unk>"}))
    assert find_chat_template(tmp_path) == "{{ bos_token }}D"
    assert special_tokens_of(tmp_path) == {"bos_token": "<s>", "eos_token": "</s>"}
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "J"}))
    assert find_chat_template(tmp_path) == "{{ bos_token }}D"  # the tokenizer's own template first
    (tmp_path / "chat_template.jinja").write_text("{{ bos_token }}jinja")
    assert find_chat_template(tmp_path) == "{{ bos_token }}jinja"
    assert ChatTemplate.from_folder(tmp_path).render([{"role": "user", "content": "x"}]) == "<s>jinja"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert ChatTemplate.from_folder(empty) is None


def test_transformers_helpers_and_errors():
    template = (
        "{% for m in messages %}{% if loop.index0 > 1 %}{% break %}{% endif %}"
        "{% generation %}{{ m | tojson }}{% endgeneration %}{% endfor %}{{ strftime_now('%Y') | length }}"
    )
    out = render_chat_template(template, [{"role": "user", "content": "é<>&"}, {"role": "a", "content": "b"}, {"role": "c", "content": "d"}])
    assert out == '{"role": "user", "content": "é<>&"}{"role": "a", "content": "b"}4'
    with pytest.raises(XpackError, match="does not parse"):
        render_chat_template("{% for %}", [])
    with pytest.raises(XpackError, match="rejected the conversation: nope"):
        render_chat_template("{{ raise_exception('nope') }}", [])
    with pytest.raises(XpackError, match="rejected the conversation"):
        render_chat_template("{{ messages.append(1) }}", [])  # the sandbox is immutable
