"""Tiny random-weight "twins" of real checkpoints, built offline, for the test suite.

Each twin is a real transformers architecture (the actual config/model classes, with the real quirks
kept: tied embeddings, Gemma softcapping and sliding windows, multimodal towers, ...) shrunk to a
few layers and a hidden size of 32-64, saved exactly like a Hugging Face checkpoint (safetensors,
config.json, generation_config.json, tokenizer with a chat template, processor for vision models),
plus a PEFT LoRA adapter whose A *and* B matrices are random and non-zero, so that merging it really
changes the model.

Nothing is downloaded: tokenizers are trained here, on the small corpus below (byte-level BPE with
the ``tokenizers`` library for the Llama-family twins, a SentencePiece BPE model with byte fallback
for the Gemma-family twins). Everything is deterministic given the seeds.

The twins are the rows of ``TWINS`` (name -> TwinSpec: transformers class, tokenizer, config and
processor builders, default LoRA); each architecture's settings are a table of plain values.

Public API::

    TWIN_NAMES, TWINS
    Twin                                   # frozen dataclass describing a built twin
    build_base(name, out_dir, *, seed=0, dtype=torch.float32, max_shard_size=None) -> Path
    build_adapter(name, base_dir, out_dir, *, seed=1, adapter_dtype=torch.float32, **lora_overrides) -> Path
    make_twin(name, root, **lora_overrides) -> Twin
    load_base(twin_or_dir, *, dtype=torch.float32, **from_pretrained_kwargs) -> model (eval mode)
    load_tokenizer(twin_or_dir), load_processor(twin_or_dir)
    sample_inputs(name, base_dir) -> dict of tensors for a forward pass
    sample_image(size=...) -> PIL.Image, sample_messages(name) -> chat messages
    default_lora_kwargs(name), model_class(name), twin_name_of(model_dir)

Tests import this module as ``import twins`` (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import copy
import functools
import io
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from xpack.packager.demo.models import builtin_model, chat_template  # noqa: E402

__all__ = [
    "TWIN_NAMES",
    "TWINS",
    "VISION_TWINS",
    "Twin",
    "build_base",
    "build_adapter",
    "make_twin",
    "load_base",
    "load_tokenizer",
    "load_processor",
    "sample_inputs",
    "sample_image",
    "sample_messages",
    "default_lora_kwargs",
    "model_class",
    "twin_name_of",
    "CORPUS",
]

# --------------------------------------------------------------------------------------------------
# Training corpus for the tokenizers: plain English plus radiology-report style text (the domain the
# real fine-tunes target). A few hundred words is enough for a few hundred BPE merges.
# --------------------------------------------------------------------------------------------------

CORPUS = """\
The quick brown fox jumps over the lazy dog. A small model can still learn the shape of a language.
Hello, world! How are you today? I am fine, thank you, and I hope that you are well.
Please summarize the following report in plain language for the patient and the family.
The weather was cold and clear in the morning, and the afternoon brought light rain from the west.
She opened the window, read the letter twice, and then wrote a short answer before lunch.
Numbers such as 1, 2, 3, 10, 42, 100 and 2024 appear in dates, doses and measurements.
Machine learning models are trained on data, evaluated on held-out data, and deployed to edge devices.
An offline machine has no network, so every file it needs must be packed and verified in advance.
You are a helpful assistant. Answer briefly and accurately, and say when you are not sure.
What is the capital of France? The capital of France is Paris. What is two plus two? It is four.

EXAMINATION: Chest radiograph, two views (PA and lateral).
CLINICAL HISTORY: Cough and fever for three days. Rule out pneumonia.
COMPARISON: Prior chest radiograph from last year.
FINDINGS: The lungs are clear without focal consolidation, pleural effusion, or pneumothorax.
The cardiomediastinal silhouette is within normal limits. The heart size is normal.
There is mild degenerative change of the thoracic spine. No acute osseous abnormality is seen.
IMPRESSION: No acute cardiopulmonary process. No radiographic evidence of pneumonia.

EXAMINATION: CT head without contrast.
FINDINGS: There is no intracranial hemorrhage, mass effect, or midline shift. The ventricles and
sulci are normal in size and configuration for age. The gray-white matter differentiation is preserved.
The visualized paranasal sinuses and mastoid air cells are clear. The calvarium is intact.
IMPRESSION: No acute intracranial abnormality.

