"""xpack's ONNX export streams (issue #12): the graph is built with placeholders (packager/export/onnx/pending.py),
converted at --bits with no weight in memory, and each weight written alone. The streamed artifact is the one the
in-memory path writes, value for value, and the export holds one weight at a time, not the model."""

from __future__ import annotations

import json
import subprocess
import sys
import tracemalloc

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import numpy_helper

from xpack.cli import cli
from xpack.packager.archs import require_arch
from xpack.packager.export.onnx import pending as pending_module
from xpack.packager.export.onnx import pipeline, torch_check
from xpack.packager.export.onnx.decoder_graph import build_decoder, build_embedding
from xpack.packager.export.onnx.pending import DataFile, PendingWeights, Recipe, save_graph
from xpack.packager.export.onnx.pipeline import default_block_size
from xpack.packager.export.onnx.precision import quantize_graph
from xpack.packager.export.onnx.torch_check import load_torch, torch_steps
from xpack.packager.io.checkpoint import Checkpoint
from xpack.packager.io.memory_need import float32_bytes
from xpack.runtimes import torch_offload


@pytest.fixture(scope="module")
def deep_llama(tmp_path_factory):
    """A llama checkpoint whose weights are spread over many layers (24 layers, 6M parameters, untied head, bf16):
    no single tensor is more than 1% of the model, so holding one at a time and holding the model differ 100x."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=24, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=32, vocab_size=512, max_position_embeddings=256,
                                      tie_word_embeddings=False, rms_norm_eps=1e-5)
    model = transformers.LlamaForCausalLM(config)
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    folder = tmp_path_factory.mktemp("deep-llama")
    model.to(torch.bfloat16).save_pretrained(folder)
    return folder


def _in_memory(src, bits: int, spec, embed: bool = False):
    model = build_embedding(src) if embed else build_decoder(src)[0]
    model, _ = quantize_graph(model, bits, default_block_size(bits), False, spec)
    return model


def _streamed(src, bits: int, spec, out, embed: bool = False):
    pending = PendingWeights()
    try:
        model = build_embedding(src, pending) if embed else build_decoder(src, pending=pending)[0]
        with DataFile(out, "model.onnx_data") as data:
            pending.out = data
            model, _ = quantize_graph(model, bits, default_block_size(bits), False, spec, tensors=pending)
            pending.write_all(model)
        save_graph(model, out / "model.onnx")
    finally:
        pending.close()
    return model


def _same_graph(a, b) -> None:
    assert [(n.op_type, n.name, list(n.input), list(n.output)) for n in a.graph.node] == \
           [(n.op_type, n.name, list(n.input), list(n.output)) for n in b.graph.node]
    left = {t.name: numpy_helper.to_array(t) for t in a.graph.initializer}
    right = {t.name: numpy_helper.to_array(t) for t in b.graph.initializer}
    assert left.keys() == right.keys()
    for name, value in left.items():
        assert value.dtype == right[name].dtype and np.array_equal(value, right[name]), name


@pytest.mark.parametrize("bits", [32, 16, 8, 4])
@pytest.mark.parametrize("name", ["llama", "gemma3", "deep"])
def test_streamed_graph_is_the_in_memory_one(twin_factory, deep_llama, tmp_path, name, bits):
    """Every node and every weight, byte for byte: tied (twins) and untied (deep) embeddings, Gemma 3's fp16 graph
    with its float32 residual stream, the mixed 4/8-bit scheme."""
    src = deep_llama if name == "deep" else twin_factory(name).model_dir
    spec = require_arch(Checkpoint(src).config, "ONNX export").onnx
    streamed = _streamed(src, bits, spec, tmp_path)
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in streamed.graph.initializer if t.dims and np.prod(t.dims) > 256)
    _same_graph(_in_memory(src, bits, spec), onnx.load(str(tmp_path / "model.onnx")))


def test_streamed_embedding_graph_is_the_in_memory_one(twin_factory, tmp_path):
    src = twin_factory("gemma3").model_dir
    spec = require_arch(Checkpoint(src).config, "ONNX export").onnx
    _streamed(src, 4, spec, tmp_path, embed=True)
    _same_graph(_in_memory(src, 4, spec, embed=True), onnx.load(str(tmp_path / "model.onnx")))


def test_streamed_table_is_quantized_a_chunk_of_rows_at_a_time(tmp_path):
    """An embedding table (65536 x 128) quantized for its GatherBlockQuantized is read a chunk of rows at a time
    (quantize.TableColumns): numpy's peak stays under 3/4 of the table in float32, where reading it whole costs the
    table and more, and the graph is the in-memory one, byte for byte. At 8 bits (round to nearest), whose working set
    per chunk is small; 4 bits reads the table through the same TableColumns, its scale search needs ~17 MB a chunk."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=32, vocab_size=65536, tie_word_embeddings=False)
    folder = tmp_path / "wide"
    transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    spec = require_arch(Checkpoint(folder).config, "ONNX export").onnx
    table = 65536 * 128 * 4
    _streamed(folder, 8, spec, tmp_path, embed=True)  # imports and caches out of the measurement
    streamed = _peak(lambda: _streamed(folder, 8, spec, tmp_path, embed=True))
    whole = _peak(lambda: _in_memory(folder, 8, spec, embed=True))
    assert streamed < 0.75 * table < table < whole, (streamed, table, whole)  # the 8-bit codes alone are a quarter of it
    _same_graph(_in_memory(folder, 8, spec, embed=True), onnx.load(str(tmp_path / "model.onnx")))


