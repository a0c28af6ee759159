#!/usr/bin/env python3
"""Benchmark ``xpack export --format onnx`` and xpack's onnxruntime backend against optimum-onnx, on the demo model.

The model: the demo base (SmolLM2-135M-Instruct, llama, fp32). Three parts, each measured side in a
fresh process (``_harness.py``):

  export   for each --bits and --graphs: wall time, peak RSS and size of ``xpack export --format onnx
           --bits B --graph G`` (+ ``--format gguf --bits 4`` for orientation unless --no-gguf).
  quality  KL(torch fp32 || file) mean / p99, top-1, max |logit error|, perplexity over the built-in
           evaluation text, teacher-forced through ``load(folder, profile).logits(ids)`` against
           ``AutoModelForCausalLM`` fp32 on the same ids (cached in ``benchmarks/.cache/onnx-ref/``).
  decode   on the same file, 128 greedy tokens with EOS ignored from the same prompt ids:
           ``load(folder, cpu16 with threads=T, n_ctx 1024).generate(...).decode_tok_s`` against optimum's
           ``ORTModelForCausalLM.generate`` (``intra_op_num_threads = T``, EOS out of the generation config),
           timed the same way: (n - 1) / (time of the last token - time of the first), optimum's through a
           streamer whose ``put`` runs right after each token is picked.

Target: xpack decode / optimum decode >= 2.0 per file and thread count. xpack's int4 decode is also set
against onnxruntime-genai's 214 tok/s, a figure from the issue measured elsewhere, NOT in this run.
More in benchmarks/README.md.

Usage:
  .venv/bin/python benchmarks/onnx.py [--bits 32,16,8,4] [--graphs xpack,optimum] [--threads 1,2] [--repeats N]
                                      [--export-repeats N] [--parts export,quality,decode] [--decode-fp16]
                                      [--no-gguf] [--wait-idle S] [--attempts N] [--json PATH] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE] + [str(HERE)]  # last: see _harness.py

import _harness as H  # noqa: E402
from xpack.packager.demo.base_model import demo_base_dir  # noqa: E402
from xpack.packager.verify.job import eval_text, perplexity  # noqa: E402
from xpack.packager.verify.parity import compare_logits  # noqa: E402
from xpack.profiles.profile import load_profile  # noqa: E402
from xpack.runtimes.bench import BENCH_PROMPT  # noqa: E402
from xpack.runtimes.registry import load  # noqa: E402
from xpack.runtimes.settings import GenerationSettings  # noqa: E402

FILES = H.CACHE / "onnx-files"  # the first export repeat's artifacts, kept for the quality and decode parts
REF_DIR = H.CACHE / "onnx-ref"
DEFAULT_JSON = H.RESULTS / "onnx.json"
BITS = (32, 16, 8, 4)
GRAPHS = ("xpack", "optimum")
THREADS = (1, 2)
DECODE_TOKENS = 128
N_CTX = 1024
GENAI_INT4_TOK_S = 214.0  # onnxruntime-genai, int4, 2 cores: the figure, measured elsewhere
TARGETS = {"decode_ratio_min": 2.0, "genai_int4_tok_s_reference": GENAI_INT4_TOK_S}
GGUF_KEY = "gguf-4"  # the orientation file: xpack export --format gguf --bits 4 (Q4_K_M)
QUICK = {"bits": "32,4", "graphs": "xpack,optimum", "threads": "1", "repeats": 1, "export_repeats": 1}
VERSIONS = ("onnxruntime", "onnx", "optimum", "optimum-onnx", "llama_cpp_python", "numpy")
RUN_FIELDS = ("kernel_maxrss_mb", "contended", "artifact_bytes")  # what this script's run records keep beyond H.BRIEF


# --------------------------------------------------------------------------------------------
# Workers: run as ``python benchmarks/onnx.py _worker KIND ...`` in fresh processes


def _profile(threads: int):
    """cpu16 with its threads replaced (0: as shipped, clamped to the machine) and a 1024-token context."""
    prof = load_profile("cpu16")
    return dataclasses.replace(prof, threads=threads or prof.threads, n_ctx=N_CTX)


def worker_reference(model: str, ids_out: str, npy_out: str) -> int:
    """transformers fp32 logits of the evaluation text (the quality reference)."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(os.cpu_count() or 1)
    text = eval_text(None)
    tok = AutoTokenizer.from_pretrained(model)
    add_special = not (tok.bos_token and text.startswith(tok.bos_token))  # as xpack.runtimes.torch_ref tokenizes
    ids = list(tok(text, add_special_tokens=add_special)["input_ids"])
    t0 = time.perf_counter()
    net = AutoModelForCausalLM.from_pretrained(model, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        logits = net(input_ids=torch.tensor([ids])).logits[0].float().numpy()
    np.save(npy_out, logits.astype(np.float32))
    Path(ids_out).write_text(json.dumps(ids))
    H.emit({"tokens": len(ids), "text_chars": len(text), "forward_s": time.perf_counter() - t0})
    return 0


def worker_prompt_ids(out: str, *paths: str) -> int:
    """xpack's prompt token ids of BENCH_PROMPT (chat template applied) for each artifact: {path: ids}."""
    res = {}
    for p in paths:
        with load(p, _profile(1)) as rt:
            res[p] = rt.tokenize(rt.prompt_text(BENCH_PROMPT))
    Path(out).write_text(json.dumps(res))
    return 0


def worker_quality(path: str, ids_file: str, ref_npy: str, threads: str) -> int:
    import numpy as np

    ids = json.loads(Path(ids_file).read_text())
    ref = np.load(ref_npy)
    t0 = time.perf_counter()
    with load(path, _profile(int(threads))) as rt:
        own = rt.tokenize(eval_text(None))
        runtime = rt.name
        lg = rt.logits(ids)
    fig = compare_logits(ref, lg)
    fig.update(perplexity=perplexity(np.asarray(lg)[:, : ref.shape[1]], ids), top1_tokens=int(round(fig["top1_agreement"] * len(ids))),
               same_tokenization=own == ids, runtime=runtime, seconds=time.perf_counter() - t0)
    H.emit(fig)
    return 0


def worker_decode_xpack(path: str, threads: str) -> int:
    settings = GenerationSettings(max_tokens=DECODE_TOKENS, temperature=0, repetition_penalty=1.0, ignore_eos=True)
    with load(path, _profile(int(threads))) as rt:
        prompt_ids = rt.tokenize(rt.prompt_text(BENCH_PROMPT))
        t0 = time.perf_counter()
        r = rt.generate(BENCH_PROMPT, settings)
        t1 = time.perf_counter()
        used, runtime = rt.profile.threads, rt.name
    H.emit({
        "decode_tok_s": r.decode_tok_s, "ttft_s": r.ttft_s, "generate_s": t1 - t0, "load_s": r.load_s,
        "prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens, "threads": used, "runtime": runtime,
        "tokens_sha": H.token_digest(r.token_ids), "prompt_sha": H.token_digest(prompt_ids), "peak_rss_mb_runtime": r.peak_rss_mb,
    })
    return 0


def worker_decode_optimum(path: str, threads: str, ids_file: str) -> int:
    """optimum's ORTModelForCausalLM on the same folder and prompt ids; decode timed with a streamer (see the docstring)."""
    t0 = time.perf_counter()
    import onnxruntime as ort
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    t_import = time.perf_counter() - t0
    t = int(threads)
    torch.set_num_threads(t)  # generate's own torch work (logits processing, argmax) gets the same threads
    prompt = json.loads(Path(ids_file).read_text())
    so = ort.SessionOptions()
    so.intra_op_num_threads = t
    t0 = time.perf_counter()
    model = ORTModelForCausalLM.from_pretrained(path, session_options=so, use_cache=True)
    load_s = time.perf_counter() - t0

    class Clock(BaseStreamer):
        """put(prompt) once, then put(token) right after each new token is picked."""

        def __init__(self):
            self.seen_prompt = False
            self.times: list[float] = []
            self.ids: list[int] = []

        def put(self, value):
            now = time.perf_counter()
            if not self.seen_prompt:
                self.seen_prompt = True
                return
            self.times.append(now)
            self.ids.extend(int(v) for v in value.reshape(-1).tolist())

        def end(self):
            pass

    # EOS out of the generation config: 128 tokens whatever comes, with no EOS suppression either
    # (xpack's ignore_eos feeds an EOS back like any token); pad id only to silence a warning
    gc = copy.deepcopy(model.generation_config)
    eos = gc.eos_token_id if gc.eos_token_id is not None else model.config.eos_token_id
    gc.pad_token_id = (eos[0] if isinstance(eos, (list, tuple)) else eos) if eos is not None else 0
    gc.eos_token_id = None
    clock = Clock()
    ids = torch.tensor([prompt], dtype=torch.long)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gc, use_model_defaults=False,
                             max_new_tokens=DECODE_TOKENS, min_new_tokens=DECODE_TOKENS, do_sample=False,
                             repetition_penalty=1.0, streamer=clock)
    end = time.perf_counter()
    new = out[0, len(prompt):].tolist()
    if new != clock.ids:
        raise SystemExit(f"the streamer saw {len(clock.ids)} tokens, generate returned {len(new)}")
    n = len(clock.times)
    H.emit({
        "decode_tok_s": (n - 1) / (clock.times[-1] - clock.times[0]) if n > 1 else 0.0, "ttft_s": clock.times[0] - start,
        "generate_s": end - start, "load_s": load_s, "import_s": t_import, "prompt_tokens": len(prompt), "completion_tokens": n,
        "threads": t, "runtime": "optimum", "tokens_sha": H.token_digest(new), "prompt_sha": H.token_digest(prompt),
    })
    return 0


