"""GGUF export against the torch reference: tiny twin, transformers logits, xpack export + llama.cpp runtime.

Thresholds (logits of tiny random twins, |logit| <~ 3; top-1 counts near-ties within 1e-3 as agreement,
see parity.compare_logits, and the strict top-1 must stay >= 97.5%):
- F32: top-1 agreement 100%, max |logit error| <= 5e-3
- F16: top-1 >= 95%, max |logit error| <= 5e-2
- Q8_0 / Q4_K_M: the file loads and generates.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import twins
from xpack.cli import cli
from xpack.packager.cards.render import front_matter
from xpack.packager.demo.base_model import demo_base_dir
from xpack.packager.export.gguf import writer
from xpack.packager.export.gguf.modelfile import stop_tokens
from xpack.packager.export.job import export
from xpack.packager.io.checkpoint import Checkpoint
from xpack.packager.io.tensors import TensorSpec, from_f32, sha256_file, to_f32
from xpack.packager.merge.job import merge
from xpack.packager.merge.stream import TensorOp
from xpack.packager.verify.parity import compare_logits
from xpack.runtimes.chat import END_OF_TURN_TOKENS
from xpack.runtimes.registry import load
from xpack.runtimes.settings import GenerationSettings

TEXT_TWINS = ["llama", "gemma2", "gemma3", "gemma3_vision"]
PARITY_TEXT = twins.PARITY_TEXT
THRESHOLDS = {"F32": (1.0, 5e-3), "F16": (0.95, 5e-2)}


def _reference_logits(twin, model_dir, ids):
    model = twins.load_base(model_dir) if model_dir != twin.model_dir else twins.load_base(twin)
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float().numpy()


def _export(model_dir, out, quant, adapters=()):
    return export(str(model_dir), "gguf", out, quant=quant, adapters=[str(a) for a in adapters])


@pytest.fixture(scope="module")
def exports(twin_factory, tmp_path_factory):
    """One F32 and one F16 export per text twin, shared by the tests of this module."""
    cache = {}

    def get(name, quant):
        key = (name, quant)
        if key not in cache:
            twin = twin_factory.get(name)
            out = tmp_path_factory.mktemp(f"gguf-{name}-{quant}")
            shutil.rmtree(out)
            cache[key] = (_export(twin.model_dir, out, quant), out)
        return cache[key]

    return get


@pytest.mark.parametrize("quant", ["F32", "F16"])
@pytest.mark.parametrize("name", TEXT_TWINS)
def test_gguf_logits_match_torch(twin_factory, exports, cpu, name, quant):
    twin = twin_factory.get(name)
    _, out = exports(name, quant)
    ids = twins.load_tokenizer(twin)(PARITY_TEXT)["input_ids"]
    runtime = load(out, cpu)
    try:
        got = runtime.logits(ids)
    finally:
        runtime.close()
    figures = compare_logits(_reference_logits(twin, twin.model_dir, ids), got)
    top1, max_err = THRESHOLDS[quant]
    assert figures["top1_agreement_tie_aware"] >= top1 and figures["top1_agreement"] >= 0.975 * top1, figures
    assert figures["max_abs_logit_error"] <= max_err, figures


@pytest.mark.parametrize("quant", ["Q8_0", "Q4_K_M"])
@pytest.mark.parametrize("name", ["llama", "gemma2", "gemma3"])
def test_quantized_gguf_loads_and_generates(twin_factory, tmp_path, cpu, name, quant):
    twin = twin_factory.get(name)
    manifest = _export(twin.model_dir, tmp_path / "out", quant)
    info = manifest["artifacts"][manifest["gguf_file"]]
    assert info["quant"] == quant and sum(info["tensor_types"].values()) > 0
    runtime = load(tmp_path / "out", cpu)
    try:
        result = runtime.generate("Describe the chest X-ray.", GenerationSettings(max_tokens=8, temperature=0, repetition_penalty=1.0))
    finally:
        runtime.close()
    assert result.completion_tokens > 0 and result.prompt_tokens > 0


def test_gemma2_qv_adapter_on_the_fly_matches_peft(twin_factory, tmp_path, cpu):
    """Gemma 2 + q_proj/v_proj LoRA (the set-up known to come out as gibberish elsewhere), merged while exporting."""
    from peft import PeftModel

    twin = twin_factory.get("gemma2")
    assert sorted(twin.lora_kwargs["target_modules"]) == ["q_proj", "v_proj"]
    _export(twin.model_dir, tmp_path / "out", "F32", adapters=[twin.adapter_dir])
    ids = twins.load_tokenizer(twin)(PARITY_TEXT)["input_ids"]
    peft_model = PeftModel.from_pretrained(twins.load_base(twin), twin.adapter_dir).eval()
    with torch.no_grad():
        reference = peft_model(input_ids=torch.tensor([ids])).logits[0].float().numpy()
        base = twins.load_base(twin)(input_ids=torch.tensor([ids])).logits[0].float().numpy()
    runtime = load(tmp_path / "out", cpu)
    try:
        got = runtime.logits(ids)
    finally:
        runtime.close()
    figures = compare_logits(reference, got)
    assert figures["top1_agreement_tie_aware"] == 1.0 and figures["max_abs_logit_error"] <= 5e-3, figures
    assert np.abs(base - reference).max() > 10 * figures["max_abs_logit_error"], "the adapter must matter"


def test_adapter_on_the_fly_equals_merged_checkpoint(twin_factory, tmp_path):
    twin = twin_factory.get("llama")
    merge(str(twin.model_dir), [str(twin.adapter_dir)], tmp_path / "merged")
    a = _export(tmp_path / "merged", tmp_path / "from-merged", "F16")
    b = export(str(twin.model_dir), "gguf", tmp_path / "on-the-fly", quant="F16", adapters=[str(twin.adapter_dir)], name="merged")
    fa = tmp_path / "from-merged" / a["gguf_file"]
    fb = tmp_path / "on-the-fly" / b["gguf_file"]
    assert fa.name == fb.name and sha256_file(fa) == sha256_file(fb)


TOKENIZER_CORPUS = [
    "The chest X-ray shows a 3.5 cm opacity in the right lower lobe.",
    "  leading spaces, tabs\tand\nnew lines\n\n",
    "Numbers 2024, 10mm, 0.5%, and symbols: <>[]{}()!?",
    "Unicode: café, naïve, 中文, emoji 🙂",
]


def _chat(tokenizer):
    import jinja2

    user = {"role": "user", "content": "Describe the findings of this chest X-ray, please."}
    try:
        messages = [{"role": "system", "content": "You are an expert radiologist."}, user]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except jinja2.TemplateError:  # Gemma 2's template refuses a system turn
        return tokenizer.apply_chat_template([user], tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("name", TEXT_TWINS)
def test_token_ids_match_hf_tokenizer(twin_factory, exports, cpu, name):
    twin = twin_factory.get(name)
    _, out = exports(name, "F32")
    tok = twins.load_tokenizer(twin)
    runtime = load(out, cpu)
    try:
        for text in TOKENIZER_CORPUS:
            assert runtime.tokenize(text) == tok(text)["input_ids"], text
        chat = _chat(tok)  # a rendered chat carries its own BOS, as apply_chat_template(tokenize=True) sees it
        assert runtime.tokenize(chat) == tok(chat, add_special_tokens=False)["input_ids"], chat
    finally:
        runtime.close()


def test_demo_model_tokens_and_greedy_text(tmp_path, cpu):
    """The demo model: llama.cpp token ids equal HF's, and `xpack run --temperature 0` on the F16 export
    starts with the same tokens as the torch reference run the same way."""
    from transformers import AutoTokenizer

    base = demo_base_dir()
    manifest = _export(base, tmp_path / "out", "F16")
    assert manifest["vocab"] == {"model": "gpt2", "pre": "smollm", "tokens": 49152}
    tok = AutoTokenizer.from_pretrained(base)
    messages = [{"role": "system", "content": "You are an expert radiologist."}, {"role": "user", "content": "Chest X-ray of a smoker with cough."}]
    gguf_rt = load(tmp_path / "out", cpu)
    try:
        for text in TOKENIZER_CORPUS:
            assert gguf_rt.tokenize(text) == tok(text)["input_ids"], text
        chat_ids = tok.apply_chat_template(messages, add_generation_prompt=True)
        assert gguf_rt.tokenize(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)) == list(chat_ids)
    finally:
        gguf_rt.close()
    runs = {}
    for name, artifact, extra in (("torch", base, ["--runtime", "torch"]), ("gguf", tmp_path / "out", [])):
        r = CliRunner().invoke(cli, ["run", "--artifact", str(artifact), "--profile", "cpu16", "--temperature", "0", "--max-tokens", "12", "--repetition-penalty", "1",
                                     "--system", messages[0]["content"], "--prompt", messages[1]["content"], "--json", *extra])
        assert r.exit_code == 0, r.output
        runs[name] = json.loads(r.output[r.output.index("{"):])
    assert runs["gguf"]["token_ids"] == runs["torch"]["token_ids"], (runs["torch"]["text"], runs["gguf"]["text"])
    assert len(runs["torch"]["token_ids"]) == 12


def test_repetition_penalty_counts_the_prompt_like_transformers(exports, cpu, twin_factory):
    """llama.cpp's sampler remembers only what it sampled; xpack feeds it the prompt so the penalty
    means what it means in transformers (every token of prompt and answer, once)."""
    _, out = exports("llama", "F32")
    with load(out, cpu) as rt:
        prompt = rt.tokenize(rt.prompt_text("Describe the chest X-ray findings."))
        got = rt.generate("Describe the chest X-ray findings.", GenerationSettings(max_tokens=8, temperature=0, repetition_penalty=1.5)).token_ids
        ids, expected = list(prompt), []
        for _ in range(len(got)):
            logits = rt.logits(ids)[-1].astype(np.float64)
            seen = np.array(sorted(set(ids)))
            logits[seen] = np.where(logits[seen] < 0, logits[seen] * 1.5, logits[seen] / 1.5)
            expected.append(int(logits.argmax()))
            ids.append(expected[-1])
    assert got == expected


def test_export_folder_manifest_card_modelfile(twin_factory, exports):
    manifest, out = exports("gemma3_vision", "F32")
    names = {p.name for p in out.iterdir()}
    assert {"README.md", "manifest.json", "Modelfile", manifest["gguf_file"], manifest["mmproj_file"]} <= names
    on_disk = json.loads((out / "manifest.json").read_text())
    for fname, info in on_disk["files"].items():
        assert sha256_file(out / fname) == info["sha256"]
    assert on_disk["format"] == "gguf" and on_disk["artifacts"][on_disk["mmproj_file"]]["role"] == "mmproj"
    assert on_disk["source"]["files"]["model.safetensors"] == sha256_file(twin_factory.get("gemma3_vision").model_dir / "model.safetensors")
    card = (out / "README.md").read_text()
    fm = front_matter(card)
    assert fm["quantized_by"].startswith("xpack") and "gguf" in fm["tags"]
    assert "base_model" not in fm and str(twin_factory.root) not in card  # a local base: no hub id, no path of this machine
    assert "--mmproj" in card and "ollama create" in card and "## Limitations" in card
    assert (out / "Modelfile").read_text().startswith("# ollama Modelfile")
    assert f"FROM ./{manifest['gguf_file']}" in (out / "Modelfile").read_text()


def test_k_quant_fallbacks_are_reported(twin_factory, tmp_path):
    twin = twin_factory.get("llama")  # hidden size 64: rows are not multiples of 256
    manifest = _export(twin.model_dir, tmp_path / "out", "Q4_K_M")
    fallbacks = manifest["artifacts"][manifest["gguf_file"]]["fallbacks"]
    assert fallbacks and all(k.startswith("Q4_K_M->") for k in fallbacks)


def _cli_export(*args):
    return CliRunner().invoke(cli, ["export", *map(str, args)])


def test_export_bad_inputs(twin_factory, tmp_path):
    llama = twin_factory.get("llama")
    out = tmp_path / "out"
    r = _cli_export("--model", llama.model_dir, "--format", "gguf", "--quant", "Q4_X", "--out", out)
    assert r.exit_code == 1 and "unknown GGUF quant type Q4_X" in r.output and "Q4_K_M" in r.output and not out.exists()
    r = _cli_export("--model", llama.model_dir, "--format", "gguf", "--bits", "3", "--out", out)
    assert r.exit_code == 2 and "3" in r.output
    r = _cli_export("--model", llama.model_dir, "--format", "gguf", "--out", out)
    assert r.exit_code == 2 and "--bits" in r.output
    mllama = twin_factory.get("mllama")
    r = _cli_export("--model", mllama.model_dir, "--format", "gguf", "--bits", "16", "--out", out)
    assert r.exit_code == 1 and "llama.cpp has no Llama 3.2 Vision" in r.output and "onnx" in r.output and not out.exists()


def test_export_unsupported_architecture(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2)).save_pretrained(tmp_path / "gpt2")
    r = _cli_export("--model", tmp_path / "gpt2", "--format", "gguf", "--bits", "8", "--out", tmp_path / "out")
    assert r.exit_code == 1 and "does not support architecture GPT2LMHeadModel" in r.output and "gemma2" in r.output
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if "xpack-tmp" in p.name]


def test_modelfile_stops_on_every_end_of_turn_token_the_tokenizer_has(twin_factory):
    """The ollama Modelfile's stop list is the runtimes' END_OF_TURN_TOKENS (one home), not a subset."""
    stops = stop_tokens(Checkpoint(twin_factory.get("mllama").model_dir))  # a Llama 3 tokenizer
    assert stops == ["<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"]
    assert set(stops) <= set(END_OF_TURN_TOKENS)
    assert stop_tokens(Checkpoint(twin_factory.get("gemma3").model_dir)) == ["<end_of_turn>"]


@pytest.mark.parametrize("st,gtype", [("BF16", "BF16"), ("BF16", "F32"), ("F32", "F16"), ("F32", "BF16"), ("F16", "F32")])
@pytest.mark.parametrize("rows,shift,heads", [(None, 0.0, None), (5, 0.0, None), (None, 1.0, None), (None, 0.0, 2)])
def test_materialize_in_row_chunks_equals_whole_tensor_conversion(monkeypatch, st, gtype, rows, shift, heads):
    """The GGUF writer converts in row chunks (a 262208-row embedding never exists in fp32 at once): bit-identical to
    converting the whole tensor, for every trim / Gemma norm shift / RoPE permutation and dtype pair."""
    monkeypatch.setattr(writer, "_CHUNK_BYTES", 3 * 6 * 4)  # three rows per chunk: several chunks and a short last one
    values = np.random.default_rng(0).standard_normal((8, 6)).astype(np.float32)
    base = from_f32(values, st)
    t = writer.GgufTensor("t", TensorOp("w", "w", TensorSpec("w", st, [8, 6])), (rows or 8, 6), gtype, permute_heads=heads, shift=shift, rows=rows)
    got = writer._materialize(t, base, st)
    w = to_f32(base, st)[: rows or 8]
    w = writer._permute(w, heads) if heads else w
    w = w + np.float32(shift)
    want = from_f32(np.ascontiguousarray(w), gtype)
    assert got.tobytes() == np.ascontiguousarray(want).tobytes()
