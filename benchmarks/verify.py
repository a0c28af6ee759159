"""The demo pipeline, verified: one JSON report with every parity and speed figure per artifact.

Runs `xpack demo` (materialize the demo base, merge the radiology LoRA, export GGUF Q4_K_M and ONNX
int4, run, verify each against the merged torch reference on the cpu16 profile, update the cards)
with N benchmark runs, prints the summary table and writes benchmarks/results/verify.json.

    python benchmarks/verify.py [--runs 3] [--out DIR] [--json PATH]
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE] + [str(HERE)]  # last: see _harness.py

import _harness as H  # noqa: E402
from xpack import __version__  # noqa: E402
from xpack.packager.demo.job import run_demo  # noqa: E402
from xpack.packager.verify.job import machine_label  # noqa: E402


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="benchmark runs per artifact (median and min-max)")
    ap.add_argument("--out", type=Path, help="folder for the demo's artifacts (default: a temporary folder)")
    ap.add_argument("--json", type=Path, default=H.RESULTS / "verify.json")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="xpack-verify-bench-") as tmp:
        t0 = time.perf_counter()
        result = run_demo(args.out or Path(tmp) / "demo", force=True, verify_runs=args.runs)
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
        # the card text is left out: every figure stays
        "artifacts": {k: {**v, "report": {f: x for f, x in v["report"].items() if f != "card"}} for k, v in result["artifacts"].items()},
        "answers": result["answers"],
    }
    H.write_json(args.json, report)
    print(f"\nwrote {args.json} (machine: {report['machine']})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(H.main(main, {}))
