"""Hugging Face checkpoint (+ optional LoRA, merged on the fly) -> GGUF, quantized by llama.cpp.

What gguf-py and llama.cpp give us and we use: GGUFWriter (streamed: tensor infos first, then each
tensor's data), the tensor name maps (``gguf.get_tensor_name_map``), SpecialVocab (special ids,
add_bos/eos, merges, chat template) and llama.cpp's own quantizer (``llama_model_quantize``).

What we write ourselves, and why: llama.cpp's ``convert_hf_to_gguf.py`` is a script, not a library;
it cannot apply a LoRA while streaming and reads the whole tokenizer through transformers. The few
per-architecture quirks it encodes (Q/K permutation for llama, +1 on Gemma norms, trimmed Gemma 3
embeddings, which hparams go into the header, the Gemma 3 mmproj) are data in ``archs/*.json``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from xpack.errors import XpackError
from xpack.packager.archs import Arch, require_arch
from xpack.packager.export.calibrate.qerror import row_bytes
from xpack.packager.io.checkpoint import Checkpoint
from xpack.packager.io.tensors import NON_FINITE, from_f32, require_finite, to_f32
from xpack.packager.merge.lora import Adapter
from xpack.packager.merge.stream import MergeSettings, TensorOp, apply_op, plan_merge, run_merge, stream_base
from xpack.paths import temp_dir, temp_file
from xpack.runtimes.artifacts import PREPROCESSOR_CONFIG
from xpack.runtimes.chat import find_chat_template
from xpack.runtimes.gguf_header import read_gguf_header
from xpack.runtimes.llama_import import load_llama_cpp

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

BITS_TO_QUANT = {16: "F16", 8: "Q8_0", 6: "Q6_K", 5: "Q5_K_M", 4: "Q4_K_M"}
# llama.cpp quant types that are only usable with an importance matrix (llama-imatrix).
NEEDS_IMATRIX = {"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "Q2_K_S"}
# The chkhsh rule of llama.cpp's converter: sha256 of the token ids of this text names the BPE
# pre-tokenizer. Hashes of the families xpack supports (copied from convert_hf_to_gguf.py).
CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 3333 "
    "33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на "
    "Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll make "
    "it, 'D you like some tea? We'Ve a'lL"
)
KNOWN_PRE_HASHES = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
}
# When the hash is unknown (e.g. a tokenizer trained for tests), the pre-tokenizer's structure in
# tokenizer.json decides: these are the regex families llama.cpp implements for those pre types.
PRE_BY_STRUCTURE = {
    "ByteLevel(regex)": "gpt-2",
    "Digits(individual)+ByteLevel(regex)": "smollm",
}


def quant_types() -> dict[str, int]:
    """Every llama.cpp file type the quantizer knows, by name (Q4_K_M -> its LLAMA_FTYPE value)."""
    llama_cpp = load_llama_cpp()

    out = {}
    for attr in dir(llama_cpp):
        if attr.startswith("LLAMA_FTYPE_MOSTLY_"):
            out[attr[len("LLAMA_FTYPE_MOSTLY_"):]] = getattr(llama_cpp, attr)
    out["F32"] = llama_cpp.LLAMA_FTYPE_ALL_F32
    return out


def resolve_quant(bits: int | None, quant: str | None) -> str:
    if quant:
        name = quant.upper()
        known = quant_types()
        if name not in known:
            raise XpackError(f"unknown GGUF quant type {quant}; valid: {', '.join(sorted(known))}")
        if name in NEEDS_IMATRIX:
            raise XpackError(f"{name} needs an importance matrix (llama-imatrix), which xpack does not make; choose e.g. IQ4_XS or Q4_K_M")
        return name
    if bits not in BITS_TO_QUANT:
        raise XpackError(f"--bits {bits} is not available for GGUF; choose one of {', '.join(map(str, BITS_TO_QUANT))} or name a --quant")
    return BITS_TO_QUANT[bits]


# ---------------------------------------------------------------------------------------------
# tokenizer -> GGUF vocabulary


@dataclass
class Vocab:
    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    pre: str
    tokens: list[str | bytes]
    types: list[int]
    scores: list[float] | None = None
    n_real: int = 0  # tokens that exist in the tokenizer (the rest is padding)
    add_space_prefix: bool | None = None


def _pre_structure(tokenizer_json: dict) -> str:
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    sig = []
    for p in parts:
        if p.get("type") == "Digits":
            sig.append("Digits(individual)" if p.get("individual_digits") else "Digits")
        elif p.get("type") == "ByteLevel":
            sig.append("ByteLevel(regex)" if p.get("use_regex", True) else "ByteLevel")
        else:
            sig.append(str(p.get("type")))
    return "+".join(sig)


def detect_bpe_pre(model_dir: Path) -> str:
    """The llama.cpp pre-tokenizer name of a byte-level BPE tokenizer (tokenizer.ggml.pre)."""
    from tokenizers import Tokenizer

    tj = json.loads((model_dir / "tokenizer.json").read_text())
    ids = Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(CHKTXT, add_special_tokens=False).ids
    chkhsh = hashlib.sha256(str(ids).encode()).hexdigest()
    if chkhsh in KNOWN_PRE_HASHES:
        return KNOWN_PRE_HASHES[chkhsh]
    structure = _pre_structure(tj)
    if structure in PRE_BY_STRUCTURE:
        return PRE_BY_STRUCTURE[structure]
    raise XpackError(
        f"the tokenizer in {model_dir} uses a BPE pre-tokenizer xpack cannot map to llama.cpp ({structure}); "
        f"supported: {', '.join(sorted(set(KNOWN_PRE_HASHES.values()) | set(PRE_BY_STRUCTURE.values())))}"
    )


def _added_tokens(model_dir: Path) -> dict[int, dict]:
    cfg_path = model_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    return {int(k): v for k, v in (cfg.get("added_tokens_decoder") or {}).items()}


def _looks_special(token: str) -> bool:
    return bool(re.fullmatch(r"<\|.*\|>|<[a-z_]+>|\[[A-Z_]+\]", token)) or token in ("<s>", "</s>", "<bos>", "<eos>", "<pad>", "<unk>")


def build_vocab(model_dir: Path, vocab_size: int) -> Vocab:
    import gguf

    if (model_dir / "tokenizer.model").is_file():
        return _sentencepiece_vocab(model_dir, vocab_size)
    if not (model_dir / "tokenizer.json").is_file():
        raise XpackError(f"{model_dir} has no tokenizer.json or tokenizer.model; the GGUF needs the tokenizer: copy it from the base model")
    tj = json.loads((model_dir / "tokenizer.json").read_text())
    if tj.get("model", {}).get("type") != "BPE" or tj["model"].get("byte_fallback"):
        raise XpackError(f"the tokenizer in {model_dir} is not byte-level BPE or SentencePiece; xpack cannot write it to GGUF")
    reverse = {i: t for t, i in tj["model"]["vocab"].items()}
    added = {a["id"]: a for a in tj.get("added_tokens", [])}
    n = max(vocab_size, max([*reverse, *added]) + 1)
    tokens: list[str | bytes] = []
    types: list[int] = []
    for i in range(n):
        if i in added:
            tok = added[i]["content"]
            tokens.append(tok)
            types.append(gguf.TokenType.CONTROL if added[i].get("special") or _looks_special(tok) else gguf.TokenType.USER_DEFINED)
        elif i in reverse:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    n_real = len(set(reverse) | set(added))
    return Vocab("gpt2", detect_bpe_pre(model_dir), tokens, types, n_real=n_real)


def _sentencepiece_vocab(model_dir: Path, vocab_size: int) -> Vocab:
    """As llama.cpp's ``_create_vocab_sentencepiece``: pieces, scores, types, then the added tokens."""
    import gguf
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(model_dir / "tokenizer.model"))
    n = max(vocab_size, sp.vocab_size())
    tokens: list[str | bytes] = [f"[PAD{i}]".encode() for i in range(n)]
    scores = [-10000.0] * n
    types = [gguf.TokenType.UNUSED] * n
    for i in range(sp.vocab_size()):
        tokens[i] = sp.IdToPiece(i).encode()
        scores[i] = sp.GetScore(i)
        types[i] = (
            gguf.TokenType.UNKNOWN if sp.IsUnknown(i) else gguf.TokenType.CONTROL if sp.IsControl(i)
            else gguf.TokenType.UNUSED if sp.IsUnused(i) else gguf.TokenType.BYTE if sp.IsByte(i) else gguf.TokenType.NORMAL
        )
    n_real = sp.vocab_size()
    for i, data in _added_tokens(model_dir).items():
        if i >= n:
            continue
        tok = data["content"]
        if data.get("special") or _looks_special(tok):
            types[i] = gguf.TokenType.CONTROL
        else:
            tok = tok.replace("\u2581", " ")
            types[i] = gguf.TokenType.USER_DEFINED
        tokens[i] = tok.encode()
        scores[i] = -1000.0
        n_real = max(n_real, i + 1)
    return Vocab("llama", "default", tokens, types, scores=scores, n_real=n_real)


