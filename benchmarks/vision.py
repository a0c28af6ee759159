#!/usr/bin/env python3
"""Benchmark xpack's vision artifacts (one image + a prompt) per backend against the torch reference.

No real vision weights exist offline, so this runs on the tiny random-weight twins of ``tests/twins.py``:
``gemma3_vision`` (Gemma 3 / MedGemma) and ``mllama`` (Llama 3.2 Vision). The figures show how each
backend's pipeline behaves and how close it stays to torch, not the speed of the real 4B / 11B models;
``--with-memory`` adds the *computed* memory needs of those (``tools/vision_memory.py``).

Each twin's base + LoRA is merged once with ``xpack merge`` into ``benchmarks/.cache/vision/merged/`` (the
torch reference and the source of every export); every run exports again (PLAN below; a failing export
is recorded as "not available: <its last error line>"). Per artifact, in fresh processes:

  speed    ``load(folder, cpu16 with 1 thread, n_ctx 1024).generate(PROMPT, 32 greedy tokens, EOS ignored,
           image=image.png)``: load_s, image_encode_s, ttft_s, decode_tok_s, peak_rss_mb, the process's
           ru_maxrss and import_s (the worker's imports, xpack's runtimes included); medians of --repeats.
  parity   the reference's greedy answer scored teacher-forced with ``rt.logits_with_image`` (the text
           after the image, as ``xpack verify --images``) and compared with ``compare_logits``; plus the
           greedy tokens matching the reference's before the first difference.

More in benchmarks/README.md.

Usage:
  .venv/bin/python benchmarks/vision.py [--repeats 3] [--twins gemma3_vision,mllama] [--backends torch,gguf,onnx]
                                        [--with-memory] [--wait-idle S] [--json PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE] + [str(HERE)]  # last: see _harness.py

import _harness as H  # noqa: E402
from xpack.packager.verify.parity import compare_logits  # noqa: E402
from xpack.profiles.machine import resolve_for_machine  # noqa: E402
from xpack.profiles.profile import load_profile  # noqa: E402
from xpack.runtimes.messages import user_message  # noqa: E402
from xpack.runtimes.registry import load  # noqa: E402
from xpack.runtimes.settings import GenerationSettings  # noqa: E402

CACHE = H.CACHE / "vision"
DEFAULT_JSON = H.RESULTS / "vision.json"
VISION_MEMORY = H.ROOT / "tools" / "vision_memory.py"
PROMPT = "Describe the findings of this chest X-ray."
MAX_TOKENS = 32
THREADS = 1
N_CTX = 1024
TWINS = ("gemma3_vision", "mllama")
BACKENDS = ("torch", "gguf", "onnx")
RUNTIME_OF = {"torch": "torch", "gguf": "llamacpp", "onnx": "onnx"}
SETTINGS = GenerationSettings(max_tokens=MAX_TOKENS, temperature=0, repetition_penalty=1.0, ignore_eos=True)
VERSIONS = ("llama_cpp_python", "onnxruntime", "onnx", "numpy")


@dataclasses.dataclass(frozen=True)
class Artifact:
    key: str  # folder name under the cache's art/<twin>/
    backend: str  # torch, gguf, onnx
    label: str
    export_args: tuple[str, ...] = ()  # empty: the merged folder itself (the torch reference)


PLAN: dict[str, list[Artifact]] = {
    "gemma3_vision": [
        Artifact("torch", "torch", "torch fp32 (reference)"),
        Artifact("gguf-f32", "gguf", "GGUF F32 + mmproj", ("--format", "gguf", "--quant", "F32")),
        Artifact("gguf-f16", "gguf", "GGUF F16 + mmproj", ("--format", "gguf", "--bits", "16")),
        Artifact("onnx-fp32", "onnx", "ONNX fp32", ("--format", "onnx", "--bits", "32")),
        Artifact("onnx-int8", "onnx", "ONNX int8", ("--format", "onnx", "--bits", "8")),
    ],
    "mllama": [
        Artifact("torch", "torch", "torch fp32 (reference)"),
        Artifact("onnx-fp32", "onnx", "ONNX fp32", ("--format", "onnx", "--bits", "32")),
    ],
}
# Backends a twin has no artifact for, and why (shown in the table so that the gap is not silent).
NOT_PLANNED = {("mllama", "gguf"): "n/a: llama.cpp has no Llama 3.2 Vision (mllama) support"}


# --------------------------------------------------------------------------------------------
# Workers: ``python benchmarks/vision.py _worker KIND ...`` in fresh processes


def _profile():
    """cpu16 as this machine runs it, one thread, n_ctx 1024 (tests/test_onnx.py's ``cpu`` fixture)."""
    return dataclasses.replace(resolve_for_machine(load_profile("cpu16"))[0], threads=THREADS, n_ctx=N_CTX)


def worker_generate(folder: str, backend: str, image: str) -> int:
    """Load the artifact, generate once with the image; the result's timings and memory."""
    profile = _profile()
    t1 = time.perf_counter()
    with load(folder, profile, runtime=RUNTIME_OF[backend]) as rt:
        t2 = time.perf_counter()
        r = rt.generate(PROMPT, SETTINGS, image=image)
        t3 = time.perf_counter()
        runtime, threads, n_ctx = rt.name, rt.profile.threads, rt.profile.n_ctx
    H.emit({
        "import_s": t1 - H.T0, "load_wall_s": t2 - t1, "generate_s": t3 - t2,
        "load_s": r.load_s, "image_encode_s": r.image_encode_s, "ttft_s": r.ttft_s, "decode_tok_s": r.decode_tok_s,
        "prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens, "prompt_tok_s": r.prompt_tok_s,
        "total_s": r.total_s, "finish_reason": r.finish_reason, "peak_rss_mb": r.peak_rss_mb,
        "process_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
        "runtime": runtime, "threads": threads, "n_ctx": n_ctx, "token_ids": r.token_ids, "text": r.text,
    })
    return 0


def worker_parity(folder: str, backend: str, image: str, cont_file: str, out_npy: str) -> int:
    """Greedy answer (32 tokens, EOS ignored), then teacher-forced logits after the image.

    ``cont_file`` "-": score this side's own answer (the reference); else a JSON list of token ids."""
    import numpy as np

    with load(folder, _profile(), runtime=RUNTIME_OF[backend]) as rt:
        r = rt.generate(PROMPT, SETTINGS, image=image)
        cont = r.token_ids if cont_file == "-" else json.loads(Path(cont_file).read_text())
        logits, ids = rt.logits_with_image([user_message(PROMPT)], image, continuation_ids=cont)
    np.save(out_npy, np.asarray(logits, dtype=np.float32))
    H.emit({"greedy_ids": r.token_ids, "greedy_text": r.text, "scored_ids": [int(t) for t in ids],
            "continuation_ids": [int(t) for t in cont], "shape": list(np.shape(logits))})
    return 0


WORKERS = {"generate": worker_generate, "parity": worker_parity}


# --------------------------------------------------------------------------------------------
# Inputs and exports


def ensure_inputs(twin_names: list[str]) -> tuple[dict[str, Path], Path]:
    """Twins (base + adapter), merged with ``xpack merge``, and the sample image; cached."""
    CACHE.mkdir(parents=True, exist_ok=True)
    image = CACHE / "image.png"
    need = [n for n in twin_names if not (CACHE / "merged" / n / "config.json").is_file()]
    if need or not image.is_file():
        sys.path.insert(0, str(H.ROOT / "tests"))
        try:
            import twins
        finally:
            sys.path.pop(0)
        if not image.is_file():
            twins.sample_image().save(image)
        for name in need:
            H.log(f"building the {name} twin (base + adapter) into {CACHE / 'twins' / name}")
            tw = twins.make_twin(name, CACHE / "twins")
            cmd = H.xpack("merge", "--base", tw.model_dir, "--adapter", tw.adapter_dir, "--out", CACHE / "merged" / name, "--force")
            p = subprocess.run(cmd, capture_output=True, text=True, env=H.child_env(), cwd=str(H.ROOT))
            if p.returncode != 0:
                raise SystemExit(f"xpack merge of the {name} twin failed: {H.error_line(p.stderr + p.stdout)}")
    return {n: CACHE / "merged" / n for n in twin_names}, image


def export_artifact(twin: str, art: Artifact, merged: Path, work: Path) -> dict:
    if not art.export_args:
        return {"folder": str(merged), "command": None}
    out = CACHE / "art" / twin / art.key
    cmd = H.xpack("export", "--model", merged, *art.export_args, "--out", out, "--force", "--threads", THREADS)
    r = H.run_measured(cmd, f"export-{twin}-{art.key}", work)
    info = {"folder": str(out), "command": " ".join(["xpack", *cmd[1:]]), "wall_s": r["wall_s"], "peak_rss_mb": r["peak_rss_mb"],
            "returncode": r["returncode"]}
    if r["returncode"] != 0:
        info["error"] = H.error_line(r["stderr_tail"] + "\n" + r["stdout_tail"])
        info["stderr_tail"] = r["stderr_tail"][-1500:]
    return info


def weight_files(folder: Path, backend: str) -> list[Path]:
    pats = {"torch": ("*.safetensors",), "gguf": ("*.gguf",), "onnx": ("*.onnx", "*.onnx_data")}[backend]
    return sorted(p for pat in pats for p in folder.glob(pat) if p.is_file())


# --------------------------------------------------------------------------------------------
# Measuring


def summarize(runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    ph = [r["phases"] for r in ok]
    keys = ("load_s", "image_encode_s", "ttft_s", "decode_tok_s", "prompt_tok_s", "total_s", "peak_rss_mb", "process_maxrss_mb", "import_s")
    out = {k: H.med(ph, k) for k in keys}
    out.update({
        "runs": len(runs), "runs_ok": len(ok),
        "process_wall_s": H.med(ok, "wall_s"),
        "process_peak_rss_mb_polled": H.med(ok, "peak_rss_mb"),
        "other_cpu_s": H.med(ok, "other_cpu_s"),
        "prompt_tokens": ph[0]["prompt_tokens"] if ph else None,
        "completion_tokens": ph[0]["completion_tokens"] if ph else None,
        "all": {k: [None if p.get(k) is None else round(p[k], 4) for p in ph] for k in ("ttft_s", "decode_tok_s", "image_encode_s", "load_s")},
        "same_tokens_all_runs": len({json.dumps(p["token_ids"]) for p in ph}) == 1 if ph else None,
    })
    return out


def _status(lst: list[dict], summary: dict) -> str:
    errs = [r["error"] for r in lst if "error" in r]
    if errs and not summary["runs_ok"]:
        return f"failed: {errs[0]}"
    return f"{len(errs)} of {len(lst)} runs failed: {errs[0]}" if errs else "ok"


def run_twin(twin: str, merged: Path, image: Path, backends: list[str], repeats: int, wait_s: float, work: Path) -> dict:
    res: dict = {"merged_checkpoint": str(merged), "config": json.loads((merged / "config.json").read_text()).get("architectures"),
                 "artifacts": {}, "not_planned": {b: why for (t, b), why in NOT_PLANNED.items() if t == twin and b in backends}}
    ready: list[Artifact] = []
    for art in (a for a in PLAN[twin] if a.backend in backends):
        info = export_artifact(twin, art, merged, work)
        entry = res["artifacts"][art.key] = {"label": art.label, "backend": art.backend, "export": info}
        if "error" in info:
            entry["status"] = f"not available: {info['error']}"
            H.log(f"{twin} {art.label}: export failed: {info['error']}")
            continue
        entry["files"] = {p.name: p.stat().st_size for p in weight_files(Path(info["folder"]), art.backend)}
        entry["weight_bytes"] = sum(entry["files"].values())
        if art.export_args:
            H.log(f"{twin} {art.label}: exported in {info['wall_s']:.1f}s ({entry['weight_bytes'] / 1e6:.2f} MB of weights)")
        ready.append(art)
    # timed generate runs, order rotating per repeat
    runs: dict[str, list[dict]] = {a.key: [] for a in ready}
    for rep in range(repeats):
        order = ready[rep % len(ready):] + ready[: rep % len(ready)] if ready else []
        for art in order:
            folder = Path(res["artifacts"][art.key]["export"]["folder"])
            r = H.measure(H.worker_cmd("generate", folder, art.backend, image), f"gen-{twin}-{art.key}-{rep}", work,
                          weight_files(folder, art.backend), wait_s, check=False)
            r["order"] = order.index(art)
            runs[art.key].append(r)
            if "error" not in r:
                p = r["phases"]
                enc = "n/a" if p["image_encode_s"] is None else f"{p['image_encode_s'] * 1e3:.1f} ms"
                H.log(f"{twin} {art.label} rep {rep + 1}/{repeats}: load {p['load_s']:.2f}s, encode {enc}, ttft {p['ttft_s'] * 1e3:.1f} ms, "
                      f"{p['decode_tok_s']:.1f} tok/s, peak {p['peak_rss_mb']:.0f} MB")
    for art in ready:
        entry, lst = res["artifacts"][art.key], runs[art.key]
        entry["runs"] = [{k: r.get(k) for k in ("wall_s", "peak_rss_mb", "vmhwm_mb", "other_cpu_s", "user_cpu_s", "sys_cpu_s", "order", "error")}
                         | {"phases": {k: v for k, v in r.get("phases", {}).items() if k != "token_ids"}} for r in lst]
        entry["summary"] = summarize(lst)
        entry["status"] = _status(lst, entry["summary"])
        if entry["summary"]["runs_ok"]:
            entry["greedy_text"] = next(r["phases"]["text"] for r in lst if "error" not in r)
    _parity(twin, merged, image, ready, res, work)
    return res


def _parity(twin: str, merged: Path, image: Path, ready: list[Artifact], res: dict, work: Path) -> None:
    """The reference's own greedy answer first, then every artifact scores that answer."""
    import numpy as np

    ref_npy = work / f"parity-{twin}-reference.npy"
    rr = H.measure(H.worker_cmd("parity", merged, "torch", image, "-", ref_npy), f"parity-{twin}-reference", work, check=False)
    if "error" in rr:
        res["parity_reference_error"] = rr["error"]
        for art in ready:
            res["artifacts"][art.key]["parity"] = {"error": f"reference failed: {rr['error']}"}
        return
    ref = rr["phases"]
    ref_logits = np.load(ref_npy)
    cont_file = work / f"cont-{twin}.json"
    cont_file.write_text(json.dumps(ref["greedy_ids"]))
    res["reference_answer"] = {"ids": ref["greedy_ids"], "text": ref["greedy_text"], "scored_tokens": len(ref["scored_ids"])}
    H.log(f"{twin} reference answer ({len(ref['greedy_ids'])} tokens, scored {len(ref['scored_ids'])} after the image)")
    for art in ready:
        entry = res["artifacts"][art.key]
        if art.key == PLAN[twin][0].key:
            entry["parity"] = {"reference": True}
            continue
        npy = work / f"parity-{twin}-{art.key}.npy"
        pr = H.measure(H.worker_cmd("parity", entry["export"]["folder"], art.backend, image, cont_file, npy), f"parity-{twin}-{art.key}",
                       work, check=False)
        if "error" in pr:
            entry["parity"] = {"error": pr["error"]}
            continue
        ph = pr["phases"]
        if ph["scored_ids"] != ref["scored_ids"]:
            entry["parity"] = {"error": f"the text after the image is tokenized differently (first difference at token "
                                        f"{H.first_difference(ph['scored_ids'], ref['scored_ids'])} of {len(ref['scored_ids'])})"}
            continue
        try:
            figs = compare_logits(ref_logits, np.load(npy))
        except ValueError as exc:
            entry["parity"] = {"error": str(exc)}
            continue
        figs.update(greedy_matching_tokens=H.first_difference(ph["greedy_ids"], ref["greedy_ids"]), greedy_tokens=len(ref["greedy_ids"]),
                    greedy_text=ph["greedy_text"])
        entry["parity"] = figs
        H.log(f"{twin} {art.label}: KL mean {figs['kl_mean']:.2e}, top-1 {figs['top1_agreement_tie_aware']:.3f}, "
              f"max |logit err| {figs['max_abs_logit_error']:.2e}, greedy {figs['greedy_matching_tokens']}/{figs['greedy_tokens']}")


# --------------------------------------------------------------------------------------------
# Computed memory of the real models (tools/vision_memory.py)


def computed_memory(work: Path) -> dict:
    """Re-run tools/vision_memory.py into a temporary file (its own results stay as they are)."""
    js, md = work / "vision_memory.json", work / "vision_memory.md"
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, str(VISION_MEMORY), "--json", str(js), "--md", str(md)], capture_output=True, text=True,
                       env=H.child_env(), cwd=str(H.ROOT))
    if p.returncode != 0 or not js.is_file():
        return {"label": "computed from published configs, not measured", "error": H.error_line(p.stderr + p.stdout)}
    H.log(f"vision_memory.py: {time.perf_counter() - t0:.1f}s")
    return {"label": "computed from published configs, not measured (tools/vision_memory.py)", **json.loads(js.read_text())}


