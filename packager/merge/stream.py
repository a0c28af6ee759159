"""Streaming LoRA merge: base tensors one at a time, deltas added in fp32, shards written as they go.

Peak memory is the largest base tensor (and its fp32 copy) plus the adapters, whatever the model
size. The output is an ordinary Hugging Face checkpoint: the base's own tensor names, config,
tokenizer, processor and generation files, plus ``manifest.json`` and a model card.
"""

from __future__ import annotations

import json
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from xpack.errors import XpackError
from xpack.packager.archs import GENERIC, Arch, all_archs, find_arch
from xpack.packager.io.checkpoint import Checkpoint
from xpack.packager.io.tensors import (
    FLOAT_DTYPES,
    Reader,
    ShardedWriter,
    TensorSpec,
    from_f32,
    plan_shards,
    require_finite,
    sha256_file,
    to_f32,
)
from xpack.packager.merge.lora import Adapter, LoraModule, load_adapter
from xpack.packager.merge.qlora import DEFAULT_BLOCKSIZE, QloraBase, dequant_quant
from xpack.packager.merge.qlora_detect import merge_base_notes

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

DTYPES = {"auto": None, "fp32": "F32", "fp16": "F16", "bf16": "BF16"}
CONFIG_DTYPE = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
# Leading container names that differ between a model class and the checkpoint it was saved from
# (e.g. an adapter trained on Gemma3ForCausalLM applied to a checkpoint saved by another class).
_CONTAINERS = re.compile(r"^((model|language_model|text_model|base_model)\.)+")


@dataclass(frozen=True)
class MergeSettings:
    """``qlora_base`` (nf4/fp4), ``double_quant``, ``qlora_blocksize`` (None: bitsandbytes' 64): the 4-bit base a
    QLoRA adapter was trained on; the deltas are then added to dequant(quant(W)) of every 4-bit weight (qlora.py)."""

    dtype: str = "auto"
    max_shard_size: int = 5 * 10**9
    allow_pickle: bool = False
    qlora_base: str | None = None
    double_quant: bool = False
    qlora_blocksize: int | None = None

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise XpackError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        if self.qlora_base is None and (self.double_quant or self.qlora_blocksize is not None):
            given = "--double-quant" if self.double_quant else "--qlora-blocksize"
            raise XpackError(f"{given} describes the 4-bit base of --qlora-base; add --qlora-base nf4|fp4 or drop {given}")
        _ = self.qlora  # QloraBase refuses a bad quant type or block size now, before anything is read

    @property
    def qlora(self) -> QloraBase | None:
        if self.qlora_base is None:
            return None
        return QloraBase(self.qlora_base, self.double_quant, self.qlora_blocksize or DEFAULT_BLOCKSIZE)


@dataclass
class TensorOp:
    """What happens to one output tensor."""

    out_name: str
    source: str  # base tensor it starts from
    spec: TensorSpec  # output spec
    loras: list[tuple[Adapter, LoraModule]] = field(default_factory=list)
    start: "np.ndarray | None" = None  # a float32 tensor saved in the adapter that stands in for the base tensor
    replaced: bool = False  # modules_to_save: the start tensor is the result, no LoRA on top
    bias_deltas: list[tuple[Adapter, LoraModule]] = field(default_factory=list)
    qlora: QloraBase | None = None  # a 4-bit weight of the QLoRA base: start from dequant(quant(W))


@dataclass
class MergePlan:
    ops: list[TensorOp]
    arch: Arch
    untied: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def specs(self) -> list[TensorSpec]:
        return [op.spec for op in self.ops]


class _Resolver:
    """Find the base tensor an adapter module name refers to, across transformers' renamings."""

    def __init__(self, names, arch: Arch):
        self.arch = arch
        self.exact = set(names)
        self.canonical: dict[str, str] = {}
        self.loose: dict[str, list[str]] = {}
        for n in names:
            c = arch.canonical(n)
            self.canonical[c] = n
            self.loose.setdefault(_CONTAINERS.sub("", c), []).append(n)

    def find(self, name: str) -> str | None:
        if name in self.exact:
            return name
        c = self.arch.canonical(name)
        if c in self.canonical:
            return self.canonical[c]
        hits = self.loose.get(_CONTAINERS.sub("", c), [])
        return hits[0] if len(hits) == 1 else None

    def nearest(self, name: str) -> str:
        import difflib

        close = difflib.get_close_matches(self.arch.canonical(name), list(self.canonical), n=1, cutoff=0.0)
        return self.canonical[close[0]] if close else "?"