EXAMINATION: MRI of the right knee.
FINDINGS: There is a horizontal tear of the posterior horn of the medial meniscus. The anterior
cruciate ligament is intact. Small joint effusion. Mild chondral thinning of the medial compartment.
IMPRESSION: Medial meniscal tear. Small effusion. Early degenerative change.

EXAMINATION: Abdominal ultrasound.
FINDINGS: The liver is normal in size with increased echogenicity, consistent with hepatic steatosis.
The gallbladder contains several small mobile stones without wall thickening or pericholecystic fluid.
The common bile duct measures 4 mm. The kidneys are normal in size without hydronephrosis.
IMPRESSION: Cholelithiasis without sonographic evidence of acute cholecystitis. Hepatic steatosis.

Findings: a 6 mm nodule in the right upper lobe, stable compared with the prior study.
Recommend follow-up CT in twelve months according to current guidelines.
Impression: stable pulmonary nodule, likely benign. Clinical correlation is recommended.
The patient tolerated the procedure well. There were no immediate complications.
Describe this image. This is a frontal chest X-ray showing clear lungs and a normal heart.
Is there a fracture? No fracture or dislocation is identified. The alignment is anatomic.
"""


def _corpus_lines() -> list[str]:
    return [line for line in CORPUS.splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------------
# Chat templates (the real ones, lightly trimmed where they carry tool-calling machinery).
# --------------------------------------------------------------------------------------------------

SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

GEMMA2_CHAT_TEMPLATE = chat_template("gemma2.jinja")

# Gemma 3's public instruction template: one home, the built-in Gemma 3 model's (packager/demo/chat_templates/).
GEMMA3_CHAT_TEMPLATE = builtin_model("gemma3").chat_template

# Llama 3.2 Vision: header/eot framing, an `<|image|>` for every image content part, no system
# prompt injected when an image is present (the real template also carries tool-calling branches).
MLLAMA_CHAT_TEMPLATE = chat_template("mllama.jinja")

# --------------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------------

_BPE_VOCAB = 512  # before the special tokens
_SPM_VOCAB = 640  # includes 256 byte pieces + specials

SMOLLM2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA3_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|finetune_right_pad_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|image|>",  # last, like Llama 3.2 Vision (id == text vocab end)
]
GEMMA_TURN_TOKENS = ["<start_of_turn>", "<end_of_turn>"]
GEMMA3_IMAGE_TOKENS = ["<start_of_image>", "<end_of_image>", "<image_soft_token>"]


def _train_byte_level_bpe(special_tokens: list[str]):
    """A byte-level BPE trained on CORPUS, `special_tokens` first in the vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_BPE_VOCAB,
        min_frequency=1,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus_lines(), trainer=trainer)
    return tok


@functools.lru_cache(maxsize=None)
def _smollm2_tokenizer_json() -> str:
    """SmolLM2 layout: the special tokens come first (ids 0, 1, 2). tokenizer.json text, cached per process."""
    from tokenizers import processors

    tok = _train_byte_level_bpe(SMOLLM2_SPECIALS)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok.to_str()


@functools.lru_cache(maxsize=None)
def _llama3_tokenizer_json() -> str:
    """Llama 3 layout: the regular vocabulary first, then the special tokens at the end; a
    post-processor prepends <|begin_of_text|>. tokenizer.json text, cached per process."""
    from tokenizers import processors

    tok = _train_byte_level_bpe([])
    tok.add_special_tokens(LLAMA3_SPECIALS)
    bos_id = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="<|begin_of_text|> $A",
                pair="<|begin_of_text|> $A <|begin_of_text|>:1 $B:1",
                special_tokens=[("<|begin_of_text|>", bos_id)],
            ),
        ]
    )
    return tok.to_str()


SMOLLM2_TOKENIZER = dict(
    bos_token="<|im_start|>",
    eos_token="<|im_end|>",
    unk_token="<|endoftext|>",
    pad_token="<|im_end|>",
    additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    chat_template=SMOLLM2_CHAT_TEMPLATE,
    model_max_length=8192,
    clean_up_tokenization_spaces=False,
    model_input_names=["input_ids", "attention_mask"],
)
LLAMA3_TOKENIZER = dict(
    bos_token="<|begin_of_text|>",
    eos_token="<|eot_id|>",
    pad_token="<|finetune_right_pad_id|>",
    chat_template=MLLAMA_CHAT_TEMPLATE,
    model_input_names=["input_ids", "attention_mask"],
    model_max_length=131072,
    clean_up_tokenization_spaces=True,
)


