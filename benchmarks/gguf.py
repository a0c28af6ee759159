#!/usr/bin/env python3
"""Benchmark ``xpack export --format gguf`` and ``xpack run`` against llama.cpp's own tools, on the demo model.

The model: the demo merged checkpoint (SmolLM2-135M, llama, fp32), built once into
``benchmarks/.cache/demo-merged``. llama.cpp's side: ``convert_hf_to_gguf.py`` from the
llama-cpp-python 0.3.36 sdist (downloaded once into ``benchmarks/.cache/sdist``, run with its own
``gguf-py`` first on PYTHONPATH) and llama.cpp's quantizer (``llama_cpp.llama_model_quantize`` with
the default parameters, in a subprocess: the code of the ``llama-quantize`` tool). Three parts:

  export   wall time and peak RSS of ``xpack export --quant Q`` vs the converter ``--outtype f32`` +
           the quantizer (and vs the converter ``--outtype f16`` path); fresh processes, order alternating.
  quality  KL(torch fp32 || GGUF) mean and p99, top-1, perplexity over the built-in evaluation text,
           teacher-forced through ``xpack.runtimes``, for xpack's file and llama.cpp's of the same type.
  decode   tokens/s after the first token, 128 greedy tokens, EOS ignored: ``load(file, profile).generate``
           vs a raw ``llama_cpp.Llama`` + ``Llama.generate`` loop on the same prompt ids.

Targets: quality no worse than llama.cpp's file from the f32 intermediate (mean KL at most 1.01x, at most
one top-1 token fewer); decode xpack / raw >= 0.97. Measuring: ``_harness.py``. More in benchmarks/README.md.

Usage:
  .venv/bin/python benchmarks/gguf.py [--quants F16,Q8_0,Q6_K,Q5_K_M,Q4_K_M] [--repeats N] [--json PATH]
                                      [--parts export,quality,decode] [--wait-idle S] [--profile]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE] + [str(HERE)]  # last: see _harness.py

import _harness as H  # noqa: E402
import xpack.runtimes.base as runtime_base  # noqa: E402
from xpack.packager.demo.base_model import demo_adapter_dir, demo_base_dir  # noqa: E402
from xpack.packager.export.gguf.writer import type_report  # noqa: E402
from xpack.packager.merge.job import merge  # noqa: E402
from xpack.packager.verify.job import eval_text, perplexity  # noqa: E402
from xpack.packager.verify.parity import compare_logits  # noqa: E402
from xpack.profiles.profile import load_profile  # noqa: E402
from xpack.runtimes.bench import BENCH_PROMPT  # noqa: E402
from xpack.runtimes.memory import PeakMemory  # noqa: E402
from xpack.runtimes.registry import load  # noqa: E402
from xpack.runtimes.settings import GenerationSettings  # noqa: E402

MERGED = H.CACHE / "demo-merged"
SDIST_DIR = H.CACHE / "sdist"
LLAMA_CPP_PYTHON = "0.3.36"
LC_DIR = SDIST_DIR / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
CONVERTER = LC_DIR / "convert_hf_to_gguf.py"
FILES = H.CACHE / "gguf-files"  # the first repeat's GGUFs, kept for the quality part
DEFAULT_JSON = H.RESULTS / "gguf.json"
QUANTS = ("F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M")
DECODE_QUANTS = ("Q4_K_M", "F16")
DECODE_TOKENS = 128
DECODE_ATTEMPTS = 3
TARGETS = {"quality_kl_mean_ratio_max": 1.01, "quality_top1_tokens_fewer_max": 1, "decode_ratio_min": 0.97}
SETTINGS = GenerationSettings(max_tokens=DECODE_TOKENS, temperature=0, repetition_penalty=1.0, ignore_eos=True)
VERSIONS = ("llama_cpp_python", "gguf", "numpy")


# --------------------------------------------------------------------------------------------
# Workers: run as ``python benchmarks/gguf.py _worker KIND ...`` in fresh processes


def worker_quantize(src: str, dst: str, quant: str, threads: str) -> int:
    """llama.cpp's quantizer, as the llama-quantize tool calls it: default params, the file type, threads."""
    t0 = time.perf_counter()
    import llama_cpp

    t1 = time.perf_counter()
    ftypes = {a[len("LLAMA_FTYPE_MOSTLY_"):]: getattr(llama_cpp, a) for a in dir(llama_cpp) if a.startswith("LLAMA_FTYPE_MOSTLY_")}
    ftypes["F32"] = llama_cpp.LLAMA_FTYPE_ALL_F32
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftypes[quant]
    params.nthread = int(threads)
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params)
    H.emit({"import_s": round(t1 - t0, 3), "quantize_s": round(time.perf_counter() - t1, 3), "rc": rc})
    return 0 if rc == 0 else 1


def _profile(threads: int):
    prof = load_profile("cpu16")
    return prof if threads <= 0 else dataclasses.replace(prof, threads=threads)


