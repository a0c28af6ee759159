"""OpenAI request bodies as xpack jobs, and OpenAI's error JSON.

What maps to what (README, "xpack serve"): ``max_tokens`` (or ``max_completion_tokens``), ``temperature``,
``top_p``, ``seed``, ``stop``, ``frequency_penalty`` and ``presence_penalty`` are OpenAI's (the two penalties with
OpenAI's arithmetic on every backend, runtimes/penalties.py). ``repetition_penalty`` and ``top_k`` are extension
fields, the seed card's sampling knobs. A field a request leaves out takes xpack's default (runtimes/settings.py,
the seed card's: temperature 0.7, top_p 0.9, top_k 50, repetition_penalty 1.1, 256 tokens), as llama-server and
ollama use their own. What xpack cannot honour (``n`` > 1, ``logprobs``, tools, ``response_format``, ``echo``,
``suffix``, ``best_of`` > 1) is refused with a 422 naming the field, never ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from xpack.errors import XpackError
from xpack.runtimes.settings import GenerationSettings

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error",
               413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}
ROLES = ("system", "user", "assistant")
_UNSUPPORTED = {
    "logprobs": (False, None), "top_logprobs": (None,), "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
    "response_format": (None, {"type": "text"}), "echo": (False, None), "suffix": (None, ""), "logit_bias": (None, {}),
}


class ApiError(Exception):
    """An error the client gets as OpenAI's JSON: ``{"error": {"message", "type", "param", "code"}}`` with ``status``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "invalid_request_error"), "param": self.param,
                          "code": self.code}}


@dataclass
class Job:
    """One generation as the engine runs it."""

    kind: str  # "chat" or "completion"
    prompt: "str | list[dict]"  # chat messages (Hugging Face's content parts) or a raw prompt
    raw: bool
    settings: GenerationSettings
    image: Any = None  # an RGB PIL image
    stream: bool = False
    include_usage: bool = False
    model: str | None = None


def parse_json(body: bytes) -> dict:
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "the request body is not JSON") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return data


def chat_job(data: dict, decode_image) -> Job:
    """A /v1/chat/completions body; ``decode_image(url)`` turns an image_url into an image (images.py)."""
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content}", param="messages")
    converted, images = [], []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise ApiError(400 if not isinstance(message, dict) else 422,
                           f"messages[{i}] needs a role of {', '.join(ROLES)} (tool and function messages are not supported)", param=f"messages[{i}]")
        converted.append({"role": message["role"], "content": _content(message.get("content"), i, images)})
    if len(images) > 1:
        raise ApiError(422, "one image per request: the runtimes take one image per conversation", param="messages")
    if converted[-1]["role"] == "assistant":
        raise ApiError(422, "the last message must be the user's (or the system's): the server writes the assistant's turn", param="messages")
    image = decode_image(images[0]) if images else None
    return Job("chat", converted, False, settings_of(data), image, *_stream(data), model=data.get("model"))


def completion_job(data: dict) -> Job:
    """A /v1/completions body: the prompt is fed as written (a raw prompt)."""
    prompt = data.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise ApiError(400 if prompt is None else 422, "prompt must be one non-empty string (batches of prompts and token-id prompts are not supported)",
                       param="prompt")
    if data.get("best_of") not in (None, 1):
        raise ApiError(422, "best_of is not supported (only 1)", param="best_of")
    return Job("completion", prompt, True, settings_of(data), None, *_stream(data), model=data.get("model"))


def _content(content, i: int, images: list) -> "str | list[dict]":
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        raise ApiError(400, f"messages[{i}].content must be a string or a list of content parts", param=f"messages[{i}].content")
    parts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            images.append(url)
            parts.append({"type": "image"})
        else:
            raise ApiError(422, f"messages[{i}] has a content part of type {kind!r}; text and image_url are supported", param=f"messages[{i}].content")
    return parts


def _stream(data: dict) -> tuple[bool, bool]:
    stream = data.get("stream", False)
    options = data.get("stream_options") or {}
    if not isinstance(stream, bool) or not isinstance(options, dict):
        raise ApiError(422, "stream must be true or false, stream_options an object", param="stream")
    return stream, bool(options.get("include_usage", False))


def settings_of(data: dict) -> GenerationSettings:
    """The request's sampling fields over xpack's defaults (the seed card's)."""
    for name, allowed in _UNSUPPORTED.items():
        if name in data and data[name] not in allowed:
            raise ApiError(422, f"{name} is not supported by this server", param=name)
    if data.get("n", 1) != 1:
        raise ApiError(422, "n must be 1: one answer per request", param="n")
    max_tokens = data.get("max_completion_tokens", data.get("max_tokens"))
    fields = {"max_tokens": max_tokens, "temperature": data.get("temperature"), "top_p": data.get("top_p"), "seed": data.get("seed"),
              "stop": data.get("stop"), "frequency_penalty": data.get("frequency_penalty"), "presence_penalty": data.get("presence_penalty"),
              "repetition_penalty": data.get("repetition_penalty"), "top_k": data.get("top_k")}
    if isinstance(fields["temperature"], (int, float)) and not isinstance(fields["temperature"], bool) and fields["temperature"] > 2:
        raise ApiError(422, "temperature must be between 0 and 2", param="temperature")
    if isinstance(fields["stop"], list) and not all(isinstance(s, str) for s in fields["stop"]):
        raise ApiError(422, "stop must be a string or a list of up to 4 strings", param="stop")
    try:
        return GenerationSettings().with_overrides(**fields)
    except (XpackError, TypeError) as exc:
        message = str(exc).removeprefix("bad generation setting: ")
        param = next((name for name in fields if message.startswith(name)), None)
        raise ApiError(422, message, param=param) from None
