"""xpack verify: passes on faithful artifacts, fails (exit 1, metric named) on wrong or damaged ones."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner

from xpack.cli import cli
from xpack.errors import XpackError
from xpack.packager.export.job import export
from xpack.packager.io.tensors import sha256_file
from xpack.packager.merge.job import merge
from xpack.packager.verify import parity as parity_module
from xpack.packager.verify.job import END, START, Side, _advice, parity, splice_section, update_card, verify
from xpack.profiles.machine import machine_info
from xpack.profiles.profile import load_profile
from xpack.runtimes.registry import load
from xpack.runtimes.settings import GenerationSettings


@pytest.fixture(scope="module")
def llama_set(twin_factory, tmp_path_factory):
    """The llama twin merged (the reference), its F32 GGUF, and an F32 GGUF of the base without the adapter."""
    twin = twin_factory.get("llama")
    root = tmp_path_factory.mktemp("verify")
    merge(str(twin.model_dir), [str(twin.adapter_dir)], root / "merged")
    export(str(root / "merged"), "gguf", root / "gguf", quant="F32")
    export(str(twin.model_dir), "gguf", root / "base-gguf", quant="F32")
    return root


def _verify(*args):
    return CliRunner().invoke(cli, ["verify", *map(str, args)])


def test_faithful_gguf_passes(llama_set):
    r = _verify("--artifact", llama_set / "gguf", "--reference", llama_set / "merged", "--profile", "cpu16", "--no-benchmark")
    assert r.exit_code == 0, r.output
    assert "verdict: PASS" in r.output and "top1_agreement" in r.output and "kl_mean" in r.output
    assert "all 64 greedy tokens match" in r.output or "greedy tokens match" in r.output


def test_artifact_of_another_model_fails(llama_set):
    """The base exported without the adapter is not the model that was trained."""
    r = _verify("--artifact", llama_set / "base-gguf", "--reference", llama_set / "merged", "--profile", "cpu16", "--no-benchmark", "--json")
    assert r.exit_code == 1
    report = json.loads(r.output)
    failed = [c["metric"] for c in report["checks"] if not c["pass"]]
    assert failed and set(failed) <= {"top1_agreement", "kl_mean"}
    assert report["parity_pass"] is False


def test_damaged_gguf_fails(llama_set, tmp_path):
    import gguf

    damaged = tmp_path / "damaged"
    shutil.copytree(llama_set / "gguf", damaged)
    path = next(damaged.glob("*.gguf"))
    tensor = next(t for t in gguf.GGUFReader(path).tensors if t.name == "blk.0.attn_q.weight")
    noise = np.random.default_rng(0).normal(0, 0.5, int(tensor.n_elements)).astype(np.float32)
    with open(path, "r+b") as f:
        f.seek(int(tensor.data_offset))
        f.write(noise.tobytes())
    r = _verify("--artifact", damaged, "--reference", llama_set / "merged", "--profile", "cpu16", "--no-benchmark")
    assert r.exit_code == 1 and f"Error: {path}: sha256" in r.output, r.output  # its manifest says so first
    r = _verify("--artifact", damaged, "--reference", llama_set / "merged", "--profile", "cpu16", "--no-benchmark", "--no-check")
    assert r.exit_code == 1, r.output
    assert "FAIL" in r.output and ("kl_mean" in r.output or "top1_agreement" in r.output)


def test_benchmark_and_card_update(llama_set, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(llama_set / "gguf", art)
    before = (art / "README.md").read_text()
    r = _verify("--artifact", art, "--reference", llama_set / "merged", "--profile", "cpu16", "--runs", "1", "--max-tokens", "8", "--update-card", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    bench = report["benchmark"]
    for who in ("artifact", "reference"):
        s = bench[who]["summary"]
        assert s["load_s"]["median"] > 0 and s["decode_tok_s"]["median"] > 0 and s["peak_rss_mb"]["median"] > 0
        assert bench[who]["runs"][0]["completion_tokens"] == 256
    card = (art / "README.md").read_text()
    assert "## Parity" in card and "## Performance Benchmarks" in card
    assert "| Hardware | Loading Time | Inference Time (256 tokens) | Memory Usage |" in card
    assert card.count("not measured") == 6  # a100 and t4 rows: three cells each, never an invented figure
    head, rest = card.split(START)
    tail = rest.split(END)[1]
    assert (head + tail).replace("\n", "") == before.replace("\n", "")  # everything else intact
    manifest = json.loads((art / "manifest.json").read_text())
    assert set(manifest["verification"]) == {"cpu16"}
    assert manifest["files"]["README.md"]["sha256"] == sha256_file(art / "README.md")
    # idempotent: the same report written again changes nothing
    update_card(art, report)
    assert (art / "README.md").read_text() == card


def test_splice_section_replaces_only_its_block():
    card = "# T\n\nintro\n\n## Limitations\n\n- a\n"
    once = splice_section(card, f"{START}\nX\n{END}\n")
    assert once.index(START) < once.index("## Limitations") and "intro" in once and "- a" in once
    twice = splice_section(once, f"{START}\nY\n{END}\n")
    assert "X" not in twice and "Y" in twice and twice.replace("Y", "X") == once


def test_reference_with_another_tokenizer(llama_set, twin_factory):
    other = twin_factory.get("gemma2")
    r = _verify("--artifact", llama_set / "gguf", "--reference", other.model_dir, "--profile", "cpu16", "--no-benchmark")
    assert r.exit_code == 1 and "tokenizes the evaluation text differently" in r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1


def test_gpu_profile_without_gpu(llama_set):
    if machine_info().gpus:
        pytest.skip("this machine has a GPU")
    r = _verify("--artifact", llama_set / "gguf", "--reference", llama_set / "merged", "--profile", "t4", "--no-benchmark")
    assert r.exit_code == 1 and "GPU" in r.output and len(r.output.strip().splitlines()) == 1


def test_unreadable_prompts_file(llama_set, tmp_path):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text("{not json\n")
    r = _verify("--artifact", llama_set / "gguf", "--reference", llama_set / "merged", "--profile", "cpu16", "--no-benchmark", "--prompts", bad)
    assert r.exit_code == 1 and "line 1 is not JSON" in r.output and len(r.output.strip().splitlines()) == 1
    bad.write_text('{"text": "no prompt key"}\n')
    r = _verify("--artifact", llama_set / "gguf", "--reference", llama_set / "merged", "--profile", "cpu16", "--no-benchmark", "--prompts", bad)
    assert r.exit_code == 1 and 'has no "prompt"' in r.output


def test_prompts_file_and_text_are_used(llama_set, tmp_path):
    """A chat prompt and a raw one (a base model's fine-tune, fed as written on both sides: issue #13)."""
    prompts = tmp_path / "p.jsonl"
    raw = "Below is a patient case.\n### Symptoms:\nknee pain\n### Diagnosis:\n"
    prompts.write_text(json.dumps({"prompt": "Describe a normal knee MRI."}) + "\n" + json.dumps({"prompt": raw, "raw": True}) + "\n")
    text = tmp_path / "t.txt"
    text.write_text("The knee joint shows no effusion. The menisci and cruciate ligaments are intact. " * 3)
    report = verify(llama_set / "gguf", llama_set / "merged", "cpu16", prompts_file=prompts, text_file=text, benchmark=False, max_tokens=8)
    assert len(report["parity"]["prompts"]) == 2 and report["parity"]["tokens"] < 200 and report["parity_pass"]
    with load(llama_set / "gguf", load_profile("cpu16"), check=False) as rt:
        greedy = GenerationSettings(max_tokens=8, temperature=0, repetition_penalty=1.0)
        assert report["parity"]["prompts"][1]["reference_tokens"] == len(rt.generate(raw, greedy, raw=True).token_ids)
    for row, why in (({"prompt": raw, "raw": "yes"}, '"raw" must be true or false'), ({"prompt": raw, "raw": True, "system": "x"}, "fed as written")):
        prompts.write_text(json.dumps(row) + "\n")
        r = _verify("--artifact", llama_set / "gguf", "--reference", llama_set / "merged", "--profile", "cpu16", "--no-benchmark", "--prompts", prompts)
        assert r.exit_code == 1 and why in r.output and len(r.output.strip().splitlines()) == 1


def test_images_parity_for_a_vision_gguf(twin_factory, tmp_path):
    """Gemma 3 with vision: text GGUF + mmproj against transformers, with images (teacher-forced after the image)."""
    from PIL import Image

    twin = twin_factory.get("gemma3_vision")
    export(str(twin.model_dir), "gguf", tmp_path / "gguf", quant="F32")
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (32, 32), (30, 160, 90)).save(images / "square.png")
    Image.new("RGB", (48, 40), (200, 20, 20)).save(images / "wide.jpg")
    report = verify(tmp_path / "gguf", twin.model_dir, "cpu16", images_dir=images, benchmark=False, max_tokens=8)
    assert report["parity_pass"], report["checks"]
    assert {c["metric"] for c in report["checks"]} >= {"image_top1_agreement", "image_kl_mean"}
    per_image = report["parity"]["images"]
    assert [p["image"].rsplit("/", 1)[1] for p in per_image] == ["square.png", "wide.jpg"]
    assert all(p["tokens"] > 8 and p["kl_mean"] < 1e-6 for p in per_image)