def _out_dtype(spec: TensorSpec, settings: MergeSettings) -> str:
    target = DTYPES[settings.dtype]
    return target if target and spec.dtype in FLOAT_DTYPES else spec.dtype


def _expected_delta_shape(mod: LoraModule, adapter: Adapter) -> tuple[int, ...]:
    out_f, in_f = int(mod.B.shape[0]), int(mod.A[0].size)
    if mod.embedding:
        return (int(mod.A.shape[1]), int(mod.B.shape[0]))
    return (in_f, out_f) if adapter.fan_in_fan_out else (out_f, in_f)


def _shape_matches(base_shape: tuple[int, ...], delta_shape: tuple[int, ...]) -> bool:
    """Linear/embedding: equal; convolutions: (out, in*k*k) against (out, in, k, k)."""
    if tuple(base_shape) == tuple(delta_shape):
        return True
    if len(base_shape) > 2 and len(delta_shape) == 2:
        rest = 1
        for d in base_shape[1:]:
            rest *= d
        return (base_shape[0], rest) == tuple(delta_shape)
    return False


def _mismatch(name: str, base_shape, other_shape, adapter: Adapter) -> XpackError:
    hint = adapter.config.get("base_model_name_or_path") or "the model it was trained on"
    return XpackError(
        f"adapter {adapter.path} was made for another base model: {name} is {list(base_shape)} in the base "
        f"but {list(other_shape)} in the adapter; pass the base it was trained from ({hint}) as --base"
    )


def _unmatched_target_notes(adapters: list[Adapter], specs) -> list[str]:
    """What an adapter config's target_modules names that matches no module of the base (PEFT's rule: the module's
    name, or its last dotted parts; a string is a regex over whole names). The merge follows the adapter's weights,
    so such a name changes nothing, silently, unless it is said (issue #14)."""
    modules = {n.rsplit(".", 1)[0] for n in specs if n.endswith((".weight", ".bias"))}
    notes = []
    for adapter in adapters:
        targets = adapter.config.get("target_modules")
        if targets == "all-linear":  # PEFT's shorthand, not a regex
            continue
        if isinstance(targets, str):
            pattern = re.compile(targets)
            unmatched = [] if any(pattern.fullmatch(m) for m in modules) else [targets]
        elif isinstance(targets, (list, tuple)):
            unmatched = [t for t in targets if isinstance(t, str) and not any(m == t or m.endswith("." + t) for m in modules)]
        else:
            continue
        if unmatched:
            notes.append(f"adapter {adapter.path}: target_modules names {', '.join(map(repr, sorted(unmatched)))}, which matches no module of "
                         f"the base model: nothing was merged there (its weights changed {len(adapter.modules)} modules); "
                         "check that the adapter was trained on this base")
    return notes


def plan_merge(ckpt: Checkpoint, adapters: list[Adapter], settings: MergeSettings) -> MergePlan:
    """Decide, before reading any weight, what each output tensor is made of; fail early on mismatches."""
    arch = find_arch(ckpt.config) or GENERIC
    specs = ckpt.specs
    ops = {name: TensorOp(name, name, TensorSpec(name, _out_dtype(s, settings), s.shape)) for name, s in specs.items()}
    resolver = _Resolver(specs, arch)
    plan = MergePlan(ops=[], arch=arch)
    lm_head = _derived_lm_head(ckpt, arch, adapters, resolver, ops, plan, settings)
    if lm_head is not None:
        resolver = _Resolver([*specs, lm_head], arch)

    for adapter in adapters:
        for mod in adapter.modules.values():
            key = resolver.find(mod.name + ".weight")
            if key is None:
                raise XpackError(
                    f"adapter {adapter.path} module {mod.name} matches no tensor of the base model "
                    f"(nearest: {resolver.nearest(mod.name + '.weight')}); the adapter was made for another model"
                )
            op = ops[key]
            if not _shape_matches(op.spec.shape, _expected_delta_shape(mod, adapter)):
                raise _mismatch(key, op.spec.shape, _expected_delta_shape(mod, adapter), adapter)
            op.loras.append((adapter, mod))
            if mod.B_bias is not None:
                bkey = resolver.find(mod.name + ".bias")
                if bkey is None:
                    raise XpackError(f"adapter {adapter.path} module {mod.name} has a LoRA bias but the base layer has no bias")
                ops[bkey].bias_deltas.append((adapter, mod))
        for replaced, tensors in ((False, adapter.base_layers), (True, adapter.replacements)):
            for name, tensor in tensors.items():
                key = resolver.find(name)
                if key is None:
                    raise XpackError(
                        f"adapter {adapter.path} saves a full tensor {name} (modules_to_save) that matches no tensor "
                        f"of the base model (nearest: {resolver.nearest(name)}); the adapter was made for another model"
                    )
                if tuple(tensor.shape) != ops[key].spec.shape:
                    raise _mismatch(key, ops[key].spec.shape, tuple(tensor.shape), adapter)
                ops[key].start = tensor
                if replaced:  # modules_to_save supersedes the module, as in PEFT
                    ops[key].loras.clear()
                    ops[key].replaced = True

    plan.ops = list(ops.values())
    plan.notes += _unmatched_target_notes(adapters, specs)
    _note_tied_embedding_change(ckpt, arch, plan, resolver)
    if settings.qlora is not None:
        _mark_4bit_weights(plan, settings.qlora)
    plan.notes += merge_base_notes(adapters, ckpt.quantization(), settings.qlora)
    return plan


