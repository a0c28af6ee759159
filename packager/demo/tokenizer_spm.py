"""SentencePiece BPE tokenizer (Gemma's) rebuilt from GGUF metadata.

transformers' GGUF import of Gemma 3 writes a ``tokenizer.model`` that is a copy of the GGUF and a
``tokenizer.json`` whose ids differ from llama.cpp's on most texts. What tokenizes exactly like
llama.cpp (checked by ``tokenizer_check.py``):

- ``tokenizer.model``: a SentencePiece ModelProto built from the GGUF's tokens, scores and types
  (SentencePiece's piece types use the same numbers as GGUF's): BPE, byte fallback, identity
  normalizer, no dummy prefix, whitespace escaped to U+2581. The GGUF stores the user-defined
  whitespace pieces ("  ", "   ", ...) with real spaces, as llama.cpp's converter "pre-normalizes"
  them; SentencePiece matches user-defined pieces after escaping, so they go back in escaped.
- ``tokenizer.json``: transformers' Gemma converter of that model, with one repair. The converter
  makes the user-defined whitespace pieces added tokens with the escaped content "▁▁", which never
  matches raw text (added tokens are split off before the normalizer turns spaces into U+2581), so
  a run of spaces became "▁" + ... instead of one piece. The repair stores them with real spaces
  in the vocabulary and the added tokens, and drops the BPE merges that built them (added tokens
  are split off before BPE, so those merges could never fire in SentencePiece either).
"""

from __future__ import annotations

import json
from pathlib import Path

from xpack.errors import XpackError

SPACE = "\u2581"
TOKEN_TYPE_USER_DEFINED = 4


def _is_whitespace_piece(piece: str) -> bool:
    return bool(piece) and piece.replace(SPACE, " ").strip(" ") == ""


def build_spm_model(meta: dict) -> bytes:
    """A serialized SentencePiece ModelProto equal to the GGUF's vocabulary."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    tokens, scores, types = meta["tokens"], meta["scores"], meta["token_type"]
    if scores is None or not (len(tokens) == len(scores) == len(types)):
        raise XpackError("the GGUF's SentencePiece vocabulary is incomplete (tokens, scores and types differ in length)")
    proto = pb.ModelProto()
    trainer = proto.trainer_spec
    trainer.model_type = pb.TrainerSpec.BPE
    trainer.vocab_size = len(tokens)
    trainer.byte_fallback = True
    trainer.allow_whitespace_only_pieces = True
    for field, key in (("unk_id", "unk_token_id"), ("bos_id", "bos_token_id"), ("eos_id", "eos_token_id"), ("pad_id", "pad_token_id")):
        setattr(trainer, field, -1 if meta[key] is None else int(meta[key]))
    normalizer = proto.normalizer_spec
    normalizer.name = "identity"
    normalizer.add_dummy_prefix = bool(meta.get("add_space_prefix", False))
    normalizer.remove_extra_whitespaces = False
    normalizer.escape_whitespaces = True
    for token, score, kind in zip(tokens, scores, types):
        piece = proto.pieces.add()
        piece.piece = token.replace(" ", SPACE) if int(kind) == TOKEN_TYPE_USER_DEFINED else token
        piece.score = float(score)
        piece.type = int(kind)
    return proto.SerializeToString()


def build_spm_tokenizer(meta: dict, max_length: int, chat_template: str | None, workdir: Path):
    """A Gemma ``PreTrainedTokenizerFast`` converted from the rebuilt SentencePiece model.

    Writes ``tokenizer.model`` into ``workdir`` (the converter reads it from a file); call
    :func:`repair_whitespace_pieces` on the saved folder afterwards.
    """
    from transformers import GemmaTokenizerFast

    model_file = Path(workdir) / "tokenizer.model"
    model_file.write_bytes(build_spm_model(meta))
    tokens = meta["tokens"]

    def tok(key):
        i = meta[key]
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    extra = {"chat_template": chat_template} if chat_template else {}
    return GemmaTokenizerFast(
        vocab_file=str(model_file),
        bos_token=tok("bos_token_id"),
        eos_token=tok("eos_token_id"),
        unk_token=tok("unk_token_id"),
        pad_token=tok("pad_token_id"),
        add_bos_token=meta["add_bos_token"],
        add_eos_token=meta["add_eos_token"],
        model_max_length=max_length,
        clean_up_tokenization_spaces=False,
        **extra,
    )


def repair_whitespace_pieces(folder: Path) -> int:
    """Store user-defined whitespace pieces with real spaces in tokenizer.json and tokenizer_config.json.

    Returns how many pieces were repaired (30 for Gemma 3).
    """
    folder = Path(folder)
    path = folder / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    renamed: dict[str, str] = {}
    for added in data.get("added_tokens", []):
        if not added.get("special") and _is_whitespace_piece(added["content"]):
            escaped = added["content"].replace(" ", SPACE)
            renamed[escaped] = escaped.replace(SPACE, " ")
            added["content"] = renamed[escaped]
    model = data["model"]
    vocab = model["vocab"]
    for escaped, literal in renamed.items():
        if escaped in vocab:
            vocab[literal] = vocab.pop(escaped)

    def parts(merge):
        return merge.split(" ", 1) if isinstance(merge, str) else list(merge)

    model["merges"] = [m for m in model["merges"] if "".join(parts(m)) not in renamed and not any(p in renamed for p in parts(m))]
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")

    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    for entry in (config.get("added_tokens_decoder") or {}).values():
        if entry.get("content") in renamed:
            entry["content"] = renamed[entry["content"]]
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return len(renamed)