def print_computed(comp: dict) -> None:
    print("\n**Real models, computed (not measured): runtime memory on the cpu16 profile (from tools/vision_memory.py)**\n")
    if "error" in comp:
        print(f"vision_memory.py failed: {comp['error']}")
        return
    print("| model | artifact | weights GB | KV GB | vision act. GB | total GB | fits 16 GB |")
    print("|---|---|---|---|---|---|---|")
    for m in comp.get("models", []):
        for row in m.get("runtime", {}).get("cpu16", []):
            if row.get("total") is None:
                print(f"| {m['name']} | {row['artifact']} | n/a | n/a | n/a | n/a | n/a |")
                continue
            fits = "yes" if row["fits"] else "**no**"
            print(f"| {m['name']} | {row['artifact']} | {row['weights'] / 1e9:.2f} | {row['kv']['bytes'] / 1e9:.3f} | "
                  f"{row['vision_act']['bytes'] / 1e9:.3f} | {row['total'] / 1e9:.2f} | {fits} ({row['margin_gb']:+.1f}) |")


# --------------------------------------------------------------------------------------------
# Output


def _f(v, fmt: str, scale: float = 1.0) -> str:
    return "-" if v is None else format(v * scale, fmt)


COLUMNS = 12


def _row(cells: list[str]) -> str:
    """A markdown row padded with empty cells to the table's width."""
    return "| " + " | ".join(list(cells) + [""] * (COLUMNS - len(cells))) + " |"


