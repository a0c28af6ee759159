"""The torch reference within a memory budget (issue #12, runtimes/torch_offload.py): its layers stream from the
safetensors files, and every figure is the plain reference's. Shaped like litgpt's test_against_hf_*: the twin,
the plain model as reference, the production path (TorchRuntime with ``max_memory``), assert_close."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from xpack.cli import cli
from xpack.errors import XpackError
from xpack.packager.export.job import export
from xpack.packager.io import memory_need
from xpack.packager.io.checkpoint import Checkpoint
from xpack.runtimes.registry import load
from xpack.runtimes.settings import GenerationSettings
from xpack.runtimes.torch_offload import _embedding_forward, layer_sizes
from xpack.runtimes.torch_ref import PeftOnBase

GREEDY = GenerationSettings(max_tokens=8, temperature=0, repetition_penalty=1.0)


def _sizes(model_dir):
    """(resident bytes, largest layer, number of layers) of the float32 model, as torch_offload plans it."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(model_dir))
    cls = transformers.AutoModelForImageTextToText if config.architectures[0].endswith("ForConditionalGeneration") else transformers.AutoModelForCausalLM
    _, sizes, blocks = layer_sizes(cls, model_dir, torch.float32)
    return sizes[""] - sum(sizes[b] for b in blocks), max(sizes[b] for b in blocks), len(blocks)


def _float32_total(model_dir) -> int:
    import transformers

    _, sizes, _ = layer_sizes(transformers.AutoModelForCausalLM, model_dir, torch.float32)
    return sizes[""]


def _run(model_dir, cpu, max_memory, image=None):
    with load(model_dir, cpu, runtime="torch", max_memory=max_memory) as rt:
        ids = rt.tokenize("The chest radiograph shows a small right pleural effusion.")
        out = {"logits": rt.logits(ids), "greedy": rt.generate([{"role": "user", "content": "Describe the findings."}], GREEDY).token_ids,
               "streamed": rt.info()["streamed"], "device_map": dict(getattr(rt.model, "hf_device_map", {}) or {})}
        if image is not None:
            out["image_logits"], _ = rt.logits_with_image("Describe this image.", image, continuation_ids=[5, 6, 7])
        return out


@pytest.mark.parametrize("name", ["llama", "gemma2", "gemma3", "gemma3_vision", "mllama"])
def test_streamed_reference_equals_plain(twin_factory, cpu, tmp_path, name):
    """Every layer streams (budget: the resident part + one layer): logits, greedy tokens and image logits equal the
    plain float32 model's within 1e-5."""
    from PIL import Image

    twin = twin_factory.get(name)
    image = None
    if twin.is_vision:
        image = tmp_path / "x.png"
        Image.new("RGB", (40, 30), (120, 60, 200)).save(image)
    resident, largest, n_layers = _sizes(twin.model_dir)
    plain = _run(twin.model_dir, cpu, None, image)
    streamed = _run(twin.model_dir, cpu, resident + largest + 16, image)
    assert plain["streamed"] is None and streamed["streamed"].startswith(f"{n_layers} of its layers streamed")
    assert sum(d == "disk" for d in streamed["device_map"].values()) == n_layers
    torch.testing.assert_close(torch.from_numpy(streamed["logits"]), torch.from_numpy(plain["logits"]), atol=1e-5, rtol=0)
    assert streamed["greedy"] == plain["greedy"]
    if image is not None:
        torch.testing.assert_close(torch.from_numpy(streamed["image_logits"]), torch.from_numpy(plain["image_logits"]), atol=1e-5, rtol=0)


def test_streamed_bfloat16_checkpoint_equals_plain(tmp_path, cpu):
    """Real checkpoints are bfloat16: the streamed layers are cast to float32 as they load, exactly as a plain load casts them."""
    import twins

    folder = twins.build_base("gemma3", tmp_path / "bf16", dtype=torch.bfloat16, max_shard_size="200KB")
    resident, largest, _ = _sizes(folder)
    stored = sum(spec.nbytes for specs in Checkpoint(folder).headers.values() for spec in specs.values())
    assert 2 * stored <= _float32_total(folder) < 2 * stored + 1024  # planned in float32 (+ rotary buffers), not in bfloat16
    budget = resident + largest + 16
    with load(folder, cpu, runtime="torch", max_memory=budget) as rt:  # what is in memory stays within the budget
        held = sum(p.numel() * p.element_size() for p in rt.model.parameters() if p.device.type != "meta")
        assert held <= budget and "disk" in rt.model.hf_device_map.values()
        # the tied embedding/head is held as stored (torch_offload.with_stored_tables), everything else in float32
        assert rt.model.get_input_embeddings().weight.dtype == torch.bfloat16 and rt.model.get_output_embeddings().weight is rt.model.get_input_embeddings().weight
        assert rt.model.model.norm.weight.dtype == torch.float32
    plain, streamed = _run(folder, cpu, None), _run(folder, cpu, budget)
    assert "disk" in streamed["device_map"].values()
    torch.testing.assert_close(torch.from_numpy(streamed["logits"]), torch.from_numpy(plain["logits"]), atol=1e-5, rtol=0)
    assert streamed["greedy"] == plain["greedy"]


