"""The CUDA paths, on a GPU: the torch reference in the profile's dtype, llama.cpp with every layer
offloaded, onnxruntime's CUDA execution provider with the KV cache bound on the GPU, GPU peak memory.

Every test is marked ``gpu`` with the paths it needs (``torch``, ``bfloat16``, ``llamacpp``,
``onnx``); tests/conftest.py skips it, before any fixture builds anything, with one line naming
what is missing and how to get it. Run them with ``pytest -m gpu`` or ``python benchmarks/gpu_check.py``.

Each GPU result is compared with the same model or artifact on the CPU (cpu16, float32). Greedy
tokens are compared on the llama twin, whose greedy path is far from ties (top-1 leads top-2 by at
least 0.68 over 32 tokens, logits within +-2.4), so they must match exactly. Tolerances on the max
absolute logit error against the CPU, about 4x what the same dtype measures on the CPU:
- torch in bfloat16 (a100): 0.06 (0.015 measured), top-1 >= 90%; in float16 (t4): 0.01 (0.0017), top-1 >= 95%
- llama.cpp, F32 GGUF, all layers offloaded: 0.02 (the KV cache is float16 on both sides)
- onnxruntime with the CUDA EP: 0.02, fp32 (TF32 matmuls on Ampere and newer) and fp16 graphs
"""

from __future__ import annotations

import dataclasses
import shutil

import pytest

import twins
from xpack.packager.demo.base_model import demo_gguf_path
from xpack.packager.export.job import export
from xpack.packager.verify.parity import compare_logits
from xpack.profiles.profile import load_profile
from xpack.runtimes.registry import load
from xpack.runtimes.settings import GenerationSettings

pytestmark = pytest.mark.gpu

PARITY_TEXT = twins.PARITY_TEXT
PROMPT = "Describe the findings of this chest X-ray."
GREEDY = GenerationSettings(max_tokens=16, temperature=0, repetition_penalty=1.0)
STABLE_TWIN = "llama"  # the twin whose greedy path is far from ties (see above)
# compute dtype -> (min top-1 agreement, tie-aware; max |logit error|) against the CPU in float32
TORCH_TOLERANCE = {"bfloat16": (0.9, 0.06), "float16": (0.95, 0.01), "float32": (0.95, 0.01)}
RUNTIME_TOLERANCE = (0.975, 0.02)  # llama.cpp and onnxruntime on the GPU against themselves on the CPU
# The shipped GPU profiles, as each torch test needs them: the a100's bfloat16 needs an Ampere or newer GPU.
TORCH_PROFILES = [pytest.param("a100", marks=pytest.mark.gpu("torch", "bfloat16")), pytest.param("t4", marks=pytest.mark.gpu("torch"))]


def gpu_profile(name: str, **changes):
    """A shipped GPU profile with a small context (the twins are tiny), so that any GPU runs both."""
    return dataclasses.replace(load_profile(name), n_ctx=512, **changes)


@pytest.fixture(scope="module")
def on_cpu(cpu):
    """``on_cpu(path, runtime=None)`` -> (teacher-forced logits of PARITY_TEXT, greedy GenerationResult) on
    conftest's ``cpu`` profile (cpu16, float32), once per path."""
    cache = {}

    def get(path, runtime=None):
        key = (str(path), runtime)
        if key not in cache:
            with load(path, cpu, runtime=runtime) as rt:
                cache[key] = (rt.logits(rt.tokenize(PARITY_TEXT)), rt.generate(PROMPT, GREEDY))
        return cache[key]

    return get


