"""A job that cannot fit in the machine's memory stops before any work with one line (issue #12), from the
checkpoint's headers: the ONNX export (several copies of the float32 weights). verify's reference streams instead (test_reference_streaming.py)."""

from __future__ import annotations

import math

from click.testing import CliRunner

from xpack.cli import cli
from xpack.packager.io import memory_need
from xpack.packager.io.checkpoint import Checkpoint
from xpack.packager.io.memory_need import ONNX_EXPORT_FACTOR, float32_bytes


def test_float32_bytes_count_every_parameter(twin_factory):
    twin = twin_factory("llama")
    ckpt = Checkpoint(twin.model_dir)
    params = sum(math.prod(s.shape) for s in ckpt.specs.values())
    assert float32_bytes(ckpt) == 4 * params > 0


def test_onnx_export_that_cannot_fit_stops_before_any_work(twin_factory, tmp_path, monkeypatch):
    twin = twin_factory("llama")
    need = int(ONNX_EXPORT_FACTOR * float32_bytes(Checkpoint(twin.model_dir)))
    monkeypatch.setattr(memory_need, "available_bytes", lambda: need - 1)
    r = CliRunner().invoke(cli, ["export", "--model", str(twin.model_dir), "--format", "onnx", "--bits", "32", "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "to ONNX needs about" in r.output and "export GGUF" in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "o").exists()
    monkeypatch.setattr(memory_need, "available_bytes", lambda: need + 1)
    memory_need.check_onnx_export(Checkpoint(twin.model_dir), "llama")  # fits: no error