class _NoPeak:
    """A stand-in for ``xpack.runtimes.memory.PeakMemory`` that samples nothing (diagnosis only)."""

    peak_mb = 0.0

    def __init__(self, interval: float = 0.01):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def worker_decode_xpack(path: str, threads: str, variant: str = "") -> int:
    if variant == "nopeak":
        # Diagnosis: xpack without its RSS-sampling thread (10 ms) during generate. Replacing the name the
        # runtime base looks up is the only way to switch it off: measuring that thread's cost is the point.
        runtime_base.PeakMemory = _NoPeak
    with load(path, _profile(int(threads))) as rt:
        t0 = time.perf_counter()
        r = rt.generate(BENCH_PROMPT, SETTINGS)
        t1 = time.perf_counter()
        used = rt.profile.threads
    H.emit({
        "decode_tok_s": r.decode_tok_s, "ttft_s": r.ttft_s, "generate_s": t1 - t0, "load_s": r.load_s,
        "prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens, "threads": used,
        "tokens_sha": H.token_digest(r.token_ids), "peak_rss_mb": r.peak_rss_mb,
    })
    return 0


def worker_decode_raw(path: str, threads: str, ids_file: str, variant: str = "") -> int:
    """A raw llama-cpp-python loop: the same prompt ids, greedy, 128 tokens; the steps after the first are timed."""
    import llama_cpp

    peak = PeakMemory if variant == "peak" else _NoPeak  # diagnosis: the raw loop with xpack's RSS-sampling thread beside it
    prompt = json.loads(Path(ids_file).read_text())
    t = int(threads)
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=path, n_ctx=2048, n_threads=t, n_threads_batch=t, verbose=False)
    load_s = time.perf_counter() - t0
    out: list[int] = []
    first = None
    with peak():
        start = time.perf_counter()
        gen = llm.generate(prompt, temp=0.0, repeat_penalty=1.0)
        try:
            for token in gen:
                if first is None:
                    first = time.perf_counter()
                out.append(token)
                if len(out) >= DECODE_TOKENS:
                    break
        finally:
            gen.close()
        end = time.perf_counter()
    llm.close()
    H.emit({
        "decode_tok_s": (len(out) - 1) / (end - first), "ttft_s": first - start, "generate_s": end - start, "load_s": load_s,
        "prompt_tokens": len(prompt), "completion_tokens": len(out), "threads": t, "tokens_sha": H.token_digest(out),
    })
    return 0


WORKERS = {"quantize": worker_quantize, "decode-xpack": worker_decode_xpack, "decode-raw": worker_decode_raw}


# --------------------------------------------------------------------------------------------
# Inputs: the merged demo model and llama.cpp's converter


def ensure_merged() -> Path:
    H.ensure_cache()
    if (MERGED / "config.json").is_file() and any(MERGED.glob("*.safetensors")):
        H.log(f"merged demo model: cached in {MERGED}")
        return MERGED
    H.log(f"building the merged demo model into {MERGED}")
    merge(str(demo_base_dir()), [str(demo_adapter_dir())], MERGED, force=True)
    return MERGED


def ensure_converter() -> Path:
    if CONVERTER.is_file() and (LC_DIR / "conversion").is_dir() and (LC_DIR / "gguf-py" / "gguf").is_dir():
        return CONVERTER
    SDIST_DIR.mkdir(parents=True, exist_ok=True)
    tgz = SDIST_DIR / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    if not tgz.is_file():
        H.log(f"downloading the llama-cpp-python {LLAMA_CPP_PYTHON} sdist (for llama.cpp's converter)")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(SDIST_DIR)], check=True, stdout=sys.stderr)
    H.log(f"extracting {tgz.name}")
    with tarfile.open(tgz) as tf:
        prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
        wanted = tuple(prefix + d for d in ("conversion/", "gguf-py/", "models/"))
        members = [m for m in tf.getmembers() if m.name.startswith(wanted) or m.name == prefix + "convert_hf_to_gguf.py"]
        tf.extractall(SDIST_DIR, members=members, filter="data")
    if not CONVERTER.is_file():
        raise SystemExit(f"{CONVERTER} is not in the sdist")
    return CONVERTER


