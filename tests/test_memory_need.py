"""A job that cannot fit in the machine's memory stops before any work with one line (issue #12), from the
checkpoint's headers: the ONNX export (several copies of the float32 weights). verify's reference streams instead (test_reference_streaming.py)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from click.testing import CliRunner

from xpack.cli import cli
from xpack.packager.io import memory_need
from xpack.packager.io.checkpoint import Checkpoint
from xpack.packager.io.memory_need import ONNX_EXPORT_FACTOR, float32_bytes
from xpack.profiles.cgroup_memory import cgroup_memory


def test_float32_bytes_count_every_parameter(twin_factory):
    twin = twin_factory("llama")
    ckpt = Checkpoint(twin.model_dir)
    params = sum(math.prod(s.shape) for s in ckpt.specs.values())
    assert float32_bytes(ckpt) == 4 * params > 0


def test_onnx_export_that_cannot_fit_stops_before_any_work(twin_factory, tmp_path, monkeypatch):
    """xpack's streamed graph is checked against its own estimate (a phase at a time), optimum's against the whole
    model several times over; either one line, before any work."""
    twin = twin_factory("llama")
    ckpt = Checkpoint(twin.model_dir)
    for graph, need in (("xpack", memory_need.streamed_onnx_need(ckpt, 4)), ("optimum", int(ONNX_EXPORT_FACTOR * float32_bytes(ckpt)))):
        monkeypatch.setattr(memory_need, "available_bytes", lambda need=need: need - 1)
        out = tmp_path / graph
        r = CliRunner().invoke(cli, ["export", "--model", str(twin.model_dir), "--format", "onnx", "--bits", "4", "--no-calibrate",
                                     "--graph", graph, "--out", str(out)])
        assert r.exit_code == 1 and "to ONNX at --bits 4 needs about" in r.output and "export GGUF" in r.output, r.output
        assert "Traceback" not in r.output and not out.exists()
        monkeypatch.setattr(memory_need, "available_bytes", lambda need=need: need + 1)
        memory_need.check_onnx_export(ckpt, "llama", 4, streamed=graph == "xpack")  # fits: no error


def test_streamed_onnx_need_is_a_phase_not_the_model(twin_factory):
    """The streamed export's estimate is its largest phase: below the in-memory estimate, and at least the torch check's
    resident float32 weights (everything outside the layers plus one layer)."""
    ckpt = Checkpoint(twin_factory("gemma3").model_dir)
    weights = float32_bytes(ckpt)
    layer0 = sum(4 * math.prod(s.shape) for n, s in ckpt.specs.items() if ".layers.0." in n)
    outside = sum(4 * math.prod(s.shape) for n, s in ckpt.specs.items() if ".layers." not in n)
    for bits in (4, 32):
        need = memory_need.streamed_onnx_need(ckpt, bits) - memory_need.PROCESS_BASE_GB * 1e9
        assert outside + layer0 <= need < ONNX_EXPORT_FACTOR * weights


def test_an_mllama_export_that_cannot_fit_points_where_it_can_go(twin_factory, tmp_path, monkeypatch):
    """llama.cpp has no mllama: the refusal does not send the user to GGUF (whose refusal sends them back to ONNX)."""
    twin = twin_factory("mllama")
    monkeypatch.setattr(memory_need, "available_bytes", lambda: 1)
    r = CliRunner().invoke(cli, ["export", "--model", str(twin.model_dir), "--format", "onnx", "--bits", "4", "--no-calibrate",
                                 "--out", str(tmp_path / "out")])
    assert r.exit_code == 1 and "needs about" in r.output and "export GGUF" not in r.output, r.output
    assert "run the merged checkpoint with the torch runtime" in r.output


def _fake_cgroup(root, v2: bool, levels: dict[str, tuple[str, int, int]]):
    """A cgroupfs under ``root``: for each level path its (limit, usage, inactive file bytes)."""
    mount = root if v2 else root / "memory"
    (root / "cgroup.controllers").parent.mkdir(parents=True, exist_ok=True)
    if v2:
        (root / "cgroup.controllers").write_text("memory\n")
    names = ("memory.max", "memory.current", "inactive_file") if v2 else ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
    for path, (limit, usage, inactive) in levels.items():
        d = mount / path.strip("/") if path != "/" else mount
        d.mkdir(parents=True, exist_ok=True)
        (d / names[0]).write_text(limit + "\n")
        (d / names[1]).write_text(f"{usage}\n")
        (d / "memory.stat").write_text(f"anon 1\n{names[2]} {inactive}\nfile 2\n")


def test_cgroup_memory_reads_the_tightest_level_and_counts_inactive_file_as_free(tmp_path):
    """A container's limit, not the host's memory: the parent's 8 GB holds over the child's unlimited level, its
    inactive page cache is free to take; v1's "no limit" (2^63 - 4096) and v2's "max" are no limit."""
    gb = 10**9
    for v2, unlimited in ((True, "max"), (False, "9223372036854771712")):
        root = tmp_path / ("v2" if v2 else "v1")
        _fake_cgroup(root, v2, {"/": (unlimited, 20 * gb, 0), "/box": (str(8 * gb), 5 * gb, 2 * gb), "/box/job": (unlimited, 1 * gb, 0)})
        proc = "0::/box/job\n" if v2 else "4:memory:/box/job\n3:cpu:/\n"
        box = cgroup_memory(root, proc)
        assert box is not None and box.limit == 8 * gb and box.available == 5 * gb and box.path.endswith("box"), (v2, box)
        assert cgroup_memory(root, "0::/\n" if v2 else "4:memory:/\n") is None  # the root level: no limit
        assert cgroup_memory(root, "1:cpu:/\n") is None  # no memory controller line
    assert cgroup_memory(tmp_path / "none", "0::/\n") is None  # no cgroupfs


def _child_cgroup(limit: int):
    """A memory cgroup of ``limit`` bytes under this process's own, or None where this machine does not let us make one."""
    own = Path("/proc/self/cgroup").read_text()
    for mount, v2, limit_file in ((Path("/sys/fs/cgroup/memory"), False, "memory.limit_in_bytes"), (Path("/sys/fs/cgroup"), True, "memory.max")):
        if not (mount / (limit_file if not v2 else "cgroup.controllers")).is_file():
            continue
        path = next((line.split(":", 2)[2] for line in own.splitlines()
                     if (v2 and line.startswith("0::")) or (not v2 and "memory" in line.split(":")[1].split(","))), None)
        if path is None:
            continue
        child = mount / path.strip("/") / f"xpack-test-{os.getpid()}"
        try:
            child.mkdir()
            (child / limit_file).write_text(str(limit))
            return child
        except OSError:
            if child.is_dir():
                child.rmdir()
    return None


