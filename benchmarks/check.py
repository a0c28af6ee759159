#!/usr/bin/env python3
"""Benchmark ``xpack check`` against ``sha256sum`` on a 1 GiB artifact (issue #14: "at disk/sha256 speed").

Cases: ``one-file`` (a 1 GiB weights file, as a GGUF export) and ``two-files`` (two of 512 MiB, as an ONNX export's
decoder and embedding data). Random bytes, a card and a manifest.json written by xpack's own writer, built once
in ``benchmarks/.cache/check/``. Each side runs as a fresh process, interleaved, from a warm page cache (every
file read once before each run) and, with ``--cold``, from a dropped one, ``--repeats`` times; medians are reported:

  xpack      ``xpack check DIR --json``        (every file, parallel threads, OpenSSL's sha256)
  sha256sum  ``sha256sum FILE...``             (coreutils, one file after another)

Also measured: the check at load on a stamped artifact (what ``xpack run`` pays the second time): in-process,
``runtimes.integrity.require_intact``. Target: xpack's MB/s >= sha256sum's (ratio >= 1.0); a miss is reported.

Usage:
  .venv/bin/python benchmarks/check.py [--cases one-file,two-files] [--repeats N] [--cold] [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE] + [str(HERE)]  # last: see _harness.py

import _harness as H  # noqa: E402
from xpack.packager.cards.render import write_manifest  # noqa: E402
from xpack.runtimes.integrity import require_intact  # noqa: E402

DEFAULT_JSON = H.RESULTS / "check.json"
CASES = {"one-file": (1 << 30,), "two-files": (1 << 29, 1 << 29)}
TARGET_RATIO = 1.0  # xpack MB/s over sha256sum MB/s


def build(case: str) -> Path:
    folder = H.ensure_cache() / "check" / case
    if (folder / "manifest.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for i, size in enumerate(CASES[case]):
        with open(folder / f"weights-{i}.bin", "wb") as f:
            for _ in range(size // (64 << 20)):
                f.write(os.urandom(64 << 20))
    (folder / "README.md").write_text("# benchmark artifact\n\nRandom bytes; only `xpack check` reads them.\n")
    write_manifest(folder, {"kind": "benchmark"})
    return folder


def drop_page_cache() -> None:
    """Every side from the disk: dirty pages written, then the kernel's clean page cache dropped (needs root)."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
    except OSError as exc:
        raise SystemExit(f"--cold needs to write /proc/sys/vm/drop_caches (root): {exc}") from None


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed: {H.error_line(proc.stderr or proc.stdout)}")
    return wall


def run_case(case: str, repeats: int, cold: bool = False) -> dict:
    folder = build(case)
    files = H.files_in(folder)
    files = [p for p in files if p.name != "manifest.json"]
    total = sum(p.stat().st_size for p in files)
    sides = {"xpack": H.xpack("check", folder, "--json"), "sha256sum": ["sha256sum", *map(str, files)]}
    walls: dict[str, list[float]] = {s: [] for s in sides}
    for r in range(repeats):
        for side in (sides if r % 2 == 0 else reversed(list(sides))):  # interleaved, alternating who goes first
            if cold:
                drop_page_cache()
            else:
                H.warm_cache(files)
            walls[side].append(timed(sides[side]))
            H.log(f"{case} run {r + 1}/{repeats}: {side} {walls[side][-1]:.2f} s")
    require_intact(folder)  # stamps every file (a run that finds them stamped reads nothing)
    t0 = time.perf_counter()
    stamped = require_intact(folder)
    stamped_s = time.perf_counter() - t0
    med = {s: statistics.median(w) for s, w in walls.items()}
    mbs = {s: total / 1e6 / med[s] for s in sides}
    return {
        "case": case, "page_cache": "cold" if cold else "warm", "bytes": total, "files": len(files), "repeats": repeats,
        "wall_s": {s: [round(x, 3) for x in w] for s, w in walls.items()},
        "median_s": {s: round(v, 3) for s, v in med.items()},
        "mb_per_s": {s: round(v, 1) for s, v in mbs.items()},
        "ratio_mb_per_s": round(mbs["xpack"] / mbs["sha256sum"], 3),
        "stamped_load_check_s": round(stamped_s, 4), "stamped_hashed_bytes": stamped.hashed_bytes,
        "target_ratio": TARGET_RATIO, "met": mbs["xpack"] / mbs["sha256sum"] >= TARGET_RATIO,
    }


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON)
    ap.add_argument("--cold", action="store_true", help="also measure from a dropped page cache (root): the disk's speed")
    args = ap.parse_args(argv)
    results = [run_case(c, args.repeats) for c in H.csv(args.cases)]
    results += [run_case(c, args.repeats, cold=True) for c in H.csv(args.cases)] if args.cold else []
    print(f"{'case':<10} {'cache':>5} {'GB':>5} {'xpack MB/s':>11} {'sha256sum MB/s':>15} {'ratio':>6} {'stamped load check':>19}")
    for r in results:
        print(f"{r['case']:<10} {r['page_cache']:>5} {r['bytes'] / 1e9:5.2f} {r['mb_per_s']['xpack']:11.0f} {r['mb_per_s']['sha256sum']:15.0f} "
              f"{r['ratio_mb_per_s']:6.2f} {r['stamped_load_check_s'] * 1000:16.1f} ms")
    H.write_json(args.json, {"machine": H.machine_info(), "results": results,
                             "note": "medians of interleaved fresh processes (xpack's includes its start-up); warm: every file read once before each side; cold: the page cache dropped before each side"})
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(H.main(main, {}))
