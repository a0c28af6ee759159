"""Bad input and faults (issue #14): each row of the issue reproduced, ending in one line, a non-zero exit and
nothing written where it should not be."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from xpack.cli import cli
from xpack.errors import DISTRIBUTION_OF_MODULE, EXTRA_OF_MODULE, XpackError
from xpack.packager.verify import job as verify_job
from xpack.profiles.profile import load_profile
from xpack.runtimes.chat import find_chat_template, render_chat_template
from xpack.runtimes.gguf_header import read_gguf_metadata
from xpack.runtimes.messages import load_image
from xpack.runtimes.onnx_base import clip
from xpack.runtimes.registry import load, runtime_for


def _one_line_error(result) -> str:
    """The CLI's error: a non-zero exit, no traceback, one ``Error:`` line (progress notes before it are stderr's)."""
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, (SystemExit, type(None))), result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and result.output.rstrip().endswith(errors[0]), result.output
    return errors[0]


@pytest.mark.parametrize("name", ["{tmp}/victim", "../../victim", "..", ".hidden", "a/b", "bad name"])
@pytest.mark.parametrize("fmt", ["gguf", "onnx"])
def test_export_name_is_a_file_stem_not_a_path(twin_factory, tmp_path, name, fmt):
    """Row 1: --name /some/dir/victim wrote (and overwrote) files outside --out and ended in a traceback."""
    twin = twin_factory.get("llama")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "victim-Q8_0.gguf").write_bytes(b"keep me")
    out = tmp_path / "out"
    args = ["export", "--model", str(twin.model_dir), "--format", fmt, "--out", str(out), "--name", name.format(tmp=elsewhere)]
    args += ["--quant", "Q8_0"] if fmt == "gguf" else ["--bits", "8", "--no-calibrate"]
    line = _one_line_error(CliRunner().invoke(cli, args))
    assert "--name" in line and "file name stem" in line
    assert not out.exists()
    assert sorted(p.name for p in elsewhere.iterdir()) == ["victim-Q8_0.gguf"] and (elsewhere / "victim-Q8_0.gguf").read_bytes() == b"keep me"
    assert not (tmp_path.parent / "victim-Q8_0.gguf").exists()


@pytest.mark.parametrize("weight, says", [("abc", "is 'abc', not a number"), ("nan", "is nan, not a finite number"), ("inf", "is inf, not a finite number")])
@pytest.mark.parametrize("verb", ["merge", "export"])
def test_adapter_weight_that_is_no_number_is_named(twin_factory, tmp_path, weight, says, verb):
    """Row 17: ``--adapter ad:abc`` blamed the path; ``ad:nan`` merged into a NaN model."""
    twin = twin_factory.get("llama")
    out = tmp_path / "out"
    args = [verb, "--adapter", f"{twin.adapter_dir}:{weight}", "--out", str(out)]
    args += ["--base", str(twin.model_dir)] if verb == "merge" else ["--model", str(twin.model_dir), "--format", "gguf", "--quant", "Q8_0"]
    line = _one_line_error(CliRunner().invoke(cli, args))
    assert f"the adapter weight in '{twin.adapter_dir}:{weight}' {says}" in line
    assert not out.exists()


@pytest.mark.parametrize("content, says", [
    (b'device = "cpu"\nmemory_budget_gb = nan\n', "'memory_budget_gb' must be a finite number, got nan"),
    (b'device = "cpu"\n[reference]\nhardware = "x"\nload_s = inf\ntokens256_s = 1.0\nmemory_gb = 1.0\n', "'reference.load_s' must be a finite number, got inf"),
    (b'device = "cpu"\ndescription = "caf\xe9"\n', "is not UTF-8 text (byte 33 cannot be read); save it as UTF-8"),
])
def test_profile_file_that_is_not_finite_or_not_utf8(tmp_path, content, says):
    """Rows 14 and 17: a profile that is not UTF-8 ended in a traceback; ``memory_budget_gb = nan`` passed validation."""
    path = tmp_path / "box.toml"
    path.write_bytes(content)
    line = _one_line_error(CliRunner().invoke(cli, ["profiles", "show", str(path)]))
    assert says in line


@pytest.mark.parametrize("verb", [["run", "--profile", "cpu16", "--prompt", "hi", "--artifact"], ["verify", "--profile", "cpu16", "--reference", "{tmp}", "--artifact"]])
def test_json_error_goes_to_stdout_too(tmp_path, verb):
    """Row 17: ``run --json`` printed nothing on stdout when it failed; a machine reading stdout now gets the error."""
    args = [a.format(tmp=tmp_path) for a in verb] + [str(tmp_path), "--json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1
    error = json.loads(result.stdout)["error"]
    assert error and "\n" not in error and f"Error: {error}" in result.stderr


def test_truncated_onnx_data_is_one_whole_line(twin_factory, tmp_path):
    """Row 17: a truncated ``.onnx_data`` gave onnxruntime's message cut mid-word (at 300 characters)."""
    twin = twin_factory.get("llama")
    out = tmp_path / "onnx"
    assert CliRunner().invoke(cli, ["export", "--model", str(twin.model_dir), "--format", "onnx", "--bits", "32", "--out", str(out)]).exit_code == 0
    data = out / "model.onnx_data"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    line = _one_line_error(CliRunner().invoke(cli, ["run", "--artifact", str(out), "--profile", "cpu16", "--prompt", "hi"]))
    assert "model.onnx_data: " in line and "bytes, the manifest says" in line  # the manifest check comes first (row 3)
    line = _one_line_error(CliRunner().invoke(cli, ["run", "--artifact", str(out), "--profile", "cpu16", "--prompt", "hi", "--no-check"]))
    assert "could not load" in line and "out of bounds" in line and line.endswith("check that the .onnx file and its .onnx_data are complete")
    long = "GetExtDataFromTensorProto External initializer: " + "model.layers.0.self_attn.qkv_proj.weight offset: 393216 " * 8
    clipped = clip(long)
    assert len(clipped) <= 304 and clipped.endswith(" ...") and long.startswith(clipped[:-4]) and long[len(clipped) - 4] == " "


