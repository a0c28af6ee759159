"""Calibration text: what the model reads while xpack measures which of its weights matter.

The statistics (importance matrix, Fisher) are only as good as the text, and a report must be able
to say which text was used, so reading it, its sha256, the built-in default and its tokenization
live here. The default is clinical prose written for xpack (data/calibration_medical.txt) and kept
disjoint from the evaluation text (packager/verify/data/eval_medical.txt): a quantization tuned on
the text that later scores it would look better than it is.

Chat JSONL rows are kept as messages and rendered with the model's own chat template only when
tokenized, so one calibration file serves every model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from xpack.errors import XpackError

DEFAULT_NAME = "calibration_medical.txt"
JSONL_SUFFIXES = (".jsonl", ".ndjson")
ROW_KEYS = ("messages", "prompt", "text")

Message = dict  # {"role": str, "content": str}
Chunk = str | tuple  # plain text, or one chat row: a tuple of messages


@dataclass(frozen=True)
class CalibrationText:
    source: str  # the file, or "built-in calibration_medical.txt"
    sha256: str  # of the file's bytes
    chunks: tuple[Chunk, ...]  # plain text (the whole file) or chat rows (rendered at tokenization)

    def tokenize(self, tokenizer, seq_len: int, max_tokens: int | None = None) -> tuple[list[list[int]], int]:
        """Token sequences of at most ``seq_len`` tokens for a Hugging Face tokenizer, and their total token count.

        Chunks are packed whole into sequences while they fit; a longer chunk is cut into windows, each
        continuing window starting with the tokenizer's own prefix (BOS where it adds one). At most
        ``max_tokens`` tokens in all (the last sequence is cut short).
        """
        if seq_len < 2:
            raise XpackError(f"calibration sequences need at least 2 tokens (got {seq_len})")
        prefix = _special_prefix(tokenizer)
        sequences: list[list[int]] = []
        current: list[int] = []
        for index, chunk in enumerate(self.chunks):
            for piece in _windows(_chunk_ids(tokenizer, chunk, prefix, index), prefix, seq_len):
                if current and len(current) + len(piece) > seq_len:
                    sequences.append(current)
                    current = []
                current.extend(piece)
        if current:
            sequences.append(current)
        return _limit(sequences, max_tokens)


def read_calibration(path: Path | None) -> CalibrationText:
    """The calibration text in ``path`` (plain text, or chat JSONL), or the built-in medical text for None."""
    if path is None:
        data = resources.files(__package__).joinpath("data", DEFAULT_NAME).read_bytes()
        return CalibrationText(f"built-in {DEFAULT_NAME}", hashlib.sha256(data).hexdigest(), (data.decode("utf-8"),))
    path = Path(path)
    if not path.is_file():
        raise XpackError(f"calibration file {path} does not exist; pass a plain-text or chat JSONL file")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise XpackError(f"calibration file {path} is not UTF-8 text ({exc})") from None
    chunks = tuple(_jsonl_chunks(path, text)) if _is_jsonl(path, text) else ((text,) if text.strip() else ())
    if not chunks:
        raise XpackError(f"calibration file {path} is empty")
    return CalibrationText(str(path), hashlib.sha256(data).hexdigest(), chunks)


# ---------------------------------------------------------------------------------------------
# JSONL


def _is_jsonl(path: Path, text: str) -> bool:
    """JSONL by its suffix, or by a first line that is a chat row (a .txt export of a data set)."""
    if path.suffix.lower() in JSONL_SUFFIXES:
        return True
    first = next((line for line in text.splitlines() if line.strip()), "")
    try:
        row = json.loads(first)
    except ValueError:
        return False
    return isinstance(row, dict) and any(k in row for k in ROW_KEYS)


def _jsonl_chunks(path: Path, text: str) -> list[Chunk]:
    chunks = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise XpackError(f"{path}:{number}: not valid JSON ({exc})") from None
        chunks.append(_row_chunk(row, f"{path}:{number}"))
    return chunks


def _row_chunk(row, where: str) -> Chunk:
    """One JSONL row: {"messages": [{role, content}]}, {"prompt", "response"} (a user turn and its answer) or {"text"}."""
    if isinstance(row, dict) and isinstance(row.get("messages"), list) and row["messages"]:
        return tuple(_message(m, where) for m in row["messages"])
    if isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get("response"), str):
        return ({"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]})
    if isinstance(row, dict) and isinstance(row.get("text"), str):
        return row["text"]
    got = f"keys {sorted(row)}" if isinstance(row, dict) else type(row).__name__
    raise XpackError(f'{where}: expected a JSON object with "messages", "prompt" and "response", or "text"; got {got}')


def _message(m, where: str) -> Message:
    if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
        raise XpackError(f'{where}: every message needs a "role" and a text "content"; got {json.dumps(m)[:80]}')
    return {"role": m["role"], "content": m["content"]}


# ---------------------------------------------------------------------------------------------
# tokenization


def _special_prefix(tokenizer) -> list[int]:
    """What the tokenizer puts before a text of its own accord (``[bos]`` for Gemma and Llama 3, nothing for SmolLM2)."""
    with_special = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    starts = [i for i in range(len(with_special)) if with_special[i : i + len(plain)] == plain]
    return with_special[: starts[0]] if starts else []


def _chunk_ids(tokenizer, chunk: Chunk, prefix: list[int], index: int) -> list[int]:
    if isinstance(chunk, str):
        return prefix + tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]
    from jinja2 import TemplateError

    if not getattr(tokenizer, "chat_template", None):
        raise XpackError("the calibration file holds chat rows but the model's tokenizer has no chat template; pass plain text instead")
    try:
        rendered = tokenizer.apply_chat_template(list(chunk), tokenize=False)
    except (TemplateError, ValueError, TypeError) as exc:  # raise_exception() in a template is a TemplateError
        raise XpackError(f"the model's chat template rejects calibration row {index + 1}: {exc}") from None
    return tokenizer(rendered, add_special_tokens=False, verbose=False)["input_ids"]


def _windows(ids: list[int], prefix: list[int], seq_len: int) -> list[list[int]]:
    """``ids`` cut to ``seq_len``: the first window as is, each further one after ``prefix``."""
    out = [ids[:seq_len]]
    step = max(1, seq_len - len(prefix))
    for start in range(seq_len, len(ids), step):
        out.append(prefix + ids[start : start + step])
    return out


def _limit(sequences: list[list[int]], max_tokens: int | None) -> tuple[list[list[int]], int]:
    if max_tokens is None:
        return sequences, sum(map(len, sequences))
    out, total = [], 0
    for seq in sequences:
        if total >= max_tokens:
            break
        seq = seq[: max_tokens - total]
        out.append(seq)
        total += len(seq)
    return out, total
