"""Images through llama.cpp (libmtmd) for Gemma 3 / MedGemma: the twin's text GGUF + mmproj against torch.

The gemma3_vision twin (SigLIP 32x32, patch 8, 4 image tokens) is exported with `xpack export` at F32
and F16 (its mmproj stays F32: the twin's weights are F32), run with an image through
`xpack.runtimes.registry.load` and `xpack run --image`, and its teacher-forced logits of the text after
the image are compared with transformers' Gemma3ForConditionalGeneration (fp32, eager) given the
processor's pixel_values of the same image.

Parity thresholds, measured on this twin (25 text tokens after the image, |logit| <~ 0.7; the same
figures for a 32x32 image, which needs no resize, and for 40x32 / 64x48 images, which the runtime
resizes as the processor does), with about 10x headroom on the logit error:
- F32: top-1 100%, KL mean <= 1e-8, KL max <= 2e-8, max |logit error| 5.5e-4..7.3e-4
  (the text-only F32 error of this twin is 4e-4: llama.cpp's GELU; the image embeddings themselves
  differ from torch's by 1.1e-4 at a scale of 0.38)
- F16: top-1 100%, KL mean <= 2e-8, KL max <= 7e-8, max |logit error| 8.2e-4..1.4e-3
Left to llama.cpp's own preprocessing (aspect ratio kept, padded with black), a 40x32 image gives
top-1 56%, KL mean 1.8e-3, max |logit error| 0.40 (64x48: 72%, 2.5e-3, 0.63): see
test_non_square_images_need_the_processors_resize.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import twins
from xpack.cli import cli
from xpack.errors import XpackError
from xpack.packager.export.job import export
from xpack.packager.verify.parity import compare_logits
from xpack.runtimes import llamacpp
from xpack.runtimes.registry import load
from xpack.runtimes.settings import GenerationSettings

# quant -> (top-1 (tie-aware) at least, KL mean at most, KL max at most, max |logit error| at most)
IMAGE_PARITY = {
    "F32": (1.0, 1e-6, 1e-6, 5e-3),
    "F16": (0.96, 1e-5, 1e-5, 1e-2),
}
IMAGE_TOKENS = twins.GEMMA3_MM_TOKENS  # 4: (32 / 8)^2 patches average-pooled by 2 x 2
PROMPT = twins.SAMPLE_PROMPT
GREEDY = GenerationSettings(max_tokens=8, temperature=0, repetition_penalty=1.0)


@pytest.fixture(scope="module")
def vision_export(twin_factory, tmp_path_factory):
    cache = {}

    def get(quant):
        if quant not in cache:
            out = tmp_path_factory.mktemp(f"gguf-vision-{quant}")
            shutil.rmtree(out)
            cache[quant] = (export(str(twin_factory.get("gemma3_vision").model_dir), "gguf", out, quant=quant), out)
        return cache[quant]

    return get


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Synthetic PNGs: square at the twin's image size, non-square (resized by the processor), another picture."""
    folder = tmp_path_factory.mktemp("images")
    made = {
        "square": twins.sample_image(size=(32, 32)),
        "wide": twins.sample_image(),  # 40x32
        "large": twins.sample_image(size=(64, 48), seed=3),
        "other": twins.sample_image(size=(32, 32), seed=7).transpose(0),  # mirrored: the disc moves
    }
    paths = {}
    for name, image in made.items():
        paths[name] = folder / f"{name}.png"
        image.save(paths[name])
    return paths


@pytest.fixture(scope="module")
def reference(twin_factory):
    """transformers' logits (fp32) of the text after the image, and the processor's input ids."""
    model_dir = twin_factory.get("gemma3_vision").model_dir
    model = twins.load_base(model_dir)
    processor = twins.load_processor(model_dir)
    messages = twins.sample_messages("gemma3_vision", PROMPT)
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    cache = {}

    def get(image_path):
        if image_path not in cache:
            from PIL import Image

            with Image.open(image_path) as img:
                enc = processor(text=prompt, images=[img.convert("RGB")], add_special_tokens=False, return_tensors="pt")
            with torch.no_grad():
                logits = model(**enc).logits[0].float().numpy()
            ids = enc["input_ids"][0].tolist()
            last_image = max(i for i, t in enumerate(ids) if t == model.config.image_token_index)
            cache[image_path] = (logits[last_image + 1 :], ids[last_image + 1 :], ids)
        return cache[image_path]

    get.image_token_index = model.config.image_token_index
    return get


def _messages():
    return twins.sample_messages("gemma3_vision", PROMPT)