WORKERS = {"reference": worker_reference, "prompt-ids": worker_prompt_ids, "quality": worker_quality,
           "decode-xpack": worker_decode_xpack, "decode-optimum": worker_decode_optimum}


# --------------------------------------------------------------------------------------------
# Files and commands


def export_cmd(model: Path, key: str, out: Path) -> list[str]:
    if key == GGUF_KEY:
        return H.xpack("export", "--model", model, "--format", "gguf", "--bits", "4", "--out", out, "--force")
    graph, bits = key.rsplit("-", 1)
    return H.xpack("export", "--model", model, "--format", "onnx", "--bits", bits, "--graph", graph, "--out", out, "--force")


def artifact_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and p.suffix in (".onnx", ".onnx_data", ".gguf"))


def artifact_path(key: str, folder: Path) -> Path:
    """What runtimes load: the ONNX folder, or the GGUF file inside the GGUF export's folder."""
    return next(folder.glob("*.gguf")) if key == GGUF_KEY else folder


def artifact_files(path: str) -> list[Path]:
    return H.files_in(Path(path)) if Path(path).is_dir() else [Path(path)]


def label_of(key: str) -> str:
    if key == GGUF_KEY:
        return "gguf Q4_K_M"
    graph, bits = key.rsplit("-", 1)
    return f"{graph} graph, {'fp32' if bits == '32' else 'fp16' if bits == '16' else 'int' + bits}"


