"""Gemma 3 images without torch at run time: ``vision.onnx`` (packager/export/onnx/gemma3_vision.py) and the numpy
preprocessing and prompt expansion (runtimes/images.py), against transformers on the gemma3_vision twin.

Parity measured on the twin (SigLIP 32x32, patch 8, 4 image tokens of width 64; features of scale ~0.4):
- float32 vision.onnx vs ``get_image_features`` in torch: max |diff| 1.5e-7..2e-7 (random batch of 2,
  processor-made images), base and merged; the test allows VISION_ATOL = 1e-4.
- float16: 2.9e-4; int8 (MatMulNBits, accuracy_level 4): 4.8e-3 (gates 5e-3 / 5e-2 of the scale).
- numpy preprocessing vs transformers' Gemma3ImageProcessor: 0.0 (bit-identical) on square, wide,
  large, tiny, grey and RGBA pictures; the test allows PIXEL_ATOL = 1e-5.
- a LoRA on the vision layers (q/k/v/out_proj, fc1/fc2) moves the features by ~0.1: >100x VISION_ATOL.
"""

from __future__ import annotations

import json
import shutil
import tracemalloc

import numpy as np
import pytest
import torch

import twins
from xpack.errors import XpackError
from xpack.packager.export.onnx.gemma3_vision import (
    INPUT_NAME,
    OUTPUT_NAME,
    _write,
    export_gemma3_vision,
    load_gemma3,
)
from xpack.packager.export.onnx.pending import PendingWeights
from xpack.packager.export.onnx.vision_graph import build_vision
from xpack.packager.io.checkpoint import Checkpoint
from xpack.packager.merge.job import merge
from xpack.runtimes.artifacts import VISION_DATA_FILE, VISION_FILE
from xpack.runtimes.images import Gemma3ImagePreprocessor, gemma3_image_tokens, load_image
from xpack.runtimes.messages import load_image as base_load_image

VISION_ATOL = 1e-4
PIXEL_ATOL = 1e-5
# LoRA on every attention and MLP projection, the SigLIP tower's included (its attention output is out_proj, its MLP fc1/fc2).
VISION_LORA = r".*\.(q_proj|k_proj|v_proj|o_proj|out_proj|fc1|fc2|gate_proj|up_proj|down_proj)"


@pytest.fixture(scope="module")
def twin(twin_factory):
    return twin_factory.get("gemma3_vision", target_modules=VISION_LORA)


@pytest.fixture(scope="module")
def exports(twin, tmp_path_factory):
    """float32 vision.onnx of the base and of the merged (base + vision LoRA) checkpoint, with their figures."""
    root = tmp_path_factory.mktemp("onnx-vision")
    merged = root / "merged"
    merge(str(twin.model_dir), [str(twin.adapter_dir)], merged)
    out = {}
    for name, src in (("base", twin.model_dir), ("merged", merged)):
        figures = export_gemma3_vision(src, root / f"vision-{name}", threads=1)
        out[name] = (root / f"vision-{name}", figures, src)
    return out


@pytest.fixture(scope="module")
def processor(twin):
    return twins.load_processor(twin.model_dir)


def _session(folder):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(folder / VISION_FILE), options, providers=["CPUExecutionProvider"])


def _onnx_features(folder, pixel_values: np.ndarray) -> np.ndarray:
    return _session(folder).run([OUTPUT_NAME], {INPUT_NAME: np.asarray(pixel_values, dtype=np.float32)})[0]


