"""xpack's calibrated GGUF mix (--bits 4/8, --target-size, --max-kl): the knapsack, the option errors, and
the whole export on real Gemma 3 270M + its demo adapter against llama.cpp's plain Q4_K_M."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from xpack.cli import cli
from xpack.errors import XpackError
from xpack.packager.demo.base_model import demo_adapter_dir, demo_base_dir
from xpack.packager.export.calibrate.plan import Candidate, TensorOptions, joint_kl, solve
from xpack.packager.export.job import Calibration, export
from xpack.packager.merge.job import merge
from xpack.packager.verify.job import verify


def _options(n: int = 6, seed: int = 0) -> list[TensorOptions]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        o = TensorOptions(f"t{i}", (64, 64), "Q4_K")
        sens = float(rng.uniform(0.1, 10))
        for qtype, nbytes, err in (("Q4_K", 100, 1.0), ("Q6_K", 150, 0.2), ("Q8_0", 200, 0.05)):
            o.candidates.append(Candidate(qtype, nbytes, sens * err))
        out.append(o)
    return out


def _brute_force(options, budget):
    import itertools

    best = None
    for combo in itertools.product(*[o.candidates for o in options]):
        if sum(c.bytes for c in combo) <= budget:
            kl = sum(c.kl for c in combo)
            best = kl if best is None or kl < best else best
    return best


@pytest.mark.parametrize("budget", [600, 750, 900, 1000])
def test_budget_choice_is_the_lowest_kl_that_fits(budget):
    options = _options()
    choice = solve(options, budget_bytes=budget)
    assert sum(c.bytes for c in choice.values()) <= budget
    assert sum(c.kl for c in choice.values()) == pytest.approx(_brute_force(options, budget), rel=1e-9)


def test_max_kl_choice_is_the_smallest_that_meets_it():
    options = _options()
    everything = sum(min(c.kl for c in o.candidates) for o in options)
    target = everything * 3
    choice = solve(options, max_kl=target)
    assert joint_kl(choice) <= target
    smaller = [b for b in range(600, sum(c.bytes for c in choice.values()), 50) if _brute_force(options, b) is not None and _brute_force(options, b) <= target]
    assert not smaller, f"a smaller file ({smaller[0]} bytes) meets the target"


def test_a_budget_below_the_smallest_mix_is_one_clear_line():
    with pytest.raises(XpackError, match="no mix of the candidate types fits .* give a larger --target-size"):
        solve(_options(), budget_bytes=100)


def test_joint_kl_adds_coherent_changes_before_squaring():
    """Two tensors whose first-order changes point the same way: 4x one alone, not 2x (and opposite: 0)."""
    d = np.array([1.0, -2.0, 0.5])
    own = 0.5 * float(np.mean(d * d))
    a, b = Candidate("Q4_K", 1, own, d), Candidate("Q4_K", 1, own, d.copy())
    assert joint_kl({"a": a, "b": b}) == pytest.approx(4 * own)
    assert joint_kl({"a": a, "b": Candidate("Q4_K", 1, own, -d)}) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--quant", "Q4_K_M", "--max-kl", "0.1"], "choose xpack's calibrated mix, which --bits 4 or 8 makes; --quant Q4_K_M is llama.cpp's plain type"),
        (["--bits", "16", "--calibration", "__FILE__"], "--bits 16 is a plain type"),
        (["--bits", "4", "--max-kl", "0.1", "--target-size", "100MB"], "are two targets; give one"),
    ],
)
def test_calibration_option_errors_are_one_line(tmp_path, args, message):
    text = tmp_path / "cal.txt"
    text.write_text("Chest radiograph shows clear lungs.\n")
    args = [str(text) if a == "__FILE__" else a for a in args]
    r = CliRunner().invoke(cli, ["export", "--model", str(demo_base_dir()), "--format", "gguf", *args, "--out", str(tmp_path / "o")])
    assert r.exit_code != 0 and message in r.output and "Traceback" not in r.output, r.output


@pytest.fixture(scope="module")
def gemma3_merged(tmp_path_factory):
    out = tmp_path_factory.mktemp("gemma3") / "merged"
    merge(str(demo_base_dir("gemma3")), [str(demo_adapter_dir("gemma3"))], out)
    return out


@pytest.mark.slow
def test_calibrated_4bit_gguf_of_real_gemma3_beats_plain_q4_k_m(gemma3_merged, tmp_path):
    """The whole --bits 4 export on real weights: within the plain size + 5%, every tensor's type recorded, and on
    verify's evaluation text (not the calibration text) closer to the torch reference than llama.cpp's Q4_K_M."""
    pytest.importorskip("llama_cpp")
    manifest = export(str(gemma3_merged), "gguf", tmp_path / "mix", bits=4, threads=2, calibration=Calibration())
    cal = manifest["calibration"]
    assert cal["mix"]["bytes"] <= 1.05 * cal["plain"]["bytes"]
    assert len(cal["tensor_types"]) == 127 and cal["calibration"]["sha256"] and cal["calibration"]["tokens"] == 2048
    assert cal["mix"]["kl_mean_calibration"] < cal["plain"]["kl_mean_calibration"]
    card = (tmp_path / "mix" / "README.md").read_text()
    assert "calibrated 4-bit mix" in card and "on the calibration text" in card

    plain = export(str(gemma3_merged), "gguf", tmp_path / "plain", quant="Q4_K_M", threads=2)
    assert plain.get("calibration") is None
    mixed = verify(tmp_path / "mix", gemma3_merged, "cpu16", benchmark=False, max_tokens=8)
    base = verify(tmp_path / "plain", gemma3_merged, "cpu16", benchmark=False, max_tokens=8)
    assert mixed["parity"]["kl_mean"] < 0.5 * base["parity"]["kl_mean"], (mixed["parity"], base["parity"])
    assert not base["parity_pass"] and "--format gguf --bits 4 --max-kl 0.1" in base["advice"]  # verify names the fix
    assert "never the calibration text" in mixed["parity_text"]
    assert mixed["parity_pass"], mixed["checks"]  # the 4-bit verdict (KL <= 0.1) that plain Q4_K_M fails on real Gemma 3
    assert json.loads((tmp_path / "mix" / "manifest.json").read_text())["calibration"]["note"].startswith("KL here is measured on the calibration text")


@pytest.mark.slow
def test_calibrated_export_merges_an_adapter_on_the_fly(tmp_path):
    """--adapter with --bits 4: the statistics need the merged model in torch, so the adapter is merged into a
    temporary checkpoint first; the mix is then measured against that merged model (SmolLM2 demo, --target-size)."""
    pytest.importorskip("llama_cpp")
    manifest = export(str(demo_base_dir()), "gguf", tmp_path / "mix", bits=4, adapters=[str(demo_adapter_dir())], threads=2,
                      calibration=Calibration(target_bytes=100_000_000))
    cal = manifest["calibration"]
    assert manifest["adapters"] and cal["mix"]["bytes"] <= 100_000_000 < cal["plain"]["bytes"]
    assert cal["mix"]["kl_mean_calibration"] < cal["plain"]["kl_mean_calibration"]  # smaller and closer than llama.cpp's Q4_K_M
