"""Checks of the tiny model twins that the rest of the suite builds on (tests/twins.py)."""

from __future__ import annotations

import json
import re

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from safetensors import safe_open  # noqa: E402

import twins  # noqa: E402

ALL = pytest.mark.parametrize("name", twins.TWIN_NAMES)


def _keys(path):
    with safe_open(str(path), "pt") as f:
        return list(f.keys())


def _tensors(path):
    out = {}
    with safe_open(str(path), "pt") as f:
        for k in f.keys():
            out[k] = f.get_tensor(k)
    return out


def _config(model_dir):
    return json.loads((model_dir / "config.json").read_text())


def _text_config(cfg):
    return cfg.get("text_config", cfg)


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits.float()


# ---------------------------------------------------------------------------------------------
# checkpoint folder
# ---------------------------------------------------------------------------------------------


@ALL
def test_checkpoint_folder_looks_like_a_hub_checkpoint(twin_factory, name):
    twin = twin_factory.get(name)
    files = {p.name for p in twin.model_dir.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
    assert not any(f.endswith(".bin") for f in files)
    if name.startswith("gemma"):
        assert "tokenizer.model" in files
    if twin.is_vision:
        assert "preprocessor_config.json" in files
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in twin.adapter_dir.iterdir()}
    cfg = _config(twin.model_dir)
    assert cfg["architectures"] == [twin.model_class.__name__]
    assert twins.twin_name_of(twin.model_dir) == name
    assert twin.is_vision == (name in ("gemma3_vision", "mllama"))


@ALL
def test_config_ids_match_tokenizer(twin_factory, name):
    twin = twin_factory.get(name)
    tok = twins.load_tokenizer(twin)
    cfg = _config(twin.model_dir)
    text_cfg = _text_config(cfg)
    gen = json.loads((twin.model_dir / "generation_config.json").read_text())

    assert text_cfg["vocab_size"] == len(tok)
    # config.json omits ids equal to the class defaults (Gemma3 text_config), so read the loaded config.
    from transformers import AutoConfig

    loaded = AutoConfig.from_pretrained(twin.model_dir).get_text_config()
    assert loaded.vocab_size == len(tok)
    assert loaded.bos_token_id == gen["bos_token_id"] == tok.bos_token_id
    assert loaded.pad_token_id == gen["pad_token_id"] == tok.pad_token_id
    for c in (cfg, text_cfg):  # where the file does spell them out, they agree too
        assert c.get("bos_token_id", tok.bos_token_id) == tok.bos_token_id
        assert c.get("pad_token_id", tok.pad_token_id) == tok.pad_token_id
    eos = gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]
    assert tok.eos_token_id in eos

    if name == "llama":
        assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>")
        assert tok.convert_tokens_to_ids("<|endoftext|>") == 0
        assert cfg["tie_word_embeddings"] is True
    elif name.startswith("gemma"):
        assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
        assert tok.convert_tokens_to_ids("<end_of_turn>") in eos
    if name == "gemma2":
        assert text_cfg["attn_logit_softcapping"] == 50.0 and text_cfg["final_logit_softcapping"] == 30.0
        assert text_cfg["query_pre_attn_scalar"] == text_cfg["head_dim"]
        assert text_cfg["head_dim"] * text_cfg["num_attention_heads"] != text_cfg["hidden_size"]
        assert "sliding_attention" in text_cfg["layer_types"]
    if name == "gemma3_vision":
        assert cfg["image_token_index"] == tok.convert_tokens_to_ids("<image_soft_token>") == tok.image_token_id
        assert cfg["boi_token_index"] == tok.convert_tokens_to_ids("<start_of_image>")
        assert cfg["eoi_token_index"] == tok.convert_tokens_to_ids("<end_of_image>")
    if name == "mllama":
        assert cfg["image_token_index"] == tok.convert_tokens_to_ids("<|image|>") == len(tok) - 1
        assert text_cfg["cross_attention_layers"]
        assert tok.eos_token == "<|eot_id|>"
        assert tok.convert_tokens_to_ids("<|end_of_text|>") in eos


