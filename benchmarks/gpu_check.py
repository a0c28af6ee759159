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
"""

from __future__ import annotations

import argparse
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
from xpack.packager.demo.base_model import demo_adapter_dir, demo_base_dir  # noqa: E402
from xpack.packager.demo.job import DEMO_EXPORTS  # noqa: E402
from xpack.packager.export.job import export  # noqa: E402
from xpack.packager.merge.job import merge  # noqa: E402
from xpack.profiles.machine import detect_profile, machine_info  # noqa: E402

TOTAL_BUDGET_S = 600
STEP_BUDGETS_S = {"machine": 30, "tests": 210, "demo": 150, "verify": 100}  # verify: per artifact; 590 s in all
GPU_PROFILES = ("a100", "t4")
OPTIONAL_PATHS = {"bfloat16"}  # a T4 has none: the a100 profile's torch tests skip there, and that is no failure
# This interpreter's xpack, not a console script: on a GPU box xpack may be importable without a venv of its own.
XPACK = [sys.executable, "-m", "xpack"]
SMI_QUERY = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
# The probes the gpu tests skip on (tests/conftest.py), run where torch's CUDA initialisation cannot hang this script.
PROBE = (
    "import json, sys; sys.path.insert(0, 'tests'); import conftest; "
    "paths = [p for p in conftest.GPU_PROBES if p != 'bfloat16' or conftest.gpu_support('torch')[0]]; "
    "print(json.dumps({p: conftest.gpu_support(p) for p in paths}))"
)


@dataclass
class Step:
    name: str
    budget_s: float
    command: list[str]
    finish: Callable[[int, str], tuple[bool, str]]  # (exit code, output) -> (ok, status); fills the report in
    missing: Callable[[], str | None] = lambda: None  # what the step needs and an earlier step did not make


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


def run_steps(steps: list[Step], budget_s: float, report: dict, out: Path) -> None:
    """Each step in turn, within its budget; one that would take the total past ``budget_s`` is not started."""
    start = time.perf_counter()
    for step in steps:
        elapsed = time.perf_counter() - start
        record = {"step": step.name, "budget_s": step.budget_s}
        if elapsed + step.budget_s > budget_s:
            record["ok"], record["status"] = False, f"not started: {elapsed:.0f} s gone, its {step.budget_s:.0f} s would pass the {budget_s:.0f} s budget"
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


def machine_step(report: dict) -> Step:
    def finish(code: int, output: str) -> tuple[bool, str]:
        try:
            paths = json.loads(output.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            return False, f"failed: the probe printed no result ({error_line(output)})"
        report["machine"]["gpu_paths"] = {p: {"available": ok, "detail": detail} for p, (ok, detail) in paths.items()}
        missing = [p for p, (ok, _) in paths.items() if not ok]
        status = f"missing: {', '.join(missing)} (the tests of those paths skip)" if missing else "every GPU path available"
        return not set(missing) - OPTIONAL_PATHS, status

    return Step("machine", STEP_BUDGETS_S["machine"], [sys.executable, "-c", PROBE], finish)


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


def tests_step(report: dict, work: Path) -> Step:
    junit = work / "pytest-gpu.xml"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "-rfEs", f"--junitxml={junit}", "tests"]

    def finish(code: int, output: str) -> tuple[bool, str]:
        if not junit.is_file():
            return False, f"failed: pytest exited {code} without a report ({error_line(output)})"
        counts = report["pytest"] = pytest_counts(junit)
        summary = f"{counts['passed']} passed, {counts['failed']} failed, {counts['errors']} errors, {counts['skipped']} skipped"
        return code == 0 and counts["passed"] > 0, summary  # skips: a path the machine step reports missing

    return Step("tests", STEP_BUDGETS_S["tests"], command, finish)


def demo_paths(demo_dir: Path) -> dict[str, Path]:
    """The merged checkpoint and each demo export, by the demo's folder names."""
    return {"merged": demo_dir / "merged", **{folder: demo_dir / folder for folder, _, _ in DEMO_EXPORTS}}


def demo_built(demo_dir: Path) -> bool:
    paths = demo_paths(demo_dir)
    return (paths.pop("merged") / "config.json").is_file() and all((p / "manifest.json").is_file() for p in paths.values())


def build_demo(demo_dir: Path) -> None:
    """The demo's artifacts without its answers and CPU verification (packager/demo/job.py's first half)."""
    paths = demo_paths(demo_dir)
    merge(str(demo_base_dir()), [str(demo_adapter_dir())], paths["merged"], force=True)
    for folder, fmt, bits in DEMO_EXPORTS:
        export(str(paths["merged"]), fmt, paths[folder], bits=bits, force=True)


def demo_step(demo_dir: Path) -> Step:
    def finish(code: int, output: str) -> tuple[bool, str]:
        built = code == 0 and demo_built(demo_dir)
        return built, "built" if built else f"failed: {error_line(output)}"

    return Step("demo", STEP_BUDGETS_S["demo"], [sys.executable, str(HERE / "gpu_check.py"), "--build-demo", str(demo_dir)], finish)


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


def verify_step(report: dict, demo_dir: Path, folder: str, profile: str, runs: int, work: Path) -> Step:
    paths = demo_paths(demo_dir)
    result = work / f"verify-{folder}.json"
    command = [*XPACK, "verify", "--artifact", str(paths[folder]), "--reference", str(paths["merged"]), "--profile", profile,
               "--runs", str(runs), "--out", str(result)]

    def finish(code: int, output: str) -> tuple[bool, str]:
        if code not in (0, 1) or not result.is_file():  # 1: a parity check failed, the report is written
            report["artifacts"][folder] = {"error": error_line(output)}
            return False, f"failed: {error_line(output)}"
        figures = report["artifacts"][folder] = artifact_figures(json.loads(result.read_text()))
        return figures["parity_pass"], "parity pass" if figures["parity_pass"] else "parity FAIL"

    def missing() -> str | None:
        return None if demo_built(demo_dir) else f"no demo artifacts in {demo_dir} (see the demo step)"

    return Step(f"verify {folder}", STEP_BUDGETS_S["verify"], command, finish, missing)


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
    steps = [machine_step(report), tests_step(report, work)]
    if not demo_built(args.demo_dir):
        steps.append(demo_step(args.demo_dir))
    return steps + [verify_step(report, args.demo_dir, folder, profile, args.runs, work) for folder, _, _ in DEMO_EXPORTS]


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
    ap.add_argument("--demo-dir", type=Path, default=CACHE / "gpu-demo", help="where the demo artifacts are, or are built")
    ap.add_argument("--budget", type=float, default=TOTAL_BUDGET_S, help=f"seconds for the whole check (default {TOTAL_BUDGET_S})")
    ap.add_argument("--out", type=Path, default=RESULTS / "gpu_check.json")
    ap.add_argument("--build-demo", type=Path, metavar="DIR", help="only build the demo artifacts into DIR (the demo step runs this)")
    return ap.parse_args(argv)


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
        "budget_s": args.budget, "steps": [], "pytest": None, "artifacts": {},
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
    if args.build_demo:
        try:
            build_demo(args.build_demo)
        except XpackError as exc:
            print(f"demo: {exc}", file=sys.stderr)
            return 1
        return 0
    machine = machine_info()
    profile, why = choose_profile(args.profile, machine)
    work = CACHE / "gpu-check"
    if args.dry_run:
        print(f"machine: {machine.describe()}; profile {profile} ({why}); total budget {args.budget:.0f} s")
        for step in plan(args, profile, {}, work):
            print(f"{step.name} (budget {step.budget_s:.0f} s): {' '.join(step.command)}")
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
