"""xpack's ONNX export streams (issue #12): the graph is built with placeholders (packager/export/onnx/pending.py),
converted at --bits with no weight in memory, and each weight written alone. The streamed artifact is the one the
in-memory path writes, value for value, and the export holds one weight at a time, not the model."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import numpy_helper

from xpack.cli import cli
from xpack.packager.archs import require_arch
from xpack.packager.export.onnx import pipeline, torch_check
from xpack.packager.export.onnx.decoder_graph import build_decoder, build_embedding
from xpack.packager.export.onnx.pending import DataFile, PendingWeights, save_graph
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


@pytest.mark.parametrize("bits", [32, 4])
def test_large_export_checks_the_artifact_against_torch(twin_factory, tmp_path, monkeypatch, bits):
    """Above FP32_CHECK_BYTES no float32 graph is written: the manifest and the card say so, and the artifact itself
    (the float32 one too) is checked against torch."""
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
    assert "not checked on its own" in (out / "README.md").read_text()


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
