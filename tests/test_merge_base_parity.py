"""`xpack merge --measure-merge-base` (issue #15): both merge bases of a QLoRA adapter, measured at merge time
against the model as trained (PeftModel on the bitsandbytes 4-bit base) and the 16-bit base + adapter.

- The numbers on the llama twin: the nf4 merge is the model as trained and the plain merge is the 16-bit base +
  adapter, within float rounding; the cross terms are far larger. The same with the 4-bit base only detected.
- The manifest holds the 2x2 figures, the card a table naming the written choice, the output one line per choice.
- Impossible requests are one line each before any work; a failure during the measurement leaves nothing behind.
"""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from xpack.cli import cli
from xpack.errors import XpackError

# Measured on the llama twin (2-core CPU, 256 tokens): the matching pairs KL ~1.2e-14, top-1 100%; the cross terms
# KL ~2.4e-3, top-1 ~87%.
SAME_KL_MAX = 1e-10
CROSS_KL_MIN = 1e-4
NF4_DQ = ["--qlora-base", "nf4", "--double-quant"]


def _merge(*args):
    return CliRunner().invoke(cli, ["merge", *map(str, args)])


def _choices(manifest) -> dict:
    return {c["merge_base"]: c for c in manifest["merge"]["merge_base_parity"]["choices"]}


def _check_figures(parity):
    choices = {c["merge_base"]: c for c in parity["choices"]}
    qlora, plain = choices["qlora"], choices["plain"]
    assert qlora["vs_as_trained"]["kl_mean"] < SAME_KL_MAX and qlora["vs_as_trained"]["top1_agreement"] == 1.0, qlora
    assert plain["vs_base_16bit"]["kl_mean"] < SAME_KL_MAX and plain["vs_base_16bit"]["top1_agreement"] == 1.0, plain
    for cross in (qlora["vs_base_16bit"], plain["vs_as_trained"]):
        assert cross["kl_mean"] > CROSS_KL_MIN and cross["kl_mean"] > 1000 * qlora["vs_as_trained"]["kl_mean"], (qlora, plain)
    assert parity["tokens"] == 256


def test_qlora_merge_measures_both_bases_and_the_card_shows_them(twin_factory, tmp_path):
    twin = twin_factory.get("llama")
    out = tmp_path / "out"
    r = _merge("--base", twin.model_dir, "--adapter", twin.adapter_dir, "--out", out, *NF4_DQ, "--measure-merge-base")
    assert r.exit_code == 0, r.output
    print(r.stdout)
    manifest = json.loads((out / "manifest.json").read_text())
    parity = manifest["merge"]["merge_base_parity"]
    _check_figures(parity)
    assert parity["written"] == "qlora" and _choices(manifest)["qlora"]["written"] and not _choices(manifest)["plain"]["written"]
    assert parity["as_trained"] == f"PeftModel({twin.adapter_dir}) on the bitsandbytes nf4 double-quant 4-bit base {twin.model_dir}, fp32 compute"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the other merge's temporary folder is gone

    card = (out / "README.md").read_text()
    q = _choices(manifest)["qlora"]
    row = (f"| dequant(quant(W)), nf4, double quantization, blocksize 64 (**written**) | {q['vs_as_trained']['kl_mean']:.3g} | 100.0% "
           f"| {q['vs_base_16bit']['kl_mean']:.3g} | {100 * q['vs_base_16bit']['top1_agreement']:.1f}% |")
    assert "### Merge base: both choices measured" in card and row in card, card
    assert "teacher-forced on the first 256 tokens of xpack's evaluation text" in card
    assert "| the 16-bit weights W | " in card
    lines = r.stdout.splitlines()
    assert lines[-3].startswith("merge base measured on 256 tokens") and lines[-2].startswith("  dequant(quant(W)), nf4") and "(written)" in lines[-2]
    assert lines[-1].startswith("  the 16-bit weights W: ")


def test_a_detected_4bit_adapter_is_measured_with_the_plain_merge_written(twin_factory, tmp_path):
    twin = twin_factory.get("llama")
    adapter = tmp_path / "adapter"
    shutil.copytree(twin.adapter_dir, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "unsloth/SmolLM2-135M-Instruct-bnb-4bit"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    r = _merge("--base", twin.model_dir, "--adapter", adapter, "--out", tmp_path / "out", "--measure-merge-base", "--json")
    assert r.exit_code == 0, r.output
    manifest = json.loads(r.stdout)
    parity = manifest["merge"]["merge_base_parity"]
    _check_figures(parity)
    assert parity["written"] == "plain" and manifest["merge"]["qlora"] is None
    assert "on the bitsandbytes nf4 double-quant 4-bit base" in parity["as_trained"]  # nf4 + double quant: Unsloth's
    assert "| the 16-bit weights W (**written**) | " in (tmp_path / "out" / "README.md").read_text()


def _one_line_error(result, needle, out):
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error: ") and needle in lines[0], result.output
    assert not out.exists()


@pytest.mark.parametrize(
    "extra, needle",
    [
        ([], ("--measure-merge-base compares the two merge bases of an adapter trained on a 4-bit base, and this one shows no sign of it; "
              "pass --qlora-base nf4|fp4")),
        ([*NF4_DQ, "--blocksize", "128"], "which quantizes in blocks of 64; drop --blocksize 128 or --measure-merge-base"),
        (["--qlora-base", "nf4", "WEIGHT"], "--measure-merge-base runs the adapters as PEFT does, at weight 1; drop :0.5"),
    ],
)
def test_impossible_measurements_are_one_line(twin_factory, tmp_path, extra, needle):
    twin = twin_factory.get("llama")
    out = tmp_path / "out"
    adapter = f"{twin.adapter_dir}:0.5" if "WEIGHT" in extra else twin.adapter_dir
    extra = [e for e in extra if e != "WEIGHT"]
    _one_line_error(_merge("--base", twin.model_dir, "--adapter", adapter, "--out", out, *extra, "--measure-merge-base"), needle, out)


def test_missing_bitsandbytes_is_one_line(twin_factory, tmp_path, monkeypatch):
    twin = twin_factory.get("llama")
    real_find_spec = __import__("importlib.util").util.find_spec
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a))
    out = tmp_path / "out"
    r = _merge("--base", twin.model_dir, "--adapter", twin.adapter_dir, "--out", out, *NF4_DQ, "--measure-merge-base")
    _one_line_error(r, "--measure-merge-base runs the model as trained with torch, transformers, peft, bitsandbytes; "
                       "bitsandbytes is not installed: pip install 'xpack[pack]'", out)


def test_a_failed_measurement_leaves_nothing_behind(twin_factory, tmp_path, monkeypatch):
    """The measurement fails after both merges are on disk: neither the output nor a temporary folder stays."""
    twin = twin_factory.get("llama")

    def broken(*args, **kwargs):
        working = [p for p in tmp_path.iterdir() if not p.name.endswith(".xpack-lock")]  # the claim on --out aside
        assert len(working) == 2  # the written merge and the other one, both temporary
        raise XpackError("the torch runtime broke")

    monkeypatch.setattr("xpack.packager.merge.merge_base_parity.load", broken)
    out = tmp_path / "out"
    r = _merge("--base", twin.model_dir, "--adapter", twin.adapter_dir, "--out", out, *NF4_DQ, "--measure-merge-base")
    _one_line_error(r, "the torch runtime broke", out)
    assert list(tmp_path.iterdir()) == []