# --------------------------------------------------------------------------------------------
# Part 1: export


def part_export(model: Path, keys: list[str], repeats: int, wait_s: float, tmp_root: Path) -> dict:
    inputs = H.files_in(model)
    FILES.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict]] = {k: [] for k in keys}
    kept: dict[str, str] = {}
    failed: dict[str, str] = {}
    onnx_keys = [k for k in keys if k != GGUF_KEY]
    bit_widths = list(dict.fromkeys(k.rsplit("-", 1)[1] for k in onnx_keys))
    for rep in range(repeats):
        rep_dir = tmp_root / f"export-{rep}"
        rep_dir.mkdir()
        # the two graphs of one bit width next to each other, their order alternating
        order: list[str] = []
        for i, bits in enumerate(bit_widths):
            pair = [k for k in onnx_keys if k.endswith(f"-{bits}")]
            order += pair if (rep + i) % 2 == 0 else pair[::-1]
        order += [k for k in keys if k == GGUF_KEY]
        for key in order:
            out = (FILES / key) if rep == 0 else (rep_dir / key)
            if rep == 0:
                shutil.rmtree(out, ignore_errors=True)
            if key in failed:
                continue
            H.log(f"export repeat {rep + 1}/{repeats}: {label_of(key)}")
            try:
                r = H.measure(export_cmd(model, key, out), f"export-{key}-{rep}", rep_dir, inputs, wait_s)
            except RuntimeError as exc:  # one failed export leaves its file out of the other parts, not the run
                failed[key] = str(exc)
                continue
            r["artifact_bytes"] = artifact_bytes(out)
            runs[key].append(r)
            H.log(f"  {label_of(key)}: {r['wall_s']:.2f}s, peak RSS {r['peak_rss_mb']:.0f} MB, {r['artifact_bytes'] / 1e6:.1f} MB, "
                  f"other processes {r['other_cpu_s']:.1f} CPU s" + (" (contended)" if r["contended"] else ""))
            if rep == 0:
                kept[key] = str(artifact_path(key, out))
            else:
                shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(rep_dir, ignore_errors=True)
    out: dict = {"repeats": repeats, "threads": "all cores (xpack export --threads 0)", "cases": {}, "ratios": {}}
    for key, lst in runs.items():
        if key in failed:
            out["cases"][key] = {"label": label_of(key), "error": failed[key]}
            continue
        picked = H.pick(lst)
        out["cases"][key] = {
            "label": label_of(key), "file": kept[key],
            "wall_s": H.med(picked, "wall_s"), "peak_rss_mb": H.med(picked, "peak_rss_mb"),
            "cpu_s": H.med(picked, lambda r: r["user_cpu_s"] + r["sys_cpu_s"]),
            "artifact_bytes": lst[0]["artifact_bytes"], "runs_used": len(picked), "runs": len(lst),
            "contended": all(r["contended"] for r in picked),
            "runs_detail": [H.brief(r, RUN_FIELDS) for r in lst],
        }
    for bits in bit_widths:
        x, o = out["cases"].get(f"xpack-{bits}"), out["cases"].get(f"optimum-{bits}")
        if x and o and "error" not in x and "error" not in o:
            out["ratios"][bits] = {"wall": x["wall_s"] / o["wall_s"], "peak_rss": x["peak_rss_mb"] / o["peak_rss_mb"],
                                   "size": x["artifact_bytes"] / o["artifact_bytes"]}
    return out


