"""The demo pipeline, verified: one JSON report with every parity and speed figure per artifact.

Runs `xpack demo` (materialize the demo base, merge the radiology LoRA, export GGUF Q4_K_M and ONNX
int4, run, verify each against the merged torch reference on the cpu16 profile, update the cards)
with N benchmark runs, prints the summary table and writes benchmarks/results/verify.json.

    python benchmarks/verify.py [--runs 3] [--out DIR] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# This folder holds benchmarks/gguf.py and benchmarks/onnx.py: keep them from shadowing the gguf and
# onnx packages that xpack imports.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="benchmark runs per artifact (median and min-max)")
    ap.add_argument("--out", type=Path, help="folder for the demo's artifacts (default: a temporary folder)")
    ap.add_argument("--json", type=Path, default=HERE / "results" / "verify.json")
    args = ap.parse_args()

    from xpack import __version__
    from xpack.packager.demo.job import run_demo
    from xpack.packager.verify.job import machine_label

    with tempfile.TemporaryDirectory(prefix="xpack-verify-bench-") as tmp:
        out = args.out or Path(tmp) / "demo"
        t0 = time.perf_counter()
        result = run_demo(out, force=True, verify_runs=args.runs)
        wall = time.perf_counter() - t0
    for line in result["lines"]:
        print(line)
    report = {
        "machine": machine_label(),
        "python": platform.python_version(),
        "xpack": __version__,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "runs": args.runs,
        "wall_s": wall,
        "summary": result["rows"],
        "artifacts": {k: {**v, "report": _strip(v["report"])} for k, v in result["artifacts"].items()},
        "answers": result["answers"],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"\nwrote {args.json} (machine: {report['machine']})", file=sys.stderr)
    return 0


def _strip(report: dict) -> dict:
    """The report without per-token arrays (kept: every figure)."""
    return {k: v for k, v in report.items() if k not in ("card",)}


if __name__ == "__main__":
    sys.exit(main())
