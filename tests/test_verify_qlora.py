"""`xpack verify` against the model as trained (issue #15): PeftModel over the bitsandbytes 4-bit base on CPU,
fp32 compute, as the parity reference of any artifact.

- The numbers: the `--qlora-base nf4 --double-quant` merge of a twin is that model within float rounding
  (KL < 1e-10, top-1 100%); the plain merge, into the 16-bit weights, is far from it (KL > 1e-4 and > 100x the nf4 merge's).
- The report, the manifest and the card name the reference; the benchmark runs it in a process of its own.
- Mixed, incomplete or impossible reference options are one line each, exit 1.
"""

from __future__ import annotations

import builtins
import json
import shutil

import pytest
from click.testing import CliRunner

from xpack.cli import cli
from xpack.errors import XpackError
from xpack.packager.merge.job import merge
from xpack.packager.merge.stream import MergeSettings
from xpack.packager.verify.job import verify
from xpack.packager.verify.reference import choose_reference
from xpack.runtimes.registry import load
from xpack.runtimes.torch_ref import PeftOnBase

NF4_DQ = MergeSettings(qlora_base="nf4", double_quant=True)
# Measured on the twins (2-core CPU) against the as-trained reference: the nf4 merge, KL mean 1.1e-14 (llama)
# and 7.3e-15 (gemma3), top-1 100%: float rounding; the plain merge, KL mean 1.9e-3 (llama, top-1 95%) and
# 8.7e-4 (gemma3, top-1 59%), ~1e11 times the nf4 merge's.
NF4_KL_MAX = 1e-10
PLAIN_OVER_NF4 = 100
PLAIN_KL_MIN = 1e-4


def _verify(*args):
    return CliRunner().invoke(cli, ["verify", *map(str, args)])


def _as_trained(twin) -> list[str]:
    return ["--reference-base", twin.model_dir, "--reference-adapter", twin.adapter_dir, "--reference-quant", "nf4", "--reference-double-quant"]


@pytest.fixture(scope="module")
def merges(twin_factory, tmp_path_factory):
    """Per twin: the plain merge and the nf4 double-quant merge of its adapter."""
    root = tmp_path_factory.mktemp("verify-qlora")

    def get(name):
        twin = twin_factory.get(name)
        folder = root / name
        if not folder.exists():
            merge(str(twin.model_dir), [str(twin.adapter_dir)], folder / "plain")
            merge(str(twin.model_dir), [str(twin.adapter_dir)], folder / "nf4", NF4_DQ)
        return twin, folder

    return get


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_the_nf4_merge_is_the_model_as_trained_and_the_plain_merge_is_not(merges, name):
    twin, folder = merges(name)
    reference = choose_reference(base=twin.model_dir, adapters=(twin.adapter_dir,), quant="nf4", double_quant=True)
    cache: dict = {}
    reports = {label: verify(folder / label, reference, "cpu16", benchmark=False, max_tokens=8, cache=cache) for label in ("nf4", "plain")}
    nf4, plain = reports["nf4"]["parity"], reports["plain"]["parity"]
    print(f"{name}: nf4 merge KL {nf4['kl_mean']:.3g} top-1 {nf4['top1_agreement']:.4f}; "
          f"plain merge KL {plain['kl_mean']:.3g} top-1 {plain['top1_agreement']:.4f}")
    assert nf4["kl_mean"] < NF4_KL_MAX and nf4["top1_agreement"] == 1.0, nf4
    assert all(q["diverges_at"] is None for q in nf4["prompts"])
    assert plain["kl_mean"] > PLAIN_KL_MIN and plain["kl_mean"] > PLAIN_OVER_NF4 * nf4["kl_mean"], (plain["kl_mean"], nf4["kl_mean"])
    assert reports["nf4"]["parity_pass"] and reports["nf4"]["reference_kind"] == "as-trained"


