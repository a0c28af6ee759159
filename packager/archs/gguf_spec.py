"""The ``gguf`` section of an architecture table: what the GGUF writer (packager/export/gguf/) needs to
know about an architecture, as gguf-py's and llama.cpp's converter name it."""

from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class MmprojSpec:
    """The vision tower + projector written as llama.cpp's ``mmproj`` file (mtmd)."""

    projector_type: str  # gguf.VisionProjectorType member, e.g. "gemma3"
    prefixes: tuple[str, ...]  # canonical tensor-name prefixes that go into the mmproj
    rename: tuple[tuple[str, str], ...] = ()  # regex -> replacement, before gguf-py's MMPROJ name map
    skip: tuple[re.Pattern, ...] = ()
    norm_shift: dict[str, float] = field(default_factory=dict)  # name suffix -> value added to the weight
    force_types: tuple[tuple[str, str], ...] = ()  # regex of the local name -> storage type ("F32", "F16")
    hparams: tuple[tuple[str, str], ...] = ()  # GGUFWriter method -> vision_config key


@dataclass(frozen=True)
class HparamSpec:
    """One GGUF hyperparameter: ``GGUFWriter.<method>(config[<key>])``; optional ones may be absent."""

    method: str
    key: str
    optional: bool = False


@dataclass(frozen=True)
class GgufSpec:
    arch: str = ""  # gguf.MODEL_ARCH member (lower case), e.g. "llama", "gemma3"
    text_prefix: str = "model."  # where the text decoder's tensors start in the checkpoint
    skip: tuple[re.Pattern, ...] = ()  # canonical names the text GGUF does not hold
    permute_qk: bool = False  # llama.cpp's Q/K row permutation (rotary halves interleaved)
    norm_shift: float = 0.0  # added to every norm weight (Gemma stores w - 1)
    trim_embeddings_to_vocab: bool = False  # drop embedding rows past the tokenizer's vocabulary
    add_space_prefix: bool | None = None  # the SentencePiece tokenizer's add_space_prefix, when it must be written
    hparams: tuple[tuple[str, ...], ...] = ()  # (GGUFWriter method, config key[, "optional"])
    mmproj: MmprojSpec | None = None
    unsupported: str | None = None  # why llama.cpp cannot run this architecture (the whole error line)

    def __post_init__(self):
        if not self.arch and not self.unsupported:
            raise ValueError("a gguf section names its 'arch' or says why it is 'unsupported'")

    @property
    def hparam_specs(self) -> list[HparamSpec]:
        return [HparamSpec(e[0], e[1], len(e) > 2 and e[2] == "optional") for e in self.hparams]
