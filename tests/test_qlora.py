"""QLoRA-aware merge (issue #15) against bitsandbytes 0.50.2 on CPU, litgpt style: tiny twins, the demo model,
bitsandbytes and PEFT as the reference, the production merge path.

- The numbers: xpack's dequant(quant(W)) equals bitsandbytes' quantize_4bit + dequantize_4bit bit for bit, for
  every 4-bit tensor of every twin and of the demo model (NF4/FP4, double quantization on/off, block sizes 64
  and 128; float32 and bfloat16 weights), and the tensors xpack treats as 4-bit are the modules transformers
  turns into Linear4bit.
- The merge: `xpack merge --qlora-base nf4 --double-quant` equals the model as trained (the 4-bit base with the
  PeftModel on top) within 1e-6 per weight and 1e-4 per logit; on the demo model it is measurably closer to it
  than the plain merge.
- The interface: options, errors, the detection note, and the export path.

bitsandbytes 0.50.2 on an AVX-512 CPU has two quirks these tests step around, both reported in issue #15:
its CPU dequantize_4bit takes the absmax per row (wrong when a row is not a whole number of blocks: the twins'
32- and 96-wide rows), so those tensors are compared with bitsandbytes' own flat-block kernel (its default
backend, what CUDA computes); and a Linear4bit in eval mode on a CPU with AVX512-BF16 computes in bfloat16 with
a bfloat16 absmax, so the reference models here switch that path off and run in float32, as training does.
"""

from __future__ import annotations

import itertools
import json
import re
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from peft import PeftModel
from safetensors.numpy import load_file

import twins
from xpack.cli import cli
from xpack.packager.archs import find_arch
from xpack.packager.demo.base_model import demo_adapter_dir, demo_base_dir
from xpack.packager.export.onnx.source import prepare_source
from xpack.packager.io.checkpoint import Checkpoint
from xpack.packager.io.tensors import Reader, from_f32, to_f32
from xpack.packager.merge.job import merge
from xpack.packager.merge.lora import load_adapter
from xpack.packager.merge.qlora import QloraBase, code_book, dequant_quant, dynamic_code_book, torch_mean_f32
from xpack.packager.merge.stream import MergeSettings, plan_merge
from xpack.packager.verify.parity import compare_logits
from xpack.runtimes.registry import load

MODELS = [*twins.TWIN_NAMES, "demo"]
COMBOS = list(itertools.product(["nf4", "fp4"], [False, True], [64, 128]))  # quant type, double quant, block size
WEIGHT_ATOL = 1e-6
LOGIT_ATOL = 1e-4
NF4_DQ = MergeSettings(qlora_base="nf4", double_quant=True)


def _model_dir(twin_factory, name):
    return demo_base_dir() if name == "demo" else twin_factory.get(name).model_dir


def _load_4bit(model_dir, quant_type="nf4", double_quant=True):
    """The base as QLoRA training loads it: transformers + bitsandbytes 4-bit on CPU, float32 everywhere else.

    Linear4bit's eval-mode CPU shortcut (bfloat16 compute and absmax on AVX512-BF16 CPUs) is switched off:
    training, and so the model the adapter was trained with, runs the float32 path.
    """
    import bitsandbytes as bnb
    import transformers
    from transformers import BitsAndBytesConfig

    arch = json.loads((model_dir / "config.json").read_text())["architectures"][0]
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant)
    model = getattr(transformers, arch).from_pretrained(model_dir, quantization_config=config, device_map="cpu", dtype=torch.float32)
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model.eval()


def _bnb_dequantize(packed, state):
    """bitsandbytes' flat-block 4-bit dequantization (its default backend's kernel, as CUDA computes it)."""
    import bitsandbytes.functional as F
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    absmax = state.absmax
    if state.nested:
        absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    kernel = _dequantize_4bit_compute.__wrapped__  # the plain function under bitsandbytes' torch.compile wrapper
    return kernel(packed.reshape(-1), absmax, _get_4bit_code(state.quant_type, "cpu"), state.blocksize, state.shape, state.dtype)


