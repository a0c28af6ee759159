"""Bad input to `xpack merge`: one clear line, a non-zero exit, and nothing left behind."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from xpack.cli import cli


def _run(*args):
    result = CliRunner().invoke(cli, ["merge", *map(str, args)])
    return result


def _assert_clean_failure(result, out, *needles):
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not out.exists()
    leftovers = [p.name for p in out.parent.iterdir() if "xpack-tmp" in p.name]
    assert not leftovers, leftovers


@pytest.fixture
def llama(twin_factory):
    return twin_factory.get("llama")


@pytest.fixture
def adapter_copy(llama, tmp_path):
    dst = tmp_path / "adapter"
    shutil.copytree(llama.adapter_dir, dst)
    return dst


def test_adapter_for_another_base_names_tensor_and_shapes(llama, twin_factory, tmp_path):
    other = twin_factory.get("gemma3")  # different hidden size, same module names
    out = tmp_path / "out"
    result = _run("--base", llama.model_dir, "--adapter", other.adapter_dir, "--out", out)
    _assert_clean_failure(result, out, "made for another base model", "model.layers.0.")
    assert "[" in result.output and "] in the base but [" in result.output


def test_adapter_module_matching_nothing(llama, adapter_copy, tmp_path):
    from safetensors.torch import load_file, save_file

    f = adapter_copy / "adapter_model.safetensors"
    tensors = load_file(f)
    tensors = {k.replace("self_attn.q_proj", "self_attn.qkv_fused"): v for k, v in tensors.items()}
    save_file(tensors, f)
    out = tmp_path / "out"
    _assert_clean_failure(_run("--base", llama.model_dir, "--adapter", adapter_copy, "--out", out), out, "qkv_fused", "matches no tensor")


def test_missing_adapter_config(llama, adapter_copy, tmp_path):
    (adapter_copy / "adapter_config.json").unlink()
    out = tmp_path / "out"
    _assert_clean_failure(_run("--base", llama.model_dir, "--adapter", adapter_copy, "--out", out), out, "no adapter_config.json")


def test_unreadable_adapter_config(llama, adapter_copy, tmp_path):
    (adapter_copy / "adapter_config.json").write_text("{ this is not json")
    out = tmp_path / "out"
    _assert_clean_failure(_run("--base", llama.model_dir, "--adapter", adapter_copy, "--out", out), out, "cannot read", "adapter_config.json")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_adapter_weights(llama, adapter_copy, tmp_path, damage):
    f = adapter_copy / "adapter_model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00\x01garbage" * 50)
    out = tmp_path / "out"
    result = _run("--base", llama.model_dir, "--adapter", adapter_copy, "--out", out)
    _assert_clean_failure(result, out, "adapter_model.safetensors")
    assert "truncated" in result.output or "corrupt" in result.output


def test_truncated_base_shard(llama, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(llama.model_dir, base)
    f = base / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    out = tmp_path / "out"
    _assert_clean_failure(_run("--base", base, "--adapter", llama.adapter_dir, "--out", out), out, "truncated")


def test_existing_out_without_force(llama, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = _run("--base", llama.model_dir, "--adapter", llama.adapter_dir, "--out", out)
    assert result.exit_code != 0 and "already exists" in result.output and "--force" in result.output
    assert (out / "keep.txt").read_text() == "mine"  # untouched
    result = _run("--base", llama.model_dir, "--adapter", llama.adapter_dir, "--out", out, "--force")
    assert result.exit_code == 0, result.output
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_pickle_adapter_refused_unless_allowed(llama, adapter_copy, tmp_path):
    from safetensors.torch import load_file

    tensors = load_file(adapter_copy / "adapter_model.safetensors")
    (adapter_copy / "adapter_model.safetensors").unlink()
    torch.save(tensors, adapter_copy / "adapter_model.bin")
    out = tmp_path / "out"
    _assert_clean_failure(_run("--base", llama.model_dir, "--adapter", adapter_copy, "--out", out), out, "pickle", "--allow-pickle")
    result = _run("--base", llama.model_dir, "--adapter", adapter_copy, "--out", out, "--allow-pickle")
    assert result.exit_code == 0, result.output
    reference = tmp_path / "ref"
    assert _run("--base", llama.model_dir, "--adapter", llama.adapter_dir, "--out", reference).exit_code == 0
    assert (out / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()


def test_pickle_base_refused(llama, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(llama.model_dir, base)
    from safetensors.torch import load_file

    torch.save(load_file(base / "model.safetensors"), base / "pytorch_model.bin")
    (base / "model.safetensors").unlink()
    out = tmp_path / "out"
    _assert_clean_failure(_run("--base", base, "--adapter", llama.adapter_dir, "--out", out), out, "pickle")


def test_adapter_type_not_lora(llama, tmp_path):
    from peft import IA3Config, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(llama.model_dir),
        IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    )
    model.save_pretrained(tmp_path / "ia3")
    out = tmp_path / "out"
    _assert_clean_failure(_run("--base", llama.model_dir, "--adapter", tmp_path / "ia3", "--out", out), out, "IA3", "LoRA")


def test_packed_4bit_base_refused(llama, tmp_path):
    from safetensors.torch import load_file, save_file

    base = tmp_path / "base"
    shutil.copytree(llama.model_dir, base)
    tensors = load_file(base / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    tensors[key] = torch.zeros(tensors[key].numel() // 2, 1, dtype=torch.uint8)
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((base / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (base / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    _assert_clean_failure(_run("--base", base, "--adapter", llama.adapter_dir, "--out", out), out, "bitsandbytes", "full-precision")


def test_missing_base_folder_and_bad_hub_id(llama, tmp_path):
    out = tmp_path / "out"
    result = _run("--base", tmp_path / "nope" / "model", "--adapter", llama.adapter_dir, "--out", out)
    assert result.exit_code == 2 and "neither an existing folder nor a hub id" in result.output
    result = _run("--base", "someone/not-cached-model", "--adapter", llama.adapter_dir, "--out", out)
    _assert_clean_failure(result, out, "someone/not-cached-model", "not in the local Hugging Face cache")


def test_hub_id_from_local_cache(llama, tmp_path, monkeypatch):
    """A hub id that was downloaded before resolves offline, and the manifest records its revision."""
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--xpack-test--tiny-llama"
    shutil.copytree(llama.model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["merge", "--base", "xpack-test/tiny-llama", "--adapter", str(llama.adapter_dir), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.output)
    assert manifest["base"]["repo_id"] == "xpack-test/tiny-llama" and manifest["base"]["revision"] == commit
