#!/usr/bin/env python3
"""Every verb at the seed sizes (issue #12), on synthetic checkpoints of the real shapes, beside the tools a user
would pick instead, same machine, one run. Weights are random (benchmarks/synthetic.py): the figures are time and
memory, never quality.

Sides, each a fresh process measured by ``_harness.run_measured`` (wall time, peak RSS of the process tree):

  merge     ``xpack merge`` of the seed LoRA  |  PEFT: ``PeftModel.from_pretrained(base bf16).merge_and_unload()`` +
            ``save_pretrained`` (how a PEFT user merges)
  gguf      ``xpack export --quant Q4_K_M`` (+ the mmproj of a vision model)  |  llama.cpp:
            ``convert_hf_to_gguf.py --outtype f16`` (+ ``--mmproj``) then its quantizer to Q4_K_M (the sdist of
            benchmarks/gguf.py)
  onnx      ``xpack export --format onnx --bits 4 --no-calibrate`` and ``--bits 16``  |  optimum-onnx's
            ``optimum-cli export onnx --task text-generation-with-past`` (its out-of-memory, past ``--memory-limit-gb``,
            or its refusal, is reported as such)
  verify    ``xpack verify`` of the Q4_K_M GGUF (of the ONNX int4 for mllama, which llama.cpp cannot run) against the
            merged checkpoint, the reference within ``--reference-memory`` if given, else within what xpack finds
            available (a ``--box-gb`` box's limit: profiles/cgroup_memory.py), its layers streamed beyond it
  decode    tokens/s after the first token, greedy, EOS ignored, ``--tokens`` tokens: ``xpack.runtimes`` vs a raw
            llama-cpp-python loop (GGUF) and a raw onnxruntime loop (ONNX int4), both fed the same prompt ids; and
            each as a fraction of the memory-bandwidth bound: bandwidth (numpy copy of a 1 GiB array, read + write
            bytes / s, this machine) / bytes of weights read per token (the decoder's weights file). Target >= 0.7.

The seed card's CPU16 row (40 s load, 15 s for 256 tokens, 12 GB) is printed beside the 4B GGUF row as the yardstick.
Disk: the merged checkpoint, the artifacts and one intermediate at a time (llama.cpp's f16 file, PEFT's merge, the fp16
ONNX are removed once measured): about 26 GB for Gemma 3 4B.

Usage:
  .venv/bin/python benchmarks/scale.py [--model gemma3-4b] [--steps merge,gguf,onnx,verify,decode]
                                       [--memory-limit-gb 16] [--tokens 64] [--json PATH] [--work DIR]
                                       [--onnx-bits 4,16] [--update]

``--update`` re-measures the given steps and keeps the other sides of the existing JSON (each side carries the date
it was measured): the sides compared within one step always come from one run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE] + [str(HERE)]  # last: see _harness.py

import _harness as H  # noqa: E402
from xpack.packager.io.checkpoint import Checkpoint  # noqa: E402
from xpack.profiles.machine import resolve_for_machine  # noqa: E402
from xpack.profiles.profile import load_profile  # noqa: E402
from xpack.runtimes.bench import BENCH_PROMPT  # noqa: E402
from xpack.runtimes.onnx_decoder import attention_bias  # noqa: E402
from xpack.runtimes.registry import load  # noqa: E402
from xpack.runtimes.settings import GenerationSettings  # noqa: E402

STEPS = ("merge", "gguf", "onnx", "verify", "decode")
SEED_CPU16 = {"load_s": 40, "s_per_256_tokens": 15, "memory_gb": 12}  # the seed card's CPU16 row (../shared/seeds)
BANDWIDTH_TARGET = 0.7


def _bench_gguf():
    """benchmarks/gguf.py as a module (its name would shadow the gguf package): llama.cpp's converter and quantizer."""
    spec = importlib.util.spec_from_file_location("bench_gguf", HERE / "gguf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------------------
# Workers: ``python benchmarks/scale.py _worker KIND ...`` in fresh processes


def worker_peft_merge(base: str, adapter: str, out: str) -> int:
    import torch
    import transformers
    from peft import PeftModel

    config = json.loads((Path(base) / "config.json").read_text())
    vision = (config.get("architectures") or [""])[0].endswith("ForConditionalGeneration")
    cls = transformers.AutoModelForImageTextToText if vision else transformers.AutoModelForCausalLM
    t0 = time.perf_counter()
    model = cls.from_pretrained(base, dtype=torch.bfloat16, local_files_only=True)
    t1 = time.perf_counter()
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    t2 = time.perf_counter()
    merged.save_pretrained(out)
    H.emit({"load_s": round(t1 - t0, 2), "merge_s": round(t2 - t1, 2), "save_s": round(time.perf_counter() - t2, 2)})
    return 0


def worker_bandwidth() -> int:
    """Memory bandwidth: the best of 5 copies of a 1 GiB float32 array, counted as read + write bytes."""
    import numpy as np

    a = np.ones(1 << 28, np.float32)
    b = np.empty_like(a)
    best = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        np.copyto(b, a)
        best = max(best, 2 * a.nbytes / (time.perf_counter() - t0))
    H.emit({"bandwidth_gb_s": round(best / 1e9, 2)})
    return 0


def worker_decode_xpack(path: str, tokens: str, ids_out: str) -> int:
    settings = GenerationSettings(max_tokens=int(tokens), temperature=0, repetition_penalty=1.0, ignore_eos=True)
    profile = load_profile("cpu16")
    with load(path, profile) as rt:
        ids = rt.tokenize(rt.prompt_text(BENCH_PROMPT))
        Path(ids_out).write_text(json.dumps(ids))
        r = rt.generate(BENCH_PROMPT, settings)
        threads = rt.profile.threads
    H.emit({"decode_tok_s": r.decode_tok_s, "ttft_s": r.ttft_s, "load_s": r.load_s, "prompt_tokens": r.prompt_tokens,
            "completion_tokens": r.completion_tokens, "threads": threads, "tokens_sha": H.token_digest(r.token_ids)})
    return 0


def worker_decode_llama_cpp(path: str, tokens: str, ids_file: str, threads: str) -> int:
    import llama_cpp

    prompt = json.loads(Path(ids_file).read_text())
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=path, n_ctx=2048, n_threads=int(threads), n_threads_batch=int(threads), verbose=False)
    load_s = time.perf_counter() - t0
    out, first = [], None
    start = time.perf_counter()
    for token in llm.generate(prompt, temp=0.0, repeat_penalty=1.0):
        first = first or time.perf_counter()
        out.append(token)
        if len(out) >= int(tokens):
            break
    end = time.perf_counter()
    H.emit({"decode_tok_s": (len(out) - 1) / (end - first), "ttft_s": first - start, "load_s": load_s, "completion_tokens": len(out),
            "threads": int(threads), "tokens_sha": H.token_digest(out)})
    return 0


