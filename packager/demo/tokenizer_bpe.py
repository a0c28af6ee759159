"""Byte-level BPE (GPT-2 style) tokenizer rebuilt from GGUF metadata.

transformers' GGUF import writes a SentencePiece-style ``tokenizer.model`` (a copy of the GGUF) and a
``tokenizer.json`` with ``byte_fallback=true`` for SmolLM2, which llama.cpp then misreads. Its real
tokenizer is byte-level BPE; this rebuilds it from the GGUF's tokens, merges and token types.
``tokenizer_check.py`` compares it token for token with llama.cpp.
"""

from __future__ import annotations

from xpack.errors import XpackError

# GGUF token types (llama.cpp's llama_token_type / gguf.TokenType).
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4


def build_bpe_tokenizer(meta: dict, max_length: int):
    """A ``PreTrainedTokenizerFast`` equal to the original byte-level BPE tokenizer (SmolLM2's)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tokens: list[str] = list(meta["tokens"])
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise XpackError("the GGUF vocabulary has duplicate tokens; reinstall the built-in model's package")
    merges = [tuple(m.split(" ", 1)) for m in meta["merges"]]

    tokenizer = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None, fuse_unk=False, byte_fallback=False)
    )
    tokenizer.normalizer = None
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)

    def tok(i):
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    bos, eos, unk, pad = (tok(meta[k]) for k in ("bos_token_id", "eos_token_id", "unk_token_id", "pad_token_id"))

    byte_level = processors.ByteLevel(trim_offsets=False)
    if meta["add_bos_token"] or meta["add_eos_token"]:
        single = " ".join(([f"{bos}:0"] if meta["add_bos_token"] else []) + ["$A:0"] + ([f"{eos}:0"] if meta["add_eos_token"] else []))
        pair = single + " " + " ".join(([f"{bos}:1"] if meta["add_bos_token"] else []) + ["$B:1"] + ([f"{eos}:1"] if meta["add_eos_token"] else []))
        specials = sorted({t for t in (bos if meta["add_bos_token"] else None, eos if meta["add_eos_token"] else None) if t})
        template = processors.TemplateProcessing(single=single, pair=pair, special_tokens=[(t, vocab[t]) for t in specials])
        tokenizer.post_processor = processors.Sequence([byte_level, template])
    else:
        tokenizer.post_processor = byte_level

    special = [
        AddedToken(tokens[i], special=True, normalized=False, lstrip=False, rstrip=False, single_word=False)
        for i, t in enumerate(meta["token_type"])
        if int(t) == TOKEN_TYPE_CONTROL
    ]
    user_defined = [
        AddedToken(tokens[i], special=False, normalized=False, lstrip=False, rstrip=False, single_word=False)
        for i, t in enumerate(meta["token_type"])
        if int(t) == TOKEN_TYPE_USER_DEFINED
    ]
    tokenizer.add_special_tokens(special)
    if user_defined:
        tokenizer.add_tokens(user_defined)

    extra = {}
    if meta["chat_template"]:
        extra["chat_template"] = meta["chat_template"]
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=bos,
        eos_token=eos,
        unk_token=unk,
        pad_token=pad,
        model_max_length=max_length,
        add_bos_token=meta["add_bos_token"],
        add_eos_token=meta["add_eos_token"],
        clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"],
        **extra,
    )
    return hf
