"""The runtime interface: settings, registry, llama.cpp on the demo GGUF, the torch reference on a twin, `xpack run`."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from click.testing import CliRunner

from xpack.cli import cli
from xpack.errors import XpackError
from xpack.packager.demo.base_model import demo_base_dir, demo_gguf_path
from xpack.profiles.machine import machine_info
from xpack.profiles.profile import load_profile
from xpack.runtimes.base import Runtime
from xpack.runtimes.memory import PeakMemory
from xpack.runtimes.messages import load_image, to_messages
from xpack.runtimes.registry import RUNTIMES, get_runtime, load, runtime_for
from xpack.runtimes.settings import GenerationResult, GenerationSettings

PROMPT = "What is the capital of France?"


@pytest.fixture(scope="module")
def demo_gguf():
    return demo_gguf_path()


@pytest.fixture(scope="module")
def one_thread_file(tmp_path_factory):
    """The same as a user profile file, for `xpack run --profile FILE`."""
    path = tmp_path_factory.mktemp("profiles") / "one.toml"
    path.write_text('device = "cpu"\nthreads = 1\nn_ctx = 512\n')
    return str(path)


@pytest.fixture(scope="module")
def gguf_rt(demo_gguf, cpu):
    rt = load(demo_gguf, cpu)
    yield rt
    rt.close()


GREEDY = GenerationSettings().with_overrides(temperature=0, max_tokens=16, repetition_penalty=1.0)


# --------------------------------------------------------------------------------------------------
# Settings and helpers
# --------------------------------------------------------------------------------------------------


def test_generation_defaults_are_the_seed_cards():
    s = GenerationSettings()
    assert (s.max_tokens, s.temperature, s.top_p, s.top_k, s.repetition_penalty, s.seed) == (256, 0.7, 0.9, 50, 1.1, None)
    assert not s.greedy and s.with_overrides(temperature=0).greedy
    assert s.with_overrides(max_tokens=None, top_k=5) == dataclasses.replace(s, top_k=5)
    with pytest.raises(TypeError, match="unknown generation setting"):
        s.with_overrides(beams=2)
    for bad in ({"max_tokens": 0}, {"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"top_k": -1}, {"repetition_penalty": 0}, {"seed": -1}):
        with pytest.raises(XpackError, match="bad generation setting"):
            s.with_overrides(**bad)


def test_messages_and_images(tmp_path):
    assert to_messages("hi") == [{"role": "user", "content": "hi"}]
    assert to_messages("hi", system="s")[0] == {"role": "system", "content": "s"}
    with pytest.raises(XpackError, match="needs a 'role' and a 'content'"):
        to_messages([{"text": "x"}])
    with pytest.raises(XpackError, match="already starts with a system message"):
        to_messages([{"role": "system", "content": "a"}, {"role": "user", "content": "b"}], system="c")
    from PIL import Image

    good = tmp_path / "x.png"
    Image.new("RGB", (8, 6), "white").save(good)
    assert load_image(good).size == (8, 6)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(XpackError, match=r"bad.png is not a readable image \(UnidentifiedImageError\)"):
        load_image(bad)
    with pytest.raises(XpackError, match="does not exist"):
        load_image(tmp_path / "missing.png")


def test_peak_memory_sees_an_allocation():
    import mmap
    import time

    with PeakMemory() as before:
        pass
    with PeakMemory() as mem:
        # 64 MB of new pages, touched (malloc may hand back freed memory the process still holds: after the
        # tests that load whole models it does, and the resident size does not move)
        block = mmap.mmap(-1, 64 * 2**20)
        block.write(b"\x01" * len(block))
        time.sleep(0.1)  # held across several samples: the process's all-time high may be far above it
        block.close()
    assert mem.peak_mb >= before.peak_mb + 50


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------


def test_registry():
    assert RUNTIMES == {
        "torch": "xpack.runtimes.torch_ref:TorchRuntime",
        "llamacpp": "xpack.runtimes.llamacpp:LlamaCppRuntime",
        "onnx": "xpack.runtimes.onnxrt:OnnxRuntime",
    }
    with pytest.raises(XpackError, match=r"^unknown runtime: tensorrt \(known: llamacpp, onnx, torch\)$"):
        get_runtime("tensorrt")
    assert get_runtime("onnx").name == "onnx" and get_runtime("onnx").formats == ("onnx",)
    cls = get_runtime("llamacpp")
    assert issubclass(cls, Runtime) and cls.name == "llamacpp" and cls.formats == ("gguf",)
    assert get_runtime("torch").name == "torch"


def test_runtime_for_each_kind_of_path(tmp_path, demo_gguf, twin_factory):
    assert runtime_for(demo_gguf) == "llamacpp"
    assert runtime_for(twin_factory.get("llama").model_dir) == "torch"

    export = tmp_path / "export"
    export.mkdir()
    (export / "manifest.json").write_text(json.dumps({"format": "gguf", "gguf_file": "m.gguf"}))
    assert runtime_for(export) == "llamacpp"
    loose = tmp_path / "loose"
    loose.mkdir()
    (loose / "model-Q4_K_M.gguf").write_bytes(b"GGUF")
    (loose / "mmproj-model-f16.gguf").write_bytes(b"GGUF")
    assert runtime_for(loose) == "llamacpp"
    with pytest.raises(XpackError, match="is a vision projector"):
        runtime_for(loose / "mmproj-model-f16.gguf")

    both = tmp_path / "both"
    both.mkdir()
    (both / "config.json").write_text("{}")
    (both / "model.safetensors").write_bytes(b"")
    (both / "model.gguf").write_bytes(b"GGUF")
    assert runtime_for(both) == "llamacpp"  # no profile: GGUF first
    assert runtime_for(both, load_profile("a100")) == "torch"  # a100 prefers torch
    assert runtime_for(both, load_profile("cpu16")) == "llamacpp"

    onnx = tmp_path / "onnx"
    onnx.mkdir()
    (onnx / "manifest.json").write_text(json.dumps({"format": "onnx"}))
    assert runtime_for(onnx) == "onnx"
    (tmp_path / "notes.txt").write_text("x")
    for bad in (tmp_path / "notes.txt", tmp_path / "empty-dir", tmp_path / "missing"):
        if bad.name == "empty-dir":
            bad.mkdir()
        with pytest.raises(XpackError, match=r"pass a \.gguf file, a folder from `xpack export`.*Hugging Face checkpoint folder"):
            runtime_for(bad)
    with pytest.raises(XpackError, match="the torch runtime cannot load"):
        load(demo_gguf, load_profile("cpu16"), runtime="torch")


# --------------------------------------------------------------------------------------------------
# llama.cpp on the demo GGUF
# --------------------------------------------------------------------------------------------------


def test_llamacpp_greedy_is_deterministic_and_streams(gguf_rt):
    pieces: list[str] = []
    first = gguf_rt.generate(PROMPT, GREEDY, on_token=pieces.append)
    second = gguf_rt.generate(PROMPT, GREEDY)
    assert isinstance(first, GenerationResult)
    assert first.text == second.text and first.text.strip()
    assert "".join(pieces) == first.text and len(pieces) > 1
    assert first.completion_tokens <= 16 and first.finish_reason in ("stop", "length")
    assert first.prompt_tokens == len(gguf_rt.tokenize(gguf_rt.prompt_text(PROMPT)))
    assert first.runtime == "llamacpp" and first.profile == "cpu16" and first.peak_gpu_mb is None
    assert first.load_s > 0 and first.ttft_s > 0 and first.total_s >= first.ttft_s and first.peak_rss_mb > 50
    assert first.decode_tok_s > 0 and first.prompt_tok_s > 0
    assert set(first.to_dict()) >= {"text", "prompt_tokens", "completion_tokens", "load_s", "ttft_s", "decode_tok_s", "peak_rss_mb"}


def test_llamacpp_logits_match_greedy(gguf_rt):
    ids = gguf_rt.tokenize(gguf_rt.prompt_text(PROMPT))
    logits = gguf_rt.logits(ids)
    assert logits.shape == (len(ids), gguf_rt.vocab_size) and str(logits.dtype) == "float32"
    one = gguf_rt.generate(PROMPT, GREEDY.with_overrides(max_tokens=1))
    assert gguf_rt.detokenize([int(logits[-1].argmax())]) == one.text
    assert gguf_rt.logits(ids[:5]).shape == (5, gguf_rt.vocab_size)


def test_llamacpp_logits_over_several_batches_on_the_loaded_model(gguf_rt):
    """Teacher forcing past one batch of 512 gives the rows a short evaluation gives, from a context on the model
    already loaded (not a second copy of the weights)."""
    ids = (gguf_rt.tokenize(" ".join([PROMPT] * 60)) * 2)[:700]
    assert len(ids) == 700
    long, short = gguf_rt.logits(ids), gguf_rt.logits(ids[:100])
    np.testing.assert_allclose(long[:100], short, atol=1e-3, rtol=0)
    assert gguf_rt._scorer._ctx.model is gguf_rt.llm._model
    last = gguf_rt.logits(ids[:600])  # the context that held 700 evaluates 600 again from the start
    np.testing.assert_allclose(last, long[:600], atol=1e-3, rtol=0)


def test_llamacpp_chat_renders_like_transformers(gguf_rt):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(demo_base_dir()))
    messages = [{"role": "system", "content": "You are a radiologist."}, {"role": "user", "content": PROMPT}]
    expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert gguf_rt.render_chat(messages) == expected
    assert gguf_rt.prompt_text(PROMPT) == tokenizer.apply_chat_template(to_messages(PROMPT), tokenize=False, add_generation_prompt=True)
    assert gguf_rt.tokenize(expected) == tokenizer(expected, add_special_tokens=False)["input_ids"]
    assert 2 in gguf_rt.stop_ids  # <|im_end|>


def test_llamacpp_sampling_with_a_seed_repeats(gguf_rt):
    settings = GenerationSettings().with_overrides(max_tokens=8, seed=1234, temperature=1.0)
    assert gguf_rt.generate(PROMPT, settings).text == gguf_rt.generate(PROMPT, settings).text


def test_llamacpp_refuses_images_and_long_prompts(gguf_rt, tmp_path, cpu):
    from PIL import Image

    image = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(image)
    with pytest.raises(XpackError, match="--image given but artifact .* is text-only"):
        gguf_rt.generate(PROMPT, GREEDY, image=image)
    with pytest.raises(XpackError, match="more than the context of 512"):
        gguf_rt.generate("word " * 600, GREEDY)


def test_llamacpp_folder_artifact(tmp_path, demo_gguf, cpu):
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "model.gguf").symlink_to(demo_gguf)
    (folder / "manifest.json").write_text(json.dumps({"format": "gguf", "gguf_file": "model.gguf"}))
    (folder / "mmproj-model-f16.gguf").write_bytes(b"GGUF")
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(image)
    with load(folder, dataclasses.replace(cpu, n_ctx=128)) as rt:
        assert rt.gguf_path == folder / "model.gguf" and rt.mmproj_path == folder / "mmproj-model-f16.gguf"
        assert rt.generate("Hi", GREEDY.with_overrides(max_tokens=2)).completion_tokens <= 2
        with pytest.raises(XpackError, match=r"^mmproj-model-f16.gguf is not a readable GGUF vision projector \(the file ends inside its header\)"):
            rt.generate("Hi", GREEDY, image=image)
    (folder / "manifest.json").write_text(json.dumps({"format": "gguf", "gguf_file": "gone.gguf"}))
    with pytest.raises(XpackError, match="names gguf_file gone.gguf, which is missing"):
        load(folder, cpu)


def test_load_adapts_the_profile_to_this_machine(demo_gguf):
    machine = machine_info()
    with load(demo_gguf, dataclasses.replace(load_profile("cpu16"), n_ctx=128)) as rt:
        assert rt.profile.threads == min(16, machine.cores)
        assert bool(rt.notes) == (machine.cores < 16)
    if not machine.gpus:
        with pytest.raises(XpackError, match="profile t4 needs a CUDA GPU"):
            load(demo_gguf, load_profile("t4"))


def test_runtimes_work_without_torch_and_transformers(demo_gguf, generate_on_edge_box):
    """An edge box: runtimes.{base,chat,profiles,llamacpp} with torch/transformers/peft/optimum unimportable."""
    r = generate_on_edge_box(demo_gguf, imports=["xpack.runtimes.chat"], temperature=0, max_tokens=4)
    assert 1 <= r["completion_tokens"] <= 4 and r["text"], r


# --------------------------------------------------------------------------------------------------
# The torch reference on a twin
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_thread_cpu(one_thread_file):
    """One thread: the twins are tiny and the suite keeps torch at one thread (see conftest.py)."""
    return load_profile(one_thread_file)


def test_torch_runtime_on_the_llama_twin(twin_factory, one_thread_cpu):
    import torch

    import twins  # imports torch: this module's other tests run without it

    twin = twin_factory.get("llama")
    threads = torch.get_num_threads()
    with load(twin.model_dir, one_thread_cpu) as rt:
        assert rt.name == "torch" and not rt.accepts_images
        pieces: list[str] = []
        settings = GREEDY.with_overrides(max_tokens=6)
        first = rt.generate(PROMPT, settings, on_token=pieces.append)
        assert first.text == rt.generate(PROMPT, settings).text
        assert "".join(pieces) == first.text
        assert first.completion_tokens <= 6 and first.prompt_tokens > 0 and first.ttft_s > 0

        tokenizer = twins.load_tokenizer(twin)
        prompt = tokenizer.apply_chat_template(to_messages(PROMPT), tokenize=False, add_generation_prompt=True)
        assert rt.prompt_text(PROMPT) == prompt
        ids = rt.tokenize(prompt)
        assert ids == tokenizer(prompt, add_special_tokens=False)["input_ids"]
        logits = rt.logits(ids)
        model = twins.load_base(twin)
        with torch.no_grad():
            expected = model(input_ids=torch.tensor([ids])).logits[0]
        torch.testing.assert_close(torch.from_numpy(logits), expected, rtol=1e-5, atol=1e-5)
        assert logits.shape == (len(ids), rt.vocab_size)

        # greedy = argmax of the teacher-forced logits, step by step
        reference = model.generate(
            torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), max_new_tokens=6,
            do_sample=False, repetition_penalty=1.0, eos_token_id=sorted(rt.stop_ids), pad_token_id=2,
        )[0, len(ids):].tolist()
        reference = [t for t in reference if t not in rt.stop_ids]
        assert first.text == tokenizer.decode(reference, skip_special_tokens=True)
    assert torch.get_num_threads() == threads  # close() restores the thread count


def test_torch_runtime_takes_an_image_on_a_vision_twin(twin_factory, one_thread_cpu, tmp_path):
    import twins  # imports torch: this module's other tests run without it

    image = tmp_path / "cxr.png"
    twins.sample_image().save(image)
    with load(twin_factory.get("gemma3_vision").model_dir, one_thread_cpu) as rt:
        assert rt.accepts_images
        result = rt.generate("Describe this image.", GREEDY.with_overrides(max_tokens=3), image=image)
        assert result.prompt_tokens > len(rt.tokenize(rt.prompt_text("Describe this image.")))  # image tokens added
    with load(twin_factory.get("gemma3").model_dir, one_thread_cpu) as rt:
        with pytest.raises(XpackError, match="is text-only"):
            rt.generate("x", GREEDY, image=image)


# --------------------------------------------------------------------------------------------------
# `xpack run`
# --------------------------------------------------------------------------------------------------


def _run(args, input=None):
    return CliRunner().invoke(cli, ["run", *args], input=input, prog_name="xpack")


def test_xpack_run_json(demo_gguf):
    r = _run(["--artifact", str(demo_gguf), "--profile", "cpu16", "--prompt", PROMPT, "--temperature", "0", "--max-tokens", "12", "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    for key in ("load_s", "ttft_s", "decode_tok_s", "prompt_tok_s", "total_s", "peak_rss_mb", "prompt_tokens", "completion_tokens"):
        assert data[key] > 0, key
    assert data["text"] and data["completion_tokens"] <= 12 and data["settings"]["temperature"] == 0
    assert data["runtime"] == "llamacpp" and data["profile"] == "cpu16"


def test_xpack_run_streams_text_to_stdout(demo_gguf, one_thread_file):
    r = _run(["--artifact", str(demo_gguf), "--profile", one_thread_file, "--prompt", PROMPT, "--temperature", "0", "--max-tokens", "6", "--system", "Be brief."])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() and "tokens" not in r.stdout
    assert "tok/s decode" in r.stderr and "loaded in" in r.stderr


def test_xpack_run_interactive(demo_gguf, one_thread_file):
    r = _run(["--artifact", str(demo_gguf), "--profile", one_thread_file, "--interactive", "--temperature", "0", "--max-tokens", "4", "--json"], input="hello\nexit\nnever read\n")
    assert r.exit_code == 0, r.output
    turns = [json.loads(line) for line in r.stdout.splitlines() if line.strip()]
    assert len(turns) == 1 and turns[0]["text"]


def test_xpack_run_errors(demo_gguf, tmp_path):
    from PIL import Image

    image = tmp_path / "cxr.png"
    Image.new("RGB", (8, 8)).save(image)
    r = _run(["--artifact", str(demo_gguf), "--profile", "cpu16", "--prompt", "x", "--image", str(image)])
    assert r.exit_code == 1
    assert r.output.strip().splitlines()[-1].startswith("Error: --image given but artifact") and "text-only" in r.output
    r = _run(["--artifact", str(demo_gguf), "--profile", "cpu16"])
    assert r.exit_code == 2 and "give exactly one of --prompt TEXT or --interactive" in r.output
    r = _run(["--artifact", str(demo_gguf), "--profile", "cpu16", "--prompt", "x", "--interactive"])
    assert r.exit_code == 2 and "give exactly one of" in r.output
    r = _run(["--artifact", str(tmp_path / "missing.gguf"), "--profile", "cpu16", "--prompt", "x"])
    assert r.exit_code == 2 and "does not exist" in r.output
    r = _run(["--artifact", str(demo_gguf), "--profile", "cpu16", "--prompt", "x", "--image", str(tmp_path / "no.png")])
    assert r.exit_code == 2 and "does not exist" in r.output
    r = _run(["--artifact", str(demo_gguf), "--profile", "cpu16", "--prompt", "x", "--top-p", "2"])
    assert r.exit_code == 1 and "Error: bad generation setting: top_p must be in (0, 1]" in r.output
    r = _run(["--artifact", str(demo_gguf), "--profile", "cpu16", "--prompt", "x", "--runtime", "onnx"])
    assert r.exit_code == 1 and "is not an .onnx file" in r.output
    r = _run(["--artifact", str(demo_gguf), "--profile", "cpu16", "--prompt", "x", "--runtime", "tensorrt"])
    assert r.exit_code == 2 and "'tensorrt' is not one of" in r.output
    r = _run(["--artifact", str(tmp_path), "--profile", "cpu16", "--prompt", "x"])
    assert r.exit_code == 1 and "Error: cannot tell how to run" in r.output


def test_runtime_modules_keep_their_imports_in_line():
    """Only torch_ref.py (and torch_offload.py, its memory budget) touch torch/transformers; heavy libraries are imported inside functions."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "runtimes"
    heavy = ("torch", "transformers", "peft", "optimum", "numpy", "llama_cpp", "PIL", "jinja2", "psutil", "onnxruntime")
    for path in sorted(root.glob("*.py")):
        tree = ast.parse(path.read_text())
        anywhere = {
            alias.name if isinstance(node, ast.Import) else node.module
            for node in ast.walk(tree)
            if isinstance(node, (ast.Import, ast.ImportFrom))
            for alias in (node.names if isinstance(node, ast.Import) else [node])
            if (alias.name if isinstance(node, ast.Import) else node.module)
        }
        top_level = {
            alias.name if isinstance(node, ast.Import) else node.module
            for node in tree.body
            if isinstance(node, (ast.Import, ast.ImportFrom))
            for alias in (node.names if isinstance(node, ast.Import) else [node])
            if (alias.name if isinstance(node, ast.Import) else node.module)
        }
        # llama_import.py imports torch (where it is installed) only to put it before a CUDA build of llama_cpp
        allowed = {"torch_ref.py": {"torch", "transformers", "peft", "optimum"}, "torch_offload.py": {"torch", "transformers", "accelerate"}, "llama_import.py": {"torch"}}.get(path.name, set())
        assert not {m for m in anywhere if m.split(".")[0] in {"torch", "transformers", "peft", "optimum"} - allowed}, path.name
        assert not {m for m in top_level if m.split(".")[0] in heavy}, path.name


def test_llama_cpp_is_imported_after_torch_where_the_build_has_cuda():
    """A CUDA build of llama.cpp imported before torch crashes torch's import (seen on an H200, runtimes/llama_import.py):
    with a ggml-cuda library present, load_llama_cpp imports torch first; with a CPU build it leaves torch alone.
    In fresh processes: torch cannot be imported twice in one."""
    import subprocess
    import sys

    pytest.importorskip("llama_cpp")
    probe = ("import sys; from xpack.runtimes import llama_import; llama_import.cuda_build = lambda: {cuda}; "
             "llama_import.load_llama_cpp(); print(','.join(k for k in sys.modules if k in ('torch', 'llama_cpp')))")
    for cuda, expected in ((True, "torch,llama_cpp"), (False, "llama_cpp")):
        out = subprocess.run([sys.executable, "-c", probe.format(cuda=cuda)], capture_output=True, text=True, check=True).stdout
        assert out.strip().splitlines()[-1] == expected, out
