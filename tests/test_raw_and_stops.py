"""Issue #13's generation controls on every backend: raw prompts (no chat template), stop strings, OpenAI's frequency
and presence penalties, and a caller ending a generation (StopGeneration), on the demo GGUF (llama.cpp), an ONNX
export of the llama twin and the twin's checkpoint (torch)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from xpack.cli import cli
from xpack.errors import XpackError
from xpack.packager.demo.base_model import demo_gguf_path
from xpack.packager.export.job import export
from xpack.runtimes.penalties import penalize
from xpack.runtimes.registry import load
from xpack.runtimes.settings import GenerationSettings, StopGeneration, StopTexts

PROMPT = "Describe the findings of a chest X-ray."
GREEDY = GenerationSettings(max_tokens=16, temperature=0, repetition_penalty=1.0, ignore_eos=True)


@pytest.fixture(scope="module")
def onnx_twin(twin_factory, tmp_path_factory):
    out = tmp_path_factory.mktemp("raw-onnx") / "llama"
    export(str(twin_factory.get("llama").model_dir), "onnx", out, bits=32, threads=1)
    return out


@pytest.fixture(scope="module", params=["gguf", "onnx", "torch"])
def backend(request, twin_factory, cpu):
    path = {"gguf": demo_gguf_path, "onnx": lambda: request.getfixturevalue("onnx_twin"), "torch": lambda: twin_factory.get("llama").model_dir}[request.param]()
    with load(path, cpu, {"gguf": "llamacpp", "onnx": "onnx", "torch": "torch"}[request.param]) as rt:
        yield rt


# -- the stop strings' streaming, alone ------------------------------------------------------------


def test_stop_texts_hold_back_a_stop_split_across_pieces():
    got: list[str] = []
    stops = StopTexts(["###", "END"], got.append)
    stops("The lungs are clear #")
    stops("#")
    assert "".join(got) == "The lungs are clear "  # "##" may start "###": held back
    with pytest.raises(StopGeneration):
        stops("# Diagnosis")
    stops("ignored after the end")
    assert "".join(got) == "The lungs are clear "
    result = stops.finish({"text": "The lungs are clear ### Diagnosis", "finish_reason": "length"})
    assert result == {"text": "The lungs are clear ", "finish_reason": "stop"}


def test_stop_texts_hand_on_what_they_held_back_at_the_end():
    got: list[str] = []
    stops = StopTexts(["###"], got.append)
    stops("no stop here #")
    assert "".join(got) == "no stop here "
    assert stops.finish({"text": "no stop here #", "finish_reason": "length"})["text"] == "no stop here #"
    assert "".join(got) == "no stop here #"


def test_penalties_are_openais():
    logits = np.zeros(6, np.float32)
    penalize(logits, [1, 1, 4], frequency=0.5, presence=0.25)
    np.testing.assert_allclose(logits, [0, -1.25, 0, 0, -0.75, 0])


def test_settings_refuse_bad_stops_and_penalties():
    with pytest.raises(XpackError, match="stop must be at most 4"):
        GenerationSettings().with_overrides(stop=["a", "b", "c", "d", "e"])
    with pytest.raises(XpackError, match="stop must be"):
        GenerationSettings().with_overrides(stop=[""])
    with pytest.raises(XpackError, match="frequency_penalty must be in"):
        GenerationSettings(frequency_penalty=3.0)
    assert GenerationSettings().with_overrides(stop="###").stop == ("###",)


# -- every backend ---------------------------------------------------------------------------------


def test_raw_prompt_is_fed_as_written(backend):
    """The chat-templated text fed raw gives the chat's answer: raw adds nothing (BOS as the tokenizer adds it)."""
    chat = backend.generate(PROMPT, GREEDY)
    raw = backend.generate(backend.prompt_text(PROMPT), GREEDY, raw=True)
    assert raw.token_ids == chat.token_ids and raw.prompt_tokens == chat.prompt_tokens
    plain = backend.generate("### Symptoms:\nfever\n### Diagnosis:\n", GREEDY, raw=True)
    assert plain.prompt_tokens == len(backend.tokenize("### Symptoms:\nfever\n### Diagnosis:\n"))
    with pytest.raises(XpackError, match="a raw prompt is one string"):
        backend.generate([{"role": "user", "content": PROMPT}], GREEDY, raw=True)


def test_stop_string_ends_the_answer_before_it(backend):
    full = backend.generate(PROMPT, GREEDY)
    text = full.text
    assert len(text) >= 8, text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    pieces: list[str] = []
    cut = backend.generate(PROMPT, GREEDY.with_overrides(stop=(stop, "a stop that never appears")), on_token=pieces.append)
    assert cut.text == text[: text.index(stop)] == "".join(pieces)
    assert cut.finish_reason == "stop" and cut.completion_tokens < full.completion_tokens
    assert full.token_ids[: cut.completion_tokens] == cut.token_ids


def test_a_caller_can_end_the_generation(backend):
    """What a server does when its client goes away: the on_token callback raises StopGeneration("cancelled")."""
    seen: list[str] = []

    def hang_up(piece: str) -> None:
        seen.append(piece)
        if len(seen) == 2:
            raise StopGeneration("cancelled")

    r = backend.generate(PROMPT, GREEDY.with_overrides(max_tokens=64), on_token=hang_up)
    assert r.finish_reason == "cancelled" and len(seen) == 2 and r.completion_tokens < 64


def test_frequency_and_presence_penalties_steer_greedy_decoding(backend):
    """Each greedy token is the argmax of the teacher-forced logits less OpenAI's penalties over the tokens before it.
    A penalty against repeating changes the twins' answers (they repeat a newline), one for repeating changes the
    demo model's."""
    prompt = backend.tokenize(backend.prompt_text(PROMPT))
    plain = backend.generate(PROMPT, GREEDY).token_ids
    changed = []
    for frequency, presence in ((2.0, 1.5), (-2.0, -1.0)):
        out = backend.generate(PROMPT, GREEDY.with_overrides(frequency_penalty=frequency, presence_penalty=presence)).token_ids
        logits = backend.logits(prompt + out[:-1])[len(prompt) - 1 :]
        for i, token in enumerate(out):
            row = penalize(logits[i].copy(), out[:i], frequency, presence)
            assert token == int(row.argmax()), (frequency, i, out)
        changed.append(out != plain)
    assert any(changed), plain


# -- the CLI ---------------------------------------------------------------------------------------


def test_xpack_run_raw_on_a_model_without_a_chat_template(onnx_twin, tmp_path, cpu):
    """A base model's fine-tune has no chat template: `xpack run` refuses its chat form and feeds --raw as written."""
    folder = tmp_path / "no-template"
    shutil.copytree(onnx_twin, folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    base = ["run", "--artifact", str(folder), "--profile", "cpu16", "--temperature", "0", "--max-tokens", "6", "--no-check"]
    refused = CliRunner().invoke(cli, [*base, "--prompt", "fever"])
    assert refused.exit_code != 0 and "no chat template" in refused.output
    ran = CliRunner().invoke(cli, [*base, "--raw", "--json", "--prompt", "### Symptoms:\nfever\n### Diagnosis:\n"])
    assert ran.exit_code == 0, ran.output
    result = json.loads(ran.stdout)
    with load(folder, cpu, check=False) as rt:
        assert result["prompt_tokens"] == len(rt.tokenize("### Symptoms:\nfever\n### Diagnosis:\n"))
    both = CliRunner().invoke(cli, [*base, "--raw", "--system", "x", "--prompt", "fever"])
    assert both.exit_code == 2 and "--raw feeds the prompt as written" in both.output
