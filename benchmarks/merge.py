#!/usr/bin/env python3
"""Benchmark ``xpack merge`` against PEFT's ``merge_and_unload`` (wall time, peak RSS, same weights).

Cases:
  demo       the demo base (``xpack.packager.demo.base_model.demo_base_dir()``) and adapter (``demo_adapter_dir()``)
  synthetic  a random llama of >= 1e9 parameters in bf16 safetensors shards plus a random PEFT LoRA
             (r=16, alpha=32, q/k/v/o/gate/up/down), built once by streaming tensors to disk and
             cached under ``benchmarks/.cache/``

Each side runs in its own fresh interpreter (a subprocess), so its peak RSS is its own:

  xpack  ``.venv/bin/xpack merge --base B --adapter A --out O --force``
  PEFT   ``AutoModelForCausalLM.from_pretrained(B, torch_dtype=<base dtype>, low_cpu_mem_usage=True)``,
         ``PeftModel.from_pretrained``, ``merge_and_unload()``, ``save_pretrained(O, safe_serialization=True)``

Peak RSS comes from polling the child and its own children every 50 ms (``/proc/PID/status``):
the larger of the kernel's high-water mark ``VmHWM`` of any one process (exact, no sample missed)
and the polled sum of ``VmRSS`` over the process tree; anonymous and file-backed resident memory
are reported too. ``os.wait4``'s ``ru_maxrss`` is recorded but not used: Linux carries the
parent's high-water mark over ``exec`` into the child's (``signal->maxrss``), so it reads at least
as high as this script's own peak. Wall time is ``time.perf_counter`` around the subprocess, interpreter start and
imports included. Before each side the page cache is made alike: dirty pages are synced and the
inputs (base and adapter files) are read once to /dev/null, so both sides read from a warm cache.
Outputs go to a temporary folder that is removed at the end.

Targets (xpack / PEFT): peak RSS <= 0.35, wall <= 1.0. A miss is reported, not an error.

Usage:
  .venv/bin/python benchmarks/merge.py [--cases demo,synthetic] [--json PATH] [--repeats N] [--wait-idle S] [--profile]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CACHE = HERE / ".cache"
DEFAULT_JSON = HERE / "results" / "merge.json"
TARGETS = {"peak_rss_ratio": 0.35, "wall_ratio": 1.0}
POLL_S = 0.05
CONTENTION_CORES = 0.1  # other processes using more than this (cores, on average) make a run "contended"

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

_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[bench {time.perf_counter() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


class Skip(Exception):
    """A case that cannot run here; the message says why."""


# --------------------------------------------------------------------------------------------
# Machine info
# --------------------------------------------------------------------------------------------


def _version(mod: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(mod)
    except Exception:
        return None


def machine_info() -> dict:
    import psutil

    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "ram_bytes": psutil.virtual_memory().total,
        "ram_gib": round(psutil.virtual_memory().total / (1 << 30), 1),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "safetensors": _version("safetensors"),
        "xpack": _version("xpack"),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return info


# --------------------------------------------------------------------------------------------
# Synthetic base + adapter, streamed straight to safetensors
# --------------------------------------------------------------------------------------------


def _synthetic_specs() -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of the synthetic LlamaForCausalLM, in the order HF saves them."""
    h, f, v, n = SYNTH["hidden_size"], SYNTH["intermediate_size"], SYNTH["vocab_size"], SYNTH["num_hidden_layers"]
    head_dim = h // SYNTH["num_attention_heads"]
    kv = SYNTH["num_key_value_heads"] * head_dim
    specs = [("model.embed_tokens.weight", (v, h))]
    for i in range(n):
        p = f"model.layers.{i}."
        specs += [
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
    specs += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return specs


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


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


def _write_safetensors_streaming(path: Path, specs: list[tuple[str, tuple[int, ...]]], make) -> None:
    """Write one bf16 safetensors file: header first, then each tensor made by ``make(name, shape)``."""
    import torch

    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in specs:
        nbytes = 2 * _numel(shape)
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for name, shape in specs:
            t = make(name, shape)
            assert t.dtype == torch.bfloat16 and tuple(t.shape) == tuple(shape), name
            fh.write(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()))