def _mark_4bit_weights(plan: MergePlan, qlora: QloraBase) -> None:
    """Every weight bitsandbytes holds in 4 bits starts from dequant(quant(W)), adapted or not: the trained model ran on all of them."""
    spec = plan.arch.qlora
    if spec is None:
        known = ", ".join(a.name for a in all_archs().values() if a.qlora)
        raise XpackError(
            f"--qlora-base needs to know which {plan.arch.name} tensors bitsandbytes quantizes, and xpack's tables "
            f"do not say (they do for {known}); merge into the 16-bit weights without --qlora-base"
        )
    for op in plan.ops:
        if op.start is None and op.source == op.out_name and spec.quantized(plan.arch.canonical(op.source), plan.arch.lm_head_key):
            op.qlora = qlora


def _derived_lm_head(ckpt, arch, adapters, resolver, ops, plan, settings) -> str | None:
    """Untie the output head when the adapter changes it but the base stores it tied to the embedding.

    PEFT's merge_and_unload would write the head's delta into the shared embedding too, which changes
    the model's input side; xpack keeps the trained behaviour: a separate head, tie_word_embeddings off.
    """
    if not ckpt.tie_word_embeddings or resolver.find(arch.lm_head_key) is not None:
        return None
    embed = resolver.find(arch.embed_key)
    if embed is None:
        return None
    head = arch.lm_head_key
    touches = any(
        arch.canonical(m.name + ".weight") == head for a in adapters for m in a.modules.values()
    ) or any(arch.canonical(n) == head for a in adapters for n in [*a.replacements, *a.base_layers])
    if not touches:
        return None
    src = ops[embed].spec
    ops[head] = TensorOp(head, embed, TensorSpec(head, src.dtype, src.shape))
    plan.untied = True
    plan.notes.append(
        f"the adapter changes {head}, which the base ties to {embed}: the merged model stores its own output head "
        "and sets tie_word_embeddings=false"
    )
    return head


def _note_tied_embedding_change(ckpt, arch, plan, resolver) -> None:
    embed = resolver.find(arch.embed_key)
    if plan.untied or not ckpt.tie_word_embeddings or embed is None or resolver.find(arch.lm_head_key):
        return
    op = next(o for o in plan.ops if o.out_name == embed)
    if op.loras or op.start is not None:
        plan.notes.append(
            f"the adapter changes {embed}, which is tied to the output head: the head changes with it "
            "(as with PEFT's merge_and_unload)"
        )


def _dora(W: "np.ndarray", delta: "np.ndarray", magnitude: "np.ndarray", out_axis: int) -> "np.ndarray":
    """PEFT's DoRA merge: magnitude * (W + delta) / ||W + delta||, the norm taken per output feature."""
    import numpy as np

    merged = W + delta
    dims = tuple(d for d in range(merged.ndim) if d != out_axis)
    norm = np.sqrt(np.square(merged).sum(axis=dims, keepdims=True))
    shape = [1] * merged.ndim
    shape[out_axis] = -1
    return magnitude.reshape(shape) / norm * merged