def _poison(folder, pattern: str, value: float) -> str:
    """Put ``value`` (NaN or inf) into the first tensor of ``folder``'s safetensors whose name contains ``pattern``."""
    from safetensors.numpy import load_file, save_file

    for path in sorted(folder.glob("*.safetensors")):
        tensors = load_file(str(path))
        name = next((n for n in tensors if pattern in n), None)
        if name is not None:
            array = tensors[name].astype(np.float32)
            array.reshape(-1)[3] = value
            tensors[name] = array.astype(tensors[name].dtype)
            save_file(tensors, str(path), metadata={"format": "pt"})
            return name
    raise AssertionError(f"no tensor with {pattern} in {folder}")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_merge_that_gives_non_finite_values_names_the_tensor(twin_factory, tmp_path, value):
    """Row 5: an adapter holding NaN or inf merged silently into a NaN model."""
    twin = twin_factory.get("llama")
    adapter = tmp_path / "adapter"
    shutil.copytree(twin.adapter_dir, adapter)
    poisoned = _poison(adapter, "lora_B", value)
    out = tmp_path / "merged"
    line = _one_line_error(CliRunner().invoke(cli, ["merge", "--base", str(twin.model_dir), "--adapter", str(adapter), "--out", str(out)]))
    module = poisoned.split("base_model.model.", 1)[-1].split(".lora_B")[0]
    assert f"{module}.weight holds NaN or inf values after merging {adapter} into it" in line
    assert not out.exists() and not list(tmp_path.glob(".merged*"))


