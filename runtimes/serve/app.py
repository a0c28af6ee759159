"""The HTTP face of `xpack serve`: OpenAI's routes on Starlette, served by uvicorn (xpack/cli/serve.py).

Why Starlette and not FastAPI: the server needs OpenAI's error JSON for every refusal (FastAPI's own validation
answers in its own 422 shape), streams with a plain generator, and an edge box installs fewer packages; the request
checking is requests.py's, in one place. Every response goes through :func:`_endpoint`: the API key, the body size,
OpenAI's error JSON for any refusal, a one-line log and a 500 without a traceback for anything unexpected, and the
request counter.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import sys
import time
import traceback
import uuid

from xpack import __version__
from xpack.errors import XpackError
from xpack.runtimes.artifacts import read_manifest
from xpack.runtimes.base import Runtime
from xpack.runtimes.serve.config import ServeConfig
from xpack.runtimes.serve.engine import Engine, Ticket
from xpack.runtimes.serve.images import decode_image_url
from xpack.runtimes.serve.metrics import Metrics
from xpack.runtimes.serve.requests import ApiError, Job, chat_job, completion_job, parse_json

DISCONNECT_POLL_S = 0.1
DRAIN_BYTES = 256 * 2**20  # a body past the limit is read and dropped up to this, so the client hears the 413
DONE = object()


def model_card(runtime: Runtime, config: ServeConfig) -> dict:
    """What /v1/models says of the one model: OpenAI's fields, then the artifact's own from its manifest."""
    folder = runtime.artifact if runtime.artifact.is_dir() else runtime.artifact.parent
    try:
        manifest = read_manifest(folder)
    except XpackError:
        manifest = {}
    verification = manifest.get("verification") or {}
    return {
        "id": config.model_name, "object": "model", "created": int(folder.stat().st_mtime), "owned_by": "xpack",
        "format": manifest.get("format") or runtime.name, "quant": manifest.get("quant"), "architecture": manifest.get("architecture"),
        "runtime": runtime.name, "profile": runtime.profile.name, "images": bool(runtime.accepts_images),
        "parity": {profile: {"pass": entry.get("parity_pass"), "date": entry.get("date"), "kl_mean": (entry.get("parity") or {}).get("kl_mean"),
                             "top1_agreement": (entry.get("parity") or {}).get("top1_agreement")} for profile, entry in verification.items()}
                  or "not verified (run `xpack verify`)",
        "artifact": str(runtime.artifact),
    }


def build_app(runtime: Runtime, config: ServeConfig):
    """The Starlette application serving ``runtime`` (loaded, its manifest's hashes checked) as ``config`` says."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    metrics = Metrics()
    runtime.prompt_cache = config.prompt_cache  # before the engine: a batched runtime takes it when it starts its slots
    engine = Engine(runtime, config, metrics)
    card = model_card(runtime, config)
    key = config.api_key.encode() if config.api_key else None

    def error_response(error: ApiError):
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    def endpoint(route: str, auth: bool = True):
        def wrap(handler):
            async def run(request):
                try:
                    if auth and key is not None:
                        _check_key(request, key)
                    response = await handler(request)
                except ApiError as error:
                    response = error_response(error)
                except XpackError as error:  # the runtime's one line: the prompt or the image was refused
                    response = error_response(_runtime_error(str(error)))
                except Exception:  # noqa: BLE001 - the client gets OpenAI's 500 JSON, the log the traceback
                    print(f"xpack serve: {request.method} {request.url.path} failed:\n{traceback.format_exc()}", file=sys.stderr)
                    response = error_response(ApiError(500, "internal error; the server's log has the details"))
                metrics.requests.labels(route, str(response.status_code)).inc()
                return response

            return run

        return wrap

    async def health(request):
        return JSONResponse({"status": "ok", "model": config.model_name})

    async def models(request):
        return JSONResponse({"object": "list", "data": [card]})

    async def model(request):
        if request.path_params["model"] != config.model_name:
            raise ApiError(404, f"no model {request.path_params['model']!r}; this server serves {config.model_name!r}", param="model",
                           code="model_not_found")
        return JSONResponse(card)

    async def prometheus(request):
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    async def chat(request):
        data = parse_json(await _read_body(request, config.max_body_bytes))
        job = chat_job(data, _image)
        return await answer(request, job)

    async def completions(request):
        return await answer(request, completion_job(parse_json(await _read_body(request, config.max_body_bytes))))

    def _image(url):
        if not runtime.accepts_images:
            raise ApiError(400, f"{config.model_name} is text-only: send no image_url parts", param="messages", code="images_not_supported")
        return decode_image_url(url, config)

    async def answer(request, job: Job):
        if job.model not in (None, "", config.model_name):
            raise ApiError(404, f"no model {job.model!r}; this server serves {config.model_name!r}", param="model", code="model_not_found")
        if config.max_tokens_limit and job.settings.max_tokens > config.max_tokens_limit:
            raise ApiError(422, f"max_tokens {job.settings.max_tokens} is above this server's limit of {config.max_tokens_limit}", param="max_tokens")
        ticket = engine.admit()
        started = time.perf_counter()
        ident = ("chatcmpl-" if job.kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        if not job.stream:
            task = asyncio.ensure_future(engine.generate(ticket, job))
            result = await _until_done_or_gone(request, task, ticket)
            metrics.latency.observe(time.perf_counter() - started)
            return JSONResponse(_completion_body(job, ident, config.model_name, result))
        pieces: asyncio.Queue = asyncio.Queue()
        task = asyncio.ensure_future(engine.generate(ticket, job, pieces.put_nowait))
        task.add_done_callback(lambda _: pieces.put_nowait(DONE))
        first = await _until_first(request, task, pieces, ticket)  # an error before the first token is still a status code

        async def events():
            try:
                for chunk in _opening_chunks(job, ident, config.model_name):
                    yield _sse(chunk)
                item = first
                while item is not DONE:
                    yield _sse(_piece_chunk(job, ident, config.model_name, item))
                    item = await _next_or_gone(request, pieces)
                    if item is None:  # the client went away (Starlette also cancels this stream itself under ASGI < 2.4)
                        return
                result = task.result()
                yield _sse(_closing_chunk(job, ident, config.model_name, result.finish_reason))
                if job.include_usage:
                    yield _sse(_usage_chunk(job, ident, config.model_name, result))
                yield "data: [DONE]\n\n"
                metrics.latency.observe(time.perf_counter() - started)
            except Exception as exc:  # noqa: BLE001 - a failure after the first token: an error event, then the end
                error = exc if isinstance(exc, ApiError) else _runtime_error(str(exc)) if isinstance(exc, XpackError) else ApiError(500, "internal error")
                yield _sse(error.body())
                yield "data: [DONE]\n\n"
            finally:
                ticket.abandon(task)  # a client gone mid-stream: its generation ends at the next token

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def not_found(request, exc):
        status = getattr(exc, "status_code", 404)
        message = f"no route {request.method} {request.url.path}" if status == 404 else f"{request.method} is not allowed on {request.url.path}"
        metrics.requests.labels("unknown", str(status)).inc()
        return error_response(ApiError(status, message))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        engine.close()

    routes = [
        Route("/health", endpoint("/health", auth=False)(health), methods=["GET"]),
        Route("/v1/models", endpoint("/v1/models")(models), methods=["GET"]),
        Route("/v1/models/{model:path}", endpoint("/v1/models")(model), methods=["GET"]),
        Route("/v1/chat/completions", endpoint("/v1/chat/completions")(chat), methods=["POST"]),
        Route("/v1/completions", endpoint("/v1/completions")(completions), methods=["POST"]),
        Route("/metrics", endpoint("/metrics")(prometheus), methods=["GET"]),
    ]
    app = Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found}, lifespan=lifespan)
    app.state.engine, app.state.metrics = engine, metrics
    return app