def test_a_container_limit_is_the_memory_jobs_are_sized_from():
    """In a real 1 GiB memory cgroup, on a machine with more: what verify's reference budget and the export's refusal
    read (available_bytes) and the machine's memory (machine_info) are the cgroup's, not the host's."""
    limit = 2**30
    if psutil.virtual_memory().total <= 2 * limit:
        pytest.skip("this machine has no more memory than the cgroup would give")
    child = _child_cgroup(limit)
    if child is None:
        pytest.skip("no writable memory cgroup here (not root, or no cgroupfs)")
    code = ("from xpack.packager.io.memory_need import available_bytes, require_memory; from xpack.profiles.machine import machine_info; "
            "print(available_bytes(), machine_info().ram_gb)\n"
            "try:\n    require_memory(2 * 2**30, 'this job', 'use less')\nexcept Exception as exc:\n    print(exc)")
    try:
        out = subprocess.run(["sh", "-c", f'echo $$ > {child}/cgroup.procs && exec "$0" -c "$1"', sys.executable, code],
                             capture_output=True, text=True, timeout=120, check=True).stdout.splitlines()
    finally:
        child.rmdir()
    have, ram = out[0].split()
    assert 0 < int(have) <= limit and float(ram) == pytest.approx(limit / 1e9)
    assert out[1].startswith("this job needs about 2.1 GB of memory and this container (memory cgroup limit 1.1 GB) has"), out