@pytest.mark.parametrize("fmt", ["gguf", "onnx"])
def test_export_of_a_checkpoint_with_nan_names_the_tensor(twin_factory, tmp_path, fmt):
    """Row 17: exporting a NaN model ended in "llama.cpp could not quantize ...; try another --quant"."""
    twin = twin_factory.get("llama")
    model = tmp_path / "model"
    shutil.copytree(twin.model_dir, model)
    poisoned = _poison(model, "mlp.down_proj", float("nan"))
    out = tmp_path / "out"
    args = ["export", "--model", str(model), "--format", fmt, "--out", str(out)]
    args += ["--quant", "Q4_K_M"] if fmt == "gguf" else ["--bits", "4", "--no-calibrate"]
    line = _one_line_error(CliRunner().invoke(cli, args))
    assert f"{poisoned} holds NaN or inf values in the checkpoint" in line and "--quant" not in line
    assert not out.exists()


def test_verify_checks_what_it_will_write_before_the_run(twin_factory, tmp_path, monkeypatch):
    """Row 13: ``verify --out`` into a missing folder, and ``--update-card`` on a read-only artifact, crashed after the
    whole run and lost the report. Now one line before any model loads (the runtimes are never reached)."""
    twin = twin_factory.get("llama")
    monkeypatch.setattr(verify_job, "_run_side", lambda *a, **k: pytest.fail("the run started"))
    base = ["verify", "--artifact", str(twin.model_dir), "--reference", str(twin.model_dir), "--profile", "cpu16", "--no-benchmark"]
    line = _one_line_error(CliRunner().invoke(cli, base + ["--out", str(tmp_path / "missing" / "report.json")]))
    assert f"the folder {tmp_path / 'missing'} does not exist" in line

    artifact = tmp_path / "artifact"
    artifact.mkdir()
    (artifact / "manifest.json").write_text("{}")
    (artifact / "README.md").write_text("# card\n")
    real_access = verify_job.os.access
    monkeypatch.setattr(verify_job.os, "access", lambda p, mode: False if str(p).endswith("README.md") else real_access(p, mode))  # root ignores chmod
    args = ["verify", "--artifact", str(artifact), "--reference", str(twin.model_dir), "--profile", "cpu16", "--update-card"]
    line = _one_line_error(CliRunner().invoke(cli, args))
    assert f"--update-card cannot write {artifact / 'README.md'}" in line


@pytest.mark.parametrize("option", ["--prompt", "--system"])
def test_prompt_that_is_not_utf8_is_one_line(twin_factory, option):
    """Row 10: a non-UTF-8 --prompt (lone surrogates in Python, PEP 383) ended in a traceback in every runtime; it is
    refused before any runtime loads."""
    twin = twin_factory.get("llama")
    texts = {"--prompt": "hello", "--system": "be brief", option: "caf\udce9 au lait"}
    args = ["run", "--artifact", str(twin.model_dir), "--profile", "cpu16", "--prompt", texts["--prompt"], "--system", texts["--system"]]
    line = _one_line_error(CliRunner().invoke(cli, args))
    assert f"{option} is not UTF-8 text (byte 0xe9 at character 3)" in line


def test_interactive_line_that_is_not_utf8_is_skipped(twin_factory):
    """Row 10: non-UTF-8 input to --interactive: that line is said and skipped, the chat goes on."""
    twin = twin_factory.get("llama")
    args = ["run", "--artifact", str(twin.model_dir), "--profile", "cpu16", "--interactive", "--max-tokens", "2", "--temperature", "0"]
    result = CliRunner().invoke(cli, args, input=b"caf\xe9\nhello\nexit\n")
    assert result.exit_code == 0 and result.exception is None, result.output
    assert "note: that line is not UTF-8 text (byte 0xe9 at 3); skipped" in result.stderr
    assert result.stderr.count(" tokens, ") == 1  # one answer: to "hello"


@pytest.mark.parametrize("side", [9000, 12000, 20000])  # above xpack's limit; above Pillow's warning; above Pillow's error
def test_image_over_the_pixel_limit_is_refused_before_decoding(tmp_path, side):
    """Row 11: a 20000 x 20000 PNG ended in DecompressionBombError, a 12000 x 12000 one passed with a raw warning and
    1.1 GB of memory. Bilevel PNGs keep the test small: the header says the size, nothing is decoded."""
    import warnings

    from PIL import Image

    path = tmp_path / f"big-{side}.png"
    Image.new("1", (side, side)).save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no raw warning escapes either
        with pytest.raises(XpackError, match=r"has more than 64 million pixels, the most xpack decodes .* downscale it first") as info:
            load_image(path)
    assert "\n" not in str(info.value)
    Image.new("RGB", (4000, 3000)).save(tmp_path / "fine.png")  # a large radiograph still loads
    assert load_image(tmp_path / "fine.png").size == (4000, 3000)


