"""Hugging Face chat templates rendered without transformers (jinja2 only), exactly as transformers does.

The environment matches ``transformers.utils.chat_template_utils._compile_jinja_template``:
``ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)`` with the ``loopcontrols``
extension, a ``{% generation %}`` block (rendered as its body), ``raise_exception``,
``strftime_now`` and the non-escaping ``tojson`` filter; the variables are ``messages``,
``add_generation_prompt``, ``tools``/``documents`` (None) and the tokenizer's special tokens
(``bos_token``, ``eos_token``, ``unk_token``, ``pad_token``, ..., ``additional_special_tokens``),
as ``tokenizer.special_tokens_map`` gives them.

A template is untrusted input (it ships with a downloaded model): besides the sandbox, rendering is bounded
(issue #14): no ``{% include %}``/``{% import %}`` (there is nothing to include), string and list repetition and
powers capped, at most MAX_RENDER_CHARS of output and MAX_RENDER_SECONDS of time (where a timer can interrupt:
the main thread), and whatever goes wrong inside it is one line.

Templates are found where transformers looks: ``chat_template.jinja``, ``chat_template.json``
(processors), ``tokenizer_config.json``'s ``chat_template`` (a string or a list of named
templates), or a GGUF's ``tokenizer.chat_template`` metadata.
"""

from __future__ import annotations

import contextlib
import functools
import json
import signal
import threading
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Sequence

from xpack.errors import XpackError

__all__ = ["ChatTemplate", "END_OF_TURN_TOKENS", "TemplateChat", "render_chat_template", "find_chat_template", "special_tokens_of"]

# Tokens that end an assistant turn in the chat formats of the seed models (and common others);
# a runtime stops on the model's EOS and on any of these that its vocabulary has as one token.
END_OF_TURN_TOKENS: tuple[str, ...] = (
    "<end_of_turn>",  # Gemma 2/3, MedGemma
    "<|eot_id|>",  # Llama 3.x
    "<|eom_id|>",  # Llama 3.x (end of a tool-call message)
    "<|im_end|>",  # ChatML (SmolLM2, Qwen)
    "<|end|>",  # Phi-3
    "<|endoftext|>",
    "<|end_of_text|>",
)


MAX_RENDER_CHARS = 4_000_000  # a 128k-token conversation is ~0.5M characters
MAX_RENDER_SECONDS = 5.0  # templates render in milliseconds
MAX_REPEAT = 1_000_000  # the longest str/list a template may make with * (and the largest power with **)


# tokenizer.special_tokens_map's keys (transformers' SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_KEYS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
    "additional_special_tokens",
)