@pytest.fixture(scope="module")
def exports(twin_factory, tmp_path_factory):
    """``exports(fmt, **options)`` -> the llama twin exported once to ``fmt`` with those options."""
    cache = {}

    def get(fmt, **options):
        key = (fmt, tuple(sorted(options.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"gpu-{fmt}")
            shutil.rmtree(out)
            export(str(twin_factory.get(STABLE_TWIN).model_dir), fmt, out, threads=1, **options)
            cache[key] = out
        return cache[key]

    return get


def assert_close(expected, got, tolerance):
    top1, max_err = tolerance
    figures = compare_logits(expected, got)
    assert figures["top1_agreement_tie_aware"] >= top1 and figures["max_abs_logit_error"] <= max_err, figures


# --------------------------------------------------------------------------------------------------
# torch: the reference on the GPU, in the profile's dtype
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama", "gemma2", "gemma3"])
@pytest.mark.parametrize("profile_name", TORCH_PROFILES)
def test_torch_on_cuda_in_the_profile_dtype_matches_cpu_fp32(twin_factory, on_cpu, profile_name, name):
    import torch

    profile = gpu_profile(profile_name)
    model_dir = twin_factory.get(name).model_dir
    expected, _ = on_cpu(model_dir, "torch")
    with load(model_dir, profile, runtime="torch") as rt:
        info = rt.info()
        weights = next(rt.model.parameters())
        got = rt.logits(rt.tokenize(PARITY_TEXT))
    dtype = profile.compute_dtype
    if name == "gemma3" and dtype == "float16":  # its table says fp16_overflows: bfloat16 where the GPU has it, else float32
        dtype = "bfloat16" if torch.cuda.is_bf16_supported(including_emulation=False) else "float32"
    assert info["device"].startswith("cuda") and info["dtype"] == dtype and info["profile_dtype"] == profile.compute_dtype, info
    assert weights.device.type == "cuda" and weights.dtype == getattr(torch, dtype)
    assert_close(expected, got, TORCH_TOLERANCE[dtype])


@pytest.mark.parametrize("profile_name", TORCH_PROFILES)
def test_torch_on_cuda_greedy_tokens_and_gpu_memory(twin_factory, on_cpu, profile_name):
    model_dir = twin_factory.get(STABLE_TWIN).model_dir
    _, expected = on_cpu(model_dir, "torch")
    with load(model_dir, gpu_profile(profile_name), runtime="torch") as rt:
        weights_mb = sum(p.numel() * p.element_size() for p in rt.model.parameters()) / 2**20
        result = rt.generate(PROMPT, GREEDY)
    assert result.token_ids == expected.token_ids and result.text == expected.text
    # max_memory_allocated since the end of the load: the weights stay allocated, so they count
    assert result.peak_gpu_mb is not None and result.peak_gpu_mb >= weights_mb > 0, (result.peak_gpu_mb, weights_mb)


# --------------------------------------------------------------------------------------------------
# llama.cpp: every layer offloaded
# --------------------------------------------------------------------------------------------------


@pytest.mark.gpu("llamacpp")
@pytest.mark.parametrize("profile_name", ["a100", "t4"])
def test_llamacpp_all_layers_offloaded_match_the_cpu(exports, on_cpu, profile_name):
    profile = gpu_profile(profile_name)
    folder = exports("gguf", quant="F32")
    expected_logits, expected = on_cpu(folder)
    with load(folder, profile) as rt:
        n_gpu_layers = rt.llm.model_params.n_gpu_layers  # what llama.cpp was given
        got = rt.logits(rt.tokenize(PARITY_TEXT))
        result = rt.generate(PROMPT, GREEDY)
    assert rt.name == "llamacpp" and profile.gpu_layers == -1 and n_gpu_layers == 0x7FFFFFFF  # llama-cpp-python's "every layer"
    assert result.token_ids == expected.token_ids and result.text == expected.text
    assert_close(expected_logits, got, RUNTIME_TOLERANCE)
    assert result.peak_gpu_mb is not None and result.peak_gpu_mb > 0, "nvidia-smi lists no GPU memory for this process"


@pytest.mark.gpu("llamacpp")
def test_llamacpp_offload_puts_the_weights_on_the_gpu():
    """The same GGUF with no layer and with every layer offloaded: the second holds at least half
    the file more GPU memory (the demo's 98 MB Q4_1 GGUF, so the difference is well above noise)."""
    gguf = demo_gguf_path()
    profile = gpu_profile("a100")
    with load(gguf, dataclasses.replace(profile, gpu_layers=0)) as rt:
        none_offloaded = rt.peak_gpu_mb()
    with load(gguf, profile) as rt:
        all_offloaded = rt.peak_gpu_mb()
    assert none_offloaded is not None and all_offloaded is not None, "nvidia-smi lists no GPU memory for this process"
    assert all_offloaded - none_offloaded >= 0.5 * gguf.stat().st_size / 2**20, (none_offloaded, all_offloaded)


# --------------------------------------------------------------------------------------------------
# onnxruntime: the CUDA execution provider, the KV cache bound on the GPU
# --------------------------------------------------------------------------------------------------


def spy_on_forward_passes(rt, monkeypatch) -> list[tuple[str, set[str]]]:
    """Record, for every forward pass through the runtime's IO binding, the device of the logits
    it copies out and the devices of the KV cache it keeps."""
    calls = []
    run = rt._run

    def recorded(*args, **kwargs):
        logits, cache = run(*args, **kwargs)
        calls.append((logits.device_name().lower(), {value.device_name().lower() for value in cache}))
        return logits, cache

    monkeypatch.setattr(rt, "_run", recorded)
    return calls


@pytest.mark.gpu("onnx")
@pytest.mark.parametrize(("graph", "bits", "profile_name"), [("xpack", 32, "a100"), ("optimum", 32, "t4"), ("xpack", 16, "t4")])
def test_onnx_cuda_provider_with_the_kv_cache_on_the_gpu(exports, on_cpu, monkeypatch, graph, bits, profile_name):
    folder = exports("onnx", bits=bits, graph=graph)
    expected_logits, expected = on_cpu(folder)
    with load(folder, gpu_profile(profile_name)) as rt:
        providers = rt.session.get_providers()
        got = rt.logits(rt.tokenize(PARITY_TEXT))
        calls = spy_on_forward_passes(rt, monkeypatch)
        result = rt.generate(PROMPT, GREEDY)
        peak_gpu_mb = rt.peak_gpu_mb()
    assert providers[0] == "CUDAExecutionProvider", f"the session fell back to {providers}: onnxruntime-gpu cannot load its CUDA libraries"
    assert result.token_ids == expected.token_ids and result.text == expected.text
    assert_close(expected_logits, got, RUNTIME_TOLERANCE)
    # one pass for the prompt, one per token after the first; only the logits come back to the host
    assert result.finish_reason == "length" and len(calls) == result.completion_tokens, (result.finish_reason, len(calls))
    assert all(call == ("cpu", {"cuda"}) for call in calls), calls
    assert peak_gpu_mb is not None and peak_gpu_mb > 0, "nvidia-smi lists no GPU memory for this process"
