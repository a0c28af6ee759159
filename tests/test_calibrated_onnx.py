"""xpack's calibrated ONNX mix (--bits 4/8): its types' bytes and errors against what the file holds, the statistics
of xpack's packed graph, the size yardstick against a real llama.cpp file, the options, and the whole export on
real Gemma 3 270M + its demo adapter against the fixed scheme and llama.cpp's Q4_K_M."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from xpack.cli import cli
from xpack.errors import XpackError
from xpack.packager.demo.base_model import demo_adapter_dir, demo_base_dir
from xpack.packager.export.calibrate.onnx_mix import ONNX_FORMAT, ONNX_SIZE_SLACK, matmul_weights, onnx_stats, parse_type, type_bytes
from xpack.packager.export.calibrate.stats import LayerStats, TensorStats
from xpack.packager.export.gguf.writer import plain_size
from xpack.packager.export.job import Calibration, export
from xpack.packager.export.onnx.quantize import dequantize_weight, quantize_matmuls
from xpack.packager.merge.job import merge
from xpack.packager.verify.job import verify
from xpack.runtimes.artifacts import ONNX_MODEL_FILE


def _matmul_model(w: np.ndarray, name: str = "W") -> onnx.ModelProto:
    from onnx import TensorProto, helper

    k, n = w.shape
    node = helper.make_node("MatMul", ["x", name], ["y"], name="/model/layers.0/mlp/down_proj/MatMul")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])], [numpy_helper.from_array(w, name)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("qtype", ["int4-32", "int4-128", "int8-16", "int8-64"])
def test_planned_types_bytes_and_errors_are_what_the_file_holds(qtype):
    """The planner's bytes and rounding error of a type are the written initializers' bytes and dequantized error,
    bit for bit, with the importance matrix weighing the scale search (K = 200: a padded last block)."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((200, 48)).astype(np.float32)  # [K, N]
    imatrix = rng.uniform(0.1, 5, 200).astype(np.float32)
    model, info = quantize_matmuls(_matmul_model(w), 4, plan={"W": parse_type(qtype)}, importance={"W": imatrix})
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    bits, block = parse_type(qtype)
    written = inits[f"W_Q{bits}"], inits["W_scales"], inits["W_zero_points"]
    assert sum(a.nbytes for a in written) == type_bytes(qtype, 48, 200) == ONNX_FORMAT.nbytes(qtype, 48, 200)
    expected = dequantize_weight(*written, bits, 200).T - w.T
    np.testing.assert_array_equal(ONNX_FORMAT.error(np.ascontiguousarray(w.T), qtype, imatrix), expected)
    plain_error = ONNX_FORMAT.error(np.ascontiguousarray(w.T), qtype, None)
    weighted = lambda e: float(((e * e) * imatrix).sum())  # noqa: E731  (the error the importance matrix says matters)
    assert weighted(expected) <= weighted(plain_error)
    assert ONNX_FORMAT.activation_block(qtype) == block and info["nodes"]["/model/layers.0/mlp/down_proj/MatMul"]["bits"] == bits


def test_packed_qkv_statistics_join_the_projections():
    rng = np.random.default_rng(0)

    def stats(out: int) -> TensorStats:
        return TensorStats(np.ones(8, np.float32), rng.uniform(size=out).astype(np.float32), 10, {32: np.ones(1, np.float32)},
                           in_sample=np.ones((4, 8), np.float32), out_sample=rng.standard_normal((4, out)).astype(np.float32))

    p = "model.layers.0.self_attn."
    layer = LayerStats(tensors={p + "q_proj.weight": stats(8), p + "k_proj.weight": stats(4), p + "v_proj.weight": stats(4)})
    joined = onnx_stats(layer, [p + "qkv_proj.weight"], tied=False)[p + "qkv_proj.weight"]
    np.testing.assert_array_equal(joined.out_fisher, np.concatenate([layer.tensors[p + t + "_proj.weight"].out_fisher for t in "qkv"]))
    assert joined.out_sample.shape == (4, 16) and joined.in_sample.shape == (4, 8)
    with pytest.raises(XpackError, match="no calibration statistics for the ONNX weight"):
        onnx_stats(layer, ["/onnx::MatMul_123"], tied=False)


def test_yardstick_is_the_size_llama_cpp_writes(twin_factory, tmp_path):
    """plain_size (a header-only sparse GGUF through llama.cpp's dry run) against the file llama.cpp really writes."""
    pytest.importorskip("llama_cpp")
    twin = twin_factory("llama")
    manifest = export(str(twin.model_dir), "gguf", tmp_path / "q", quant="Q4_K_M", threads=1, name="size")
    real = manifest["files"][next(iter(manifest["artifacts"]))]["bytes"]
    estimate = plain_size(twin.model_dir, "Q4_K_M")
    assert abs(estimate["bytes"] - real) <= 64 and estimate["tensor_types"]


