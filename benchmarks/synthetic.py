#!/usr/bin/env python3
"""Synthetic checkpoints of the real shapes (issue #12): random bf16 weights, real architectures, seed-recipe LoRAs.

``python benchmarks/synthetic.py --model gemma3-4b|gemma2-2b|mllama-11b [--out DIR] [--scale full|tiny]``
builds, once (a ``COMPLETE`` marker, written last, holds the build key; ``--rebuild`` forces it):

  DIR/base     config.json (the real transformers config class, saved by it), generation_config.json,
               model-0000N-of-0000M.safetensors shards of at most ``--shard-size`` (default 2 GB) +
               model.safetensors.index.json, tokenizer files with a chat template, README.md; the
               vision models also preprocessor_config.json / processor_config.json (real settings)
  DIR/adapter  a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) of the seed recipe
  DIR/synthetic.json, DIR/README.md   what was built, how long it took, the substitutions below

Default DIR: ``benchmarks/.cache/synthetic/<model>`` (``<model>-tiny`` for ``--scale tiny``).

Weights are random (fixed seed), so these measure time and memory, never quality. Matrices are
N(0, 1) * 0.02; Gemma RMSNorm weights are stored as an offset from 1 (the layer multiplies by
``1 + w``), so they are N(0, 1) * 0.05; other norm weights (LayerNorm, Llama RMSNorm) 1 + N(0, 1) * 0.05;
biases and Mllama's class embedding N(0, 1) * 0.02; Mllama's tanh gates U(0.3, 0.8) (a fresh init
leaves them at 0, which would switch the gated layers off).

How: the model class is instantiated on the meta device (no memory) from the real config class, and its
``state_dict`` gives every tensor name, shape and the tied weights to leave out (the names are then mapped
back to the checkpoint names ``save_pretrained`` writes for the vision models: ``language_model.model.*``,
``vision_tower.*``, ``vision_model.*``, ``multi_modal_projector.*``). Tensors are generated one at a time,
in bf16, and streamed into the shards by xpack's own ``ShardedWriter``: one tensor in memory at a time
(the largest: Gemma 3's 262208 x 2560 embedding, 1.34 GB), never the model. Adapter tensor names come
from PEFT's own target matching (``check_target_module_exists``) over the same meta model, i.e. what
``get_peft_model(...).save_pretrained`` writes (``base_model.model.<module path>.lora_A.weight``, module
paths of transformers 4.57: ``model.language_model.layers.*`` for the vision models). LoRA A and B are
N(0, 1) * 0.01, non-zero, so a merge does real work; saved in float32 (PEFT's default: it upcasts the
adapter of a bf16 model) unless ``--adapter-dtype bf16``.

The shapes (``MODELS``; validated by instantiating the real config classes; parameter counts from the
meta model, tied weights counted once):

  gemma3-4b   Gemma3ForConditionalGeneration (google/gemma-3-4b-it, also MedGemma 4B), 4,300,079,472
              parameters: text 2560 hidden, 34 layers, 10240 MLP, 8 heads / 4 KV, head_dim 256, vocab
              262208, sliding window 1024 on 5 of every 6 layers, rope 1e6 global (linear scaling 8) /
              1e4 local, query_pre_attn_scalar 256, tied embeddings; SigLIP 1152 hidden, 27 layers, 4304
              MLP, 16 heads, 896 px, patch 14, no head; 256 image tokens; image/boi/eoi 262144/255999/256000.
  gemma2-2b   Gemma2ForCausalLM (google/gemma-2-2b-it), 2,614,341,888 parameters: 2304 hidden, 26 layers,
              9216 MLP, 8 heads / 4 KV, head_dim 256, vocab 256000, sliding window 4096 on every other
              layer, softcaps 50 (attention) / 30 (logits), query_pre_attn_scalar 256, tied embeddings.
  mllama-11b  MllamaForConditionalGeneration (meta-llama/Llama-3.2-11B-Vision-Instruct), 10,670,220,835
              parameters: text 4096 hidden, 40 layers of which cross-attention [3, 8, ..., 38], 14336 MLP,
              32 heads / 8 KV, vocab 128256 (+8 embedding rows, as transformers builds it), rope 5e5 with
              llama3 scaling (8, low 1, high 4, original 8192), untied head; vision 1280 hidden, 32 + 8
              global layers, 5120 MLP, 16 heads, 560 px, patch 14, 4 tiles, intermediate layers
              [3, 7, 15, 23, 30], output 7680.

These are the published config.json values as I know them; the counts match the published sizes (4.3B,
2.6B, 10.7B). Not checked against the hub (offline): Gemma 3's ``max_position_embeddings`` (131072, the
class default) and Mllama's vision ``supported_aspect_ratios`` (the class default, which is the 8 ratios
of 4 tiles); neither changes a tensor shape.

Seed recipes of the adapters (r=16): gemma3-4b alpha 16, dropout 0, attention + MLP projections of the
language model only (GemmaXRayAnalyzer: "Language layers, attention modules, MLP modules"; the SigLIP
tower is not adapted, as in that recipe), an Unsloth-style regex; gemma2-2b alpha 32, dropout 0.05,
q_proj and v_proj; mllama-11b alpha 16, dropout 0, vision AND language layers, attention (q/k/v/o, the
cross-attention too) and MLP (gate/up/down; fc1/fc2 in the vision encoder), an Unsloth-style regex
(``FastVisionModel.get_peft_model(finetune_vision_layers=True, finetune_language_layers=True, ...)``).

Tokenizers, offline (substitutions, written into DIR/README.md too):
  gemma3-4b   the real Gemma 3 tokenizer (tokenizer.json + tokenizer.model) of the built-in Gemma 3 270M
              (``demo_base_dir("gemma3")``), which shares it; ``<image_soft_token>`` added as id 262144
              (262145 tokens < 262208 rows, as in the real checkpoint); the real Gemma 3 chat template.
  gemma2-2b   NOT Gemma 2's tokenizer (none offline): SmolLM2's (49152 tokens, ``demo_base_dir("smollm2")``)
              plus <pad> <eos> <bos> <start_of_turn> <end_of_turn> as added tokens 49152-49156, with the
              real Gemma 2 chat template; bos/eos/pad ids follow this tokenizer (real: 2/1/0).
  mllama-11b  NOT Llama 3's tokenizer: SmolLM2's plus the Llama 3.2 Vision special tokens
              (<|begin_of_text|> ... <|image|>) as added tokens 49152-49160, with the Llama 3.2 Vision
              chat template (its tool-calling branches and dated system prompt left out); the
              config's bos/eos/pad and image_token_index follow this tokenizer (real: 128000/128009/128004,
              image 128256).
  Every id of every tokenizer is below the config's vocab_size (checked).

``--scale tiny``: the same classes and code path with tiny widths and few layers (tests).
Prints and records (DIR/synthetic.json) the wall time and the peak RSS (``getrusage`` ru_maxrss) of the build.

Usage:
  .venv/bin/python benchmarks/synthetic.py --model gemma3-4b
  .venv/bin/python benchmarks/synthetic.py --model mllama-11b --scale tiny --out /tmp/mllama-tiny
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import resource
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE] + [str(HERE)]  # last: see _harness.py

import _harness as H  # noqa: E402
from xpack.packager.demo.base_model import demo_base_dir  # noqa: E402
from xpack.packager.demo.models import builtin_model, chat_template  # noqa: E402
from xpack.packager.io.tensors import ShardedWriter, TensorSpec, plan_shards  # noqa: E402

VERSION = 1  # bump when the builder's output changes: cached builds are rebuilt
DEFAULT_SHARD_BYTES = 2 * 10**9
DEFAULT_SEED = 1234
MIN_FREE_AFTER = 8 * 2**30  # a full build refuses to leave less free disk than this

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
_ATTN_MLP = "q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj"

# --------------------------------------------------------------------------------------------------
# The real shapes, one row per model: keyword arguments of the real config classes ("text", "vision",
# "top": Gemma3Config/MllamaConfig's own), the tiny overrides, the seed LoRA, the expected count.
# --------------------------------------------------------------------------------------------------

MODELS: dict[str, dict] = {
    "gemma3-4b": {
        "class": "Gemma3ForConditionalGeneration",
        "real": "google/gemma-3-4b-it",
        "text": dict(
            hidden_size=2560, num_hidden_layers=34, intermediate_size=10240, num_attention_heads=8,
            num_key_value_heads=4, head_dim=256, vocab_size=262208, sliding_window=1024, sliding_window_pattern=6,
            rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, rope_scaling={"rope_type": "linear", "factor": 8.0},
            query_pre_attn_scalar=256, max_position_embeddings=131072, rms_norm_eps=1e-6,
            hidden_activation="gelu_pytorch_tanh", attn_logit_softcapping=None, final_logit_softcapping=None,
            tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=2,
        ),
        "vision": dict(
            hidden_size=1152, num_hidden_layers=27, intermediate_size=4304, num_attention_heads=16, image_size=896,
            patch_size=14, num_channels=3, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vision_use_head=False,
        ),
        "top": dict(mm_tokens_per_image=256, image_token_index=262144, boi_token_index=255999, eoi_token_index=256000,
                    pad_token_id=0, bos_token_id=2, eos_token_id=[1, 106], initializer_range=0.02),
        "tiny": {
            "text": dict(hidden_size=64, num_hidden_layers=6, intermediate_size=128, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=32, sliding_window=16),
            "vision": dict(hidden_size=32, num_hidden_layers=2, intermediate_size=64, num_attention_heads=2,
                           image_size=32, patch_size=8),
            "top": dict(mm_tokens_per_image=4),
        },
        "lora": dict(r=16, lora_alpha=16, lora_dropout=0.0,
                     target_modules=rf".*language_model.*\.(?:self_attn|mlp)\.(?:{_ATTN_MLP})"),
        "recipe": "GemmaXRayAnalyzer: r=16, alpha=16, language layers' attention + MLP projections",
        "generation": dict(bos_token_id=2, eos_token_id=[1, 106], pad_token_id=0, do_sample=True, top_k=64,
                           top_p=0.95, cache_implementation="hybrid"),
        "parameters": 4_300_079_472,
    },
    "gemma2-2b": {
        "class": "Gemma2ForCausalLM",
        "real": "google/gemma-2-2b-it",
        "text": dict(
            hidden_size=2304, num_hidden_layers=26, intermediate_size=9216, num_attention_heads=8,
            num_key_value_heads=4, head_dim=256, vocab_size=256000, sliding_window=4096,
            attn_logit_softcapping=50.0, final_logit_softcapping=30.0, query_pre_attn_scalar=256,
            max_position_embeddings=8192, rope_theta=10_000.0, rms_norm_eps=1e-6,
            hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
        ),
        "tiny": {
            "text": dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=32, sliding_window=16,
                         vocab_size=49216),
        },
        "lora": dict(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "v_proj"]),
        "recipe": "Gemma 2 2B medical fine-tune: r=16, alpha=32, dropout 0.05, q_proj + v_proj",
        "generation": dict(cache_implementation="hybrid"),  # + the substitute tokenizer's ids
        "parameters": 2_614_341_888,
    },
    "mllama-11b": {
        "class": "MllamaForConditionalGeneration",
        "real": "meta-llama/Llama-3.2-11B-Vision-Instruct",
        "text": dict(
            hidden_size=4096, num_hidden_layers=40, cross_attention_layers=[3, 8, 13, 18, 23, 28, 33, 38],
            intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
            rope_theta=500_000.0, rope_scaling=_LLAMA3_ROPE, max_position_embeddings=131072, rms_norm_eps=1e-5,
            hidden_act="silu", tie_word_embeddings=False,
        ),
        "vision": dict(
            hidden_size=1280, num_hidden_layers=32, num_global_layers=8, intermediate_size=5120, attention_heads=16,
            image_size=560, patch_size=14, max_num_tiles=4, intermediate_layers_indices=[3, 7, 15, 23, 30],
            vision_output_dim=7680, num_channels=3, hidden_act="gelu", norm_eps=1e-5,
        ),
        "top": dict(image_token_index=128256),
        "tiny": {
            "text": dict(hidden_size=64, num_hidden_layers=5, cross_attention_layers=[1, 3], intermediate_size=128,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=49216),
            "vision": dict(hidden_size=32, num_hidden_layers=4, num_global_layers=1, intermediate_size=64,
                           attention_heads=2, image_size=16, patch_size=4, intermediate_layers_indices=[1, 3],
                           vision_output_dim=96),
        },
        "lora": dict(r=16, lora_alpha=16, lora_dropout=0.0,
                     target_modules=rf".*(?:vision_model|language_model).*\.(?:self_attn|cross_attn|mlp)\.(?:{_ATTN_MLP}|fc1|fc2)"),
        "recipe": "Unsloth FastVisionModel recipe: r=16, alpha=16, vision + language layers, attention + MLP",
        "generation": dict(do_sample=True, temperature=0.6, top_p=0.9),  # + the substitute tokenizer's ids
        "parameters": 10_670_220_835,
    },
}
MODEL_NAMES = tuple(MODELS)
SCALES = ("full", "tiny")

# --------------------------------------------------------------------------------------------------
# Tokenizers and chat templates
# --------------------------------------------------------------------------------------------------

# gemma-2-2b-it's chat template, as published.
GEMMA2_CHAT_TEMPLATE = chat_template("gemma2.jinja")
# Llama 3.2 Vision's: header/eot framing, <|image|> per image part, no system turn when an image is given
# (the published one also has tool-calling branches and a dated default system prompt: left out).
MLLAMA_CHAT_TEMPLATE = chat_template("mllama.jinja")
GEMMA2_ADDED = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]
LLAMA3_ADDED = ["<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<|start_header_id|>",
                "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>", "<|image|>"]
GEMMA3_IMAGE_TOKENS = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}

SUBSTITUTIONS = {
    "gemma3-4b": "Tokenizer: the real Gemma 3 tokenizer (shared by Gemma 3 270M, from xpack's built-in model), "
                 "with <image_soft_token> added as id 262144 as in gemma-3-4b-it; the real Gemma 3 chat template.",
    "gemma2-2b": "Tokenizer: NOT Gemma 2's (none is available offline). SmolLM2's byte-level BPE tokenizer (49152 "
                 "tokens) plus <pad> <eos> <bos> <start_of_turn> <end_of_turn> as added tokens 49152-49156, with the "
                 "real Gemma 2 chat template. bos/eos/pad ids in config.json and generation_config.json follow this "
                 "tokenizer (real Gemma 2: bos 2, eos 1 / <end_of_turn> 107, pad 0). All ids < vocab_size 256000.",
    "mllama-11b": "Tokenizer: NOT Llama 3's (none is available offline). SmolLM2's byte-level BPE tokenizer (49152 "
                  "tokens) plus the Llama 3.2 Vision special tokens (<|begin_of_text|> ... <|image|>) as added tokens "
                  "49152-49160, with the Llama 3.2 Vision chat template (tool calling and the dated default system "
                  "prompt left out). bos/eos/pad and image_token_index follow this tokenizer (real: bos 128000, "
                  "eos 128001/128008/128009, pad 128004, image 128256). All ids < vocab_size 128256.",
}


def _load_tokenizer(name: str):
    """(tokenizer, chat template, {token: id}) of ``name``, built from the built-in demo models' files."""
    from transformers import AutoTokenizer

    if name == "gemma3-4b":
        tok = AutoTokenizer.from_pretrained(demo_base_dir("gemma3"), extra_special_tokens=dict(GEMMA3_IMAGE_TOKENS))
        if GEMMA3_IMAGE_TOKENS["image_token"] not in tok.get_vocab():
            tok.add_tokens([GEMMA3_IMAGE_TOKENS["image_token"]], special_tokens=True)
        template = builtin_model("gemma3").chat_template
        named = ["<pad>", "<eos>", "<bos>", "<end_of_turn>", *GEMMA3_IMAGE_TOKENS.values()]
    else:
        tok = AutoTokenizer.from_pretrained(demo_base_dir("smollm2"))
        added = GEMMA2_ADDED if name == "gemma2-2b" else LLAMA3_ADDED
        tok.add_tokens(added, special_tokens=True)
        if name == "gemma2-2b":
            tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token = "<bos>", "<eos>", "<pad>", None
            template = GEMMA2_CHAT_TEMPLATE
        else:
            tok.bos_token, tok.eos_token, tok.pad_token = "<|begin_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>"
            tok.unk_token = None
            template = MLLAMA_CHAT_TEMPLATE
        named = added
    tok.chat_template = template
    vocab = tok.get_vocab()
    ids = {t: vocab[t] for t in named}
    return tok, template, ids