def test_budget_keeps_the_first_layers_that_fit(twin_factory, cpu):
    """Layers stay in memory in order while the budget holds them and one layer of scratch; the rest stream."""
    twin = twin_factory.get("mllama")  # six layers: vision, global vision, language
    resident, largest, n_layers = _sizes(twin.model_dir)
    out = _run(twin.model_dir, cpu, resident + 2 * largest + 16)
    layers = [k for k in out["device_map"] if out["device_map"][k] == "disk" or ".layers." in k and k.split(".")[-1].isdigit()]
    placed = [out["device_map"][k] for k in layers]
    assert len(layers) == n_layers and placed[0] == "cpu" and "disk" in placed
    assert placed == sorted(placed, key=lambda d: d == "disk")  # resident ones first, then streamed


def test_budget_below_one_layer_is_one_line(twin_factory, cpu):
    twin = twin_factory.get("gemma3")
    resident, largest, _ = _sizes(twin.model_dir)
    with pytest.raises(XpackError, match=r"needs at least .* GB even with its layers streamed from disk .* raise --reference-memory"):
        _run(twin.model_dir, cpu, resident + largest - 1)


def test_as_trained_reference_that_does_not_fit_is_one_line(twin_factory, cpu):

    twin = twin_factory.get("llama")
    resident, largest, _ = _sizes(twin.model_dir)
    with pytest.raises(XpackError, match=r"as-trained reference .* cannot stream its layers from disk; verify against the merged checkpoint"):
        load(twin.model_dir, cpu, runtime="torch", peft=PeftOnBase((str(twin.adapter_dir),)), max_memory=resident + largest + 16)


def test_reference_budget_from_available_memory_and_cap(twin_factory, monkeypatch):
    twin = twin_factory.get("llama")
    weights = memory_need.float32_bytes(Checkpoint(twin.model_dir))
    overhead = int(memory_need.REFERENCE_OVERHEAD_GB * 1e9)
    monkeypatch.setattr(memory_need, "available_bytes", lambda: overhead + weights)
    assert memory_need.reference_budget(twin.model_dir) is None  # fits: the plain reference
    monkeypatch.setattr(memory_need, "available_bytes", lambda: overhead + weights - 1)
    assert memory_need.reference_budget(twin.model_dir) == weights - 1
    monkeypatch.setattr(memory_need, "available_bytes", lambda: 10**12)
    assert abs(memory_need.reference_budget(twin.model_dir, cap_gb=(overhead + weights // 2) / 1e9) - weights // 2) <= 1


def test_verify_with_a_streamed_reference_reports_the_same_figures(twin_factory, tmp_path, monkeypatch):
    """verify when the float32 reference does not fit: it streams, says so, and measures exactly what the plain one does."""
    twin = twin_factory.get("gemma3")
    export(str(twin.model_dir), "gguf", tmp_path / "gguf", quant="F32")
    args = ["verify", "--artifact", str(tmp_path / "gguf"), "--reference", str(twin.model_dir), "--profile", "cpu16", "--no-benchmark", "--json"]
    plain = CliRunner().invoke(cli, args)
    resident, largest, _ = _sizes(twin.model_dir)
    monkeypatch.setattr(memory_need, "available_bytes", lambda: int(memory_need.REFERENCE_OVERHEAD_GB * 1e9) + resident + largest + 16)
    streamed = CliRunner().invoke(cli, args)
    assert plain.exit_code == 0 and streamed.exit_code == 0, plain.output + streamed.output
    a, b = json.loads(plain.stdout), json.loads(streamed.stdout)
    assert a["reference_runtime"]["streamed"] is None and "layers streamed" in b["reference_runtime"]["streamed"]
    for key in ("kl_mean", "top1_agreement", "max_abs_logit_error", "perplexity_reference"):
        assert np.isclose(a["parity"][key], b["parity"][key], rtol=0, atol=1e-6), key
    assert [p["matching_tokens"] for p in a["parity"]["prompts"]] == [p["matching_tokens"] for p in b["parity"]["prompts"]]


def test_closed_streamed_reference_is_freed(twin_factory, cpu):
    """verify runs the artifact in the same process after the reference: closing it frees the model at once, though
    accelerate's hooks make reference cycles (on Gemma 3 4B 3.6 GB stayed held before the collection in close)."""
    import weakref

    twin = twin_factory.get("gemma3")
    resident, largest, _ = _sizes(twin.model_dir)
    rt = load(twin.model_dir, cpu, runtime="torch", max_memory=resident + largest + 16)
    model = weakref.ref(rt.model)
    rt.close()
    assert model() is None


def test_embedding_held_in_16_bits_ignores_a_padding_row_it_does_not_gather():
    """A streamed model's embedding upcasts only the rows a forward uses; a padding_idx (Mllama's 128004) names a row of
    the whole table and must not be checked against that smaller one: the numbers are the plain embedding's."""
    torch.manual_seed(0)
    table = torch.nn.Embedding(50, 8, padding_idx=40)
    ids = torch.tensor([[3, 7, 3, 12]])
    expected = table(ids)
    table.weight = torch.nn.Parameter(table.weight.to(torch.bfloat16).float().to(torch.bfloat16), requires_grad=False)
    got = _embedding_forward(table, ids)
    torch.testing.assert_close(got, table.weight[ids].float(), rtol=0, atol=0)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-2)
    assert table.padding_idx == 40 and table.weight.dtype == torch.bfloat16