def write_vocab(writer, vocab: Vocab, model_dir: Path, add_space_prefix: bool | None) -> None:
    import gguf

    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    if add_space_prefix is not None:
        writer.add_add_space_prefix(add_space_prefix)
    special = gguf.SpecialVocab(model_dir, load_merges=vocab.model == "gpt2", n_vocab=len(vocab.tokens))
    # the chat template by xpack's one rule (runtimes/chat.py: chat_template.jinja first, as transformers reads it), not
    # gguf-py's, which prefers tokenizer_config.json's: one checkpoint, one template in every artifact (issue #14)
    special.chat_template = find_chat_template(model_dir)
    special.add_to_gguf(writer, quiet=True)


# ---------------------------------------------------------------------------------------------
# tensors


@dataclass
class GgufTensor:
    """One tensor of the output: where it comes from and how it is transformed."""

    name: str  # GGUF name
    op: TensorOp
    shape: tuple[int, ...]
    gtype: str  # "F32" / "F16" / "BF16"
    permute_heads: int | None = None  # llama: Q/K rows reordered for llama.cpp's RoPE
    shift: float = 0.0  # Gemma RMSNorm stores w and uses (1 + w)
    rows: int | None = None  # keep only the first rows (Gemma 3 trims padding rows of the embedding)