def _fast_tokenizer(tokenizer_json: str, settings: dict):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tokenizer_json), **copy.deepcopy(settings))


def _smollm2_tokenizer():
    return _fast_tokenizer(_smollm2_tokenizer_json(), SMOLLM2_TOKENIZER)


def _llama3_tokenizer():
    return _fast_tokenizer(_llama3_tokenizer_json(), LLAMA3_TOKENIZER)


@functools.lru_cache(maxsize=None)
def _spm_model_bytes(user_symbols: tuple[str, ...]) -> bytes:
    """Train a Gemma-like SentencePiece BPE model (byte fallback, pad/eos/bos/unk = 0/1/2/3)."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus_lines()),
        model_writer=buf,
        model_type="bpe",
        vocab_size=_SPM_VOCAB,
        hard_vocab_limit=False,
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        user_defined_symbols=list(user_symbols),
        num_threads=1,
        minloglevel=2,
    )
    return buf.getvalue()


def _gemma_tokenizer(chat_template: str, model_max_length: int, *, image_tokens: bool = False):
    """A Gemma tokenizer; with `image_tokens`, Gemma 3's <start_of_image>/<end_of_image>/<image_soft_token> too."""
    from transformers import GemmaTokenizerFast

    symbols = tuple(GEMMA_TURN_TOKENS + (GEMMA3_IMAGE_TOKENS if image_tokens else []))
    extra: dict[str, Any] = {}
    if image_tokens:
        extra["extra_special_tokens"] = {
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        }
    spm_bytes = _spm_model_bytes(symbols)
    with tempfile.TemporaryDirectory() as tmp:
        model_file = Path(tmp) / "tokenizer.model"
        model_file.write_bytes(spm_bytes)
        # With only vocab_file given, GemmaTokenizerFast loads the slow GemmaTokenizer from the
        # .model file and converts it (GemmaConverter), exactly as for an old-style checkpoint.
        fast = GemmaTokenizerFast(
            vocab_file=str(model_file),
            chat_template=chat_template,
            model_max_length=model_max_length,
            additional_special_tokens=list(GEMMA_TURN_TOKENS),
            **extra,
        )
    # The fast tokenizer only saves tokenizer.model if its vocab_file still exists; keep the bytes
    # so _save_tokenizer / build_base can write it next to tokenizer.json like real Gemma repos.
    fast._twin_spm_bytes = spm_bytes  # type: ignore[attr-defined]
    return fast


def _save_tokenizer(tokenizer, out_dir: Path) -> None:
    tokenizer.save_pretrained(out_dir)
    _save_spm_model(tokenizer, out_dir)


def _save_spm_model(tokenizer, out_dir: Path) -> None:
    spm_bytes = getattr(tokenizer, "_twin_spm_bytes", None)
    if spm_bytes is not None:  # real Gemma checkpoints ship tokenizer.model next to tokenizer.json
        (out_dir / "tokenizer.model").write_bytes(spm_bytes)


# --------------------------------------------------------------------------------------------------
# Configs: the real checkpoints' settings, shrunk (one table each), and one builder per architecture
# that fills in the tokenizer's ids.
# --------------------------------------------------------------------------------------------------

# Vision geometry.
GEMMA3_IMAGE_SIZE = 32  # SigLIP tile; patch 8 -> 4x4 patches -> avg-pooled to 2x2 = 4 soft tokens
GEMMA3_PATCH_SIZE = 8
GEMMA3_MM_TOKENS = 4
MLLAMA_IMAGE_SIZE = 16  # per tile; patch 4 -> 16 patches + class token
MLLAMA_PATCH_SIZE = 4
MLLAMA_MAX_TILES = 4

# SmolLM2-135M-Instruct, shrunk.
LLAMA = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    hidden_act="silu",
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    rope_scaling=None,
    attention_bias=False,
    mlp_bias=False,
    tie_word_embeddings=True,
    initializer_range=0.041666666666666664,
)