def print_export(res: dict) -> None:
    print(f"### Export (median of up to {res['repeats']} run(s); fresh process, interpreter start included; * = contended)\n")
    print("| file | wall s | peak RSS MB | CPU s | artifact MB | runs |")
    print("|---|---:|---:|---:|---:|---:|")
    for c in res["cases"].values():
        if "error" in c:
            print(f"| {c['label']} | ERROR: {c['error'][:120]} | | | | |")
            continue
        star = "*" if c["contended"] else ""
        print(f"| {c['label']} | {c['wall_s']:.2f}{star} | {c['peak_rss_mb']:.0f} | {c['cpu_s']:.1f} | "
              f"{c['artifact_bytes'] / 1e6:.1f} | {c['runs_used']}/{c['runs']} |")
    print()
    if res["ratios"]:
        print("| bits | wall xpack/optimum | peak RSS xpack/optimum | size xpack/optimum |")
        print("|---:|---:|---:|---:|")
        for bits, r in res["ratios"].items():
            print(f"| {bits} | {r['wall']:.2f}x | {r['peak_rss']:.2f}x | {r['size']:.3f}x |")
        print("\n(export: no target, informational)\n")


# --------------------------------------------------------------------------------------------
# Part 2: quality


def ensure_reference(model: Path, tmp_root: Path) -> tuple[Path, Path, dict]:
    """torch fp32 logits of the evaluation text, cached by the model files, the text and the versions."""
    h = hashlib.sha256()
    for p in sorted(model.glob("*.safetensors")) + [model / "config.json", model / "tokenizer.json"]:
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    h.update(eval_text(None).encode())
    h.update(f"{H.version('torch')}/{H.version('transformers')}".encode())
    key = h.hexdigest()[:16]
    npy, ids = REF_DIR / f"ref-{key}.npy", REF_DIR / f"ids-{key}.json"
    if npy.is_file() and ids.is_file():
        H.log(f"quality: torch fp32 reference cached ({npy.name})")
        return npy, ids, {"cached": True}
    REF_DIR.mkdir(parents=True, exist_ok=True)
    H.log("quality: computing the torch fp32 reference logits of the evaluation text (once)")
    r = H.run_measured(H.worker_cmd("reference", model, ids, npy), "reference", tmp_root)
    if r["returncode"] != 0:
        raise RuntimeError(f"reference worker failed:\n{r['stderr_tail']}")
    return npy, ids, {"cached": False, "wall_s": r["wall_s"], **(r.get("phases") or {})}