# -- the pieces ------------------------------------------------------------------------------------


def _check_key(request, key: bytes) -> None:
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key):
        raise ApiError(401, "a valid API key is needed: send `Authorization: Bearer <key>` (the server's --api-key)", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})


async def _read_body(request, limit: int) -> bytes:
    """The body, refused with 413 once it passes ``limit`` (announced or streamed), never parsed nor kept. What is past
    the limit is read and dropped up to DRAIN_BYTES, so that the client (which sends its whole body before reading the
    answer) gets the 413 instead of a reset connection; a larger body is cut off."""
    declared = request.headers.get("content-length")
    size, chunks, over = 0, [], False
    if declared and declared.isdigit() and int(declared) > limit:
        over = True
        if int(declared) > DRAIN_BYTES:
            raise ApiError(413, f"the request body is {declared} bytes, more than this server's limit of {limit}", code="request_too_large")
    async for chunk in request.stream():
        size += len(chunk)
        over = over or size > limit
        if over:
            if size > DRAIN_BYTES:
                break
            continue
        chunks.append(chunk)
    if over:
        raise ApiError(413, f"the request body is more than this server's limit of {limit} bytes", code="request_too_large")
    return b"".join(chunks)


def _runtime_error(message: str) -> ApiError:
    code = "context_length_exceeded" if "more than the context" in message else None
    return ApiError(400, message, code=code)