# What gemma-2 and gemma-3 text models share: sliding/global layers (here 1:1), explicit head_dim
# (not hidden/heads), query_pre_attn_scalar == head_dim, pad/eos/bos = 0/1/2 in the SentencePiece vocab.
GEMMA_PAD, GEMMA_EOS, GEMMA_BOS = 0, 1, 2
_GEMMA_TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    head_dim=32,  # explicit and != hidden_size / heads, like the real gemma-2-2b (2304 / 8 != 256)
    hidden_activation="gelu_pytorch_tanh",
    rms_norm_eps=1e-6,
    attention_bias=False,
    query_pre_attn_scalar=32,
    sliding_window=8,  # shorter than sample prompts so the window matters
    layer_types=["sliding_attention", "full_attention"],
    tie_word_embeddings=True,
    initializer_range=0.02,
    pad_token_id=GEMMA_PAD,
    eos_token_id=GEMMA_EOS,
    bos_token_id=GEMMA_BOS,
)
# gemma-2-2b-it, shrunk: soft-capping of attention and final logits.
GEMMA2 = dict(
    _GEMMA_TEXT,
    num_key_value_heads=2,
    max_position_embeddings=8192,
    rope_theta=10000.0,
    final_logit_softcapping=30.0,
    attn_logit_softcapping=50.0,
)
# gemma-3-1b-it, shrunk: dual rope bases (global / local), q/k norms, no softcapping.
GEMMA3_TEXT = dict(
    _GEMMA_TEXT,
    num_key_value_heads=1,
    max_position_embeddings=32768,
    rope_theta=1_000_000.0,
    rope_local_base_freq=10_000.0,
    rope_scaling=None,
    final_logit_softcapping=None,
    attn_logit_softcapping=None,
)
GEMMA3_SAMPLING = dict(do_sample=True, top_k=64, top_p=0.95)
# MedGemma 4b / gemma-3-4b-it, shrunk: SigLIP tower + avg-pool projector + the Gemma 3 text model
# with linear rope scaling.
GEMMA3_VISION_ROPE = {"rope_type": "linear", "factor": 8.0}
SIGLIP = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_channels=3,
    image_size=GEMMA3_IMAGE_SIZE,
    patch_size=GEMMA3_PATCH_SIZE,
    hidden_act="gelu_pytorch_tanh",
    layer_norm_eps=1e-6,
    attention_dropout=0.0,
    vision_use_head=False,
)
GEMMA3_VISION = dict(mm_tokens_per_image=GEMMA3_MM_TOKENS, initializer_range=0.02)

