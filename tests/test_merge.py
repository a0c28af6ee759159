"""xpack merge against PEFT, litgpt style: tiny twin, PEFT reference, production merge path, assert_close.

Weights: the merged checkpoint equals PEFT's merge_and_unload within 1e-6 (fp32).
Behaviour: the merged model's logits equal the unmerged PeftModel's within 1e-4.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import PeftModel

import twins
from xpack.packager.cards.render import front_matter
from xpack.packager.demo.base_model import demo_adapter_dir, demo_base_dir
from xpack.packager.io.tensors import sha256_file
from xpack.packager.merge.job import merge
from xpack.packager.merge.stream import MergeSettings

WEIGHT_ATOL = 1e-6
LOGIT_ATOL = 1e-4


def _load(twin, path):
    return twin.model_class.from_pretrained(path, dtype=torch.float32).eval()


def _peft(twin, adapter_dirs, weights=None):
    """The reference: PeftModel with the adapter(s), merged one after the other as PEFT does."""
    model = _load(twin, twin.model_dir)
    for i, adapter in enumerate(adapter_dirs):
        model = PeftModel.from_pretrained(model, adapter)
        if weights and weights[i] != 1.0:
            for module in model.modules():
                if hasattr(module, "scaling") and isinstance(module.scaling, dict):
                    module.scaling = {k: v * weights[i] for k, v in module.scaling.items()}
        if i < len(adapter_dirs) - 1:
            model = model.merge_and_unload()
    return model.eval()


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits.float()


def _assert_weights_equal(merged_model, reference_merged):
    ours = merged_model.state_dict()
    ref = reference_merged.state_dict()
    assert set(ours) == set(ref)
    worst = max(((ours[k].float() - ref[k].float()).abs().max().item(), k) for k in ref)
    assert worst[0] <= WEIGHT_ATOL, f"largest weight difference {worst[0]} at {worst[1]}"


def _check_against_peft(twin, out, adapter_dirs=None, weights=None, inputs=None):
    adapter_dirs = adapter_dirs or [twin.adapter_dir]
    inputs = inputs or twins.sample_inputs(twin.name, twin.model_dir)
    reference = _peft(twin, adapter_dirs, weights)
    unmerged_logits = _logits(reference, inputs)
    merged = _load(twin, out)
    _assert_weights_equal(merged, reference.merge_and_unload())
    torch.testing.assert_close(_logits(merged, inputs), unmerged_logits, atol=LOGIT_ATOL, rtol=0)
    base_logits = _logits(_load(twin, twin.model_dir), inputs)
    assert (base_logits - unmerged_logits).abs().max() > 1e-3, "the adapter must change the model"
    return merged


@pytest.mark.parametrize("name", twins.TWIN_NAMES)
def test_merge_matches_peft(twin_factory, tmp_path, name):
    twin = twin_factory.get(name)
    out = tmp_path / "merged"
    manifest = merge(str(twin.model_dir), [str(twin.adapter_dir)], out)
    _check_against_peft(twin, out)
    assert manifest["merge"]["merged_tensors"] > 0
    # a normal checkpoint: tokenizer, generation config, processor for vision models, card, manifest
    for f in ("config.json", "generation_config.json", "tokenizer_config.json", "README.md", "manifest.json"):
        assert (out / f).is_file(), f
    if twin.is_vision:
        from transformers import AutoProcessor

        assert AutoProcessor.from_pretrained(out) is not None


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"use_rslora": True}, id="rslora"),
        pytest.param({"rank_pattern": {"q_proj": 4, r"layers\.1\.mlp\.down_proj": 8}, "alpha_pattern": {"v_proj": 5}}, id="rank-alpha-patterns"),
        pytest.param({"use_dora": True}, id="dora"),
        pytest.param({"target_modules": r".*\.(q_proj|v_proj)"}, id="regex-targets"),
        pytest.param({"adapter_dtype": torch.float16}, id="adapter-fp16"),
        pytest.param({"adapter_dtype": torch.bfloat16}, id="adapter-bf16"),
        pytest.param({"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}, id="modules-to-save-tied-head"),
    ],
)
def test_lora_variants_match_peft(twin_factory, tmp_path, overrides):
    twin = twin_factory.get("llama", **overrides)
    out = tmp_path / "merged"
    manifest = merge(str(twin.model_dir), [str(twin.adapter_dir)], out)
    merged = _check_against_peft(twin, out)
    if "modules_to_save" in overrides:
        # the base ties lm_head to the embedding; the trained head must not leak into the input side
        assert manifest["merge"]["untied_output_head"] is True
        assert merged.config.tie_word_embeddings is False


def test_modules_to_save_gemma3_vision_old_checkpoint_names(twin_factory, tmp_path):
    """Adapter names use transformers' new layout (model.language_model.*); a checkpoint may use the old one."""
    twin = twin_factory.get("gemma3_vision", modules_to_save=["multi_modal_projector"])
    out = tmp_path / "merged"
    merge(str(twin.model_dir), [str(twin.adapter_dir)], out)
    _check_against_peft(twin, out)