def test_pending_fp16_weight_is_converted_and_written_a_chunk_at_a_time(tmp_path, monkeypatch):
    """write_all converts a weight to fp16 a chunk of rows at a time: onnxruntime's converter holds several times what
    it converts (index arrays of np.where), which took Gemma 3 4B's 2.7 GB table past 8 GB. A recipe that reads rows
    (an embedding table) is never whole in float32; one that cannot (a transposed head) is whole once, not 3-4 times.
    The bytes are the converter's own on the whole weight."""
    from onnx import TensorProto, helper
    from onnxruntime.transformers.float16 import convert_np_to_float16

    monkeypatch.setattr(pending_module, "WRITE_CHUNK_BYTES", 1 << 20)
    rng = np.random.default_rng(0)
    values = (rng.standard_normal((4096, 1024)) * 0.02).astype(np.float32)
    values[0, :4] = [1e-9, -1e-9, 1e6, -1e6]  # the converter's clipping, at a chunk's edge
    fp32 = values.nbytes
    for name, recipe, bound in (("table", Recipe(lambda: values.copy(), rows=lambda a, z: values[a:z].copy()), 0.25),
                                ("head", Recipe(lambda: values.copy()), 1.5)):
        weights = PendingWeights()
        tensor = weights.placeholder(name, values.shape, recipe)
        tensor.data_type = TensorProto.FLOAT16  # as the fp16 converter retypes a placeholder
        graph = helper.make_graph([], "g", [], [], [tensor])
        model = helper.make_model(graph)
        with DataFile(tmp_path, f"{name}.data") as out:
            weights.out = out
            peak = _peak(lambda: weights.write_all(model))
        assert peak < bound * fp32, (name, peak, fp32)
        written = np.fromfile(tmp_path / f"{name}.data", np.float16).reshape(values.shape)
        assert written.tobytes() == convert_np_to_float16(values).tobytes(), name


def _peak(job) -> int:
    tracemalloc.start()
    try:
        job()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("bits", [4, 16])
