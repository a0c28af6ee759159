#!/usr/bin/env python3
"""What two real vision-language models need in memory, per artifact format and per xpack hardware profile.

Computed from the models' published ``config.json`` values, not measured: nothing is downloaded,
no weight is read, no model is run. Runs offline in a few seconds.

Models
  - MedGemma 4B (``google/medgemma-4b-it``, ``Gemma3ForConditionalGeneration``: SigLIP vision tower,
    Gemma 3 4B text model, tied embeddings, 5:1 sliding-window/global attention).
  - Llama 3.2 11B Vision (``meta-llama/Llama-3.2-11B-Vision-Instruct``, ``MllamaForConditionalGeneration``:
    tiled ViT-H/14 vision encoder with 8 global layers, Llama 3.1 8B text model with 8 cross-attention
    layers inserted, untied output head).
  Both repositories are gated: the values below were read from faithful public copies of their
  ``config.json`` (named next to each value group in ``MODELS``).

Method
  1. Parameters are counted exactly: the transformers 4.57 model class is instantiated from the config
     on the meta device (``with torch.device("meta")``, no memory) and ``numel`` is summed per prefix:
     vision tower, multimodal projector, language-model layers (+ final norm), token embedding,
     lm_head (0 when tied). The totals are printed next to the published counts (4.3B; 10.6B).
  2. Artifact bytes are computed tensor by tensor from those shapes:
       - HF safetensors bf16: 2 bytes per parameter, a tied head stored once (header bytes ignored).
       - GGUF (llama.cpp) text model F16 / Q8_0 / Q4_K_M + ``mmproj`` F16 for the vision side.
         Bytes per weight: F16 16 bits, Q8_0 8.5, Q6_K 6.5625, Q4_K 4.5, F32 32; 1-D tensors (norms)
         stay F32. Q4_K_M is not a flat 4.85 bpw here: the type of each tensor follows llama.cpp's
         rules (``src/llama-quant.cpp`` of the llama-cpp-python 0.3.36 sources): attn_v and ffn_down
         get Q6_K in the layers where ``use_more_bits(i, n)`` holds, Q4_K elsewhere; the token
         embedding, which doubles as the output head in Gemma 3 (no ``output.weight``), gets Q6_K.
         The effective bpw that results is printed. The mmproj follows llama.cpp's converter for
         Gemma 3: weights F16, ``.embeddings.`` (patch + position) and 1-D tensors F32. Metadata
         (tokenizer, ~a few MB) is not counted. Gemma 3 keeps its 262208 embedding rows (the
         converter trims to the tokenizer's list, which is padded to ``vocab_size``).
         Llama 3.2 Vision has no llama.cpp support: "n/a".
       - ONNX (onnxruntime), as ``xpack export --format onnx --bits 32|16|8|4`` builds it
         (``packager/export/onnx/pipeline.py`` ``export_onnx``). Per precision: fp32 = every weight float32; fp16 =
         onnxruntime's ``convert_float_to_float16`` (1-D tensors feeding a norm stay float32, the rest
         float16); int8 / int4 = ``MatMulNBits`` (onnxruntime's ``MatMulNBitsQuantizer``, asymmetric,
         from the fp32 graph) with blocks of 16 (8 bits) / 32 (4 bits) along K. Per weight [K, N],
         k_blocks = ceil(K / block): packed data N*k_blocks*block*bits/8 bytes, scales N*k_blocks
         float32 (the dtype of input A, float32 here), zero points uint8 N*ceil(k_blocks / (8/bits))
         (two 4-bit points per byte, one 8-bit point per byte). So 8 bits/block 16 = (16 + 4 + 1) bytes
         per 16 weights = 10.5 bpw; 4 bits/block 32 = (16 + 4 + 0.5) bytes per 32 weights = 5.125 bpw.
         The token embedding becomes a ``GatherBlockQuantized`` with the same block layout (xpack's own
         8-bit one: uint8 data, float32 scales, one uint8 zero point per block; onnxruntime's 4-bit one:
         packed uint4 data and zero points, float32 scales). 1-D tensors stay float32 when quantized.
         Gemma 3 (MedGemma), xpack's graph, three files at every --bits:
           * ``model.onnx`` (+ ``model.onnx_data``): xpack's fused decoder (``packager/export/onnx/decoder_graph.py``
             ``build_decoder(inputs_embeds=True)``: GroupQueryAttention, SkipSimplifiedLayerNorm, q/k/v
             in one MatMul, which changes no byte count), at the --bits precision. It has no embedding
             Gather; its output head is its own tensor ``lm_head.weight`` [hidden, vocab] = the tied
             embedding transposed, in every precision (fp32 and fp16 too, not only int8/int4), so the
             262208 x 2560 matrix is stored twice per artifact. It also holds the rotary cos/sin
             tables, [min(max_position_embeddings, 8192), head_dim / 2] each, global + local
             (4 x 8192 x 128: 16.8 MB float32, 8.4 MB in the fp16 graph), counted with the LM layers.
           * ``embed.onnx`` (+ ``embed.onnx_data``): the token embedding (``build_embedding``: Gather,
             x sqrt(hidden)), quantized like the decoder: Gather float32 / float16 at 32 / 16,
             GatherBlockQuantized at 8 / 4 bits (blocks of 16 / 32).
           * ``vision.onnx`` (+ ``vision.onnx_data``): the SigLIP tower + projector
             (``packager/export/onnx/gemma3_vision.py``), at ``VISION_DTYPE[bits]``: float32 for --bits 32, float16
             for 16 (LayerNormalization and the projector's RMSNorm kept float32), int8 for both 8 and
             4 (``MatMulNBits`` 8-bit, block 32 = 9.25 bpw on every MatMul weight: q/k/v/out_proj,
             fc1/fc2, the projector; the patch-embedding Conv, the position embedding and the norms
             stay float32).
         Llama 3.2 Vision (mllama): xpack exports it at --bits 32, 16, 8 and 4 (archs ``mllama.json``
         ``"bits"``; ``packager/export/onnx/mllama.py``): ``vision.onnx`` (vision encoder + projector),
         ``cross_kv.onnx`` (the k_proj / v_proj / k_norm of the 8 cross-attention layers) and
         ``decoder.onnx`` (embedding, every other LM weight, final norm, the untied lm_head), each
         parameter once, each graph's weights in ``<graph>.onnx.data``: float32; fp16 (all three
         graphs, norms float32); at 8/4 bits the decoder and cross_kv quantized like the Gemma
         decoder (embedding GatherBlockQuantized) and the vision graph int8 (``VISION_DTYPE[bits]``).
         Check: on the tests' tiny twins (``tests/twins.py``), these rules give the bytes of every
         ``.onnx_data`` file of an ``export_onnx`` run of ``gemma3_vision`` at --bits 32/16/8/4 exactly,
         and the mllama twin's three fp32 graphs hold exactly its parameters, each once.
  3. Runtime memory per profile (``profiles/*.toml``: device, compute_dtype, n_ctx,
     memory_budget_gb) = resident weights + KV cache at n_ctx + a vision-activation ballpark:
       - weights: torch = parameters x the profile's compute dtype (bf16/fp16 2 B, fp32 4 B), as
         xpack's torch runtime loads them (``dtype=compute_dtype``); GGUF / ONNX = the files above.
       - KV cache = 2 (K and V) x layers holding self-attention KV x kv_heads x head_dim x tokens x
         bytes. torch: bytes of the compute dtype; Gemma 3's sliding-window layers hold
         min(sliding_window, n_ctx) tokens, its global layers n_ctx. llama.cpp: F16 K/V, and
         ``swa_full`` is true in ``llama_context_default_params`` (which llama-cpp-python, and so xpack,
         uses), so every Gemma 3 layer holds n_ctx. ONNX: float32 K/V at every --bits (xpack's graphs
         take and return float32 ``past_key_values`` / ``present``; the fp16 graph casts at its
         edges), every layer n_ctx (Gemma 3's GroupQueryAttention graph applies the sliding window
         through its attention bias and returns ``present`` at full length on the sliding layers too;
         the mllama decoder concatenates past and new K/V), and x2 because ``past`` and ``present``
         are both alive during a step (the runtime binds each step's ``present`` as the next step's
         ``past``).
         Llama 3.2 Vision: 32 of its 40 layers are self-attention layers (n_ctx tokens); the 8
         cross-attention layers hold K/V for the image tokens, num_tiles x (patches + 1) = 4 x 1601.
       - vision activations (ballpark, one image, one forward, peak inside one encoder layer):
           T*(2H + 2I)*b                   residual + normed input + MLP intermediate and its activation
         + heads*T^2*b                     attention probabilities of one layer (eager attention; fused
                                           SDPA kernels do not materialize them: an upper bound)
         + n_kept*T*H*b                    intermediate layer outputs kept for the output (mllama: 5)
         + T_out*(D_out + D_text)*b        vision output and its projection into the text model
         + tiles*3*S^2*4                   float32 pixel values
         T = tokens through the encoder (Gemma 3: (896/14)^2 = 4096; mllama: 4 tiles x 1608, 1601 padded
         to a multiple of 8 as transformers does), H / I = vision hidden / intermediate size, b = bytes
         per activation: the profile's compute dtype for torch, 4 (float32) for llama.cpp and
         onnxruntime (float32 graph I/O and MatMulNBits activations; an upper bound for the float16
         vision graph).
       "fits" compares the sum with ``memory_budget_gb`` (GB = 1e9 bytes throughout, which is
       conservative against GiB-sized devices). Not counted: CUDA context (~0.3-0.5 GB), allocator
       slack, llama.cpp / onnxruntime compute buffers, the tokenizer, the Python process itself.

The packager's own choices (llama.cpp's ``use_more_bits``, ``VISION_DTYPE``, the block sizes, the rotary
table length, mllama's external-data threshold) are imported from ``xpack.packager.export.onnx``, not copied.

Outputs: a markdown report on stdout and in ``benchmarks/results/vision_memory.md``, every figure also
in ``benchmarks/results/vision_memory.json``. Every table is headed "computed from published configs,
not measured". A calculator, not a benchmark: nothing is timed.

Usage:
  .venv/bin/python tools/vision_memory.py [--json PATH] [--md PATH] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from xpack.packager.export.onnx.decoder_graph import MAX_LENGTH as ROTARY_MAX_LENGTH
from xpack.packager.export.onnx.pipeline import DEFAULT_BLOCK_SIZE
from xpack.packager.export.onnx.precision import VISION_DTYPE
from xpack.packager.export.onnx.precision import VISION_INT8_BLOCK_SIZE as VISION_INT8_BLOCK
from xpack.packager.export.onnx.quantize import use_more_bits
from xpack.profiles.profile import load_profile, profile_names

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "vision_memory.json"
DEFAULT_MD = ROOT / "benchmarks" / "results" / "vision_memory.md"
HEADING = "computed from published configs, not measured"
GB = 1e9

# ---------------------------------------------------------------------------------------------
# The published configs, as data. Each value group names where it was read.
# ---------------------------------------------------------------------------------------------

# MedGemma 4B: https://huggingface.co/google/medgemma-4b-it/blob/main/config.json (gated).
# MedGemma 4B is Gemma 3 4B (same Gemma3ForConditionalGeneration architecture, trained further).
# Values read from:
#   [g1] google/gemma-3-4b-it's config.json, as copied verbatim in
#        https://huggingface.co/mlx-community/gemma-3-4b-it-bf16/blob/main/config.json:
#        mm_tokens_per_image 256, boi/eoi/image token ids, text hidden_size 2560, intermediate_size
#        10240, num_hidden_layers 34, rope_scaling linear x8, sliding_window 1024; vision_config
#        hidden_size 1152, image_size 896, intermediate_size 4304, num_attention_heads 16,
#        num_hidden_layers 27, patch_size 14, vision_use_head false.
#   [g2] Keys that short config leaves to transformers' Gemma3TextConfig defaults (vocab_size 262208,
#        num_attention_heads 8, num_key_value_heads 4, head_dim 256, query_pre_attn_scalar 256,
#        sliding_window_pattern 6, rope_theta 1e6, rope_local_base_freq 1e4, max_position_embeddings
#        131072), written out in the fuller Gemma 3 configs (e.g. unsloth/gemma-3-12b-it-GGUF's
#        config.json) and confirmed for MedGemma by the GGUF metadata of Ollama's medgemma:4b
#        (https://ollama.com/alibayram/medgemma:4b/blobs/2d20114e538b: gemma3.block_count 34,
#        embedding_length 2560, feed_forward_length 10240, attention.head_count 8, head_count_kv 4,
#        key_length 256, attention.sliding_window 1024, rope.freq_base 1e6, context_length 131072).
#   [g3] tie_word_embeddings: not in config.json, PretrainedConfig's default true; the checkpoint has
#        no lm_head tensor. Vision layer_norm_eps / hidden_act / num_channels: SiglipVisionConfig
#        defaults, as in simaai/gemma-3-4b-it-a16w4 devkit/vlm_config.json.
MEDGEMMA_4B_CONFIG = {
    "architectures": ["Gemma3ForConditionalGeneration"],  # [g1]
    "model_type": "gemma3",  # [g1]
    "boi_token_index": 255999,  # [g1]
    "eoi_token_index": 256000,  # [g1]
    "image_token_index": 262144,  # [g1]
    "mm_tokens_per_image": 256,  # [g1]
    "tie_word_embeddings": True,  # [g3]
    "text_config": {
        "model_type": "gemma3_text",
        "hidden_size": 2560,  # [g1]
        "intermediate_size": 10240,  # [g1]
        "num_hidden_layers": 34,  # [g1]
        "num_attention_heads": 8,  # [g2]
        "num_key_value_heads": 4,  # [g2]
        "head_dim": 256,  # [g2]
        "vocab_size": 262208,  # [g2]
        "sliding_window": 1024,  # [g1]
        "sliding_window_pattern": 6,  # [g2] 5 sliding layers, then 1 global
        "query_pre_attn_scalar": 256,  # [g2]
        "rope_theta": 1000000.0,  # [g2]
        "rope_local_base_freq": 10000.0,  # [g2]
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"},  # [g1]
        "max_position_embeddings": 131072,  # [g2]
        "rms_norm_eps": 1e-06,  # [g2]
        "hidden_activation": "gelu_pytorch_tanh",  # [g2]
    },
    "vision_config": {
        "model_type": "siglip_vision_model",
        "hidden_size": 1152,  # [g1]
        "intermediate_size": 4304,  # [g1]
        "num_hidden_layers": 27,  # [g1]
        "num_attention_heads": 16,  # [g1]
        "image_size": 896,  # [g1]
        "patch_size": 14,  # [g1]
        "num_channels": 3,  # [g3]
        "layer_norm_eps": 1e-06,  # [g3]
        "hidden_act": "gelu_pytorch_tanh",  # [g3]
        "vision_use_head": False,  # [g1]
    },
}

# Llama 3.2 11B Vision Instruct:
# https://huggingface.co/meta-llama/Llama-3.2-11B-Vision-Instruct/blob/main/config.json (gated).
# Values read from:
#   [l1] the text_config of a fine-tune that keeps Meta's config.json (only the weights changed):
#        https://huggingface.co/bababababooey/llama-3.2-11b-vision-instruct-stheno-abliterated/blob/main/config.json
#        (_name_or_path ./models/meta-llama_Llama-3.2-11B-Vision-Instruct): cross_attention_layers
#        [3, 8, 13, 18, 23, 28, 33, 38], hidden_size 4096, intermediate_size 14336,
#        num_attention_heads 32, max_position_embeddings 131072, hidden_act silu, eos ids; and
#        https://huggingface.co/Aekanun/thai-handwriting-llm/blob/main/config.json (copy naming
#        meta-llama/Llama-3.2-11B-Vision-Instruct): num_hidden_layers 40, num_key_value_heads 8,
#        rms_norm_eps 1e-5, vocab_size 128256, image_token_index 128256.
#   [l2] the vision_config and preprocessor_config.json of Llama-3.2-11B-Vision-Instruct quoted in
#        danbev/learning-ai (notes on porting mllama to llama.cpp): attention_heads 16, hidden_size
#        1280, image_size 560, intermediate_size 5120, max_num_tiles 4, num_global_layers 8,
#        num_hidden_layers 32, patch_size 14, intermediate_layers_indices [3, 7, 15, 23, 30] (via
#        the same config in an FSDP script), supported_aspect_ratios (8), vision_output_dim 7680,
#        norm_eps 1e-5; preprocessor max_image_tiles 4, size 560x560. The same notes show the
#        checkpoint's embed_tokens as [128264, 4096] (vocab_size + 8, which transformers'
#        MllamaTextModel builds by itself) and a separate language_model.lm_head.weight.
#   [l3] rope: Llama 3.1's llama3 scaling (factor 8, low/high freq factors 1/4, original 8192,
#        rope_theta 500000), as in the full config dumps above; tie_word_embeddings false
#        (text_config), "The model weights are not tied" when loading it (danbev/learning-ai).
#   Shard sizes of the HF checkpoint (cross-check of the bf16 bytes): 4.99 + 4.97 + 4.92 + 5.00 +
#   1.47 GB (https://huggingface.co/unsloth/Llama-3.2-11B-Vision-Instruct/tree/main, same in
#   hfhugs/Llama-3.2-11B-Vision-Instruct).
LLAMA32_11B_VISION_CONFIG = {
    "architectures": ["MllamaForConditionalGeneration"],
    "model_type": "mllama",
    "image_token_index": 128256,  # [l1]
    "text_config": {
        "model_type": "mllama_text_model",
        "hidden_size": 4096,  # [l1]
        "intermediate_size": 14336,  # [l1]
        "num_hidden_layers": 40,  # [l1] 32 self-attention + 8 cross-attention layers
        "num_attention_heads": 32,  # [l1]
        "num_key_value_heads": 8,  # [l1]
        "vocab_size": 128256,  # [l1]
        "cross_attention_layers": [3, 8, 13, 18, 23, 28, 33, 38],  # [l1]
        "max_position_embeddings": 131072,  # [l1]
        "rms_norm_eps": 1e-05,  # [l1]
        "hidden_act": "silu",  # [l1]
        "rope_theta": 500000.0,  # [l3]
        "rope_scaling": {  # [l3]
            "factor": 8.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "tie_word_embeddings": False,  # [l3]
    },
    "vision_config": {
        "model_type": "mllama_vision_model",
        "hidden_size": 1280,  # [l2]
        "intermediate_size": 5120,  # [l2]
        "num_hidden_layers": 32,  # [l2]
        "num_global_layers": 8,  # [l2]
        "attention_heads": 16,  # [l2]
        "image_size": 560,  # [l2]
        "patch_size": 14,  # [l2]
        "num_channels": 3,  # [l2]
        "max_num_tiles": 4,  # [l2]
        "vision_output_dim": 7680,  # [l2] = 1280 x (1 final + 5 intermediate layers)
        "intermediate_layers_indices": [3, 7, 15, 23, 30],  # [l2]
        "supported_aspect_ratios": [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]],  # [l2]
        "norm_eps": 1e-05,  # [l2]
        "hidden_act": "gelu",  # [l2]
    },
}

MODELS = [
    {
        "key": "medgemma-4b",
        "name": "MedGemma 4B",
        "hf_id": "google/medgemma-4b-it",
        "arch": "Gemma3ForConditionalGeneration",
        "config": MEDGEMMA_4B_CONFIG,
        # Gemma 3 technical report (arXiv 2503.19786), table 1, 4B: vision encoder 417M, embedding 675M,
        # non-embedding 3,209M; model cards: "4.3B" (google/medgemma-4b-it, gemma-3-4b-it).
        "published_params": 4.3e9,
        "published_source": "Gemma 3 technical report table 1 (417M vision + 675M embedding + 3,209M non-embedding) / model card 4.3B",
        # HF checkpoint shard sizes: not public for the gated repo; text-only copy (Gemma3ForCausalLM) of
        # gemma-3-4b-it: 4.96 + 2.80 GB (https://huggingface.co/OpenPipe/gemma-3-4b-it-text-only-3/tree/main)
        "published_text_bf16_gb": 7.76,
        "gguf": True,
        # xpack export --format onnx --bits 32|16|8|4 (packager/export/onnx/pipeline.py export_onnx with xpack's graph):
        # model.onnx (packager/export/onnx/decoder_graph.py build_decoder, inputs_embeds), embed.onnx (build_embedding),
        # vision.onnx (packager/export/onnx/gemma3_vision.py export_gemma3_vision at VISION_DTYPE[bits]).
        "onnx_layout": "gemma3",
        "onnx_bits": (32, 16, 8, 4),
    },
    {
        "key": "llama-3.2-11b-vision",
        "name": "Llama 3.2 11B Vision",
        "hf_id": "meta-llama/Llama-3.2-11B-Vision-Instruct",
        "arch": "MllamaForConditionalGeneration",
        "config": LLAMA32_11B_VISION_CONFIG,
        # Model card table: "11B (10.6)" parameters.
        "published_params": 10.6e9,
        "published_source": "model card: 11B (10.6B)",
        "published_bf16_gb": 4.99 + 4.97 + 4.92 + 5.00 + 1.47,
        "gguf": False,
        # xpack export --format onnx at every --bits (archs/mllama.json "bits"): vision.onnx, cross_kv.onnx, decoder.onnx
        # (packager/export/onnx/mllama.py): fp32; fp16 (all three graphs); 8/4 bits (decoder and cross K/V, vision int8).
        "onnx_layout": "mllama",
        "onnx_bits": (32, 16, 8, 4),
    },
]

# ---------------------------------------------------------------------------------------------
# Format constants
# ---------------------------------------------------------------------------------------------

# llama.cpp block types: (bytes per block, weights per block) -> exact bytes for block-aligned tensors.
GGML_TYPES = {
    "F32": (4, 1),
    "F16": (2, 1),
    "Q8_0": (34, 32),  # 32 int8 + f16 scale: 8.5 bpw
    "Q6_K": (210, 256),  # 6.5625 bpw
    "Q5_K": (176, 256),  # 5.5 bpw
    "Q4_K": (144, 256),  # 4.5 bpw
}
GGUF_TEXT_QUANTS = ("F16", "Q8_0", "Q4_K_M")
# name: (--bits, block size of the text weights: the packager's DEFAULT_BLOCK_SIZE). VISION_DTYPE (imported):
# the precision of vision.onnx for each --bits; ROTARY_MAX_LENGTH: rows of the cos/sin tables in xpack's
# decoder graph. Every mllama graph writes its weights to <graph>.onnx.data (mllama.py streams them there).
ONNX_VARIANTS = {"fp32": (32, None), "fp16": (16, None), "int8": (8, DEFAULT_BLOCK_SIZE[8]), "int4": (4, DEFAULT_BLOCK_SIZE[4])}
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
REFERENCE_LABEL = "computed for reference: not exportable by xpack"
HF_SHARD_BYTES = 5e9  # transformers' save_pretrained default max_shard_size ("5GB")


def bpw(ggml_type: str) -> float:
    b, n = GGML_TYPES[ggml_type]
    return 8.0 * b / n


def ggml_bytes(ggml_type: str, numel: int) -> int:
    b, n = GGML_TYPES[ggml_type]
    return -(-numel // n) * b


# ---------------------------------------------------------------------------------------------
# Step 1: instantiate on the meta device, count per component
# ---------------------------------------------------------------------------------------------

COMPONENTS = ("vision_tower", "projector", "lm_layers", "embedding", "lm_head")
COMPONENT_LABELS = {
    "vision_tower": "vision tower",
    "projector": "projector",
    "lm_layers": "LM layers (+ final norm)",
    "embedding": "token embedding",
    "lm_head": "lm_head",
}


def component_of(name: str) -> str:
    if name.startswith(("model.vision_tower.", "model.vision_model.")):
        return "vision_tower"
    if name.startswith("model.multi_modal_projector."):
        return "projector"
    if name.startswith("model.language_model.embed_tokens."):
        return "embedding"
    if name.startswith("lm_head."):
        return "lm_head"
    if name.startswith("model.language_model."):
        return "lm_layers"
    raise ValueError(f"unclassified parameter {name}")


def build_model(spec: dict):
    """The transformers model on the meta device, and its config object."""
    import torch
    import transformers

    cfg_cls = {"Gemma3ForConditionalGeneration": transformers.Gemma3Config, "MllamaForConditionalGeneration": transformers.MllamaConfig}[spec["arch"]]
    model_cls = getattr(transformers, spec["arch"])
    data = {k: v for k, v in spec["config"].items() if k not in ("architectures", "model_type")}
    config = cfg_cls(**data)
    with torch.device("meta"):
        model = model_cls(config)
    return model, config


def count(spec: dict) -> dict:
    """Exact parameter counts per component + the tensor list the format calculators need."""
    import torch

    model, config = build_model(spec)
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    tied = head is embed
    # Weights that become a MatMul in an ONNX graph, as (K, N): nn.Linear weights are [out, in] (K = in);
    # Gemma 3's projector multiplies by mm_input_projection_weight [in, out] directly (K = rows).
    linear = {f"{m}.weight" for m, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}
    tensors = []
    per = dict.fromkeys(COMPONENTS, 0)
    for name, p in model.named_parameters():  # a tied head is listed once (under the embedding)
        comp = component_of(name)
        per[comp] += p.numel()
        shape = tuple(p.shape)
        matmul = (shape[1], shape[0]) if name in linear else (shape[0], shape[1]) if name.endswith("mm_input_projection_weight") else None
        tensors.append({"name": name, "shape": shape, "numel": p.numel(), "component": comp, "matmul": matmul})
    text = config.get_text_config()
    vision = config.vision_config
    info = {
        "per_component": per,
        "total": sum(per.values()),
        "tied": tied,
        "embedding_shape": list(embed.shape),
        "lm_head_shape": list(head.shape),
        "text": {
            "hidden_size": text.hidden_size,
            "num_hidden_layers": text.num_hidden_layers,
            "intermediate_size": text.intermediate_size,
            "num_attention_heads": text.num_attention_heads,
            "num_key_value_heads": text.num_key_value_heads,
            "head_dim": getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
            "vocab_size": text.vocab_size,
            "max_position_embeddings": text.max_position_embeddings,
            "tie_word_embeddings": tied,
        },
        "vision": {"hidden_size": vision.hidden_size, "intermediate_size": vision.intermediate_size,
                   "num_hidden_layers": vision.num_hidden_layers, "image_size": vision.image_size,
                   "patch_size": vision.patch_size},
    }
    if spec["arch"] == "Gemma3ForConditionalGeneration":
        layer_types = list(text.layer_types)
        info["text"].update(sliding_window=text.sliding_window, layer_types_summary={
            "sliding_attention": layer_types.count("sliding_attention"), "full_attention": layer_types.count("full_attention")})
        info["layer_types"] = layer_types
        info["vision"].update(num_attention_heads=vision.num_attention_heads, mm_tokens_per_image=config.mm_tokens_per_image)
        info["image"] = {
            "tiles": 1,
            "encoder_tokens": (vision.image_size // vision.patch_size) ** 2,
            "heads": vision.num_attention_heads,
            "kept_layer_outputs": 0,
            "out_tokens": config.mm_tokens_per_image,
            "out_dim": vision.hidden_size,
            "text_tokens_per_image": config.mm_tokens_per_image,
            "cross_attention_tokens": 0,
        }
    else:
        cross = list(text.cross_attention_layers)
        patches = (vision.image_size // vision.patch_size) ** 2 + 1  # + class token
        padded = patches + (8 - patches % 8) % 8  # transformers pads the patch sequence to a multiple of 8
        info["text"].update(cross_attention_layers=cross, self_attention_layers=text.num_hidden_layers - len(cross))
        info["vision"].update(num_global_layers=vision.num_global_layers, attention_heads=vision.attention_heads,
                              max_num_tiles=vision.max_num_tiles, vision_output_dim=vision.vision_output_dim,
                              intermediate_layers_indices=list(vision.intermediate_layers_indices))
        info["image"] = {
            "tiles": vision.max_num_tiles,
            "encoder_tokens": vision.max_num_tiles * padded,
            "heads": vision.attention_heads,
            "kept_layer_outputs": len(vision.intermediate_layers_indices),
            "out_tokens": vision.max_num_tiles * patches,
            "out_dim": vision.vision_output_dim,
            "text_tokens_per_image": 1,  # one <|image|> token in the prompt; the image enters through cross-attention
            "cross_attention_tokens": vision.max_num_tiles * patches,
        }
    info["image"].update(image_size=vision.image_size, hidden=vision.hidden_size, intermediate=vision.intermediate_size,
                         text_hidden=text.hidden_size)
    return {"info": info, "tensors": tensors}


# ---------------------------------------------------------------------------------------------
# Step 2: bytes per artifact format
# ---------------------------------------------------------------------------------------------


def _split(tensors, fn) -> dict:
    out = dict.fromkeys(COMPONENTS, 0)
    for t in tensors:
        out[t["component"]] += fn(t)
    return out


def hf_bf16(counted: dict) -> dict:
    per = _split(counted["tensors"], lambda t: 2 * t["numel"])
    total = sum(per.values())
    n = max(1, math.ceil(total / HF_SHARD_BYTES))
    return {
        "format": "HF safetensors bf16",
        "files": {f"model-{{00001..{n:05d}}}-of-{n:05d}.safetensors ({n} shards of <= 5 GB)": {"components": per, "bytes": total}},
        "bytes": total,
        "note": "every component in the same shards; tied head stored once" if counted["info"]["tied"] else "every component in the same shards; lm_head stored separately",
    }


def _layer_index(name: str) -> int | None:
    parts = name.split(".")
    if "layers" in parts:
        i = parts.index("layers")
        if i + 1 < len(parts) and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def gguf_text_type(t: dict, quant: str, n_layer: int, tied: bool) -> str:
    """The llama.cpp type of one text-model tensor (llama-quant.cpp rules for F16 / Q8_0 / Q4_K_M)."""
    if len(t["shape"]) < 2:
        return "F32"  # norms: llama.cpp keeps 1-D tensors in F32
    if quant == "F16":
        return "F16"
    if quant == "Q8_0":
        return "Q8_0"
    # Q4_K_M
    name = t["name"]
    if t["component"] == "lm_head" or (tied and t["component"] == "embedding"):
        return "Q6_K"  # output (or the token embedding that doubles as it): Q6_K
    if t["component"] == "embedding":
        return "Q4_K"
    # attn_v and ffn_down get Q6_K in llama-quant.cpp's use_more_bits layers (the packager's copy of that rule)
    if name.endswith(("self_attn.v_proj.weight", "mlp.down_proj.weight")) and use_more_bits(_layer_index(name), n_layer):
        return "Q6_K"
    return "Q4_K"


def gguf_mmproj_type(t: dict) -> str:
    """llama.cpp's converter for the Gemma 3 mmproj at F16: .embeddings. and 1-D in F32, the rest F16."""
    if ".embeddings." in t["name"] or len(t["shape"]) < 2:
        return "F32"
    return "F16"


