"""Compare a rebuilt tokenizer with llama.cpp's tokenizer of the GGUF it came from, token for token."""

from __future__ import annotations

from pathlib import Path

from xpack.packager.io.checkpoint import load_tokenizer
from xpack.runtimes.llama_import import load_llama_cpp

SAMPLE_TEXTS = (
    "The quick brown fox jumps over the lazy dog. It's a sunny day, isn't it?",
    "FINDINGS: There is a 3.5cm hypoattenuating lesion in segment VII of the liver. No intrahepatic biliary dilatation.",
    "IMPRESSION: Right lower lobe consolidation, consistent with pneumonia; recommend follow-up radiograph in 6-8 weeks.",
    "Dates and sizes: 2024 3.5cm 10mm 0.75 mm x 12,345 1e-3 v2.0.1 #42 (n=128) 100%",
    "Punctuation!? \"quoted\" 'single' [brackets] {braces} <angle> a/b\\c @user ~tilde ^caret -- ... ;:",
    "Unicode: café naïve résumé é, 中文测试, Ελληνικά, русский, 日本語のテキスト, emoji 🙂🚀👩‍⚕️ ✓ ±5°",
    "Multiple   spaces\tand\ttabs\n\nnew lines\n\n\n  indented line   \n   trailing spaces   ",
    " leading space, \u00a0no-break space, zero\u200bwidth, control \x01 chars and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
)
CHAT = [
    {"role": "system", "content": "You are an expert radiologist."},
    {"role": "user", "content": "Chest X-ray, 54-year-old female with cough and fever. Describe the findings."},
    {"role": "assistant", "content": "FINDINGS: Right lower lobe opacity.\n\nIMPRESSION:  Pneumonia."},
    {"role": "user", "content": "  And   the heart?  "},
]


def sample_texts(tokenizer) -> list[str]:
    """The fixed samples, one line of the tokenizer's own special tokens, and chats rendered by its template."""
    texts = list(SAMPLE_TEXTS)
    specials = [t for t in tokenizer.all_special_tokens if t][:6]
    texts.append(" ".join(specials) + " inline specials" + "".join(specials) + "x")
    if getattr(tokenizer, "chat_template", None):
        for messages in (CHAT[:2], CHAT[1:2], CHAT[1:]):
            try:
                texts.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=messages[-1]["role"] == "user"))
            except Exception:  # noqa: BLE001 - a template may refuse e.g. a system turn; the others still count
                continue
    return texts


def check_tokenizer(model_dir, gguf_path) -> dict:
    """Token ids of the folder's HF tokenizer vs llama.cpp's tokenizer of ``gguf_path`` on :func:`sample_texts`.

    Returns ``{"texts": n, "tokens": n, "mismatches": n}`` (``mismatches`` counts texts whose ids
    differ, BOS handling included). Without ``llama_cpp`` the comparison is skipped: the dict then has
    ``"skipped": "<reason>"`` and ``mismatches`` is None.
    """
    tokenizer = load_tokenizer(model_dir)
    texts = sample_texts(tokenizer)
    hf_ids = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    result = {"texts": len(texts), "tokens": sum(len(i) for i in hf_ids), "mismatches": None}
    try:
        llama_cpp = load_llama_cpp()
    except ImportError as exc:
        result["skipped"] = f"llama_cpp is not importable ({exc}); install llama-cpp-python to compare with llama.cpp"
        return result

    llm = llama_cpp.Llama(model_path=str(Path(gguf_path)), vocab_only=True, verbose=False)
    try:
        details = []
        for text, ids in zip(texts, hf_ids):
            ref = list(llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))
            if ref != list(ids):
                details.append({"text": text[:60], "hf": ids[:40], "llama_cpp": ref[:40]})
        # BOS: the tokenizer's own add_special_tokens against llama.cpp's add_bos from the GGUF.
        with_bos = tokenizer.encode(texts[0])
        ref = list(llm.tokenize(texts[0].encode("utf-8"), add_bos=True, special=True))
        if ref != with_bos:
            details.append({"text": "(with BOS) " + texts[0][:50], "hf": with_bos[:40], "llama_cpp": ref[:40]})
    finally:
        close = getattr(llm, "close", None)
        if close:
            close()
    result["mismatches"] = len(details)
    if details:
        result["details"] = details
    return result