def _quantized_tensors(model_dir) -> dict[str, np.ndarray]:
    """The checkpoint's tensors xpack merges into dequant(quant(W)), by checkpoint name."""
    ckpt = Checkpoint(model_dir)
    names = {op.source for op in plan_merge(ckpt, [], NF4_DQ).ops if op.qlora is not None}
    out = {}
    for path in ckpt.weight_files:
        reader = Reader(path)
        try:
            out.update({n: to_f32(reader.get(n), reader.specs[n].dtype) for n in reader.specs if n in names})
        finally:
            reader.close()
    return out


# ---------------------------------------------------------------------------------------------------
# The numbers
# ---------------------------------------------------------------------------------------------------


def test_code_books_are_bitsandbytes():
    import bitsandbytes.functional as F

    for quant_type in ("nf4", "fp4"):
        assert np.array_equal(code_book(quant_type).view(np.uint32), F.get_4bit_type(quant_type, device="cpu").numpy().view(np.uint32))
    assert np.array_equal(dynamic_code_book().view(np.uint32), F.create_dynamic_map().numpy().view(np.uint32))


@pytest.mark.parametrize("threads", [1, 2])
def test_absmax_mean_sums_in_torch_order(threads):
    """torch's CPU float32 mean, bit for bit, on one thread and split between two (above 32768 values)."""
    rng = np.random.default_rng(threads)
    sizes = [*range(1, 70), 255, 256, 1000, 5184, 13824, 32767, 32768, 40000, 262144, 409600]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for n in sizes:
            x = (rng.random(n) * rng.choice([1e-3, 1.0, 100.0])).astype(np.float32)
            assert torch_mean_f32(x, threads) == torch.from_numpy(x).mean().numpy(), n
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("name", MODELS)
def test_quantized_tensors_are_the_linear4bit_modules(twin_factory, name):
    import bitsandbytes as bnb

    model_dir = _model_dir(twin_factory, name)
    model = _load_4bit(model_dir)
    linear4bit = {n + ".weight" for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    arch = find_arch(json.loads((model_dir / "config.json").read_text()))
    ours = {arch.canonical(n) for n in _quantized_tensors(model_dir)}
    assert linear4bit and ours == linear4bit, (sorted(ours ^ linear4bit), len(ours), len(linear4bit))
    assert arch.lm_head_key not in ours  # transformers keeps the output head in full precision


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["F32", "BF16"])
@pytest.mark.parametrize("name", MODELS)
def test_dequant_quant_is_bitsandbytes_bit_for_bit(twin_factory, name, dtype):
    """Every 4-bit tensor, every setting: float32 weights, and the same rounded to bfloat16 (a bf16 checkpoint).

    The reference is bitsandbytes' CPU dequantize_4bit where it is right (rows a whole number of blocks),
    its flat-block kernel elsewhere (see the module docstring). The demo model (real weights) is compared on its first
    and last layers, each of the seven projections (14 of its 210 tensors: the whole model took 5.5 minutes of the
    suite here); in bfloat16 with block size 64 only, the one transformers uses (BitsAndBytesConfig has no block size).
    """
    import bitsandbytes.functional as F

    tensors = _quantized_tensors(_model_dir(twin_factory, name))
    if name == "demo":
        layers = sorted({int(m.group(1)) for m in (re.search(r"\.layers\.(\d+)\.", n) for n in tensors) if m})
        tensors = {n: w for n, w in tensors.items() if re.search(rf"\.layers\.({layers[0]}|{layers[-1]})\.", n)}
        assert len(tensors) == 14, sorted(tensors)
    combos = [c for c in COMBOS if c[2] == 64] if (name, dtype) == ("demo", "BF16") else COMBOS
    compared = {"cpu kernel": 0, "flat-block kernel": 0}
    for (quant_type, double_quant, blocksize), (tname, w) in itertools.product(combos, tensors.items()):
        if dtype == "BF16":
            bits = from_f32(w, "BF16")
            t, w = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16), to_f32(bits, "BF16")
        else:
            t = torch.from_numpy(w)
        packed, state = F.quantize_4bit(t, blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type)
        if w.shape[-1] % blocksize == 0:
            kind, ref = "cpu kernel", F.dequantize_4bit(packed, state)
        else:
            kind, ref = "flat-block kernel", _bnb_dequantize(packed, state)
        # Bit for bit, but for the sign of zero: bitsandbytes' CPU dequantize kernel returns -0.0 for FP4's
        # negative-zero code on some CPUs (this AMD EPYC with AVX2, no AVX512) and +0.0 on others (the machine of earlier
        # runs); the value is the same, and adding +0.0 normalizes both.
        ref = ref + 0.0
        ref = ref.view(torch.int16).numpy().view(np.uint16) if dtype == "BF16" else ref.numpy().view(np.uint32)
        ours = dequant_quant(w, QloraBase(quant_type, double_quant, blocksize), sum_threads=torch.get_num_threads()) + np.float32(0)
        ours = from_f32(ours, "BF16") if dtype == "BF16" else ours.view(np.uint32)
        assert np.array_equal(ours, ref), (tname, quant_type, double_quant, blocksize, kind, int((ours != ref).sum()))
        compared[kind] += 1
    assert sum(compared.values()) == len(combos) * len(tensors) and compared["cpu kernel"] > 0
    print(f"{name} {dtype}: {len(tensors)} tensors x {len(combos)} settings; {compared}")