def worker_decode_onnxruntime(folder: str, tokens: str, ids_file: str, threads: str) -> int:
    """A raw onnxruntime loop over the artifact's graphs: numpy feeds, the cache handed back each step, greedy."""
    import numpy as np
    import onnxruntime as ort

    prompt = json.loads(Path(ids_file).read_text())
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads)
    t0 = time.perf_counter()
    decoder = ort.InferenceSession(str(Path(folder) / "model.onnx"), options, providers=["CPUExecutionProvider"])
    embed_path = Path(folder) / "embed.onnx"
    embed = ort.InferenceSession(str(embed_path), options, providers=["CPUExecutionProvider"]) if embed_path.is_file() else None
    load_s = time.perf_counter() - t0
    inputs = {i.name: i for i in decoder.get_inputs()}
    window = json.loads((Path(folder) / "config.json").read_text()).get("text_config", {}).get("sliding_window")
    past = {n: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float16 if "16" in i.type else np.float32)
            for n, i in inputs.items() if n.startswith("past_key_values.")}
    names = [o.name for o in decoder.get_outputs()]
    out, first, chunk, start_pos = [], None, prompt, 0
    start = time.perf_counter()
    while len(out) < int(tokens):
        ids = np.array([chunk], np.int64)
        feed = {"inputs_embeds": embed.run(None, {"input_ids": ids})[0]} if embed else {"input_ids": ids}
        feed["attention_mask"] = np.ones((1, start_pos + len(chunk)), np.int64)
        if "attention_bias" in inputs:
            feed["attention_bias"] = attention_bias(start_pos, len(chunk))
        if "attention_bias_sliding" in inputs:
            feed["attention_bias_sliding"] = attention_bias(start_pos, len(chunk), window)
        values = dict(zip(names, decoder.run(names, {**feed, **past})))
        token = int(values["logits"][0, -1].argmax())
        first = first or time.perf_counter()
        out.append(token)
        past = {k.replace("present.", "past_key_values."): v for k, v in values.items() if k.startswith("present.")}
        start_pos += len(chunk)
        chunk = [token]
    end = time.perf_counter()
    H.emit({"decode_tok_s": (len(out) - 1) / (end - first), "ttft_s": first - start, "load_s": load_s, "completion_tokens": len(out),
            "threads": int(threads), "tokens_sha": H.token_digest(out)})
    return 0


