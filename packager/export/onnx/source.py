"""The checkpoint folder a decoder export reads: the source itself, its merge with the adapters, or
its language model as a text-only checkpoint, and the tokenizer files the artifact gets from it.

- An adapter is merged into a temporary checkpoint first (``merge.run_merge``): optimum exports a
  transformers model, not a streaming merge.
- Gemma 3 with a vision tower: optimum exports no image-text-to-text decoder, so the language
  model's tensors are streamed (merged with the adapter on the way) into a temporary text-only
  ``Gemma3ForCausalLM`` checkpoint, and that is exported. The names and the class are data in
  ``archs/gemma3.json`` (``onnx.text_model``).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from xpack.errors import XpackError
from xpack.packager.archs import Arch
from xpack.packager.archs.onnx_spec import OnnxSpec, TextModelSpec
from xpack.packager.io.checkpoint import Checkpoint
from xpack.packager.io.tensors import ShardedWriter, TensorSpec, plan_shards
from xpack.packager.merge.lora import Adapter
from xpack.packager.merge.stream import MergeSettings, apply_op, plan_merge, run_merge, stream_base

# What the output folder gets from the checkpoint besides the graph (tokenizer, chat template, generation defaults).
COMPANIONS = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


def copy_companions(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer, chat template and generation files of ``src`` that exist into ``dst``; returns their names."""
    copied = []
    for name in COMPANIONS:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def prepare_source(
    ckpt: Checkpoint, adapters: list[Adapter], arch: Arch, spec: OnnxSpec, work: Path, merge: MergeSettings
) -> tuple[Path, list[str]]:
    """The checkpoint folder the export reads (under ``work`` unless it is the source itself), and the merge's notes."""
    if spec.text_model is not None:
        out = work / "text-model"
        return out, _write_text_checkpoint(ckpt, adapters, arch, spec.text_model, out, merge)
    if adapters:
        out = work / "merged"
        out.mkdir()
        result = run_merge(ckpt, adapters, out, merge)
        return out, list(result.plan.notes)
    return ckpt.path, []


def _text_config(ckpt: Checkpoint, text: TextModelSpec, untied: bool) -> dict:
    """config.json of the text-only model: the text config plus what the text class needs from the top level."""
    top = ckpt.config
    cfg = json.loads(json.dumps(top.get(text.config_key) or {}))
    cfg["architectures"] = [text.architecture]
    cfg["model_type"] = text.model_type
    cfg["tie_word_embeddings"] = False if untied else ckpt.tie_word_embeddings
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "dtype", "torch_dtype"):
        if cfg.get(key) is None and top.get(key) is not None:
            cfg[key] = top[key]
    cfg.pop("quantization_config", None)
    return cfg


def _write_text_checkpoint(
    ckpt: Checkpoint, adapters: list[Adapter], arch: Arch, text: TextModelSpec, out: Path, merge: MergeSettings
) -> list[str]:
    """Stream the language model's tensors (adapters merged on the way, as ``merge`` says) into a text-only checkpoint."""
    from tqdm import tqdm

    plan = plan_merge(ckpt, adapters, merge)
    names: dict[int, str] = {}
    ops = []
    for op in plan.ops:
        canon = arch.canonical(op.out_name)
        if not any(p.search(canon) for p in text.keep):
            continue
        name = canon
        for pattern, repl in text.rename:
            name = re.sub(pattern, repl, name)
        names[id(op)] = name
        ops.append(op)
    if not ops:
        raise XpackError(f"{ckpt.path} has no language-model tensors under the names xpack's {arch.name} table expects; re-save the checkpoint with transformers")
    out.mkdir(parents=True)
    specs = [TensorSpec(names[id(op)], op.spec.dtype, op.spec.shape) for op in ops]
    writer = ShardedWriter(out, plan_shards(specs, 2 * 10**9))
    for op, base, dtype in tqdm(stream_base(ckpt, ops), total=len(ops), desc="text model", unit="tensor", disable=None):
        writer.write(names[id(op)], apply_op(op, base, dtype))
    writer.close()
    (out / "config.json").write_text(json.dumps(_text_config(ckpt, text, plan.untied), indent=2) + "\n")
    copy_companions(ckpt.path, out)
    return plan.notes