def part_quality(model: Path, files: dict[str, str], threads: int, tmp_root: Path) -> dict:
    import numpy as np

    npy, ids_file, info = ensure_reference(model, tmp_root)
    ids = json.loads(ids_file.read_text())
    ref = np.load(npy)
    out = {"tokens": len(ids), "reference": {"runtime": "transformers AutoModelForCausalLM float32", "model": str(model),
           "npy": str(npy), "perplexity": perplexity(ref, ids), **info}, "threads": threads, "cases": {}}
    for key, path in files.items():
        H.log(f"quality: {label_of(key)}")
        r = H.run_measured(H.worker_cmd("quality", path, ids_file, npy, threads), f"quality-{key}", tmp_root)
        if r["returncode"] != 0 or not r.get("phases"):
            out["cases"][key] = {"label": label_of(key), "error": (r["stderr_tail"] or r["stdout_tail"])[-1500:]}
            H.log(f"  FAILED: {out['cases'][key]['error'][-300:]}")
            continue
        out["cases"][key] = {**r["phases"], "label": label_of(key), "file": path, "peak_rss_mb": r["peak_rss_mb"],
                             "artifact_bytes": artifact_bytes(Path(path) if Path(path).is_dir() else Path(path).parent)}
    return out


def print_quality(res: dict) -> None:
    print(f"### Quality vs transformers fp32 ({res['tokens']} tokens of the built-in evaluation text, teacher-forced through "
          f"xpack's runtimes; reference perplexity {res['reference']['perplexity']:.3f})\n")
    print("| file | MB | KL mean | KL p99 | top-1 | max abs err | ppl | same tokenization |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for c in res["cases"].values():
        if "error" in c:
            print(f"| {c['label']} | ERROR: {H.error_line(c['error'])[:120]} | | | | | | |")
            continue
        print(f"| {c['label']} | {c['artifact_bytes'] / 1e6:.1f} | {c['kl_mean']:.2e} | {c['kl_p99']:.2e} | {c['top1_agreement']:.4f} | "
              f"{c['max_abs_logit_error']:.2e} | {c['perplexity']:.3f} | {c['same_tokenization']} |")
    print()


# --------------------------------------------------------------------------------------------
# Part 3: decode speed


def part_decode(files: dict[str, str], thread_counts: list[int], repeats: int, attempts_max: int, wait_s: float, tmp_root: Path) -> dict:
    work = tmp_root / "decode"
    work.mkdir()
    out: dict = {"tokens": DECODE_TOKENS, "prompt": BENCH_PROMPT, "repeats": repeats, "threads": thread_counts, "cases": {}}
    ids_all = work / "prompt-ids.json"
    r = H.run_measured(H.worker_cmd("prompt-ids", ids_all, *files.values()), "prompt-ids", work)
    if r["returncode"] != 0:
        raise RuntimeError(f"prompt-ids worker failed:\n{r['stderr_tail']}")
    by_path = json.loads(ids_all.read_text())
    prompt_ids = {key: by_path[path] for key, path in files.items()}
    ids_files = {key: work / f"ids-{key}.json" for key in files}
    for key, f in ids_files.items():
        f.write_text(json.dumps(prompt_ids[key]))
    out["prompt_tokens"] = {key: len(ids) for key, ids in prompt_ids.items()}
    out["prompt_sha"] = {key: H.token_digest(ids) for key, ids in prompt_ids.items()}

    def cmd(side, key, t):
        return H.worker_cmd("decode-xpack", files[key], t) if side == "xpack" else H.worker_cmd("decode-optimum", files[key], t, ids_files[key])

    sides = {(key, t): ["xpack"] if key == GGUF_KEY else ["xpack", "optimum"] for key in files for t in thread_counts}
    runs = H.decode_runs(sides, repeats, work, wait_s, attempts_max, cmd, lambda key: artifact_files(files[key]))
    for (key, t), by_side in runs.items():
        summ = {side: _decode_summary(lst) for side, lst in by_side.items()}
        case = {"label": label_of(key), "key": key, "threads": t, "file": files[key], "summary": summ,
                "runs": {side: [H.brief(r, RUN_FIELDS) for r in lst] for side, lst in by_side.items()}}
        if "optimum" in summ:
            x, o = summ["xpack"], summ["optimum"]
            ratio = x["decode_tok_s"] / o["decode_tok_s"] if o["decode_tok_s"] else None
            paired = H.paired_ratios(by_side["xpack"], by_side["optimum"])
            case.update({
                "ratio": ratio, "paired_ratio_median": statistics.median(paired) if paired else None,
                "paired_ratios": [round(p, 4) for p in paired],
                "peak_rss_ratio": x["peak_rss_mb"] / o["peak_rss_mb"],
                "same_tokens": x["tokens_sha"] == o["tokens_sha"] and len(x["tokens_sha"]) == 1,
                "same_prompt": x["prompt_sha"] == o["prompt_sha"] and len(x["prompt_sha"]) == 1,
                "verdict": "PASS" if ratio is not None and ratio >= TARGETS["decode_ratio_min"] else "MISS",
            })
        else:
            case["note"] = "orientation only (xpack's llama.cpp runtime on the GGUF export), no ratio target"
            onnx_sha = {out["prompt_sha"][k] for k in files if k != GGUF_KEY}
            case["same_prompt_as_onnx"] = summ["xpack"]["prompt_sha"] == sorted(onnx_sha) if onnx_sha else None
        out["cases"][f"{key}/threads={t}"] = case
    # int4 (xpack graph, xpack backend) against onnxruntime-genai's figure from the issue
    genai = {str(c["threads"]): {"xpack_tok_s": c["summary"]["xpack"]["decode_tok_s"], "genai_tok_s": GENAI_INT4_TOK_S,
                                 "ratio": c["summary"]["xpack"]["decode_tok_s"] / GENAI_INT4_TOK_S}
             for c in out["cases"].values() if c["key"] == "xpack-4"}
    out["vs_genai_int4"] = {"note": "onnxruntime-genai int4, 214 tok/s on 2 cores: a reference figure from the issue, "
                                    "measured elsewhere, not in this run", "by_threads": genai}
    return out


def _decode_summary(lst: list[dict]) -> dict:
    """H.decode_summary plus load time, process wall time, contention, runtime and prompt hashes."""
    picked = H.pick(lst)
    return {**H.decode_summary(lst), "load_s": H.med(picked, H.phase("load_s")), "wall_s": H.med(picked, "wall_s"),
            "contended": all(r["contended"] for r in picked), "runtime": lst[0]["phases"].get("runtime"),
            "prompt_sha": sorted({r["phases"]["prompt_sha"] for r in lst})}


def print_decode(res: dict) -> None:
    print(f"### Decode tokens/s ({res['tokens']} greedy tokens, EOS ignored; steps after the first token; median of "
          f"{res['repeats']} run(s) per side, fresh process per run, order alternating; * = contended)\n")
    print("| file | threads | xpack tok/s | optimum tok/s | xpack/optimum | paired | xpack RSS MB | optimum RSS MB | same tokens | target >= 2x |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|---|")
    for c in res["cases"].values():
        x = c["summary"]["xpack"]
        xs = f"{x['decode_tok_s']:.1f}" + ("*" if x["contended"] else "")
        if "optimum" not in c["summary"]:
            print(f"| {c['label']} (llama.cpp, orientation) | {c['threads']} | {xs} | — | — | — | {x['peak_rss_mb']:.0f} | — | — | — |")
            continue
        o = c["summary"]["optimum"]
        os_ = f"{o['decode_tok_s']:.1f}" + ("*" if o["contended"] else "")
        paired = "—" if c["paired_ratio_median"] is None else f"{c['paired_ratio_median']:.2f}x"
        print(f"| {c['label']} | {c['threads']} | {xs} | {os_} | {c['ratio']:.2f}x | {paired} | {x['peak_rss_mb']:.0f} | "
              f"{o['peak_rss_mb']:.0f} | {c['same_tokens']} | {c['verdict']} |")
    print()
    genai = res["vs_genai_int4"]["by_threads"]
    for t, d in genai.items():
        print(f"xpack graph int4, xpack backend, {t} thread(s): {d['xpack_tok_s']:.1f} tok/s = {d['ratio']:.2f}x onnxruntime-genai's "
              f"{d['genai_tok_s']:.0f} tok/s (reference figure from the issue, measured elsewhere on 2 cores, NOT measured in this run)")
    print("\n" if genai else "", end="")


# --------------------------------------------------------------------------------------------
# Main


def _earlier_files(keys: list[str], parts: list[str]) -> dict[str, str]:
    """The artifacts an earlier export part kept in FILES."""
    files = {k: str(artifact_path(k, FILES / k)) for k in keys
             if (FILES / k).is_dir() and (k != GGUF_KEY or any((FILES / k).glob("*.gguf")))}
    missing = [k for k in keys if k not in files]
    if missing and ("quality" in parts or "decode" in parts):
        H.log(f"no earlier export of {', '.join(missing)} in {FILES}: left out (include export in --parts)")
    return files


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bits", default=",".join(map(str, BITS)), help="comma-separated ONNX bit widths: 32, 16, 8, 4 (default all)")
    ap.add_argument("--graphs", default=",".join(GRAPHS), help="comma-separated: xpack, optimum (default both)")
    ap.add_argument("--threads", default=",".join(map(str, THREADS)), help="comma-separated decode thread counts (default 1,2)")
    ap.add_argument("--repeats", type=int, default=3, help="decode runs per side, file and thread count (medians; default 3)")
    ap.add_argument("--export-repeats", type=int, default=1, help="export runs per file (default 1; the first one's files are measured)")
    ap.add_argument("--parts", default="export,quality,decode", help="comma-separated: export, quality, decode (default all; "
                    "without export, the files of an earlier run in benchmarks/.cache/onnx-files are used)")
    ap.add_argument("--decode-fp16", action="store_true", help="also decode the fp16 files (slow on CPU; left out by default)")
    ap.add_argument("--no-gguf", action="store_true", help="leave out the GGUF Q4_K_M orientation row (export, quality, decode)")
    ap.add_argument("--wait-idle", type=float, default=10, metavar="S",
                    help="before each timed run, wait up to S seconds for other processes to stop using CPU (0: don't; default 10)")
    ap.add_argument("--attempts", type=int, default=2, help="a contended decode run is done again, up to this many times in all (default 2)")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"where to write the figures (default {DEFAULT_JSON.relative_to(H.ROOT)})")
    ap.add_argument("--quick", action="store_true", help="bits 32,4; graphs xpack,optimum; threads 1; repeats 1 (a smoke run)")
    args = ap.parse_args(argv)
    if args.quick:
        args.bits, args.graphs, args.threads = QUICK["bits"], QUICK["graphs"], QUICK["threads"]
        args.repeats, args.export_repeats = QUICK["repeats"], QUICK["export_repeats"]
    try:
        bits = [int(b) for b in H.csv(args.bits)]
        threads = [int(t) for t in H.csv(args.threads)]
    except ValueError:
        ap.error("--bits and --threads take comma-separated integers")
    graphs, parts = H.csv(args.graphs), H.csv(args.parts)
    if set(bits) - set(BITS):
        ap.error(f"--bits takes {', '.join(map(str, BITS))}")
    if set(graphs) - set(GRAPHS):
        ap.error(f"--graphs takes {', '.join(GRAPHS)}")
    if set(parts) - {"export", "quality", "decode"}:
        ap.error("--parts takes export, quality, decode")
    if args.repeats < 1 or args.export_repeats < 1 or args.attempts < 1 or not threads or min(threads) < 1:
        ap.error("--repeats, --export-repeats, --attempts and --threads must be >= 1")
    keys = [f"{g}-{b}" for b in bits for g in graphs] + ([] if args.no_gguf else [GGUF_KEY])

    machine = H.machine_info(*VERSIONS)
    H.log(f"machine: {machine.get('cpu_model')}, {machine['cpu_count']} CPUs, {machine['ram_gib']} GiB RAM, load {machine['loadavg'][0]:.2f}; "
          f"onnxruntime {machine['onnxruntime']}, optimum-onnx {machine['optimum-onnx']}, torch {machine['torch']}, xpack {machine['xpack']}")
    if machine["loadavg"][0] > 0.5 * (os.cpu_count() or 1):
        H.log(f"WARNING: load average {machine['loadavg'][0]:.2f} on {os.cpu_count()} cores: other work is running, timings will be noisy")
    model = demo_base_dir()
    H.log(f"demo model: {model}")
    results = {
        "machine": machine,
        "model": {"dir": str(model), "name": "SmolLM2-135M-Instruct (xpack demo base)", "config": json.loads((model / "config.json").read_text()),
                  "bytes": sum(p.stat().st_size for p in model.glob("*.safetensors"))},
        "settings": {"bits": bits, "graphs": graphs, "threads": threads, "repeats": args.repeats, "export_repeats": args.export_repeats,
                     "parts": parts, "decode_fp16": args.decode_fp16, "gguf_orientation": not args.no_gguf, "wait_idle_s": args.wait_idle,
                     "attempts": args.attempts, "quick": args.quick, "n_ctx": N_CTX, "profile": "cpu16 (threads replaced)"},
        "targets": TARGETS,
    }
    tmp_root = Path(tempfile.mkdtemp(prefix="xpack-onnx-bench-", dir=H.ensure_cache()))
    t_start = time.perf_counter()
    try:
        if "export" in parts:
            results["export"] = part_export(model, keys, args.export_repeats, args.wait_idle, tmp_root)
            H.write_json(args.json, results)
            files = {k: c["file"] for k, c in results["export"]["cases"].items() if "file" in c}
        else:
            files = _earlier_files(keys, parts)
        if "decode" in parts:
            dfiles = {k: p for k, p in files.items() if args.decode_fp16 or not k.endswith("-16")}
            results["decode"] = part_decode(dfiles, threads, args.repeats, args.attempts, args.wait_idle, tmp_root)
            H.write_json(args.json, results)
        if "quality" in parts:  # after decode, as in gguf.py
            results["quality"] = part_quality(model, files, max(threads), tmp_root)
            H.write_json(args.json, results)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    results["wall_s"] = time.perf_counter() - t_start
    verdicts = {f"decode {name}": c["verdict"] for name, c in (results.get("decode") or {}).get("cases", {}).items() if "verdict" in c}
    results["verdicts"] = verdicts
    H.write_json(args.json, results)
    if "export" in results:
        print_export(results["export"])
    if "quality" in results:
        print_quality(results["quality"])
    if "decode" in results:
        print_decode(results["decode"])
    if verdicts:
        print("Verdicts (xpack decode >= 2x optimum on the same file): " + ", ".join(f"{k} {v}" for k, v in verdicts.items()))
    H.log(f"wrote {args.json} ({results['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(H.main(main, WORKERS))