WORKERS = {"peft-merge": worker_peft_merge, "bandwidth": worker_bandwidth, "decode-xpack": worker_decode_xpack,
           "decode-llama-cpp": worker_decode_llama_cpp, "decode-onnxruntime": worker_decode_onnxruntime}


# --------------------------------------------------------------------------------------------
# The run


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) if Path(path).exists() else 0


class Run:
    """The sides of one run. ``box_mb``: xpack's sides run inside a memory cgroup of that size (_harness.MemoryBox), the
    target of their step; ``others``: False leaves out the other tools' sides (a re-measure of xpack's, with --update)."""

    def __init__(self, work: Path, limit_mb: float, box_mb: float | None = None, others: bool = True):
        self.work, self.limit_mb, self.box_mb, self.others = work, limit_mb, box_mb, others
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.sides: dict[str, dict] = {}

    def other(self, label: str, cmd: list[str], env: dict | None = None, out: Path | None = None) -> dict | None:
        """Another tool's side, unless this run leaves them out."""
        return self.side(label, cmd, env, out) if self.others else None

    def side(self, label: str, cmd: list[str], env: dict | None = None, out: Path | None = None) -> dict:
        H.log(f"{label}: {' '.join(map(str, cmd))[:160]}")
        box_mb = self.box_mb if label.startswith("xpack") else None
        r = H.measure([str(c) for c in cmd], label, self.logs, env=env, check=False, limit_mb=self.limit_mb, box_mb=box_mb)
        row = {**H.brief(r), "rss_timeline_mb": r.get("rss_timeline_mb")}  # (seconds, MB): which phase peaked
        if r.get("box", {}).get("oom_kills"):
            row["result"] = f"out of memory: killed by the kernel in a {box_mb / 1024:g} GB memory cgroup"
        elif r.get("killed_over_limit_mb"):
            row["result"] = f"out of memory: killed above {self.limit_mb / 1024:.0f} GB"
        elif r["returncode"] == 1 and '"parity_pass": false' in r.get("stdout_tail", ""):  # verify ran; its verdict is FAIL
            row["result"] = "ok: parity FAIL (verify exits 1; random weights give no quality)"
        elif r["returncode"] != 0:
            row["result"] = f"failed: {r.get('error', '')[:300]}"
        else:
            row["result"] = "ok"
        if r.get("phases"):
            row["phases"] = r["phases"]
        if out is not None and row["result"] == "ok":
            row["output_bytes"] = _du(out)
        self.sides[label] = row
        H.log(f"{label}: {row['result']}, {row['wall_s']:.0f} s, peak RSS {row['peak_rss_mb'] / 1024:.2f} GB")
        return row


def _largest_tensor_fp32(folder: Path) -> int:
    best = 0
    for spec in Checkpoint(folder).specs.values():
        n = 4
        for d in spec.shape:
            n *= d
        best = max(best, n)
    return best