def test_streamed_export_holds_one_weight_at_a_time(deep_llama, tmp_path, bits):
    """numpy's allocations (tracemalloc sees them) at the peak of the streamed export stay within a few of the largest
    tensor's float32 bytes, not the model's; the same measure of all the weights made at once sees the model."""
    spec = require_arch(Checkpoint(deep_llama).config, "ONNX export").onnx
    weights = float32_bytes(Checkpoint(deep_llama))
    largest = max(4 * int(np.prod(s.shape)) for s in Checkpoint(deep_llama).specs.values())
    _streamed(deep_llama, bits, spec, tmp_path)  # imports and caches out of the measurement
    streamed = _peak(lambda: _streamed(deep_llama, bits, spec, tmp_path))
    assert streamed < 8 * largest + 1_000_000 < weights / 4, (streamed, largest, weights)
    pending = PendingWeights()
    build_decoder(deep_llama, pending=pending)
    held = _peak(lambda: [recipe.make() for recipe in pending.recipes.values()])
    pending.close()
    assert held > 0.9 * weights, (held, weights)


def test_lean_torch_reference_equals_the_plain_one(deep_llama):
    """The export's torch check with every layer streamed from the safetensors files, its (untied) embedding and head held
    in bf16 as stored, gives the plain model's numbers."""
    spec = require_arch(Checkpoint(deep_llama).config, "ONNX export").onnx
    ids = [(7 * i + 3) % 512 for i in range(12)]
    lean = load_torch(deep_llama, spec, lean=True)
    assert lean.xpack_offload_folder is not None and getattr(lean, "hf_device_map", None), "the deep twin should stream its layers"
    assert lean.get_input_embeddings().weight.dtype == lean.get_output_embeddings().weight.dtype == torch.bfloat16
    got = torch_steps(lean, ids)
    del lean
    want = torch_steps(load_torch(deep_llama, spec), ids)
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for key in w:
            np.testing.assert_allclose(g[key], w[key], atol=1e-5, rtol=0)


@pytest.mark.parametrize("bits", [32, 16, 4])
def test_large_export_checks_the_artifact_against_torch(twin_factory, tmp_path, monkeypatch, bits):
    """Above FP32_CHECK_BYTES no float32 graph is written: the manifest and the card say so, and the artifact itself
    (the float32 one too) is checked against torch; an fp16 one with its weights cast a node at a time."""
    monkeypatch.setattr(pipeline, "FP32_CHECK_BYTES", 0)
    twin = twin_factory("gemma3")
    out = tmp_path / "o"
    r = CliRunner().invoke(cli, ["export", "--model", str(twin.model_dir), "--format", "onnx", "--bits", str(bits), "--no-calibrate", "--out", str(out)])
    assert r.exit_code == 0, r.output
    validation = json.loads((out / "manifest.json").read_text())["validation"]
    assert "is not written" in validation["export"]["skipped"]
    artifact = validation["artifact"]
    assert artifact["finite"] and artifact["logits"]["top1_agreement"] >= (1.0 if bits == 32 else 0.5)
    if bits == 32:
        assert artifact["within_tolerance"], artifact
    assert artifact.get("onnxruntime_graph_optimizations", True) is (bits != 16), artifact
    if bits == 16:
        assert artifact["logits"]["top1_agreement"] == 1.0 and artifact["logits"]["kl_mean"] < 1e-4, artifact
    assert "not checked on its own" in (out / "README.md").read_text()


FP16_MEMORY_SCRIPT = """
import sys
import numpy as np
from xpack.runtimes.onnx_base import open_session, session_options


def anon():
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("RssAnon:"))


before = anon()
session = open_session(sys.argv[1], session_options(1, prepack=False, cast_per_node=sys.argv[2] == "1"), ["CPUExecutionProvider"])
for _ in range(2):
    y = session.run(None, {"x": np.ones((1, 1024), np.float16)})[0]
print(anon() - before, float(np.abs(y.astype(np.float32)).sum()))
"""


def _fp16_matmuls(path, layers: int, d: int) -> None:
    """A chain of ``layers`` fp16 MatMuls of d x d weights, saved with its weights in an external data file."""
    rng = np.random.default_rng(0)
    nodes, weights, x = [], [], "x"
    for i in range(layers):
        weights.append(numpy_helper.from_array((rng.standard_normal((d, d)) * 0.03).astype(np.float16), f"w{i}"))
        nodes.append(onnx.helper.make_node("MatMul", [x, f"w{i}"], [f"h{i}"]))
        x = f"h{i}"
    graph = onnx.helper.make_graph(nodes, "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT16, [1, d])],
                                   [onnx.helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT16, [1, d])], weights)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data")