def test_cli_report_card_and_benchmark_name_the_reference(merges, tmp_path):
    twin, folder = merges("llama")
    art = tmp_path / "nf4"
    shutil.copytree(folder / "nf4", art)
    label = f"PeftModel({twin.adapter_dir}) on the bitsandbytes nf4 double-quant 4-bit base {twin.model_dir}, fp32 compute"
    r = _verify("--artifact", art, *_as_trained(twin), "--profile", "cpu16", "--runs", "1", "--max-tokens", "4", "--update-card", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert report["reference_label"] == label and report["reference"] == str(twin.model_dir)
    assert report["benchmark"]["reference"]["summary"]["gen_256_s"]["median"] > 0  # the reference, benchmarked in its own process
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["verification"]["cpu16"]["reference"] == label
    assert manifest["verification"]["cpu16"]["reference_kind"] == "as-trained"
    card = (art / "README.md").read_text()
    assert f"- `cpu16`: the model as trained, {label}" in card
    assert "against the torch reference (the merged checkpoint" not in card

    text = _verify("--artifact", art, *_as_trained(twin), "--profile", "cpu16", "--no-benchmark", "--max-tokens", "4")
    assert text.exit_code == 0 and f"against {label} on profile cpu16" in text.output.splitlines()[0], text.output


def test_the_16bit_base_with_the_adapter_unmerged_is_the_plain_merge(merges):
    """--reference-quant none (the default): PeftModel over the fp32 base, the plain merge's model."""
    twin, folder = merges("llama")
    reference = choose_reference(base=twin.model_dir, adapters=(twin.adapter_dir,))
    report = verify(folder / "plain", reference, "cpu16", benchmark=False, max_tokens=4)
    assert report["reference_label"] == f"PeftModel({twin.adapter_dir}) unmerged on the 16-bit base {twin.model_dir}"
    assert report["parity"]["kl_mean"] < NF4_KL_MAX and report["parity"]["top1_agreement"] == 1.0, report["parity"]


def _one_line_error(result, needle):
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error: ") and needle in lines[0], result.output


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--reference", "MERGED", "--reference-base", "BASE", "--reference-adapter", "ADAPTER"], "are two references; give one of them"),
        (["--reference-quant", "nf4"], "--reference-quant describes the as-trained reference, which needs --reference-base"),
        (["--reference-adapter", "ADAPTER"], "--reference-adapter describes the as-trained reference, which needs --reference-base"),
        (["--reference-base", "BASE"], "--reference-base needs --reference-adapter"),
        (["--reference-base", "BASE", "--reference-adapter", "ADAPTER", "--reference-double-quant"],
         "--reference-double-quant describes the 4-bit base of --reference-quant"),
        ([], "no reference: give --reference MERGED, or --reference-base BASE --reference-adapter ADAPTER"),
    ],
)
def test_mixed_or_incomplete_reference_options_are_one_line(merges, extra, needle):
    twin, folder = merges("llama")
    paths = {"MERGED": folder / "plain", "BASE": twin.model_dir, "ADAPTER": twin.adapter_dir}
    _one_line_error(_verify("--artifact", folder / "nf4", "--profile", "cpu16", "--no-benchmark", *[paths.get(a, a) for a in extra]), needle)


def test_an_adapter_of_another_model_is_one_line(merges, twin_factory):
    twin, folder = merges("llama")
    other = twin_factory.get("gemma3")
    r = _verify("--artifact", folder / "nf4", "--reference-base", twin.model_dir, "--reference-adapter", other.adapter_dir,
                "--reference-quant", "nf4", "--profile", "cpu16", "--no-benchmark")
    _one_line_error(r, f"adapter {other.adapter_dir} was made for another base model")
    assert r.output.rstrip().endswith("as --reference-base")


def test_missing_bitsandbytes_is_one_line(merges, monkeypatch):
    twin, folder = merges("llama")
    real_find_spec = __import__("importlib.util").util.find_spec
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a))
    r = _verify("--artifact", folder / "nf4", *_as_trained(twin), "--profile", "cpu16", "--no-benchmark")
    _one_line_error(r, "--reference-quant nf4 loads the base with bitsandbytes, which is not installed; pip install 'xpack[pack]'")


def test_the_torch_runtime_says_bitsandbytes_is_missing(twin_factory, monkeypatch, cpu):
    """The runtime's own check, for callers that construct it without verify's (e.g. runtimes/bench.py)."""
    twin = twin_factory.get("llama")
    real_import = builtins.__import__

    def no_bnb(name, *args, **kwargs):
        if name == "bitsandbytes" or name.startswith("bitsandbytes."):
            raise ImportError("No module named 'bitsandbytes'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    with pytest.raises(XpackError, match=r"needs bitsandbytes, which is not installed; pip install 'xpack\[pack\]'$"):
        load(twin.model_dir, cpu, runtime="torch", peft=PeftOnBase((str(twin.adapter_dir),), "nf4", True))


def test_several_adapters_are_all_active(merges, twin_factory, tmp_path):
    """Two --reference-adapter: their deltas add up, as in xpack's merge of both."""
    twin, _ = merges("llama")
    second = twin_factory.get("llama", seed=1)
    adapters = (twin.adapter_dir, second.adapter_dir)
    merge(str(twin.model_dir), [str(a) for a in adapters], tmp_path / "both", NF4_DQ)
    merge(str(twin.model_dir), [str(twin.adapter_dir)], tmp_path / "first", NF4_DQ)
    reference = choose_reference(base=twin.model_dir, adapters=adapters, quant="nf4", double_quant=True)
    both = verify(tmp_path / "both", reference, "cpu16", benchmark=False, max_tokens=4)["parity"]
    first = verify(tmp_path / "first", reference, "cpu16", benchmark=False, max_tokens=4)["parity"]
    assert both["kl_mean"] < NF4_KL_MAX and both["top1_agreement"] == 1.0, both
    assert first["kl_mean"] > PLAIN_OVER_NF4 * both["kl_mean"], (first, both)