@pytest.mark.parametrize("template, says", [
    ("{% include 'other.jinja' %}", "failed on this conversation (TypeError"),
    ("{% import 'macros.jinja' as m %}{{ m.x() }}", "failed on this conversation (TypeError"),
    ("{% for i in range(10**9) %}x{% endfor %}", "failed on this conversation (OverflowError"),
    ("{{ 'ab' * 1000000000 }}", "rejected the conversation: the template repeats a sequence"),
    ("{{ ['ab'] * 10**8 }}", "rejected the conversation: the template repeats a sequence"),
    ("{{ 10 ** 100000000 }}", "rejected the conversation: the template raises a number to the power"),
    ("{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}", "ran for more than 5 s"),
    ("{% for i in range(99999) %}{{ 'x' * 99999 }}{% endfor %}", "writes more than 4000000 characters"),
])
def test_hostile_chat_template_is_one_line_and_bounded(template, says):
    """Row 12: templates with include/import, a huge range or string repetition were held by the sandbox, but the
    error escaped as a traceback; output size and rendering time are now capped too."""
    import time

    start = time.perf_counter()
    with pytest.raises(XpackError) as info:
        render_chat_template(template, [{"role": "user", "content": "hi"}])
    assert says in str(info.value) and "\n" not in str(info.value)
    assert time.perf_counter() - start < 15


def test_cards_name_hub_ids_never_paths_of_this_machine(twin_factory, tmp_path):
    """Row 18: the demo's GGUF card said ``base_model: <cache folder>/demo/...`` and "GGUF build of **<cache folder>/...**".
    base_model comes from the adapter's base_model_name_or_path when that is a hub id, through merge and export; the
    text names folders by their name only."""
    twin = twin_factory.get("llama")
    adapter = tmp_path / "adapter"
    shutil.copytree(twin.adapter_dir, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    merged, gguf = tmp_path / "merged", tmp_path / "gguf"
    assert CliRunner().invoke(cli, ["merge", "--base", str(twin.model_dir), "--adapter", str(adapter), "--out", str(merged)]).exit_code == 0
    r = CliRunner().invoke(cli, ["export", "--model", str(merged), "--format", "gguf", "--quant", "Q8_0", "--out", str(gguf)])
    assert r.exit_code == 0, r.output
    for folder in (merged, gguf):
        card = (folder / "README.md").read_text()
        assert "\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\n" in card
        assert str(tmp_path) not in card and str(twin_factory.root) not in card
    assert "GGUF build of **HuggingFaceTB/SmolLM2-135M-Instruct**" in (gguf / "README.md").read_text()


BLOCKER = """
import sys
from importlib.abc import MetaPathFinder

class Blocked(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, Blocked())
sys.argv = ["xpack", *{args!r}]
from xpack.cli import main
main()
"""


@pytest.mark.parametrize("blocked, args, says", [
    ({"gguf"}, ["export", "--model", "{model}", "--format", "gguf", "--quant", "Q8_0", "--out", "{tmp}/out"], "needs gguf, which is not installed: pip install 'xpack[pack]'"),
    ({"transformers"}, ["verify", "--artifact", "{model}", "--reference", "{model}", "--profile", "cpu16", "--no-benchmark"], "pip install 'xpack[pack]'"),
    ({"torch"}, ["demo", "--out", "{tmp}/demo"], "xpack demo needs torch, which is not installed: pip install 'xpack[pack]'"),
    ({"llama_cpp"}, ["run", "--artifact", "{tmp}/x.gguf", "--profile", "cpu16", "--prompt", "hi"], "pip install 'xpack[llama]'"),
])
def test_missing_extra_is_named_with_its_pip_line(twin_factory, tmp_path, blocked, args, says):
    """Row 15: on a box with only xpack[onnx] or xpack[llama], export --format gguf, verify and demo ended in
    ModuleNotFoundError (the demo leaving an empty cache folder)."""
    twin = twin_factory.get("llama")
    (tmp_path / "x.gguf").write_bytes(b"GGUF")
    home = tmp_path / "home"
    env_args = [a.format(model=twin.model_dir, tmp=tmp_path) for a in args]
    code = BLOCKER.format(blocked=blocked, args=env_args)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                       env={**os.environ, "XPACK_HOME": str(home)})
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and says in errors[0], r.stderr[-2000:]
    assert not (tmp_path / "out").exists() and not (tmp_path / "demo").exists()
    assert not home.exists() or not any(home.rglob("*")), sorted(home.rglob("*"))  # no cache folder left behind