# ---------------------------------------------------------------------------------------------
# tokenizer / processor
# ---------------------------------------------------------------------------------------------

ROUNDTRIP = "IMPRESSION: No acute cardiopulmonary process.  Tabs\tand ünïcode 你好, 6 mm nodule!\n"


@ALL
def test_tokenizer_roundtrip_and_chat_template(twin_factory, name):
    from transformers import AutoTokenizer

    twin = twin_factory.get(name)
    tok = AutoTokenizer.from_pretrained(twin.model_dir)
    assert tok.is_fast
    ids = tok(ROUNDTRIP, add_special_tokens=False).input_ids
    assert tok.decode(ids) == ROUNDTRIP
    assert max(ids) < len(tok)
    assert tok.chat_template

    messages = [{"role": "user", "content": "Summarize the report."}]
    rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if name == "llama":
        assert rendered.endswith("<|im_start|>user\nSummarize the report.<|im_end|>\n<|im_start|>assistant\n")
        specials = ["<|im_start|>", "<|im_end|>"]
    elif name.startswith("gemma"):
        assert rendered == "<bos><start_of_turn>user\nSummarize the report.<end_of_turn>\n<start_of_turn>model\n"
        specials = ["<start_of_turn>", "<end_of_turn>"]
        assert tok(ROUNDTRIP).input_ids[0] == tok.bos_token_id  # Gemma prepends <bos>
    else:
        assert rendered.startswith("<|begin_of_text|>")
        assert rendered.endswith("<|start_header_id|>user<|end_header_id|>\n\nSummarize the report.<|eot_id|>"
                                 "<|start_header_id|>assistant<|end_header_id|>\n\n")
        specials = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|image|>"]
        assert tok(ROUNDTRIP).input_ids[0] == tok.bos_token_id  # Llama 3 prepends <|begin_of_text|>
    for s in specials:  # every special is one token, not split into bytes
        assert tok(s, add_special_tokens=False).input_ids == [tok.convert_tokens_to_ids(s)]
    if name.startswith("gemma"):  # tokenizer.model (read by GGUF converters) agrees with tokenizer.json
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(twin.model_dir / "tokenizer.model"))
        assert sp.get_piece_size() == len(tok)
        assert [sp.id_to_piece(i) for i in range(4)] == ["<pad>", "<eos>", "<bos>", "<unk>"]
        assert sp.piece_to_id("<start_of_turn>") == tok.convert_tokens_to_ids("<start_of_turn>")
        assert sp.decode(sp.encode(ROUNDTRIP)) == ROUNDTRIP
    if name == "gemma2":
        with pytest.raises(Exception):
            tok.apply_chat_template([{"role": "system", "content": "x"}, *messages], tokenize=False)


@pytest.mark.parametrize("name", ["gemma3_vision", "mllama"])
def test_processor_loads_offline_and_expands_images(twin_factory, name):
    from transformers import AutoProcessor

    twin = twin_factory.get(name)
    proc = AutoProcessor.from_pretrained(twin.model_dir)
    cfg = _config(twin.model_dir)
    vision = cfg["vision_config"]
    assert proc.image_processor.size == {"height": vision["image_size"], "width": vision["image_size"]}

    messages = twins.sample_messages(name)
    rendered = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = twins.sample_inputs(name, twin.model_dir)
    n_image_tokens = int((inputs["input_ids"] == cfg["image_token_index"]).sum())
    if name == "gemma3_vision":
        assert type(proc).__name__ == "Gemma3Processor"
        assert "<start_of_image>" in rendered
        assert proc.image_seq_length == cfg["mm_tokens_per_image"] == n_image_tokens
        assert tuple(inputs["pixel_values"].shape) == (1, 3, vision["image_size"], vision["image_size"])
    else:
        assert type(proc).__name__ == "MllamaProcessor"
        assert "<|image|>" in rendered
        assert n_image_tokens == 1
        assert {"aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask"} <= set(inputs)
        assert inputs["pixel_values"].shape[2] == vision["max_num_tiles"]
    assert proc.tokenizer.decode(proc.tokenizer(ROUNDTRIP, add_special_tokens=False).input_ids) == ROUNDTRIP