# --------------------------------------------------------------------------------------------------
# Loading and generating
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quant", ["F32", "F16"])
def test_vision_gguf_answers_with_an_image(vision_export, cpu, images, reference, quant):
    manifest, out = vision_export(quant)
    assert manifest["mmproj_file"].startswith("mmproj-") and (out / manifest["mmproj_file"]).is_file()
    with load(out, cpu) as rt:
        assert rt.name == "llamacpp" and rt.accepts_images and rt.mmproj_path == out / manifest["mmproj_file"]
        before = rt.generate(PROMPT, GREEDY)
        pieces: list[str] = []
        first = rt.generate(PROMPT, GREEDY, image=images["square"], on_token=pieces.append)
        second = rt.generate(PROMPT, GREEDY, image=images["square"])
        after = rt.generate(PROMPT, GREEDY)
        other = rt.generate(_messages(), GREEDY, image=images["wide"])  # messages with their own image part
    assert first.completion_tokens > 0 and first.text and first.finish_reason in ("stop", "length")
    assert "".join(pieces) == first.text
    assert second.text == first.text  # greedy with an image is deterministic
    assert after.text == before.text  # the image run leaves no state behind
    assert first.prompt_tokens == len(reference(images["square"])[2])  # image tokens counted, as transformers counts them
    assert 0 < first.image_encode_s < first.ttft_s <= first.total_s and first.decode_tok_s > 0
    assert before.image_encode_s is None and "image_encode_s" in first.to_dict()
    assert other.completion_tokens > 0 and other.prompt_tokens == first.prompt_tokens


def test_image_tokens_match_the_processor(vision_export, cpu, images, reference):
    """Gemma 3: mtmd's text around the image is the processor's, token for token, with 4 image embeddings."""
    _, out = vision_export("F32")
    with load(out, cpu) as rt:
        layout = rt.tokenize_with_image(PROMPT, images["wide"])
    assert [kind for kind, _ in layout] == ["text", "image", "text"]
    assert layout[1][1] == IMAGE_TOKENS
    flat = layout[0][1] + [reference.image_token_index] * layout[1][1] + layout[2][1]
    assert flat == reference(images["wide"])[2]


@pytest.mark.parametrize("image", ["square", "wide", "large"])
@pytest.mark.parametrize("quant", ["F32", "F16"])
def test_image_logits_match_torch(vision_export, cpu, images, reference, quant, image):
    _, out = vision_export(quant)
    ref_logits, ref_ids, _ = reference(images[image])
    with load(out, cpu) as rt:
        got, ids = rt.logits_with_image(_messages(), images[image])
    assert ids == ref_ids and got.shape == (len(ids), rt.vocab_size) and got.dtype == np.float32
    figures = compare_logits(ref_logits, got)
    top1, kl_mean, kl_max, max_err = IMAGE_PARITY[quant]
    assert figures["top1_agreement_tie_aware"] >= top1, figures
    assert figures["kl_mean"] <= kl_mean and figures["kl_max"] <= kl_max, figures
    assert figures["max_abs_logit_error"] <= max_err, figures


def test_the_image_flows_through(vision_export, cpu, images, reference):
    """Another picture moves llama.cpp's logits (measured: 0.57 max), as much as it moves torch's."""
    _, out = vision_export("F32")
    with load(out, cpu) as rt:
        a, ids_a = rt.logits_with_image(_messages(), images["square"])
        b, ids_b = rt.logits_with_image(_messages(), images["other"])
        continued, ids_c = rt.logits_with_image(_messages(), images["square"], continuation_ids=ids_a[3:6])
    assert ids_a == ids_b
    moved = np.abs(a - b).max()
    assert moved > 0.1, moved
    torch_moved = reference(images["square"])[0] - reference(images["other"])[0]
    assert np.abs((a - b) - torch_moved).max() < 0.02 * moved
    # teacher forcing a continuation: the prompt rows stay, the continuation's rows are appended
    assert ids_c == ids_a + ids_a[3:6] and np.allclose(continued[: len(ids_a)], a, atol=1e-5)


def test_generation_sees_the_image(vision_export, cpu, images):
    """The generation path (not only the scorer) uses the image: each image's greedy first token is
    the argmax of its own teacher-forced logits after the generation prompt."""
    _, out = vision_export("F32")
    one = GREEDY.with_overrides(max_tokens=1)
    firsts = set()
    with load(out, cpu) as rt:
        for name in ("square", "other", "wide"):
            logits, _ = rt.logits_with_image(PROMPT, images[name])
            best = int(logits[-1].argmax())
            firsts.add(best)
            result = rt.generate(PROMPT, one, image=images[name])
            if best in rt.stop_ids:
                assert result.finish_reason == "stop" and result.completion_tokens == 0, name
            else:
                assert result.text == rt.detokenize([best]) and result.completion_tokens == 1, name
    assert len(firsts) > 1  # measured: the square and the mirrored image start differently (354 vs 553)


