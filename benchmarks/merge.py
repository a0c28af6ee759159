#!/usr/bin/env python3
"""Benchmark ``xpack merge`` against PEFT's ``merge_and_unload`` (wall time, peak RSS, same weights).

Cases: ``demo`` (the demo base and adapter) and ``synthetic`` (a random bf16 llama of >= 1e9 parameters
and a random PEFT LoRA, built once by streaming tensors into ``benchmarks/.cache/``). Each side runs in
a fresh interpreter (``_harness.run_measured``), from a warm page cache:

  xpack  ``xpack merge --base B --adapter A --out O --force``
  PEFT   ``AutoModelForCausalLM.from_pretrained(B, torch_dtype=<base dtype>, low_cpu_mem_usage=True)``,
         ``PeftModel.from_pretrained``, ``merge_and_unload()``, ``save_pretrained(O, safe_serialization=True)``

The outputs are compared tensor by tensor. Targets (xpack / PEFT): peak RSS <= 0.35, wall <= 1.0; a
miss is reported, not an error. More in benchmarks/README.md.

Usage:
  .venv/bin/python benchmarks/merge.py [--cases demo,synthetic] [--json PATH] [--repeats N] [--wait-idle S] [--profile]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import textwrap
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE] + [str(HERE)]  # last: see _harness.py

import _harness as H  # noqa: E402
from xpack.packager.demo.base_model import demo_adapter_dir, demo_base_dir  # noqa: E402
from xpack.packager.io.checkpoint import Checkpoint  # noqa: E402
from xpack.packager.io.tensors import ShardedWriter, TensorSpec, plan_shards  # noqa: E402

DEFAULT_JSON = H.RESULTS / "merge.json"
TARGETS = {"peak_rss_ratio": 0.35, "wall_ratio": 1.0}

# The synthetic base: TinyLlama-like widths, full multi-head attention, untied head.
SYNTH = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
}
SYNTH_SHARD_BYTES = 1_000_000_000  # ~1 GB shards
SYNTH_SEED = 1234
LORA = {"r": 16, "lora_alpha": 32, "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
SYNTH_VERSION = 1  # bump to force a rebuild of the cache when the builder changes
SIDES = (("xpack", "xpack"), ("peft", "PEFT"))


class Skip(Exception):
    """A case that cannot run here; the message says why."""


# --------------------------------------------------------------------------------------------
# Synthetic base + adapter, streamed straight to safetensors


def _synthetic_specs() -> list[TensorSpec]:
    """Every tensor of the synthetic LlamaForCausalLM, bf16, in the order HF saves them."""
    h, f, v, n = SYNTH["hidden_size"], SYNTH["intermediate_size"], SYNTH["vocab_size"], SYNTH["num_hidden_layers"]
    kv = SYNTH["num_key_value_heads"] * (h // SYNTH["num_attention_heads"])
    shapes = [("model.embed_tokens.weight", (v, h))]
    for i in range(n):
        p = f"model.layers.{i}."
        shapes += [
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "mlp.gate_proj.weight", (f, h)),
            (p + "mlp.up_proj.weight", (f, h)),
            (p + "mlp.down_proj.weight", (h, f)),
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
    shapes += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return [TensorSpec(name, "BF16", shape) for name, shape in shapes]


def _synthetic_config() -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "head_dim": SYNTH["hidden_size"] // SYNTH["num_attention_heads"],
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        **SYNTH,
    }


def _synth_key() -> str:
    return json.dumps({"v": SYNTH_VERSION, "synth": SYNTH, "shard": SYNTH_SHARD_BYTES, "seed": SYNTH_SEED, "lora": LORA}, sort_keys=True)


def build_synthetic(rebuild: bool = False) -> tuple[Path, Path, dict]:
    """Build (once) the synthetic base and adapter under benchmarks/.cache; return (base, adapter, info)."""
    import torch

    root = H.ensure_cache() / "synthetic-llama"
    base, adapter, stamp = root / "base", root / "adapter", root / "COMPLETE"
    specs = _synthetic_specs()
    n_params = sum(math.prod(s.shape) for s in specs)
    info = {
        "architecture": "LlamaForCausalLM",
        **SYNTH,
        "tie_word_embeddings": False,
        "dtype": "bfloat16",
        "parameters": n_params,
        "lora": {"r": LORA["r"], "lora_alpha": LORA["lora_alpha"], "target_modules": LORA["targets"], "dtype": "bfloat16"},
    }
    if n_params < 1_000_000_000:
        raise RuntimeError(f"synthetic model has {n_params:,} parameters, expected >= 1e9")
    if not rebuild and stamp.is_file() and stamp.read_text() == _synth_key():
        H.log(f"synthetic llama: cached in {root} ({n_params:,} parameters)")
        return base, adapter, _describe_files(info, base, adapter)

    H.log(f"building synthetic llama: {n_params:,} parameters ({n_params / 1e9:.3f}e9), bf16, into {root}")
    t0 = time.perf_counter()
    shutil.rmtree(root, ignore_errors=True)
    tmp = H.CACHE / f".synthetic-llama.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "base").mkdir(parents=True)
    (tmp / "adapter").mkdir(parents=True)
    gen = torch.Generator().manual_seed(SYNTH_SEED)
    # xpack's own shard writer makes the input: one tensor in memory at a time, HF's names and index
    writer = ShardedWriter(tmp / "base", plan_shards(specs, SYNTH_SHARD_BYTES))
    for s in specs:
        if s.name.endswith("norm.weight"):
            t = (1.0 + 0.05 * torch.randn(s.shape, generator=gen)).to(torch.bfloat16)
        else:
            t = torch.randn(s.shape, generator=gen, dtype=torch.bfloat16).mul_(0.02)
        writer.write(s.name, t.view(torch.int16).numpy().view("uint16"))
    writer.close()
    (tmp / "base" / "config.json").write_text(json.dumps(_synthetic_config(), indent=2) + "\n")
    (tmp / "base" / "generation_config.json").write_text(
        json.dumps({"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2}, indent=2) + "\n"
    )

    # The adapter: PEFT's key names, non-zero A and B, bf16.
    from safetensors.torch import save_file

    shapes = {s.name: s.shape for s in specs}
    r = LORA["r"]
    lora: dict[str, torch.Tensor] = {}
    for i in range(SYNTH["num_hidden_layers"]):
        for mod in LORA["targets"]:
            part = "self_attn" if mod in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            name = f"model.layers.{i}.{part}.{mod}"
            out_f, in_f = shapes[name + ".weight"]
            A = torch.randn((r, in_f), generator=gen) / in_f**0.5
            B = torch.randn((out_f, r), generator=gen) * 0.01
            lora[f"base_model.model.{name}.lora_A.weight"] = A.to(torch.bfloat16).contiguous()
            lora[f"base_model.model.{name}.lora_B.weight"] = B.to(torch.bfloat16).contiguous()
    save_file(lora, str(tmp / "adapter" / "adapter_model.safetensors"), metadata={"format": "pt"})
    (tmp / "adapter" / "adapter_config.json").write_text(json.dumps(_adapter_config(str(base)), indent=2, sort_keys=True) + "\n")

    os.rename(tmp, root)
    stamp.write_text(_synth_key())
    H.log(f"synthetic llama built in {time.perf_counter() - t0:.1f}s")
    return base, adapter, _describe_files(info, base, adapter)


def _adapter_config(base_path: str) -> dict:
    """adapter_config.json as PEFT's LoraConfig.save_pretrained writes it."""
    from peft import LoraConfig

    cfg = LoraConfig(r=LORA["r"], lora_alpha=LORA["lora_alpha"], lora_dropout=0.0, target_modules=LORA["targets"], task_type="CAUSAL_LM",
                     bias="none", base_model_name_or_path=base_path, inference_mode=True).to_dict()
    cfg.update(target_modules=sorted(cfg["target_modules"]), peft_type="LORA", task_type="CAUSAL_LM")
    return json.loads(json.dumps(cfg, default=lambda o: getattr(o, "value", str(o))))


