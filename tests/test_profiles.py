"""Hardware profiles: the shipped TOML files, validation of user files, detection, adapting to this machine."""

from __future__ import annotations

import dataclasses
import json

import pytest
from click.testing import CliRunner

from xpack.cli import cli
from xpack.errors import XpackError
from xpack.profiles.machine import Gpu, Machine, detect_profile, machine_info, resolve_for_machine
from xpack.profiles.profile import Profile, Reference, list_profiles, load_profile, profile_names

# The seed model card's figures: (hardware, load s, 256 tokens s, memory GB).
SEED_CARD = {
    "a100": ("NVIDIA A100", 10.0, 1.5, 8.0),
    "t4": ("NVIDIA T4", 15.0, 3.0, 6.0),
    "cpu16": ("CPU (16 cores)", 40.0, 15.0, 12.0),
}
MACHINE = machine_info()
HAS_GPU = bool(MACHINE.gpus)


def test_shipped_profiles_are_the_seed_ones():
    assert profile_names() == sorted(SEED_CARD)
    assert [p.name for p in list_profiles()] == sorted(SEED_CARD)


@pytest.mark.parametrize("name", sorted(SEED_CARD))
def test_shipped_profile_loads_and_is_sane(name):
    p = load_profile(name)
    assert isinstance(p, Profile) and p.name == name and p.description
    assert p.device in ("cuda", "cpu")
    assert p.threads >= 0
    assert p.n_ctx == 2048  # the seed fine-tuning guide's max_seq_length
    assert p.memory_budget_gb and p.memory_budget_gb > 0
    assert set(p.formats) <= {"gguf", "onnx", "torch"} and len(p.formats) == len(set(p.formats))
    if p.device == "cuda":
        assert p.gpu_layers == -1
    else:
        assert p.gpu_layers == 0 and p.compute_dtype == "float32"
    assert isinstance(p.reference, Reference)
    assert (p.reference.hardware, p.reference.load_s, p.reference.tokens256_s, p.reference.memory_gb) == SEED_CARD[name]
    assert p.reference.memory_gb <= p.memory_budget_gb
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.threads = 3  # type: ignore[misc]


def test_gpu_dtypes():
    assert load_profile("a100").compute_dtype == "bfloat16"
    assert load_profile("t4").compute_dtype == "float16"  # Turing has no bf16
    assert load_profile("cpu16").threads == 16


def test_unknown_profile_names_the_shipped_ones():
    with pytest.raises(XpackError, match=r"unknown profile 'h100' \(shipped: a100, cpu16, t4\)"):
        load_profile("h100")
    with pytest.raises(XpackError, match="profile file .*missing.toml not found"):
        load_profile("missing.toml")


def test_user_profile_file(tmp_path):
    path = tmp_path / "edge-box.toml"
    path.write_text('device = "cpu"\nthreads = 1\nn_ctx = 512\nformats = ["gguf"]\n')
    p = load_profile(path)
    assert (p.name, p.device, p.threads, p.n_ctx, p.formats, p.reference) == ("edge-box", "cpu", 1, 512, ("gguf",), None)
    assert p.compute_dtype == "float32" and p.gpu_layers == 0 and p.source == str(path)
    full = tmp_path / "full.toml"
    full.write_text(
        'name = "lab"\ndescription = "lab box"\ndevice = "cuda"\nthreads = 4\ngpu_layers = 20\ncompute_dtype = "bfloat16"\n'
        'n_ctx = 4096\nmemory_budget_gb = 24\nformats = ["torch", "gguf"]\n'
        '[reference]\nhardware = "RTX 4090"\nload_s = 5\ntokens256_s = 1.0\nmemory_gb = 9.5\n'
    )
    p = load_profile(str(full))
    assert p.name == "lab" and p.gpu_layers == 20 and p.reference == Reference("RTX 4090", 5.0, 1.0, 9.5)


BAD_VALUES = [
    ('device = "cpu"\ncolour = "red"\n', "unknown key 'colour'"),
    ('device = "tpu"\n', "'device' must be \"cuda\" or \"cpu\", got 'tpu'"),
    ("threads = 4\n", "missing key 'device'"),
    ('device = "cpu"\nthreads = -2\n', "'threads' must be >= 0"),
    ('device = "cpu"\nthreads = "8"\n', "'threads' must be an integer, got a string '8'"),
    ('device = "cpu"\nthreads = true\n', "'threads' must be an integer, got a boolean True"),
    ('device = "cpu"\nthreads = 2.5\n', "'threads' must be an integer, got a number 2.5"),
    ('device = "cuda"\ngpu_layers = -3\n', "'gpu_layers' must be -1 (all) or >= 0"),
    ('device = "cpu"\ngpu_layers = -1\n', "'gpu_layers' must be 0 when device is \"cpu\""),
    ('device = "cpu"\ncompute_dtype = "fp8"\n', "'compute_dtype' must be one of bfloat16, float16, float32, got 'fp8'"),
    ('device = "cpu"\nn_ctx = 10\n', "'n_ctx' must be between 64 and 1048576"),
    ('device = "cpu"\nmemory_budget_gb = 0\n', "'memory_budget_gb' must be > 0"),
    ('device = "cpu"\nmemory_budget_gb = "lots"\n', "'memory_budget_gb' must be a number"),
    ('device = "cpu"\nformats = ["gguf", "tflite"]\n', "'formats' must be a non-empty list drawn from gguf, onnx, torch"),
    ('device = "cpu"\nformats = []\n', "'formats' must be a non-empty list"),
    ('device = "cpu"\nformats = ["gguf", "gguf"]\n', "'formats' lists a format twice"),
    ('device = "cpu"\nformats = "gguf"\n', "'formats' must be a list of strings"),
    ('device = "cpu"\nname = "my box"\n', "'name' must be letters, digits"),
    ('device = "cpu"\nreference = 3\n', "'reference' must be a table"),
    ('device = "cpu"\n[reference]\nhardware = "x"\nload_s = 1\ntokens256_s = 1\n', "missing key 'reference.memory_gb'"),
    ('device = "cpu"\n[reference]\nhardware = "x"\nload_s = 1\ntokens256_s = 1\nmemory_gb = 1\nwatts = 70\n', "unknown key 'reference.watts'"),
    ('device = "cpu"\n[reference]\nhardware = "x"\nload_s = -1\ntokens256_s = 1\nmemory_gb = 1\n', "'reference.load_s' must be > 0"),
    ('device = "cpu"\n[reference]\nhardware = 4\nload_s = 1\ntokens256_s = 1\nmemory_gb = 1\n', "'reference.hardware' must be a string"),
    ('device = "cpu\n', "is not valid TOML"),
]