def _synth_key() -> str:
    return json.dumps({"v": SYNTH_VERSION, "synth": SYNTH, "shard": SYNTH_SHARD_BYTES, "seed": SYNTH_SEED, "lora": LORA}, sort_keys=True)


def _ensure_cache_dir() -> None:
    CACHE.mkdir(parents=True, exist_ok=True)
    gi = CACHE / ".gitignore"
    if not gi.is_file():
        gi.write_text("*\n")


def build_synthetic(rebuild: bool = False) -> tuple[Path, Path, dict]:
    """Build (once) the synthetic base and adapter under benchmarks/.cache; return (base, adapter, info)."""
    import torch

    _ensure_cache_dir()
    root = CACHE / "synthetic-llama"
    base, adapter, stamp = root / "base", root / "adapter", root / "COMPLETE"
    specs = _synthetic_specs()
    n_params = sum(_numel(s) for _, s in specs)
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
        log(f"synthetic llama: cached in {root} ({n_params:,} parameters)")
        return base, adapter, _describe_files(info, base, adapter)

    log(f"building synthetic llama: {n_params:,} parameters ({n_params / 1e9:.3f}e9), bf16, into {root}")
    t0 = time.perf_counter()
    if root.exists():
        shutil.rmtree(root)
    tmp = CACHE / f".synthetic-llama.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "base").mkdir(parents=True)
    (tmp / "adapter").mkdir(parents=True)

    # Shards of at most ~1 GB, in HF's tensor order.
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in specs:
        nbytes = 2 * _numel(shape)
        if groups[-1] and size + nbytes > SYNTH_SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += nbytes
    gen = torch.Generator().manual_seed(SYNTH_SEED)

    def make_base(name, shape):
        if name.endswith("norm.weight"):
            return (1.0 + 0.05 * torch.randn(shape, generator=gen)).to(torch.bfloat16)
        t = torch.randn(shape, generator=gen, dtype=torch.bfloat16)
        return t.mul_(0.02)

    weight_map = {}
    nshards = len(groups)
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{nshards:05d}.safetensors"
        log(f"  writing {fname} ({len(group)} tensors, {sum(2 * _numel(s) for _, s in group) / 1e9:.2f} GB)")
        _write_safetensors_streaming(tmp / "base" / fname, group, make_base)
        weight_map.update({name: fname for name, _ in group})
    index = {"metadata": {"total_size": 2 * n_params}, "weight_map": weight_map}
    (tmp / "base" / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (tmp / "base" / "config.json").write_text(json.dumps(_synthetic_config(), indent=2) + "\n")
    (tmp / "base" / "generation_config.json").write_text(
        json.dumps({"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2}, indent=2) + "\n"
    )

    # The adapter: PEFT's key names, non-zero A and B, bf16.
    from safetensors.torch import save_file

    shapes = dict(specs)
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
    log(f"synthetic llama built in {time.perf_counter() - t0:.1f}s")
    return base, adapter, _describe_files(info, base, adapter)


def _adapter_config(base_path: str) -> dict:
    """adapter_config.json as PEFT's LoraConfig.save_pretrained writes it (PEFT itself when importable)."""
    kwargs = dict(
        r=LORA["r"],
        lora_alpha=LORA["lora_alpha"],
        lora_dropout=0.0,
        target_modules=LORA["targets"],
        task_type="CAUSAL_LM",
        bias="none",
        base_model_name_or_path=base_path,
        inference_mode=True,
    )
    try:
        from peft import LoraConfig

        cfg = LoraConfig(**kwargs).to_dict()
        cfg["target_modules"] = sorted(cfg["target_modules"])
        cfg["peft_type"] = "LORA"
        cfg["task_type"] = "CAUSAL_LM"
        return json.loads(json.dumps(cfg, default=lambda o: getattr(o, "value", str(o))))
    except Exception:
        return {
            "alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": base_path, "bias": "none",
            "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "layers_pattern": None,
            "layers_to_transform": None, "lora_alpha": LORA["lora_alpha"], "lora_dropout": 0.0,
            "modules_to_save": None, "peft_type": "LORA", "r": LORA["r"], "rank_pattern": {}, "revision": None,
            "target_modules": sorted(LORA["targets"]), "task_type": "CAUSAL_LM", "use_dora": False, "use_rslora": False,
        }


def _describe_files(info: dict, base: Path, adapter: Path) -> dict:
    weights = sorted(base.glob("*.safetensors"))
    info = dict(info)
    info["base_files"] = len(weights)
    info["base_bytes"] = sum(p.stat().st_size for p in weights)
    info["adapter_bytes"] = (adapter / "adapter_model.safetensors").stat().st_size
    return info


# --------------------------------------------------------------------------------------------
# Demo case
# --------------------------------------------------------------------------------------------


def demo_paths() -> tuple[Path, Path, dict]:
    try:
        from xpack.packager.demo import base_model as demo
    except Exception as exc:
        raise Skip(f"xpack.packager.demo.base_model is not importable ({exc.__class__.__name__}: {exc})") from None
    for fn in ("demo_base_dir", "demo_adapter_dir"):
        if not callable(getattr(demo, fn, None)):
            raise Skip(f"xpack.packager.demo.base_model.{fn}() does not exist yet")
    try:
        adapter = Path(demo.demo_adapter_dir())  # cheap check first: the base may take a minute to materialize
        base = Path(demo.demo_base_dir())
    except Exception as exc:
        raise Skip(f"the demo model is not available ({exc.__class__.__name__}: {exc})") from None
    specs = _header_specs(base)
    info = {
        "base_dir": str(base),
        "adapter_dir": str(adapter),
        "parameters": sum(_numel(s) for _, s in specs.values()),
        "dtype": _base_dtype(base),
        "base_files": len(_weight_files(base)),
        "base_bytes": sum(p.stat().st_size for p in _weight_files(base)),
        "adapter_bytes": sum(p.stat().st_size for p in adapter.glob("adapter_model.*")),
    }
    try:
        cfg = json.loads((adapter / "adapter_config.json").read_text())
        info["lora"] = {k: cfg.get(k) for k in ("r", "lora_alpha", "target_modules", "use_dora", "use_rslora")}
    except (OSError, ValueError):
        pass
    return base, adapter, info


# --------------------------------------------------------------------------------------------
# safetensors helpers
# --------------------------------------------------------------------------------------------


def _weight_files(d: Path) -> list[Path]:
    return sorted(p for p in Path(d).glob("*.safetensors"))


def _read_header(path: Path) -> dict:
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    header.pop("__metadata__", None)
    return header


def _header_specs(d: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    out = {}
    for f in _weight_files(d):
        for name, info in _read_header(f).items():
            out[name] = (info["dtype"], tuple(info["shape"]))
    return out


_TORCH_DTYPE = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


def _base_dtype(d: Path) -> str:
    """The float dtype holding most of the base's parameters (what PEFT should load it as)."""
    by = {}
    for dtype, shape in _header_specs(d).values():
        if dtype in _TORCH_DTYPE:
            by[dtype] = by.get(dtype, 0) + _numel(shape)
    return _TORCH_DTYPE[max(by, key=by.get)] if by else "float32"


# --------------------------------------------------------------------------------------------
# Measuring a subprocess
# --------------------------------------------------------------------------------------------


def _proc_status_kb(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(("VmHWM:", "VmRSS:", "RssAnon:", "RssFile:", "RssShmem:")):
                    k, v = line.split(":", 1)
                    out[k] = int(v.split()[0])
    except (OSError, ValueError):
        pass
    return out


def _tree_pids(pid: int) -> list[int]:
    import psutil

    try:
        p = psutil.Process(pid)
        return [pid] + [c.pid for c in p.children(recursive=True)]
    except psutil.Error:
        return [pid]


def run_measured(cmd: list[str], label: str, workdir: Path, env: dict | None = None) -> dict:
    """Run ``cmd`` in a fresh process; return wall time, peak RSS (kernel + polled) and its output."""
    out_path, err_path = workdir / f"{label}.stdout", workdir / f"{label}.stderr"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    peak = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0, "VmHWM": 0, "samples": 0}
    timeline: list[tuple[float, int]] = []
    sys_before, self_before = _busy_cpu_s(), resource.getrusage(resource.RUSAGE_SELF)
    others_before = _other_procs_cpu()
    load_before = os.getloadavg()[0]
    with open(out_path, "wb") as fo, open(err_path, "wb") as fe:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=fo, stderr=fe, env=env, cwd=str(ROOT))
        while True:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                wall = time.perf_counter() - t0
                break
            tot = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
            for p in _tree_pids(proc.pid):
                st = _proc_status_kb(p)
                for k in tot:
                    tot[k] += st.get(k, 0)
                peak["VmHWM"] = max(peak["VmHWM"], st.get("VmHWM", 0))
            for k in tot:
                peak[k] = max(peak[k], tot[k])
            peak["samples"] += 1
            timeline.append((round(time.perf_counter() - t0, 2), tot["VmRSS"] // 1024))
            time.sleep(POLL_S)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4: tell Popen
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    sys_after, self_after = _busy_cpu_s(), resource.getrusage(resource.RUSAGE_SELF)
    others_after = _other_procs_cpu()
    other_procs = sum(v - others_before.get(k, 0.0) for k, v in others_after.items() if v >= others_before.get(k, 0.0))
    child_cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    self_cpu = (self_after.ru_utime - self_before.ru_utime) + (self_after.ru_stime - self_before.ru_stime)
    kernel_kb = ru.ru_maxrss  # KiB; includes this script's own peak (see the module docstring): not used
    res = {
        "cmd": cmd,
        "returncode": proc.returncode,
        "wall_s": wall,
        "peak_rss_mb": max(peak["VmHWM"], peak["VmRSS"]) / 1024,
        "vmhwm_mb": peak["VmHWM"] / 1024,
        "kernel_maxrss_mb": kernel_kb / 1024,
        "polled_peak_rss_mb": peak["VmRSS"] / 1024,
        "polled_peak_anon_mb": peak["RssAnon"] / 1024,
        "polled_peak_file_mb": peak["RssFile"] / 1024,
        "polled_samples": peak["samples"],
        "user_cpu_s": after.ru_utime - before.ru_utime,
        "sys_cpu_s": after.ru_stime - before.ru_stime,
        # CPU that other user-space processes used meanwhile (contention makes wall times unreliable);
        # processes that started and ended within the run are not seen
        "other_cpu_s": other_procs,
        # machine-wide busy CPU not in the child, this script or other processes: kernel work such as
        # writeback and freeing pages (large on this VM for allocation-heavy children)
        "unattributed_cpu_s": max(0.0, (sys_after - sys_before) - child_cpu - self_cpu - other_procs),
        "monitor_cpu_s": self_cpu,
        "loadavg_1min_before": load_before,
        "rss_timeline_mb": _thin(timeline, 120),
    }
    stdout = out_path.read_text(errors="replace")
    stderr = err_path.read_text(errors="replace")
    res["stderr_tail"] = stderr[-3000:]
    for line in stdout.splitlines():
        if line.startswith("BENCH_PHASES "):
            res["phases"] = json.loads(line[len("BENCH_PHASES "):])
    res["stdout_tail"] = stdout[-2000:]
    return res


def _other_procs_cpu() -> dict[tuple[int, float], float]:
    """CPU seconds so far of every user-space process but this one and its children."""
    import psutil

    me = os.getpid()
    out = {}
    for p in psutil.process_iter(["pid", "ppid", "create_time", "cpu_times", "exe"]):
        info = p.info
        if info["pid"] == me or info["ppid"] in (me, 2) or info["pid"] == 2 or not info.get("exe"):
            continue  # ourselves, our children, kernel threads
        if info["cpu_times"] is None:
            continue
        out[(info["pid"], info["create_time"])] = info["cpu_times"].user + info["cpu_times"].system
    return out


def wait_idle(max_wait_s: float, threshold: float = 0.1) -> float:
    """Wait (up to ``max_wait_s``) until other processes use less than ``threshold`` cores; return the wait."""
    t0 = time.perf_counter()
    said = False
    while True:
        a = _other_procs_cpu()
        time.sleep(1.0)
        b = _other_procs_cpu()
        used = sum(v - a.get(k, 0.0) for k, v in b.items() if v >= a.get(k, 0.0))
        waited = time.perf_counter() - t0
        if used < threshold or waited >= max_wait_s:
            if said:
                log(f"  waited {waited:.0f}s for the machine to go idle" + (" (gave up)" if used >= threshold else ""))
            return waited
        if not said:
            log(f"  other processes use {used:.1f} cores: waiting up to {max_wait_s:.0f}s for them to finish")
            said = True


def _busy_cpu_s() -> float:
    """Machine-wide busy CPU seconds so far (all cores, not idle or iowait)."""
    import psutil

    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)


def _thin(points: list, n: int) -> list:
    if len(points) <= n:
        return points
    step = len(points) / n
    return [points[int(i * step)] for i in range(n)] + [points[-1]]


def warm_cache(paths: list[Path]) -> float:
    """Read every file once (like ``cat FILES > /dev/null``) so both sides start from a warm page cache."""
    t0 = time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as fh:
            while fh.read(64 << 20):
                pass
    return time.perf_counter() - t0


def _inputs(base: Path, adapter: Path) -> list[Path]:
    return [p for d in (base, adapter) for p in sorted(Path(d).iterdir()) if p.is_file()]


def _child_env() -> dict:
    env = dict(os.environ)
    env.update({
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "TOKENIZERS_PARALLELISM": "false",
    })
    return env


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


def xpack_cmd(base: Path, adapter: Path, out: Path) -> list[str]:
    exe = Path(sys.executable).with_name("xpack")
    if not exe.is_file():
        exe = ROOT / ".venv" / "bin" / "xpack"
    return [str(exe), "merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out), "--force"]


def peft_cmd(base: Path, adapter: Path, out: Path, dtype: str) -> list[str]:
    return [sys.executable, "-c", PEFT_SCRIPT, str(base), str(adapter), str(out), dtype]


# --------------------------------------------------------------------------------------------
# Comparing outputs
# --------------------------------------------------------------------------------------------


def compare_outputs(a_dir: Path, b_dir: Path) -> dict:
    """Tensor by tensor: max abs difference between two checkpoints (a = xpack, b = PEFT)."""
    import torch
    from safetensors import safe_open

    def index(d):
        m = {}
        for f in _weight_files(d):
            with safe_open(str(f), framework="pt") as fh:
                for k in fh.keys():
                    m[k] = f
        return m

    ia, ib = index(a_dir), index(b_dir)
    common = [k for k in ia if k in ib]
    res = {
        "tensors_xpack": len(ia),
        "tensors_peft": len(ib),
        "compared": len(common),
        "only_xpack": sorted(set(ia) - set(ib)),
        "only_peft": sorted(set(ib) - set(ia)),
        "dtype_mismatch": [],
        "shape_mismatch": [],
        "max_abs_diff": 0.0,
        "max_abs_diff_tensor": None,
        "max_rel_diff": 0.0,  # among differing elements: |a-b| / max(|a|, |b|)
        "differing_elements": 0,
        "elements": 0,
        "differing_tensors": 0,
        "max_eps": 0.0,
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
# --------------------------------------------------------------------------------------------


def _sync() -> None:
    try:
        os.sync()
    except AttributeError:
        pass


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
            cmd = xpack_cmd(base, adapter, out) if side == "xpack" else peft_cmd(base, adapter, out, dtype)
            _sync()
            if max_wait_s > 0:
                wait_idle(max_wait_s)
            w = warm_cache(inputs)
            log(f"{name} run {rep + 1}/{repeats}: {side} (cache warmed in {w:.1f}s)")
            r = run_measured(cmd, side, rep_dir, _child_env())
            r["order"] = order.index(side) + 1
            if r["returncode"] != 0:
                log(f"{side} FAILED (exit {r['returncode']}):\n{r['stderr_tail']}")
                raise RuntimeError(f"{name}: {side} exited with {r['returncode']}")
            r["output_bytes"] = sum(p.stat().st_size for p in _weight_files(out))
            r["output_files"] = len(_weight_files(out))
            log(f"  {side}: {r['wall_s']:.1f}s wall, peak RSS {r['peak_rss_mb']:.0f} MB "
                f"(anon {r['polled_peak_anon_mb']:.0f} MB, file-backed {r['polled_peak_file_mb']:.0f} MB); "
                f"other processes used {r['other_cpu_s']:.1f} CPU s meanwhile")
            runs[side].append(r)
            outputs[side] = out
        _sync()
        if rep == 0:
            log(f"{name}: comparing outputs tensor by tensor")
            compare = compare_outputs(outputs["xpack"], outputs["peft"])
            log(f"  weights: {compare['verdict']}, max abs diff {compare['max_abs_diff']:.3g}")
        shutil.rmtree(rep_dir, ignore_errors=True)  # ~2x the base size on disk: free it before the next run

    # Runs during which other processes used CPU give unreliable wall times: use the clean ones when any.
    def clean(r):
        return r["other_cpu_s"] / max(r["wall_s"], 1e-9) < CONTENTION_CORES

    picked = {side: [r for r in rs if clean(r)] or rs for side, rs in runs.items()}

    def med(side, key):
        return statistics.median(r[key] for r in picked[side])

    summary = {}
    for side in runs:
        summary[side] = {
            "wall_s": med(side, "wall_s"),
            "peak_rss_mb": med(side, "peak_rss_mb"),
            "polled_peak_anon_mb": med(side, "polled_peak_anon_mb"),
            "polled_peak_file_mb": med(side, "polled_peak_file_mb"),
            "user_cpu_s": med(side, "user_cpu_s"),
            "sys_cpu_s": med(side, "sys_cpu_s"),
            "other_cpu_s": max(r["other_cpu_s"] for r in picked[side]),
            "runs_used": len(picked[side]),
            "runs_contended": sum(1 for r in runs[side] if not clean(r)),
            "unattributed_cpu_s": med(side, "unattributed_cpu_s"),
        }
    ratios = {
        "wall_ratio": summary["xpack"]["wall_s"] / summary["peft"]["wall_s"],
        "peak_rss_ratio": summary["xpack"]["peak_rss_mb"] / summary["peft"]["peak_rss_mb"],
    }
    verdicts = {k: ("PASS" if ratios[k] <= TARGETS[k] else "MISS") for k in TARGETS}
    return {
        "case": name,
        "base": str(base),
        "adapter": str(adapter),
        "base_dtype": dtype,
        "info": info,
        "repeats": repeats,
        "summary": summary,
        "ratios": ratios,
        "targets": TARGETS,
        "verdicts": verdicts,
        "weights": compare,
        "runs": runs,
    }


def print_case(res: dict) -> None:
    info, s, r, v = res["info"], res["summary"], res["ratios"], res["verdicts"]
    params = info.get("parameters")
    head = f"== {res['case']}: {params / 1e9:.3f}e9 parameters, {res['base_dtype']}, " if params else f"== {res['case']}: "
    head += f"{info.get('base_files', '?')} weight file(s), {info.get('base_bytes', 0) / 1e9:.2f} GB"
    lora = info.get("lora") or {}
    if lora:
        head += f"; LoRA r={lora.get('r')} alpha={lora.get('lora_alpha')}"
    if res["repeats"] > 1:
        used = [f"{lbl} {s[k]['runs_used']}" for k, lbl in (("xpack", "xpack"), ("peft", "PEFT"))]
        head += f"; medians of {res['repeats']} runs each, order alternating"
        if any(s[k]["runs_used"] < res["repeats"] for k in s):
            head += f" (runs with other processes busy left out; kept: {', '.join(used)})"
    print(head)
    print(f"{'side':<8}{'wall s':>10}{'peak RSS MB':>14}{'anon MB':>10}{'file MB':>10}{'user+sys cpu s':>16}")
    for side, label in (("xpack", "xpack"), ("peft", "PEFT")):
        x = s[side]
        print(f"{label:<8}{x['wall_s']:>10.2f}{x['peak_rss_mb']:>14.0f}{x['polled_peak_anon_mb']:>10.0f}"
              f"{x['polled_peak_file_mb']:>10.0f}{x['user_cpu_s'] + x['sys_cpu_s']:>16.1f}")
    print(f"{'ratio':<8}{r['wall_ratio']:>10.3f}{r['peak_rss_ratio']:>14.3f}   (xpack / PEFT)")
    print(f"target  wall <= {TARGETS['wall_ratio']:.2f}: {v['wall_ratio']}    peak RSS <= {TARGETS['peak_rss_ratio']:.2f}: {v['peak_rss_ratio']}")
    busy = [(lbl, s[side]["other_cpu_s"] / max(s[side]["wall_s"], 1e-9)) for side, lbl in (("xpack", "xpack"), ("peft", "PEFT"))]
    if any(b > CONTENTION_CORES for _, b in busy):
        print("WARNING: other processes used CPU during the runs ("
              + ", ".join(f"{lbl}: {b:.2f} cores on average" for lbl, b in busy)
              + f" of {os.cpu_count()}): wall times are unreliable; rerun on an idle machine")
    print("CPU outside the measured process, not other processes (kernel: writeback, freeing pages): "
          + ", ".join(f"{lbl} {s[side]['unattributed_cpu_s']:.1f}s" for side, lbl in (("xpack", "xpack"), ("peft", "PEFT"))))
    ph = res["runs"]["peft"][0].get("phases")
    if ph:
        parts = [f"{k} {ph[k]['s']:.1f}s (maxrss {ph[k]['maxrss_mb']:.0f} MB)" for k in
                 ("import", "load_base", "load_adapter", "merge_and_unload", "save_pretrained") if k in ph]
        print("PEFT phases: " + ", ".join(parts) + f"; {ph.get('lora_modules')} LoRA modules")
    w = res["weights"]
    if w:
        extra = ""
        if w["only_xpack"] or w["only_peft"]:
            extra = f"; only in xpack: {w['only_xpack'][:4]}, only in PEFT: {w['only_peft'][:4]}"
        print(f"weights: {w['compared']} tensors compared, max abs diff {w['max_abs_diff']:.3g}"
              f" ({w['max_abs_diff_tensor'] or '-'}), {w['differing_elements']:,} of {w['elements']:,} elements differ"
              f" in {w['differing_tensors']} tensors: {w['verdict']}{extra}")
    print()


# --------------------------------------------------------------------------------------------
# Optional: profile xpack merge
# --------------------------------------------------------------------------------------------


def profile_xpack(name: str, base: Path, adapter: Path, tmp_root: Path, out_dir: Path, max_wait_s: float = 0) -> dict:
    """Run ``xpack merge`` under cProfile (python -m cProfile -m xpack) and print the top functions."""
    import pstats

    out = tmp_root / f"{name}-profile-out"
    prof = out_dir / f"merge-{name}.prof"
    cmd = [sys.executable, "-m", "cProfile", "-o", str(prof), "-m", "xpack", *xpack_cmd(base, adapter, out)[1:]]
    _sync()
    if max_wait_s > 0:
        wait_idle(max_wait_s)
    warm_cache(_inputs(base, adapter))
    log(f"profiling xpack merge on {name} -> {prof}")
    r = run_measured(cmd, f"{name}-profile", tmp_root, _child_env())
    shutil.rmtree(out, ignore_errors=True)
    if r["returncode"] != 0:
        log(f"profile run failed:\n{r['stderr_tail']}")
        return {"error": r["stderr_tail"]}
    stats = pstats.Stats(str(prof))
    total = stats.total_tt
    rows = []
    for (file, line, func), (cc, nc, tt, ct, _callers) in stats.stats.items():
        rows.append({"function": f"{Path(file).name}:{line}({func})", "calls": nc, "tottime_s": tt, "cumtime_s": ct})
    top_tot = sorted(rows, key=lambda x: -x["tottime_s"])[:15]
    print(f"== xpack merge profile ({name}): {r['wall_s']:.1f}s wall under cProfile, {total:.1f}s profiled (main thread)")
    print(f"{'tottime s':>10}{'cumtime s':>10}{'calls':>9}  function")
    for row in top_tot:
        print(f"{row['tottime_s']:>10.2f}{row['cumtime_s']:>10.2f}{row['calls']:>9}  {row['function']}")
    print()
    return {"wall_s": r["wall_s"], "profiled_s": total, "top_tottime": top_tot, "prof_file": str(prof)}


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="demo,synthetic", help="comma-separated: demo, synthetic (default: both)")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"where to write the figures (default {DEFAULT_JSON.relative_to(ROOT)})")
    ap.add_argument("--repeats", type=int, default=1, help="runs per side; the order alternates, medians are reported")
    ap.add_argument("--rebuild", action="store_true", help="rebuild the cached synthetic model")
    ap.add_argument("--wait-idle", type=float, default=120, metavar="S",
                    help="before each side, wait up to S seconds for other processes to stop using CPU (0: don't)")
    ap.add_argument("--profile", action="store_true", help="also run xpack merge under cProfile and print the top functions")
    args = ap.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = set(cases) - {"demo", "synthetic"}
    if unknown:
        ap.error(f"unknown case(s): {', '.join(sorted(unknown))}; choose demo, synthetic")
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")

    machine = machine_info()
    log(f"machine: {machine['cpu_count']} CPUs, {machine['ram_gib']} GiB RAM, python {machine['python']}, "
        f"torch {machine['torch']}, transformers {machine['transformers']}, peft {machine['peft']}")
    results = {"machine": machine, "targets": TARGETS, "cases": {}, "skipped": {}, "failed": {}}
    tmp_root = Path(tempfile.mkdtemp(prefix="xpack-bench-"))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    try:
        for case in cases:
            try:
                if case == "demo":
                    base, adapter, info = demo_paths()
                else:
                    base, adapter, info = build_synthetic(args.rebuild)
            except Skip as exc:
                msg = f"SKIPPED {case}: {exc}"
                log(msg)
                print(f"== {case}: {msg}\n")
                results["skipped"][case] = str(exc)
                continue
            log(f"case {case}: base {base} ({info.get('parameters', 0):,} parameters), adapter {adapter}")
            try:
                res = run_case(case, base, adapter, info, args.repeats, tmp_root, args.wait_idle)
            except RuntimeError as exc:
                log(f"FAILED {case}: {exc}")
                print(f"== {case}: FAILED: {exc}\n")
                results["failed"][case] = str(exc)
                continue
            results["cases"][case] = res
            print_case(res)
            if args.profile:
                res["xpack_profile"] = profile_xpack(case, base, adapter, tmp_root, args.json.parent, args.wait_idle)
            args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    log(f"wrote {args.json}")
    return 1 if results["failed"] else 0  # a missed target is reported, not an error; a crashed side is


if __name__ == "__main__":
    sys.exit(main())