def test_extras_table_matches_pyproject():
    """xpack/errors.py's table of which extra brings which module agrees with pyproject.toml."""
    import tomllib

    extras = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for module, extra in EXTRA_OF_MODULE.items():
        dist = DISTRIBUTION_OF_MODULE.get(module, module)
        names = {re.split(r"[<>=\[~ ;]", req, maxsplit=1)[0].lower() for req in extras[extra]}
        assert dist.lower() in names, (module, dist, extra, names)


def test_profile_preference_picks_the_format_of_a_folder_with_several(twin_factory, tmp_path):
    """Row 17: a folder's manifest format overrode the profile's preferred format, contrary to README ("a folder
    holding both runs in the profile's preferred format")."""
    twin = twin_factory.get("llama")
    folder = tmp_path / "both"
    shutil.copytree(twin.model_dir, folder)
    (folder / "model-Q8_0.gguf").write_bytes(b"GGUF")
    (folder / "manifest.json").write_text(json.dumps({"format": "gguf"}))
    torch_first = tmp_path / "torch-first.toml"
    torch_first.write_text('device = "cpu"\nformats = ["torch", "gguf"]\n')
    assert runtime_for(folder, load_profile(str(torch_first))) == "torch"
    assert runtime_for(folder, load_profile("cpu16")) == "llamacpp"  # cpu16 prefers GGUF
    assert runtime_for(folder) == "llamacpp"  # no profile: what the manifest says the folder is