def _token_settings(name: str, ids: dict[str, int]) -> tuple[dict, dict, dict]:
    """(text config, top config, generation config) settings that follow the tokenizer's ids."""
    if name == "gemma3-4b":
        want = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<end_of_turn>": 106, "<start_of_image>": 255999,
                "<end_of_image>": 256000, "<image_soft_token>": 262144}
        if ids != want:
            raise RuntimeError(f"the Gemma 3 tokenizer's special ids {ids} are not gemma-3-4b-it's {want}")
        return {}, {}, {}
    if name == "gemma2-2b":
        t = dict(pad_token_id=ids["<pad>"], eos_token_id=ids["<eos>"], bos_token_id=ids["<bos>"])
        gen = dict(bos_token_id=ids["<bos>"], eos_token_id=[ids["<eos>"], ids["<end_of_turn>"]], pad_token_id=ids["<pad>"])
        return t, {}, gen
    bos, eot_text, pad, eom, eot = (ids[k] for k in ("<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>",
                                                     "<|eom_id|>", "<|eot_id|>"))
    t = dict(bos_token_id=bos, eos_token_id=eot_text, pad_token_id=pad)
    gen = dict(bos_token_id=bos, eos_token_id=[eot_text, eom, eot], pad_token_id=pad)
    return t, {"image_token_index": ids["<|image|>"]}, gen


