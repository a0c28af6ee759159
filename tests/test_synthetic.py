"""benchmarks/synthetic.py: synthetic checkpoints of the real shapes (issue #12).

At ``--scale tiny`` each model is built by the same code path as the full-size one, sharded, and must load
exactly: transformers with no missing/unexpected/mismatched keys, PEFT with every LoRA tensor landing in
the model, xpack's own Checkpoint and adapter readers. The full-size shapes are checked by parameter
count on the meta device (nothing allocated).
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest

from xpack.packager.archs import require_arch
from xpack.packager.export.onnx.pipeline import _checkpoint_prefixes
from xpack.packager.io import memory_need
from xpack.packager.io.checkpoint import Checkpoint
from xpack.packager.io.tensors import read_header
from xpack.packager.merge.lora import load_adapter

ROOT = Path(__file__).resolve().parents[1]


def _load_script():
    """benchmarks/synthetic.py as a module (the script appends its folder to sys.path: undone here)."""
    saved = list(sys.path)
    spec = importlib.util.spec_from_file_location("synthetic_bench", ROOT / "benchmarks" / "synthetic.py")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved
    return module


synthetic = _load_script()
SHARD_BYTES = 2_000_000  # small shards, so the tiny checkpoints are sharded with an index like the real ones

# Published sizes (parameters, tied weights once) and LoRA modules of the seed recipes at full size.
FULL = {
    "gemma3-4b": dict(parameters=(4.25e9, 4.35e9), modules=34 * 7, has="language_model.model.embed_tokens.weight"),
    "gemma2-2b": dict(parameters=(2.6e9, 2.65e9), modules=26 * 2, has="model.embed_tokens.weight"),
    "mllama-11b": dict(parameters=(10.6e9, 10.7e9), modules=40 * 7 + (32 + 8) * 6,
                       has="vision_model.class_embedding"),
}


@pytest.mark.parametrize("name", synthetic.MODEL_NAMES)
def test_full_size_shapes(name):
    cfg = synthetic.make_config(name, "full")
    model = synthetic.meta_model(cfg)
    n = synthetic.count_parameters(model)
    lo, hi = FULL[name]["parameters"]
    assert n == synthetic.MODELS[name]["parameters"] and lo <= n <= hi
    plan = synthetic.tensor_plan(model)
    assert sum(math.prod(s) for _, _, s in plan) == n  # every parameter written once, tied ones once
    assert FULL[name]["has"] in {p[0] for p in plan}  # the names save_pretrained writes
    assert "lm_head.weight" not in {p[0] for p in plan} or not cfg.get_text_config().tie_word_embeddings
    aplan = synthetic.adapter_plan(model, synthetic.lora_config(name))
    assert len(aplan) == 2 * FULL[name]["modules"]
    if name == "gemma3-4b":  # language model only: the SigLIP tower is not adapted
        assert all(".language_model." in k for k, _ in aplan)
        assert sum(math.prod(s) for n_, _, s in plan if n_.startswith("vision_tower.")) > 400e6  # SigLIP ~417M
    if name == "mllama-11b":
        assert any(".vision_model.global_transformer." in k for k, _ in aplan)
        assert any(".cross_attn.q_proj." in k for k, _ in aplan)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    cache = {}

    def get(name):
        if name not in cache:
            out = root / name
            info = synthetic.build(name, out, "tiny", shard_bytes=SHARD_BYTES)
            cache[name] = (out, info)
        return cache[name]

    return get


@pytest.mark.parametrize("name", synthetic.MODEL_NAMES)
def test_tiny_build_loads_exactly(built, name):
    import torch
    import transformers as tf
    from peft import PeftModel
    from safetensors import safe_open

    out, info = built(name)
    base, adapter = out / "base", out / "adapter"
    assert (out / "COMPLETE").is_file() and not info["cached"]
    assert synthetic.build(name, out, "tiny", shard_bytes=SHARD_BYTES)["cached"]

    # shards + index agree, and xpack's Checkpoint reads them
    index = json.loads((base / "model.safetensors.index.json").read_text())
    shards = sorted(base.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and {p.name for p in shards} == set(index["weight_map"].values())
    headers = {k: s for p in shards for k, s in read_header(p)[0].items()}
    assert set(headers) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(s.nbytes for s in headers.values())
    ckpt = Checkpoint(base)
    assert ckpt.architectures == [synthetic.MODELS[name]["class"]]
    assert set(ckpt.specs) == set(headers) and {s.dtype for s in ckpt.specs.values()} == {"BF16"}
    assert sum(math.prod(s.shape) for s in ckpt.specs.values()) == info["parameters"]

    # transformers: nothing missing, unexpected or mismatched
    cls = getattr(tf, synthetic.MODELS[name]["class"])
    model, loading = cls.from_pretrained(base, dtype=torch.bfloat16, output_loading_info=True)
    assert {k: v for k, v in loading.items() if v} == {}
    assert sum(p.numel() for p in model.parameters()) == info["parameters"]
    tok = tf.AutoTokenizer.from_pretrained(base)
    vocab = model.config.get_text_config().vocab_size
    assert max(tok.get_vocab().values()) < vocab
    ids = tok.apply_chat_template([{"role": "user", "content": "Describe the findings."}], add_generation_prompt=True)
    assert ids and max(ids) < vocab

    # PEFT: every saved LoRA tensor lands in the model, no warnings about keys
    with safe_open(str(adapter / "adapter_model.safetensors"), framework="pt") as fh:
        saved = {k: fh.get_tensor(k) for k in fh.keys()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(model, adapter)
    key_warnings = [str(w.message) for w in caught if "key" in str(w.message).lower()]
    assert not key_warnings
    state = peft_model.state_dict()
    lora_state = {k.replace(".default.", "."): v for k, v in state.items() if ".lora_" in k}
    assert set(lora_state) == set(saved)
    for k, v in saved.items():
        assert torch.equal(lora_state[k].to(v.dtype), v), k
        assert v.abs().max() > 0

    # xpack's adapter reader: the same modules, scale alpha / r
    ad = load_adapter(adapter)
    assert len(ad.modules) == info["adapter"]["modules"] == len(saved) // 2
    lora = synthetic.MODELS[name]["lora"]
    assert {m.scale for m in ad.modules.values()} == {lora["lora_alpha"] / lora["r"]}


@pytest.mark.parametrize("name", ["gemma3-4b", "mllama-11b"])
def test_tiny_vision_processor_and_forward(built, name):
    """The processor saved with the vision models (real preprocessing settings) feeds an image through the model."""
    import numpy as np
    import torch
    import transformers as tf
    from PIL import Image

    out, _ = built(name)
    proc = tf.AutoProcessor.from_pretrained(out / "base")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the findings."}]}]
    text = proc.apply_chat_template(messages, add_generation_prompt=True)
    image = Image.fromarray((np.random.default_rng(0).random((40, 32, 3)) * 255).astype("uint8"))
    inputs = proc(images=image, text=text, return_tensors="pt")
    model = getattr(tf, synthetic.MODELS[name]["class"]).from_pretrained(out / "base", dtype=torch.float32)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[:2] == inputs["input_ids"].shape and torch.isfinite(logits).all()


def _boxed_onnx_sides(name: str) -> list[tuple[int, float, float]]:
    """(bits, box limit, polled private peak) in bytes of each xpack ONNX export of ``name`` that benchmarks/scale.py
    measured to completion inside a memory cgroup (benchmarks/results/scale-NAME*.json)."""
    sides = []
    for path in sorted((ROOT / "benchmarks" / "results").glob(f"scale-{name}*.json")):
        for label, side in json.loads(path.read_text())["sides"].items():
            m = re.fullmatch(r"xpack export onnx --bits (\d+)", label)
            if m and side.get("box") and side.get("result") == "ok" and side.get("polled_peak_anon_mb"):
                sides.append((int(m.group(1)), side["box"]["limit_mb"] * 2**20, side["polled_peak_anon_mb"] * 2**20))
    return sides


@pytest.mark.parametrize("name", synthetic.MODEL_NAMES)
def test_onnx_export_estimate_stays_below_what_its_box_measured(name):
    """The ONNX export refuses before any work when its estimate (memory_need.streamed_onnx_need) exceeds what is
    available, a container's limit included: at the seed sizes the estimate must stay at or below the private peak each
    export was measured at inside its memory cgroup, so that a job that fits its box is never refused (the estimate
    of 2026-12-01 asked 12.6 GB for the Llama 3.2 11B Vision int4 export measured at 5.5 GB inside 6 GB)."""
    cfg = synthetic.make_config(name, "full")
    plan = synthetic.tensor_plan(synthetic.meta_model(cfg))
    ckpt = SimpleNamespace(specs={key: SimpleNamespace(shape=shape, dtype="BF16") for key, _, shape in plan})
    arch = require_arch(cfg.to_dict(), "ONNX export")
    prefixes = () if arch.onnx.pipeline == "mllama" else _checkpoint_prefixes(arch)
    sides = _boxed_onnx_sides(name)
    assert sides, name
    for bits, box, peak in sides:
        need = memory_need.streamed_onnx_need(ckpt, bits, prefixes)
        assert need <= peak <= box, (bits, need / 1e9, peak / 1e9, box / 1e9)