@functools.lru_cache(maxsize=32)
def _compile(template: str):
    import jinja2
    import jinja2.ext
    from jinja2 import nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` (transformers' assistant-mask marker) renders its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    class BoundedEnvironment(ImmutableSandboxedEnvironment):
        """The sandbox with ``*`` and ``**`` bounded: ``'x' * 10**9`` would take a gigabyte before any output check."""

        intercepted_binops = frozenset(["*", "**"])

        def call_binop(self, context, operator, left, right):
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_REPEAT:
                        raise jinja2.sandbox.SecurityError(f"the template repeats a sequence to {len(seq) * n} items (limit {MAX_REPEAT})")
            if operator == "**" and isinstance(right, int) and abs(right) > 64:
                raise jinja2.sandbox.SecurityError(f"the template raises a number to the power {right} (limit 64)")
            return super().call_binop(context, operator, left, right)

    env = BoundedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise XpackError(f"the chat template does not parse (line {exc.lineno}: {exc.message}); fix or replace it") from None


def render_chat_template(
    template: str,
    messages: Sequence[dict],
    add_generation_prompt: bool = True,
    special_tokens: dict | None = None,
    **extra,
) -> str:
    """Render ``messages`` with ``template`` as ``tokenizer.apply_chat_template(..., tokenize=False)`` does."""
    import jinja2

    compiled = _compile(template)
    variables = {k: v for k, v in (special_tokens or {}).items() if v}
    variables.update(extra)
    pieces, size = [], 0
    try:
        with _time_limit(MAX_RENDER_SECONDS):
            for piece in compiled.generate(messages=list(messages), tools=None, documents=None, add_generation_prompt=add_generation_prompt, **variables):
                size += len(piece)
                if size > MAX_RENDER_CHARS:
                    raise XpackError(f"the model's chat template writes more than {MAX_RENDER_CHARS} characters for this conversation; "
                                     "it is broken or hostile: replace it (chat_template.jinja)")
                pieces.append(piece)
    except jinja2.exceptions.TemplateError as exc:
        raise XpackError(f"the model's chat template rejected the conversation: {exc}") from None
    except _RenderTimeout:
        raise XpackError(f"the model's chat template ran for more than {MAX_RENDER_SECONDS:.0f} s; it is broken or hostile: replace it "
                         "(chat_template.jinja)") from None
    except (TypeError, ValueError, OverflowError, AttributeError, KeyError, IndexError, RecursionError, ZeroDivisionError, MemoryError) as exc:
        # e.g. {% include %} with no loader (TypeError), range() past the sandbox's limit (OverflowError)
        raise XpackError(f"the model's chat template failed on this conversation ({type(exc).__name__}: {str(exc)[:200]}); "
                         "fix or replace it (chat_template.jinja)") from None
    return "".join(pieces)


class _RenderTimeout(Exception):
    pass


@contextlib.contextmanager
def _time_limit(seconds: float):
    """Interrupt the block after ``seconds`` with a real-time timer: only in the main thread of a process on a system
    with SIGALRM, and only when no other timer is set; elsewhere the block runs unbounded in time."""
    usable = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread() and signal.getitimer(signal.ITIMER_REAL)[0] == 0
    if not usable:
        yield
        return

    def expire(signum, frame):
        raise _RenderTimeout()

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _token_text(value) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):  # a serialized AddedToken
        return value["content"]
    return None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise XpackError(f"{path} is not valid JSON ({exc}); fix or re-create the file") from None
    return data if isinstance(data, dict) else {}


def _pick_template(value) -> str | None:
    """tokenizer_config.json's chat_template: a string, or a list of {"name", "template"} (use "default")."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        chosen = named.get("default")
        return chosen if isinstance(chosen, str) else None
    return None


def find_chat_template(folder: "str | Path") -> str | None:
    """The chat template of a checkpoint folder, looked up as transformers does; None if it has none."""
    folder = Path(folder)
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    tok_config = folder / "tokenizer_config.json"
    if tok_config.is_file():
        template = _pick_template(_read_json(tok_config).get("chat_template"))
        if template:
            return template
    json_file = folder / "chat_template.json"
    if json_file.is_file():
        template = _pick_template(_read_json(json_file).get("chat_template"))
        if template:
            return template
    return None


def special_tokens_of(folder: "str | Path") -> dict:
    """The special-token variables of a checkpoint folder, from tokenizer_config.json and special_tokens_map.json."""
    folder = Path(folder)
    tokens: dict = {}
    sources = [_read_json(folder / n) if (folder / n).is_file() else {} for n in ("tokenizer_config.json", "special_tokens_map.json")]
    if "added_tokens_decoder" in sources[0]:
        # A current tokenizer_config.json is authoritative; transformers reads special_tokens_map.json
        # only for legacy ones, and then lets it override (tokenization_utils_base._from_pretrained).
        sources = sources[:1]
    for data in sources:  # later sources win
        for key in SPECIAL_TOKEN_KEYS:
            if key not in data:
                continue
            value = data[key]
            if key == "additional_special_tokens":
                if isinstance(value, list):
                    tokens[key] = [t for t in (_token_text(v) for v in value) if t]
            else:
                text = _token_text(value)
                if text:
                    tokens[key] = text
                elif value is None:
                    tokens.pop(key, None)
    return tokens


@dataclass(frozen=True)
class ChatTemplate:
    """A chat template plus the special tokens it may refer to."""

    template: str
    special_tokens: dict = field(default_factory=dict)

    @classmethod
    def from_folder(cls, folder: "str | Path") -> "ChatTemplate | None":
        template = find_chat_template(folder)
        return cls(template, special_tokens_of(folder)) if template else None

    @classmethod
    def from_gguf_metadata(cls, metadata: dict, token_text) -> "ChatTemplate | None":
        """From a GGUF's metadata (string values, as llama.cpp returns them); ``token_text(id)`` names a token."""
        template = metadata.get("tokenizer.chat_template")
        if not template:
            return None
        special = {}
        for key, meta_key in (
            ("bos_token", "tokenizer.ggml.bos_token_id"),
            ("eos_token", "tokenizer.ggml.eos_token_id"),
            ("unk_token", "tokenizer.ggml.unknown_token_id"),
            ("sep_token", "tokenizer.ggml.seperator_token_id"),
            ("pad_token", "tokenizer.ggml.padding_token_id"),
            ("cls_token", "tokenizer.ggml.cls_token_id"),
            ("mask_token", "tokenizer.ggml.mask_token_id"),
        ):
            raw = metadata.get(meta_key)
            try:
                token_id = int(raw) if raw is not None else -1
            except ValueError:
                continue
            if token_id >= 0:
                text = token_text(token_id)
                if text:
                    special[key] = text
        return cls(template, special)

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        return render_chat_template(self.template, messages, add_generation_prompt, self.special_tokens)


class TemplateChat:
    """``has_chat_template`` and ``render_chat`` of a runtime that renders with a :class:`ChatTemplate`
    (``self.chat_template``, None when the artifact has none); mixed in before ``Runtime``."""

    chat_template: "ChatTemplate | None" = None

    def _no_chat_template(self) -> str:
        """The one-line error when the artifact has no chat template (runtimes say where they looked)."""
        return f"{getattr(self, 'artifact', 'the artifact')} has no chat template; re-export it from a model with one"

    @property
    def has_chat_template(self) -> bool:
        return self.chat_template is not None

    def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        if self.chat_template is None:
            raise XpackError(self._no_chat_template())
        return self.chat_template.render(messages, add_generation_prompt)