def test_zero_blocks_partial_blocks_and_odd_shapes():
    """What real checkpoints rarely have: an all-zero block, a last partial block, an odd row length."""
    import bitsandbytes.functional as F

    rng = np.random.default_rng(0)
    for shape in [(33, 33), (3, 5), (7, 100), (130,)]:
        w = (rng.standard_normal(shape) * 0.02).astype(np.float32)
        w.reshape(-1)[:130] = 0
        for quant_type, double_quant, blocksize in COMBOS:
            packed, state = F.quantize_4bit(torch.from_numpy(w), blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type)
            ours = dequant_quant(w, QloraBase(quant_type, double_quant, blocksize))
            assert np.array_equal(ours.view(np.uint32), _bnb_dequantize(packed, state).numpy().view(np.uint32)), (shape, quant_type)


# ---------------------------------------------------------------------------------------------------
# The merge against the model as trained
# ---------------------------------------------------------------------------------------------------


def _merge_cli(*args):
    return CliRunner().invoke(cli, ["merge", *map(str, args)])


def _trained_weights(model_dir, adapter_dir) -> dict[str, torch.Tensor]:
    """Each Linear4bit of the PeftModel over the 4-bit base, as the forward pass uses it: dequantized, plus the LoRA delta."""
    import bitsandbytes as bnb

    model = PeftModel.from_pretrained(_load_4bit(model_dir), adapter_dir).eval()
    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        weight = _bnb_dequantize(module.weight.data, module.weight.quant_state).float()
        if name.endswith(".base_layer"):
            name = name.removesuffix(".base_layer")
            weight = weight + model.get_submodule(name).get_delta_weight("default").float()
        out[name.removeprefix("base_model.model.") + ".weight"] = weight
    return out


