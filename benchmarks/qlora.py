"""QLoRA-aware merge (issue #15): which merge is the model the user trained? Measured, not assumed.

Two QLoRA adapters trained by the project's own script (examples/train_demo_adapter.py) on CPU with
bitsandbytes, on the 4-bit bases of the two built-in models:

- symptom-smollm2: MedGemma-SymptomDiagnosis's recipe on SmolLM2-135M-Instruct (q_proj/v_proj, r=16,
  alpha=32, dropout 0.05, NF4 + double quantization);
- xray-gemma3: GemmaXRayAnalyzer's recipe on real Gemma 3 270M (r=16, alpha=16, all attention and MLP
  projections, NF4).

For each: the plain merge (adapter + 16-bit W, what PEFT's merge_and_unload on the 16-bit base gives)
and the nf4 merge (``xpack merge --qlora-base nf4``: adapter + dequant(NF4(W))), and the GGUF Q4_K_M
and ONNX int4 exports of each, teacher-forced on the built-in evaluation text (never the training
data) against (i) the model as trained (PeftModel on the bitsandbytes 4-bit base, fp32 compute) and
(ii) the 16-bit base + adapter (PeftModel unmerged). The floor is bitsandbytes' own CPU numerics:
the 4-bit base alone against its dequantized fp32 twin (both with a zero adapter).

Targets: nf4 merge KL to the model as trained <= 3x the floor and >= 100x closer than the plain
merge's; each 4-bit export of the nf4 merge closer to the trained model than the same export of
the plain merge.

    python benchmarks/qlora.py [--cases symptom-smollm2,xray-gemma3] [--json PATH]

Adapters, merges and exports are cached under benchmarks/.cache/qlora/ (delete it to retrain).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE] + [str(HERE)]  # last: see _harness.py

import _harness as H  # noqa: E402
from xpack import __version__  # noqa: E402
from xpack.packager.demo.base_model import demo_base_dir  # noqa: E402
from xpack.packager.verify.job import machine_label, verify  # noqa: E402
from xpack.packager.verify.reference import Reference  # noqa: E402
from xpack.runtimes.torch_ref import PeftOnBase  # noqa: E402

TRAIN = H.ROOT / "examples" / "train_demo_adapter.py"
PROFILE = "cpu16"
CASES = {
    "symptom-smollm2": dict(model="smollm2", quant="nf4", double_quant=True, seed_recipe="MedGemma-SymptomDiagnosis",
                            train=["--target-modules", "q_proj,v_proj", "--r", "16", "--alpha", "32", "--epochs", "3"]),
    "xray-gemma3": dict(model="gemma3", quant="nf4", double_quant=False, seed_recipe="GemmaXRayAnalyzer", train=["--epochs", "3"]),
}
TARGET_FLOOR_RATIO = 3.0
TARGET_PLAIN_RATIO = 100.0


def run(cmd: list[str], label: str) -> float:
    H.log(f"{label}: {' '.join(map(str, cmd[:6]))} ...")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=H.child_env())
    if proc.returncode != 0:
        raise SystemExit(f"{label} failed (exit {proc.returncode}): {H.error_line(proc.stderr or proc.stdout)}")
    return time.perf_counter() - t0


def train(case: str, spec: dict, root: Path) -> Path:
    adapter = root / "adapter"
    if not (adapter / "adapter_model.safetensors").is_file():
        cmd = [sys.executable, str(TRAIN), "--model", spec["model"], "--out", str(adapter), "--force", "--no-check", "--qlora", spec["quant"],
               *(["--double-quant"] if spec["double_quant"] else []), *spec["train"]]
        run(cmd, f"{case}: train the QLoRA adapter")
    return adapter


def zero_adapter(adapter: Path, out: Path) -> Path:
    """The adapter with every lora_B zeroed: PeftModel over it is the base alone (for the floor)."""
    if (out / "adapter_model.safetensors").is_file():
        return out
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.zero_() if ".lora_B." in k else v) for k, v in load_file(str(adapter / "adapter_model.safetensors")).items()}
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    shutil.copy(adapter / "adapter_config.json", out / "adapter_config.json")
    return out


def qlora_flags(spec: dict) -> list[str]:
    return ["--qlora-base", spec["quant"], *(["--double-quant"] if spec["double_quant"] else [])]


def build(case: str, spec: dict, base: Path, adapter: Path, zero: Path, root: Path) -> dict[str, Path]:
    """Merges (plain, nf4, the dequantized base twin) and the 4-bit exports of both merges, cached."""
    made = {"plain merge": root / "plain", "nf4 merge": root / "nf4", "base twin": root / "base-dequant"}
    jobs = {
        "plain merge": ["merge", "--base", base, "--adapter", adapter],
        "nf4 merge": ["merge", "--base", base, "--adapter", adapter, *qlora_flags(spec)],
        "base twin": ["merge", "--base", base, "--adapter", zero, *qlora_flags(spec)],
    }
    for name, args in jobs.items():
        if not (made[name] / "config.json").is_file():
            run(H.xpack(*args, "--out", made[name], "--force"), f"{case}: {name}")
    for merge in ("plain", "nf4"):
        for fmt, folder in (("gguf", "gguf-q4_k_m"), ("onnx", "onnx-int4")):
            out = root / f"{merge}-{folder}"
            made[f"{merge} {folder}"] = out
            if not (out / "manifest.json").is_file():
                run(H.xpack("export", "--model", root / merge, "--format", fmt, *(["--quant", "Q4_K_M"] if fmt == "gguf" else ["--bits", 4]),
                           "--out", out, "--force", "--threads", 2),
                    f"{case}: {merge} -> {folder}")
    return made


def parity(artifact: Path, reference: Reference, cache: dict) -> dict:
    report = verify(artifact, reference, PROFILE, benchmark=False, max_tokens=16, cache=cache)
    p = report["parity"]
    return {"kl_mean": p["kl_mean"], "top1": p["top1_agreement"], "kl_p99": p["kl_p99"], "tokens": p["tokens"], "reference": report["reference_label"]}


def measure_case(case: str, spec: dict) -> dict:
    root = H.CACHE / "qlora" / case
    base = demo_base_dir(spec["model"])
    adapter = train(case, spec, root)
    zero = zero_adapter(adapter, root / "adapter-zero")
    made = build(case, spec, base, adapter, zero, root)
    trained = Reference(base, PeftOnBase((str(adapter),), spec["quant"], spec["double_quant"]))
    sixteen = Reference(base, PeftOnBase((str(adapter),), None))
    floor_ref = Reference(base, PeftOnBase((str(zero),), spec["quant"], spec["double_quant"]))
    cache: dict = {}
    H.log(f"{case}: floor (bitsandbytes 4-bit base vs its dequantized fp32 twin)")
    floor = parity(made["base twin"], floor_ref, cache)
    rows = {}
    for name in ("plain merge", "nf4 merge", "plain gguf-q4_k_m", "nf4 gguf-q4_k_m", "plain onnx-int4", "nf4 onnx-int4"):
        H.log(f"{case}: {name}")
        rows[name] = {"vs trained": parity(made[name], trained, cache), "vs 16-bit + adapter": parity(made[name], sixteen, cache)}
    plain, nf4 = rows["plain merge"]["vs trained"]["kl_mean"], rows["nf4 merge"]["vs trained"]["kl_mean"]
    checks = {
        "nf4 merge <= 3x floor": nf4 <= TARGET_FLOOR_RATIO * max(floor["kl_mean"], 0.0) or nf4 <= 1e-9,
        "nf4 merge >= 100x closer than plain": plain >= TARGET_PLAIN_RATIO * nf4,
        **{f"nf4 {f} closer than plain {f}": rows[f"nf4 {f}"]["vs trained"]["kl_mean"] < rows[f"plain {f}"]["vs trained"]["kl_mean"]
           for f in ("gguf-q4_k_m", "onnx-int4")},
    }
    return {"case": case, "model": spec["model"], "recipe": spec["seed_recipe"], "quant": spec["quant"], "double_quant": spec["double_quant"],
            "adapter": str(adapter), "adapter_card": (adapter / "README.md").read_text(encoding="utf-8").split("## Training", 1)[-1].strip(),
            "floor": floor, "rows": rows, "ratios": {"nf4_over_floor": nf4 / floor["kl_mean"] if floor["kl_mean"] else None,
                                                     "plain_over_nf4": plain / nf4 if nf4 else None}, "checks": checks}


def table(result: dict) -> list[str]:
    lines = [f"### {result['case']} ({result['recipe']} recipe, {result['quant']}{' + double quant' if result['double_quant'] else ''})", "",
             "| artifact | KL vs as trained | top-1 | KL vs 16-bit + adapter | top-1 |", "|---|---|---|---|---|"]
    f = result["floor"]
    lines.append(f"| floor: 4-bit base vs its dequantized twin | {f['kl_mean']:.3g} | {100 * f['top1']:.1f}% | - | - |")
    for name, r in result["rows"].items():
        a, b = r["vs trained"], r["vs 16-bit + adapter"]
        lines.append(f"| {name} | {a['kl_mean']:.3g} | {100 * a['top1']:.1f}% | {b['kl_mean']:.3g} | {100 * b['top1']:.1f}% |")
    lines += ["", *[f"- {name}: {'met' if ok else 'MISSED'}" for name, ok in result["checks"].items()]]
    return lines


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=H.csv, default=list(CASES), help=f"comma-separated ({', '.join(CASES)})")
    ap.add_argument("--json", type=Path, default=H.RESULTS / "qlora.json")
    args = ap.parse_args(argv)
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        raise SystemExit(f"unknown case: {', '.join(unknown)} (known: {', '.join(CASES)})")
    t0 = time.perf_counter()
    results = [measure_case(case, CASES[case]) for case in args.cases]
    for result in results:
        print("\n".join(table(result)) + "\n")
    report = {"machine": machine_label(), "python": platform.python_version(), "xpack": __version__, "profile": PROFILE,
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "wall_s": time.perf_counter() - t0,
              "machine_info": H.machine_info("torch", "bitsandbytes", "llama_cpp_python", "onnxruntime"), "cases": results}
    H.write_json(args.json, report)
    print(f"wrote {args.json}", file=sys.stderr)
    print(json.dumps({r["case"]: r["checks"] for r in results}))
    return 0


if __name__ == "__main__":
    sys.exit(H.main(main, {}))