def test_fp16_check_casts_one_weight_at_a_time(tmp_path):
    """onnxruntime's CPU provider has no fp16 MatMul: with graph optimizations on it keeps a float32 copy of every fp16
    weight (the 4B's fp16 check was killed above 16 GB); ``cast_per_node`` casts each as its node runs, so the private
    memory it keeps is a few weights, not the model, and the output is the same."""
    fp32_weights = 16 * 1024 * 1024 * 4
    _fp16_matmuls(tmp_path / "m.onnx", 16, 1024)
    runs = {}
    for flag in ("0", "1"):  # each in a process of its own: its private memory is onnxruntime's alone
        out = subprocess.run([sys.executable, "-c", FP16_MEMORY_SCRIPT, str(tmp_path / "m.onnx"), flag], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        grew, total = out.stdout.split()
        runs[flag] = (int(grew), float(total))
    assert runs["0"][0] > fp32_weights, runs  # the float32 copies, folded at load
    assert runs["1"][0] < 0.5 * fp32_weights, runs
    assert runs["0"][1] == pytest.approx(runs["1"][1], rel=1e-3), runs


def test_large_mllama_export_streams_its_reference_and_writes_the_same_artifact(twin_factory, tmp_path, monkeypatch):
    """Llama 3.2 Vision at the 11B size: its graphs are traced from a weightless model and written one weight at a time
    (mllama_trace.py), its torch reference streams every layer from the safetensors, and no float32 graph is written.
    The artifact is the one the small-model path writes, byte for byte, and its figures against torch are the same."""
    twin = twin_factory.get("mllama")

    def export(out, streamed: bool):
        args = ["export", "--model", str(twin.model_dir), "--adapter", str(twin.adapter_dir), "--format", "onnx", "--bits", "4", "--out", str(out)]
        with monkeypatch.context() as m:
            if streamed:
                def every_layer_streamed(model_class, folder, dtype, table_dtype=None):
                    model, _, blocks = torch_offload.layer_sizes(model_class, folder, dtype, table_dtype)
                    return torch_offload._map(model, {b: "disk" for b in blocks})

                m.setattr(pipeline, "FP32_CHECK_BYTES", 0)
                m.setattr(torch_check, "lean_device_map", every_layer_streamed)
            r = CliRunner().invoke(cli, args)
        assert r.exit_code == 0, r.output
        manifest = json.loads((out / "manifest.json").read_text())
        # the mixed int4 finds the language layers by their nodes' names: 8-bit self-attention and more_bits MLP layers
        assert manifest["quantization"]["eight_bit_nodes"] > 1, manifest["quantization"]
        return manifest["validation"]

    plain, streamed = export(tmp_path / "plain", False), export(tmp_path / "streamed", True)
    assert plain["export"]["within_tolerance"] and plain["export"]["figures"]["wrapper_max_abs_diff"] < 1e-4
    assert "are not written" in streamed["export"]["skipped"]
    for name in ("vision.onnx", "cross_kv.onnx", "decoder.onnx"):
        for suffix in ("", ".data"):
            assert (tmp_path / "plain" / f"{name}{suffix}").read_bytes() == (tmp_path / "streamed" / f"{name}{suffix}").read_bytes(), name + suffix
    # the large model's check reads the weights from the mapped files (no prepacking: float32 products, where the
    # prepacked path may quantize activations to 8 bits), so its figures are close to the small path's, not equal
    assert plain["artifact"]["onnxruntime_prepacking"] and not streamed["artifact"]["onnxruntime_prepacking"]
    a, b = plain["artifact"]["logits"], streamed["artifact"]["logits"]
    assert min(a["top1_agreement"], b["top1_agreement"]) >= 0.5
    assert abs(a["kl_mean"] - b["kl_mean"]) <= 0.25 * a["kl_mean"], (a, b)
    np.testing.assert_allclose(a["max_abs_logit_error"], b["max_abs_logit_error"], rtol=0.25)
