"""xpack's MatMulNBits quantizer (packager/export/onnx/quantize.py): onnxruntime's layout bit for bit, the scale
search, the mixed bit widths and the tied embedding read from the head's packed weight. Small random
matrices only; the demo-model figures are in the module's docstring / the README."""

from __future__ import annotations

import logging

import numpy as np
import onnx  # noqa: E402 - part of the dev install: a missing one must fail, not skip
import onnxruntime as ort  # noqa: E402
import pytest
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from xpack.packager.export.onnx import quantize  # noqa: E402
from xpack.packager.export.onnx.quantize import (  # noqa: E402
    LLAMA_CPP_Q4_K_M_PATTERNS,
    dequantize_weight,
    quantize_matmuls,
    quantize_weight,
    rtn_block_params,
    search_block_params,
    use_more_bits,
)


def _weights(rng, k: int, n: int) -> np.ndarray:
    """Heavy-tailed columns of different scales, plus the corner cases: an all-positive block, an
    all-negative block and an all-zero column."""
    w = (rng.standard_t(4, (k, n)) * rng.exponential(0.05, (1, n))).astype(np.float32)
    w[:32, 0] = np.abs(w[:32, 0])
    w[:32, 1] = -np.abs(w[:32, 1])
    w[:, 2] = 0.0
    return w


