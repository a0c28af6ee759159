"""Shared pytest fixtures.

Tiny model twins (see tests/twins.py) are built once per session, lazily, on first use, so test
modules that never ask for them never import torch/transformers.
``cpu`` is the profile the runtime tests run on; ``fresh_python`` and ``generate_on_edge_box`` run code
in a new interpreter to check what it imports (this one has long imported torch).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys

# Never touch the network: every model/tokenizer in the suite is built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The twins are tiny: one intra-op thread is fastest, and on a small shared box a second OpenMP thread
# turns every op into a wait for a free core (a 2-layer forward went from ~5 ms to ~400 ms).
# Must be set before torch is first imported; export OMP_NUM_THREADS to override.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

from xpack.profiles.machine import machine_info, resolve_for_machine  # noqa: E402
from xpack.profiles.profile import load_profile  # noqa: E402


class TwinFactory:
    """Builds each twin once per session and caches it.

    ``get(name)`` returns the default :class:`twins.Twin` (base + default adapter).
    ``get(name, **lora_overrides)`` returns a Twin sharing the cached base checkpoint but with its
    own adapter built with those LoraConfig overrides (``adapter_dtype=`` and ``seed=`` are passed
    to ``build_adapter``); each distinct set of overrides is built once.
    Do not modify the returned folders; copy them first (``shutil.copytree``) if a test must.
    """

    def __init__(self, root):
        self.root = root
        self._cache: dict[tuple[str, str], object] = {}

    def get(self, name: str, **overrides):
        import twins  # imports torch: only once a test asks for a twin (see the module docstring)

        key = (name, _overrides_key(overrides))
        if key in self._cache:
            return self._cache[key]
        if not overrides:
            twin = twins.make_twin(name, self.root)
        else:
            base = self.get(name)
            adapter_kwargs = {k: overrides.pop(k) for k in ("adapter_dtype", "seed") if k in overrides}
            adapter_dir = self.root / name / f"adapter-{key[1][:12]}"
            twins.build_adapter(name, base.model_dir, adapter_dir, **adapter_kwargs, **overrides)
            lora_kwargs = twins.default_lora_kwargs(name)
            lora_kwargs.update(overrides)
            twin = twins.Twin(
                name=name,
                model_dir=base.model_dir,
                adapter_dir=adapter_dir,
                model_class=base.model_class,
                lora_kwargs=lora_kwargs,
                is_vision=base.is_vision,
            )
        self._cache[key] = twin
        return twin

    __call__ = get


def _overrides_key(overrides: dict) -> str:
    if not overrides:
        return ""
    text = json.dumps(overrides, sort_keys=True, default=repr)
    return hashlib.sha1(text.encode()).hexdigest()


@pytest.fixture(scope="session")
def twin_factory(tmp_path_factory) -> TwinFactory:
    """Session-wide factory of tiny random-weight model twins: ``twin_factory.get("gemma3_vision")``."""
    return TwinFactory(tmp_path_factory.mktemp("twins"))


@pytest.fixture(scope="session")
def cpu():
    """cpu16 as this machine runs it, with one thread and a small context: the twins are tiny, torch
    keeps one thread here (above), and on a busy 2-core box two llama.cpp threads wait on each other
    (5-10x slower than one)."""
    profile, _ = resolve_for_machine(load_profile("cpu16"))
    return dataclasses.replace(profile, n_ctx=512, threads=1)


# --------------------------------------------------------------------------------------------------
# Fresh interpreters: what a module, or a whole generation on an edge box, imports
# --------------------------------------------------------------------------------------------------

# What an edge box lacks: the packager's libraries. The runtimes must work without them.
EDGE_BOX_BLOCKED = ("torch", "transformers", "peft", "optimum")

_BLOCK_IMPORTS = """\
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError(f"{{name}} is blocked on this edge box")
sys.meta_path.insert(0, _Block())
"""

_CHECK_IMPORTS = """
import importlib, sys
for _name in {blocked!r}:
    try:
        importlib.import_module(_name)
    except ImportError:
        pass
    else:
        raise SystemExit(f"{{_name}} was importable")
_loaded = sorted(m for m in {forbidden!r} if m in sys.modules)
assert not _loaded, f"imported: {{_loaded}}"
"""


def run_fresh_python(code: str, *, forbidden=(), blocked=(), timeout: float = 300) -> str:
    """Run `code` in a new interpreter and return its stdout; fail the test if it fails, if it left any
    module of `forbidden` (or `blocked`) in sys.modules, or if a `blocked` module was importable.
    With `blocked`, importing those modules raises ImportError from the start, as on an edge box."""
    script = (_BLOCK_IMPORTS.format(blocked=tuple(blocked)) if blocked else "") + code
    script += _CHECK_IMPORTS.format(blocked=tuple(blocked), forbidden=tuple(blocked) + tuple(forbidden))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


_EDGE_BOX_GENERATE = """
import dataclasses, json, sys
from xpack.runtimes.registry import load
from xpack.runtimes.settings import GenerationSettings
from xpack.profiles.machine import resolve_for_machine
from xpack.profiles.profile import load_profile
{imports}
profile, _ = resolve_for_machine(load_profile("cpu16"))
with load({artifact!r}, dataclasses.replace(profile, n_ctx=256, threads=1)) as rt:
    r = rt.generate("Say hello.", GenerationSettings(**{settings!r}))