def test_torch_runtime_refuses_weights_that_match_nothing(twin_factory, tmp_path):
    """Row 4: a checkpoint whose tensor names match nothing ran with random weights (transformers warns) and answered
    random text; the torch runtime is the reference every parity figure stands on."""
    from safetensors.numpy import load_file, save_file

    twin = twin_factory.get("llama")
    folder = tmp_path / "renamed"
    shutil.copytree(twin.model_dir, folder)
    tensors = load_file(str(folder / "model.safetensors"))
    save_file({k.replace("self_attn.q_proj", "self_attn.query"): v for k, v in tensors.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    line = _one_line_error(CliRunner().invoke(cli, ["run", "--artifact", str(folder), "--profile", "cpu16", "--prompt", "hi"]))
    assert "do not match LlamaForCausalLM" in line and "missing (e.g. model.layers.0.self_attn.q_proj.weight)" in line
    assert "unexpected (e.g. model.layers.0.self_attn.query.weight)" in line


def test_torch_runtime_refuses_a_truncated_safetensors(twin_factory, tmp_path):
    """Row 14: a truncated safetensors given to the torch runtime ended in a traceback (merge and export refused it)."""
    twin = twin_factory.get("llama")
    folder = tmp_path / "truncated"
    shutil.copytree(twin.model_dir, folder)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    line = _one_line_error(CliRunner().invoke(cli, ["run", "--artifact", str(folder), "--profile", "cpu16", "--prompt", "hi"]))
    assert f"could not load {folder}" in line and "safetensors files are complete" in line


@pytest.fixture(scope="module")
def llama_artifacts(twin_factory, tmp_path_factory):
    """The llama twin as each runtime runs it: the checkpoint (torch), a GGUF and an ONNX export."""
    twin = twin_factory.get("llama")
    root = tmp_path_factory.mktemp("artifacts")
    for fmt, extra in (("gguf", ["--quant", "Q8_0"]), ("onnx", ["--bits", "32"])):
        r = CliRunner().invoke(cli, ["export", "--model", str(twin.model_dir), "--format", fmt, "--out", str(root / fmt), *extra])
        assert r.exit_code == 0, r.output
    return {"torch": twin.model_dir, "gguf": root / "gguf", "onnx": root / "onnx"}


@pytest.mark.parametrize("kind", ["torch", "gguf", "onnx"])
def test_prompt_longer_than_the_context_is_one_rule_everywhere(llama_artifacts, tmp_path, kind):
    """Row 7: the torch runtime ignored the context length (a 100k-character prompt ran until killed); llama.cpp and
    onnx refused it. One rule, one message, every runtime."""
    profile = tmp_path / "small.toml"
    profile.write_text('device = "cpu"\nthreads = 1\nn_ctx = 256\n')  # llama.cpp rounds a context up to 256
    line = _one_line_error(CliRunner().invoke(cli, ["run", "--artifact", str(llama_artifacts[kind]), "--profile", str(profile),
                                                    "--prompt", "the lungs are clear " * 200]))
    assert re.search(r"the prompt is \d+ tokens, more than the context of 256 \(profile small's n_ctx\); shorten it", line), line


@pytest.mark.parametrize("targets, named", [(["q_proj", "v_proj", "qkv_proj"], "'qkv_proj'"), (".*attention.wq", "'.*attention.wq'")])
def test_target_modules_that_match_nothing_are_said(twin_factory, tmp_path, targets, named):
    """Row 8: an adapter whose target_modules names nothing in the base merged silently (its weights decide what
    changes); the merge now says which names match no module, on stderr and in the manifest's notes."""
    twin = twin_factory.get("llama")
    adapter = tmp_path / "adapter"
    shutil.copytree(twin.adapter_dir, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["target_modules"] = targets
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    out = tmp_path / "merged"
    r = CliRunner().invoke(cli, ["merge", "--base", str(twin.model_dir), "--adapter", str(adapter), "--out", str(out)])
    assert r.exit_code == 0, r.output
    note = f"target_modules names {named}, which matches no module of the base model"
    assert note in r.stderr and any(note in n for n in json.loads((out / "manifest.json").read_text())["merge"]["notes"])


def test_one_chat_template_rule_for_every_artifact(twin_factory, tmp_path):
    """Row 6: the GGUF export took tokenizer_config.json's chat template while the runtimes used chat_template.jinja.
    One rule (transformers': chat_template.jinja first), in the GGUF, the ONNX folder and every runtime's prompt."""
    twin = twin_factory.get("llama")
    model = tmp_path / "model"
    shutil.copytree(twin.model_dir, model)
    jinja = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    (model / "chat_template.jinja").write_text(jinja)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}OLD {{ m['content'] }}{% endfor %}"
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    assert find_chat_template(model) == jinja
    r = CliRunner().invoke(cli, ["export", "--model", str(model), "--format", "gguf", "--quant", "Q8_0", "--out", str(tmp_path / "gguf")])
    assert r.exit_code == 0, r.output
    gguf_file = next((tmp_path / "gguf").glob("*.gguf"))
    assert read_gguf_metadata(gguf_file)["tokenizer.chat_template"] == jinja
    r = CliRunner().invoke(cli, ["export", "--model", str(model), "--format", "onnx", "--bits", "32", "--out", str(tmp_path / "onnx")])
    assert r.exit_code == 0, r.output
    messages = [{"role": "user", "content": "Describe the findings."}]
    for artifact in (model, tmp_path / "gguf", tmp_path / "onnx"):
        with load(artifact, load_profile("cpu16")) as rt:
            assert rt.render_chat(messages).endswith("<|user|>Describe the findings.<|assistant|>"), artifact


FILE_SIZE_LIMIT = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing the process
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
sys.argv = ["xpack", *{args!r}]
from xpack.cli import main
main()
"""


@pytest.mark.parametrize("verb", ["merge", "gguf", "onnx"])
def test_full_disk_is_one_line_and_leaves_nothing(twin_factory, tmp_path, verb):
    """Row 9: disk full during merge or export ended in a traceback (the cleanup already worked). A file size limit
    (RLIMIT_FSIZE) makes the writes fail as a full disk does, without root or a small file system."""
    twin = twin_factory.get("llama")
    out = tmp_path / "out"
    args = {"merge": ["merge", "--base", str(twin.model_dir), "--adapter", str(twin.adapter_dir), "--out", str(out)],
            "gguf": ["export", "--model", str(twin.model_dir), "--format", "gguf", "--quant", "F16", "--out", str(out)],
            "onnx": ["export", "--model", str(twin.model_dir), "--format", "onnx", "--bits", "32", "--out", str(out)]}[verb]
    r = subprocess.run([sys.executable, "-c", FILE_SIZE_LIMIT.format(limit=200_000, args=args)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and re.search(r"stopped: (the file grew past the size this system allows|a write came up short)", errors[0]), r.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == [], sorted(tmp_path.iterdir())  # no --out, no temporary folder


def test_read_only_out_is_one_line(twin_factory, tmp_path):
    """Row 9: --out under a read-only place. Root ignores permission bits, so a read-only tmpfs is used where this
    machine lets the tests mount one."""
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a read-only tmpfs here (not root, or no mount permission)")
    try:
        twin = twin_factory.get("llama")
        line = _one_line_error(CliRunner().invoke(cli, ["merge", "--base", str(twin.model_dir), "--adapter", str(twin.adapter_dir),
                                                        "--out", str(ro / "merged")]))
        assert "stopped: the file system is read-only" in line
    finally:
        subprocess.run(["umount", str(ro)], capture_output=True)


def test_json_usage_error_goes_to_stdout_too(tmp_path):
    """Row 17: a usage error (an --artifact that does not exist, caught by click) left stdout empty with --json too."""
    result = CliRunner().invoke(cli, ["run", "--artifact", str(tmp_path / "nothing.gguf"), "--profile", "cpu16", "--prompt", "hi", "--json"])
    assert result.exit_code == 2
    assert "does not exist" in json.loads(result.stdout)["error"]


def test_image_over_the_limit_is_said_before_the_model_loads(twin_factory, tmp_path):
    """Row 11 through `xpack run`: the image's header is read first, so a text-only artifact or a long load does not
    hide the image's problem."""
    from PIL import Image

    Image.new("1", (20000, 20000)).save(tmp_path / "big.png")
    twin = twin_factory.get("llama")
    line = _one_line_error(CliRunner().invoke(cli, ["run", "--artifact", str(twin.model_dir), "--profile", "cpu16", "--prompt", "hi",
                                                    "--image", str(tmp_path / "big.png")]))
    assert "big.png has more than 64 million pixels" in line


@pytest.mark.parametrize("template, says", [("{% include 'x.jinja' %}", "TypeError"), ("{{ 'ab' * 1000000000 }}", "repeats a sequence")])
def test_torch_runtime_renders_in_the_bounded_sandbox(twin_factory, tmp_path, template, says):
    """Row 12 on the torch runtime: it rendered with transformers' apply_chat_template, whose sandbox has no size or
    time cap: `'ab' * 10**9` grew until the kernel killed the process (rc -9 after 107 s, SmolLM2)."""
    twin = twin_factory.get("llama")
    folder = tmp_path / "hostile"
    shutil.copytree(twin.model_dir, folder)
    (folder / "chat_template.jinja").write_text(template)
    line = _one_line_error(CliRunner().invoke(cli, ["run", "--artifact", str(folder), "--profile", "cpu16", "--prompt", "hi", "--runtime", "torch"]))
    assert "chat template" in line and says in line