def _weights(d: Path) -> list[Path]:
    return sorted(Path(d).glob("*.safetensors"))


def _describe_files(info: dict, base: Path, adapter: Path) -> dict:
    return {**info, "base_files": len(_weights(base)), "base_bytes": sum(p.stat().st_size for p in _weights(base)),
            "adapter_bytes": sum(p.stat().st_size for p in adapter.glob("adapter_model.*"))}


# --------------------------------------------------------------------------------------------
# Demo case


def demo_paths() -> tuple[Path, Path, dict]:
    try:
        adapter = Path(demo_adapter_dir())  # cheap check first: the base may take a minute to materialize
        base = Path(demo_base_dir())
    except Exception as exc:
        raise Skip(f"the demo model is not available ({exc.__class__.__name__}: {exc})") from None
    info = _describe_files({"base_dir": str(base), "adapter_dir": str(adapter), "dtype": _base_dtype(base),
                            "parameters": sum(math.prod(s.shape) for s in Checkpoint(base).specs.values())}, base, adapter)
    try:
        cfg = json.loads((adapter / "adapter_config.json").read_text())
        info["lora"] = {k: cfg.get(k) for k in ("r", "lora_alpha", "target_modules", "use_dora", "use_rslora")}
    except (OSError, ValueError):
        pass
    return base, adapter, info


