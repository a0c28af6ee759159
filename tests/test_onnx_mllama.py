"""Llama 3.2 Vision (mllama) to ONNX: the twin's three graphs through the numpy/onnxruntime pipeline against torch.

`xpack.packager.export.onnx.mllama.export_mllama` writes vision.onnx, cross_kv.onnx and decoder.onnx; the
pipeline `xpack.runtimes.onnx_mllama.MllamaOnnx` (no torch) encodes the processor's pixel_values,
builds the cross-attention masks from the token ids and decodes with a KV cache. The reference is
transformers' MllamaForConditionalGeneration (fp32, eager) given the processor's output for the same
image and prompt.

Parity thresholds, measured on this twin (56 teacher-forced tokens: chat prompt + answer; 4 / 2 / 1
real tiles; |logit| <~ 0.73; smallest top-1/top-2 margin 5.3e-4), with ~500x headroom:
- teacher-forced logits with an image: top-1 100%, max |logit error| 1.8e-7..1.9e-7 (<= LOGIT_ATOL);
  the vision graph's cross_attention_states against torch: 1.7e-7..2.4e-7 (<= STATE_ATOL)
- text only (no image; transformers skips the cross-attention layers): max |logit error| 1.9e-7
- the export's own validation (a prefill, one cached decoding step, text only): 1.2e-7..2.4e-7;
  the torch wrappers alone against transformers: <= 1.5e-7
- greedy generation of 16 tokens with the KV cache: the same ids as `generate(do_sample=False)`,
  with the image and without
- the LoRA-merged twin: its vision output differs from the base's by 0.017 (scale 0.67; the adapter
  covers the vision tower's q/k/v/o_proj and fc1/fc2), and each export matches its own torch model
  within 2.1e-7 (the merged model's logits are 0.33 away from the base export's).
"""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest
import torch

import twins
from xpack.errors import XpackError
from xpack.packager.export.job import export
from xpack.packager.export.onnx import pipeline as onnx_pipeline
from xpack.packager.export.onnx.mllama import export_mllama, load_mllama
from xpack.packager.export.onnx.mllama_modules import wrap_mllama
from xpack.packager.export.onnx.mllama_stitch import DOMAIN, stubbed_layers
from xpack.packager.merge.job import merge
from xpack.runtimes.artifacts import MLLAMA_CROSS_KV_FILE, MLLAMA_DECODER_FILE, MLLAMA_META_FILE, VISION_FILE
from xpack.runtimes.onnx_mllama import MllamaOnnx, cross_attention_masks

LOGIT_ATOL = 1e-4
STATE_ATOL = 1e-4
# --bits 16 (measured on this twin: max |logit error| ~5e-4 on a logit range of 0.6, KL ~5e-9)
FP16_LOGIT_ATOL = 5e-3
FP16_KL = 1e-6
GREEDY_TOKENS = 16
ANSWER = "The lungs are clear. No acute cardiopulmonary process."
# image size -> real tiles of the twin's processor (16 x 16 tiles, at most 4)
IMAGES = {"wide-4-tiles": (40, 32), "tall-2-tiles": (16, 32), "square-1-tile": (16, 16)}


@pytest.fixture(scope="module")
def twin(twin_factory):
    return twin_factory.get("mllama")


@pytest.fixture(scope="module")
def processor(twin):
    return twins.load_processor(twin.model_dir)


@pytest.fixture(scope="module")
def torch_model(twin):
    return load_mllama(twin.model_dir)