# ---------------------------------------------------------------------------------------------
# model + adapter
# ---------------------------------------------------------------------------------------------


@ALL
def test_base_forward_gives_finite_logits(twin_factory, name):
    twin = twin_factory.get(name)
    model = twins.load_base(twin)
    assert type(model) is twin.model_class and not model.training
    inputs = twins.sample_inputs(name, twin.model_dir)
    logits = _logits(model, inputs)
    vocab = _text_config(_config(twin.model_dir))["vocab_size"]
    assert logits.shape == (1, inputs["input_ids"].shape[1], vocab)
    assert torch.isfinite(logits).all()
    assert logits.std() > 0


@ALL
def test_adapter_loads_and_changes_logits(twin_factory, name):
    from peft import PeftModel

    twin = twin_factory.get(name)
    inputs = twins.sample_inputs(name, twin.model_dir)
    model = twins.load_base(twin)
    before = _logits(model, inputs)
    peft_model = PeftModel.from_pretrained(model, twin.adapter_dir)
    peft_model.eval()
    after = _logits(peft_model, inputs)
    assert torch.isfinite(after).all()
    assert (after - before).abs().max() > 1e-3

    saved = _tensors(twin.adapter_dir / "adapter_model.safetensors")
    assert all(v.abs().max() > 0 for k, v in saved.items() if ".lora_B." in k)  # non-zero B
    adapter_cfg = json.loads((twin.adapter_dir / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == twin.lora_kwargs["r"] and adapter_cfg["lora_alpha"] == twin.lora_kwargs["lora_alpha"]


def _modules(keys):
    return {re.sub(r"\.lora_[AB]\.weight$", "", k) for k in keys}


@ALL
def test_adapter_keys_cover_exactly_the_intended_modules(twin_factory, name):
    twin = twin_factory.get(name)
    keys = _keys(twin.adapter_dir / "adapter_model.safetensors")
    assert keys and all(k.startswith("base_model.model.") for k in keys)
    assert all(re.search(r"\.lora_[AB]\.weight$", k) for k in keys)
    leaves = {m.rsplit(".", 1)[-1] for m in _modules(keys)}
    all_proj = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    n_layers = _text_config(_config(twin.model_dir))["num_hidden_layers"]

    if name == "gemma2":
        assert leaves == {"q_proj", "v_proj"}
        assert len(_modules(keys)) == 2 * n_layers
    elif name in ("llama", "gemma3"):
        assert leaves == all_proj
        assert len(_modules(keys)) == 7 * n_layers
    elif name == "gemma3_vision":
        assert leaves == all_proj
        assert all(".language_model." in k for k in keys)
        assert not any("vision" in k or "multi_modal" in k for k in keys)
        assert len(_modules(keys)) == 7 * n_layers
    elif name == "mllama":
        vision = [k for k in keys if ".vision_model." in k]
        language = [k for k in keys if ".language_model." in k]
        assert vision and language and len(vision) + len(language) == len(keys)
        assert {m.rsplit(".", 1)[-1] for m in _modules(vision)} == {"q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"}
        assert {m.rsplit(".", 1)[-1] for m in _modules(language)} == all_proj
        assert any(".global_transformer." in k for k in vision)
        assert any(".cross_attn." in k for k in language)
        assert not any("multi_modal_projector" in k for k in keys)


@pytest.mark.parametrize("name", ["gemma3_vision", "mllama"])
def test_image_reaches_the_logits(twin_factory, name):
    twin = twin_factory.get(name)
    model = twins.load_base(twin)
    inputs = twins.sample_inputs(name, twin.model_dir)
    other = dict(inputs, pixel_values=inputs["pixel_values"].flip(-1) * 0.5)
    assert (_logits(model, inputs) - _logits(model, other)).abs().max() > 1e-4


def test_mllama_vision_only_lora_changes_logits(twin_factory):
    from peft import PeftModel

    twin = twin_factory.get("mllama", target_modules=["fc1", "fc2"])  # only the ViT has fc1/fc2
    assert all(".vision_model." in k for k in _keys(twin.adapter_dir / "adapter_model.safetensors"))
    inputs = twins.sample_inputs("mllama", twin.model_dir)
    model = twins.load_base(twin)
    before = _logits(model, inputs)
    after = _logits(PeftModel.from_pretrained(model, twin.adapter_dir).eval(), inputs)
    assert (after - before).abs().max() > 1e-5


# ---------------------------------------------------------------------------------------------
# builder options
# ---------------------------------------------------------------------------------------------


def test_build_is_deterministic(tmp_path):
    a = twins.build_base("gemma2", tmp_path / "a", seed=3)
    b = twins.build_base("gemma2", tmp_path / "b", seed=3)
    c = twins.build_base("gemma2", tmp_path / "c", seed=4)
    ta, tb, tc = (_tensors(d / "model.safetensors") for d in (a, b, c))
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert any(not torch.equal(ta[k], tc[k]) for k in ta)
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()
    aa = twins.build_adapter("gemma2", a, tmp_path / "aa", seed=5)
    ab = twins.build_adapter("gemma2", a, tmp_path / "ab", seed=5)
    sa, sb = _tensors(aa / "adapter_model.safetensors"), _tensors(ab / "adapter_model.safetensors")
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_sharded_bf16_base(tmp_path):
    d = twins.build_base("llama", tmp_path / "base", dtype=torch.bfloat16, max_shard_size="40KB")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (d / "model.safetensors").exists()
    assert all(t.dtype == torch.bfloat16 for s in shards for t in _tensors(d / s).values())
    assert _config(d)["dtype"] == "bfloat16"
    model = twins.load_base(d)
    assert next(model.parameters()).dtype == torch.float32
    assert torch.isfinite(_logits(model, twins.sample_inputs("llama", d))).all()


@pytest.mark.parametrize("adapter_dtype", [torch.float16, torch.bfloat16])
def test_adapter_dtype(twin_factory, adapter_dtype):
    twin = twin_factory.get("llama", adapter_dtype=adapter_dtype)
    saved = _tensors(twin.adapter_dir / "adapter_model.safetensors")
    assert saved and all(t.dtype == adapter_dtype for t in saved.values())


def test_lora_overrides_are_honoured(twin_factory):
    from peft import PeftModel

    twin = twin_factory.get(
        "llama",
        use_rslora=True,
        use_dora=True,
        rank_pattern={"down_proj": 4},
        alpha_pattern={"down_proj": 8},
        modules_to_save=["lm_head"],
    )
    cfg = json.loads((twin.adapter_dir / "adapter_config.json").read_text())
    assert cfg["use_rslora"] and cfg["use_dora"]
    assert cfg["rank_pattern"] == {"down_proj": 4} and cfg["alpha_pattern"] == {"down_proj": 8}
    assert twin.lora_kwargs["use_dora"] is True
    saved = _tensors(twin.adapter_dir / "adapter_model.safetensors")
    assert any("lora_magnitude_vector" in k for k in saved)
    assert any("lm_head" in k for k in saved)
    assert all(v.shape[0] == 4 for k, v in saved.items() if "down_proj.lora_A" in k)
    inputs = twins.sample_inputs("llama", twin.model_dir)
    model = twins.load_base(twin)
    before = _logits(model, inputs)
    after = _logits(PeftModel.from_pretrained(model, twin.adapter_dir).eval(), inputs)
    assert torch.isfinite(after).all() and (after - before).abs().max() > 1e-3