def _torch_features(model, pixel_values: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.get_image_features(torch.from_numpy(np.asarray(pixel_values, dtype=np.float32))).float().numpy()


def _pixels(processor, *images) -> np.ndarray:
    messages = twins.sample_messages("gemma3_vision")
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    enc = processor(text=[prompt] * len(images), images=[[im] for im in images], add_special_tokens=False, return_tensors="np")
    return enc["pixel_values"]


# --------------------------------------------------------------------------------------------------
# vision.onnx


def test_vision_onnx_matches_torch_on_processor_pixels(twin, exports, processor):
    folder, figures, _ = exports["base"]
    model = twins.load_base(twin)  # transformers' default attention, not the export's eager
    pixel_values = _pixels(processor, twins.sample_image())
    expected = _torch_features(model, pixel_values)
    got = _onnx_features(folder, pixel_values)
    assert got.shape == expected.shape == (1, twins.GEMMA3_MM_TOKENS, model.config.text_config.hidden_size)
    assert np.abs(got - expected).max() <= VISION_ATOL
    assert np.abs(expected).max() > 0.05  # not a vacuous comparison

    # the batch axis is dynamic: three different pictures at once, each as if alone
    batch = _pixels(processor, twins.sample_image(), twins.sample_image(size=(64, 48), seed=3), twins.sample_image(size=(32, 32), seed=7))
    got = _onnx_features(folder, batch)
    assert got.shape[0] == 3
    assert np.abs(got - _torch_features(model, batch)).max() <= VISION_ATOL
    assert np.abs(got[:1] - _onnx_features(folder, batch[:1])).max() <= 1e-6


def test_vision_onnx_graph_and_figures(exports):
    import onnx

    folder, figures, _ = exports["base"]
    assert (folder / VISION_FILE).is_file() and (folder / VISION_DATA_FILE).is_file()
    assert (folder / "preprocessor_config.json").is_file() and (folder / "processor_config.json").is_file()
    graph = onnx.load(str(folder / VISION_FILE), load_external_data=False)
    assert [i.name for i in graph.graph.input] == [INPUT_NAME] and [o.name for o in graph.graph.output] == [OUTPUT_NAME]
    assert figures["io"]["inputs"][INPUT_NAME] == {"shape": ["num_images", 3, 32, 32], "dtype": "float32"}
    assert figures["io"]["outputs"][OUTPUT_NAME] == {"shape": ["num_images", twins.GEMMA3_MM_TOKENS, 64], "dtype": "float32"}
    assert {n.domain for n in graph.graph.node} <= {"", "com.microsoft"} and any(n.op_type == "MultiHeadAttention" for n in graph.graph.node)
    assert figures["opset"] == 21 and figures["dtype"] == "float32"
    assert graph.graph.initializer and all(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.graph.initializer)
    v = figures["validation"]
    assert v["checked"] and v["random"]["shape"] == [2, 4, 64] and v["image"]["shape"] == [1, 4, 64]
    assert v["random"]["max_abs_diff"] <= VISION_ATOL and v["image"]["max_abs_diff"] <= VISION_ATOL
    assert v["preprocess_max_abs_diff"] <= PIXEL_ATOL


def test_vision_lora_changes_the_tower_and_the_merged_export_carries_it(twin, exports, processor):
    from peft import PeftModel

    base_dir, _, _ = exports["base"]
    merged_dir, merged_figures, merged_src = exports["merged"]
    assert merged_figures["validation"]["image"]["max_abs_diff"] <= VISION_ATOL
    pixel_values = _pixels(processor, twins.sample_image(), twins.sample_image(size=(32, 32), seed=7))

    base_torch = _torch_features(twins.load_base(twin), pixel_values)
    peft_merged = PeftModel.from_pretrained(twins.load_base(twin), str(twin.adapter_dir)).merge_and_unload().eval()
    merged_torch = _torch_features(peft_merged, pixel_values)
    folder_torch = _torch_features(twins.load_base(merged_src), pixel_values)

    base_onnx = _onnx_features(base_dir, pixel_values)
    merged_onnx = _onnx_features(merged_dir, pixel_values)
    assert np.abs(base_onnx - base_torch).max() <= VISION_ATOL
    assert np.abs(merged_onnx - merged_torch).max() <= VISION_ATOL
    assert np.abs(merged_onnx - folder_torch).max() <= VISION_ATOL
    moved = np.abs(merged_onnx - base_onnx).max()
    assert moved > 100 * VISION_ATOL, f"the vision LoRA moved the features by only {moved:.3g}"
    assert np.abs(merged_torch - base_torch).max() > 100 * VISION_ATOL


@pytest.mark.parametrize("dtype, tolerance, op", [("float16", 5e-3, None), ("int8", 5e-2, "MatMulNBits")])
def test_reduced_precision_exports(twin, tmp_path, processor, dtype, tolerance, op):
    figures = export_gemma3_vision(twin.model_dir, tmp_path, dtype=dtype, threads=1)
    assert figures["dtype"] == dtype
    assert figures["io"]["inputs"][INPUT_NAME]["dtype"] == figures["io"]["outputs"][OUTPUT_NAME]["dtype"] == "float32"
    if op:
        types = figures["io"]["node_types"]  # every weight's MatMul quantized (qkv, out_proj, fc1, fc2 per layer, the projector)
        assert types.get(op, 0) == 4 * 2 + 1 and "MatMul" not in types and types["MultiHeadAttention"] == 2
    pixel_values = _pixels(processor, twins.sample_image())
    expected = _torch_features(twins.load_base(twin), pixel_values)
    diff = np.abs(_onnx_features(tmp_path, pixel_values) - expected).max()
    assert 0 < diff <= tolerance * max(1.0, np.abs(expected).max())


def test_export_refuses_other_checkpoints_and_settings(twin, tmp_path):
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "config.json").write_text(json.dumps({"model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"]}))
    with pytest.raises(XpackError, match="without a Gemma 3 vision tower"):
        export_gemma3_vision(tmp_path / "text", tmp_path / "out")
    with pytest.raises(XpackError, match="no config.json"):
        export_gemma3_vision(tmp_path / "nothing", tmp_path / "out")
    with pytest.raises(XpackError, match="dtype 'bf16'"):
        export_gemma3_vision(twin.model_dir, tmp_path / "out", dtype="bf16")
    with pytest.raises(XpackError, match="differs from torch on the random input") as info:
        export_gemma3_vision(twin.model_dir, tmp_path / "strict", tolerance=1e-12, threads=1)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "strict" / VISION_FILE).exists() and not (tmp_path / "strict" / VISION_DATA_FILE).exists()