def test_calibrated_onnx_on_a_twin_stays_within_its_budget(twin_factory, tmp_path):
    """The default --bits 4 ONNX export of a text twin is the calibrated mix: within Q4_K_M's size + 10%, every weight's
    type and the calibration text recorded, and the artifact finite and runnable (the parity figures of the mix on
    real weights are the slow test below and benchmarks/quant.py)."""
    pytest.importorskip("llama_cpp")
    twin = twin_factory("llama")
    manifest = export(str(twin.model_dir), "onnx", tmp_path / "mix", bits=4, threads=1)
    cal = manifest["calibration"]
    assert cal and cal["yardstick"]["type"] == "Q4_K_M" and cal["target"]["bytes"] == int(ONNX_SIZE_SLACK * cal["yardstick"]["bytes"])
    # a twin's rotary tables alone outweigh its GGUF: the smallest mix, reported as a missed target
    assert not cal["target"]["met"] and set(cal["tensor_types"].values()) <= {"int4-128", "int4-64", "int4-32", "int8-128"}
    weights = matmul_weights(onnx.load(str(tmp_path / "mix" / ONNX_MODEL_FILE), load_external_data=False))
    assert not weights and len(cal["tensor_types"]) == manifest["quantization"]["node_types"]["MatMulNBits"]  # every float MatMul quantized
    assert manifest["validation"]["artifact"]["finite"] and cal["calibration"]["tokens"] > 0
    on_disk = sum(p.stat().st_size for p in (tmp_path / "mix").iterdir() if p.name.startswith(ONNX_MODEL_FILE))
    assert on_disk == cal["mix"]["bytes"]


def test_calibrated_onnx_targets_a_size_or_a_kl(twin_factory, tmp_path):
    """--target-size: the lowest predicted KL within that file size; --max-kl: measured probes down to the smallest
    file meeting it (on a twin's calibration text); both recorded in the manifest and the card."""
    twin = twin_factory("llama")
    sized = export(str(twin.model_dir), "onnx", tmp_path / "sized", bits=8, threads=1, calibration=Calibration(target_bytes=900_000))
    cal = sized["calibration"]
    assert cal["target"] == {"bytes": 900_000, "max_kl": None, "met": True} and cal["mix"]["bytes"] <= 900_000 and cal["yardstick"] is None
    assert "within 0.9 MB" in (tmp_path / "sized" / "README.md").read_text()
    loose = export(str(twin.model_dir), "onnx", tmp_path / "loose", bits=4, threads=1, calibration=Calibration(max_kl=5.0))
    cal = loose["calibration"]
    assert cal["target"]["met"] and cal["mix"]["kl_mean_calibration"] <= 5.0 and cal["rounds"]
    assert "mean KL <= 5.0 on the calibration text" in (tmp_path / "loose" / "README.md").read_text()


@pytest.mark.parametrize(
    ("name", "args", "message"),
    [
        ("llama", ["--bits", "4", "--no-calibrate", "--max-kl", "0.1"], "--no-calibrate asks for the fixed scheme"),
        ("llama", ["--bits", "16", "--max-kl", "0.1"], "--bits 16 has no choice to make"),
        ("llama", ["--bits", "4", "--calibrate", "--graph", "optimum"], "calibrated ONNX quantization needs xpack's decoder graph"),
        ("gemma3_vision", ["--bits", "4", "--calibrate"], "is not implemented yet; export it with --no-calibrate"),
    ],
)
def test_calibration_option_errors_are_one_line(twin_factory, tmp_path, name, args, message):
    twin = twin_factory(name)
    r = CliRunner().invoke(cli, ["export", "--model", str(twin.model_dir), "--format", "onnx", *args, "--out", str(tmp_path / "o")])
    assert r.exit_code != 0 and message in r.output and "Traceback" not in r.output, r.output


@pytest.mark.slow
def test_calibrated_int4_onnx_of_real_gemma3_beats_q4_k_m_at_its_size(tmp_path_factory, tmp_path):
    """On real Gemma 3 270M + its demo adapter, on verify's evaluation text: the calibrated int4 ONNX within 1.1x the
    size of llama.cpp's Q4_K_M is within half of Q4_K_M's KL (issue #11's ONNX int4 target; Q4_K_M measures 1.08 there:
    test_calibrated_gguf.py checks that file against the same reference, and the yardstick's size on a twin above)."""
    pytest.importorskip("llama_cpp")
    merged = tmp_path_factory.mktemp("gemma3-onnx") / "merged"
    merge(str(demo_base_dir("gemma3")), [str(demo_adapter_dir("gemma3"))], merged)
    manifest = export(str(merged), "onnx", tmp_path / "mix", bits=4, threads=2, calibration=Calibration())
    cal = manifest["calibration"]
    assert cal["mix"]["bytes"] <= ONNX_SIZE_SLACK * cal["yardstick"]["bytes"] and cal["yardstick"]["type"] == "Q4_K_M"
    assert set(cal["corrections"]) >= {"self_attn.qkv_proj.weight", "mlp.down_proj.weight", "lm_head.weight"}
    mixed = verify(tmp_path / "mix", merged, "cpu16", benchmark=False, max_tokens=8)
    assert mixed["parity"]["kl_mean"] < 0.5 * 1.08, mixed["parity"]
    assert json.loads((tmp_path / "mix" / "manifest.json").read_text())["calibration"]["tensor_types"]