@pytest.fixture(scope="module")
def exported(twin, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx-mllama") / "base"
    meta = export_mllama(twin.model_dir, out)
    return out, meta


@pytest.fixture(scope="module")
def pipeline(exported):
    return MllamaOnnx(exported[0], threads=1)


def _encode(processor, image_size, *, answer: str = ANSWER, image: bool = True) -> dict:
    """The processor's output for the chat-templated prompt with the twin's synthetic image (and an answer to teacher-force)."""
    messages = twins.sample_messages("mllama")
    if not image:
        messages = [{"role": "user", "content": [{"type": "text", "text": twins.SAMPLE_PROMPT}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) + answer
    if not image:
        return dict(processor.tokenizer(text, add_special_tokens=False, return_tensors="pt"))
    return dict(processor(text=text, images=[twins.sample_image(size=image_size)], add_special_tokens=False, return_tensors="pt"))


def _torch_logits(model, enc) -> np.ndarray:
    with torch.no_grad():
        return model(**enc).logits[0].float().numpy()


def _image_state(pipe, enc):
    return pipe.encode_image(enc["pixel_values"].numpy(), enc["aspect_ratio_ids"].numpy(), enc["aspect_ratio_mask"].numpy())


def _torch_states(model, enc) -> np.ndarray:
    """transformers' cross_attention_states (MllamaModel.forward) flattened per batch row: [1, V, hidden]."""
    inner = model.model
    with torch.no_grad():
        states = inner.vision_model(
            pixel_values=enc["pixel_values"], aspect_ratio_ids=enc["aspect_ratio_ids"], aspect_ratio_mask=enc["aspect_ratio_mask"]
        ).last_hidden_state
        states = inner.multi_modal_projector(states).reshape(-1, states.shape[-2], inner.hidden_size)
    return states.reshape(1, -1, inner.hidden_size).numpy()


# -- the torch wrappers -----------------------------------------------------------------------------


def test_wrappers_equal_transformers(torch_model, processor):
    """Vision + projector, cross K/V and the explicit-KV decoder in torch reproduce MllamaForConditionalGeneration."""
    enc = _encode(processor, IMAGES["tall-2-tiles"])
    ref = _torch_logits(torch_model, enc)
    wraps = wrap_mllama(torch_model)
    cfg = torch_model.config
    ids = enc["input_ids"][0].tolist()
    num_tiles = int(enc["aspect_ratio_mask"].sum())
    cmask, rmask = cross_attention_masks(ids, cfg.image_token_index, num_tiles, 4, torch_model.model.vision_model.num_patches)
    # the masks equal transformers' _prepare_cross_attention_mask of the processor's cross_attention_mask
    from transformers.models.mllama.modeling_mllama import _prepare_cross_attention_mask

    hf_cmask, hf_rmask = _prepare_cross_attention_mask(enc["cross_attention_mask"], num_vision_tokens=17, dtype=torch.float32)
    np.testing.assert_array_equal(cmask, hf_cmask.numpy())
    np.testing.assert_array_equal(rmask, hf_rmask.numpy())
    with torch.no_grad():
        states = wraps["vision"](enc["pixel_values"], enc["aspect_ratio_ids"], enc["aspect_ratio_mask"])
        np.testing.assert_allclose(states.numpy(), _torch_states(torch_model, enc), atol=1e-6, rtol=0)
        cross = wraps["cross_kv"](states)
        empty = tuple(torch.zeros((1, 2, 0, 16)) for _ in range(4))
        n, total = 20, len(ids)
        cmask, rmask = torch.from_numpy(cmask), torch.from_numpy(rmask)
        first = wraps["decoder"](enc["input_ids"][:, :n], torch.ones((1, n), dtype=torch.long), torch.arange(n)[None], cmask[:, :, :n], rmask[:, :, :n], empty, cross)
        rest = wraps["decoder"](
            enc["input_ids"][:, n:], torch.ones((1, total), dtype=torch.long), torch.arange(n, total)[None], cmask[:, :, n:], rmask[:, :, n:], tuple(first[1:]), cross
        )
    got = np.concatenate([first[0][0].numpy(), rest[0][0].numpy()])
    assert np.abs(got - ref).max() <= 1e-6


# -- the export -------------------------------------------------------------------------------------


def test_export_writes_three_graphs_with_explicit_kv(exported):
    import onnx

    out, meta = exported
    for name in ("vision.onnx", "cross_kv.onnx", "decoder.onnx", MLLAMA_META_FILE, "tokenizer.json", "preprocessor_config.json", "config.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / MLLAMA_META_FILE).read_text())["validation"] == meta["validation"]
    v = meta["validation"]
    assert v["passed"] and v["prefill_top1_agreement"] == 1.0
    for key in ("prefill_max_abs_diff", "decode_step_max_abs_diff", "text_only_max_abs_diff", "wrapper_max_abs_diff"):
        assert v[key] <= LOGIT_ATOL, (key, v[key])

    def io(name):
        graph = onnx.load(str(out / name)).graph
        dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
        return {i.name: dims(i) for i in graph.input}, {o.name: dims(o) for o in graph.output}

    vin, vout = io("vision.onnx")
    assert vin == {"pixel_values": ["batch", 1, 4, 3, 16, 16], "aspect_ratio_ids": ["batch", 1], "aspect_ratio_mask": ["batch", 1, 4]}
    assert vout == {"cross_attention_states": ["batch", 68, 64]}  # 4 tiles x (16 patches + class token)
    cin, cout = io("cross_kv.onnx")
    assert cin == {"cross_attention_states": ["batch", "vision_tokens", 64]}
    assert cout == {"cross_key_values.1.key": ["batch", 2, "vision_tokens", 16], "cross_key_values.1.value": ["batch", 2, "vision_tokens", 16]}
    din, dout = io("decoder.onnx")
    assert din["input_ids"] == ["batch", "sequence"] and din["attention_mask"] == ["batch", "total_sequence"]
    assert din["cross_attention_mask"] == ["batch", 1, "sequence", "vision_tokens"]
    assert din["full_text_row_masked_out_mask"] == ["batch", 1, "sequence", 1]
    kv_inputs = sorted(n for n in din if "key_values" in n)
    assert kv_inputs == sorted(
        [f"past_key_values.{i}.{kv}" for i in (0, 2) for kv in ("key", "value")] + ["cross_key_values.1.key", "cross_key_values.1.value"]
    )
    assert din["past_key_values.0.key"] == ["batch", 2, "past_sequence", 16]
    assert sorted(dout) == sorted(["logits"] + [f"present.{i}.{kv}" for i in (0, 2) for kv in ("key", "value")])
    assert dout["logits"] == ["batch", "sequence", 521] and dout["present.2.value"] == ["batch", 2, "total_sequence", 16]


def test_vision_graph_is_one_traced_layer_per_kind_stitched_per_layer(exported, twin, torch_model):
    """mllama_stitch.py: every encoder layer of the twin's tower is a copy of its kind's traced layer reading that
    layer's own weights (its q_proj among the vision graph's MatMul weights), no stand-in node or domain is left, and
    the tower's layers run normally again after the trace (the parity tests above: the graph equals torch)."""
    import onnx

    graph = onnx.load(str(exported[0] / "vision.onnx"), load_external_data=False)
    assert all(n.domain != DOMAIN for n in graph.graph.node)
    assert all(o.domain != DOMAIN for o in graph.opset_import)
    weights = {i.name for i in graph.graph.initializer}
    matmul_weights = {n.input[1] for n in graph.graph.node if n.op_type == "MatMul"}
    vision = torch_model.model.vision_model
    layers = [f"model.vision_model.transformer.layers.{i}" for i in range(len(vision.transformer.layers))]
    layers += [f"model.vision_model.global_transformer.layers.{i}" for i in range(len(vision.global_transformer.layers))]
    assert len(layers) >= 3
    for prefix in layers:
        assert f"{prefix}.self_attn.q_proj.weight" in matmul_weights, prefix
        assert f"{prefix}.mlp.fc2.weight" in weights, prefix
    gates = [n for n in weights if n.endswith(".gate_attn") or n.endswith(".gate_ffn")]
    assert sorted(gates) == sorted(f"{p}.{g}" for p in layers if "global" in p for g in ("gate_attn", "gate_ffn"))
    matmul_names = {n.input[1]: n.name for n in graph.graph.node if n.op_type == "MatMul"}
    assert all(matmul_names[f"{p}.self_attn.q_proj.weight"].startswith(f"/{p}/") for p in layers)  # the stitched copy's names
    layer = vision.global_transformer.layers[0]
    with stubbed_layers(torch_model) as seen:
        assert "forward" in vars(layer) and seen.prefixes["global"][0] == layers[-len(vision.global_transformer.layers)]
    assert "forward" not in vars(layer)  # the stand-in forward is gone again


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_teacher_forced_logits_with_image(pipeline, torch_model, processor, image):
    enc = _encode(processor, IMAGES[image])
    ref = _torch_logits(torch_model, enc)
    state = _image_state(pipeline, enc)
    assert state.num_tiles == int(enc["aspect_ratio_mask"].sum()) == {"wide-4-tiles": 4, "tall-2-tiles": 2, "square-1-tile": 1}[image]
    np.testing.assert_allclose(state.cross_attention_states, _torch_states(torch_model, enc), atol=STATE_ATOL, rtol=0)
    got = pipeline.logits(enc["input_ids"][0].tolist(), state)
    assert got.shape == ref.shape
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    assert np.abs(got - ref).max() <= LOGIT_ATOL
    # the image matters: the same text without it gives other logits after the <|image|> token
    assert np.abs(pipeline.logits(enc["input_ids"][0].tolist()) - ref).max() > 1e-3


def test_teacher_forced_logits_text_only(pipeline, torch_model, processor):
    enc = _encode(processor, None, image=False)
    ref = _torch_logits(torch_model, enc)
    got = pipeline.logits(enc["input_ids"][0].tolist())
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    assert np.abs(got - ref).max() <= LOGIT_ATOL


@pytest.mark.parametrize("image", [True, False], ids=["image", "text-only"])
def test_greedy_generation_matches_torch_generate(pipeline, torch_model, processor, image):
    enc = _encode(processor, IMAGES["wide-4-tiles"], answer="", image=image)
    with torch.no_grad():
        out = torch_model.generate(**enc, do_sample=False, max_new_tokens=GREEDY_TOKENS)
    expected = out[0, enc["input_ids"].shape[1] :].tolist()
    state = _image_state(pipeline, enc) if image else None
    got = pipeline.generate_greedy(enc["input_ids"][0].tolist(), state, GREEDY_TOKENS)
    assert got == expected
    assert len(got) == GREEDY_TOKENS  # the twin emits no end-of-turn id within 16 tokens on these prompts


def test_merged_twin_exports_and_its_vision_differs(twin, pipeline, processor, tmp_path):
    merged_dir = tmp_path / "merged"
    merge(str(twin.model_dir), [str(twin.adapter_dir)], merged_dir)
    meta = export_mllama(merged_dir, tmp_path / "onnx")
    assert meta["validation"]["passed"]
    merged_pipe = MllamaOnnx(tmp_path / "onnx", threads=1)
    merged_torch = load_mllama(merged_dir)
    enc = _encode(processor, IMAGES["wide-4-tiles"])
    base_state, merged_state = _image_state(pipeline, enc), _image_state(merged_pipe, enc)
    # the LoRA covers the vision tower: its output moves
    assert np.abs(merged_state.cross_attention_states - base_state.cross_attention_states).max() > 5e-3
    # and each export matches its own torch model
    np.testing.assert_allclose(merged_state.cross_attention_states, _torch_states(merged_torch, enc), atol=STATE_ATOL, rtol=0)
    ref = _torch_logits(merged_torch, enc)
    got = merged_pipe.logits(enc["input_ids"][0].tolist(), merged_state)
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    assert np.abs(got - ref).max() <= LOGIT_ATOL
    assert np.abs(pipeline.logits(enc["input_ids"][0].tolist(), base_state) - ref).max() > 1e-2


# -- --bits 16 ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("large", [False, True], ids=["float32-checked-first", "streamed-cast-per-node"])
def test_fp16_artifact_against_torch(twin, torch_model, processor, tmp_path, monkeypatch, large):
    """``xpack export --bits 16``: all three graphs in fp16, the table's norms, softmax and tanh gates in float32; the
    production path, then teacher-forced with an image against torch. ``large``: above FP32_CHECK_BYTES, no float32
    graph is written and the artifact's check casts its fp16 weights a node at a time."""
    if large:
        monkeypatch.setattr(onnx_pipeline, "FP32_CHECK_BYTES", 0)
    out = tmp_path / "fp16"
    export(str(twin.model_dir), "onnx", out, bits=16, threads=1)
    manifest = json.loads((out / "manifest.json").read_text())
    artifact = manifest["validation"]["artifact"]
    assert artifact["finite"] and artifact["logits"]["top1_agreement"] == 1.0 and artifact["logits"]["kl_mean"] < FP16_KL, artifact
    assert artifact.get("onnxruntime_graph_optimizations", True) is (not large)
    assert ("skipped" in manifest["validation"]["export"]) is large
    for file in (VISION_FILE, MLLAMA_CROSS_KV_FILE, MLLAMA_DECODER_FILE):
        entry = manifest["artifacts"][file]  # every graph is listed with its data file and its bytes on disk
        assert entry["data_file"] == f"{file}.data" and entry["bytes"] == sum((out / f).stat().st_size for f in (file, f"{file}.data")), entry
        assert f"`{file}`" in (out / "README.md").read_text() and f"{file}.data" in (out / "README.md").read_text()
        weights = onnx.load(out / file, load_external_data=False).graph.initializer
        assert all(w.data_type == onnx.TensorProto.FLOAT16 for w in weights if len(w.dims) == 2 and w.name.startswith("model.")), file
        assert all(w.data_type == onnx.TensorProto.FLOAT for w in weights if re.search(r"norm\.|gate(_attn|_ffn)?$", w.name)), file
    pipe = MllamaOnnx(out, threads=1)
    enc = _encode(processor, IMAGES["wide-4-tiles"])
    ref = _torch_logits(torch_model, enc)
    got = pipe.logits(enc["input_ids"][0].tolist(), _image_state(pipe, enc))
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    assert np.abs(got - ref).max() <= FP16_LOGIT_ATOL


# -- the runtime stands alone -----------------------------------------------------------------------


def test_runtime_needs_no_torch(exported, processor, tmp_path, fresh_python):
    """The pipeline runs in a process that never imports torch or transformers."""
    enc = _encode(processor, IMAGES["tall-2-tiles"])
    np.savez(tmp_path / "inputs.npz", **{k: v.numpy() for k, v in enc.items()})
    code = f"""
import numpy as np
from xpack.runtimes.onnx_mllama import MllamaOnnx
x = np.load({str(tmp_path / "inputs.npz")!r})
pipe = MllamaOnnx({str(exported[0])!r}, threads=1)
state = pipe.encode_image(x["pixel_values"], x["aspect_ratio_ids"], x["aspect_ratio_mask"])
ids = pipe.generate_greedy(x["input_ids"][0].tolist(), state, 4, stop_ids=())
assert len(ids) == 4, ids
print("ok")
"""
    assert fresh_python(code, forbidden=("torch", "transformers", "xpack.packager"), timeout=120).strip() == "ok"


def test_user_errors_are_one_line(twin, exported, pipeline, processor, tmp_path):
    enc = _encode(processor, IMAGES["square-1-tile"])
    state = _image_state(pipeline, enc)
    text_ids = [t for t in enc["input_ids"][0].tolist() if t != pipeline.image_token_id]
    with pytest.raises(XpackError, match="exactly one <|image|> token"):
        pipeline.logits(text_ids, state)
    with pytest.raises(XpackError, match="do not hold one image"):
        pipeline.encode_image(np.zeros((1, 1, 2, 3, 16, 16), np.float32), [[1]], [[[1, 0, 0, 0]]])
    with pytest.raises(XpackError, match="has no mllama_onnx.json"):
        MllamaOnnx(tmp_path)
    with pytest.raises(XpackError, match="already exists"):
        export_mllama(twin.model_dir, exported[0])
    text_model = tmp_path / "llama"
    text_model.mkdir()
    (text_model / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(XpackError, match="not Llama 3.2 Vision"):
        export_mllama(text_model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