def _matmul_model(w: np.ndarray, name: str = "mm") -> "onnx.ModelProto":
    k, n = w.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["A", "W"], ["Y"], name=name)], "g",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, n])],
        initializer=[numpy_helper.from_array(w, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def _inits(model) -> dict:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


@pytest.mark.parametrize("k, n, bits, block", [(96, 40, 4, 32), (256, 24, 4, 64), (100, 30, 4, 32), (96, 40, 8, 32), (100, 30, 8, 16)])
def test_rtn_packing_equals_onnxruntime(k, n, bits, block):
    """search=False writes what onnxruntime's MatMulNBitsQuantizer writes, byte for byte (odd block
    counts, K not a multiple of the block, 4 and 8 bits), under the same names and attributes."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    w = _weights(np.random.default_rng(k + n + bits), k, n)
    previous = logging.root.manager.disable
    logging.disable(logging.INFO)
    try:
        theirs = MatMulNBitsQuantizer(_matmul_model(w), bits=bits, block_size=block, is_symmetric=False, accuracy_level=4)
        theirs.process()
    finally:
        logging.disable(previous)
    ours, info = quantize_matmuls(_matmul_model(w), bits, block, search=False, mixed=False)
    a, b = _inits(theirs.model.model), _inits(ours)
    assert sorted(a) == sorted(b) == sorted([f"W_Q{bits}", "W_scales", "W_zero_points"])
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert np.array_equal(a[name], b[name]), name
    (node_a,), (node_b,) = theirs.model.model.graph.node, ours.graph.node
    assert (node_a.op_type, node_a.domain, list(node_a.input)) == (node_b.op_type, node_b.domain, list(node_b.input))
    assert {x.name: helper.get_attribute_value(x) for x in node_a.attribute} == {x.name: helper.get_attribute_value(x) for x in node_b.attribute}
    assert info["node_counts"] == {f"{bits}-bit/{block}": 1}


def test_search_reduces_reconstruction_error():
    rng = np.random.default_rng(0)
    x = (rng.standard_t(4, (4096, 32)) * rng.exponential(0.05, (4096, 1))).astype(np.float32)

    def errors(q, scale, zp):
        deq = (q.astype(np.float32) - zp[:, None]) * scale[:, None]
        d2 = np.square(deq - x)
        w = np.sqrt(np.mean(x * x, axis=1, keepdims=True)) + np.abs(x)
        return d2.sum(), (w * d2).sum(axis=1)

    rtn_total, rtn_weighted = errors(*rtn_block_params(x, 4))
    # weighted (llama.cpp's rms + |x| weights): the weighted error; uniform: the plain squared error.
    # Measured 0.88 and 0.92 of RTN's here (on the demo model's weights: 0.77 of RTN's squared error)
    q, scale, zp = search_block_params(x, 4, weighted=True)
    assert q.max() <= 15 and zp.max() <= 15 and (scale >= 0).all()
    total, per_block = errors(q, scale, zp)
    assert per_block.sum() < 0.92 * rtn_weighted.sum() and total < rtn_total
    # RTN's own codes are among the candidates: no block gets worse in the searched error
    assert (per_block <= rtn_weighted * (1 + 1e-4) + 1e-12).all()
    total, _ = errors(*search_block_params(x, 4, weighted=False))
    assert total < 0.95 * rtn_total
    # 8 bits: the same search, far smaller errors
    q8, s8, z8 = search_block_params(x, 8)
    assert errors(q8, s8, z8)[0] < rtn_total / 100


def test_quantize_weight_roundtrip_layout():
    """dequantize_weight inverts the packing: (code - zero_point) * scale, codes along K, low nibble first."""
    rng = np.random.default_rng(3)
    w = _weights(rng, 96, 20)
    for bits in (4, 8):
        packed, scales, zps = quantize_weight(w, bits, 32, search=False)
        assert packed.shape == (20, 3, 32 * bits // 8) and scales.shape == (20, 3) and zps.shape == (20, -(-3 * bits // 8))
        blocks = w.T.reshape(20 * 3, 32)
        q, s, z = rtn_block_params(blocks, bits)
        expected = ((q.astype(np.float32) - z[:, None]) * s[:, None]).reshape(20, 96).T
        assert np.array_equal(dequantize_weight(packed, scales, zps, bits, 96), expected)


def test_use_more_bits_layers():
    assert [i for i in range(30) if use_more_bits(i, 30)] == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
    assert [i for i in range(8) if use_more_bits(i, 8)] == [0, 3, 6, 7]


def _tiny_decoder(rng, vocab: int = 64, hidden: int = 64, inner: int = 128, layers: int = 8):
    """input_ids -> tied embedding Gather -> per layer x + down(relu(up(x))) -> lm_head MatMul (W = embed^T)."""
    embed = (rng.standard_normal((vocab, hidden)) * 0.5).astype(np.float32)
    inits = [numpy_helper.from_array(embed, "model.embed_tokens.weight"), numpy_helper.from_array(np.ascontiguousarray(embed.T), "lm_head.weight")]
    nodes = [helper.make_node("Gather", ["model.embed_tokens.weight", "input_ids"], ["h0"], name="/model/embed_tokens/Gather")]
    x = "h0"
    for i in range(layers):
        p = f"/model/layers.{i}/mlp"
        up = (rng.standard_normal((hidden, inner)) / np.sqrt(hidden)).astype(np.float32)
        down = (rng.standard_normal((inner, hidden)) / np.sqrt(inner) * 0.5).astype(np.float32)
        inits += [numpy_helper.from_array(up, f"model.layers.{i}.mlp.up_proj.weight"), numpy_helper.from_array(down, f"model.layers.{i}.mlp.down_proj.weight")]
        nodes += [
            helper.make_node("MatMul", [x, f"model.layers.{i}.mlp.up_proj.weight"], [f"{p}/up"], name=f"{p}/up_proj/MatMul"),
            helper.make_node("Relu", [f"{p}/up"], [f"{p}/act"], name=f"{p}/act"),
            helper.make_node("MatMul", [f"{p}/act", f"model.layers.{i}.mlp.down_proj.weight"], [f"{p}/down"], name=f"{p}/down_proj/MatMul"),
            helper.make_node("Add", [x, f"{p}/down"], [f"h{i + 1}"], name=f"{p}/Add"),
        ]
        x = f"h{i + 1}"
    nodes += [
        helper.make_node("MatMul", [x, "lm_head.weight"], ["logits"], name="/lm_head/MatMul"),
        helper.make_node("Identity", ["h0"], ["embeds"], name="/embeds/Identity"),
    ]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", vocab]),
         helper.make_tensor_value_info("embeds", TensorProto.FLOAT, ["batch", "seq", hidden])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def _run(model, ids):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(["logits", "embeds"], {"input_ids": ids})


def test_tiny_decoder_runs_in_onnxruntime_close_to_fp32():
    rng = np.random.default_rng(7)
    model = _tiny_decoder(rng)
    ids = rng.integers(0, 64, (2, 9)).astype(np.int64)
    ref_logits, ref_embeds = _run(model, ids)
    head = _inits(model)["lm_head.weight"]

    quantized, info = quantize_matmuls(model, 4, 32)
    ops = [n.op_type for n in quantized.graph.node]
    assert "MatMul" not in ops and "Gather" not in ops and ops.count("MatMulNBits") == 17 and ops.count("GatherBlockQuantized") == 1
    # mixed (8 layers: use_more_bits = 0, 3, 6, 7): 8 bits, blocks of 64, for the head and the MLPs of 0, 3, 6, 7
    eight = sorted(["/lm_head/MatMul"] + [f"/model/layers.{i}/mlp/{p}_proj/MatMul" for i in (0, 3, 6, 7) for p in ("up", "down")])
    bits = {n.name: helper.get_attribute_value(next(a for a in n.attribute if a.name == "bits")) for n in quantized.graph.node if n.op_type == "MatMulNBits"}
    assert sorted(k for k, v in bits.items() if v == 8) == [f"{name}_Q8" for name in eight]
    assert info["eight_bit_nodes"] == eight and info["node_counts"] == {"4-bit/32": 8, "8-bit/64": 9}
    assert info["shared_embedding"] == {"/model/embed_tokens/Gather": "/lm_head/MatMul"}
    names = {i.name for i in quantized.graph.initializer}
    assert "model.embed_tokens.weight" not in names and "lm_head.weight" not in names  # the table is stored once, packed

    logits, embeds = _run(quantized, ids)
    # the embedding is exactly the head's dequantized weight
    inits = _inits(quantized)
    table = dequantize_weight(inits["lm_head.weight_Q8"], inits["lm_head.weight_scales"], inits["lm_head.weight_zero_points"], 8, 64).T
    assert np.array_equal(embeds, table[ids])
    assert np.abs(table - head.T).max() < 0.01
    # and the logits are close to fp32 (int8 activations in the kernel included)
    rel = np.linalg.norm(logits - ref_logits) / np.linalg.norm(ref_logits)
    assert rel < 0.1, rel  # measured 0.074-0.077 (seeds 7-9); plain 4-bit RTN everywhere: 0.13
    assert (logits.argmax(-1) == ref_logits.argmax(-1)).mean() >= 0.9

    # llama.cpp's Q4_K_M choice: the head and the use_more_bits down projections (no qkv in this graph)
    _, info = quantize_matmuls(_tiny_decoder(np.random.default_rng(7)), 4, 32, eight_bit_patterns=LLAMA_CPP_Q4_K_M_PATTERNS)
    assert info["eight_bit_nodes"] == sorted(["/lm_head/MatMul"] + [f"/model/layers.{i}/mlp/down_proj/MatMul" for i in (0, 3, 6, 7)])
    # a hidden size that is not a whole number of 8-bit blocks (96 = 1.5 x 64): the tied head takes
    # blocks of 32 so that the embedding can still read it
    wide = _tiny_decoder(np.random.default_rng(8), hidden=96)
    wide_logits, wide_embeds = _run(wide, ids)
    wide, info = quantize_matmuls(wide, 4, 32)
    assert info["nodes"]["/lm_head/MatMul"]["block_size"] == 32 and info["nodes"]["/model/layers.0/mlp/down_proj/MatMul"]["block_size"] == 64
    assert info["shared_embedding"] == {"/model/embed_tokens/Gather": "/lm_head/MatMul"}
    logits, embeds = _run(wide, ids)
    assert np.abs(embeds - wide_embeds).max() < 0.01
    assert np.linalg.norm(logits - wide_logits) / np.linalg.norm(wide_logits) < 0.1

    # no mixing, no sharing, an excluded node: all 4-bit, the Gather and the excluded MatMul left as they were
    plain, info = quantize_matmuls(_tiny_decoder(np.random.default_rng(7)), 4, 32, mixed=False, share_embedding=False, exclude=["/lm_head/MatMul"])
    ops = [n.op_type for n in plain.graph.node]
    assert ops.count("MatMul") == 1 and ops.count("Gather") == 1 and ops.count("MatMulNBits") == 16
    assert info["node_counts"] == {"4-bit/32": 16} and info["shared_embedding"] == {}
    logits, embeds = _run(plain, ids)
    assert np.array_equal(embeds, ref_embeds)
    assert np.linalg.norm(logits - ref_logits) / np.linalg.norm(ref_logits) < 0.15


def test_one_weight_two_matmuls_quantized_once():
    rng = np.random.default_rng(5)
    w = _weights(rng, 64, 48)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["A", "W"], ["Y1"], name="first"), helper.make_node("MatMul", ["Y0", "W"], ["Y2"], name="second"),
         helper.make_node("Relu", ["A"], ["Y0"], name="relu")], "g",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("Y1", TensorProto.FLOAT, [1, 48]), helper.make_tensor_value_info("Y2", TensorProto.FLOAT, [1, 48])],
        initializer=[numpy_helper.from_array(w, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    model, info = quantize_matmuls(model, 4, 32)
    assert sorted(_inits(model)) == ["W_Q4", "W_scales", "W_zero_points"] and list(info["nodes"]) == ["first"]
    a = np.random.default_rng(6).standard_normal((1, 64)).astype(np.float32)
    y1, y2 = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"A": a})
    deq = dequantize_weight(*[_inits(model)[n] for n in ("W_Q4", "W_scales", "W_zero_points")], 4, 64)
    assert np.abs(y1 - a @ deq).max() < 0.05 and np.abs(y2 - np.maximum(a, 0) @ deq).max() < 0.05


@pytest.mark.parametrize("importance", [False, True])
def test_threads_write_the_bytes_of_one_thread(importance):
    """quantize_weight's row chunks run in threads: the same packed codes, scales and zero points as one after another
    (chunks small enough here that a weight has many: CHUNK_BLOCKS is patched down)."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((96, 700)) * 0.02).astype(np.float32)
    imp = rng.random(96).astype(np.float32) if importance else None
    with pytest.MonkeyPatch.context() as m:
        m.setattr(quantize, "CHUNK_BLOCKS", 64)
        one = quantize_weight(w, 4, 32, importance=imp, threads=1)
        many = quantize_weight(w, 4, 32, importance=imp, threads=3)
    assert all(np.array_equal(a, b) for a, b in zip(one, many))
