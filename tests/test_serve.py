"""`xpack serve` (issue #13) driven as a user drives it, with OpenAI's Python client: chat, streaming, completions,
images, errors, the API key, the queue, a client that goes away, metrics, SIGTERM, a tampered artifact.

Most tests serve in this process (uvicorn in a thread, the same ``build_app`` the command runs); the last ones run
the ``xpack serve`` command itself. The answers are checked against the runtime's own greedy generation.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest
from PIL import Image

from xpack.errors import XpackError
from xpack.packager.demo.base_model import demo_base_dir, demo_gguf_path
from xpack.packager.export.job import Calibration, export
from xpack.runtimes.registry import load
from xpack.runtimes.serve.app import build_app
from xpack.runtimes.serve.config import ServeConfig
from xpack.runtimes.settings import GenerationSettings

PROMPT = "Describe a normal chest X-ray."
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,"  # the demo model counts on and on: a long generation
GREEDY = GenerationSettings(max_tokens=16, temperature=0, repetition_penalty=1.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """``build_app`` served by uvicorn in a thread on a free loopback port, as `xpack serve` serves it."""

    def __init__(self, runtime, **config):
        import uvicorn

        self.config = ServeConfig(port=free_port(), **{"model_name": "m", **config})
        self.app = build_app(runtime, self.config)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.config.port, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.config.port}"

    def client(self, key: str = "none", **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, **kwargs)

    def get(self, path: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
        return http(f"{self.url}{path}", headers=headers)

    def post(self, path: str, body: bytes, headers: dict | None = None) -> tuple[int, dict, bytes]:
        return http(f"{self.url}{path}", body, {"Content-Type": "application/json", **(headers or {})})

    def metric(self, line_start: str) -> float:
        _, _, text = self.get("/metrics", {"Authorization": f"Bearer {self.config.api_key}"} if self.config.api_key else None)
        values = [float(line.rsplit(" ", 1)[1]) for line in text.decode().splitlines() if line.startswith(line_start)]
        return sum(values)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


def http(url: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, dict, bytes]:
    request = urllib.request.Request(url, data=body, headers=headers or {}, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def png(width=32, height=32, color=(200, 40, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def image_message(url: str, text: str = "Describe this image.") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def demo_onnx(tmp_path_factory):
    """The demo model as `xpack demo` exports it to ONNX (int4, the fixed scheme)."""
    out = tmp_path_factory.mktemp("serve") / "demo-onnx"
    export(str(demo_base_dir()), "onnx", out, bits=4, threads=2, calibration=Calibration(enabled=False))
    return out


@pytest.fixture(scope="module", params=["gguf", "onnx"])
def served(request, cpu):
    """The demo GGUF (llama.cpp) and the demo ONNX (onnxruntime), each served with its runtime loaded once."""
    path = demo_gguf_path() if request.param == "gguf" else request.getfixturevalue("demo_onnx")
    runtime = load(path, cpu)
    expected = runtime.generate(PROMPT, GREEDY)
    server = LiveServer(runtime)
    yield server, expected
    server.stop()


# -- text ------------------------------------------------------------------------------------------


def test_chat_stream_and_completions_answer_as_the_runtime(served):
    server, expected = served
    client = server.client()
    (model,) = client.models.list().data
    assert model.id == "m" and model.model_extra["images"] is False and model.model_extra["format"] in ("gguf", "onnx", "llamacpp")
    chat = client.chat.completions.create(model="m", messages=[{"role": "user", "content": PROMPT}], max_tokens=16, temperature=0,
                                          extra_body={"repetition_penalty": 1.0})
    assert chat.choices[0].message.content == expected.text and chat.choices[0].finish_reason == ("length" if expected.finish_reason == "length" else "stop")
    assert chat.usage.prompt_tokens == expected.prompt_tokens and chat.usage.completion_tokens == expected.completion_tokens
    pieces, usage, reasons = [], None, []
    for chunk in client.chat.completions.create(model="m", messages=[{"role": "user", "content": PROMPT}], max_tokens=16, temperature=0,
                                                extra_body={"repetition_penalty": 1.0}, stream=True, stream_options={"include_usage": True}):
        usage = chunk.usage or usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            reasons.append(choice.finish_reason)
    assert "".join(pieces) == expected.text and len(pieces) > 3 and reasons[-1] == chat.choices[0].finish_reason
    assert usage.completion_tokens == expected.completion_tokens
    raw = client.completions.create(model="m", prompt=COUNTING, max_tokens=12, temperature=0, stop=[" 15"])
    assert raw.choices[0].finish_reason == "stop" and raw.choices[0].text.startswith(" 13, 14,") and "15" not in raw.choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(model="m", prompt=COUNTING, max_tokens=12, temperature=0,
                                                                            stop=[" 15"], stream=True))
    assert streamed == raw.choices[0].text
    assert server.metric('xpack_requests_total{route="/v1/chat/completions",status="200"}') == 2
    assert server.metric('xpack_tokens_total{kind="completion"}') >= 2 * expected.completion_tokens
    assert server.metric("xpack_time_to_first_token_seconds_count") == 4


def test_bad_requests_get_openais_errors_and_the_server_keeps_serving(served):
    server, expected = served
    client = server.client()
    ok = {"model": "m", "messages": [{"role": "user", "content": PROMPT}]}
    cases = [
        (b"{not json", 400, None),
        (json.dumps({"model": "m"}).encode(), 400, "messages"),
        (json.dumps({**ok, "temperature": 7}).encode(), 422, "temperature"),
        (json.dumps({**ok, "n": 3}).encode(), 422, "n"),
        (json.dumps({**ok, "max_tokens": "many"}).encode(), 422, "max_tokens"),
        (json.dumps({**ok, "stop": ["a", "b", "c", "d", "e"]}).encode(), 422, "stop"),
        (json.dumps({**ok, "tools": [{"type": "function"}]}).encode(), 422, "tools"),
        (json.dumps({**ok, "model": "gpt-4o"}).encode(), 404, "model"),
        (json.dumps({**ok, "messages": image_message(data_uri(png()))}).encode(), 400, "messages"),  # a text-only model
        (json.dumps({**ok, "messages": [{"role": "user", "content": "word " * 5000}]}).encode(), 400, None),  # past the context
        (json.dumps({**ok, "messages": [{"role": "user", "content": "x" * (21 * 2**20)}]}).encode(), 413, None),
    ]
    for body, status, param in cases:
        got, _, text = server.post("/v1/chat/completions", body)
        error = json.loads(text)["error"]
        assert got == status and error["param"] == param and error["message"] and "Traceback" not in text.decode(), (status, text[:300])
    assert server.post("/v1/nowhere", b"{}")[0] == 404 and server.get("/v1/chat/completions")[0] == 405
    with pytest.raises(openai.UnprocessableEntityError, match="temperature"):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": PROMPT}], temperature=5)
    again = client.chat.completions.create(model="m", messages=[{"role": "user", "content": PROMPT}], max_tokens=16, temperature=0,
                                           extra_body={"repetition_penalty": 1.0})
    assert again.choices[0].message.content == expected.text


def test_a_full_queue_answers_429_and_a_client_that_leaves_stops_its_generation(cpu):
    runtime = load(demo_gguf_path(), cpu)
    server = LiveServer(runtime, max_queue=0, max_concurrency=2)
    try:
        client = server.client()
        other = client.completions.create(model="m", prompt=COUNTING, max_tokens=40, temperature=0, stream=True)
        stream = client.completions.create(model="m", prompt=COUNTING, max_tokens=400, temperature=0, stream=True)
        first, head = next(iter(stream)), next(iter(other))
        assert first.choices[0].text and head.choices[0].text  # both slots generate
        status, headers, body = server.post("/v1/completions", json.dumps({"model": "m", "prompt": "hi", "max_tokens": 2}).encode())
        assert status == 429 and headers.get("retry-after") == "1" and json.loads(body)["error"]["type"] == "rate_limit_error"
        stream.close()  # the client goes away mid-stream
        deadline = time.time() + 30
        while server.metric('xpack_generations_total{finish_reason="cancelled"}') < 1:
            assert time.time() < deadline, "the generation of a client that left was not stopped"
            time.sleep(0.1)
        assert server.metric("xpack_tokens_total{kind=\"completion\"}") < 400
        assert "".join(c.choices[0].text for c in [head, *other]).startswith(" 13, 14,")  # the other sequence went on to its end
        after = client.completions.create(model="m", prompt=COUNTING, max_tokens=4, temperature=0)  # the slot came back
        assert after.choices[0].text.startswith(" 13")
    finally:
        server.stop()


def test_a_request_that_leaves_the_queue_gives_its_place_back(cpu):
    """One generating, one waiting (max_queue=1) that hangs up: the next request is queued, not refused with 429."""
    server = LiveServer(load(demo_gguf_path(), cpu), max_queue=1, max_concurrency=1)
    try:
        client = server.client()
        stream = client.completions.create(model="m", prompt=COUNTING, max_tokens=300, temperature=0, stream=True)
        next(iter(stream))
        body = json.dumps({"model": "m", "prompt": "hi", "max_tokens": 2}).encode()
        waiting = socket.create_connection(("127.0.0.1", server.config.port))
        waiting.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: "
                        + str(len(body)).encode() + b"\r\n\r\n" + body)
        deadline = time.time() + 10
        while server.metric("xpack_queue_depth") < 1:
            assert time.time() < deadline, "the second request never queued"
            time.sleep(0.05)
        waiting.close()  # it hangs up while waiting for the slot
        while server.metric("xpack_queue_depth") > 0:
            assert time.time() < deadline + 10, "the place of a request that left stayed taken"
            time.sleep(0.05)
        stream.close()
        answer = client.completions.create(model="m", prompt=COUNTING, max_tokens=2, temperature=0)
        assert answer.choices[0].text
    finally:
        server.stop()


def test_api_key(cpu):
    server = LiveServer(load(demo_gguf_path(), cpu), api_key="s3cret")
    try:
        assert server.get("/health")[0] == 200
        for headers in (None, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            status, _, body = server.get("/v1/models", headers)
            assert status == 401 and json.loads(body)["error"]["type"] == "authentication_error"
        assert server.get("/metrics")[0] == 401
        with pytest.raises(openai.AuthenticationError):
            server.client("wrong").models.list()
        answer = server.client("s3cret").chat.completions.create(model="m", messages=[{"role": "user", "content": PROMPT}], max_tokens=4)
        assert answer.choices[0].message.content
    finally:
        server.stop()


def test_a_merged_checkpoint_is_served_through_transformers(twin_factory, cpu):
    """The torch runtime behind the same API (a merged checkpoint, on a box that has torch)."""
    runtime = load(twin_factory.get("llama").model_dir, cpu)
    expected = runtime.generate(PROMPT, GREEDY)
    server = LiveServer(runtime)
    try:
        client = server.client()
        assert client.models.list().data[0].model_extra["runtime"] == "torch"
        chat = client.chat.completions.create(model="m", messages=[{"role": "user", "content": PROMPT}], max_tokens=16, temperature=0,
                                              extra_body={"repetition_penalty": 1.0})
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": PROMPT}], max_tokens=16, temperature=0, extra_body={"repetition_penalty": 1.0},
            stream=True) if c.choices)
        assert chat.choices[0].message.content == streamed == expected.text
    finally:
        server.stop()


def test_concurrent_requests_are_decoded_together_and_answer_as_alone(cpu):
    """Continuous batching on the demo GGUF (llamacpp_batch.py): three streams open at once share llama.cpp's decode
    steps (three sequences in one batch), and each greedy answer is the runtime's own single-sequence one, token for
    token; a request with an image-less chat, a raw prompt and a stop string among them."""
    runtime = load(demo_gguf_path(), cpu)
    prompts = [PROMPT, "What does a radiologist do?", "Name the chambers of the heart."]
    expected = [runtime.generate(p, GenerationSettings(max_tokens=24, temperature=0, repetition_penalty=1.0)).text for p in prompts]
    counted = runtime.generate(COUNTING, GenerationSettings(max_tokens=12, temperature=0, stop=(" 15",)), raw=True).text
    sampled = dict(temperature=0.8, top_p=0.9, top_k=50, repetition_penalty=1.1, frequency_penalty=0.5, presence_penalty=0.3, seed=7)
    drawn = runtime.generate(PROMPT, GenerationSettings(max_tokens=24, **sampled)).text
    server = LiveServer(runtime, max_concurrency=4)
    try:
        client = server.client()
        streams = [client.chat.completions.create(model="m", messages=[{"role": "user", "content": p}], max_tokens=24, temperature=0,
                                                  extra_body={"repetition_penalty": 1.0}, stream=True) for p in prompts]
        raw = client.completions.create(model="m", prompt=COUNTING, max_tokens=12, temperature=0, stop=[" 15"], stream=True)
        firsts = [next(iter(s)) for s in streams]  # every stream has begun before any is read on
        texts = ["".join(c.choices[0].delta.content or "" for c in [first, *s] if c.choices) for first, s in zip(firsts, streams)]
        assert texts == expected
        assert "".join(c.choices[0].text for c in raw) == counted
        assert runtime._batcher.widest >= 3  # sequences in one llama_decode
        # a seeded draw with every sampling field: the same chain and seed as `xpack run`, the same text
        openai_fields = {k: v for k, v in sampled.items() if k not in ("top_k", "repetition_penalty")}
        chat = client.chat.completions.create(model="m", messages=[{"role": "user", "content": PROMPT}], max_tokens=24, **openai_fields,
                                              extra_body={"top_k": 50, "repetition_penalty": 1.1})
        assert chat.choices[0].message.content == drawn
        assert runtime._batcher.reused > 0  # that prompt went to the slot holding it: not prefilled again (the prompt cache)
    finally:
        server.stop()


def test_parallel_sequences_are_refused_where_a_runtime_has_none(cpu, demo_onnx):
    with load(demo_onnx, cpu) as runtime:
        with pytest.raises(XpackError, match="runs one sequence at a time"):
            build_app(runtime, ServeConfig(max_concurrency=2))
    with load(demo_gguf_path(), cpu) as runtime:
        with pytest.raises(XpackError, match="at most 64 sequences"):
            build_app(runtime, ServeConfig(max_concurrency=65))


# -- images ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vision_artifacts(twin_factory, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-vision")
    gemma3, mllama = twin_factory.get("gemma3_vision").model_dir, twin_factory.get("mllama").model_dir
    export(str(gemma3), "gguf", root / "gemma3-gguf", quant="F32")
    export(str(gemma3), "onnx", root / "gemma3-onnx", bits=32, threads=1)
    export(str(mllama), "onnx", root / "mllama-onnx", bits=32, threads=1)
    return root


@pytest.mark.parametrize("artifact", ["gemma3-gguf", "gemma3-onnx", "mllama-onnx"])
def test_images_as_data_uris_and_media_files(vision_artifacts, artifact, cpu, tmp_path):
    """Every vision artifact xpack exports answers an image as its runtime does; files only from under --media-dir."""
    media = tmp_path / "media"
    media.mkdir()
    picture = png(48, 40)
    (media / "cxr.png").write_bytes(picture)
    (tmp_path / "outside.png").write_bytes(picture)
    runtime = load(vision_artifacts / artifact, cpu)
    messages = image_message("unused")
    hf = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]
    expected = runtime.generate(hf, GREEDY.with_overrides(max_tokens=8), image=Image.open(io.BytesIO(picture)).convert("RGB"))
    server = LiveServer(runtime, media_dir=media, max_image_pixels=1_000_000)
    try:
        client = server.client()
        assert client.models.list().data[0].model_extra["images"] is True
        for url in (data_uri(picture), "cxr.png", f"file://{media / 'cxr.png'}"):
            messages = image_message(url)
            answer = client.chat.completions.create(model="m", messages=messages, max_tokens=8, temperature=0, extra_body={"repetition_penalty": 1.0})
            assert answer.choices[0].message.content == expected.text and answer.usage.prompt_tokens == expected.prompt_tokens, url[:40]
        bomb = png(1200, 1000)  # 1.2 million pixels, above this server's 1 million: refused from the header
        refusals = [
            (data_uri(bomb), 413), ("../outside.png", 400), (f"file://{tmp_path / 'outside.png'}", 400), ("https://example.org/x.png", 400),
            ("data:image/png;base64,not-base64!!", 400), (data_uri(b"not an image at all"), 400), ("missing.png", 400),
        ]
        for url, status in refusals:
            body = json.dumps({"model": "m", "messages": image_message(url), "max_tokens": 2}).encode()
            got, _, text = server.post("/v1/chat/completions", body)
            assert got == status and "error" in json.loads(text), (url[:50], got, text[:200])
        two = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(picture)}}] * 2}]
        assert server.post("/v1/chat/completions", json.dumps({"model": "m", "messages": two}).encode())[0] == 422
    finally:
        server.stop()


def test_onnx_card_names_the_serving_commands(demo_onnx):
    card = (demo_onnx / "README.md").read_text()
    assert f"xpack serve --artifact {demo_onnx.name}" in card and "vllm serve" in card


# -- the command -----------------------------------------------------------------------------------


def _start(args: list[str], port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "xpack", "serve", "--port", str(port), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 120
    while True:
        assert proc.poll() is None, proc.communicate()[1]
        try:
            if http(f"http://127.0.0.1:{port}/health")[0] == 200:
                return proc
        except OSError:
            pass
        assert time.time() < deadline, "xpack serve did not start"
        time.sleep(0.2)


def test_sigterm_finishes_the_request_in_flight_and_exits_0():
    port = free_port()
    proc = _start(["--artifact", str(demo_gguf_path()), "--profile", "cpu16"], port)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
    name = client.models.list().data[0].id
    stream = client.completions.create(model=name, prompt=COUNTING, max_tokens=40, temperature=0, stream=True)
    chunks = iter(stream)
    text = next(chunks).choices[0].text
    proc.send_signal(signal.SIGTERM)
    reasons = []
    for chunk in chunks:
        text += chunk.choices[0].text
        reasons.append(chunk.choices[0].finish_reason)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert reasons[-1] == "length" and text.startswith(" 13, 14,") and "Traceback" not in err and "stopped" in err


def test_a_tampered_artifact_is_refused_at_start(twin_factory, tmp_path):
    out = tmp_path / "gguf"
    manifest = export(str(twin_factory.get("llama").model_dir), "gguf", out, quant="F32")
    card = (out / "README.md").read_text()
    assert f"xpack serve --artifact {out.name}" in card and "llama-server -m" in card  # the card names the serving commands
    model = out / manifest["gguf_file"]
    data = bytearray(model.read_bytes())
    data[-10] ^= 0xFF
    model.write_bytes(bytes(data))
    r = subprocess.run([sys.executable, "-m", "xpack", "serve", "--artifact", str(out), "--profile", "cpu16", "--port", str(free_port())],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "sha256" in r.stderr and "Traceback" not in r.stderr, r.stderr