def test_non_square_images_need_the_processors_resize(vision_export, cpu, images, reference, monkeypatch):
    """Why the runtime resizes Gemma 3 images itself: llama.cpp would letterbox a 40x32 image
    (aspect ratio kept, black bars), where transformers stretches it to 32x32."""
    _, out = vision_export("F32")
    ref_logits, _, _ = reference(images["wide"])
    monkeypatch.setattr(llamacpp, "_prepare_image", lambda image, projector, size: image.convert("RGB"))
    with load(out, cpu) as rt:
        got, _ = rt.logits_with_image(_messages(), images["wide"])
    figures = compare_logits(ref_logits, got)
    assert figures["kl_mean"] > 100 * IMAGE_PARITY["F32"][1], figures  # measured 1.8e-3


# --------------------------------------------------------------------------------------------------
# `xpack run --image`
# --------------------------------------------------------------------------------------------------


def _run(*args):
    return CliRunner().invoke(cli, ["run", *map(str, args)], prog_name="xpack")


@pytest.mark.parametrize("quant", ["F32", "F16"])
def test_xpack_run_with_an_image(vision_export, images, quant):
    _, out = vision_export(quant)
    r = _run("--artifact", out, "--profile", "cpu16", "--image", images["wide"], "--prompt", PROMPT, "--temperature", "0", "--max-tokens", "8", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["runtime"] == "llamacpp" and data["completion_tokens"] > 0 and data["text"]
    assert data["image_encode_s"] > 0 and data["prompt_tokens"] > 2 * IMAGE_TOKENS


def test_image_errors(twin_factory, vision_export, cpu, images, tmp_path):
    text_only = tmp_path / "llama"
    export(str(twin_factory.get("llama").model_dir), "gguf", text_only, quant="F32")
    r = _run("--artifact", text_only, "--profile", "cpu16", "--image", images["square"], "--prompt", "x")
    assert r.exit_code == 1
    last = r.output.strip().splitlines()[-1]
    assert last.startswith("Error: --image given but artifact") and "text-only" in last and "mmproj" in last

    _, out = vision_export("F32")
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("FINDINGS: none\n")
    r = _run("--artifact", out, "--profile", "cpu16", "--image", not_an_image, "--prompt", "x")
    assert r.exit_code == 1
    assert r.output.strip().splitlines()[-1] == f"Error: {not_an_image} is not a readable image (UnidentifiedImageError); pass a PNG or JPEG file"
    r = _run("--artifact", out, "--profile", "cpu16", "--image", tmp_path / "missing.png", "--prompt", "x")
    assert r.exit_code == 2 and "does not exist" in r.output

    with load(out, cpu) as rt:
        with pytest.raises(XpackError, match="is not a readable image"):
            rt.generate("x", GREEDY, image=not_an_image)
        with pytest.raises(XpackError, match="does not exist"):
            rt.logits_with_image("x", tmp_path / "missing.png")
        two = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "x"}]}]
        with pytest.raises(XpackError, match="^the conversation has 2 image parts"):
            rt.generate(two, GREEDY, image=images["square"])
    with load(text_only, cpu) as rt:
        with pytest.raises(XpackError, match="text-only"):
            rt.logits_with_image("x", images["square"])


def test_where_the_mmproj_is_found(vision_export, cpu, images, tmp_path):
    manifest, out = vision_export("F16")
    model, mmproj = manifest["gguf_file"], manifest["mmproj_file"]
    # the model file given directly: its folder's manifest names the projector
    with load(out / model, cpu) as rt:
        assert rt.mmproj_path == out / mmproj
        assert rt.generate(PROMPT, GREEDY, image=images["square"]).completion_tokens > 0
    # a loose folder, no manifest: the one mmproj-*.gguf; with two, the one named after the model
    loose = tmp_path / "loose"
    loose.mkdir()
    for name in (model, mmproj):
        (loose / name).symlink_to(out / name)
    with load(loose, cpu) as rt:
        assert rt.mmproj_path == loose / mmproj
    (loose / "mmproj-another-model-f16.gguf").symlink_to(out / mmproj)
    with load(loose, cpu) as rt:
        assert rt.mmproj_path == loose / mmproj
    (loose / mmproj).rename(loose / "mmproj-third-f16.gguf")
    with load(loose, cpu) as rt:
        with pytest.raises(XpackError, match="holds several vision projectors"):
            rt.generate(PROMPT, GREEDY, image=images["square"])
    # a manifest naming a projector that is gone
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / model).symlink_to(out / model)
    (broken / "manifest.json").write_text(json.dumps({"format": "gguf", "gguf_file": model, "mmproj_file": mmproj}))
    with load(broken, cpu) as rt:
        assert rt.generate(PROMPT, GREEDY).completion_tokens > 0  # text still runs
        with pytest.raises(XpackError, match=f"names mmproj_file {mmproj}, which is missing"):
            rt.generate(PROMPT, GREEDY, image=images["square"])