def test_tied_embeddings_stay_tied(twin_factory, tmp_path):
    twin = twin_factory.get("llama")
    assert json.loads((twin.model_dir / "config.json").read_text()).get("tie_word_embeddings", True)
    out = tmp_path / "merged"
    merge(str(twin.model_dir), [str(twin.adapter_dir)], out)
    merged = _load(twin, out)
    assert merged.config.tie_word_embeddings
    assert merged.lm_head.weight.data_ptr() == merged.get_input_embeddings().weight.data_ptr()
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in set(f.keys())


def test_lora_on_tied_embedding_matches_peft_merge(twin_factory, tmp_path):
    """LoRA on embed_tokens of a tied model: the head follows the embedding, exactly as PEFT merges it."""
    twin = twin_factory.get("llama", target_modules=["embed_tokens", "q_proj"])
    out = tmp_path / "merged"
    manifest = merge(str(twin.model_dir), [str(twin.adapter_dir)], out)
    _assert_weights_equal(_load(twin, out), _peft(twin, [twin.adapter_dir]).merge_and_unload())
    assert any("tied" in n for n in manifest["merge"]["notes"])


def test_two_adapters_with_weights(twin_factory, tmp_path):
    first = twin_factory.get("llama")
    second = twin_factory.get("llama", seed=7, target_modules=["q_proj", "o_proj", "up_proj"], r=8, lora_alpha=8)
    out = tmp_path / "merged"
    manifest = merge(str(first.model_dir), [str(first.adapter_dir), f"{second.adapter_dir}:0.5"], out)
    assert [a["weight"] for a in manifest["adapters"]] == [1.0, 0.5]
    _check_against_peft(first, out, adapter_dirs=[first.adapter_dir, second.adapter_dir], weights=[1.0, 0.5])