print(json.dumps(dict(runtime=r.runtime, text=r.text, completion_tokens=r.completion_tokens, modules=sorted(sys.modules))))
"""


def generate_on_edge_box(artifact, *, imports=(), **settings) -> dict:
    """Load `artifact` on cpu16 (one thread, n_ctx 256) in an interpreter without EDGE_BOX_BLOCKED and
    generate from "Say hello." with GenerationSettings(**settings); the modules named in `imports` are imported before it loads.
    Returns the result's runtime, text and completion_tokens, and the modules it had imported."""
    code = _EDGE_BOX_GENERATE.format(
        imports="\n".join(f"import {name}" for name in imports), artifact=str(artifact), settings=settings
    )
    stdout = run_fresh_python(code, blocked=EDGE_BOX_BLOCKED)
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def fresh_python():
    """``fresh_python(code, forbidden=(...), blocked=(...), timeout=...)`` -> stdout: see run_fresh_python."""
    return run_fresh_python


@pytest.fixture(scope="session", name="generate_on_edge_box")
def generate_on_edge_box_fixture():
    """``generate_on_edge_box(artifact, imports=(...), **settings)`` -> result dict: see generate_on_edge_box."""
    return generate_on_edge_box


# --------------------------------------------------------------------------------------------------
# GPU tests: ``@pytest.mark.gpu("torch" | "bfloat16" | "llamacpp" | "onnx")`` runs only where those
# CUDA paths can run; elsewhere the test skips with one line naming what is missing and how to get it.
# benchmarks/gpu_check.py prints the same probes on a GPU box.
# --------------------------------------------------------------------------------------------------


def _cuda_device() -> tuple[bool, str]:
    machine = machine_info()
    if not machine.gpus:
        return False, f"no CUDA device ({machine.gpu_probe}); run on a machine with an NVIDIA GPU and its driver"
    return True, machine.describe()


def _torch_cuda() -> tuple[bool, str]:
    import torch

    if not torch.cuda.is_available():
        return False, (f"torch {torch.__version__} sees no CUDA device (torch.cuda.is_available() is False); "
                       "install a CUDA build of torch (https://pytorch.org/get-started/locally/)")
    return True, f"torch {torch.__version__} (CUDA {torch.version.cuda}) on {torch.cuda.get_device_name(0)}"


def _torch_bfloat16() -> tuple[bool, str]:
    import torch

    if not torch.cuda.is_bf16_supported(including_emulation=False):
        major, minor = torch.cuda.get_device_capability(0)
        return False, (f"{torch.cuda.get_device_name(0)} (compute capability {major}.{minor}) has no bfloat16; "
                       "the a100 profile's dtype needs an Ampere or newer GPU")
    return True, "bfloat16 on the GPU"


def _llamacpp_offload() -> tuple[bool, str]:
    import llama_cpp

    version = llama_cpp.__version__
    if not llama_cpp.llama_supports_gpu_offload():
        return False, (f"llama-cpp-python {version} was built without GPU offload (llama_supports_gpu_offload() is False); "
                       f'reinstall it with CMAKE_ARGS="-DGGML_CUDA=on" pip install --force-reinstall --no-cache-dir llama-cpp-python=={version}')
    return True, f"llama-cpp-python {version} with GPU offload"


def _onnxruntime_cuda() -> tuple[bool, str]:
    import onnxruntime as ort

    providers = ort.get_available_providers()
    if "CUDAExecutionProvider" not in providers:
        return False, (f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (it has {', '.join(providers)}); "
                       "pip uninstall -y onnxruntime && pip install onnxruntime-gpu")
    return True, f"onnxruntime {ort.__version__} with {', '.join(providers)}"


# Probed in this order; "cuda" first, so that a machine without a GPU never imports a library to say so.
GPU_PROBES = {"cuda": _cuda_device, "torch": _torch_cuda, "bfloat16": _torch_bfloat16, "llamacpp": _llamacpp_offload, "onnx": _onnxruntime_cuda}
_GPU_SUPPORT: dict[str, tuple[bool, str]] = {}


def gpu_support(path: str) -> tuple[bool, str]:
    """(available, what was seen or why not) for one GPU path, probed once per session."""
    if path not in _GPU_SUPPORT:
        try:
            _GPU_SUPPORT[path] = GPU_PROBES[path]()
        except ImportError as exc:
            _GPU_SUPPORT[path] = (False, f"{exc}; `pip install -e '.[dev]'` installs every runtime")
    return _GPU_SUPPORT[path]


def pytest_runtest_setup(item):
    """Skip a ``gpu`` test, before its fixtures build anything, when a path it needs cannot run here."""
    markers = list(item.iter_markers("gpu"))
    if not markers:
        return
    needs = {"cuda", *(path for marker in markers for path in marker.args)}
    if needs - GPU_PROBES.keys():
        pytest.fail(f"@pytest.mark.gpu names unknown paths {sorted(needs - GPU_PROBES.keys())}; known: {', '.join(GPU_PROBES)}", pytrace=False)
    for path in [p for p in GPU_PROBES if p in needs]:
        ok, detail = gpu_support(path)
        if not ok:
            pytest.skip(f"gpu: {detail}")