# --------------------------------------------------------------------------------------------------
# runtimes/images.py


@pytest.mark.parametrize(
    "size, seed, mode",
    [((40, 32), 0, "RGB"), ((32, 32), 1, "RGB"), ((64, 48), 3, "RGB"), ((7, 300), 4, "RGB"), ((500, 333), 5, "RGB"), ((40, 32), 6, "L"), ((48, 40), 8, "RGBA")],
)
def test_numpy_preprocessing_equals_the_processor(twin, processor, tmp_path, size, seed, mode):
    image = twins.sample_image(size=size, seed=seed).convert(mode)
    if mode == "RGBA":  # a varying alpha: transformers' RGB conversion drops it, and so must ours
        image.putalpha(twins.sample_image(size=size, seed=seed + 1).convert("L"))
    path = tmp_path / "picture.png"
    image.save(path)
    pre = Gemma3ImagePreprocessor.from_folder(twin.model_dir)
    expected = _pixels(processor, image.convert("RGB"))  # transformers converts only with do_convert_rgb; the twin leaves it unset
    for got in (pre(image), pre(path), pre(load_image(path))):
        assert got.dtype == np.float32 and got.shape == (1, 3, 32, 32)
        assert np.abs(got - expected).max() <= PIXEL_ATOL


def test_preprocessor_config_is_read_and_checked(twin, tmp_path):
    config = json.loads((twin.model_dir / "preprocessor_config.json").read_text())
    pre = Gemma3ImagePreprocessor.from_config(config)
    assert pre.size == (32, 32) and pre.resample == 2 and pre.image_mean == (0.5, 0.5, 0.5)
    assert pre.rescale_factor == pytest.approx(1 / 255)
    for change, message in (
        ({"do_pan_and_scan": True}, "do_pan_and_scan"),
        ({"image_processor_type": "SiglipImageProcessor"}, "not Gemma 3's image processor"),
        ({"size": {"shortest_edge": 32}}, "size must be"),
        ({"resample": 9}, "resample 9"),
        ({"image_std": [0.5, 0.5]}, "image_std"),
    ):
        with pytest.raises(XpackError, match=message) as info:
            Gemma3ImagePreprocessor.from_config({**config, **change})
        assert "\n" not in str(info.value)
    with pytest.raises(XpackError, match="no preprocessor_config.json"):
        Gemma3ImagePreprocessor.from_folder(tmp_path)


def test_prompt_expansion_tokenizes_like_the_processor(twin, processor):
    from tokenizers import Tokenizer

    tokens = gemma3_image_tokens(twin.model_dir)
    config = json.loads((twin.model_dir / "config.json").read_text())
    assert tokens.image_token_id == config["image_token_index"] == processor.image_token_id
    assert tokens.image_seq_length == config["mm_tokens_per_image"] == processor.image_seq_length
    assert tokens.full_image_sequence == processor.full_image_sequence
    assert tokens.placeholder == processor.boi_token

    tokenizer = Tokenizer.from_file(str(twin.model_dir / "tokenizer.json"))
    conversations = [
        twins.sample_messages("gemma3_vision"),
        [
            {"role": "user", "content": [{"type": "text", "text": "Compare"}, {"type": "image"}, {"type": "text", "text": "with"}, {"type": "image"}]},
        ],
    ]
    for messages in conversations:
        n = sum(isinstance(p, dict) and p.get("type") == "image" for m in messages for p in m["content"])
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        images = [twins.sample_image(seed=i) for i in range(n)]
        expected = processor(text=prompt, images=[images], add_special_tokens=False)["input_ids"][0]
        ids = tokenizer.encode(tokens.expand(prompt, num_images=n), add_special_tokens=False).ids
        assert ids == list(expected)
        assert ids.count(tokens.image_token_id) == n * tokens.image_seq_length
    with pytest.raises(XpackError, match="1 image placeholder"):
        tokens.expand(prompt.replace(tokens.boi_token, "", 1), num_images=n)


