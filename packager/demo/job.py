"""``xpack demo``: the main job on a built-in model, end to end, with a visible result.

materialize the built-in base (SmolLM2-135M-Instruct or real Gemma 3 270M) -> merge its demo adapter -> export GGUF 4-bit and ONNX 4-bit -> answer
one radiology request with each on the cpu16 profile -> verify each against the merged reference
and write the figures into their model cards -> print a summary table.
"""

from __future__ import annotations

import time
from pathlib import Path

from xpack.errors import XpackError, require_modules
from xpack.packager.demo.base_model import demo_adapter_dir, demo_base_dir
from xpack.packager.demo.models import DEFAULT_MODEL, builtin_model
from xpack.packager.export.job import Calibration, export
from xpack.packager.merge.job import merge
from xpack.packager.verify.job import update_card, verify
from xpack.profiles.profile import load_profile
from xpack.runtimes.registry import RUNTIMES, load
from xpack.runtimes.settings import GenerationSettings

DEMO_SYSTEM = "You are an expert radiologist."
DEMO_PROMPT = "Chest X-ray, 67-year-old man with fever and productive cough for four days. Describe the findings."
DEMO_PROFILE = "cpu16"
# (folder, format, bits): the artifacts the demo makes from the merged model.
DEMO_EXPORTS = (("gguf-4bit", "gguf", 4), ("onnx-int4", "onnx", 4))  # GGUF 4-bit: the calibrated mix
# The demo's ONNX int4 is the fixed scheme (8 bits for the head and attention): on SmolLM2 it passes the 4-bit verdict
# (KL 0.064 at 1.22x Q4_K_M's size), where the calibrated mix within 1.1x cannot with 4- and 8-bit weights only (0.147;
# README, benchmarks/quant.py). None: the format's default.
DEMO_CALIBRATE = {"gguf": None, "onnx": False}


def _answer(path: Path, profile, max_tokens: int, runtime: str | None = None):
    messages = [{"role": "system", "content": DEMO_SYSTEM}, {"role": "user", "content": DEMO_PROMPT}]
    settings = GenerationSettings(max_tokens=max_tokens, temperature=0)
    with load(path, profile, runtime=runtime) as rt:
        return rt.generate(messages, settings)


def _onnx_available() -> bool:
    return "onnx" in RUNTIMES


DEMO_MODULES = ("torch", "transformers", "safetensors", "gguf", "llama_cpp")  # merge, GGUF export, the runtimes, verify


def run_demo(out: Path, force: bool = False, max_tokens: int = 60, verify_runs: int = 1, model: str = DEFAULT_MODEL) -> dict:
    """The demo on one built-in model, everything under ``out``."""
    require_modules("xpack demo", DEMO_MODULES)  # before the cache folder is made: a missing extra leaves nothing behind
    spec = builtin_model(model)
    out = Path(out)
    exports = [e for e in DEMO_EXPORTS if e[1] != "onnx" or _onnx_available()]
    merged = out / "merged"
    for p in [merged, *(out / folder for folder, _, _ in exports)]:
        if p.exists() and not force:
            raise XpackError(f"{p} already exists; pass --force to make the demo again or choose another --out")
    profile = load_profile(DEMO_PROFILE)
    clock = {"start": time.perf_counter()}
    base = demo_base_dir(model)
    clock["base"] = time.perf_counter()
    merge(str(base), [str(demo_adapter_dir(model))], merged, force=force)
    clock["merge"] = time.perf_counter()
    artifacts = {}
    for folder, fmt, bits in exports:
        t0 = time.perf_counter()
        manifest = export(str(merged), fmt, out / folder, bits=bits, force=force, calibration=Calibration(enabled=DEMO_CALIBRATE[fmt]))
        artifacts[folder] = {"path": out / folder, "format": fmt, "manifest": manifest, "export_s": time.perf_counter() - t0}
    answers = {"base (torch)": _answer(base, profile, max_tokens, runtime="torch"), "merged (torch)": _answer(merged, profile, max_tokens, runtime="torch")}
    for folder, a in artifacts.items():
        answers[folder] = _answer(a["path"], profile, max_tokens)
    cache: dict = {}
    for folder, a in artifacts.items():
        a["report"] = verify(a["path"], merged, DEMO_PROFILE, runs=verify_runs, max_tokens=32, cache=cache)
        a["card"] = update_card(a["path"], a["report"])
    clock["end"] = time.perf_counter()
    return _result(spec, base, merged, artifacts, answers, clock)


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.suffix in (".gguf", ".onnx", ".onnx_data", ".data"))


def _result(spec, base, merged, artifacts, answers, clock) -> dict:
    rows = []
    for folder, a in artifacts.items():
        r = a["report"]
        s = r["benchmark"]["artifact"]["summary"]
        rows.append({
            "artifact": folder, "size_mb": _size(a["path"]) / 1e6, "kl_mean": r["parity"]["kl_mean"],
            "top1": r["parity"]["top1_agreement"], "decode_tok_s": s["decode_tok_s"]["median"],
            "peak_rss_mb": s["peak_rss_mb"]["median"], "verdict": "pass" if r["parity_pass"] else "FAIL", "card": str(a["card"]),
        })
    ref = next(iter(artifacts.values()))["report"]["benchmark"]["reference"]["summary"] if artifacts else None
    lines = [
        f"base model:   {base}  ({spec.title}, {spec.repo_id}, from the {spec.pip_spec.split('==')[0]} wheel)",
        f"merged model: {merged}  (merged in {clock['merge'] - clock['base']:.1f} s)",
        "",
        f"prompt ({DEMO_PROFILE} profile, greedy): {DEMO_PROMPT}",
    ]
    for label, r in answers.items():
        lines += ["", f"{label} says ({r.decode_tok_s:.0f} tok/s):", *[f"  {line}" for line in r.text.strip().splitlines()]]
    lines += ["", f"{'artifact':<14}{'size MB':>9}{'KL mean':>10}{'top-1':>8}{'decode tok/s':>14}{'peak MB':>9}  verdict"]
    for row in rows:
        lines.append(f"{row['artifact']:<14}{row['size_mb']:>9.1f}{row['kl_mean']:>10.4f}{100 * row['top1']:>7.1f}%"
                     f"{row['decode_tok_s']:>14.1f}{row['peak_rss_mb']:>9.0f}  {row['verdict']}")
    if ref:
        lines.append(f"{'torch (ref)':<14}{_size_st(merged) / 1e6:>9.1f}{'-':>10}{'-':>8}{ref['decode_tok_s']['median']:>14.1f}{ref['peak_rss_mb']['median']:>9.0f}")
    lines += ["", "model cards (with parity and benchmark tables):", f"  {merged / 'README.md'}", *[f"  {row['card']}" for row in rows],
              f"done in {clock['end'] - clock['start']:.0f} s"]
    return {
        "model": spec.key, "base": str(base), "merged": str(merged), "rows": rows,
        "artifacts": {k: {"path": str(a["path"]), "format": a["format"], "export_s": a["export_s"], "report": a["report"]} for k, a in artifacts.items()},
        "answers": {k: r.to_dict() for k, r in answers.items()},
        "seconds": {k: round(v - clock["start"], 2) for k, v in clock.items() if k != "start"},
        "lines": lines,
    }


def _size_st(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))