_TORCH_DTYPE = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


def _base_dtype(d: Path) -> str:
    """The float dtype holding most of the base's parameters (what PEFT should load it as)."""
    by: dict[str, int] = {}
    for s in Checkpoint(Path(d)).specs.values():
        if s.dtype in _TORCH_DTYPE:
            by[s.dtype] = by.get(s.dtype, 0) + math.prod(s.shape)
    return _TORCH_DTYPE[max(by, key=by.get)] if by else "float32"


# --------------------------------------------------------------------------------------------
# The two sides


# The PEFT side, run as ``python -c PEFT_SCRIPT BASE ADAPTER OUT DTYPE`` in a fresh interpreter.
PEFT_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys, time
    t0 = time.perf_counter()
    phases = {}
    def mark(name, t):
        phases[name] = {"s": round(time.perf_counter() - t, 3),
                        "maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
        return time.perf_counter()
    base, adapter, out, dtype = sys.argv[1:5]
    import torch
    from transformers import AutoModelForCausalLM
    from peft import PeftModel
    t = mark("import", t0)
    model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=getattr(torch, dtype), low_cpu_mem_usage=True)
    t = mark("load_base", t)
    model = PeftModel.from_pretrained(model, adapter)
    n_lora = sum(1 for n, _ in model.named_modules() if n.endswith(".lora_A"))
    t = mark("load_adapter", t)
    model = model.merge_and_unload()
    t = mark("merge_and_unload", t)
    model.save_pretrained(out, safe_serialization=True)
    t = mark("save_pretrained", t)
    phases["lora_modules"] = n_lora
    phases["total_s"] = round(time.perf_counter() - t0, 3)
    print("BENCH_PHASES " + json.dumps(phases))
    """
)


def side_cmd(side: str, base: Path, adapter: Path, out: Path, dtype: str) -> list[str]:
    if side == "xpack":
        return H.xpack("merge", "--base", base, "--adapter", adapter, "--out", out, "--force")
    return [sys.executable, "-c", PEFT_SCRIPT, str(base), str(adapter), str(out), dtype]


def _inputs(base: Path, adapter: Path) -> list[Path]:
    return [p for d in (base, adapter) for p in sorted(Path(d).iterdir()) if p.is_file()]


# --------------------------------------------------------------------------------------------
# Comparing outputs


def compare_outputs(a_dir: Path, b_dir: Path) -> dict:
    """Tensor by tensor: max abs difference between two checkpoints (a = xpack, b = PEFT)."""
    import torch
    from safetensors import safe_open

    def index(d):
        m = {}
        for f in _weights(d):
            with safe_open(str(f), framework="pt") as fh:
                m.update(dict.fromkeys(fh.keys(), f))
        return m

    ia, ib = index(a_dir), index(b_dir)
    common = [k for k in ia if k in ib]
    res = {
        "tensors_xpack": len(ia), "tensors_peft": len(ib), "compared": len(common),
        "only_xpack": sorted(set(ia) - set(ib)), "only_peft": sorted(set(ib) - set(ia)), "dtype_mismatch": [], "shape_mismatch": [],
        "max_abs_diff": 0.0, "max_abs_diff_tensor": None,
        "max_rel_diff": 0.0,  # among differing elements: |a-b| / max(|a|, |b|)
        "differing_elements": 0, "elements": 0, "differing_tensors": 0, "max_eps": 0.0,
    }
    handles: dict[Path, object] = {}

    def get(f, k):
        if f not in handles:
            if len(handles) > 4:
                handles.clear()
            handles[f] = safe_open(str(f), framework="pt")
        return handles[f].get_tensor(k)

    for k in common:
        ta, tb = get(ia[k], k), get(ib[k], k)
        if ta.dtype != tb.dtype:
            res["dtype_mismatch"].append(f"{k}: {ta.dtype} vs {tb.dtype}")
        if ta.shape != tb.shape:
            res["shape_mismatch"].append(f"{k}: {list(ta.shape)} vs {list(tb.shape)}")
            continue
        if ta.is_floating_point():
            res["max_eps"] = max(res["max_eps"], torch.finfo(ta.dtype).eps, torch.finfo(tb.dtype).eps)
        fa, fb = ta.float(), tb.float()
        d = (fa - fb).abs()
        n = int(torch.count_nonzero(d))
        res["elements"] += d.numel()
        if n:
            res["differing_elements"] += n
            res["differing_tensors"] += 1
            m = float(d.max())
            if m > res["max_abs_diff"]:
                res["max_abs_diff"], res["max_abs_diff_tensor"] = m, k
            mask = d > 0
            rel = d[mask] / torch.maximum(fa.abs(), fb.abs())[mask]
            res["max_rel_diff"] = max(res["max_rel_diff"], float(rel.max()))
        del ta, tb, fa, fb, d
    handles.clear()
    eps = res["max_eps"] or 2**-7
    if res["shape_mismatch"] or (not common):
        verdict = "DIFFERENT (tensor set or shapes differ)"
    elif res["differing_elements"] == 0:
        verdict = "identical"
    elif res["max_rel_diff"] <= 2 * eps:
        verdict = f"rounding-level (max relative diff {res['max_rel_diff']:.2g} <= 2 eps of the dtype, {2 * eps:.2g})"
    else:
        verdict = f"DIFFERENT (max relative diff {res['max_rel_diff']:.3g} > 2 eps of the dtype, {2 * eps:.2g})"
    res["verdict"] = verdict
    return res


# --------------------------------------------------------------------------------------------
# One case


def run_case(name: str, base: Path, adapter: Path, info: dict, repeats: int, tmp_root: Path, max_wait_s: float = 0) -> dict:
    dtype = _base_dtype(base)
    inputs = _inputs(base, adapter)
    runs = {"xpack": [], "peft": []}
    outputs = {}
    compare = None
    for rep in range(repeats):
        order = ["xpack", "peft"] if rep % 2 == 0 else ["peft", "xpack"]
        rep_dir = tmp_root / f"{name}-{rep}"
        rep_dir.mkdir()
        for side in order:
            out = rep_dir / f"out-{side}"
            w = H.prepare(inputs, max_wait_s)
            H.log(f"{name} run {rep + 1}/{repeats}: {side} (cache warmed in {w:.1f}s)")
            r = H.run_measured(side_cmd(side, base, adapter, out, dtype), side, rep_dir)
            r["order"] = order.index(side) + 1
            if r["returncode"] != 0:
                H.log(f"{side} FAILED (exit {r['returncode']}):\n{r['stderr_tail']}")
                raise RuntimeError(f"{name}: {side} exited with {r['returncode']}")
            r["output_bytes"] = sum(p.stat().st_size for p in _weights(out))
            r["output_files"] = len(_weights(out))
            H.log(f"  {side}: {r['wall_s']:.1f}s wall, peak RSS {r['peak_rss_mb']:.0f} MB "
                  f"(anon {r['polled_peak_anon_mb']:.0f} MB, file-backed {r['polled_peak_file_mb']:.0f} MB); "
                  f"other processes used {r['other_cpu_s']:.1f} CPU s meanwhile")
            runs[side].append(r)
            outputs[side] = out
        os.sync()
        if rep == 0:
            H.log(f"{name}: comparing outputs tensor by tensor")
            compare = compare_outputs(outputs["xpack"], outputs["peft"])
            H.log(f"  weights: {compare['verdict']}, max abs diff {compare['max_abs_diff']:.3g}")
        shutil.rmtree(rep_dir, ignore_errors=True)  # ~2x the base size on disk: free it before the next run

    # Runs during which other processes used CPU give unreliable wall times: use the clean ones when any.
    summary = {}
    for side, rs in runs.items():
        picked = H.pick(rs)
        summary[side] = {k: H.med(picked, k) for k in ("wall_s", "peak_rss_mb", "polled_peak_anon_mb", "polled_peak_file_mb",
                                                       "user_cpu_s", "sys_cpu_s")}
        summary[side].update(other_cpu_s=max(r["other_cpu_s"] for r in picked), runs_used=len(picked),
                             runs_contended=sum(1 for r in rs if H.contended(r)), unattributed_cpu_s=H.med(picked, "unattributed_cpu_s"))
    ratios = {
        "wall_ratio": summary["xpack"]["wall_s"] / summary["peft"]["wall_s"],
        "peak_rss_ratio": summary["xpack"]["peak_rss_mb"] / summary["peft"]["peak_rss_mb"],
    }
    verdicts = {k: ("PASS" if ratios[k] <= TARGETS[k] else "MISS") for k in TARGETS}
    return {"case": name, "base": str(base), "adapter": str(adapter), "base_dtype": dtype, "info": info, "repeats": repeats,
            "summary": summary, "ratios": ratios, "targets": TARGETS, "verdicts": verdicts, "weights": compare, "runs": runs}


def print_case(res: dict) -> None:
    info, s, r, v = res["info"], res["summary"], res["ratios"], res["verdicts"]
    params = info.get("parameters")
    head = f"== {res['case']}: {params / 1e9:.3f}e9 parameters, {res['base_dtype']}, " if params else f"== {res['case']}: "
    head += f"{info.get('base_files', '?')} weight file(s), {info.get('base_bytes', 0) / 1e9:.2f} GB"
    lora = info.get("lora") or {}
    if lora:
        head += f"; LoRA r={lora.get('r')} alpha={lora.get('lora_alpha')}"
    if res["repeats"] > 1:
        head += f"; medians of {res['repeats']} runs each, order alternating"
        if any(s[k]["runs_used"] < res["repeats"] for k in s):
            kept = ", ".join(f"{lbl} {s[k]['runs_used']}" for k, lbl in SIDES)
            head += f" (runs with other processes busy left out; kept: {kept})"
    print(head)
    print(f"{'side':<8}{'wall s':>10}{'peak RSS MB':>14}{'anon MB':>10}{'file MB':>10}{'user+sys cpu s':>16}")
    for side, label in SIDES:
        x = s[side]
        print(f"{label:<8}{x['wall_s']:>10.2f}{x['peak_rss_mb']:>14.0f}{x['polled_peak_anon_mb']:>10.0f}"
              f"{x['polled_peak_file_mb']:>10.0f}{x['user_cpu_s'] + x['sys_cpu_s']:>16.1f}")
    print(f"{'ratio':<8}{r['wall_ratio']:>10.3f}{r['peak_rss_ratio']:>14.3f}   (xpack / PEFT)")
    print(f"target  wall <= {TARGETS['wall_ratio']:.2f}: {v['wall_ratio']}    peak RSS <= {TARGETS['peak_rss_ratio']:.2f}: {v['peak_rss_ratio']}")
    busy = [(lbl, s[side]["other_cpu_s"] / max(s[side]["wall_s"], 1e-9)) for side, lbl in SIDES]
    if any(b > H.CONTENTION_CORES for _, b in busy):
        print("WARNING: other processes used CPU during the runs (" + ", ".join(f"{lbl}: {b:.2f} cores on average" for lbl, b in busy)
              + f" of {os.cpu_count()}): wall times are unreliable; rerun on an idle machine")
    print("CPU outside the measured process, not other processes (kernel: writeback, freeing pages): "
          + ", ".join(f"{lbl} {s[side]['unattributed_cpu_s']:.1f}s" for side, lbl in SIDES))
    ph = res["runs"]["peft"][0].get("phases")
    if ph:
        parts = [f"{k} {ph[k]['s']:.1f}s (maxrss {ph[k]['maxrss_mb']:.0f} MB)" for k in
                 ("import", "load_base", "load_adapter", "merge_and_unload", "save_pretrained") if k in ph]
        print("PEFT phases: " + ", ".join(parts) + f"; {ph.get('lora_modules')} LoRA modules")
    w = res["weights"]
    if w:
        extra = f"; only in xpack: {w['only_xpack'][:4]}, only in PEFT: {w['only_peft'][:4]}" if w["only_xpack"] or w["only_peft"] else ""
        print(f"weights: {w['compared']} tensors compared, max abs diff {w['max_abs_diff']:.3g}"
              f" ({w['max_abs_diff_tensor'] or '-'}), {w['differing_elements']:,} of {w['elements']:,} elements differ"
              f" in {w['differing_tensors']} tensors: {w['verdict']}{extra}")
    print()


def profile_xpack(name: str, base: Path, adapter: Path, tmp_root: Path, out_dir: Path, max_wait_s: float = 0) -> dict:
    """Run ``xpack merge`` under cProfile and print the top functions."""
    out = tmp_root / f"{name}-profile-out"
    prof = out_dir / f"merge-{name}.prof"
    H.prepare(_inputs(base, adapter), max_wait_s)
    H.log(f"profiling xpack merge on {name} -> {prof}")
    r = H.run_measured(H.profiled(side_cmd("xpack", base, adapter, out, ""), prof), f"{name}-profile", tmp_root)
    shutil.rmtree(out, ignore_errors=True)
    if r["returncode"] != 0:
        H.log(f"profile run failed:\n{r['stderr_tail']}")
        return {"error": r["stderr_tail"]}
    total, rows = H.profile_rows(prof)
    print(f"== xpack merge profile ({name}): {r['wall_s']:.1f}s wall under cProfile, {total:.1f}s profiled (main thread)")
    top = H.print_profile("function", sorted(rows, key=lambda x: -x["tottime_s"])[:15])
    print()
    return {"wall_s": r["wall_s"], "profiled_s": total, "top_tottime": top, "prof_file": str(prof)}


# --------------------------------------------------------------------------------------------
# Main


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="demo,synthetic", help="comma-separated: demo, synthetic (default: both)")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"where to write the figures (default {DEFAULT_JSON.relative_to(H.ROOT)})")
    ap.add_argument("--repeats", type=int, default=1, help="runs per side; the order alternates, medians are reported")
    ap.add_argument("--rebuild", action="store_true", help="rebuild the cached synthetic model")
    ap.add_argument("--wait-idle", type=float, default=120, metavar="S",
                    help="before each side, wait up to S seconds for other processes to stop using CPU (0: don't)")
    ap.add_argument("--profile", action="store_true", help="also run xpack merge under cProfile and print the top functions")
    args = ap.parse_args(argv)
    cases = H.csv(args.cases)
    unknown = set(cases) - {"demo", "synthetic"}
    if unknown:
        ap.error(f"unknown case(s): {', '.join(sorted(unknown))}; choose demo, synthetic")
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")

    machine = H.machine_info("peft", loadavg=False)
    H.log(f"machine: {machine['cpu_count']} CPUs, {machine['ram_gib']} GiB RAM, python {machine['python']}, "
          f"torch {machine['torch']}, transformers {machine['transformers']}, peft {machine['peft']}")
    results = {"machine": machine, "targets": TARGETS, "cases": {}, "skipped": {}, "failed": {}}
    tmp_root = Path(tempfile.mkdtemp(prefix="xpack-bench-"))
    try:
        for case in cases:
            try:
                base, adapter, info = demo_paths() if case == "demo" else build_synthetic(args.rebuild)
            except Skip as exc:
                H.log(f"SKIPPED {case}: {exc}")
                print(f"== {case}: SKIPPED {case}: {exc}\n")
                results["skipped"][case] = str(exc)
                continue
            H.log(f"case {case}: base {base} ({info.get('parameters', 0):,} parameters), adapter {adapter}")
            try:
                res = run_case(case, base, adapter, info, args.repeats, tmp_root, args.wait_idle)
            except RuntimeError as exc:
                H.log(f"FAILED {case}: {exc}")
                print(f"== {case}: FAILED: {exc}\n")
                results["failed"][case] = str(exc)
                continue
            results["cases"][case] = res
            print_case(res)
            if args.profile:
                res["xpack_profile"] = profile_xpack(case, base, adapter, tmp_root, args.json.parent, args.wait_idle)
            H.write_json(args.json, results)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    H.write_json(args.json, results)
    H.log(f"wrote {args.json}")
    return 1 if results["failed"] else 0  # a missed target is reported, not an error; a crashed side is


if __name__ == "__main__":
    sys.exit(H.main(main, {}))
