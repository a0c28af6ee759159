"""The ollama Modelfile beside a GGUF export: the seed card's sampling defaults and the model's end-of-turn stops."""

from __future__ import annotations

from pathlib import Path

from xpack import __version__
from xpack.packager.io.checkpoint import Checkpoint
from xpack.runtimes.artifacts import MODELFILE, read_json
from xpack.runtimes.chat import END_OF_TURN_TOKENS
from xpack.runtimes.settings import GenerationSettings


def stop_tokens(ckpt: Checkpoint) -> list[str]:
    """The end-of-turn tokens (the runtimes' list) that this checkpoint's tokenizer has as added tokens."""
    cfg = read_json(ckpt.path / "tokenizer_config.json")
    added = {v.get("content") for v in (cfg.get("added_tokens_decoder") or {}).values()}
    return [tok for tok in END_OF_TURN_TOKENS if tok in added]


def write_modelfile(tmp: Path, gguf_file: str, ckpt: Checkpoint) -> None:
    gen = GenerationSettings()
    lines = [
        f"# ollama Modelfile written by xpack {__version__}",
        f"FROM ./{gguf_file}",
        f"PARAMETER temperature {gen.temperature}",
        f"PARAMETER top_p {gen.top_p}",
        f"PARAMETER top_k {gen.top_k}",
        f"PARAMETER repeat_penalty {gen.repetition_penalty}",
        f"PARAMETER num_predict {gen.max_tokens}",
        *[f'PARAMETER stop "{t}"' for t in stop_tokens(ckpt)],
    ]
    (tmp / MODELFILE).write_text("\n".join(lines) + "\n")