def test_image_tokens_fall_back_to_config_ids(twin, tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(twin.model_dir / name, folder / name)
    tokens = gemma3_image_tokens(folder)  # no tokenizer_config.json / processor_config.json
    assert tokens == gemma3_image_tokens(twin.model_dir)
    config = json.loads((folder / "config.json").read_text())
    (folder / "processor_config.json").write_text(json.dumps({"image_seq_length": config["mm_tokens_per_image"] + 1}))
    with pytest.raises(XpackError, match="image_seq_length"):
        gemma3_image_tokens(folder)
    (folder / "processor_config.json").unlink()
    shutil.copy(twin.model_dir / "tokenizer_config.json", folder / "tokenizer_config.json")  # names <image_soft_token>
    (folder / "config.json").write_text(json.dumps({**config, "image_token_index": config["boi_token_index"]}))
    with pytest.raises(XpackError, match="does not belong to this model"):
        gemma3_image_tokens(folder)


def test_bad_image_files_are_one_line_errors(twin, tmp_path):
    pre = Gemma3ImagePreprocessor.from_folder(twin.model_dir)
    text = tmp_path / "notes.png"
    text.write_text("FINDINGS: not a picture\n")
    truncated = tmp_path / "truncated.png"
    twins.sample_image().save(tmp_path / "whole.png")
    truncated.write_bytes((tmp_path / "whole.png").read_bytes()[:200])
    cases = {
        text: "is not a readable image",
        truncated: "is not a readable image",
        tmp_path / "missing.png": "does not exist",
        tmp_path: "does not exist or is not a file",
    }
    for path, message in cases.items():
        for call in (load_image, pre):
            with pytest.raises(XpackError, match=message) as info:
                call(path)
            assert "\n" not in str(info.value) and str(path) in str(info.value)
    with pytest.raises(XpackError, match="expected a PIL image"):
        pre(np.zeros((32, 32, 3), dtype=np.uint8))
    assert load_image is base_load_image  # one helper, importable from both modules


def test_vision_only_load_reads_the_vision_parts_alone(twin):
    """The vision export loads the tower and projector, not the language model (issue #12: 1.7 of Gemma 3 4B's 17 GB),
    and gets the full model's image features (SDPA attention there, eager in the full load: equal within float32 rounding)."""
    lean = load_gemma3(twin.model_dir, vision_only=True)
    assert lean.model.language_model.embed_tokens.weight.device.type == "meta"
    assert all(p.device.type == "cpu" for p in lean.model.vision_tower.parameters())
    full = load_gemma3(twin.model_dir)
    pixels = torch.randn(1, 3, full.config.vision_config.image_size, full.config.vision_config.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(lean.get_image_features(pixels), full.get_image_features(pixels), atol=1e-6, rtol=1e-5)



@pytest.fixture(scope="module")
def deep_tower(twin, tmp_path_factory):
    """The twin's Gemma 3 with a deeper, wider SigLIP tower (24 layers, 4.7M parameters, bf16): no vision tensor is more
    than 2% of the tower, so holding one weight at a time and holding the tower differ many times over."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(twin.model_dir))
    config.vision_config.num_hidden_layers, config.vision_config.hidden_size, config.vision_config.intermediate_size = 24, 128, 512
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(config)
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    folder = tmp_path_factory.mktemp("deep-tower")
    model.to(torch.bfloat16).save_pretrained(folder)
    return folder


def test_vision_graph_is_written_one_weight_at_a_time(deep_tower, tmp_path):
    """vision.onnx is built with placeholders and each weight made, converted and appended alone (issue #12: the 4B's
    vision export peaked at 7.2 GB when torch.onnx traced the tower, 2.4 GB now): numpy's allocations at the peak stay
    within a few of the largest tensor, and the graph file holds no weights."""
    specs = {n: s for n, s in Checkpoint(deep_tower).specs.items() if "vision" in n or "projector" in n}
    weights = sum(4 * int(np.prod(s.shape)) for s in specs.values())
    largest = max(4 * int(np.prod(s.shape)) for s in specs.values())
    for dtype in ("float32", "int8"):
        (tmp_path / dtype).mkdir()
        _write(deep_tower, tmp_path / dtype, dtype)  # imports and caches out of the measurement
        tracemalloc.start()
        try:
            _write(deep_tower, tmp_path / dtype, dtype)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 8 * largest + 1_000_000 < weights / 4, (dtype, peak, largest, weights)
        assert (tmp_path / dtype / VISION_FILE).stat().st_size < 200_000
    pending = PendingWeights()
    build_vision(deep_tower, pending)
    tracemalloc.start()
    try:
        made = [recipe.make() for recipe in pending.recipes.values()]
        held = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        pending.close()
    assert held > 0.9 * weights and len(made) == len(pending.recipes)