# Llama-3.2-11B-Vision(-Instruct), shrunk: tiled ViT with local + gated global encoder and
# intermediate-layer features, cross-attention decoder layers interleaved in the text stack.
MLLAMA_VISION = dict(
    hidden_size=32,
    hidden_act="gelu",
    num_hidden_layers=2,
    num_global_layers=1,
    num_attention_heads=2,
    num_channels=3,
    intermediate_size=64,
    vision_output_dim=32 * 3,  # hidden_size x (the 2 intermediate layers + the last)
    image_size=MLLAMA_IMAGE_SIZE,
    patch_size=MLLAMA_PATCH_SIZE,
    norm_eps=1e-5,
    max_num_tiles=MLLAMA_MAX_TILES,
    intermediate_layers_indices=[0, 1],
)
MLLAMA_TEXT = dict(
    hidden_size=64,
    hidden_act="silu",
    num_hidden_layers=3,
    cross_attention_layers=[1],
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    rope_theta=500000.0,
    rope_scaling={
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    rms_norm_eps=1e-5,
    max_position_embeddings=131072,
    tie_word_embeddings=False,
)
MLLAMA_SAMPLING = dict(temperature=0.6, top_p=0.9, do_sample=True)


def _ids(tokenizer, *tokens: str) -> list[int]:
    out = []
    for t in tokens:
        i = tokenizer.convert_tokens_to_ids(t)
        if i is None or (i == tokenizer.unk_token_id and t != tokenizer.unk_token):
            raise RuntimeError(f"token {t!r} missing from the twin tokenizer")
        out.append(int(i))
    return out


def _settings(table: dict, **more) -> dict:
    """A fresh copy of a settings table (the config classes keep the lists and dicts they are given), plus `more`."""
    return {**copy.deepcopy(table), **more}


# Each builder takes the twin's tokenizer and returns (config, GenerationConfig kwargs).


def _llama_config(tok):
    import transformers as tf

    bos, eos = _ids(tok, "<|im_start|>", "<|im_end|>")
    ids = dict(bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)
    return tf.LlamaConfig(**_settings(LLAMA, vocab_size=len(tok), **ids)), ids


def _gemma_generation(tok, **sampling) -> dict:
    """Gemma stops at <eos> and at <end_of_turn>."""
    eot = _ids(tok, "<end_of_turn>")[0]
    return dict(bos_token_id=GEMMA_BOS, eos_token_id=[GEMMA_EOS, eot], pad_token_id=GEMMA_PAD, **sampling)


def _gemma2_config(tok):
    import transformers as tf

    cfg = tf.Gemma2Config(**_settings(GEMMA2, vocab_size=len(tok)))
    return cfg, _gemma_generation(tok, cache_implementation="hybrid")


def _gemma3_config(tok):
    import transformers as tf

    return tf.Gemma3TextConfig(**_settings(GEMMA3_TEXT, vocab_size=len(tok))), _gemma_generation(tok, **GEMMA3_SAMPLING)


def _gemma3_vision_config(tok):
    import transformers as tf

    boi, eoi, img = _ids(tok, *GEMMA3_IMAGE_TOKENS)
    gen = _gemma_generation(tok, **GEMMA3_SAMPLING)
    cfg = tf.Gemma3Config(
        text_config=tf.Gemma3TextConfig(**_settings(GEMMA3_TEXT, vocab_size=len(tok), rope_scaling=dict(GEMMA3_VISION_ROPE))),
        vision_config=tf.SiglipVisionConfig(**_settings(SIGLIP)),
        boi_token_index=boi,
        eoi_token_index=eoi,
        image_token_index=img,
        pad_token_id=GEMMA_PAD,
        bos_token_id=GEMMA_BOS,
        eos_token_id=list(gen["eos_token_id"]),
        **GEMMA3_VISION,
    )
    return cfg, gen


def _mllama_config(tok):
    import transformers as tf
    from transformers.models.mllama.configuration_mllama import MllamaTextConfig, MllamaVisionConfig

    bos, eot_text, pad, eom, eot, img = _ids(
        tok, "<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<|eom_id|>", "<|eot_id|>", "<|image|>"
    )
    text = MllamaTextConfig(**_settings(MLLAMA_TEXT, vocab_size=len(tok), bos_token_id=bos, eos_token_id=eot_text, pad_token_id=pad))
    cfg = tf.MllamaConfig(vision_config=MllamaVisionConfig(**_settings(MLLAMA_VISION)), text_config=text, image_token_index=img)
    return cfg, dict(bos_token_id=bos, eos_token_id=[eot_text, eom, eot], pad_token_id=pad, **MLLAMA_SAMPLING)


# Processors of the vision twins: the real preprocessor_config.json settings at the twins' image sizes.
_RESIZE_RESCALE_NORMALIZE = dict(
    do_resize=True,
    resample=2,  # BILINEAR, as in the real preprocessor_config.json files
    do_rescale=True,
    rescale_factor=1 / 255,
    do_normalize=True,
)
GEMMA3_IMAGE_PROCESSOR = dict(
    _RESIZE_RESCALE_NORMALIZE,
    size={"height": GEMMA3_IMAGE_SIZE, "width": GEMMA3_IMAGE_SIZE},
    image_mean=[0.5, 0.5, 0.5],
    image_std=[0.5, 0.5, 0.5],
    do_convert_rgb=None,
    do_pan_and_scan=None,
    pan_and_scan_min_crop_size=256,
    pan_and_scan_max_num_crops=4,
    pan_and_scan_min_ratio_to_activate=1.2,
)
MLLAMA_IMAGE_PROCESSOR = dict(
    _RESIZE_RESCALE_NORMALIZE,
    do_convert_rgb=True,
    size={"height": MLLAMA_IMAGE_SIZE, "width": MLLAMA_IMAGE_SIZE},
    image_mean=[0.48145466, 0.4578275, 0.40821073],
    image_std=[0.26862954, 0.26130258, 0.27577711],
    do_pad=True,
    max_image_tiles=MLLAMA_MAX_TILES,
)


def _gemma3_processor(tok):
    import transformers as tf

    return tf.Gemma3Processor(
        image_processor=tf.Gemma3ImageProcessor(**_settings(GEMMA3_IMAGE_PROCESSOR)),
        tokenizer=tok,
        chat_template=GEMMA3_CHAT_TEMPLATE,
        image_seq_length=GEMMA3_MM_TOKENS,
    )


def _mllama_processor(tok):
    import transformers as tf

    return tf.MllamaProcessor(
        image_processor=tf.MllamaImageProcessor(**_settings(MLLAMA_IMAGE_PROCESSOR)), tokenizer=tok, chat_template=MLLAMA_CHAT_TEMPLATE
    )


# --------------------------------------------------------------------------------------------------
# The twins: one row each
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TwinSpec:
    """How one twin is built: the transformers class, and one builder for each part that differs."""

    model_class: str  # transformers class name; also config.json's architectures[0]
    tokenizer: Callable[[], Any]
    config: Callable[[Any], tuple[Any, dict]]  # tokenizer -> (config, GenerationConfig kwargs)
    lora: dict[str, Any]  # the default LoraConfig kwargs (bias="none", task_type="CAUSAL_LM" added)
    processor: Callable[[Any], Any] | None = None  # tokenizer -> processor, for the vision twins


_ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

TWINS: dict[str, TwinSpec] = {
    "llama": TwinSpec(
        "LlamaForCausalLM",
        _smollm2_tokenizer,
        _llama_config,
        # SmolLM2 fine-tune: every linear of the decoder.
        lora=dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=list(_ALL_PROJ)),
    ),
    "gemma2": TwinSpec(
        "Gemma2ForCausalLM",
        functools.partial(_gemma_tokenizer, GEMMA2_CHAT_TEMPLATE, 8192),
        _gemma2_config,
        # Mirrors the real seed fine-tune of gemma-2: attention q/v only, with dropout.
        lora=dict(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "v_proj"]),
    ),
    "gemma3": TwinSpec(
        "Gemma3ForCausalLM",
        functools.partial(_gemma_tokenizer, GEMMA3_CHAT_TEMPLATE, 131072),
        _gemma3_config,
        lora=dict(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=list(_ALL_PROJ)),
    ),
    "gemma3_vision": TwinSpec(
        "Gemma3ForConditionalGeneration",
        functools.partial(_gemma_tokenizer, GEMMA3_CHAT_TEMPLATE, 131072, image_tokens=True),
        _gemma3_vision_config,
        # Unsloth-style language-only regex for a vision model: the SigLIP tower is left alone.
        lora=dict(
            r=16,
            lora_alpha=16,
            lora_dropout=0.0,
            target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
        ),
        processor=_gemma3_processor,
    ),
    "mllama": TwinSpec(
        "MllamaForConditionalGeneration",
        _llama3_tokenizer,
        _mllama_config,
        # Vision and language layers both adapted (ViT MLP is fc1/fc2).
        lora=dict(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=_ALL_PROJ + ["fc1", "fc2"]),
        processor=_mllama_processor,
    ),
}
TWIN_NAMES = tuple(TWINS)
VISION_TWINS = frozenset(name for name, spec in TWINS.items() if spec.processor is not None)