def test_images_on_a_text_only_artifact(llama_set, tmp_path):
    from PIL import Image

    (tmp_path / "i").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "i" / "a.png")
    r = _verify("--artifact", llama_set / "gguf", "--reference", llama_set / "merged", "--profile", "cpu16", "--no-benchmark", "--images", tmp_path / "i")
    assert r.exit_code == 1 and "text-only" in r.output and len(r.output.strip().splitlines()) == 1


def test_faithful_fp32_onnx_passes(llama_set):
    export(str(llama_set / "merged"), "onnx", llama_set / "onnx", bits=32)
    report = verify(llama_set / "onnx", llama_set / "merged", "cpu16", benchmark=False, max_tokens=16)
    assert report["runtime"] == "onnx" and report["precision_class"] == "fp32"
    assert report["parity_pass"], report["checks"]
    assert report["parity"]["kl_mean"] < 1e-6 and all(q["diverges_at"] is None for q in report["parity"]["prompts"])


class _Tokens:
    """A tokenizer as parity() reads it: its size and decode."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def decode(self, ids) -> str:
        return " ".join(map(str, ids))


def test_parity_on_the_rows_the_tokenizer_can_produce():
    """Gemma 3 4B's config keeps 262208 embedding rows for a 262145-token tokenizer, and its GGUF keeps the 262145 (as
    llama.cpp's converter trims them): the two are compared on the artifact's rows, renormalized, and the report says
    so; an artifact missing rows the tokenizer can produce is still one clear line."""
    rng = np.random.default_rng(0)
    ids, greedy = [1, 2, 3, 4], [{"ids": [5, 6], "text": "x"}]
    ref_logits = rng.standard_normal((4, 12)).astype(np.float32)
    ref_logits[:, 10:] = -30.0  # padding rows no token maps to
    art_logits = ref_logits[:, :10] + 0.01 * rng.standard_normal((4, 10)).astype(np.float32)
    figures = parity(Side(ids, art_logits, greedy, 10), Side(ids, ref_logits, greedy, 12), _Tokens(10))
    assert figures["vocabulary"]["compared_rows"] == 10 and figures["vocabulary"]["reference_rows"] == 12
    assert "renormalized" in figures["vocabulary"]["note"] and 0 < figures["kl_mean"] < 1e-3 and figures["top1_agreement"] == 1.0
    same = parity(Side(ids, ref_logits, greedy, 12), Side(ids, ref_logits, greedy, 12), _Tokens(10))
    assert "vocabulary" not in same and same["kl_mean"] == pytest.approx(0, abs=1e-9)
    with pytest.raises(XpackError, match=r"smaller than the reference's \(12\) and than its tokenizer's \(11 tokens\)"):
        parity(Side(ids, art_logits, greedy, 10), Side(ids, ref_logits, greedy, 12), _Tokens(11))


def test_a_failed_verdict_names_the_calibrated_export_in_the_artifacts_format(tmp_path):
    ref = SimpleNamespace(path=tmp_path / "merged", peft=None)
    checks = [{"metric": "kl_mean", "pass": False, "limit": "<= 0.1"}]
    assert "--format onnx --bits 4 --max-kl 0.1" in _advice(tmp_path / "a", "onnx", ref, checks)
    assert "--format gguf --bits 4 --max-kl 0.1" in _advice(tmp_path / "a", "llamacpp", ref, checks)


def test_compare_logits_row_by_row_equals_the_whole(monkeypatch):
    """The figures computed a few rows at a time (verify's memory on a 262k vocabulary) are those of the whole arrays,
    written out here with numpy in one piece."""
    rng = np.random.default_rng(0)
    ref = rng.normal(0, 3, (37, 1000)).astype(np.float32)
    cand = (ref + rng.normal(0, 0.3, ref.shape)).astype(np.float32)
    lp = ref.astype(np.float64) - np.log(np.exp(ref.astype(np.float64)).sum(-1, keepdims=True))
    lq = cand.astype(np.float64) - np.log(np.exp(cand.astype(np.float64)).sum(-1, keepdims=True))
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    monkeypatch.setattr(parity_module, "ROW_CHUNK_VALUES", 3000)  # 3 rows at a time
    got = parity_module.compare_logits(ref, cand)
    assert got["kl_mean"] == pytest.approx(kl.mean(), rel=1e-9) and got["kl_max"] == pytest.approx(kl.max(), rel=1e-9)
    assert got["kl_p99"] == pytest.approx(np.percentile(kl, 99), rel=1e-9)
    assert got["max_abs_logit_error"] == float(np.abs(ref.astype(np.float64) - cand).max())
    assert got["top1_agreement"] == float((ref.argmax(-1) == cand.argmax(-1)).mean())