def _llama_cpp_sides(r: "Run", work: Path, merged: Path, vision: bool) -> None:
    """llama.cpp's own converter and quantizer on the merged checkpoint, beside xpack's GGUF export."""
    bg = _bench_gguf()
    bg.ensure_converter()
    lc = work / "llama.cpp"
    shutil.rmtree(lc, ignore_errors=True)
    lc.mkdir()
    r.side("llama.cpp convert f16", bg.converter_cmd(merged, "f16", lc / "f16.gguf"), env=bg.converter_env(), out=lc / "f16.gguf")
    r.side("llama.cpp quantize Q4_K_M", [sys.executable, str(HERE / "gguf.py"), "_worker", "quantize", lc / "f16.gguf", lc / "q4_k_m.gguf",
                                         "Q4_K_M", os.cpu_count()], out=lc / "q4_k_m.gguf")
    if vision:
        r.side("llama.cpp convert mmproj", bg.converter_cmd(merged, "f16", lc / "mmproj.gguf") + ["--mmproj"], env=bg.converter_env(), out=lc / "mmproj.gguf")
    (lc / "f16.gguf").unlink(missing_ok=True)


def run(model: str, steps: list[str], work: Path, limit_gb: float, tokens: int, reference_memory: float | None, scale: str = "full",
        onnx_bits: tuple[str, ...] = ("4", "16"), box_gb: float | None = None, others: bool = True, quick_verify: bool = False) -> dict:
    cache = H.CACHE / "synthetic" / (model if scale == "full" else f"{model}-{scale}")
    if not (cache / "COMPLETE").is_file():
        H.log(f"building the synthetic {model} (benchmarks/synthetic.py)")
        subprocess.run([sys.executable, str(HERE / "synthetic.py"), "--model", model, "--scale", scale], check=True)
    base, adapter = cache / "base", cache / "adapter"
    vision = json.loads((base / "config.json").read_text()).get("vision_config") is not None
    largest = _largest_tensor_fp32(base)  # read now: a run of hours must not end in a traceback over the base's headers
    r = Run(work, limit_gb * 1024, box_gb * 1024 if box_gb else None, others)
    merged, gguf_dir, onnx4 = work / "merged", work / "gguf", work / "onnx4"
    threads = str(resolve_for_machine(load_profile("cpu16"))[0].threads)  # what xpack run uses on this machine: the raw loops get the same
    if "merge" in steps:
        shutil.rmtree(merged, ignore_errors=True)
        r.side("xpack merge", H.xpack("merge", "--base", base, "--adapter", adapter, "--out", merged), out=merged)
        peft_out = work / "peft-merged"
        r.other("PEFT merge_and_unload", H.worker_cmd("peft-merge", base, adapter, peft_out), out=peft_out)
        shutil.rmtree(peft_out, ignore_errors=True)
    if "gguf" in steps:
        shutil.rmtree(gguf_dir, ignore_errors=True)
        r.side("xpack export gguf Q4_K_M", H.xpack("export", "--model", merged, "--format", "gguf", "--quant", "Q4_K_M", "--out", gguf_dir), out=gguf_dir)
        if r.others:
            _llama_cpp_sides(r, work, merged, vision)
    if "onnx" in steps:
        for bits, out in (("4", onnx4), ("16", work / "onnx16")):
            if bits not in onnx_bits:
                continue
            shutil.rmtree(out, ignore_errors=True)
            extra = ["--no-calibrate"] if bits == "4" else []
            row = r.side(f"xpack export onnx --bits {bits}", H.xpack("export", "--model", merged, "--format", "onnx", "--bits", bits, *extra, "--out", out), out=out)
            if (out / "manifest.json").is_file():  # the export's own check against torch, kept before the artifact is removed
                row["check"] = json.loads((out / "manifest.json").read_text()).get("validation", {}).get("artifact")
        shutil.rmtree(work / "onnx16", ignore_errors=True)
        opt = work / "optimum"
        shutil.rmtree(opt, ignore_errors=True)
        r.other("optimum-cli export onnx", [Path(sys.executable).with_name("optimum-cli"), "export", "onnx", "--model", merged,
                                           "--task", "text-generation-with-past", opt], out=opt)
        shutil.rmtree(opt, ignore_errors=True)
    if "verify" in steps:  # the GGUF; a model llama.cpp cannot run (mllama) verifies its ONNX int4
        artifact, label = (gguf_dir, "GGUF Q4_K_M") if any(gguf_dir.glob("*.gguf")) else (onnx4, "ONNX int4")
        quick, memory = [], (["--reference-memory", reference_memory] if reference_memory else [])
        if quick_verify:  # one prompt, 4 tokens, 48 words of text: a reference whose every forward streams the weights
            (work / "verify-prompts.jsonl").write_text(json.dumps({"prompt": "Describe the findings of a normal chest X-ray."}) + "\n")
            (work / "verify-text.txt").write_text("The lungs are clear. No pleural effusion or pneumothorax. The heart size is normal. "
                                                  "The mediastinum is not widened. Bones and soft tissues are unremarkable. " * 2)
            quick = ["--prompts", work / "verify-prompts.jsonl", "--text", work / "verify-text.txt"]
        r.side(f"xpack verify ({label})", H.xpack("verify", "--artifact", artifact, "--reference", merged, "--profile", "cpu16", "--no-benchmark",
                                                  "--max-tokens", "4" if quick_verify else "8", *memory, *quick,
                                                  "--json"))
    decode = {}
    if "decode" in steps:
        bw = r.side("bandwidth", H.worker_cmd("bandwidth"))
        bandwidth = (bw.get("phases") or {}).get("bandwidth_gb_s")
        gguf_file = next(p for p in sorted(gguf_dir.glob("*.gguf")) if "mmproj" not in p.name)
        for name, artifact, raw_kind, raw_path, weights in (
            ("GGUF Q4_K_M", gguf_dir, "decode-llama-cpp", gguf_file, gguf_file.stat().st_size),
            ("ONNX int4", onnx4, "decode-onnxruntime", onnx4, (onnx4 / "model.onnx_data").stat().st_size),
        ):
            ids = work / f"ids-{raw_kind}.json"
            x = r.side(f"decode xpack run {name}", H.worker_cmd("decode-xpack", artifact, tokens, ids))
            raw = r.side(f"decode raw {raw_kind[7:]} {name}", H.worker_cmd(raw_kind, raw_path, tokens, ids, threads))
            xs, rs = x.get("phases") or {}, raw.get("phases") or {}
            bound = bandwidth * 1e9 / weights if bandwidth else None
            decode[name] = {
                "xpack_tok_s": xs.get("decode_tok_s"), "raw_tok_s": rs.get("decode_tok_s"),
                "xpack_vs_raw": xs["decode_tok_s"] / rs["decode_tok_s"] if xs.get("decode_tok_s") and rs.get("decode_tok_s") else None,
                "weights_read_per_token_bytes": weights, "bandwidth_gb_s": bandwidth, "bound_tok_s": bound,
                "xpack_fraction_of_bound": xs["decode_tok_s"] / bound if bound and xs.get("decode_tok_s") else None,
                "same_tokens": xs.get("tokens_sha") == rs.get("tokens_sha"),
                "xpack_load_s": xs.get("load_s"), "xpack_peak_rss_mb": x["peak_rss_mb"],
            }
    return {"model": model, "scale": scale, "synthetic": True, "steps": steps, "memory_limit_gb": limit_gb, "sides": r.sides, "decode": decode,
            "largest_tensor_fp32_bytes": largest, "seed_cpu16_yardstick": SEED_CPU16,
            "targets": {"decode_fraction_of_bandwidth_bound_min": BANDWIDTH_TARGET}}


