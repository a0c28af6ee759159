"""Faithful quantization (issue #11): xpack's calibrated GGUF mix vs llama.cpp's plain types, and xpack's ONNX, side by side.

On the two built-in models merged with their demo adapters (real Gemma 3 270M + the GemmaXRayAnalyzer-recipe
LoRA; SmolLM2-135M-Instruct + its LoRA), from the same merged checkpoint:

- llama.cpp's plain Q4_K_M and Q8_0 (``xpack export --quant``: xpack writes the F16/F32 GGUF as llama.cpp's
  convert_hf_to_gguf.py does, benchmarks/gguf.py checks that, and llama.cpp's own quantizer makes the type);
- xpack's calibrated mix ``--bits 4`` and ``--bits 8`` (within the plain size + 5%) and ``--bits 4 --max-kl 0.1``;
- xpack's ONNX int4 and int8: the calibrated mix (``--bits 4/8``, within the Q4_K_M / Q8_0 GGUF's size + 5%;
  ``--bits 4 --max-kl 0.1``) and the fixed scheme (``--no-calibrate``), and ONNX fp16 on Gemma 3.

Each artifact: file size, teacher-forced mean KL and top-1 against the torch fp32 merged model on verify's
evaluation text (disjoint from the calibration text; `xpack verify --no-benchmark`), export wall time, and
greedy decode tok/s (`xpack run`, 64 tokens, cpu16 profile, median of --repeats runs, the variants
interleaved). Prints the table with the ratios to the plain type and writes benchmarks/results/quant.json.

    python benchmarks/quant.py [--models gemma3,smollm2] [--repeats 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE] + [str(HERE)]  # last: see _harness.py

import _harness as H  # noqa: E402
from xpack import __version__  # noqa: E402
from xpack.packager.demo.base_model import demo_adapter_dir, demo_base_dir  # noqa: E402
from xpack.packager.verify.job import machine_label  # noqa: E402

PROMPT = "Chest X-ray, 67-year-old man with fever and productive cough for four days. Describe the findings."
# name -> (format, export options, the plain artifact it is compared with)
VARIANTS = {
    "llama.cpp Q4_K_M": ("gguf", ["--quant", "Q4_K_M"], None),
    "xpack --bits 4": ("gguf", ["--bits", "4"], "llama.cpp Q4_K_M"),
    "xpack --bits 4 --max-kl 0.1": ("gguf", ["--bits", "4", "--max-kl", "0.1"], "llama.cpp Q4_K_M"),
    "llama.cpp Q8_0": ("gguf", ["--quant", "Q8_0"], None),
    "xpack --bits 8": ("gguf", ["--bits", "8"], "llama.cpp Q8_0"),
    "ONNX int4": ("onnx", ["--bits", "4"], "llama.cpp Q4_K_M"),
    "ONNX int4 --max-kl 0.1": ("onnx", ["--bits", "4", "--max-kl", "0.1"], "llama.cpp Q4_K_M"),
    "ONNX int4 fixed": ("onnx", ["--bits", "4", "--no-calibrate"], "llama.cpp Q4_K_M"),
    "ONNX int8": ("onnx", ["--bits", "8"], "llama.cpp Q8_0"),
    "ONNX int8 fixed": ("onnx", ["--bits", "8", "--no-calibrate"], "llama.cpp Q8_0"),
    "ONNX fp16": ("onnx", ["--bits", "16"], None),
}
ONLY = {"ONNX fp16": ("gemma3",)}  # the fp16 row is issue #11's Gemma 3 target


def sh(cmd: list, label: str) -> tuple[float, str]:
    H.log(label)
    t0 = time.perf_counter()
    proc = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, env=H.child_env())
    if proc.returncode not in (0, 1):  # verify exits 1 when a verdict fails: its figures still count
        raise SystemExit(f"{label} failed (exit {proc.returncode}): {H.error_line(proc.stderr or proc.stdout)}")
    return time.perf_counter() - t0, proc.stdout


def size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.suffix in (".gguf", ".onnx", ".onnx_data", ".data"))


def run_model(model: str, repeats: int, variants: list[str]) -> dict:
    root = H.CACHE / "quant" / model
    merged = root / "merged"
    if not (merged / "config.json").is_file():
        sh(H.xpack("merge", "--base", demo_base_dir(model), "--adapter", demo_adapter_dir(model), "--out", merged, "--force"), f"{model}: merge")
    rows = {}
    for name, (fmt, options, _) in VARIANTS.items():
        if model not in ONLY.get(name, (model,)) or name not in variants:
            continue
        out = root / name.replace(" ", "_").replace(".", "").replace("-", "")
        export_s, _ = sh(H.xpack("export", "--model", merged, "--format", fmt, *options, "--out", out, "--force", "--json"), f"{model}: export {name}")
        manifest = json.loads((out / "manifest.json").read_text())
        _, report = sh(H.xpack("verify", "--artifact", out, "--reference", merged, "--profile", "cpu16", "--no-benchmark", "--max-tokens", 16, "--json"),
                       f"{model}: verify {name}")
        parity = json.loads(report)["parity"]
        cal = manifest.get("calibration") or {}
        rows[name] = {"format": fmt, "options": options, "path": str(out), "bytes": size(out), "export_s": export_s,
                      "kl_mean": parity["kl_mean"], "kl_p99": parity["kl_p99"], "top1": parity["top1_agreement"], "tokens": parity["tokens"],
                      "calibration": {k: cal.get(k) for k in ("calibration", "target", "plain", "mix", "rounds")} if cal else None, "decode_tok_s": []}
    for r in range(repeats):  # interleaved: every variant once per round
        for name, row in rows.items():
            _, out = sh(H.xpack("run", "--artifact", row["path"], "--profile", "cpu16", "--prompt", PROMPT, "--max-tokens", 64, "--temperature", 0, "--json"),
                        f"{model}: run {name} ({r + 1}/{repeats})")
            row["decode_tok_s"].append(json.loads(out)["decode_tok_s"])
    for name, row in rows.items():
        row["decode_tok_s_median"] = statistics.median(row["decode_tok_s"])
        plain = VARIANTS[name][2]
        if plain and plain in rows:
            p = rows[plain]
            row["vs_plain"] = {"plain": plain, "size_ratio": row["bytes"] / p["bytes"], "kl_ratio": row["kl_mean"] / p["kl_mean"],
                               "export_time_ratio": row["export_s"] / p["export_s"], "decode_ratio": row["decode_tok_s_median"] / p["decode_tok_s_median"]}
    return {"model": model, "merged": str(merged), "rows": rows}


def table(result: dict) -> list[str]:
    lines = [f"### {result['model']}", "", "| artifact | size MB | mean KL | top-1 | vs plain: size | KL | export s (x plain) | decode tok/s (x plain) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in result["rows"].items():
        v = r.get("vs_plain")
        rel = f"{v['size_ratio']:.2f}x | {v['kl_ratio']:.2f}x" if v else "- | -"
        t = f"{r['export_s']:.0f}" + (f" ({v['export_time_ratio']:.1f}x)" if v else "")
        d = f"{r['decode_tok_s_median']:.1f}" + (f" ({v['decode_ratio']:.2f}x)" if v else "")
        lines.append(f"| {name} | {r['bytes'] / 1e6:.1f} | {r['kl_mean']:.4f} | {100 * r['top1']:.1f}% | {rel} | {t} | {d} |")
    return lines


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=H.csv, default=["gemma3", "smollm2"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variants", type=lambda t: [v.strip() for v in t.split(";") if v.strip()], default=list(VARIANTS),
                    help="';'-separated names of the rows to measure again, with the plain rows they are compared with; "
                         "the other rows are kept from --json")
    ap.add_argument("--json", type=Path, default=H.RESULTS / "quant.json")
    args = ap.parse_args(argv)
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant: {', '.join(unknown)} (known: {'; '.join(VARIANTS)})")
    variants = sorted({*args.variants, *(VARIANTS[v][2] for v in args.variants if VARIANTS[v][2])}, key=list(VARIANTS).index)
    t0 = time.perf_counter()
    results = [run_model(m, args.repeats, variants) for m in args.models]
    if set(variants) != set(VARIANTS) and args.json.is_file():  # a partial run: keep the other rows of the last full one
        earlier = {r["model"]: r for r in json.loads(args.json.read_text())["models"]}
        for r in results:
            kept = {k: v for k, v in earlier.get(r["model"], {}).get("rows", {}).items() if k not in r["rows"]}
            r["rows"] = {k: (r["rows"].get(k) or kept[k]) for k in VARIANTS if k in r["rows"] or k in kept}
            r["rerun"] = variants
    for r in results:
        print("\n".join(table(r)) + "\n")
    H.write_json(args.json, {"machine": machine_label(), "python": platform.python_version(), "xpack": __version__, "wall_s": time.perf_counter() - t0,
                             "machine_info": H.machine_info("llama_cpp_python", "onnxruntime"), "repeats": args.repeats, "models": results})
    print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(H.main(main, {}))