def gguf(counted: dict, spec: dict) -> dict:
    if not spec["gguf"]:
        return {q: {"format": f"GGUF {q} + mmproj F16", "bytes": None, "note": "n/a: llama.cpp has no Llama 3.2 Vision (mllama) support"} for q in GGUF_TEXT_QUANTS}
    info = counted["info"]
    n_layer = info["text"]["num_hidden_layers"]
    tied = info["tied"]
    text = [t for t in counted["tensors"] if t["component"] in ("lm_layers", "embedding", "lm_head")]
    vision = [t for t in counted["tensors"] if t["component"] in ("vision_tower", "projector")]
    mm_per = _split(vision, lambda t: ggml_bytes(gguf_mmproj_type(t), t["numel"]))
    mm_bytes = sum(mm_per.values())
    out = {}
    for q in GGUF_TEXT_QUANTS:
        types: dict[str, dict] = {}

        def size(t, q=q):
            ty = gguf_text_type(t, q, n_layer, tied)
            d = types.setdefault(ty, {"tensors": 0, "params": 0, "bytes": 0})
            b = ggml_bytes(ty, t["numel"])
            d["tensors"] += 1
            d["params"] += t["numel"]
            d["bytes"] += b
            return b

        per = _split(text, size)
        text_bytes = sum(per.values())
        text_params = sum(t["numel"] for t in text)
        out[q] = {
            "format": f"GGUF {q} + mmproj F16",
            "files": {
                f"model-{q}.gguf (text)": {"components": per, "bytes": text_bytes,
                                           "effective_bpw": 8 * text_bytes / text_params, "tensor_types": types},
                "mmproj-F16.gguf (vision tower + projector)": {"components": mm_per, "bytes": mm_bytes},
            },
            "bytes": text_bytes + mm_bytes,
            "note": "tensor data only (metadata/tokenizer not counted); tied embedding doubles as output"
            + ("; Q4_K_M per-tensor mix from llama-quant.cpp" if q == "Q4_K_M" else ""),
        }
    return out


