"""Llama 3.2 Vision image preprocessing without torch/transformers (runtimes/images.py) vs transformers.

``MllamaImagePreprocessor`` must give what ``MllamaImageProcessor`` gives for ``images=[[img]]``: the same
tiled canvas, resize (PIL, same filter), padding, rescale/normalize, tiles, aspect-ratio ids and mask.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import twins
from xpack.errors import XpackError
from xpack.runtimes.artifacts import PREPROCESSOR_CONFIG
from xpack.runtimes.images import (
    MllamaImagePreprocessor,
    mllama_supported_aspect_ratios,
)

# Llama-3.2-11B-Vision(-Instruct)'s preprocessor_config.json
REAL_CONFIG = {
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_pad": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_processor_type": "MllamaImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "max_image_tiles": 4,
    "processor_class": "MllamaProcessor",
    "resample": 2,
    "rescale_factor": 0.00392156862745098,
    "size": {"height": 560, "width": 560},
}

KEYS = {"pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "num_tiles"}


def _grey(w, h, seed=1):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), mode="L")


def _rgba(w, h):
    img = np.asarray(twins.sample_image(size=(w, h))).copy()
    alpha = np.tile(np.linspace(0, 255, w, dtype=np.uint8), (h, 1))
    return Image.fromarray(np.dstack([img, alpha]), mode="RGBA")


def _images(tile: int) -> dict:
    """Square, wide, tall, tiny, large, greyscale, RGBA, palette, and sizes around the tile size."""
    return {
        "square": twins.sample_image(size=(40, 40)),
        "default": twins.sample_image(),  # 40x32
        "wide_3to1": twins.sample_image(size=(96, 32), seed=2),
        "tall_1to3": twins.sample_image(size=(20, 60), seed=3),
        "very_wide": twins.sample_image(size=(300, 11), seed=4),
        "tiny_5x7": twins.sample_image(size=(5, 7), seed=5),
        "one_pixel": twins.sample_image(size=(1, 1), seed=6),
        "tile_exact": twins.sample_image(size=(tile, tile), seed=7),
        "tile_plus_1": twins.sample_image(size=(tile + 1, tile - 1), seed=8),
        "large": twins.sample_image(size=(1280, 960), seed=9),
        "large_wide": twins.sample_image(size=(2000, 500), seed=10),
        "grey": _grey(50, 30),
        "rgba": _rgba(33, 45),
        "palette": twins.sample_image(size=(37, 23), seed=11).convert("P"),
    }


def _assert_same(ours: dict, ref, name: str):
    assert set(ours) == KEYS, name
    theirs = {k: np.asarray(ref[k]) for k in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")}
    for key, value in theirs.items():
        assert ours[key].shape == value.shape, (name, key, ours[key].shape, value.shape)
        assert ours[key].dtype == value.dtype, (name, key, ours[key].dtype, value.dtype)
    diff = float(np.max(np.abs(ours["pixel_values"] - theirs["pixel_values"])))
    assert diff <= 1e-5, (name, diff)
    np.testing.assert_array_equal(ours["aspect_ratio_ids"], theirs["aspect_ratio_ids"], err_msg=name)
    np.testing.assert_array_equal(ours["aspect_ratio_mask"], theirs["aspect_ratio_mask"], err_msg=name)
    assert [[ours["num_tiles"]]] == ref["num_tiles"], name
    assert isinstance(ours["num_tiles"], int)
    return diff


@pytest.fixture(scope="module")
def mllama_dir(twin_factory):
    return twin_factory.get("mllama").model_dir


@pytest.fixture(scope="module")
def reference(mllama_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(mllama_dir).image_processor


def test_twin_matches_transformers(mllama_dir, reference):
    pre = MllamaImagePreprocessor.from_folder(mllama_dir)
    config = json.loads((mllama_dir / PREPROCESSOR_CONFIG).read_text())
    assert pre.tile_size == config["size"]["height"] and pre.max_image_tiles == config["max_image_tiles"]
    seen_ratios = set()
    for name, img in _images(pre.tile_size).items():
        ours = pre(img)
        ref = reference(images=[[img]], return_tensors="np")
        _assert_same(ours, ref, name)
        # exactly, in fact: the same operations on the same numbers
        np.testing.assert_array_equal(ours["pixel_values"], np.asarray(ref["pixel_values"]), err_msg=name)
        assert ours["pixel_values"].shape == (1, 1, pre.max_image_tiles, 3, pre.tile_size, pre.tile_size)
        seen_ratios.add(int(ours["aspect_ratio_ids"][0, 0]))
    assert len(seen_ratios) >= 4  # several canvases (1x1, wide, tall, 2x2...) were exercised


def test_canvas_choice_matches_transformers_on_a_grid():
    from transformers.models.mllama import image_processing_mllama as ref

    for max_tiles in (1, 2, 4, 6):
        assert mllama_supported_aspect_ratios(max_tiles) == ref.get_all_supported_aspect_ratios(max_tiles)
    pre = MllamaImagePreprocessor(tile_size=16, max_image_tiles=4)
    sizes = sorted({1, 2, 3, 5, 7, 8, 15, 16, 17, 23, 31, 32, 33, 47, 48, 49, 63, 64, 65, 100, 255, 1000})
    for h in sizes:
        for w in sizes:
            canvas = tuple(int(v) for v in ref.get_optimal_tiled_canvas(h, w, 4, 16))
            fit = tuple(int(v) for v in ref.get_image_size_fit_to_canvas(h, w, canvas[0], canvas[1], 16))
            assert pre.tiling(h, w) == ((canvas[0] // 16, canvas[1] // 16), fit), (h, w)


def test_real_llama32_vision_config_matches_transformers():
    from transformers import MllamaImageProcessor

    reference = MllamaImageProcessor(**REAL_CONFIG)
    pre = MllamaImagePreprocessor.from_config(REAL_CONFIG)
    assert (pre.tile_size, pre.max_image_tiles, pre.resample) == (560, 4, 2)
    images = {
        "square": twins.sample_image(size=(448, 448)),
        "wide_3to1": twins.sample_image(size=(1200, 400), seed=2),
        "tall": twins.sample_image(size=(300, 900), seed=3),
        "tiny_5x7": twins.sample_image(size=(5, 7), seed=5),
        "photo_4to3": twins.sample_image(size=(1600, 1200), seed=9),
        "grey": _grey(640, 480),
        "rgba": _rgba(700, 500),
    }
    ids = set()
    for name, img in images.items():
        ours = pre(img)
        ref = reference(images=[[img]], return_tensors="np")
        _assert_same(ours, ref, name)
        assert ours["pixel_values"].shape == (1, 1, 4, 3, 560, 560)
        ids.add(int(ours["aspect_ratio_ids"][0, 0]))
    assert len(ids) >= 3


def test_other_settings_match_transformers():
    """Non-default filters, no rescale / no normalize, another tile budget, scalar mean/std."""
    from transformers import MllamaImageProcessor

    variants = [
        dict(resample=3, max_image_tiles=6),  # BICUBIC
        dict(resample=1, do_normalize=False),  # LANCZOS
        dict(resample=0, do_rescale=False),  # NEAREST; normalize uint8 -> float32
        dict(do_rescale=False, do_normalize=False, max_image_tiles=2),
        dict(image_mean=0.5, image_std=0.25, max_image_tiles=1),
        dict(rescale_factor=0.5 / 255, resample=4),  # BOX
    ]
    imgs = [twins.sample_image(size=(96, 32), seed=2), twins.sample_image(size=(20, 60), seed=3), _rgba(33, 45)]
    for overrides in variants:
        config = {**REAL_CONFIG, "size": {"height": 16, "width": 16}, **overrides}
        reference = MllamaImageProcessor(**config)
        pre = MllamaImagePreprocessor.from_config(config)
        for i, img in enumerate(imgs):
            _assert_same(pre(img), reference(images=[[img]], return_tensors="np"), f"{overrides} #{i}")


def test_no_convert_rgb_matches_transformers_for_rgb_and_refuses_the_rest():
    from transformers import MllamaImageProcessor

    config = {**REAL_CONFIG, "size": {"height": 16, "width": 16}, "do_convert_rgb": False}
    pre = MllamaImagePreprocessor.from_config(config)
    img = twins.sample_image(size=(50, 20))
    _assert_same(pre(img), MllamaImageProcessor(**config)(images=[[img]], return_tensors="np"), "rgb")
    for bad in (_grey(10, 10), _rgba(10, 10)):
        with pytest.raises(XpackError, match="do_convert_rgb") as info:
            pre(bad)
        assert "\n" not in str(info.value)


def test_path_input_matches_transformers(tmp_path, mllama_dir, reference):
    path = tmp_path / "rgba.png"
    _rgba(41, 17).save(path)
    pre = MllamaImagePreprocessor.from_folder(mllama_dir)
    _assert_same(pre(path), reference(images=[[str(path)]], return_tensors="np"), "path")
    _assert_same(pre(str(path)), reference(images=[[str(path)]], return_tensors="np"), "str path")


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"image_processor_type": "Gemma3ImageProcessor"}, "not Llama 3.2 Vision"),
        ({"do_pad": False}, "do_pad"),
        ({"do_resize": False}, "do_resize"),
        ({"size": {"height": 560, "width": 448}}, "square"),
        ({"size": {"shortest_edge": 560}}, "size must be"),
        ({"size": {"height": 0, "width": 0}}, "positive"),
        ({"max_image_tiles": 0}, "max_image_tiles"),
        ({"max_image_tiles": None}, "max_image_tiles"),
        ({"resample": 9}, "resample"),
        ({"resample": None}, "resample"),
        ({"rescale_factor": None}, "rescale_factor"),
        ({"image_mean": [0.5, 0.5]}, "image_mean"),
        ({"image_std": [0.5, 0.0, 0.5]}, "zero"),
        ({"do_normalize": "yes"}, "do_normalize"),
    ],
)
def test_unsupported_settings_are_one_line_errors(overrides, message):
    with pytest.raises(XpackError, match=message) as info:
        MllamaImagePreprocessor.from_config({**REAL_CONFIG, **overrides}, "ckpt/preprocessor_config.json")
    assert "\n" not in str(info.value) and "ckpt/preprocessor_config.json" in str(info.value)


def test_defaults_and_bad_inputs(tmp_path):
    from transformers import MllamaImageProcessor

    pre = MllamaImagePreprocessor.from_config({})  # MllamaImageProcessor's own defaults: 224 tiles, 4 of them
    assert (pre.tile_size, pre.max_image_tiles, pre.resample) == (224, 4, 2)
    img = twins.sample_image(size=(300, 100))
    _assert_same(pre(img), MllamaImageProcessor()(images=[[img]], return_tensors="np"), "defaults")

    with pytest.raises(XpackError, match="has no preprocessor_config.json"):
        MllamaImagePreprocessor.from_folder(tmp_path)
    with pytest.raises(XpackError, match="expected a PIL image"):
        pre(np.zeros((8, 8, 3), dtype=np.uint8))
    with pytest.raises(XpackError, match="does not exist"):
        pre(tmp_path / "missing.png")
    (tmp_path / "not.png").write_text("text")
    with pytest.raises(XpackError, match="not a readable image"):
        pre(tmp_path / "not.png")
    with pytest.raises(XpackError, match="at least one pixel"):
        pre(Image.new("RGB", (0, 5)))


def test_runtime_images_module_needs_no_torch(fresh_python):
    """Importing runtimes/images.py and running both preprocessors (Gemma 3 and Llama 3.2 Vision) imports
    neither torch, transformers nor the packager."""
    code = (
        "import xpack.runtimes.images as m; "
        "from PIL import Image; "
        "m.Gemma3ImagePreprocessor(size=(8, 8))(Image.new('RGB', (5, 7))); "
        "out = m.MllamaImagePreprocessor(tile_size=16, max_image_tiles=4)(Image.new('RGBA', (40, 13))); "
        "assert out['pixel_values'].shape == (1, 1, 4, 3, 16, 16), out['pixel_values'].shape"
    )
    fresh_python(code, forbidden=("torch", "transformers", "xpack.packager"))