def test_multi_shard_base_and_output(twin_factory, tmp_path):
    twin = twin_factory.get("llama")
    sharded = tmp_path / "sharded-base"
    twins.build_base("llama", sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    out = tmp_path / "merged"
    merge(str(sharded), [str(twin.adapter_dir)], out, MergeSettings(max_shard_size=150_000))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    _check_against_peft(twins.Twin(**{**twin.__dict__, "model_dir": sharded}), out)


def test_fan_in_fan_out_conv1d(tmp_path):
    """GPT-2 style Conv1D weights are stored (in, out): PEFT's fan_in_fan_out."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=4))
    base.save_pretrained(tmp_path / "base")
    peft_model = get_peft_model(
        GPT2LMHeadModel.from_pretrained(tmp_path / "base"),
        LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, init_lora_weights=False),
    )
    peft_model.save_pretrained(tmp_path / "adapter")
    merge(str(tmp_path / "base"), [str(tmp_path / "adapter")], tmp_path / "out")
    ids = {"input_ids": torch.randint(0, 96, (1, 10))}
    ref = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(tmp_path / "base"), tmp_path / "adapter").eval()
    expected = _logits(ref, ids)
    ours = GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    _assert_weights_equal(ours, ref.merge_and_unload())
    torch.testing.assert_close(_logits(ours, ids), expected, atol=LOGIT_ATOL, rtol=0)


def test_output_dtype_bf16(twin_factory, tmp_path):
    twin = twin_factory.get("gemma2")
    out = tmp_path / "merged"
    merge(str(twin.model_dir), [str(twin.adapter_dir)], out, MergeSettings(dtype="bf16"))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16"
    merged = twin.model_class.from_pretrained(out, dtype="auto")
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    reference = _peft(twin, [twin.adapter_dir]).merge_and_unload()
    ref_w = reference.model.layers[0].self_attn.q_proj.weight.to(torch.bfloat16)
    assert torch.equal(merged.model.layers[0].self_attn.q_proj.weight, ref_w)


def test_manifest_and_card(twin_factory, tmp_path):
    twin = twin_factory.get("gemma2")
    card = "---\nlicense: gemma\ntags: [medical]\n---\n# X\n## Intended Use\nSymptom triage research.\n## Limitations\n- English only\n"
    adapter = tmp_path / "adapter"
    shutil.copytree(twin.adapter_dir, adapter)
    (adapter / "README.md").write_text(card)
    out = tmp_path / "merged"
    manifest = merge(str(twin.model_dir), [str(adapter)], out)
    on_disk = json.loads((out / "manifest.json").read_text())
    # every output file (the card too) is listed with its true hash
    listed = set(on_disk["files"])
    actual = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {"manifest.json"}
    assert listed == actual
    for name, info in on_disk["files"].items():
        assert sha256_file(out / name) == info["sha256"], name
    assert on_disk["base"]["files"]["model.safetensors"] == sha256_file(twin.model_dir / "model.safetensors")
    assert on_disk["adapters"][0]["files"]["adapter_model.safetensors"] == sha256_file(adapter / "adapter_model.safetensors")
    assert on_disk["adapters"][0]["r"] == 16 and on_disk["adapters"][0]["lora_alpha"] == 32
    assert manifest["settings"]["dtype"] == "auto"
    text = (out / "README.md").read_text()
    fm = front_matter(text)
    assert fm["library_name"] == "transformers" and fm["pipeline_tag"] == "text-generation"
    assert fm["license"] == "gemma" and "medical" in fm["tags"] and "xpack" in fm["tags"]
    assert "base_model" not in fm and str(twin_factory.root) not in text  # the twin's base is a local folder: no hub id to name
    assert "Symptom triage research." in text and "English only" in text
    assert "| Rank (r) | 16 |" in text and "| Alpha | 32 |" in text and "| Dropout | 0.05 |" in text
    assert "q_proj, v_proj" in text
    assert on_disk["files"]["model.safetensors"]["sha256"] in text


def test_quantization_config_is_dropped(twin_factory, tmp_path):
    """A base config that still names the 4-bit training setup: the merged checkpoint is plain."""
    twin = twin_factory.get("llama")
    base = tmp_path / "base"
    shutil.copytree(twin.model_dir, base)
    cfg = json.loads((base / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (base / "config.json").write_text(json.dumps(cfg))
    merge(str(base), [str(twin.adapter_dir)], tmp_path / "out")
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())


def test_demo_model_merge_matches_peft(tmp_path):
    """The built-in demo: SmolLM2-135M + the shipped radiology LoRA (bf16 adapter, fp32 base)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = demo_base_dir()
    out = tmp_path / "merged"
    merge(str(base), [str(demo_adapter_dir())], out)
    tok = AutoTokenizer.from_pretrained(base)
    inputs = tok("FINDINGS: The lungs are clear. IMPRESSION:", return_tensors="pt")
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), demo_adapter_dir()).eval()
    with torch.no_grad():
        unmerged = reference(**inputs).logits
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    _assert_weights_equal(merged, reference.merge_and_unload())
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, unmerged, atol=LOGIT_ATOL, rtol=0)
    assert merged.config.tie_word_embeddings