def _spec(name: str) -> TwinSpec:
    if name not in TWINS:
        raise KeyError(f"unknown twin {name!r}; expected one of {TWIN_NAMES}")
    return TWINS[name]


def default_lora_kwargs(name: str) -> dict[str, Any]:
    """The twin's default LoraConfig kwargs (a fresh copy)."""
    kw = copy.deepcopy(_spec(name).lora)
    kw.setdefault("bias", "none")
    kw.setdefault("task_type", "CAUSAL_LM")
    return kw


# --------------------------------------------------------------------------------------------------
# Public builders
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Twin:
    name: str
    model_dir: Path  # base checkpoint folder
    adapter_dir: Path  # PEFT adapter folder (adapter_config.json + adapter_model.safetensors)
    model_class: type  # transformers class that loads model_dir
    lora_kwargs: dict = field(hash=False)  # the LoraConfig kwargs used for the adapter
    is_vision: bool = False


def model_class(name: str) -> type:
    import transformers as tf

    return getattr(tf, _spec(name).model_class)


def build_base(
    name: str,
    out_dir: Path,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | None = None,
) -> Path:
    """Build the random-weight base checkpoint of twin `name` into `out_dir` and return it.

    The folder holds safetensors weights (sharded with an index when `max_shard_size` is given,
    e.g. "20KB"), config.json, generation_config.json, the tokenizer (tokenizer.json,
    tokenizer_config.json with the chat template, special_tokens_map.json, plus tokenizer.model for
    the Gemma twins) and, for vision twins, preprocessor/processor configs.
    """
    from transformers import GenerationConfig

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = _spec(name)
    tok = spec.tokenizer()
    cfg, gen_kwargs = spec.config(tok)

    torch.manual_seed(seed)
    model = model_class(name)(cfg)
    _make_weights_trained_looking(model, seed)
    model.eval()
    if dtype != torch.float32:
        model = model.to(dtype)
    model.config.dtype = dtype  # recorded in config.json as "dtype" (was torch_dtype)
    model.generation_config = GenerationConfig(**gen_kwargs)

    save_kwargs: dict[str, Any] = {"safe_serialization": True}
    if max_shard_size is not None:
        save_kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(out_dir, **save_kwargs)

    if spec.processor is not None:
        spec.processor(tok).save_pretrained(out_dir)  # also saves the tokenizer
        _save_spm_model(tok, out_dir)
    else:
        _save_tokenizer(tok, out_dir)
    return out_dir


