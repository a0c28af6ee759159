"""The ``onnx`` sections of the architecture tables load into packager/archs/onnx_spec.py's records;
a broken section is refused with one line naming the table and the key."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

from xpack.errors import XpackError
from xpack.packager.archs import all_archs
from xpack.packager.archs.onnx_spec import Fp16Keep, GraphSpec, OnnxSpec, TextModelSpec
from xpack.packager.archs.parse import parse
from xpack.packager.archs.schema import Arch

ROOT = Path(__file__).resolve().parents[1]


def _with_onnx(name: str, section: dict | None) -> Arch:
    """The shipped table ``name`` with its onnx section replaced, parsed as xpack parses every table."""
    table = json.loads(resources.files("xpack.packager.archs").joinpath(f"{name}.json").read_text())
    table["onnx"] = section
    return parse(Arch, table, f"architecture table {name}.json")


@pytest.mark.parametrize("name", sorted(all_archs()))
def test_every_shipped_onnx_section_parses(name):
    arch = all_archs()[name]
    spec = arch.onnx
    assert isinstance(spec, OnnxSpec)
    assert spec.unsupported is None
    assert isinstance(spec.fp16_keep_fp32, Fp16Keep) and isinstance(spec.lm_head_node, re.Pattern)
    assert spec.lm_head_node.search("/lm_head/MatMul")
    # every architecture is exported one way: xpack's decoder graph, a text model, or its own pipeline
    assert spec.graph is not None or spec.text_model is not None or spec.pipeline == "mllama"


def test_the_shipped_sections_say_what_the_export_reads():
    archs = all_archs()
    llama = archs["llama"].onnx
    assert llama.graph == GraphSpec(norms="pre", activation="silu")
    assert llama.fp16_keep_fp32.op_types == ("Softmax",)
    assert [p.pattern for p in llama.fp16_keep_fp32.node_patterns] == ["layernorm/", "^/model/norm/"]
    gemma3 = archs["gemma3"].onnx
    assert isinstance(gemma3.text_model, TextModelSpec) and gemma3.graph is None
    assert gemma3.text_model.architecture == "Gemma3ForCausalLM" and gemma3.text_model.config_key == "text_config"
    assert gemma3.text_model.rename == ((r"^model\.language_model\.", "model."),)
    assert archs["gemma3_text"].onnx.graph.qk_norm is True
    mllama = archs["mllama"].onnx
    assert mllama.pipeline == "mllama" and mllama.bits == (32, 16, 8, 4)


def test_an_unknown_key_is_refused_in_one_line():
    with pytest.raises(XpackError) as info:
        _with_onnx("llama", {"model_class": "AutoModelForCausalLM", "lm_head_nodes": "^/lm_head/"})
    assert str(info.value).startswith("architecture table llama.json.onnx has unknown key(s) lm_head_nodes (known: ")
    assert "\n" not in str(info.value)
    with pytest.raises(XpackError, match=r"^architecture table llama\.json\.onnx\.graph has unknown key\(s\) norm \("):
        _with_onnx("llama", {"graph": {"norm": "pre", "activation": "silu"}})


def test_a_wrong_type_is_refused_in_one_line():
    with pytest.raises(XpackError, match=r"^architecture table gemma2\.json\.onnx\.bits\[1\] must be int, got str$"):
        _with_onnx("gemma2", {"bits": [32, "8"]})
    with pytest.raises(XpackError, match=r"^architecture table gemma2\.json\.onnx\.graph\.embed_scale must be bool, got str$"):
        _with_onnx("gemma2", {"graph": {"norms": "sandwich", "activation": "gelu_tanh", "embed_scale": "yes"}})
    with pytest.raises(XpackError, match=r"^architecture table gemma2\.json\.onnx\.fp16_keep_fp32 must be an object, got list$"):
        _with_onnx("gemma2", {"fp16_keep_fp32": ["Softmax"]})
    with pytest.raises(XpackError, match=r"^architecture table gemma2\.json\.onnx\.lm_head_node is not a valid regular expression"):
        _with_onnx("gemma2", {"lm_head_node": "(unclosed"})


def test_values_outside_the_known_ones_are_refused():
    with pytest.raises(XpackError, match=r"^architecture table llama\.json\.onnx\.graph: graph\.norms is 'post'; choose one of pre, sandwich$"):
        _with_onnx("llama", {"graph": {"norms": "post", "activation": "silu"}})
    with pytest.raises(XpackError, match=r"^architecture table llama\.json\.onnx: pipeline is 'llava'; choose one of mllama"):
        _with_onnx("llama", {"pipeline": "llava"})
    with pytest.raises(XpackError, match=r"^architecture table llama\.json\.onnx\.text_model lacks the required key 'keep'$"):
        _with_onnx("llama", {"text_model": {"architecture": "X", "model_type": "x", "config_key": "text_config"}})


def test_no_section_is_none_and_the_records_are_frozen():
    assert _with_onnx("llama", None).onnx is None
    spec = all_archs()["llama"].onnx
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.opset = 17


def test_the_vision_memory_tool_runs_and_follows_the_tables(tmp_path):
    """tools/vision_memory.py imports the packager's policy (block sizes, vision precision, the exportable --bits): it
    runs, and calls exportable exactly the --bits the architecture tables export (a stale import once broke it unseen)."""
    out = tmp_path / "vm.json"
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "vision_memory.py"), "--json", str(out), "--md", str(tmp_path / "vm.md")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    mllama = next(m for m in json.loads(out.read_text())["models"] if m["arch"] == "MllamaForConditionalGeneration")
    assert {v["bits"] for v in mllama["artifacts"]["onnx"].values() if v["exportable"]} == set(all_archs()["mllama"].onnx.bits)
