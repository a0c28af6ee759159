"""The architecture tables (packager/archs/*.json): every shipped table loads into its typed record, and
what each section names exists in the library that reads it (gguf-py, transformers)."""

from __future__ import annotations

import json
import re
from importlib import resources

import gguf
import pytest
import transformers

from xpack.errors import XpackError
from xpack.packager.archs import all_archs, find_arch
from xpack.packager.archs.gguf_spec import GgufSpec
from xpack.packager.archs.parse import parse
from xpack.packager.archs.schema import Arch

TABLES = sorted(p.name for p in resources.files("xpack.packager.archs").iterdir() if p.name.endswith(".json"))
SEED_ARCHITECTURES = {"Gemma3ForConditionalGeneration", "Gemma3ForCausalLM", "Gemma2ForCausalLM", "MllamaForConditionalGeneration", "LlamaForCausalLM"}


def _table(name: str) -> dict:
    return json.loads(resources.files("xpack.packager.archs").joinpath(name).read_text())


@pytest.mark.parametrize("name", TABLES)
def test_every_shipped_table_loads_typed(name):
    arch = parse(Arch, _table(name), name)
    assert arch.name == name.removesuffix(".json")
    assert isinstance(arch.gguf, GgufSpec)
    assert all(isinstance(p, re.Pattern) for p in arch.gguf.skip)
    assert arch.architectures and arch.model_types


def test_the_seed_architectures_have_tables():
    found = {cls for arch in all_archs().values() for cls in arch.architectures}
    assert SEED_ARCHITECTURES <= found
    for cls in SEED_ARCHITECTURES:
        assert find_arch({"architectures": [cls]}).architectures[0] == cls


@pytest.mark.parametrize("name", TABLES)
def test_gguf_sections_name_what_gguf_py_has(name):
    spec = parse(Arch, _table(name), name).gguf
    if spec.unsupported:
        assert not spec.arch and spec.mmproj is None
        return
    assert hasattr(gguf.MODEL_ARCH, spec.arch.upper())
    for hp in spec.hparam_specs:
        assert hasattr(gguf.GGUFWriter, hp.method), hp.method
    if spec.mmproj:
        assert hasattr(gguf.VisionProjectorType, spec.mmproj.projector_type.upper())
        for method, _ in spec.mmproj.hparams:
            assert hasattr(gguf.GGUFWriter, method), method


@pytest.mark.parametrize("name", TABLES)
def test_auto_class_is_a_transformers_class(name):
    arch = parse(Arch, _table(name), name)
    assert hasattr(transformers, arch.auto_class)
    for cls in arch.architectures:
        assert hasattr(transformers, cls), cls


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t: t.update(colour="red"), r"llama.json has unknown key\(s\) colour"),
        (lambda t: t.pop("embed_key"), r"llama.json lacks the required key 'embed_key'"),
        (lambda t: t.update(vision="no"), r"llama.json.vision must be bool, got str"),
        (lambda t: t["gguf"].update(permute_qk=1), r"llama.json.gguf.permute_qk must be bool, got int"),
        (lambda t: t["gguf"].update(skip=["("]), r"llama.json.gguf.skip\[0\] is not a valid regular expression"),
        (lambda t: t["gguf"].update(hparams="add_block_count"), r"llama.json.gguf.hparams must be a list, got str"),
        (lambda t: t["key_aliases"].append(["a", "b", "c"]), r"llama.json.key_aliases\[0\] must have 2 items, got 3"),
        (lambda t: t.update(gguf={"text_prefix": "model."}), r"llama.json.gguf: a gguf section names its 'arch'"),
    ],
)
def test_a_broken_table_is_refused_with_its_key(change, message):
    table = _table("llama.json")
    change(table)
    with pytest.raises(XpackError, match=message):
        parse(Arch, table, "llama.json")
