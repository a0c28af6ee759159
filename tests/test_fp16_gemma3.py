"""fp16 that survives Gemma 3 (issue #11): real Gemma 3's residual stream passes fp16's 65504 (1.04e5 on
gemma-3-270m from layer 7 on, measured with torch hooks on the eval text), so plain fp16 gives inf/NaN logits.

- ONNX ``--bits 16``: the architecture table keeps the norms (which fuse the residual adds) in float32 and,
  with ``onnx.fp16_keep_fp32.between_kept_nodes``, the tensors they hand to each other too, so the residual
  stream never passes through fp16; the MatMuls and the attention run fp16 (packager/export/onnx/precision.py).
- The torch reference on a float16 profile runs Gemma 3 in bfloat16 (a GPU that has it) or float32 (a T4, a
  CPU), as its table's ``fp16_overflows`` says, and reports the dtype that ran (runtimes/torch_ref.py).

The real-weight tests (``slow``) use the built-in Gemma 3 270M (``demo_base_dir("gemma3")``) on 256 tokens
of verify's evaluation text, against torch in float32.
"""

from __future__ import annotations

import dataclasses
import shutil
from importlib import resources

import numpy as np
import pytest

from xpack.packager.archs import all_archs
from xpack.packager.demo.base_model import demo_base_dir
from xpack.packager.export.job import export
from xpack.packager.export.onnx.precision import keep_fp32_between, to_fp16
from xpack.packager.verify.parity import compare_logits
from xpack.runtimes.registry import load
from xpack.runtimes.settings import GenerationSettings
from xpack.runtimes.torch_ref import overflows_fp16

TOKENS = 256
KL_LIMIT = 1e-3
GREEDY = GenerationSettings(max_tokens=8, temperature=0, repetition_penalty=1.0)


# --------------------------------------------------------------------------------------------------
# The fact, as data, and the graph surgery (no weights)
# --------------------------------------------------------------------------------------------------


def test_the_runtime_reads_fp16_overflows_as_the_packager_parses_it():
    """runtimes/ reads the JSON tables itself (it never imports packager/): same answer as the parser, per table."""
    for arch in all_archs().values():
        assert overflows_fp16({"architectures": list(arch.architectures)}) is arch.fp16_overflows, arch.name
        assert overflows_fp16({"model_type": arch.model_types[0]}) is arch.fp16_overflows, arch.name
    assert {a.name for a in all_archs().values() if a.fp16_overflows} == {"gemma3", "gemma3_text"}
    assert {a.name for a in all_archs().values() if a.onnx.fp16_keep_fp32.between_kept_nodes} == {"gemma3", "gemma3_text"}
    assert overflows_fp16({"architectures": ["MistralForCausalLM"], "model_type": "mistral"}) is False


def _overflowing_graph():
    """x -> Mul(x, 1000) -> Mul(., 100) -> Div(., 1e5) -> Relu: the two middle tensors pass 65504."""
    from onnx import TensorProto, helper

    const = [helper.make_tensor(name, TensorProto.FLOAT, [], [v]) for name, v in (("k1", 1000.0), ("k2", 100.0), ("k3", 1e5))]
    nodes = [
        helper.make_node("Mul", ["x", "k1"], ["a"], name="/keep/Mul"),
        helper.make_node("Mul", ["a", "k2"], ["b"], name="/keep/Mul_1"),
        helper.make_node("Div", ["b", "k3"], ["c"], name="/keep/Div"),
        helper.make_node("Relu", ["c"], ["y"], name="/Relu"),  # an fp16 node after the kept ones
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])], initializer=const)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model, x):
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_tensors_between_kept_nodes_stay_float32():
    x = np.array([1.0, 2.0], dtype=np.float32)
    keep = ["/keep/Mul", "/keep/Mul_1", "/keep/Div"]
    plain = to_fp16(_overflowing_graph(), keep_nodes=keep)
    assert not np.isfinite(_run(plain, x)).all()  # the converter's fp16 round trips between kept nodes: inf
    model = to_fp16(_overflowing_graph(), keep_nodes=keep)
    assert keep_fp32_between(model) == 3  # the input x -> /keep/Mul, a -> /keep/Mul_1, b -> /keep/Div
    np.testing.assert_allclose(_run(model, x), [1.0, 2.0], rtol=1e-3)
    assert [n.op_type for n in model.graph.node].count("Cast") == 2  # c to the fp16 Relu, y out


# --------------------------------------------------------------------------------------------------
# Real Gemma 3 270M
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma3():
    return demo_base_dir("gemma3")


@pytest.fixture(scope="module")
def reference(gemma3, cpu):
    """(token ids, torch float32 logits) of the first TOKENS tokens of verify's evaluation text."""
    text = resources.files("xpack.packager.verify").joinpath("data/eval_medical.txt").read_text(encoding="utf-8")
    with load(gemma3, cpu, runtime="torch") as rt:
        assert rt.info()["dtype"] == "float32"
        ids = rt.tokenize(text)[:TOKENS]
        return ids, rt.logits(ids)


@pytest.fixture(scope="module")
def onnx16(gemma3, tmp_path_factory):
    out = tmp_path_factory.mktemp("gemma3-onnx16")
    shutil.rmtree(out)
    manifest = export(str(gemma3), "onnx", out, bits=16)
    return manifest, out


@pytest.mark.slow
def test_onnx_fp16_export_of_real_gemma3_is_finite_and_close(onnx16, reference, cpu):
    manifest, out = onnx16
    q = manifest["quantization"]
    assert q["bits"] == 16 and q["fp16_fp32_links"] > 0, q  # the residual stream is kept float32
    assert manifest["validation"]["artifact"]["finite"]
    ids, expected = reference
    with load(out, cpu) as rt:
        assert rt.name == "onnx"
        got = rt.logits(ids)
        result = rt.generate("The chest radiograph shows", GREEDY)  # the decode loop with its KV cache
    assert np.isfinite(got).all()
    figures = compare_logits(expected, got)
    assert figures["kl_mean"] <= KL_LIMIT and figures["top1_agreement_tie_aware"] >= 0.98, figures  # measured: 2.7e-6, 100%
    assert result.completion_tokens == GREEDY.max_tokens


@pytest.mark.slow
def test_torch_on_an_fp16_profile_runs_gemma3_in_a_dtype_that_stays_finite(gemma3, reference, cpu):
    fp16 = dataclasses.replace(cpu, compute_dtype="float16")
    ids, expected = reference
    with load(gemma3, fp16, runtime="torch") as rt:
        info = rt.info()
        got = rt.logits(ids[:128])
    assert info["dtype"] == "float32" and info["profile_dtype"] == "float16", info  # a CPU: no fp16, no bfloat16 fallback
    assert any("fp16_overflows" in note for note in rt.notes), rt.notes
    assert np.isfinite(got).all()
    assert compare_logits(expected[:128], got)["kl_mean"] <= 1e-6