def _hparams(cfg: dict) -> dict:
    h = dict(cfg)
    if "head_dim" not in h and h.get("hidden_size") and h.get("num_attention_heads"):
        h["head_dim"] = h["hidden_size"] // h["num_attention_heads"]
    h.setdefault("num_key_value_heads", h.get("num_attention_heads"))
    if h.get("layer_types"):  # per-layer sliding attention, as llama.cpp's sliding_window_pattern array
        h["swa_pattern"] = [t == "sliding_attention" for t in h["layer_types"]]
    return h


def _permute(w: "np.ndarray", n_head: int) -> "np.ndarray":
    """llama.cpp's LlamaModel.permute: HF's rotate-half layout -> GGML's interleaved RoPE layout."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _storage_type(name: str, ndim: int, intermediate: str, force: list, hf_name: str = "") -> str:
    for pattern, gtype in force:
        if re.search(pattern, hf_name):
            return gtype if intermediate != "F32" else "F32"
    if ndim <= 1 or name.endswith("_norm.weight"):
        return "F32"  # llama.cpp keeps norms and 1-D tensors in F32
    return intermediate


def text_name_map(arch: Arch, cfg: dict):
    """gguf-py's tensor name map for the text decoder of ``arch`` (``cfg``: the text config)."""
    import gguf

    return gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.gguf.arch.upper()), _hparams(cfg)["num_hidden_layers"])


def _local_name(arch: Arch, hf_name: str) -> str:
    """The decoder-local name gguf-py's map knows (``model.layers.0...``), whatever prefix the checkpoint uses."""
    canon, prefix = arch.canonical(hf_name), arch.gguf.text_prefix
    return "model." + canon[len(prefix):] if canon.startswith(prefix) else canon


def gguf_text_name(arch: Arch, name_map, hf_name: str) -> str | None:
    """The GGUF name of a text-decoder tensor (``model.layers.0.self_attn.q_proj.weight`` -> ``blk.0.attn_q.weight``),
    or None for a tensor the text GGUF leaves out (the table's ``skip``, e.g. Gemma 3's tied ``lm_head``)."""
    if any(p.search(arch.canonical(hf_name)) for p in arch.gguf.skip):
        return None
    name = name_map.get_name(_local_name(arch, hf_name), try_suffixes=(".weight", ".bias"))
    if name is None:
        raise XpackError(f"tensor {hf_name} has no GGUF name for {arch.name}; the checkpoint has parts xpack's {arch.name} table does not know")
    return name


def qk_permute_heads(arch: Arch, cfg: dict, hf_name: str) -> int | None:
    """The head count of llama.cpp's Q/K row permutation for this tensor, or None when its rows keep their order."""
    local, h = _local_name(arch, hf_name), _hparams(cfg)
    if not arch.gguf.permute_qk or not local.endswith(("q_proj.weight", "k_proj.weight")):
        return None
    return h["num_attention_heads"] if "q_proj" in local else h["num_key_value_heads"]


def to_gguf_rows(arch: Arch, cfg: dict, hf_name: str, values: np.ndarray) -> np.ndarray:
    """A tensor, or one value per output row of it, in the row order the GGUF stores ``hf_name`` in."""
    heads = qk_permute_heads(arch, cfg, hf_name)
    return _permute(values, heads) if heads else values