async def _until_done_or_gone(request, task: asyncio.Future, ticket: Ticket):
    """The generation's result; a client that disconnects meanwhile ends it (and gets nothing)."""
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                ticket.abandon(task)
                raise ApiError(499, "the client closed the connection")
    except asyncio.CancelledError:
        ticket.abandon(task)
        raise


async def _until_first(request, task: asyncio.Future, pieces: asyncio.Queue, ticket: Ticket):
    """The first streamed piece (or DONE); an error before it raises here, so that it is answered with its status."""
    try:
        while True:
            try:
                item = await asyncio.wait_for(pieces.get(), timeout=DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    ticket.abandon(task)
                    raise ApiError(499, "the client closed the connection") from None
                continue
            if item is DONE and task.exception() is not None:
                raise task.exception()
            return item
    except asyncio.CancelledError:
        ticket.abandon(task)
        raise


async def _next_or_gone(request, pieces: asyncio.Queue):
    """The next streamed piece (or DONE); None once the client has disconnected, checked at least every DISCONNECT_POLL_S."""
    deadline = time.monotonic() + DISCONNECT_POLL_S
    while True:
        try:
            item = await asyncio.wait_for(pieces.get(), timeout=max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            item = None
        if item is not None and time.monotonic() < deadline:
            return item
        if await request.is_disconnected():
            return None
        if item is not None:
            return item
        deadline = time.monotonic() + DISCONNECT_POLL_S


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _usage(result) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


def _finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def _base(job: Job, ident: str, model: str, chunk: bool) -> dict:
    kind = ("chat.completion" if job.kind == "chat" else "text_completion") + (".chunk" if chunk and job.kind == "chat" else "")
    return {"id": ident, "object": kind, "created": int(time.time()), "model": model, "system_fingerprint": f"xpack-{__version__}"}


def _completion_body(job: Job, ident: str, model: str, result) -> dict:
    if job.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": result.text}, "logprobs": None, "finish_reason": _finish(result.finish_reason)}
    else:
        choice = {"index": 0, "text": result.text, "logprobs": None, "finish_reason": _finish(result.finish_reason)}
    timings = {"ttft_s": round(result.ttft_s, 4), "decode_tok_s": round(result.decode_tok_s, 2), "total_s": round(result.total_s, 4)}
    return {**_base(job, ident, model, False), "choices": [choice], "usage": _usage(result), "xpack": timings}


def _opening_chunks(job: Job, ident: str, model: str) -> list[dict]:
    if job.kind != "chat":
        return []
    return [{**_base(job, ident, model, True), "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                                             "finish_reason": None}]}]


def _piece_chunk(job: Job, ident: str, model: str, piece: str) -> dict:
    if job.kind == "chat":
        choice = {"index": 0, "delta": {"content": piece}, "logprobs": None, "finish_reason": None}
    else:
        choice = {"index": 0, "text": piece, "logprobs": None, "finish_reason": None}
    return {**_base(job, ident, model, True), "choices": [choice]}


def _closing_chunk(job: Job, ident: str, model: str, reason: str) -> dict:
    if job.kind == "chat":
        choice = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": _finish(reason)}
    else:
        choice = {"index": 0, "text": "", "logprobs": None, "finish_reason": _finish(reason)}
    return {**_base(job, ident, model, True), "choices": [choice]}


def _usage_chunk(job: Job, ident: str, model: str, result) -> dict:
    return {**_base(job, ident, model, True), "choices": [], "usage": _usage(result)}