def report(result: dict) -> None:
    print(f"\n{result['model']} (synthetic weights of the real shapes: time and memory only)")
    print(f"{'side':44s} {'result':10s} {'wall':>8s} {'peak RSS':>9s} {'output':>9s}")
    for label, row in result["sides"].items():
        out = f"{row['output_bytes'] / 1e9:.2f} GB" if row.get("output_bytes") else ""
        print(f"{label:44s} {row['result'][:10]:10s} {row['wall_s']:7.0f}s {row['peak_rss_mb'] / 1024:8.2f}G {out:>9s}")
    for name, d in result["decode"].items():
        frac = d["xpack_fraction_of_bound"]
        print(f"decode {name}: xpack {d['xpack_tok_s']:.2f} tok/s, raw {d['raw_tok_s']:.2f} tok/s ({d['xpack_vs_raw']:.2f}x), "
              f"bound {d['bound_tok_s']:.2f} tok/s -> {frac:.2f} of it ({'PASS' if frac >= BANDWIDTH_TARGET else 'MISS'} >= {BANDWIDTH_TARGET}); "
              f"same tokens: {d['same_tokens']}")
    g = result["decode"].get("GGUF Q4_K_M")
    if g:
        print(f"yardstick (seed card CPU16: {SEED_CPU16['load_s']} s load, {SEED_CPU16['s_per_256_tokens']} s / 256 tokens, "
              f"{SEED_CPU16['memory_gb']} GB): xpack {g['xpack_load_s']:.1f} s load, {256 / g['xpack_tok_s']:.0f} s / 256 tokens, "
              f"{g['xpack_peak_rss_mb'] / 1024:.1f} GB")