def converter_env() -> dict:
    env = H.child_env()
    env["PYTHONPATH"] = os.pathsep.join([str(LC_DIR / "gguf-py"), str(LC_DIR)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def converter_cmd(model: Path, outtype: str, out: Path) -> list[str]:
    return [sys.executable, str(CONVERTER), str(model), "--outtype", outtype, "--outfile", str(out)]


def xpack_export_cmd(model: Path, quant: str, out: Path) -> list[str]:
    return H.xpack("export", "--model", model, "--format", "gguf", "--quant", quant, "--out", out, "--force")


# --------------------------------------------------------------------------------------------
# Part 1: export


def part_export(model: Path, quants: list[str], repeats: int, wait_s: float, tmp_root: Path) -> dict:
    threads = os.cpu_count() or 1  # xpack export's --threads 0 = all cores; the quantizer gets the same
    inputs = H.files_in(model)
    shutil.rmtree(FILES, ignore_errors=True)
    FILES.mkdir(parents=True)
    runs: dict[str, dict[str, list]] = {q: {"xpack": [], "lc_convert_f32": [], "lc_quantize_f32": [], "lc_sum_f32": [],
                                             "lc_quantize_f16": [], "lc_sum_f16": []} for q in quants}
    convert_f16: list[dict] = []
    files: dict[str, dict[str, str]] = {q: {} for q in quants}
    for rep in range(repeats):
        rep_dir = tmp_root / f"export-{rep}"
        rep_dir.mkdir()
        f16 = rep_dir / "lc-f16.gguf"
        H.log(f"export repeat {rep + 1}/{repeats}: llama.cpp converter --outtype f16")
        r = H.measure(converter_cmd(model, "f16", f16), f"convert-f16-{rep}", rep_dir, inputs, wait_s, converter_env())
        convert_f16.append(r)
        H.log(f"  convert f16: {r['wall_s']:.2f}s, peak RSS {r['peak_rss_mb']:.0f} MB")
        for qi, q in enumerate(quants):
            order = ["xpack", "llama.cpp"] if (rep + qi) % 2 == 0 else ["llama.cpp", "xpack"]
            for side in order:
                if side == "xpack":
                    out = rep_dir / f"xpack-{q}"
                    H.log(f"export repeat {rep + 1}/{repeats} {q}: xpack export")
                    r = H.measure(xpack_export_cmd(model, q, out), f"xpack-{q}-{rep}", rep_dir, inputs, wait_s)
                    r["order"] = order.index(side) + 1
                    runs[q]["xpack"].append(r)
                    gguf_file = next(out.glob("*.gguf"))
                    r["output_bytes"] = gguf_file.stat().st_size
                    H.log(f"  xpack {q}: {r['wall_s']:.2f}s, peak RSS {r['peak_rss_mb']:.0f} MB, other processes {r['other_cpu_s']:.1f} CPU s")
                    if rep == 0:
                        files[q]["xpack"] = str(_keep(gguf_file, f"xpack-{q}.gguf"))
                    continue
                f32 = rep_dir / f"lc-f32-{q}.gguf"
                H.log(f"export repeat {rep + 1}/{repeats} {q}: llama.cpp converter --outtype f32 + quantizer")
                rc = H.measure(converter_cmd(model, "f32", f32), f"convert-f32-{q}-{rep}", rep_dir, inputs, wait_s, converter_env())
                dst = rep_dir / f"lc-f32-{q}-out.gguf"
                rq = H.measure(H.worker_cmd("quantize", f32, dst, q, threads), f"quantize-f32-{q}-{rep}", rep_dir, [f32], wait_s)
                for x in (rc, rq):
                    x["order"] = order.index(side) + 1
                runs[q]["lc_convert_f32"].append(rc)
                runs[q]["lc_quantize_f32"].append(rq)
                runs[q]["lc_sum_f32"].append(_sum(rc, rq))
                H.log(f"  llama.cpp f32 path {q}: convert {rc['wall_s']:.2f}s ({rc['peak_rss_mb']:.0f} MB) + quantize "
                      f"{rq['wall_s']:.2f}s ({rq['peak_rss_mb']:.0f} MB)")
                if rep == 0:
                    files[q]["llamacpp_f32"] = str(_keep(dst, f"llamacpp-f32-{q}.gguf"))
                f32.unlink()
                dst.unlink(missing_ok=True)
                if q == "F16":
                    if rep == 0:
                        files[q]["llamacpp_f16"] = str(_keep(f16, "llamacpp-f16-F16.gguf", copy=True))
                    continue
                dst16 = rep_dir / f"lc-f16-{q}-out.gguf"
                rq16 = H.measure(H.worker_cmd("quantize", f16, dst16, q, threads), f"quantize-f16-{q}-{rep}", rep_dir, [f16], wait_s)
                rq16["order"] = order.index(side) + 1
                runs[q]["lc_quantize_f16"].append(rq16)
                runs[q]["lc_sum_f16"].append(_sum(convert_f16[-1], rq16))
                H.log(f"  llama.cpp f16 path {q}: quantize {rq16['wall_s']:.2f}s ({rq16['peak_rss_mb']:.0f} MB)")
                if rep == 0:
                    files[q]["llamacpp_f16"] = str(_keep(dst16, f"llamacpp-f16-{q}.gguf"))
                dst16.unlink(missing_ok=True)
            for p in rep_dir.glob("xpack-*"):
                shutil.rmtree(p, ignore_errors=True)
        shutil.rmtree(rep_dir, ignore_errors=True)

    results = {"threads": threads, "repeats": repeats, "convert_f16_runs": [H.brief(r) for r in convert_f16], "quants": {}}
    for q in quants:
        summ = {side: _export_summary(lst) for side, lst in runs[q].items() if lst}
        if q == "F16":
            summ["lc_convert_f16"] = _export_summary(convert_f16)
        x = summ["xpack"]
        ratios = {
            "wall_vs_f32_path": x["wall_s"] / summ["lc_sum_f32"]["wall_s"],
            "peak_rss_vs_f32_path": x["peak_rss_mb"] / summ["lc_sum_f32"]["peak_rss_mb"],
        }
        other = ("convert_f16", "lc_convert_f16") if q == "F16" else ("f16_path", "lc_sum_f16")
        ratios[f"wall_vs_{other[0]}"] = x["wall_s"] / summ[other[1]]["wall_s"]
        ratios[f"peak_rss_vs_{other[0]}"] = x["peak_rss_mb"] / summ[other[1]]["peak_rss_mb"]
        results["quants"][q] = {"summary": summ, "ratios": ratios, "files": files[q],
                                "runs": {side: [H.brief(r) for r in lst] for side, lst in runs[q].items() if lst}}
    return results


def _export_summary(lst: list[dict]) -> dict:
    picked = H.pick(lst)
    return {"wall_s": H.med(picked, "wall_s"), "peak_rss_mb": H.med(picked, "peak_rss_mb"),
            "cpu_s": H.med(picked, lambda r: r["user_cpu_s"] + r["sys_cpu_s"]), "runs_used": len(picked), "runs": len(lst)}


def _sum(a: dict, b: dict) -> dict:
    """Two sequential processes as one job: wall and CPU add up, peak RSS is the larger peak."""
    out = {k: a[k] + b[k] for k in ("wall_s", "user_cpu_s", "sys_cpu_s", "other_cpu_s")}
    return {**out, "peak_rss_mb": max(a["peak_rss_mb"], b["peak_rss_mb"])}


def _keep(src: Path, name: str, copy: bool = False) -> Path:
    dst = FILES / name
    (shutil.copyfile if copy else shutil.move)(str(src), str(dst))
    return dst


def print_export(res: dict, repeats: int) -> None:
    print(f"== Part 1: export time and peak RSS (median of up to {repeats} runs each, fresh processes, "
          f"quantizer threads {res['threads']}; runs with other processes busy left out when clean ones exist)")
    print(f"{'quant':<8}{'side':<36}{'wall s':>9}{'peak RSS MB':>13}{'cpu s':>8}{'runs':>7}")
    labels = [
        ("xpack", "xpack export"),
        ("lc_convert_f32", "llama.cpp convert --outtype f32"),
        ("lc_quantize_f32", "  + quantize (from f32)"),
        ("lc_sum_f32", "  = f32 path (sum; RSS max)"),
        ("lc_convert_f16", "llama.cpp convert --outtype f16"),
        ("lc_quantize_f16", "  + quantize (from f16)"),
        ("lc_sum_f16", "  = f16 path (sum; RSS max)"),
    ]
    for q, d in res["quants"].items():
        s = d["summary"]
        for key, label in labels:
            if key in s:
                x = s[key]
                print(f"{q:<8}{label:<36}{x['wall_s']:>9.2f}{x['peak_rss_mb']:>13.0f}{x['cpu_s']:>8.1f}{x['runs_used']:>4}/{x['runs']:<2}")
        r = d["ratios"]
        parts = [f"vs f32 path: wall {r['wall_vs_f32_path']:.2f}x, RSS {r['peak_rss_vs_f32_path']:.2f}x"]
        if "wall_vs_convert_f16" in r:
            parts.append(f"vs convert --outtype f16: wall {r['wall_vs_convert_f16']:.2f}x, RSS {r['peak_rss_vs_convert_f16']:.2f}x")
        else:
            parts.append(f"vs f16 path: wall {r['wall_vs_f16_path']:.2f}x, RSS {r['peak_rss_vs_f16_path']:.2f}x")
        print(f"{'':<8}ratio xpack / llama.cpp: " + "; ".join(parts) + "  (no target: informational)")
    print()


# --------------------------------------------------------------------------------------------
# Part 2: quality


def _tensor_compare(a: Path, b: Path) -> dict:
    """Tensor by tensor: same type, same bytes? (a = xpack's file, b = llama.cpp's)."""
    import gguf
    import numpy as np

    ta = {t.name: t for t in gguf.GGUFReader(a).tensors}
    tb = {t.name: t for t in gguf.GGUFReader(b).tensors}
    common = sorted(set(ta) & set(tb))
    type_diff, data_diff = [], []
    for n in common:
        x, y = ta[n], tb[n]
        if x.tensor_type != y.tensor_type:
            type_diff.append(f"{n}: {x.tensor_type.name} vs {y.tensor_type.name}")
        elif not np.array_equal(np.asarray(x.data).view(np.uint8), np.asarray(y.data).view(np.uint8)):
            data_diff.append(n)
    return {
        "tensors_xpack": len(ta), "tensors_llamacpp": len(tb), "common": len(common),
        "only_xpack": sorted(set(ta) - set(tb)), "only_llamacpp": sorted(set(tb) - set(ta)),
        "identical": len(common) - len(type_diff) - len(data_diff),
        "type_differs": type_diff, "data_differs": data_diff,
    }


def part_quality(model: Path, files: dict[str, dict[str, str]]) -> dict:
    profile = _profile(0)
    text = eval_text(None)
    H.log("quality: torch fp32 reference logits of the evaluation text")
    with load(model, profile, runtime="torch") as rt:
        ids = rt.tokenize(text)
        ref = rt.logits(ids)
    out = {"eval_text_chars": len(text), "tokens": len(ids), "reference": {"model": str(model), "runtime": "torch",
           "perplexity": perplexity(ref, ids)}, "quants": {}}
    for q, sides in files.items():
        res = {}
        for side, path in sides.items():
            path = Path(path)
            H.log(f"quality {q}: {side} ({path.name})")
            with load(path, profile) as rt:
                got_ids = rt.tokenize(text)
                if got_ids != ids:
                    first = H.first_difference(got_ids, ids)
                    res[side] = {"error": f"tokenizes the text differently from the reference (first difference at {first})"}
                    continue
                lg = rt.logits(ids)
            fig = compare_logits(ref, lg)
            fig.update(perplexity=perplexity(lg[:, : ref.shape[1]], ids), file=str(path), bytes=path.stat().st_size,
                       top1_tokens=int(round(fig["top1_agreement"] * len(ids))))
            fig.update(type_report(path, q))
            res[side] = fig
        out["quants"][q] = {"sides": res, "comparison": _quality_verdict(res.get("xpack"), res.get("llamacpp_f32"))}
    return out


def _quality_verdict(x: dict | None, lc: dict | None) -> dict | None:
    """xpack's file against llama.cpp's of the same type from the f32 intermediate."""
    if not (x and lc):
        return None
    if "error" in x or "error" in lc:
        return {"verdict": "MISS", "why": x.get("error") or lc.get("error")}
    kl_ratio = x["kl_mean"] / lc["kl_mean"] if lc["kl_mean"] > 0 else (1.0 if x["kl_mean"] == 0 else float("inf"))
    fewer = lc["top1_tokens"] - x["top1_tokens"]
    ok = kl_ratio <= TARGETS["quality_kl_mean_ratio_max"] and fewer <= TARGETS["quality_top1_tokens_fewer_max"]
    verdict = {"kl_mean_ratio": kl_ratio, "kl_p99_ratio": x["kl_p99"] / lc["kl_p99"] if lc["kl_p99"] > 0 else None,
               "top1_tokens_fewer": fewer, "size_ratio": x["bytes"] / lc["bytes"], "verdict": "PASS" if ok else "MISS"}
    try:
        verdict["tensors_vs_llamacpp_f32"] = _tensor_compare(Path(x["file"]), Path(lc["file"]))
    except Exception as exc:  # noqa: BLE001 - evidence, not the measurement
        verdict["tensors_vs_llamacpp_f32"] = {"error": f"{type(exc).__name__}: {exc}"}
    return verdict


def print_quality(res: dict) -> None:
    print(f"== Part 2: quality vs the torch fp32 reference ({res['tokens']} tokens of the built-in evaluation text, "
          f"teacher-forced; reference perplexity {res['reference']['perplexity']:.3f})")
    print(f"{'quant':<8}{'file':<22}{'MB':>8}{'KL mean':>11}{'KL p99':>11}{'top-1':>9}{'ppl':>9}  tensor types")
    names = {"xpack": "xpack", "llamacpp_f32": "llama.cpp (f32 inter.)", "llamacpp_f16": "llama.cpp (f16 inter.)"}
    for q, d in res["quants"].items():
        for side, name in names.items():
            f = d["sides"].get(side)
            if f is None:
                continue
            if "error" in f:
                print(f"{q:<8}{name:<22}  ERROR: {f['error']}")
                continue
            types = ",".join(f"{k}:{v}" for k, v in sorted(f["tensor_types"].items()))
            print(f"{q:<8}{name:<22}{f['bytes'] / 1e6:>8.1f}{f['kl_mean']:>11.2e}{f['kl_p99']:>11.2e}"
                  f"{f['top1_agreement']:>9.4f}{f['perplexity']:>9.3f}  {types}")
        c = d["comparison"]
        if c and "kl_mean_ratio" in c:
            t = c.get("tensors_vs_llamacpp_f32") or {}
            same = (f"; tensors identical to llama.cpp's f32-path file: {t['identical']}/{t['common']}"
                    + (f", type differs {len(t['type_differs'])}" if t.get("type_differs") else "")
                    + (f", data differs {len(t['data_differs'])}" if t.get("data_differs") else "")) if "identical" in t else ""
            p99 = "None" if c["kl_p99_ratio"] is None else format(c["kl_p99_ratio"], ".3f")
            print(f"{'':<8}xpack / llama.cpp f32: KL mean {c['kl_mean_ratio']:.3f}x, p99 {p99}x, "
                  f"top-1 tokens fewer {c['top1_tokens_fewer']}, size {c['size_ratio']:.3f}x{same}; "
                  f"target KL <= {TARGETS['quality_kl_mean_ratio_max']}x and <= {TARGETS['quality_top1_tokens_fewer_max']} "
                  f"top-1 token fewer: {c['verdict']}")
        elif c:
            print(f"{'':<8}{c['verdict']}: {c.get('why')}")
    print()


# --------------------------------------------------------------------------------------------
# Part 3: decode speed


def _ids_file(path: Path, work: Path, name: str) -> Path:
    """xpack's prompt token ids of BENCH_PROMPT (chat template applied), for the raw loop."""
    with load(path, _profile(1)) as rt:
        ids = rt.tokenize(rt.prompt_text(BENCH_PROMPT))
    f = work / f"ids-{name}.json"
    f.write_text(json.dumps(ids))
    return f


def _decode_cmd(kind: str, path: Path, threads: int, ids_file: Path, variant: str = "") -> list[str]:
    if kind == "decode-xpack":  # cpu16 clamped to this machine when threads is its core count: the profile as shipped
        return H.worker_cmd(kind, path, 0 if threads == (os.cpu_count() or 1) else threads, variant)
    return H.worker_cmd(kind, path, threads, ids_file, variant)


def part_decode(files: dict[str, Path], thread_counts: list[int], repeats: int, wait_s: float, tmp_root: Path) -> dict:
    work = tmp_root / "decode"
    work.mkdir()
    out: dict = {"tokens": DECODE_TOKENS, "prompt": BENCH_PROMPT, "repeats": repeats, "threads": thread_counts, "cases": {}}
    ids_files = {q: _ids_file(path, work, q) for q, path in files.items()}
    out["prompt_tokens"] = {q: len(json.loads(f.read_text())) for q, f in ids_files.items()}
    runs = H.decode_runs({(q, t): ["xpack", "raw"] for q in files for t in thread_counts}, repeats, work, wait_s, DECODE_ATTEMPTS,
                         lambda side, q, t: _decode_cmd(f"decode-{side}", files[q], t, ids_files[q]), lambda q: [files[q]])
    for (q, t), sides in runs.items():
        summ = {side: H.decode_summary(lst) for side, lst in sides.items()}
        ratio = summ["xpack"]["decode_tok_s"] / summ["raw"]["decode_tok_s"]
        paired = H.paired_ratios(sides["xpack"], sides["raw"])
        out["cases"][f"{q}/threads={t}"] = {
            "quant": q, "threads": t, "file": str(files[q]), "summary": summ, "ratio": ratio,
            "paired_ratio_median": statistics.median(paired), "paired_ratios": [round(p, 4) for p in paired],
            "same_tokens": summ["xpack"]["tokens_sha"] == summ["raw"]["tokens_sha"],
            "verdict": "PASS" if ratio >= TARGETS["decode_ratio_min"] else "MISS",
            "runs": {side: [H.brief(r) for r in lst] for side, lst in sides.items()},
        }
    out["cli"] = {q: _cli_run(path, wait_s) for q, path in files.items()}
    return out


def _cli_run(path: Path, wait_s: float) -> dict:
    """``xpack run --json`` once, for reference (cpu16 as shipped; the CLI has no --ignore-eos)."""
    cmd = H.xpack("run", "--artifact", path, "--profile", "cpu16", "--prompt", BENCH_PROMPT, "--temperature", "0",
                  "--repetition-penalty", "1.0", "--max-tokens", DECODE_TOKENS, "--json")
    if wait_s > 0:
        H.wait_idle(wait_s)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=H.child_env(), cwd=str(H.ROOT))
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        return {"error": p.stderr[-1000:]}
    d = json.loads(p.stdout)
    H.log(f"xpack run --json {path.name}: {d['decode_tok_s']:.1f} tok/s over {d['completion_tokens']} tokens ({d['finish_reason']})")
    keys = ("decode_tok_s", "ttft_s", "prompt_tokens", "completion_tokens", "finish_reason", "load_s", "peak_rss_mb", "profile")
    return {**{k: d.get(k) for k in keys}, "wall_s": wall}


def print_decode(res: dict, repeats: int) -> None:
    print(f"== Part 3: decode tokens/s, {res['tokens']} greedy tokens (EOS ignored), steps after the first token; "
          f"median of {repeats} interleaved runs per side, fresh process per run")
    print(f"{'file':<8}{'threads':>8}{'xpack tok/s':>13}{'raw tok/s':>11}{'ratio':>8}{'paired':>8}{'same tokens':>13}  target >= {TARGETS['decode_ratio_min']}")
    for c in res["cases"].values():
        s = c["summary"]
        print(f"{c['quant']:<8}{c['threads']:>8}{s['xpack']['decode_tok_s']:>13.1f}{s['raw']['decode_tok_s']:>11.1f}"
              f"{c['ratio']:>8.3f}{c['paired_ratio_median']:>8.3f}{str(c['same_tokens']):>13}  {c['verdict']}"
              f"   (runs used {s['xpack']['runs_used']}/{s['xpack']['runs']} + {s['raw']['runs_used']}/{s['raw']['runs']};"
              f" all xpack {s['xpack']['decode_tok_s_all']}, raw {s['raw']['decode_tok_s_all']})")
    for q, d in res.get("cli", {}).items():
        if "error" in d:
            print(f"xpack run --json {q}: ERROR {H.error_line(d['error'])}")
        else:
            print(f"xpack run --json {q} (cpu16, once): {d['decode_tok_s']:.1f} tok/s decode over {d['completion_tokens']} tokens "
                  f"({d['finish_reason']}), ttft {d['ttft_s']:.3f} s, load {d['load_s']:.2f} s, peak RSS {d['peak_rss_mb']:.0f} MB, "
                  f"process wall {d['wall_s']:.2f} s")
    print()


# --------------------------------------------------------------------------------------------
# Optional: why xpack's decode differs from raw (the RSS-sampling thread in and out)

DIAG_VARIANTS = {
    "xpack": ("decode-xpack", ""),
    "xpack_nopeak": ("decode-xpack", "nopeak"),
    "raw": ("decode-raw", ""),
    "raw_peak": ("decode-raw", "peak"),
}


def diagnose_decode(files: dict[str, Path], threads: int, repeats: int, wait_s: float, tmp_root: Path) -> dict:
    """xpack, xpack without PeakMemory's sampling thread, raw, raw with that thread: interleaved, rotating order."""
    work = tmp_root / "diagnose"
    work.mkdir()
    out: dict = {"threads": threads, "repeats": repeats, "cases": {}}
    ids_files = {q: _ids_file(path, work, q) for q, path in files.items()}

    def cmd(name, q, t):
        kind, variant = DIAG_VARIANTS[name]
        return _decode_cmd(kind, files[q], t, ids_files[q], variant)

    runs = H.decode_runs({(q, threads): list(DIAG_VARIANTS) for q in files}, repeats, work, wait_s, DECODE_ATTEMPTS, cmd,
                         lambda q: [files[q]], rotate=True)
    for (q, _t), rows in runs.items():
        summ = {}
        for n, lst in rows.items():
            picked = H.pick(lst)
            summ[n] = {"decode_tok_s": H.med(picked, H.phase("decode_tok_s")), "runs_used": len(picked), "runs": len(lst),
                       "all": [round(r["phases"]["decode_tok_s"], 2) for r in lst],
                       "user_cpu_s": H.med(picked, "user_cpu_s"), "sys_cpu_s": H.med(picked, "sys_cpu_s")}
        raw = summ["raw"]["decode_tok_s"]
        out["cases"][q] = {"summary": summ, "ratios_vs_raw": {n: summ[n]["decode_tok_s"] / raw for n in DIAG_VARIANTS}}
    return out


def print_diagnosis(res: dict) -> None:
    print(f"== Decode diagnosis: {res['threads']} threads, median of {res['repeats']} runs per variant (order rotating); "
          "'nopeak' = xpack with PeakMemory's 10 ms RSS-sampling thread replaced by a no-op, 'raw_peak' = the raw loop with that thread running")
    print(f"{'file':<8}" + "".join(f"{n:>16}" for n in DIAG_VARIANTS))
    for q, c in res["cases"].items():
        print(f"{q:<8}" + "".join(f"{c['summary'][n]['decode_tok_s']:>11.1f} tok/s" for n in DIAG_VARIANTS))
        print(f"{'  / raw':<8}" + "".join(f"{c['ratios_vs_raw'][n]:>16.3f}" for n in DIAG_VARIANTS))
    print()


def profile_export(model: Path, quant: str, tmp_root: Path, out_dir: Path, wait_s: float) -> dict:
    """``xpack export`` under cProfile: top functions and the main phases."""
    out = tmp_root / f"profile-{quant}"
    prof = out_dir / f"gguf-export-{quant}.prof"
    r = H.measure(H.profiled(xpack_export_cmd(model, quant, out), prof), f"profile-{quant}", tmp_root, H.files_in(model), wait_s)
    shutil.rmtree(out, ignore_errors=True)
    total, rows = H.profile_rows(prof)

    def ours(x):
        return "/xpack/" in x["path"] or "/packager/" in x["path"] or "/runtimes/" in x["path"] or "llama_model_quantize" in x["function"]

    print(f"== xpack export --quant {quant} under cProfile: {r['wall_s']:.2f}s wall, {total:.2f}s profiled (main thread)")
    top = H.print_profile("function (top by own time)", sorted(rows, key=lambda x: -x["tottime_s"])[:20])
    phases = H.print_profile("xpack functions (top by cumulative time)", sorted(filter(ours, rows), key=lambda x: -x["cumtime_s"])[:25])
    print()
    return {"wall_s": r["wall_s"], "peak_rss_mb": r["peak_rss_mb"], "profiled_s": total, "top_tottime": top,
            "xpack_cumtime": phases, "prof_file": str(prof)}


# --------------------------------------------------------------------------------------------
# Main


def _earlier_files(quants: list[str]) -> dict[str, dict[str, str]]:
    """The GGUFs an earlier export part kept in FILES."""
    files = {}
    for q in quants:
        found = {side: str(FILES / f"{prefix}-{q}.gguf") for side, prefix in
                 (("xpack", "xpack"), ("llamacpp_f32", "llamacpp-f32"), ("llamacpp_f16", "llamacpp-f16"))
                 if (FILES / f"{prefix}-{q}.gguf").is_file()}
        if found:
            files[q] = found
    return files


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quants", default=",".join(QUANTS), help=f"comma-separated llama.cpp types (default {','.join(QUANTS)})")
    ap.add_argument("--repeats", type=int, default=5, help="runs per side (export and decode); the order alternates, medians are reported")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"where to write the figures (default {DEFAULT_JSON.relative_to(H.ROOT)})")
    ap.add_argument("--parts", default="export,quality,decode", help="comma-separated: export, quality, decode (default: all; none: only --diagnose-decode / --profile)")
    ap.add_argument("--wait-idle", type=float, default=30, metavar="S",
                    help="before each timed run, wait up to S seconds for other processes to stop using CPU (0: don't)")
    ap.add_argument("--diagnose-decode", type=int, default=0, metavar="N",
                    help="also run N interleaved decode runs each of xpack, xpack without its RSS-sampling thread, raw, raw with it")
    ap.add_argument("--update", action="store_true",
                    help="keep the other parts' figures already in --json (e.g. add --diagnose-decode to a full run's file)")
    ap.add_argument("--profile", action="store_true", help="also run xpack export --quant Q4_K_M (or the last of --quants) under cProfile")
    args = ap.parse_args(argv)
    quants = [q.upper() for q in H.csv(args.quants)]
    parts = [] if H.csv(args.parts) == ["none"] else H.csv(args.parts)
    if set(parts) - {"export", "quality", "decode"}:
        ap.error("--parts takes export, quality, decode")
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    if ("quality" in parts or "decode" in parts or args.diagnose_decode) and "export" not in parts and not FILES.is_dir():
        ap.error(f"quality and decode use the GGUFs of an export part ({FILES} is missing): include export in --parts")

    machine = H.machine_info(*VERSIONS)
    H.log(f"machine: {machine.get('cpu_model')}, {machine['cpu_count']} CPUs, {machine['ram_gib']} GiB RAM; "
          f"llama-cpp-python {machine['llama_cpp_python']}, gguf {machine['gguf']}, torch {machine['torch']}, xpack {machine['xpack']}")
    model = ensure_merged()
    ensure_converter()
    results = {
        "machine": machine,
        "model": {"dir": str(model), "config": json.loads((model / "config.json").read_text()),
                  "bytes": sum(p.stat().st_size for p in model.glob("*.safetensors"))},
        "llamacpp_converter": {"script": str(CONVERTER), "gguf_py": str(LC_DIR / "gguf-py"), "sdist": f"llama-cpp-python=={LLAMA_CPP_PYTHON}"},
        "settings": {"quants": quants, "repeats": args.repeats, "wait_idle_s": args.wait_idle, "parts": parts},
        "targets": TARGETS,
    }
    if args.update and args.json.is_file():
        earlier = json.loads(args.json.read_text())
        results = {**earlier, **{k: v for k, v in results.items() if k != "settings"},
                   "settings": {**earlier.get("settings", {}), "update": results["settings"]}}
        if "export" not in parts:  # the decode / quality figures belong to the files of the earlier export
            results["settings"]["quants"] = earlier.get("settings", {}).get("quants", quants)

    tmp_root = Path(tempfile.mkdtemp(prefix="xpack-gguf-bench-", dir=H.CACHE))
    profile_text = ""
    try:
        if "export" in parts:
            results["export"] = part_export(model, quants, args.repeats, args.wait_idle, tmp_root)
            H.write_json(args.json, results)
            files = {q: d["files"] for q, d in results["export"]["quants"].items()}
        else:
            files = _earlier_files(quants)
        dq = {q: Path(files[q]["xpack"]) for q in DECODE_QUANTS if q in files and "xpack" in files[q]}
        if "decode" in parts:
            threads = sorted({min(16, os.cpu_count() or 1), 1}, reverse=True)
            results["decode"] = part_decode(dq, threads, args.repeats, args.wait_idle, tmp_root)
            H.write_json(args.json, results)
        if args.diagnose_decode:
            results["decode_diagnosis"] = diagnose_decode(dq, min(16, os.cpu_count() or 1), args.diagnose_decode, args.wait_idle, tmp_root)
            H.write_json(args.json, results)
        if "quality" in parts:
            results["quality"] = part_quality(model, files)
            H.write_json(args.json, results)
        if args.profile:
            q = "Q4_K_M" if "Q4_K_M" in quants else quants[-1]
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                results["export_profile"] = profile_export(model, q, tmp_root, args.json.parent, args.wait_idle)
            profile_text = buf.getvalue()
            H.write_json(args.json, results)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    verdicts = {f"quality {q}": d["comparison"]["verdict"] for q, d in (results.get("quality") or {}).get("quants", {}).items()
                if d.get("comparison")}
    verdicts.update({f"decode {name}": c["verdict"] for name, c in (results.get("decode") or {}).get("cases", {}).items()})
    results["verdicts"] = verdicts
    H.write_json(args.json, results)
    reps = results["settings"].get("repeats", args.repeats)
    if "export" in results:
        print_export(results["export"], results["export"].get("repeats", reps))
    if "quality" in results:
        print_quality(results["quality"])
    if "decode" in results:
        print_decode(results["decode"], results["decode"].get("repeats", reps))
    if "decode_diagnosis" in results:
        print_diagnosis(results["decode_diagnosis"])
    print(profile_text, end="")
    if verdicts:
        print("== Verdicts: " + ", ".join(f"{k} {v}" for k, v in verdicts.items()))
    H.log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(H.main(main, WORKERS))