def nbits_bytes(n_out: int, k: int, bits: int, block: int) -> int:
    """MatMulNBits / GatherBlockQuantized storage of an [N, K] weight quantized in blocks along K."""
    k_blocks = -(-k // block)
    data = n_out * k_blocks * block * bits // 8
    scales = n_out * k_blocks * 4  # float32: the dtype of input A in an fp32 graph
    zero_points = n_out * -(-k_blocks // (8 // bits))  # uint8, 8/bits points per byte
    return data + scales + zero_points


def onnx_weight_bytes(t: dict, precision: str, bits: int | None = None, block: int | None = None, gather_quantized: bool = False) -> int:
    """Bytes of one tensor in an ONNX file (see the module docstring for the layouts).

    precision: "float32"; "float16" (onnxruntime's converter: 1-D tensors feeding a norm stay float32,
    everything else float16); "nbits" (MatMul weights -> MatMulNBits at bits/block, the token embedding
    -> GatherBlockQuantized when gather_quantized, every other tensor float32).
    """
    numel = t["numel"]
    if precision == "float32":
        return 4 * numel
    if precision == "float16":
        return 4 * numel if len(t["shape"]) == 1 and "norm" in t["name"] else 2 * numel
    if len(t["shape"]) < 2:
        return 4 * numel
    if t.get("matmul"):
        k, n_out = t["matmul"]
        return nbits_bytes(n_out, k, bits, block)
    if gather_quantized and t["component"] == "embedding":
        rows, cols = t["shape"]  # GatherBlockQuantized, blocks along the hidden axis
        return nbits_bytes(rows, cols, bits, block)
    return 4 * numel  # position / tile embeddings, the patch Conv: float32


def _text_precision(bits: int) -> str:
    return {32: "float32", 16: "float16"}.get(bits, "nbits")


def _text_label(variant: str, bits: int, block: int | None) -> str:
    return variant if block is None else f"{variant} (MatMulNBits {bits}-bit, block {block})"


def _embed_label(bits: int, block: int | None) -> str:
    return {32: "Gather fp32", 16: "Gather fp16"}.get(bits) or f"GatherBlockQuantized {bits}-bit, block {block}"


def _vision_bytes(vision: list[dict], bits: int) -> tuple[dict, str]:
    dtype = VISION_DTYPE[bits]
    prec = {"float32": "float32", "float16": "float16", "int8": "nbits"}[dtype]
    per = _split(vision, lambda t: onnx_weight_bytes(t, prec, 8, VISION_INT8_BLOCK))
    label = dtype if dtype != "int8" else f"int8: MatMulNBits 8-bit, block {VISION_INT8_BLOCK}; Conv, position embedding, norms float32"
    return per, label


def _rotary_bytes(info: dict, bits: int) -> int:
    """cos/sin tables of xpack's decoder graph: [min(max_position_embeddings, 8192), head_dim / 2] each, global
    and (Gemma 3's sliding layers, their own rotary base) local; float16 in the fp16 graph, float32 otherwise."""
    t = info["text"]
    rows = min(t["max_position_embeddings"], ROTARY_MAX_LENGTH)
    tables = 4 if "layer_types" in info and "sliding_attention" in info["layer_types"] else 2
    return tables * rows * (t["head_dim"] // 2) * (2 if bits == 16 else 4)


def _onnx_gemma3(counted: dict, spec: dict) -> dict:
    """xpack export --format onnx of Gemma 3: model.onnx (decoder, inputs_embeds) + embed.onnx + vision.onnx."""
    info = counted["info"]
    tied = info["tied"]
    layers = [t for t in counted["tensors"] if t["component"] in ("lm_layers", "lm_head")]
    emb = next(t for t in counted["tensors"] if t["component"] == "embedding")
    vision = [t for t in counted["tensors"] if t["component"] in ("vision_tower", "projector")]
    # xpack's graph writes the head as its own initializer lm_head.weight [H, V] (the embedding transposed
    # when tied, in every precision); a MatMul weight with K = hidden
    head = {**emb, "name": "lm_head.weight", "component": "lm_head", "matmul": (emb["shape"][1], emb["shape"][0])} if tied else None
    out = {}
    for variant, (bits, block) in ONNX_VARIANTS.items():
        prec = _text_precision(bits)
        per = _split(layers + ([head] if head else []), lambda t: onnx_weight_bytes(t, prec, bits, block))
        rotary = _rotary_bytes(info, bits)
        per["lm_layers"] += rotary
        dec = sum(per.values())
        emb_per = _split([emb], lambda t: onnx_weight_bytes(t, prec, bits, block, gather_quantized=True))
        emb_bytes = sum(emb_per.values())
        vis_per, vis_label = _vision_bytes(vision, bits)
        vis_bytes = sum(vis_per.values())
        label = _text_label(variant, bits, block)
        out[variant] = {
            "format": f"ONNX {label} + vision {VISION_DTYPE[bits]}",
            "bits": bits,
            "vision_dtype": VISION_DTYPE[bits],
            "exportable": bits in spec["onnx_bits"],
            "files": {
                f"model.onnx + model.onnx_data (decoder taking inputs_embeds: LM layers, final norm, lm_head, {rotary / 1e6:.1f} MB rotary tables; {variant})":
                    {"components": per, "bytes": dec, "rotary_tables_bytes": rotary},
                f"embed.onnx + embed.onnx_data (token embedding, {_embed_label(bits, block)})": {"components": emb_per, "bytes": emb_bytes},
                f"vision.onnx + vision.onnx_data (vision tower + projector, {vis_label})": {"components": vis_per, "bytes": vis_bytes},
            },
            "bytes": dec + emb_bytes + vis_bytes,
            "decoder_bytes": dec + emb_bytes,
            "note": f"exportable: xpack export --format onnx --bits {bits}"
            + ("; the tied embedding is stored twice (embed.onnx Gather + model.onnx lm_head, its transpose)" if tied else ""),
        }
    return out


def _mllama_file(name: str, nbytes: int) -> str:
    return f"{name} + {name}.data"


def _onnx_mllama(counted: dict, spec: dict) -> dict:
    """xpack export --format onnx of Llama 3.2 Vision: vision.onnx + cross_kv.onnx + decoder.onnx (every --bits)."""
    cross_kv_re = (".cross_attn.k_proj.", ".cross_attn.v_proj.", ".cross_attn.k_norm.")
    text = [t for t in counted["tensors"] if t["component"] in ("lm_layers", "embedding", "lm_head")]
    cross = [t for t in text if any(k in t["name"] for k in cross_kv_re)]
    decoder = [t for t in text if not any(k in t["name"] for k in cross_kv_re)]
    vision = [t for t in counted["tensors"] if t["component"] in ("vision_tower", "projector")]
    out = {}
    for variant, (bits, block) in ONNX_VARIANTS.items():
        exportable = bits in spec["onnx_bits"]
        prec = _text_precision(bits)
        dec_per = _split(decoder, lambda t: onnx_weight_bytes(t, prec, bits, block, gather_quantized=True))
        cross_per = _split(cross, lambda t: onnx_weight_bytes(t, prec, bits, block))
        vis_per, vis_label = _vision_bytes(vision, bits)
        dec, cro, vis = (sum(d.values()) for d in (dec_per, cross_per, vis_per))
        label = _text_label(variant, bits, block)
        emb = "" if bits == 32 else f"; embedding {_embed_label(bits, block)}"
        out[variant] = {
            "format": f"ONNX {label} + vision {VISION_DTYPE[bits]}" + (" (exportable)" if exportable else f" ({REFERENCE_LABEL})"),
            "bits": bits,
            "vision_dtype": VISION_DTYPE[bits],
            "exportable": exportable,
            "files": {
                f"{_mllama_file('vision.onnx', vis)} (vision encoder + projector, {vis_label})": {"components": vis_per, "bytes": vis},
                f"{_mllama_file('cross_kv.onnx', cro)} (cross-attention k_proj / v_proj / k_norm of the {len(counted['info']['text']['cross_attention_layers'])} cross-attention layers, {variant})":
                    {"components": cross_per, "bytes": cro},
                f"{_mllama_file('decoder.onnx', dec)} (embedding, every other LM weight, final norm, lm_head; {variant}{emb})": {"components": dec_per, "bytes": dec},
            },
            "bytes": dec + cro + vis,
            "decoder_bytes": dec + cro,
            "note": (f"exportable: xpack export --format onnx --bits {bits} (packager/export/onnx/mllama.py): decoder/cross_kv weights "
                     f"{variant}, vision {VISION_DTYPE[bits]}" if exportable else
                     f"{REFERENCE_LABEL}; layout assumed as Gemma 3's at --bits {bits}: decoder/cross_kv weights {variant}, "
                     f"vision {VISION_DTYPE[bits]}") + "; lm_head untied (stored once, in decoder.onnx)",
        }
    return out


def onnx(counted: dict, spec: dict) -> dict:
    return (_onnx_gemma3 if spec["onnx_layout"] == "gemma3" else _onnx_mllama)(counted, spec)


# ---------------------------------------------------------------------------------------------
# Step 3: runtime memory per profile
# ---------------------------------------------------------------------------------------------


def load_profiles() -> list[dict]:
    """The shipped hardware profiles, as xpack reads them."""
    out = []
    for name in profile_names():
        p = load_profile(name)
        budget = p.memory_budget_gb  # a float in the Profile; whole numbers shown as the TOML writes them
        out.append({"name": p.name, "file": f"profiles/{name}.toml", "device": p.device, "compute_dtype": p.compute_dtype, "n_ctx": p.n_ctx,
                    "memory_budget_gb": int(budget) if budget is not None and budget.is_integer() else budget, "formats": list(p.formats)})
    return out


def kv_cache(info: dict, n_ctx: int, b: int, runtime: str) -> dict:
    """K+V bytes at n_ctx (see the docstring for the per-runtime rules)."""
    t = info["text"]
    per_token_layer = 2 * t["num_key_value_heads"] * t["head_dim"] * b
    parts = {}
    if "layer_types" in info:  # Gemma 3
        n_sliding = info["layer_types"].count("sliding_attention")
        n_full = info["layer_types"].count("full_attention")
        sliding_tokens = min(t["sliding_window"], n_ctx) if runtime == "torch" else n_ctx
        parts["global_layers"] = n_full * n_ctx * per_token_layer
        parts["sliding_layers"] = n_sliding * sliding_tokens * per_token_layer
        detail = f"{n_full} global x {n_ctx} + {n_sliding} sliding x {sliding_tokens} tokens"
    else:  # mllama
        n_self = t["self_attention_layers"]
        n_cross = len(t["cross_attention_layers"])
        img = info["image"]["cross_attention_tokens"]
        parts["self_attention_layers"] = n_self * n_ctx * per_token_layer
        parts["cross_attention_layers"] = n_cross * img * per_token_layer
        detail = f"{n_self} self-attn x {n_ctx} + {n_cross} cross-attn x {img} image tokens"
    factor = 2 if runtime == "onnx" else 1  # onnxruntime: past + present alive together on the last step
    if factor == 2:
        parts = {k: v * 2 if k != "cross_attention_layers" else v for k, v in parts.items()}
        detail += ", x2 past+present"
    return {"bytes": sum(parts.values()), "parts": parts, "bytes_per_element": b, "detail": detail}


def vision_activations(info: dict, b: int) -> dict:
    im = info["image"]
    T, H, I, heads = im["encoder_tokens"], im["hidden"], im["intermediate"], im["heads"]
    parts = {
        "layer_tensors": T * (2 * H + 2 * I) * b,
        "attention_probs": heads * T * T * b,
        "kept_layer_outputs": im["kept_layer_outputs"] * T * H * b,
        "output_and_projection": im["out_tokens"] * (im["out_dim"] + im["text_hidden"]) * b,
        "pixel_values": im["tiles"] * 3 * im["image_size"] ** 2 * 4,
    }
    return {"bytes": sum(parts.values()), "parts": parts, "bytes_per_element": b,
            "tokens": T, "formula": "T*(2H+2I)*b + heads*T^2*b + n_kept*T*H*b + T_out*(D_out+D_text)*b + tiles*3*S^2*4"}


def runtime_rows(spec: dict, counted: dict, artifacts: dict, profile: dict) -> list[dict]:
    info = counted["info"]
    n_ctx = profile["n_ctx"]
    cb = DTYPE_BYTES[profile["compute_dtype"]]
    budget = profile["memory_budget_gb"]
    rows = []

    def row(artifact: str, fmt: str, weights: int | None, kv: dict | None, act: dict | None, note: str = "") -> None:
        if weights is None:
            rows.append({"artifact": artifact, "format": fmt, "weights": None, "kv": None, "vision_act": None, "total": None,
                         "budget_gb": budget, "fits": None, "note": note})
            return
        total = weights + kv["bytes"] + act["bytes"]
        rows.append({"artifact": artifact, "format": fmt, "weights": weights, "kv": kv, "vision_act": act, "total": total,
                     "budget_gb": budget, "fits": None if budget is None else total <= budget * GB,
                     "margin_gb": None if budget is None else budget - total / GB, "note": note})

    # torch: the whole HF model in the profile's compute dtype
    row(f"torch {profile['compute_dtype']}", "torch", info["total"] * cb, kv_cache(info, n_ctx, cb, "torch"), vision_activations(info, cb),
        "HF checkpoint loaded with dtype=compute_dtype")
    for q in GGUF_TEXT_QUANTS:
        a = artifacts["gguf"][q]
        if a["bytes"] is None:
            row(f"GGUF {q} + mmproj F16", "gguf", None, None, None, a["note"])
        else:
            row(f"GGUF {q} + mmproj F16", "gguf", a["bytes"], kv_cache(info, n_ctx, 2, "gguf"), vision_activations(info, 4),
                "llama.cpp F16 KV, swa_full (default) = every layer n_ctx")
    for v in ONNX_VARIANTS:
        a = artifacts["onnx"][v]
        tag = "" if spec["onnx_layout"] == "gemma3" else " (exportable)" if a["exportable"] else f" ({REFERENCE_LABEL})"
        row(f"ONNX {v} + vision {a['vision_dtype']}{tag}", "onnx", a["bytes"], kv_cache(info, n_ctx, 4, "onnx"),
            vision_activations(info, 4), "fp32 KV (xpack's graphs take and return fp32 K/V at every --bits), every layer n_ctx")
    return [r for r in rows if r["format"] in profile["formats"]] if profile["formats"] else rows


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def g(x: float | None, nd: int = 2) -> str:
    return "n/a" if x is None else f"{x / GB:.{nd}f}"


def table(title: str, header: list[str], rows: list[list]) -> list[str]:
    out = [f"**{title} ({HEADING})**", "", "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out + [""]


def report(results: dict) -> str:
    L = [f"# Vision-model memory: MedGemma 4B and Llama 3.2 11B Vision ({HEADING})", ""]
    L += [
        f"transformers {results['versions']['transformers']}, torch {results['versions']['torch']}; "
        "models instantiated on the meta device from the published config.json values in "
        "`tools/vision_memory.py` (sources named there). GB = 1e9 bytes.", "",
    ]

    # configs
    rows = []
    for m in results["models"]:
        t, v = m["info"]["text"], m["info"]["vision"]
        attn = (f"{t['layer_types_summary']['sliding_attention']} sliding (window {t['sliding_window']}) + {t['layer_types_summary']['full_attention']} global"
                if "layer_types_summary" in t else f"{t['self_attention_layers']} self + {len(t['cross_attention_layers'])} cross-attn {t['cross_attention_layers']}")
        vis = (f"{v['num_hidden_layers']} layers"
               + (f" + {v['num_global_layers']} global" if "num_global_layers" in v else "")
               + f", hidden {v['hidden_size']}, inter {v['intermediate_size']}, {v['image_size']}px / patch {v['patch_size']}"
               + (f", {v['max_num_tiles']} tiles, out dim {v['vision_output_dim']}" if "max_num_tiles" in v else f", {v['mm_tokens_per_image']} tokens/image"))
        rows.append([m["name"], t["hidden_size"], t["num_hidden_layers"], t["intermediate_size"],
                     f"{t['num_attention_heads']} / {t['num_key_value_heads']} / {t['head_dim']}", t["vocab_size"],
                     "yes" if t["tie_word_embeddings"] else "no", attn, vis])
    L += table("Published config values used", ["model", "text hidden", "layers", "intermediate", "heads / kv / head_dim", "vocab",
                                                 "tied", "attention layers", "vision"], rows)

    # parameters
    rows = []
    for m in results["models"]:
        p = m["info"]["per_component"]
        rows.append([m["name"]] + [f"{p[c]:,}" for c in COMPONENTS]
                    + [f"{m['info']['total']:,}", f"{m['published_params'] / 1e9:.1f}B", f"{m['info']['total'] / m['published_params']:.3f}"])
    L += table("Parameters per component (transformers classes on the meta device)",
               ["model"] + [COMPONENT_LABELS[c] for c in COMPONENTS] + ["total", "published", "ratio"], rows)
    for m in results["models"]:
        L.append(f"- {m['name']}: published {m['published_source']}. Embedding {m['info']['embedding_shape']}, "
                 f"lm_head {m['info']['lm_head_shape']}{' (tied: the embedding)' if m['info']['tied'] else ''}. {m['crosscheck']}")
    L.append("")

    # artifacts
    rows = []
    for m in results["models"]:
        arts = [m["artifacts"]["hf"]] + [m["artifacts"]["gguf"][q] for q in GGUF_TEXT_QUANTS] + [m["artifacts"]["onnx"][v] for v in ONNX_VARIANTS]
        for a in arts:
            if a["bytes"] is None:
                rows.append([m["name"], a["format"], "n/a", "n/a", "n/a", "n/a", "n/a", "n/a", a["note"]])
                continue
            comp = dict.fromkeys(COMPONENTS, 0)
            files = []
            for fname, f in a["files"].items():
                for c in COMPONENTS:
                    comp[c] += f["components"][c]
                extra = f", {f['effective_bpw']:.3f} bpw" if "effective_bpw" in f else ""
                files.append(f"{fname}: {g(f['bytes'])} GB{extra}")
            rows.append([m["name"], a["format"]] + [g(comp[c]) for c in COMPONENTS] + [f"**{g(a['bytes'])}**", "; ".join(files) + ". " + a["note"]])
    L += table("Artifact bytes per format, component split (GB)",
               ["model", "format"] + [COMPONENT_LABELS[c] for c in COMPONENTS] + ["total", "files (which file holds what)"], rows)
    gq = next(m for m in results["models"] if m["artifacts"]["gguf"]["Q4_K_M"]["bytes"] is not None)
    f = next(iter(gq["artifacts"]["gguf"]["Q4_K_M"]["files"].values()))
    mix = ", ".join(f"{k} {v['tensors']} tensors / {v['params'] / 1e6:.0f}M params" for k, v in sorted(f["tensor_types"].items()))
    text_params = sum(v["params"] for v in f["tensor_types"].values())
    L += [f"- GGUF Q4_K_M text model of {gq['name']}: {mix} -> {f['effective_bpw']:.3f} bpw effective over the text weights "
          f"(Q4_K 4.5, Q6_K 6.5625, F32 32 bpw). A flat 4.85 bpw (llama.cpp's usual Q4_K_M average, Llama-7B-shaped) would give "
          f"{text_params * 4.85 / 8 / GB:.2f} GB instead of {g(f['bytes'])} GB: here the 262208 x 2560 embedding, which doubles as the "
          "output head, is Q6_K and is 17% of the text weights.",
          "- ONNX text weights: int8 = 10.5 bpw (16 x 8-bit + float32 scale + uint8 zero point per 16 weights), int4 = 5.125 bpw "
          "(32 x 4-bit + float32 scale + half a byte of zero point per 32 weights); the token embedding likewise as GatherBlockQuantized. "
          "vision.onnx follows packager/export/onnx/precision.py VISION_DTYPE: float32 at --bits 32, float16 at 16, int8 at 8 and 4 "
          f"(MatMulNBits 8-bit, block {VISION_INT8_BLOCK} = 9.25 bpw on the MatMul weights; patch Conv, position embeddings, norms float32).",
          "- MedGemma 4B ONNX: the decoder (model.onnx) takes inputs_embeds and holds the output head as its own tensor lm_head.weight, "
          "the tied embedding transposed, while embed.onnx holds the embedding for the Gather: the 262208 x 2560 matrix is stored twice "
          "at every --bits (fp32 and fp16 included). model.onnx also holds the rotary cos/sin tables (8192 rows, global + local).",
          "- Llama 3.2 11B Vision ONNX: xpack exports it at every --bits (vision.onnx, cross_kv.onnx, decoder.onnx): fp32, fp16 "
          "(all three graphs), int8 / int4 (decoder and cross K/V; vision int8).", ""]

    # runtime
    for prof in results["profiles"]:
        rows = []
        for m in results["models"]:
            for r in m["runtime"][prof["name"]]:
                if r["total"] is None:
                    rows.append([m["name"], r["artifact"], "n/a", "n/a", "n/a", "n/a", "n/a", r["note"]])
                    continue
                fits = "yes" if r["fits"] else "**no**"
                rows.append([m["name"], r["artifact"], g(r["weights"]), g(r["kv"]["bytes"], 3), g(r["vision_act"]["bytes"], 3),
                             f"**{g(r['total'])}**", f"{fits} ({r['margin_gb']:+.1f})", f"KV: {r['kv']['detail']}; {r['note']}"])
        L += table(f"Runtime memory, profile `{prof['name']}` ({prof['device']}, {prof['compute_dtype']}, n_ctx {prof['n_ctx']}, "
                   f"budget {prof['memory_budget_gb']} GB)",
                   ["model", "artifact", "weights GB", "KV cache GB", "vision act. GB", "total GB", "fits (margin GB)", "notes"], rows)
    L += ["Assumptions (details in the script's docstring): weights + KV cache at n_ctx + one image's vision activations "
          "(ballpark: T*(2H+2I)*b + heads*T^2*b + n_kept*T*H*b + T_out*(D_out+D_text)*b + pixels; the T^2 term is eager "
          "attention's, an upper bound); CUDA context, allocator slack, runtime compute buffers and the process itself are not counted.", ""]
    return "\n".join(L)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON)
    ap.add_argument("--md", type=Path, default=DEFAULT_MD)
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)

    import torch
    import transformers

    profiles = load_profiles()
    results = {"heading": HEADING, "units": "bytes; GB = 1e9 bytes",
               "versions": {"transformers": transformers.__version__, "torch": torch.__version__},
               "profiles": profiles, "models": []}
    for spec in MODELS:
        counted = count(spec)
        info = counted["info"]
        artifacts = {"hf": hf_bf16(counted), "gguf": gguf(counted, spec), "onnx": onnx(counted, spec)}
        if "published_bf16_gb" in spec:
            cross = f"bf16 bytes {info['total'] * 2 / GB:.2f} GB vs the published checkpoint's shards {spec['published_bf16_gb']:.2f} GB."
        else:
            text = info["per_component"]["lm_layers"] + info["per_component"]["embedding"]
            cross = f"text-only bf16 bytes {text * 2 / GB:.2f} GB vs a published text-only copy's shards {spec['published_text_bf16_gb']:.2f} GB."
        results["models"].append({
            "key": spec["key"], "name": spec["name"], "hf_id": spec["hf_id"], "arch": spec["arch"],
            "config": spec["config"], "published_params": spec["published_params"], "published_source": spec["published_source"],
            "crosscheck": cross, "info": info, "artifacts": artifacts,
            "runtime": {p["name"]: runtime_rows(spec, counted, artifacts, p) for p in profiles},
        })
    md = report(results)
    print(md)
    for m in results["models"]:
        print(f"[check] {m['name']}: counted {m['info']['total']:,} parameters = {m['info']['total'] / 1e9:.3f}B; "
              f"published {m['published_params'] / 1e9:.1f}B ({m['published_source']})", file=sys.stderr)
    if not args.no_write:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(md + "\n")
        print(f"[written] {args.json.relative_to(ROOT) if args.json.is_relative_to(ROOT) else args.json}, "
              f"{args.md.relative_to(ROOT) if args.md.is_relative_to(ROOT) else args.md}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