@pytest.mark.parametrize("name", twins.TWIN_NAMES)
def test_qlora_merge_is_the_model_as_trained(twin_factory, tmp_path, name):
    twin = twin_factory.get(name)
    result = _merge_cli("--base", twin.model_dir, "--adapter", twin.adapter_dir, "--out", tmp_path / "nf4", "--qlora-base", "nf4", "--double-quant")
    assert result.exit_code == 0, result.output
    plain = merge(str(twin.model_dir), [str(twin.adapter_dir)], tmp_path / "plain")
    arch = find_arch(json.loads((twin.model_dir / "config.json").read_text()))
    ours = {arch.canonical(k): v for k, v in load_file(tmp_path / "nf4" / "model.safetensors").items()}
    plain_weights = {arch.canonical(k): v for k, v in load_file(tmp_path / "plain" / "model.safetensors").items()}
    trained = _trained_weights(twin.model_dir, twin.adapter_dir)
    worst = max((float(np.abs(ours[k] - w.numpy()).max()), k) for k, w in trained.items())
    assert worst[0] <= WEIGHT_ATOL, worst
    assert all(np.array_equal(ours[k], v) for k, v in plain_weights.items() if k not in trained)  # the rest: the plain merge's
    assert max(float(np.abs(ours[k] - plain_weights[k]).max()) for k in trained) > 100 * WEIGHT_ATOL  # the base mattered
    manifest = json.loads((tmp_path / "nf4" / "manifest.json").read_text())
    assert manifest["merge"]["qlora"] == {"qlora_base": "nf4", "double_quant": True, "blocksize": 64}
    assert manifest["merge"]["merged_tensors"] == len(trained) and plain["merge"]["qlora"] is None
    card = (tmp_path / "nf4" / "README.md").read_text()
    assert "**Merge base**" in card and "nf4, double quantization, blocksize 64" in card
    assert "**Merge base**" not in (tmp_path / "plain" / "README.md").read_text()


@pytest.mark.parametrize("name", ["llama", "gemma2", "gemma3"])
def test_qlora_merge_logits_equal_the_peft_model_on_the_4bit_base(twin_factory, tmp_path, name):
    """Teacher-forced logits of the merged checkpoint (fp32) and of the PeftModel over the 4-bit base."""
    twin = twin_factory.get(name)
    merge(str(twin.model_dir), [str(twin.adapter_dir)], tmp_path / "nf4", NF4_DQ)
    inputs = twins.sample_inputs(name, twin.model_dir, text=twins.PARITY_TEXT)
    trained = PeftModel.from_pretrained(_load_4bit(twin.model_dir), twin.adapter_dir).eval()
    with torch.no_grad():
        reference = trained(**inputs).logits.float()
        got = twins.load_base(tmp_path / "nf4")(**inputs).logits.float()
        base = twins.load_base(twin)(**inputs).logits.float()
    torch.testing.assert_close(got, reference, atol=LOGIT_ATOL, rtol=0)
    assert (base - reference).abs().max() > 1e-3, "the adapter must change the model"


@pytest.fixture(scope="module")
def demo_merges(tmp_path_factory):
    root = tmp_path_factory.mktemp("qlora-demo")
    for label, settings in (("plain", MergeSettings()), ("nf4", NF4_DQ)):
        merge(str(demo_base_dir()), [str(demo_adapter_dir())], root / label, settings)
    return root


