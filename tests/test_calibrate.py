"""Calibration building blocks (packager/export/calibrate/ and quantize() with an imatrix and type overrides).

- the built-in calibration text shares no 8-word window with the evaluation text; files and chat JSONL read, bad ones are one-line errors;
- collect_stats: the importance matrix equals mean(x^2) computed directly; the Fisher is finite, positive, and for the
  output head exactly mean((onehot(sampled) - p)^2) with the tokens sampled from the model's own distribution;
- the GGUF names and row order are the writer's (Q/K permutation, tied head -> token_embd.weight);
- quantize(): overrides give those types, the imatrix changes the bytes, and qerror reproduces every tensor bit for bit.

K-quants need rows of a multiple of 256 values, so the quantizer tests use a 1-layer Llama of hidden size 256 ("wide")
with the llama twin's tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import twins
from xpack.errors import XpackError
from xpack.packager.archs import require_arch
from xpack.packager.export.calibrate.names import gguf_imatrix, gguf_stats, gguf_tensor_names
from xpack.packager.export.calibrate.qerror import dequantize_rows, quant_error, quantize_rows, row_bytes
from xpack.packager.export.calibrate.stats import collect_stats, sample_tokens
from xpack.packager.export.calibrate.text import read_calibration
from xpack.packager.export.gguf.writer import export_gguf, quantize, to_gguf_rows
from xpack.packager.io.checkpoint import Checkpoint

ROOT = Path(__file__).resolve().parents[1]
EVAL_TEXT = ROOT / "packager" / "verify" / "data" / "eval_medical.txt"
CALIBRATION_TEXT = ROOT / "packager" / "export" / "calibrate" / "data" / "calibration_medical.txt"
RADIOLOGY_JSONL = ROOT / "examples" / "data" / "radiology_reports.jsonl"
# One type per tensor of the wide model's block: every type the budgeted export chooses from.
OVERRIDES = {
    "blk.0.attn_q.weight": "Q4_K",
    "blk.0.attn_k.weight": "Q5_K",
    "blk.0.attn_v.weight": "Q6_K",
    "blk.0.attn_output.weight": "Q8_0",
    "blk.0.ffn_gate.weight": "Q5_0",
    "blk.0.ffn_up.weight": "Q4_0",
    "blk.0.ffn_down.weight": "F16",
}
IMATRIX_BLIND = {"Q8_0", "F16", "F32"}  # types whose ggml quantizer ignores the importance matrix


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and message
    return message


# --------------------------------------------------------------------------------------------------
# calibration text


def test_builtin_text_is_disjoint_from_the_eval_text():
    cal, ev = _words(CALIBRATION_TEXT.read_text()), _words(EVAL_TEXT.read_text())
    windows = {tuple(ev[i : i + 8]) for i in range(len(ev) - 7)}
    shared = [" ".join(cal[i : i + 8]) for i in range(len(cal) - 7) if tuple(cal[i : i + 8]) in windows]
    assert not shared, shared[:5]
    assert len(cal) >= 2000
    default = read_calibration(None)
    assert default.sha256 == hashlib.sha256(CALIBRATION_TEXT.read_bytes()).hexdigest()
    assert default.chunks == (CALIBRATION_TEXT.read_text(),) and "built-in" in default.source


def test_jsonl_rows_plain_text_and_tokenization(tmp_path, twin_factory):
    rows = [
        {"messages": [{"role": "user", "content": "Describe the knee MRI."}, {"role": "assistant", "content": "Medial meniscal tear."}]},
        {"prompt": "Chest X-ray, cough.", "response": "No consolidation."},
        {"text": "Plain sentence about a renal cyst."},
    ]
    path = tmp_path / "cal.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + json.dumps(rows[2]) + "\n")
    cal = read_calibration(path)
    assert len(cal.chunks) == 3 and cal.chunks[2] == rows[2]["text"]
    assert cal.chunks[1] == ({"role": "user", "content": "Chest X-ray, cough."}, {"role": "assistant", "content": "No consolidation."})
    tokenizer = twins.load_tokenizer(twin_factory.get("llama"))
    sequences, n = cal.tokenize(tokenizer, seq_len=512)
    assert len(sequences) == 1 and n == len(sequences[0])  # three short rows packed into one sequence
    text = tokenizer.decode(sequences[0])
    assert text.count("<|im_start|>assistant\n") == 2 and "Plain sentence about a renal cyst." in text

    examples = read_calibration(RADIOLOGY_JSONL)
    assert len(examples.chunks) == len([line for line in RADIOLOGY_JSONL.read_text().splitlines() if line.strip()])
    assert all(isinstance(c, tuple) and c[0]["role"] == "user" for c in examples.chunks)

    plain = tmp_path / "notes.txt"
    plain.write_text("Findings: no fracture.\n\nImpression: normal.\n")
    assert read_calibration(plain).chunks == ("Findings: no fracture.\n\nImpression: normal.\n",)


def test_tokenize_packs_windows_and_stops_at_max_tokens(twin_factory):
    tokenizer = twins.load_tokenizer(twin_factory.get("gemma3"))
    sequences, n = read_calibration(None).tokenize(tokenizer, seq_len=100, max_tokens=450)
    assert n == 450 == sum(map(len, sequences)) and [len(s) for s in sequences] == [100, 100, 100, 100, 50]
    assert all(s[0] == tokenizer.bos_token_id for s in sequences)  # Gemma adds BOS: every window starts with it


def test_calibration_user_errors(tmp_path):
    with pytest.raises(XpackError) as e:
        read_calibration(tmp_path / "missing.txt")
    assert "does not exist" in _one_line_error(e)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", \n')
    with pytest.raises(XpackError) as e:
        read_calibration(bad)
    assert "bad.jsonl:2" in _one_line_error(e)
    bad.write_text('{"prompt": "a", "response": "b"}\n{"question": "a"}\n')
    with pytest.raises(XpackError) as e:
        read_calibration(bad)
    assert "bad.jsonl:2" in _one_line_error(e) and "messages" in str(e.value)
    bad.write_text('{"messages": [{"role": "user"}]}\n')
    with pytest.raises(XpackError) as e:
        read_calibration(bad)
    assert "content" in _one_line_error(e)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(XpackError) as e:
        read_calibration(empty)
    assert "empty" in _one_line_error(e)


# --------------------------------------------------------------------------------------------------
# statistics


@pytest.fixture(scope="module")
def llama_stats(twin_factory):
    twin = twin_factory.get("llama")
    return twin, collect_stats(twin.model_dir, read_calibration(None), max_tokens=384, seq_len=96)


def test_imatrix_equals_mean_of_squared_inputs(llama_stats):
    twin, stats = llama_stats
    model = twins.load_base(twin)
    sequences, n = read_calibration(None).tokenize(twins.load_tokenizer(twin), 96, 384)
    assert stats.tokens == n == 384 and stats.sequences == len(sequences) == 4
    assert stats.calibration_sha256 == read_calibration(None).sha256
    attn_in, head_in = [], []
    with torch.no_grad():
        for ids in sequences:
            ids = torch.tensor([ids])
            attn_in.append(model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))[0])
            head_in.append(model.model(input_ids=ids).last_hidden_state[0])
    expected_attn = torch.cat(attn_in).double().pow(2).mean(0).numpy()
    expected_head = torch.cat(head_in).double().pow(2).mean(0).numpy()
    for proj in ("q_proj", "k_proj", "v_proj"):
        np.testing.assert_allclose(stats.tensors[f"model.layers.0.self_attn.{proj}.weight"].in_sq_mean, expected_attn, rtol=1e-5)
    np.testing.assert_allclose(stats.tensors["lm_head.weight"].in_sq_mean, expected_head, rtol=1e-5)
    linears = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(stats.tensors) == linears and all(s.count == n for s in stats.tensors.values())
    no_fisher = collect_stats(twin.model_dir, read_calibration(None), max_tokens=384, seq_len=96, fisher=False)
    assert no_fisher.fisher_seed is None and all(s.out_fisher is None for s in no_fisher.tensors.values())
    for name, s in stats.tensors.items():
        np.testing.assert_allclose(no_fisher.tensors[name].in_sq_mean, s.in_sq_mean, rtol=1e-6)


def test_fisher_is_positive_and_exact_for_the_output_head(llama_stats):
    twin, stats = llama_stats
    for name, s in stats.tensors.items():
        assert s.out_fisher.dtype == np.float32 and np.isfinite(s.out_fisher).all() and (s.out_fisher > 0).all(), name
    # The head's output is the logits: dL/dlogits = onehot(sampled) - p, with tokens drawn as collect_stats draws them.
    model = twins.load_base(twin)
    sequences, _ = read_calibration(None).tokenize(twins.load_tokenizer(twin), 96, 384)
    generator = torch.Generator().manual_seed(stats.fisher_seed)
    total = 0
    with torch.no_grad():
        for ids in sequences:
            log_probs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
            sampled, probs = sample_tokens(log_probs, generator), log_probs.exp()
            grad = torch.zeros_like(probs).scatter_(1, sampled, 1.0) - probs
            total = total + grad.double().pow(2).sum(0)
    np.testing.assert_allclose(stats.tensors["lm_head.weight"].out_fisher, (total / stats.tokens).numpy(), rtol=1e-4, atol=1e-9)


def test_sampled_tokens_follow_the_model_distribution():
    probs = torch.tensor([[0.0, 0.1, 0.6, 0.3]]).repeat(100_000, 1)
    sampled = sample_tokens(probs.log(), torch.Generator().manual_seed(0))
    frequencies = torch.bincount(sampled[:, 0], minlength=4).double() / len(probs)
    assert frequencies[0] == 0 and torch.allclose(frequencies, probs[0].double(), atol=0.01), frequencies


def test_gemma3_stats_and_gguf_names(twin_factory):
    twin = twin_factory.get("gemma3")
    stats = collect_stats(twin.model_dir, read_calibration(None), max_tokens=128, seq_len=64)
    names = gguf_tensor_names(twin.model_dir, stats.tensors)
    assert names["lm_head.weight"] == "token_embd.weight"  # tied head (skipped by the writer): llama.cpp uses the embedding
    assert names["model.layers.1.mlp.down_proj.weight"] == "blk.1.ffn_down.weight"
    assert names["model.layers.0.self_attn.o_proj.weight"] == "blk.0.attn_output.weight"
    by_gguf = gguf_stats(stats, twin.model_dir)
    assert set(by_gguf) == set(names.values())
    assert all(np.isfinite(s.out_fisher).all() and (s.out_fisher > 0).all() for s in by_gguf.values())


def test_llama_names_and_row_order_follow_the_writer(llama_stats, wide):
    twin, stats = llama_stats
    names = gguf_tensor_names(twin.model_dir, stats.tensors)
    assert names["lm_head.weight"] == "token_embd.weight" and names["model.layers.0.self_attn.q_proj.weight"] == "blk.0.attn_q.weight"
    by_gguf = gguf_stats(stats, twin.model_dir)
    cfg = Checkpoint(twin.model_dir).config
    arch = require_arch(cfg, "test")
    q = stats.tensors["model.layers.0.self_attn.q_proj.weight"].out_fisher
    np.testing.assert_array_equal(by_gguf["blk.0.attn_q.weight"].out_fisher, to_gguf_rows(arch, cfg, "model.layers.0.self_attn.q_proj.weight", q))
    assert not np.array_equal(by_gguf["blk.0.attn_q.weight"].out_fisher, q)  # llama's Q rows are permuted in the GGUF
    # ... exactly as the writer permutes the weight itself.
    model_dir, f32 = wide
    hf = twins.load_base(model_dir).model.layers[0].self_attn.k_proj.weight.detach().numpy()
    wide_cfg = Checkpoint(model_dir).config
    np.testing.assert_array_equal(to_gguf_rows(arch, wide_cfg, "model.layers.0.self_attn.k_proj.weight", hf), _tensors(f32)["blk.0.attn_k.weight"])


# --------------------------------------------------------------------------------------------------
# quantize() with an importance matrix and type overrides, and qerror against it


@pytest.fixture(scope="module")
def wide(twin_factory, tmp_path_factory):
    """A 1-layer Llama with rows of 256 and 512 values (K-quants apply), and its F32 GGUF."""
    from transformers import LlamaConfig, LlamaForCausalLM

    twin = twin_factory.get("llama")
    root = tmp_path_factory.mktemp("wide")
    model_dir = root / "model"
    cfg = LlamaConfig.from_pretrained(twin.model_dir)
    cfg.update({"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64})
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(model_dir)
    twins.load_tokenizer(twin).save_pretrained(model_dir)
    out = root / "gguf"
    out.mkdir()
    export_gguf(model_dir, [], out, "F32", "wide", threads=1)
    return model_dir, out / "wide-F32.gguf"


def _tensors(path: Path) -> dict[str, np.ndarray]:
    return {t.name: np.asarray(t.data) for t in gguf.GGUFReader(path).tensors}


def _types(path: Path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def test_quantize_overrides_imatrix_and_qerror_bit_for_bit(wide, tmp_path):
    model_dir, f32 = wide
    stats = collect_stats(model_dir, read_calibration(None), max_tokens=256, seq_len=128, fisher=False)
    imatrix = gguf_imatrix(stats, model_dir)
    assert set(imatrix) == {*OVERRIDES, "token_embd.weight"}
    quantize(f32, tmp_path / "with.gguf", "Q4_K_M", 1, imatrix=imatrix, overrides=OVERRIDES)
    quantize(f32, tmp_path / "without.gguf", "Q4_K_M", 1, overrides=OVERRIDES)
    weights = _tensors(f32)
    types_with, types_without = _types(tmp_path / "with.gguf"), _types(tmp_path / "without.gguf")
    assert {n: types_with[n] for n in OVERRIDES} == OVERRIDES == {n: types_without[n] for n in OVERRIDES}
    with_imatrix, without = _tensors(tmp_path / "with.gguf"), _tensors(tmp_path / "without.gguf")
    for name, gtype in types_with.items():
        if gtype == "F32":
            continue
        assert np.array_equal(with_imatrix[name], without[name]) == (gtype in IMATRIX_BLIND), (name, gtype)
        for data, im in ((with_imatrix[name], imatrix.get(name)), (without[name], None)):
            raw = np.ascontiguousarray(data).view(np.uint8).reshape(data.shape[0], -1)
            assert np.array_equal(quantize_rows(weights[name], gtype, im), raw), (name, gtype, im is not None)
            expected = dequantize_rows(raw, gtype) - weights[name]
            assert np.array_equal(quant_error(weights[name], gtype, im).view(np.uint32), expected.view(np.uint32)), (name, gtype)


def test_quantize_rejects_bad_imatrix_and_overrides(wide, twin_factory, tmp_path):
    _, f32 = wide
    dst = tmp_path / "out.gguf"
    cases = [
        ({"imatrix": {"blk.9.attn_q.weight": np.ones(256, np.float32)}}, "does not have"),
        ({"imatrix": {"blk.0.attn_q.weight": np.ones(255, np.float32)}}, "needs 256 finite values"),
        ({"imatrix": {"blk.0.attn_q.weight": np.full(256, np.nan, np.float32)}}, "finite"),
        ({"overrides": {"blk.0.attn_q.weight": "Q4_Z"}}, "unknown ggml type"),
        ({"overrides": {"blk.0.attn_x.weight": "Q8_0"}}, "does not have"),
    ]
    for kwargs, words in cases:
        with pytest.raises(XpackError) as e:
            quantize(f32, dst, "Q4_K_M", 1, **kwargs)
        assert words in _one_line_error(e), (kwargs, str(e.value))
    small = tmp_path / "small"
    small.mkdir()
    export_gguf(twin_factory.get("llama").model_dir, [], small, "F32", "small", threads=1)
    with pytest.raises(XpackError) as e:
        quantize(small / "small-F32.gguf", dst, "Q8_0", 1, overrides={"blk.0.ffn_up.weight": "Q4_K"})
    assert "multiple of 256" in _one_line_error(e)
    assert not dst.exists()


def test_quant_error_on_a_random_matrix():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 512)).astype(np.float32)
    imatrix = np.exp(2 * rng.standard_normal(512)).astype(np.float32)  # a few columns matter far more than the rest
    weighted = {}
    for gtype in ("Q4_0", "Q5_0", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "F16", "F32"):
        plain, informed = quant_error(w, gtype), quant_error(w, gtype, imatrix)
        assert plain.shape == w.shape and plain.dtype == np.float32 and np.isfinite(plain).all()
        assert quantize_rows(w, gtype).shape == (32, row_bytes(gtype, 512))
        weighted[gtype] = float((plain**2 * imatrix).sum()), float((informed**2 * imatrix).sum())
        if gtype not in IMATRIX_BLIND:
            assert weighted[gtype][1] < weighted[gtype][0], (gtype, weighted[gtype])  # the imatrix lowers the error where it matters
    assert weighted["F32"] == (0.0, 0.0)
    order = [weighted[t][0] for t in ("Q4_0", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "F16")]
    assert order == sorted(order, reverse=True), weighted
    for args, words in [((w, "Q4_Z"), "cannot evaluate"), ((w[:, :500], "Q4_K"), "multiple of 256"), ((w, "Q4_K", imatrix[:10]), "10 values"),
                        ((w.reshape(-1), "Q8_0"), "[out, in]"), ((w, "IQ2_XXS"), "needs an importance matrix")]:
        with pytest.raises(XpackError) as e:
            quant_error(*args)
        assert words in _one_line_error(e)

