"""Calibration statistics under GGUF tensor names, in the GGUF's row order, for llama.cpp's quantizer.

The statistics are collected on transformers modules (``model.layers.0.self_attn.q_proj.weight``);
llama.cpp knows ``blk.0.attn_q.weight``. The names come from the GGUF writer's own mapping
(gguf-py's tensor name map through the architecture table), not a copy of it: statistics can only
land on the right tensors if both sides use one table. Two quirks of the writer carry over too:
llama's Q/K rows are permuted (the per-row Fisher follows them), and a tied output head is the
embedding in the GGUF (``token_embd.weight``, trimmed to the tokenizer's vocabulary for Gemma 3).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from xpack.packager.archs import Arch, require_arch
from xpack.packager.export.calibrate.stats import LayerStats, TensorStats
from xpack.packager.export.gguf.writer import build_vocab, gguf_text_name, text_name_map, to_gguf_rows
from xpack.packager.io.checkpoint import Checkpoint

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

EMBEDDING = "token_embd.weight"


def gguf_tensor_names(model_dir: Path, hf_names: Iterable[str]) -> dict[str, str]:
    """HF weight name -> the GGUF tensor llama.cpp quantizes for it (``lm_head.weight`` -> ``output.weight``,
    or ``token_embd.weight`` when the head is tied to the embedding)."""
    ckpt, arch, cfg = _model(model_dir)
    name_map = text_name_map(arch, cfg)
    written = {gguf_text_name(arch, name_map, n) for n in ckpt.specs if not arch.is_vision(arch.canonical(n))}
    out = {}
    for hf_name in hf_names:
        name = gguf_text_name(arch, name_map, hf_name)
        if name not in written and arch.canonical(hf_name) == arch.lm_head_key:
            name = EMBEDDING  # tied head: llama.cpp multiplies by the embedding
        if name is not None:
            out[hf_name] = name
    return out


def gguf_stats(stats: LayerStats, model_dir: Path) -> dict[str, TensorStats]:
    """``stats`` keyed by GGUF tensor name, each ``out_fisher`` in the row order of the GGUF tensor."""
    _, arch, cfg = _model(model_dir)
    names = gguf_tensor_names(model_dir, stats.tensors)
    rows = _embedding_rows(model_dir, arch, cfg)
    out = {}
    for hf_name, name in names.items():
        s = stats.tensors[hf_name]
        fisher = None if s.out_fisher is None else to_gguf_rows(arch, cfg, hf_name, s.out_fisher)
        if fisher is not None and name == EMBEDDING and rows is not None:
            fisher = fisher[:rows]
        grads = None if s.out_sample is None else to_gguf_rows(arch, cfg, hf_name, s.out_sample.T).T
        if grads is not None and name == EMBEDDING and rows is not None:
            grads = grads[:, :rows]
        out[name] = TensorStats(s.in_sq_mean, fisher, s.count, s.in_block_amax_sq, in_sample=s.in_sample, out_sample=grads)
    if stats.embedding is not None:  # the lookup statistics join the head's when the head is the embedding
        emb_name = gguf_tensor_names(model_dir, [stats.embedding[0]]).get(stats.embedding[0])
        if emb_name is not None:
            lookup = stats.embedding[1]
            use = lookup.lookup_use if rows is None or lookup.lookup_use is None else lookup.lookup_use[:rows]
            head = out.get(emb_name)
            out[emb_name] = TensorStats(head.in_sq_mean if head else lookup.in_sq_mean, head.out_fisher if head else None,
                                        head.count if head else lookup.count, head.in_block_amax_sq if head else {}, use, lookup.lookup_fisher,
                                        head.in_sample if head else None, head.out_sample if head else None)
    return out


def gguf_imatrix(stats: LayerStats, model_dir: Path) -> dict[str, np.ndarray]:
    """The importance matrix as ``quantize(..., imatrix=)`` takes it: GGUF tensor name -> mean of x^2 per column."""
    # a table only ever looked up (an untied embedding) has no matmul input: llama-imatrix gives it none either
    return {name: s.in_sq_mean for name, s in gguf_stats(stats, model_dir).items() if s.lookup_use is None or s.out_fisher is not None}


def _model(model_dir: Path) -> tuple[Checkpoint, Arch, dict]:
    ckpt = Checkpoint(Path(model_dir))
    arch = require_arch(ckpt.config, "GGUF calibration")
    return ckpt, arch, ckpt.text_config() if arch.vision else ckpt.config


def _embedding_rows(model_dir: Path, arch: Arch, cfg: dict) -> int | None:
    """Rows of ``token_embd.weight`` when the writer trims the embedding to the tokenizer's vocabulary (Gemma 3)."""
    if not arch.gguf.trim_embeddings_to_vocab:
        return None
    return build_vocab(Path(model_dir), int(cfg["vocab_size"])).n_real