def _merged(old: dict, new: dict) -> dict:
    """The earlier result with the sides and decode figures ``new`` measured replaced (the rest keep their dates)."""
    for side in old.get("sides", {}).values():
        side.setdefault("measured", old.get("machine", {}).get("date"))
    sides = {**old.get("sides", {}), **new["sides"]}
    return {**old, **new, "steps": sorted(set(old.get("steps", [])) | set(new["steps"]), key=STEPS.index),
            "sides": sides, "decode": {**old.get("decode", {}), **new.get("decode", {})}}


def run_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-4b", help="a benchmarks/synthetic.py model (default gemma3-4b)")
    ap.add_argument("--scale", default="full", choices=("full", "tiny"), help="tiny: benchmarks/synthetic.py's small twin, to try the script")
    ap.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated, of {','.join(STEPS)}")
    ap.add_argument("--memory-limit-gb", type=float, default=16.0, help="a side above this is killed and reported out of memory (the cpu16 box)")
    ap.add_argument("--reference-memory", type=float, default=None,
                    help="verify's --reference-memory (GB); default: none given, xpack sizes it from the memory available (in a --box-gb box, the box's)")
    ap.add_argument("--tokens", type=int, default=64, help="tokens per decode run")
    ap.add_argument("--work", type=Path, default=None, help="where the artifacts go (default benchmarks/.cache/scale/MODEL)")
    ap.add_argument("--json", type=Path, default=None, help="default benchmarks/results/scale-MODEL.json")
    ap.add_argument("--onnx-bits", default="4,16", help="the --bits of the onnx step's xpack exports (default 4,16)")
    ap.add_argument("--box-gb", type=float, default=None,
                    help="xpack's sides also run inside a memory cgroup of this size (the step's target), where the machine allows one")
    ap.add_argument("--quick-verify", action="store_true", help="verify on one prompt, 4 tokens and a short text (11B: every forward streams 20 GB)")
    ap.add_argument("--xpack-only", action="store_true", help="leave out the other tools' sides (with --update, their last figures stay)")
    ap.add_argument("--update", action="store_true", help="keep the sides of the existing JSON that these steps do not measure")
    a = ap.parse_args(argv)
    steps = H.csv(a.steps)
    if set(steps) - set(STEPS):
        raise SystemExit(f"unknown steps: {', '.join(sorted(set(steps) - set(STEPS)))} (known: {', '.join(STEPS)})")
    name = a.model if a.scale == "full" else f"{a.model}-{a.scale}"
    work = a.work or H.CACHE / "scale" / name
    work.mkdir(parents=True, exist_ok=True)
    machine = H.machine_info("torch", "transformers", "peft", "onnxruntime", "llama_cpp_python", "optimum")
    result = {"machine": machine, **run(a.model, steps, work, a.memory_limit_gb, a.tokens, a.reference_memory, a.scale, tuple(H.csv(a.onnx_bits)),
                                   a.box_gb, not a.xpack_only, a.quick_verify)}
    for side in result["sides"].values():
        side.setdefault("measured", machine["date"])
    path = a.json or H.RESULTS / f"scale-{name}.json"
    if a.update and path.is_file():
        result = _merged(json.loads(path.read_text()), result)
    report(result)
    H.write_json(path, result)
    return 0


if __name__ == "__main__":
    sys.exit(H.main(run_main, WORKERS))