def _parity_cells(par: dict) -> str:
    if par.get("reference"):
        return "reference | reference | reference | -"
    if "error" in par:
        return f"parity failed: {par['error']} | | |"
    return (f"{par['kl_mean']:.2e} | {par['top1_agreement_tie_aware'] * 100:.1f}% | {par['max_abs_logit_error']:.2e} | "
            f"{par['greedy_matching_tokens']}/{par['greedy_tokens']}")


def print_table(results: dict) -> None:
    s = results["settings"]
    print(f"**Vision twins, measured** (profile cpu16, {s['threads']} thread, n_ctx {s['n_ctx']}; one {s['image_size'][0]}x{s['image_size'][1]} image; "
          f"{s['max_tokens']} greedy tokens, EOS ignored; median of {s['repeats']} runs, fresh process each; "
          f"parity: teacher-forced logits after the image vs torch fp32)\n")
    print("| twin | artifact | weights MB | load s | image encode ms | TTFT ms | decode tok/s | peak RSS MB (generate / process) | "
          "mean KL | top-1 | max logit err | greedy match |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for twin, tres in results["twins"].items():
        for e in tres["artifacts"].values():
            if e["status"].startswith(("not available", "failed")):
                print(_row([twin, e["label"], "-", e["status"]]))
                continue
            sm = e["summary"]
            print(f"| {twin} | {e['label']} | {e['weight_bytes'] / 1e6:.2f} | {_f(sm['load_s'], '.2f')} | {_f(sm['image_encode_s'], '.1f', 1e3)} | "
                  f"{_f(sm['ttft_s'], '.1f', 1e3)} | {_f(sm['decode_tok_s'], '.1f')} | {_f(sm['peak_rss_mb'], '.0f')} / {_f(sm['process_maxrss_mb'], '.0f')} | "
                  f"{_parity_cells(e.get('parity', {}))} |")
        for b, why in tres.get("not_planned", {}).items():
            print(_row([twin, b, why]))
    arts = [(t, e) for t, tr in results["twins"].items() for e in tr["artifacts"].values()]
    exports = [(t, e["label"], e["export"]) for t, e in arts if e["export"].get("command")]
    if exports:
        print("\nExports (informational, 1 thread): " + "; ".join(
            f"{t} {label} {x['wall_s']:.1f}s / {x['peak_rss_mb']:.0f} MB" + (" (failed)" if x.get("error") else "") for t, label, x in exports))
    fails = [f"{t} {e['label']}: {e['status']}" for t, e in arts if e["status"] != "ok"]
    if fails:
        print("\nNot measured / failed: " + "; ".join(fails))


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3, help="timed generate runs per artifact, each a fresh process (medians)")
    ap.add_argument("--twins", default=",".join(TWINS), help=f"comma-separated (default {','.join(TWINS)})")
    ap.add_argument("--backends", default=",".join(BACKENDS), help=f"comma-separated (default {','.join(BACKENDS)}); "
                    "parity always runs the torch reference, untimed")
    ap.add_argument("--with-memory", action="store_true", help="also re-run tools/vision_memory.py (computed memory of "
                    "MedGemma 4B / Llama 3.2 11B Vision) and keep its JSON under 'computed'")
    ap.add_argument("--wait-idle", type=float, default=0, metavar="S", help="before each timed run, wait up to S s for other processes to go quiet (default 0)")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"where to write the figures (default {DEFAULT_JSON.relative_to(H.ROOT)})")
    args = ap.parse_args(argv)
    twin_names, backends = H.csv(args.twins), H.csv(args.backends)
    if set(twin_names) - set(TWINS) or not twin_names:
        ap.error(f"--twins takes {', '.join(TWINS)}")
    if set(backends) - set(BACKENDS) or not backends:
        ap.error(f"--backends takes {', '.join(BACKENDS)}")
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")

    machine = H.machine_info(*VERSIONS)
    H.log(f"machine: {machine.get('cpu_model')}, {machine['cpu_count']} CPUs; torch {machine['torch']}, "
          f"llama-cpp-python {machine['llama_cpp_python']}, onnxruntime {machine['onnxruntime']}")
    merged, image = ensure_inputs(twin_names)
    from PIL import Image

    with Image.open(image) as im:
        size = list(im.size)
    results = {
        "note": "tiny random-weight twins (tests/twins.py), not real models: the figures show each backend's pipeline "
                "and its parity with torch, not the speed of MedGemma 4B / Llama 3.2 11B Vision",
        "machine": machine,
        "settings": {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "repetition_penalty": 1.0, "ignore_eos": True,
                     "profile": "cpu16", "threads": THREADS, "n_ctx": N_CTX, "repeats": args.repeats, "twins": twin_names,
                     "backends": backends, "image": str(image), "image_size": size, "wait_idle_s": args.wait_idle},
        "twins": {},
    }
    work = Path(tempfile.mkdtemp(prefix="xpack-vision-bench-", dir=CACHE))
    try:
        for twin in twin_names:
            results["twins"][twin] = run_twin(twin, merged[twin], image, backends, args.repeats, args.wait_idle, work)
            H.write_json(args.json, results)
        if args.with_memory:
            results["computed"] = computed_memory(work)
            H.write_json(args.json, results)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["wall_s"] = time.perf_counter() - H.T0
    H.write_json(args.json, results)
    print_table(results)
    if "computed" in results:
        print_computed(results["computed"])
    H.log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(H.main(main, WORKERS))