# --------------------------------------------------------------------------------------------------
# Configs, the meta model, tensor and adapter specs
# --------------------------------------------------------------------------------------------------


def settings(name: str, scale: str = "full") -> dict:
    """The model's row with the tiny overrides applied (a deep copy)."""
    if name not in MODELS:
        raise SystemExit(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    if scale not in SCALES:
        raise SystemExit(f"unknown scale {scale!r}; choose one of {', '.join(SCALES)}")
    row = copy.deepcopy(MODELS[name])
    if scale == "tiny":
        for part, over in row["tiny"].items():
            row[part].update(copy.deepcopy(over))
    return row


def make_config(name: str, scale: str = "full", text_extra: dict | None = None, top_extra: dict | None = None):
    """The real transformers config object of ``name`` at ``scale``."""
    import torch
    import transformers as tf
    from transformers.models.mllama.configuration_mllama import MllamaTextConfig, MllamaVisionConfig

    row = settings(name, scale)
    text = {**row["text"], **(text_extra or {})}
    if name == "gemma2-2b":
        cfg = tf.Gemma2Config(**text)
    elif name == "gemma3-4b":
        cfg = tf.Gemma3Config(text_config=tf.Gemma3TextConfig(**text), vision_config=tf.SiglipVisionConfig(**row["vision"]),
                              **{**row["top"], **(top_extra or {})})
    else:
        cfg = tf.MllamaConfig(text_config=MllamaTextConfig(**text), vision_config=MllamaVisionConfig(**row["vision"]),
                              **{**row["top"], **(top_extra or {})})
    cfg.architectures = [row["class"]]
    cfg.dtype = torch.bfloat16
    _check_config(name, cfg, {**row, "text": text, "top": {**row.get("top", {}), **(top_extra or {})}})
    return cfg


def _check_config(name: str, cfg, row: dict) -> None:
    """Every value given must have landed in the config object (a renamed argument would be silently kept apart)."""
    parts = [(cfg.get_text_config() if name != "gemma2-2b" else cfg, row["text"])]
    if "vision" in row:
        parts += [(cfg.vision_config, row["vision"]), (cfg, row["top"])]
    for obj, given in parts:
        for k, v in given.items():
            if k == "sliding_window_pattern":  # Gemma 3 keeps it as _sliding_window_pattern and derives layer_types
                got = getattr(obj, "_sliding_window_pattern", None)
                kinds = obj.layer_types
                if got != v or any((kind == "full_attention") != ((i + 1) % v == 0) for i, kind in enumerate(kinds)):
                    raise RuntimeError(f"{name}: sliding window pattern {v} not applied ({got}, {kinds})")
                continue
            if getattr(obj, k, None) != v:
                raise RuntimeError(f"{name}: config {type(obj).__name__}.{k} is {getattr(obj, k, None)!r}, expected {v!r}")


def meta_model(cfg):
    """The model class instantiated on the meta device: names, shapes and dtypes, no memory."""
    import torch
    import transformers as tf

    cls = getattr(tf, cfg.architectures[0])
    with torch.device("meta"):
        model = cls(cfg)
    return model


def count_parameters(model) -> int:
    """Parameters of the model, tied weights once."""
    return sum(p.numel() for p in model.parameters())


def _checkpoint_name(model, key: str) -> str:
    """The name ``save_pretrained`` gives tensor ``key``: the vision models' keys mapped back to their checkpoint format."""
    import re

    from transformers.modeling_utils import VLMS

    mapping = getattr(model, "_checkpoint_conversion_mapping", None) or {}
    if not mapping or not any(v in c.__name__.lower() for c in type(model).__mro__[:-1] for v in VLMS):
        return key
    for pattern, replacement in {v: k for k, v in mapping.items()}.items():
        key, n = re.subn(pattern, re.sub(r"\(.*\)", "", replacement.lstrip("^")), key)
        if n:
            break
    return key


def _init_kind(model, key: str, shape: tuple[int, ...]) -> str:
    """How to fill tensor ``key``: matrix, gemma_norm (offset from 1), norm (around 1), gate, small (biases ...)."""
    prefix, _, leaf = key.rpartition(".")
    module = type(model.get_submodule(prefix)).__name__ if prefix else ""
    if "gate" in leaf and math.prod(shape) <= 8:
        return "gate"
    if len(shape) >= 2:
        return "matrix"
    if leaf == "weight" and "Norm" in module:
        return "gemma_norm" if module.startswith("Gemma") and module.endswith("RMSNorm") else "norm"
    return "small"


def tensor_plan(model) -> list[tuple[str, str, tuple[int, ...]]]:
    """(checkpoint name, kind, shape) of every tensor ``save_pretrained`` would write, in its order, tied weights once."""
    unique = {n for n, _ in model.named_parameters()}
    every = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    plan = []
    for key, t in model.state_dict().items():
        if key in every and key not in unique:  # a tied copy (lm_head of a tied model)
            continue
        shape = tuple(t.shape)
        plan.append((_checkpoint_name(model, key), _init_kind(model, key, shape), shape))
    return plan


def lora_config(name: str, base_path: str = ""):
    from peft import LoraConfig

    return LoraConfig(task_type="CAUSAL_LM", bias="none", inference_mode=True, base_model_name_or_path=base_path,
                      **copy.deepcopy(MODELS[name]["lora"]))


def adapter_plan(model, config) -> list[tuple[str, tuple[int, ...]]]:
    """(key, shape) of every LoRA tensor PEFT would save for ``config`` on ``model``: its own target matching."""
    import torch
    from peft.tuners.tuners_utils import check_target_module_exists

    plan = []
    for mname, module in model.named_modules():
        if mname and check_target_module_exists(config, mname):
            if not isinstance(module, torch.nn.Linear):
                raise RuntimeError(f"LoRA target {mname} is a {type(module).__name__}, not a Linear")
            key = f"base_model.model.{mname}"
            plan += [(f"{key}.lora_A.weight", (config.r, module.in_features)),
                     (f"{key}.lora_B.weight", (module.out_features, config.r))]
    if not plan:
        raise RuntimeError(f"the LoRA targets {config.target_modules!r} match no module")
    return plan


def _adapter_config_json(config) -> dict:
    """adapter_config.json as PEFT's save_pretrained writes it."""
    cfg = config.to_dict()
    if isinstance(cfg.get("target_modules"), (set, list)):
        cfg["target_modules"] = sorted(cfg["target_modules"])
    return json.loads(json.dumps(cfg, default=lambda o: getattr(o, "value", sorted(o) if isinstance(o, set) else str(o))))


# --------------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------------


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _fill(kind: str, shape: tuple[int, ...], gen):
    import torch

    if kind == "matrix":
        return torch.randn(shape, generator=gen, dtype=torch.bfloat16).mul_(0.02)
    if kind == "gate":
        t = 0.3 + 0.5 * torch.rand(shape, generator=gen)
    elif kind == "norm":
        t = 1.0 + 0.05 * torch.randn(shape, generator=gen)
    elif kind == "gemma_norm":
        t = 0.05 * torch.randn(shape, generator=gen)
    else:
        t = 0.02 * torch.randn(shape, generator=gen)
    return t.to(torch.bfloat16)


def _stream(out_dir: Path, tensors: list[tuple[str, tuple[int, ...]]], st_dtype: str, shard_bytes: int, stem: str, make) -> dict:
    """Write ``tensors`` (name, shape) into shards of at most ``shard_bytes``, ``make(i)`` giving the i-th one."""
    import torch

    specs = [TensorSpec(n, st_dtype, s) for n, s in tensors]
    shards = plan_shards(specs, shard_bytes, stem=stem)
    writer = ShardedWriter(out_dir, shards)
    for i, spec in enumerate(specs):
        t = make(i)
        arr = t.view(torch.int16).numpy().view("uint16") if t.dtype == torch.bfloat16 else t.numpy()
        writer.write(spec.name, arr)
        del t, arr
    writer.close()
    return {"files": len(shards), "bytes": sum(s.nbytes for s in specs), "tensors": len(specs),
            "largest_tensor_bytes": max(s.nbytes for s in specs)}


def _write_processor(name: str, tok, template: str, cfg, out: Path) -> None:
    """The tokenizer, and for the vision models their processor with the real preprocessing settings."""
    import transformers as tf

    if name == "gemma2-2b":
        tok.save_pretrained(out)
        return
    common = dict(do_resize=True, resample=2, do_rescale=True, rescale_factor=1 / 255, do_normalize=True)
    if name == "gemma3-4b":
        size = cfg.vision_config.image_size
        ip = tf.Gemma3ImageProcessor(**common, size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                     do_convert_rgb=None, do_pan_and_scan=None, pan_and_scan_min_crop_size=256,
                                     pan_and_scan_max_num_crops=4, pan_and_scan_min_ratio_to_activate=1.2)
        proc = tf.Gemma3Processor(image_processor=ip, tokenizer=tok, chat_template=template, image_seq_length=cfg.mm_tokens_per_image)
    else:
        size = cfg.vision_config.image_size
        ip = tf.MllamaImageProcessor(**common, do_convert_rgb=True, size={"height": size, "width": size},
                                     image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
                                     do_pad=True, max_image_tiles=cfg.vision_config.max_num_tiles)
        proc = tf.MllamaProcessor(image_processor=ip, tokenizer=tok, chat_template=template)
    proc.save_pretrained(out)  # also saves the tokenizer
    if name == "gemma3-4b" and not (out / "tokenizer.model").is_file():
        shutil.copy2(demo_base_dir("gemma3") / "tokenizer.model", out / "tokenizer.model")


def _readme(name: str, scale: str, info: dict) -> str:
    row = MODELS[name]
    return (
        f"# Synthetic {name} ({scale}): RANDOM WEIGHTS\n\n"
        f"Built by `benchmarks/synthetic.py` (xpack issue #12) with the shapes of `{row['real']}` "
        f"(`{row['class']}`, {info['parameters']:,} parameters, bf16). The weights and the LoRA adapter are random "
        "(fixed seed): use this for time and memory measurements only, never for quality.\n\n"
        f"Adapter (`../adapter`): {row['recipe']}; target_modules `{row['lora']['target_modules']}`; "
        f"{info['adapter']['modules']} adapted modules.\n\n"
        f"{SUBSTITUTIONS[name]}\n"
    )


def _key(name: str, scale: str, seed: int, shard_bytes: int, adapter_dtype: str) -> str:
    row = settings(name, scale)
    return json.dumps({"v": VERSION, "model": name, "scale": scale, "seed": seed, "shard_bytes": shard_bytes,
                       "adapter_dtype": adapter_dtype, "text": row["text"], "vision": row.get("vision"), "top": row.get("top"),
                       "lora": row["lora"]}, sort_keys=True)


def default_out(name: str, scale: str) -> Path:
    return H.CACHE / "synthetic" / (name if scale == "full" else f"{name}-{scale}")


def build(name: str, out: Path | None = None, scale: str = "full", *, seed: int = DEFAULT_SEED,
          shard_bytes: int = DEFAULT_SHARD_BYTES, adapter_dtype: str = "fp32", rebuild: bool = False) -> dict:
    """Build (once) ``out/base`` and ``out/adapter``; return the build's info (also ``out/synthetic.json``)."""
    import torch

    out = Path(out) if out is not None else default_out(name, scale)
    key = _key(name, scale, seed, shard_bytes, adapter_dtype)
    stamp = out / "COMPLETE"
    if not rebuild and stamp.is_file() and stamp.read_text() == key:
        info = json.loads((out / "synthetic.json").read_text())
        H.log(f"{name} ({scale}): cached in {out}")
        return {**info, "cached": True}
    if out.exists() and any(out.iterdir()) and not (out / "synthetic.json").is_file() and not stamp.is_file():
        raise SystemExit(f"{out} exists and is not a synthetic checkpoint folder; pass another --out")

    t0, rss0 = time.perf_counter(), _maxrss_mb()
    row = settings(name, scale)
    tok, template, ids = _load_tokenizer(name)
    text_extra, top_extra, gen_extra = _token_settings(name, ids)
    cfg = make_config(name, scale, text_extra, top_extra)
    vocab = cfg.get_text_config().vocab_size
    if max(tok.get_vocab().values()) >= vocab or len(tok) > vocab:
        raise RuntimeError(f"{name}: the tokenizer has ids up to {max(tok.get_vocab().values())}, vocab_size is {vocab}")
    model = meta_model(cfg)
    n_params = count_parameters(model)
    plan = tensor_plan(model)
    base_bytes = sum(math.prod(s) * 2 for _, _, s in plan)
    lcfg = lora_config(name, str((out / "base").resolve()))
    aplan = adapter_plan(model, lcfg)
    a_dtype = {"fp32": ("F32", torch.float32), "bf16": ("BF16", torch.bfloat16)}[adapter_dtype]
    free = shutil.disk_usage(out.parent if out.parent.exists() else H.ROOT).free
    if scale == "full" and free - base_bytes < MIN_FREE_AFTER:
        raise SystemExit(f"{name}: {base_bytes / 1e9:.1f} GB would leave {(free - base_bytes) / 2**30:.1f} GiB free "
                         f"(< {MIN_FREE_AFTER / 2**30:.0f} GiB); free some disk first")
    H.log(f"building {name} ({scale}): {row['class']}, {n_params:,} parameters, {base_bytes / 1e9:.2f} GB bf16 in "
          f"{len(plan)} tensors, adapter {len(aplan) // 2} modules, into {out}")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "base").mkdir(parents=True)
    (tmp / "adapter").mkdir()
    gen = torch.Generator().manual_seed(seed)
    t_w = time.perf_counter()
    base_info = _stream(tmp / "base", [(n, s) for n, _, s in plan], "BF16", shard_bytes, "model",
                        lambda i: _fill(plan[i][1], plan[i][2], gen))
    base_info["write_s"] = round(time.perf_counter() - t_w, 2)
    cfg.save_pretrained(tmp / "base")
    from transformers import GenerationConfig

    GenerationConfig(**{**row["generation"], **gen_extra}).save_pretrained(tmp / "base")
    _write_processor(name, tok, template, cfg, tmp / "base")

    def lora_tensor(i):
        return (torch.randn(aplan[i][1], generator=gen) * 0.01).to(a_dtype[1])

    adapter_info = _stream(tmp / "adapter", aplan, a_dtype[0], 1 << 62, "adapter_model", lora_tensor)
    adapter_info["modules"] = len(aplan) // 2
    (tmp / "adapter" / "adapter_config.json").write_text(json.dumps(_adapter_config_json(lcfg), indent=2, sort_keys=True) + "\n")

    info = {
        "model": name, "scale": scale, "class": row["class"], "real": row["real"], "parameters": n_params,
        "dtype": "bfloat16", "seed": seed, "shard_bytes": shard_bytes, "tokenizer_len": len(tok), "vocab_size": vocab,
        "special_token_ids": ids, "substitutions": SUBSTITUTIONS[name], "recipe": row["recipe"],
        "base": base_info, "adapter": {**adapter_info, "dtype": adapter_dtype, "r": lcfg.r, "lora_alpha": lcfg.lora_alpha,
                                       "target_modules": row["lora"]["target_modules"]},
        "wall_s": round(time.perf_counter() - t0, 2), "peak_rss_mb": round(_maxrss_mb(), 1),
        "rss_before_build_mb": round(rss0, 1),
    }
    readme = _readme(name, scale, info)
    (tmp / "base" / "README.md").write_text(readme)
    (tmp / "README.md").write_text(readme)
    (tmp / "synthetic.json").write_text(json.dumps(info, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.rename(tmp, out)
    stamp.write_text(key)  # last: the folder is complete
    H.log(f"{name} ({scale}) built in {info['wall_s']:.1f}s, peak RSS {info['peak_rss_mb']:.0f} MB "
          f"(before the build {rss0:.0f} MB): base {base_info['bytes'] / 1e9:.2f} GB in {base_info['files']} files, "
          f"adapter {adapter_info['bytes'] / 1e6:.1f} MB")
    return {**info, "cached": False}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, choices=MODEL_NAMES)
    p.add_argument("--out", type=Path, help="folder to build into (default benchmarks/.cache/synthetic/<model>[-tiny])")
    p.add_argument("--scale", choices=SCALES, default="full")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_BYTES, help="max bytes per shard (default 2e9)")
    p.add_argument("--adapter-dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--threads", type=int, default=1, help="torch threads for the random numbers (default 1)")
    p.add_argument("--rebuild", action="store_true", help="build even when the folder is complete")
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(max(1, a.threads))
    info = build(a.model, a.out, a.scale, seed=a.seed, shard_bytes=a.shard_size, adapter_dtype=a.adapter_dtype, rebuild=a.rebuild)
    out = a.out or default_out(a.model, a.scale)
    print(json.dumps({k: info[k] for k in ("model", "scale", "parameters", "wall_s", "peak_rss_mb", "cached")}
                     | {"base_bytes": info["base"]["bytes"], "base_files": info["base"]["files"],
                        "adapter_bytes": info["adapter"]["bytes"], "dir": str(out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
