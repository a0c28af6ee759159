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