def apply_op(op: TensorOp, base: "np.ndarray", base_dtype: str) -> "np.ndarray":
    """One output tensor, in its planned storage dtype, from its base tensor (``base_dtype`` storage; math in fp32)."""
    import numpy as np

    out = op.spec.dtype
    if op.start is not None:
        base, base_dtype = op.start, "F32"
    if not op.loras and not op.bias_deltas and op.qlora is None:
        if base_dtype == out:
            return base
        return from_f32(to_f32(base, base_dtype), out)
    W = to_f32(base, base_dtype)
    if op.qlora is not None:
        W = dequant_quant(W, op.qlora)  # quantized from the dtype it is stored in, as transformers loads it
    elif op.start is not None and W is op.start:
        W = W.copy()  # never modify a tensor the adapter owns (the base's arrays are fresh reads)
    for adapter, mod in op.loras:
        delta = mod.delta(adapter.fan_in_fan_out, adapter.weight).reshape(W.shape)
        if mod.magnitude is not None:
            out_axis = 1 if (mod.embedding or adapter.fan_in_fan_out) else 0
            W = _dora(W, delta, mod.magnitude, out_axis)
        else:
            W += delta
    for adapter, mod in op.bias_deltas:
        W += mod.B_bias * np.float32(mod.scale * adapter.weight)
    adapters = ", ".join(str(a.path) for a, _ in op.loras + op.bias_deltas)
    require_finite(W, op.out_name, f"after merging {adapters or 'the 4-bit base'} into it: check the adapter's weights (a diverged training run?)")
    return from_f32(W, out, inplace=True)


def _merged_config(ckpt: Checkpoint, plan: MergePlan, settings: MergeSettings) -> dict:
    config = json.loads(json.dumps(ckpt.config))
    for cfg in (config, config.get("text_config")):
        if not isinstance(cfg, dict):
            continue
        cfg.pop("quantization_config", None)  # the training base may have been 4-bit; the merge is not
        if plan.untied:
            cfg["tie_word_embeddings"] = False
    target = DTYPES[settings.dtype]
    if target:
        for key in ("torch_dtype", "dtype"):
            if key in config or key == "torch_dtype":
                config[key] = CONFIG_DTYPE[target]
    return config


@dataclass
class MergeResult:
    out_dir: Path
    weight_hashes: dict[str, str]
    input_hashes: dict[str, str]
    plan: MergePlan
    tensors: int
    merged_tensors: int
    bytes_written: int


def run_merge(ckpt: Checkpoint, adapters: list[Adapter], tmp_out: Path, settings: MergeSettings) -> MergeResult:
    """Merge into ``tmp_out`` (a fresh folder): weights, config, companion files. No card, no manifest."""
    from tqdm import tqdm

    ckpt.check_not_packed()
    plan = plan_merge(ckpt, adapters, settings)
    inputs = [*ckpt.weight_files, *ckpt.companion_files(), ckpt.path / "config.json"]
    for a in adapters:
        inputs += a.files
    with ThreadPoolExecutor(max_workers=1) as pool:
        hashing = pool.submit(lambda: {str(p): sha256_file(p) for p in inputs})
        shards = plan_shards(plan.specs, settings.max_shard_size)
        writer = ShardedWriter(tmp_out, shards)
        written = 0
        for op, base, dtype in tqdm(stream_base(ckpt, plan.ops), total=len(plan.ops), desc="merge", unit="tensor", disable=None):
            writer.write(op.out_name, apply_op(op, base, dtype))
            written += op.spec.nbytes
        weight_hashes = writer.close()
        input_hashes = hashing.result()

    (tmp_out / "config.json").write_text(json.dumps(_merged_config(ckpt, plan, settings), indent=2) + "\n")
    for p in ckpt.companion_files():
        shutil.copy2(p, tmp_out / p.name)
    merged = sum(1 for op in plan.ops if op.loras or op.start is not None or op.bias_deltas or op.qlora is not None)
    return MergeResult(tmp_out, weight_hashes, input_hashes, plan, len(plan.ops), merged, written)


def stream_base(ckpt: Checkpoint, ops: list[TensorOp]):
    """(op, base tensor, its dtype) for each op, reading the base one tensor at a time, one file open at a time."""
    by_file = {n: f for f, specs in ckpt.headers.items() for n in specs}
    reader: Reader | None = None
    try:
        for op in ops:
            f = by_file[op.source]
            if reader is None or reader.path != f:
                if reader is not None:
                    reader.close()
                reader = Reader(f)
            yield op, reader.get(op.source), reader.specs[op.source].dtype
    finally:
        if reader is not None:
            reader.close()


def load_adapters(specs: list[tuple[Path, float]], allow_pickle: bool) -> list[Adapter]:
    return [load_adapter(path, weight=w, allow_pickle=allow_pickle) for path, w in specs]