def _tensor_plan(ops: list[TensorOp], arch: Arch, cfg: dict, intermediate: str, n_vocab_real: int) -> list[GgufTensor]:
    g = arch.gguf
    name_map = text_name_map(arch, cfg)
    out = []
    for op in ops:
        name = gguf_text_name(arch, name_map, op.out_name)
        if name is None:
            continue
        local = _local_name(arch, op.out_name)
        shape = tuple(op.spec.shape)
        t = GgufTensor(name, op, shape, _storage_type(name, len(shape), intermediate, []))
        t.permute_heads = qk_permute_heads(arch, cfg, op.out_name)
        if g.norm_shift and local.endswith("norm.weight"):
            t.shift = g.norm_shift
        if g.trim_embeddings_to_vocab and local.endswith("embed_tokens.weight") and n_vocab_real < shape[0]:
            t.rows = n_vocab_real
            t.shape = (n_vocab_real, *shape[1:])
        out.append(t)
    return out


def _mmproj_plan(ops: list[TensorOp], arch: Arch, vision_cfg: dict, intermediate: str) -> list[GgufTensor]:
    import gguf

    mp = arch.gguf.mmproj
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, vision_cfg["num_hidden_layers"])
    out = []
    for op in ops:
        canon = arch.canonical(op.out_name)
        if not canon.startswith(mp.prefixes) or any(p.search(canon) for p in mp.skip):
            continue
        local = canon
        for pattern, repl in mp.rename:
            local = re.sub(pattern, repl, local)
        name = name_map.get_name(local, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise XpackError(f"vision tensor {op.out_name} has no mmproj GGUF name; xpack's {arch.name} table does not know it")
        t = GgufTensor(name, op, tuple(op.spec.shape), _storage_type(name, len(op.spec.shape), intermediate, mp.force_types, local))
        t.shift = next((v for suffix, v in mp.norm_shift.items() if local.endswith(suffix)), 0.0)
        out.append(t)
    return out


_CHUNK_BYTES = 64 << 20  # fp32 scratch per conversion step: a 262208 x 2560 embedding never exists in fp32 at once


def _materialize(t: GgufTensor, base: "np.ndarray", base_dtype: str) -> "np.ndarray":
    """One tensor as the GGUF stores it. Merged (LoRA) tensors are computed whole by apply_op; everything after that
    (row trim, RoPE permutation, norm shift, dtype change) runs on the stored dtype or in row chunks, so an unchanged
    embedding costs its own bytes plus one chunk, not four fp32 copies (measured: 10.7 GB peak on Gemma 3 4B)."""
    import numpy as np

    w = apply_op(t.op, base, base_dtype)  # the base itself when nothing merges into it
    st = t.op.spec.dtype
    if t.rows is not None:
        w = w[: t.rows]
    if t.permute_heads:
        w = _permute(w, t.permute_heads)  # a row permutation: exact in any dtype
    if st == t.gtype and not t.shift:
        w = np.ascontiguousarray(w)
        flat = w.reshape(-1)
        for i in range(0, flat.size, _CHUNK_BYTES // 4):  # the values as stored, checked a chunk at a time
            require_finite(to_f32(flat[i : i + _CHUNK_BYTES // 4], st), t.op.source, NON_FINITE)
        return w.view(np.uint8) if t.gtype == "BF16" else w
    out_dtype = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}[t.gtype]
    out = np.empty(w.shape, dtype=out_dtype)
    flat_in, flat_out = w.reshape(w.shape[0], -1) if w.ndim else w.reshape(1), out.reshape(out.shape[0], -1) if out.ndim else out.reshape(1)
    step = max(1, _CHUNK_BYTES // (4 * max(1, flat_in[0].size)))
    for i in range(0, flat_in.shape[0], step):
        piece = to_f32(flat_in[i : i + step], st)
        require_finite(piece, t.op.source, NON_FINITE)
        if t.shift:
            piece = piece + np.float32(t.shift)
        flat_out[i : i + step] = from_f32(piece, "BF16") if t.gtype == "BF16" else piece
    return out.view(np.uint8) if t.gtype == "BF16" else out


def _stream_tensors(ckpt: Checkpoint, tensors: list[GgufTensor]) -> Iterator[tuple[GgufTensor, "np.ndarray"]]:
    from tqdm import tqdm

    by_op = {id(t.op): t for t in tensors}
    stream = stream_base(ckpt, [t.op for t in tensors])
    for op, base, dtype in tqdm(stream, total=len(tensors), desc="gguf", unit="tensor", disable=None):
        t = by_op[id(op)]
        yield t, _materialize(t, base, dtype)


def _write_gguf(path: Path, arch_name: str, kv, tensors: list[GgufTensor], ckpt: Checkpoint, data: bool = True) -> int:
    """Stream tensors into a GGUF: infos first (shapes are known), then each tensor's data. ``data=False`` writes
    the header alone and extends the file to its full length as a hole (a sparse file: no bytes written), which
    is all llama.cpp's quantizer reads in a dry run. Returns the offset of the tensor data."""
    import os

    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(path, arch_name)
    kv(writer)
    np_dtype = {"F32": np.float32, "F16": np.float16, "BF16": np.uint8}
    by_file = {n: str(f) for f, specs in ckpt.headers.items() for n in specs}
    tensors = sorted(tensors, key=lambda t: by_file[t.op.source])  # data order = read order: one tensor in memory
    for t in tensors:
        nbytes = int(np.prod(t.shape)) * (4 if t.gtype == "F32" else 2)
        shape = t.shape if t.gtype != "BF16" else (*t.shape[:-1], t.shape[-1] * 2)
        writer.add_tensor_info(t.name, shape, np.dtype(np_dtype[t.gtype]), nbytes, raw_dtype=getattr(gguf.GGMLQuantizationType, t.gtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    if not data:
        writer.close()
        align = gguf.GGUF_DEFAULT_ALIGNMENT
        offset = -(-path.stat().st_size // align) * align
        nbytes = sum(-(-int(np.prod(t.shape)) * (4 if t.gtype == "F32" else 2) // align) * align for t in tensors)
        os.truncate(path, offset + nbytes)
        return offset
    offset = writer.fout[0].tell() if isinstance(writer.fout, list) else 0
    for _, array in _stream_tensors(ckpt, tensors):  # GGUFWriter writes data in the order of the infos
        writer.write_tensor_data(array)
    writer.close()
    return offset


def _text_kv(arch: Arch, cfg: dict, vocab: Vocab, model_dir: Path, name: str, file_type: int):
    import gguf

    g = arch.gguf
    h = _hparams(cfg)

    def kv(writer):
        writer.add_name(name)
        writer.add_file_type(file_type)
        for hp in g.hparam_specs:
            if h.get(hp.key) is None:
                if hp.optional:
                    continue
                raise XpackError(f"config of {model_dir} has no {hp.key}, which the GGUF header needs")
            getattr(writer, hp.method)(h[hp.key])
        rope = h.get("rope_scaling") or {}
        rope_type = rope.get("rope_type") or rope.get("type")
        if rope_type == "linear" and rope.get("factor"):
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(rope["factor"])
        elif rope_type not in (None, "default"):
            raise XpackError(f"rope scaling type {rope_type} is not supported by xpack's GGUF export yet")
        write_vocab(writer, vocab, model_dir, g.add_space_prefix)

    return kv


def _mmproj_kv(arch: Arch, cfg: dict, vision_cfg: dict, model_dir: Path, file_type: int):
    import gguf

    mp = arch.gguf.mmproj
    pre_path = model_dir / PREPROCESSOR_CONFIG
    if not pre_path.is_file():
        raise XpackError(f"{model_dir} has no {PREPROCESSOR_CONFIG}; the mmproj needs the image preprocessing settings")
    pre = json.loads(pre_path.read_text())
    text_hidden = (cfg.get("text_config") or cfg)["hidden_size"]

    def kv(writer):
        writer.add_file_type(file_type)
        writer.add_clip_has_vision_encoder(True)
        writer.add_clip_projector_type(getattr(gguf.VisionProjectorType, mp.projector_type.upper()))
        writer.add_vision_projection_dim(text_hidden)
        v = {"layer_norm_eps": 1e-6, **vision_cfg}
        for method, key in mp.hparams:
            getattr(writer, method)(v[key])
        writer.add_vision_image_mean(pre["image_mean"])
        writer.add_vision_image_std(pre["image_std"])
        writer.add_vision_use_gelu(True)
        tokens = int(cfg.get("mm_tokens_per_image", 256))
        scale = (v["image_size"] // v["patch_size"]) // int(round(tokens**0.5))
        if scale != 4:  # llama.cpp's default for Gemma 3
            writer.add_vision_projector_scale_factor(scale)

    return kv


# ---------------------------------------------------------------------------------------------
# quantization and inspection


def quantize(
    src: Path, dst: Path, quant: str, threads: int, imatrix: dict[str, np.ndarray] | None = None, overrides: dict[str, str] | None = None,
) -> None:
    """llama.cpp's own quantizer, in-process (the same code as the llama-quantize tool).

    ``imatrix`` maps GGUF tensor names to llama.cpp's importance matrix (per input column, the mean of x^2
    over calibration tokens, as llama-imatrix writes it); ``overrides`` maps GGUF tensor names to the ggml
    type they get instead of the one ``quant`` chooses (e.g. ``{"blk.3.ffn_down.weight": "Q8_0"}``).
    Both are checked against ``src`` first, and the overrides against ``dst`` after.
    Its per-tensor log goes to a file instead of the terminal; a failure quotes its last lines.
    """
    llama_cpp = load_llama_cpp()
    from tqdm import tqdm

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = quant_types()[quant]
    params.nthread = threads
    shapes = {name: dims for name, dims, _ in read_gguf_header(src)[1]} if imatrix or overrides else {}
    keep_alive = [_set_imatrix(params, imatrix, shapes), _set_overrides(params, overrides, shapes)]
    with tqdm(total=1, desc=f"quantize {quant}", disable=None) as bar:
        with _captured_fds() as log:
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
            tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-2:]) if rc else ""
        bar.update(1)
    del keep_alive  # the ctypes arrays params points into: alive until the quantizer returned
    if rc != 0:
        raise XpackError(f"llama.cpp could not quantize to {quant} (code {rc}: {tail}); try another --quant")
    if overrides:
        _check_overrides(dst, overrides)


# llama.cpp's per-tensor line in a dry run: "[  1/236]  token_embd.weight - [  640, 262144, 1, 1], type = f16, size = ... -> ... MiB (q8_0)"
_DRY_RUN_LINE = re.compile(r"\]\s+(\S+)\s+- \[([\d,\s]+)\], type =\s*(\w+), size =\s*[\d.]+ MiB(?: ->\s*[\d.]+ MiB \((\w+)\))?")


def plain_size(model_dir: Path, quant: str, threads: int = 0) -> dict:
    """What llama.cpp's plain ``quant`` makes of the checkpoint in ``model_dir``, without writing it: the GGUF's
    bytes and each tensor's type, from llama.cpp's quantizer in dry-run mode over a header-only (sparse) raw
    GGUF. The size yardstick of a calibrated ONNX mix (``--bits 4``: within Q4_K_M's size), for the cost of a header."""
    import ctypes
    import logging
    import os

    import gguf
    import numpy as np

    llama_cpp = load_llama_cpp()
    from llama_cpp import _logger

    ckpt = Checkpoint(Path(model_dir))
    arch = require_arch(ckpt.config, "GGUF size estimate")
    if arch.gguf is None or arch.gguf.unsupported:
        raise XpackError(f"xpack cannot size a GGUF of {arch.name}, the yardstick of a calibrated --bits; give --target-size")
    cfg, vocab, inter, tensors, _ = _text_tensors(ckpt, arch, plan_merge(ckpt, [], MergeSettings()).ops)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = quant_types()[quant]
    params.nthread = threads or os.cpu_count() or 1
    params.dry_run = True
    with temp_dir("gguf-size") as work:
        raw = Path(work) / "header.gguf"
        quiet, level = logging.getLogger("gguf"), logging.getLogger("gguf").level
        quiet.setLevel(logging.ERROR)  # gguf-py's "writing header.gguf, total_size = 1.1G" says nothing true of a size estimate
        try:
            offset = _write_gguf(raw, arch.gguf.arch, _text_kv(arch, cfg, vocab, Path(model_dir), "size", quant_types()[inter]), tensors, ckpt, data=False)
        finally:
            quiet.setLevel(level)
        lines: list[str] = []

        @llama_cpp.llama_log_callback
        def collect(level, text, user_data):  # the per-tensor lines are INFO, which llama-cpp-python's own logger may drop
            lines.append(text.decode("utf-8", errors="replace"))

        llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
        try:
            rc = llama_cpp.llama_model_quantize(str(raw).encode(), str(Path(work) / "none.gguf").encode(), params)
        finally:
            llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
        text = "".join(lines)
    if rc != 0:
        raise XpackError(f"llama.cpp could not size a {quant} GGUF of {model_dir} (code {rc}: {' | '.join(text.strip().splitlines()[-2:])})")
    align = gguf.GGUF_DEFAULT_ALIGNMENT
    types, total = {}, offset
    for name, dims, kind, new in _DRY_RUN_LINE.findall(text):
        ne = [int(d) for d in dims.split(",")]
        qtype = (new or kind).upper()
        types[name] = qtype
        total += -(-(int(np.prod(ne[1:])) * row_bytes(qtype, ne[0])) // align) * align
    if len(types) != len(tensors):
        raise XpackError(f"llama.cpp's dry run named {len(types)} of {len(tensors)} tensors; cannot size the {quant} GGUF")
    return {"quant": quant, "bytes": total, "tensor_types": types}


def _set_imatrix(params, imatrix: dict[str, np.ndarray] | None, shapes: dict) -> list | None:
    """Point ``params.imatrix`` at a NULL-terminated llama_model_imatrix_data array; returns what must stay alive."""
    import ctypes

    llama_cpp = load_llama_cpp()
    import numpy as np

    if not imatrix:
        return None
    arrays = []
    for name, values in imatrix.items():
        v = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
        if name not in shapes:
            raise XpackError(f"the importance matrix names tensor {name}, which the GGUF does not have; map the names with calibrate.names")
        dims = shapes[name]
        columns = int(dims[0]) * (int(dims[2]) if len(dims) > 2 else 1)  # llama.cpp: ne[0] * ne[2] (per expert)
        if v.size != columns or not np.isfinite(v).all():
            raise XpackError(f"the importance matrix of {name} has {v.size} values (finite: {bool(np.isfinite(v).all())}); the tensor needs {columns} finite values")
        arrays.append((name.encode(), v))
    entries = (llama_cpp.llama_model_imatrix_data * (len(arrays) + 1))()
    for entry, (name, v) in zip(entries, arrays):
        entry.name, entry.data, entry.size = name, v.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), v.size
    params.imatrix = entries  # the last entry stays zeroed: the NULL terminator
    return [entries, arrays]


def _set_overrides(params, overrides: dict[str, str] | None, shapes: dict) -> list | None:
    """Point ``params.tt_overrides`` at exact-name regexes (``^blk\\.3\\.ffn_down\\.weight$``) with their ggml types."""
    llama_cpp = load_llama_cpp()

    if not overrides:
        return None
    entries = (llama_cpp.llama_model_tensor_override * (len(overrides) + 1))()
    patterns = []
    for entry, (name, type_name) in zip(entries, overrides.items()):
        gtype = _override_type(name, type_name, shapes)
        patterns.append(f"^{re.escape(name)}$".encode())
        entry.pattern, entry.type = patterns[-1], gtype
    params.tt_overrides = entries
    return [entries, patterns]


def _override_type(name: str, type_name: str, shapes: dict) -> int:
    import gguf

    if name not in shapes:
        raise XpackError(f"the type overrides name tensor {name}, which the GGUF does not have")
    try:
        gtype = gguf.GGMLQuantizationType[type_name.upper()]
    except KeyError:
        raise XpackError(f"unknown ggml type {type_name} for {name}; valid: {', '.join(t.name for t in gguf.GGMLQuantizationType)}") from None
    block = gguf.GGML_QUANT_SIZES[gtype][0]
    if int(shapes[name][0]) % block:
        raise XpackError(f"{name} has rows of {shapes[name][0]} values; {gtype.name} needs a multiple of {block}")
    return int(gtype)


def _check_overrides(path: Path, overrides: dict[str, str]) -> None:
    import gguf

    got = {name: gguf.GGMLQuantizationType(kind).name for name, _, kind in read_gguf_header(path)[1]}
    wrong = [f"{n}: {got.get(n)} instead of {t.upper()}" for n, t in overrides.items() if got.get(n) != t.upper()]
    if wrong:
        raise XpackError(f"llama.cpp did not apply the type overrides ({'; '.join(wrong)})")


@contextlib.contextmanager
def _captured_fds():
    """Send fds 1 and 2 (llama.cpp's C-level log) to a temporary file while the block runs."""
    import os
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    with temp_file("llama", suffix=".log") as f:
        saved = [os.dup(1), os.dup(2)]
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield Path(f.name)
        finally:
            for fd, old in zip((1, 2), saved):
                os.dup2(old, fd)
                os.close(old)


# Types a K-quant or IQ file type falls back to when a row length is not a multiple of 256.
_LEGACY_TYPES = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL", "F16", "BF16"}


def type_report(path: Path, quant: str) -> dict:
    """Tensor type counts, and the fallbacks llama.cpp took (e.g. Q4_K -> Q5_0 when a row is not a multiple of 256)."""
    import gguf


    counts: dict[str, int] = {}
    fallbacks: dict[str, int] = {}
    block_quant = quant.startswith("IQ") or "_K" in quant
    for _, dims, kind in read_gguf_header(path)[1]:
        tname = gguf.GGMLQuantizationType(kind).name
        counts[tname] = counts.get(tname, 0) + 1
        if block_quant and tname in _LEGACY_TYPES and len(dims) >= 2 and int(dims[0]) % 256:
            key = f"{quant}->{tname}"
            fallbacks[key] = fallbacks.get(key, 0) + 1
    return {"tensor_types": counts, "fallbacks": fallbacks}


# ---------------------------------------------------------------------------------------------
# the export


@dataclass
class GgufExport:
    files: dict[str, dict] = field(default_factory=dict)  # file name -> {role, quant, tensor_types, fallbacks}
    vocab: dict = field(default_factory=dict)
    arch: str = ""
    notes: list[str] = field(default_factory=list)
    calibration: dict | None = None  # the calibrated mix's report (calibrate/gguf_mix.py), None for a plain type


def _intermediate(ckpt: Checkpoint) -> str:
    dtypes = {s.dtype for s in ckpt.specs.values() if s.dtype in ("F32", "F16", "BF16")}
    if dtypes == {"BF16"}:
        return "BF16"
    if dtypes == {"F16"}:
        return "F16"
    return "F32"


def _text_tensors(ckpt: Checkpoint, arch: Arch, ops: list[TensorOp]) -> tuple[dict, Vocab, str, list[GgufTensor], int]:
    """The text model's config, vocabulary (trimmed where the table says so), intermediate type, tensor plan, and
    the number of tokens the tokenizer listed before trimming."""
    g = arch.gguf
    cfg = ckpt.text_config() if arch.vision else ckpt.config
    vocab = build_vocab(ckpt.path, int(cfg["vocab_size"]))
    inter = _intermediate(ckpt)
    tensors = _tensor_plan(ops, arch, cfg, inter, vocab.n_real if g.trim_embeddings_to_vocab else 10**12)
    listed = len(vocab.tokens)
    if g.trim_embeddings_to_vocab:
        vocab.tokens, vocab.types = vocab.tokens[: vocab.n_real], vocab.types[: vocab.n_real]
        if vocab.scores:
            vocab.scores = vocab.scores[: vocab.n_real]
    return cfg, vocab, inter, tensors, listed


# (raw GGUF, final GGUF, work folder, the merged checkpoint) -> the report of a calibrated quantization
Mixer = Callable[[Path, Path, Path, Path], dict]


def export_gguf(
    model_dir: Path, adapters: list[Adapter], tmp_out: Path, quant: str, name: str, threads: int = 0, merge: MergeSettings | None = None,
    mixer: Mixer | None = None,
) -> GgufExport:
    """Write ``<name>-<QUANT>.gguf`` (+ ``mmproj-<name>-F16.gguf`` for vision models) into ``tmp_out``; ``adapters``
    are merged on the way as ``merge`` says (e.g. into a QLoRA adapter's 4-bit base). ``mixer`` replaces llama.cpp's
    plain ``quant`` by a calibrated mix (export/job.py passes calibrate/gguf_mix.py's); it needs the merged model in
    torch, so adapters are then also merged into a temporary checkpoint."""
    import os

    ckpt = Checkpoint(model_dir)
    arch = require_arch(ckpt.config, "GGUF export")
    g = arch.gguf
    if g is None:
        raise XpackError(f"GGUF export of {arch.name} is not supported by xpack (its architecture table has no gguf section)")
    if g.unsupported:
        raise XpackError(g.unsupported)
    ckpt.check_not_packed()
    plan = plan_merge(ckpt, adapters, merge or MergeSettings())
    cfg, vocab, inter, tensors, listed = _text_tensors(ckpt, arch, plan.ops)
    threads = threads or os.cpu_count() or 1
    result = GgufExport(arch=arch.name, vocab={"model": vocab.model, "pre": vocab.pre, "tokens": listed})
    ftype_inter = quant_types()["F32" if inter == "F32" else inter]
    final = tmp_out / f"{name}-{quant}.gguf"
    with temp_dir("gguf", dir=tmp_out.parent) as work:
        raw = final if quant == inter or (quant == "F32" and inter == "F32") else Path(work) / f"{name}-{inter}.gguf"
        _write_gguf(raw, g.arch, _text_kv(arch, cfg, vocab, model_dir, name, ftype_inter), tensors, ckpt)
        if raw != final and mixer is not None:
            reference = Path(model_dir)
            if adapters:
                (Path(work) / "merged").mkdir()
                run_merge(ckpt, adapters, Path(work) / "merged", merge or MergeSettings())
                reference = Path(work) / "merged"
            result.calibration = mixer(raw, final, Path(work), reference)
        elif raw != final:
            quantize(raw, final, quant, threads)
    result.files[final.name] = {"role": "text", "quant": quant, **type_report(final, quant)}
    if arch.vision and g.mmproj is not None:
        vision_cfg = ckpt.config["vision_config"]
        mm_type = "F32" if quant == "F32" else "F16"  # as llama.cpp's converter: the projector stays F16 in quantized builds
        mm_tensors = _mmproj_plan(plan.ops, arch, vision_cfg, mm_type)
        mm = tmp_out / f"mmproj-{name}-{mm_type}.gguf"
        _write_gguf(mm, "clip", _mmproj_kv(arch, ckpt.config, vision_cfg, model_dir, quant_types()[mm_type]), mm_tensors, ckpt)
        result.files[mm.name] = {"role": "mmproj", "quant": mm_type, **type_report(mm, mm_type)}
    result.notes += plan.notes
    return result