@pytest.mark.parametrize("text,message", BAD_VALUES, ids=[m.split("'")[1] if "'" in m else m for _, m in BAD_VALUES])
def test_bad_profile_is_one_clear_line(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(XpackError) as info:
        load_profile(path)
    assert message in str(info.value)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_cpu16_clamps_threads_to_this_machine():
    machine = Machine(cores=2, ram_gb=32.0, gpu_probe="test")
    p, notes = resolve_for_machine(load_profile("cpu16"), machine)
    assert p.threads == 2
    assert notes == ["cpu16 asks for 16 threads; this machine has 2 cores: using 2"]
    # ... and on the machine the tests run on
    p, notes = resolve_for_machine(load_profile("cpu16"))
    assert p.threads == min(16, MACHINE.cores)
    assert bool(notes) == (MACHINE.cores < 16)


def test_all_cores_when_threads_is_zero():
    machine = Machine(cores=12, ram_gb=64.0, gpus=(Gpu("NVIDIA T4", 15.0),), gpu_probe="test")
    p, notes = resolve_for_machine(load_profile("t4"), machine)
    assert p.threads == 12 and notes == []


@pytest.mark.parametrize("name", ["a100", "t4"])
def test_gpu_profile_without_a_gpu(name):
    no_gpu = Machine(cores=2, ram_gb=8.0, gpu_probe="no nvidia-smi")
    with pytest.raises(XpackError, match=f"profile {name} needs a CUDA GPU but none was found .*use --profile cpu16"):
        resolve_for_machine(load_profile(name), no_gpu)
    if HAS_GPU:
        pytest.skip("this machine has a GPU: the no-GPU error is only checked on a simulated machine")
    with pytest.raises(XpackError, match=f"profile {name} needs a CUDA GPU but none was found"):
        resolve_for_machine(load_profile(name))


def test_memory_budget_note():
    small = Machine(cores=16, ram_gb=8.0, gpu_probe="test")
    _, notes = resolve_for_machine(load_profile("cpu16"), small)
    assert notes == ["cpu16 budgets 16 GB of memory; this machine has 8 GB"]
    small_gpu = Machine(cores=8, ram_gb=64.0, gpus=(Gpu("NVIDIA A10G", 24.0),), gpu_probe="test")
    _, notes = resolve_for_machine(load_profile("a100"), small_gpu)
    assert notes == ["a100 budgets 40 GB of GPU memory; the GPU here has 24 GB"]


@pytest.mark.parametrize(
    "machine,expected,why",
    [
        (Machine(2, 16.0, (), "no nvidia-smi"), "cpu16", "no GPU"),
        (Machine(8, 64.0, (Gpu("NVIDIA A100-SXM4-80GB", 80.0),), "nvidia-smi"), "a100", "80 GB (>= 40 GB)"),
        (Machine(8, 64.0, (Gpu("Tesla T4", 15.0),), "nvidia-smi"), "t4", "15 GB (< 40 GB)"),
        (Machine(8, 64.0, (Gpu("NVIDIA H100 PCIe", None),), "/proc"), "a100", "memory unknown"),
        (Machine(8, 64.0, (Gpu("Tesla T4", None),), "/proc"), "t4", "memory unknown"),
    ],
)
def test_detect_profile(machine, expected, why):
    profile, reason = detect_profile(machine)
    assert profile.name == expected
    assert f"saw {machine.cores} CPU cores" in reason and why in reason


def test_detect_on_this_machine():
    profile, reason = detect_profile()
    assert f"{MACHINE.cores} CPU cores" in reason
    if HAS_GPU:
        assert profile.name in ("a100", "t4") and MACHINE.gpus[0].name in reason
    else:
        assert profile.name == "cpu16" and "no GPU" in reason


def test_profiles_cli():
    runner = CliRunner()
    r = runner.invoke(cli, ["profiles", "list"])
    assert r.exit_code == 0, r.output
    assert all(name in r.output for name in SEED_CARD) and "NVIDIA A100: 10 s / 1.5 s / 8 GB" in r.output
    r = runner.invoke(cli, ["profiles", "show", "t4", "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["compute_dtype"] == "float16" and data["reference"]["tokens256_s"] == 3.0
    r = runner.invoke(cli, ["profiles", "show", "cpu16"])
    assert r.exit_code == 0 and "threads:" in r.output and "CPU (16 cores)" in r.output
    r = runner.invoke(cli, ["profiles", "show", "nope"])
    assert r.exit_code == 1 and "Error: unknown profile 'nope'" in r.output
    r = runner.invoke(cli, ["profiles", "detect", "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["profile"] in SEED_CARD and "CPU cores" in data["reason"]