def _make_weights_trained_looking(model, seed: int) -> None:
    """Break the symmetric/zero parts of a fresh init so that every tensor matters.

    A fresh init leaves norms constant (1 or 0), biases zero, Mllama's tanh gates at 0 (cross-attention
    and gated vision layers switched off) and Gemma 3's multimodal projection at 0 (images ignored).
    Trained checkpoints have none of that, and a test that drops or mangles such a tensor must see
    it in the logits. Deterministic given `seed`.
    """
    gen = torch.Generator().manual_seed(10_000 + seed)
    with torch.no_grad():
        for pname, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            leaf = pname.rsplit(".", 1)[-1]
            if "gate" in leaf and p.numel() <= 8:  # mllama tanh gates (gate_attn, cross_attn_mlp_gate, ...)
                p.copy_(0.3 + 0.5 * torch.rand(p.shape, generator=gen))
            elif p.ndim >= 2 and not torch.any(p != 0):  # zero-initialised projections
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            elif p.ndim == 1:  # norm weights, biases, class embeddings
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)


def _randomize_adapter(peft_model, seed: int) -> None:
    """Give every LoRA factor (and modules_to_save copy) deterministic non-zero random values.

    PEFT's default init leaves B == 0 (a no-op adapter). Here A ~ N(0, 1/in_features) and
    B ~ N(0, 0.02^2), so the merged delta is of the same order as the base weights: clearly
    visible in the logits, but not so large that fp16/bf16 merges blow up. DoRA magnitudes are
    scaled by a random factor around 1 so they no longer equal ||W + BA|| (as after training).
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in sorted(peft_model.named_parameters(), key=lambda kv: kv[0]):
            if ".lora_A." in pname or ".lora_embedding_A." in pname:
                fan_in = p.shape[1] if ".lora_A." in pname else p.shape[0]
                fan_in = max(int(fan_in), 1)
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) / fan_in**0.5)
            elif ".lora_B." in pname or ".lora_embedding_B." in pname:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * 0.02)
            elif ".lora_magnitude_vector." in pname:
                p.mul_(1.0 + 0.05 * torch.randn(p.shape, generator=gen, dtype=torch.float32))
            elif ".modules_to_save." in pname:
                p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * 0.01)


def build_adapter(
    name: str,
    base_dir: Path,
    out_dir: Path,
    *,
    seed: int = 1,
    adapter_dtype: torch.dtype = torch.float32,
    **lora_overrides,
) -> Path:
    """Build a PEFT LoRA adapter for the base twin at `base_dir` into `out_dir` and return it.

    `lora_overrides` are merged over the twin's default LoraConfig kwargs (use_rslora=True,
    use_dora=True, rank_pattern=..., alpha_pattern=..., modules_to_save=[...], target_modules=...).
    Weights are cast to `adapter_dtype` (fp32/fp16/bf16) before saving.
    """
    from peft import LoraConfig, get_peft_model

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    kwargs = default_lora_kwargs(name)
    kwargs.update(lora_overrides)

    base = model_class(name).from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(**kwargs))
    _randomize_adapter(peft_model, seed)
    if adapter_dtype != torch.float32:
        for pname, p in peft_model.named_parameters():
            if p.requires_grad:  # adapter-owned weights only (LoRA factors, modules_to_save)
                p.data = p.data.to(adapter_dtype)
    peft_model.save_pretrained(out_dir, safe_serialization=True)
    # Record where the adapter came from, like a real training run does.
    cfg_path = out_dir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = str(base_dir)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    return out_dir


def make_twin(name: str, root: Path, **lora_overrides) -> Twin:
    """Build base (``root/name/base``) and adapter (``root/name/adapter``) for twin `name`."""
    _spec(name)  # an unknown name fails before anything is built
    root = Path(root) / name
    base_dir = build_base(name, root / "base")
    adapter_dir = build_adapter(name, base_dir, root / "adapter", **lora_overrides)
    kw = default_lora_kwargs(name)
    kw.update(lora_overrides)
    return Twin(
        name=name,
        model_dir=base_dir,
        adapter_dir=adapter_dir,
        model_class=model_class(name),
        lora_kwargs=kw,
        is_vision=name in VISION_TWINS,
    )


# --------------------------------------------------------------------------------------------------
# Loading helpers
# --------------------------------------------------------------------------------------------------

_ARCH_TO_TWIN = {spec.model_class: name for name, spec in TWINS.items()}


def _dir_of(twin_or_dir) -> Path:
    return Path(twin_or_dir.model_dir if isinstance(twin_or_dir, Twin) else twin_or_dir)


def twin_name_of(model_dir: Path) -> str:
    """Which twin a checkpoint folder holds (from config.json's architectures)."""
    arch = json.loads((Path(model_dir) / "config.json").read_text())["architectures"][0]
    return _ARCH_TO_TWIN[arch]


def load_base(twin_or_dir, *, dtype: torch.dtype = torch.float32, **kwargs):
    """Load a twin checkpoint (a Twin or a folder, e.g. a merged output) in `dtype`, eval mode.

    Uses eager attention by default: Gemma 2 soft-capping is only honoured by the eager path,
    and it keeps comparisons between runs bit-stable.
    """
    import transformers as tf

    model_dir = _dir_of(twin_or_dir)
    arch = json.loads((model_dir / "config.json").read_text())["architectures"][0]
    cls = twin_or_dir.model_class if isinstance(twin_or_dir, Twin) else getattr(tf, arch)
    kwargs.setdefault("attn_implementation", "eager")
    model = cls.from_pretrained(model_dir, dtype=dtype, **kwargs)
    model.eval()
    return model


def load_tokenizer(twin_or_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_dir_of(twin_or_dir))


def load_processor(twin_or_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(_dir_of(twin_or_dir))


def sample_image(size: tuple[int, int] = (40, 32), seed: int = 0):
    """A small deterministic synthetic RGB image (gradient + a bright 'lesion' disc)."""
    import numpy as np
    from PIL import Image

    w, h = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = (xx / max(w - 1, 1) * 180 + yy / max(h - 1, 1) * 60).astype(np.float32)
    disc = ((xx - w * 0.6) ** 2 + (yy - h * 0.4) ** 2) < (min(w, h) * 0.2) ** 2
    base[disc] = 250.0
    img = np.stack([base, base * 0.9, base * 0.8], axis=-1) + rng.normal(0, 5, (h, w, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), mode="RGB")


SAMPLE_PROMPT = "Describe the findings in this chest radiograph."
# The text the export parity tests score teacher-forced (GGUF, ONNX, GPU).
PARITY_TEXT = (
    "FINDINGS: The lungs are clear. No pleural effusion or pneumothorax. The cardiac silhouette is normal in size. "
    "IMPRESSION: No acute cardiopulmonary abnormality; follow-up chest X-ray in 6 weeks if symptoms persist."
)


def sample_messages(name: str, text: str = SAMPLE_PROMPT) -> list[dict]:
    if name in VISION_TWINS:
        return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    return [{"role": "user", "content": text}]


def sample_inputs(name: str, base_dir: Path, *, text: str = SAMPLE_PROMPT) -> dict[str, torch.Tensor]:
    """Model inputs (batch of 1) for a forward pass of twin `name` saved at `base_dir`.

    Text twins: the chat-templated prompt (with generation prompt) -> input_ids, attention_mask.
    Vision twins: the same through the saved processor with `sample_image()`: gemma3_vision adds
    pixel_values and token_type_ids; mllama adds pixel_values, aspect_ratio_ids,
    aspect_ratio_mask and cross_attention_mask.
    """
    base_dir = Path(base_dir)
    messages = sample_messages(name, text)
    if name in VISION_TWINS:
        proc = load_processor(base_dir)
        prompt = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        enc = proc(text=prompt, images=[sample_image()], add_special_tokens=False, return_tensors="pt")
    else:
        tok = load_tokenizer(base_dir)
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        enc = tok(prompt, add_special_tokens=False, return_tensors="pt")
    return {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}