@pytest.mark.slow
def test_demo_nf4_merge_is_closer_to_the_trained_model_than_the_plain_merge(demo_merges):
    """SmolLM2-135M + the demo LoRA, teacher-forced on the parity text against the PeftModel over its NF4 base."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = AutoTokenizer.from_pretrained(demo_base_dir())(twins.PARITY_TEXT, return_tensors="pt")
    trained = PeftModel.from_pretrained(_load_4bit(demo_base_dir()), demo_adapter_dir()).eval()
    with torch.no_grad():
        reference = trained(**ids).logits[0].float().numpy()
        figures = {
            label: compare_logits(reference, AutoModelForCausalLM.from_pretrained(demo_merges / label, dtype=torch.float32)(**ids).logits[0].float().numpy())
            for label in ("plain", "nf4")
        }
    plain, nf4 = figures["plain"], figures["nf4"]
    assert nf4["kl_mean"] < 1e-6 and nf4["top1_agreement"] == 1.0 and nf4["max_abs_logit_error"] < 1e-3, nf4
    assert plain["kl_mean"] > 1e-2 and plain["kl_mean"] > 1000 * nf4["kl_mean"], (plain, nf4)


# ---------------------------------------------------------------------------------------------------
# The interface: options, errors, detection
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--double-quant"], "--double-quant describes the 4-bit base of --qlora-base"),
        (["--blocksize", "64"], "--qlora-blocksize describes the 4-bit base of --qlora-base"),
        (["--qlora-base", "nf4", "--qlora-blocksize", "100"], "--qlora-blocksize 100 is not a bitsandbytes 4-bit block size"),
    ],
)
def test_bad_qlora_options_are_one_line(twin_factory, tmp_path, args, needle):
    twin = twin_factory.get("llama")
    out = tmp_path / "out"
    result = _merge_cli("--base", twin.model_dir, "--adapter", twin.adapter_dir, "--out", out, *args)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error: ") and needle in lines[0], result.output
    assert not out.exists()


def test_qlora_base_needs_an_architecture_table(twin_factory, tmp_path):
    twin = twin_factory.get("llama")
    base = tmp_path / "base"
    shutil.copytree(twin.model_dir, base)
    config = json.loads((base / "config.json").read_text())
    config.update(architectures=["SomethingElseForCausalLM"], model_type="something_else")
    (base / "config.json").write_text(json.dumps(config))
    result = _merge_cli("--base", base, "--adapter", twin.adapter_dir, "--out", tmp_path / "out", "--qlora-base", "nf4")
    assert result.exit_code == 1 and "--qlora-base needs to know which generic tensors bitsandbytes quantizes" in result.output


def _adapter_named(twin, tmp_path, trained_on):
    adapter = tmp_path / "adapter"
    shutil.copytree(twin.adapter_dir, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = trained_on
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    return adapter


def test_a_4bit_trained_adapter_is_noticed_and_the_default_kept(twin_factory, tmp_path):
    twin = twin_factory.get("llama")
    adapter = _adapter_named(twin, tmp_path, "unsloth/SmolLM2-135M-Instruct-bnb-4bit")
    result = _merge_cli("--base", twin.model_dir, "--adapter", adapter, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    note = (
        f"adapter {adapter} was trained on a 4-bit base (unsloth/SmolLM2-135M-Instruct-bnb-4bit); merging into the 16-bit "
        "weights as asked; pass --qlora-base nf4 --double-quant to merge into the weights it was trained on"
    )
    assert result.stderr.strip().splitlines() == [f"note: {note}"] and "note:" not in result.stdout
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert note in manifest["merge"]["notes"] and manifest["merge"]["qlora"] is None
    assert note in (tmp_path / "out" / "README.md").read_text()
    plain = merge(str(twin.model_dir), [str(twin.adapter_dir)], tmp_path / "plain")
    assert manifest["files"]["model.safetensors"] == plain["files"]["model.safetensors"]  # the default did not change

    asked = _merge_cli("--base", twin.model_dir, "--adapter", adapter, "--out", tmp_path / "nf4", "--qlora-base", "nf4", "--double-quant")
    assert asked.stderr.strip() == (
        f"note: adapter {adapter} was trained on a 4-bit base (unsloth/SmolLM2-135M-Instruct-bnb-4bit); merging into "
        "dequant(quant(W)) (nf4, double quantization, blocksize 64) as asked; drop --qlora-base to merge into the 16-bit weights"
    )


def test_a_4bit_quantization_config_in_the_base_names_its_settings(twin_factory, tmp_path):
    twin = twin_factory.get("llama")
    base = tmp_path / "base"
    shutil.copytree(twin.model_dir, base)
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": False}
    (base / "config.json").write_text(json.dumps(config))
    result = _merge_cli("--base", base, "--adapter", twin.adapter_dir, "--out", tmp_path / "out", "--json")
    assert result.exit_code == 0, result.output
    json.loads(result.stdout)  # the notes stay off stdout: --json prints one JSON document
    assert "the base's config.json has a bitsandbytes 4-bit quantization_config" in result.stderr
    assert result.stderr.rstrip().endswith("pass --qlora-base fp4 to merge into the weights it was trained on")


def test_an_adapter_without_4bit_signs_gets_no_note(twin_factory, tmp_path):
    twin = twin_factory.get("llama")
    result = _merge_cli("--base", twin.model_dir, "--adapter", twin.adapter_dir, "--out", tmp_path / "out")
    assert result.exit_code == 0 and result.stderr == "", result.output


# ---------------------------------------------------------------------------------------------------
# The export path
# ---------------------------------------------------------------------------------------------------


def test_gguf_export_with_qlora_base_is_the_qlora_merge(twin_factory, tmp_path, cpu):
    twin = twin_factory.get("llama")
    merge(str(twin.model_dir), [str(twin.adapter_dir)], tmp_path / "nf4", NF4_DQ)
    result = CliRunner().invoke(cli, [
        "export", "--model", str(twin.model_dir), "--adapter", str(twin.adapter_dir), "--qlora-base", "nf4", "--double-quant",
        "--format", "gguf", "--quant", "F32", "--out", str(tmp_path / "gguf"),
    ])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "gguf" / "manifest.json").read_text())
    assert manifest["qlora"] == {"qlora_base": "nf4", "double_quant": True, "blocksize": 64}
    ids = twins.load_tokenizer(twin)(twins.PARITY_TEXT)["input_ids"]
    with torch.no_grad():
        reference = twins.load_base(tmp_path / "nf4")(input_ids=torch.tensor([ids])).logits[0].float().numpy()
        plain = PeftModel.from_pretrained(twins.load_base(twin), twin.adapter_dir)(input_ids=torch.tensor([ids])).logits[0].float().numpy()
    with load(tmp_path / "gguf", cpu) as runtime:
        got = runtime.logits(ids)
    figures = compare_logits(reference, got)
    assert figures["top1_agreement_tie_aware"] == 1.0 and figures["max_abs_logit_error"] <= 5e-3, figures  # test_gguf.py's F32 bar
    assert np.abs(plain - reference).max() > 10 * figures["max_abs_logit_error"], "the 4-bit base must matter"


@pytest.mark.parametrize("name", ["llama", "gemma3_vision"])
def test_onnx_source_is_the_qlora_merge(twin_factory, tmp_path, name):
    """The checkpoint the ONNX export reads (a merge, or Gemma 3's text-only language model) takes the 4-bit base."""
    twin = twin_factory.get(name)
    merge(str(twin.model_dir), [str(twin.adapter_dir)], tmp_path / "nf4", NF4_DQ)
    arch = find_arch(json.loads((twin.model_dir / "config.json").read_text()))
    (tmp_path / "work").mkdir()
    src, notes = prepare_source(Checkpoint(twin.model_dir), [load_adapter(twin.adapter_dir)], arch, arch.onnx, tmp_path / "work", NF4_DQ)
    ours = {arch.canonical(k): v for k, v in load_file(tmp_path / "nf4" / "model.safetensors").items()}
    exported = {}
    for path in sorted(src.glob("*.safetensors")):
        exported.update(load_file(path))
    rename = {}
    if arch.onnx.text_model is not None:  # the text checkpoint renames the language model's tensors
        for name_ in ours:
            new = name_
            for pattern, repl in arch.onnx.text_model.rename:
                new = re.sub(pattern, repl, new)
            rename[new] = name_
    assert exported and all(np.array_equal(v, ours[rename.get(k, k)]) for k, v in exported.items())
    assert any("does not name a 4-bit base" in n for n in notes)


def test_export_qlora_base_needs_an_adapter(twin_factory, tmp_path):
    twin = twin_factory.get("llama")
    result = CliRunner().invoke(cli, ["export", "--model", str(twin.model_dir), "--qlora-base", "nf4", "--format", "gguf", "--quant", "F32", "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and result.output.strip() == (
        "Error: --qlora-base says how to merge an --adapter, and there is none; give --adapter or drop --qlora-base"
    )
