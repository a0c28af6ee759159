"""``xpack merge`` end to end: resolve sources, merge into a temporary folder, write card and manifest, rename."""

from __future__ import annotations

from pathlib import Path

from xpack import __version__
from xpack.packager.cards import render as cards
from xpack.packager.io.atomic import atomic_dir, check_destination
from xpack.packager.io.checkpoint import Checkpoint
from xpack.packager.io.sources import Source, resolve
from xpack.packager.merge import merge_base_parity
from xpack.packager.merge.lora import Adapter, parse_adapter_spec
from xpack.packager.merge.stream import MergeResult, MergeSettings, load_adapters, run_merge
from xpack.runtimes.artifacts import CARD_FILE

EXAMPLE_PROMPT = "You are an expert radiologist. Describe the findings of this chest X-ray."


def merge(base: str, adapters: list[str], out: Path, settings: MergeSettings | None = None, force: bool = False,
          measure_merge_base: bool = False) -> dict:
    """Merge ``adapters`` (``REF[:WEIGHT]``) into ``base`` and write the checkpoint to ``out``. Returns the manifest.

    ``measure_merge_base``: before the folder is renamed into place, measure both merge bases of a QLoRA adapter
    against the model as trained and the 16-bit base + adapter (``merge_base_parity.py``) for the manifest and card."""
    settings = settings or MergeSettings()
    out = Path(out)
    check_destination(out, force)
    base_src = resolve(base, "base model")
    specs = [parse_adapter_spec(a) for a in adapters]
    adapter_srcs = [resolve(ref, "adapter") for ref, _ in specs]
    loaded = load_adapters([(s.path, w) for s, (_, w) in zip(adapter_srcs, specs)], settings.allow_pickle)
    ckpt = Checkpoint(base_src.path)
    trained = merge_base_parity.trained_base(settings, loaded, ckpt.quantization()) if measure_merge_base else None
    with atomic_dir(out, force) as tmp:
        result = run_merge(ckpt, loaded, tmp, settings)
        parity = merge_base_parity.measure(ckpt, loaded, tmp, settings, trained) if trained else None
        data = _manifest_data(base_src, ckpt, adapter_srcs, loaded, settings, result, parity)
        _write_card(tmp, out.name, base_src, ckpt, adapter_srcs, loaded, settings, result, parity)
        manifest = cards.write_manifest(tmp, data, result.weight_hashes)
    manifest["out_dir"] = str(out)
    return manifest


def _rel_hashes(paths_to_hash: dict[str, str], root: Path) -> dict[str, str]:
    out = {}
    for p, h in paths_to_hash.items():
        path = Path(p)
        out[path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)] = h
    return out


def _manifest_data(base_src: Source, ckpt: Checkpoint, adapter_srcs, loaded: list[Adapter], settings, result: MergeResult,
                   parity: dict | None) -> dict:
    hashes = result.input_hashes
    base_hashes = {k: v for k, v in hashes.items() if Path(k).is_relative_to(base_src.path)}
    return {
        "kind": "merged-checkpoint",
        "base": {
            **base_src.describe(),
            "architecture": result.plan.arch.name,
            "model_type": ckpt.model_type,
            "files": _rel_hashes(base_hashes, base_src.path),
        },
        "adapters": [
            {
                **src.describe(),
                **a.summary(),
                "files": _rel_hashes({str(f): hashes[str(f)] for f in a.files}, src.path),
            }
            for src, a in zip(adapter_srcs, loaded)
        ],
        "settings": {"dtype": settings.dtype, "max_shard_size": settings.max_shard_size},
        "merge": {
            "tensors": result.tensors,
            "merged_tensors": result.merged_tensors,
            "bytes": result.bytes_written,
            "untied_output_head": result.plan.untied,
            "qlora": settings.qlora.describe() if settings.qlora else None,  # the merge base: null is the 16-bit weights
            "notes": result.plan.notes,
            "merge_base_parity": parity,  # --measure-merge-base: both merge bases against both references; else null
        },
    }


def _name_of(src: Source, fallback: str | None = None) -> str:
    return src.repo_id or fallback or src.path.name


def _adapter_card_text(a: Adapter) -> str:
    readme = a.path / CARD_FILE
    return readme.read_text(errors="replace") if readme.is_file() else ""


def _parts(a: Adapter, arch) -> str:
    vision = sum(1 for m in a.modules if arch.is_vision(arch.canonical(m + ".weight")))
    language = len(a.modules) - vision
    return f"{language} language, {vision} vision" if arch.vision else f"{language} language"


def _write_card(tmp: Path, out_name: str, base_src: Source, ckpt: Checkpoint, adapter_srcs, loaded, settings, result, parity):
    arch = result.plan.arch
    base_fm = cards.front_matter((base_src.path / CARD_FILE).read_text(errors="replace")) if (base_src.path / CARD_FILE).is_file() else {}
    adapter_texts = [_adapter_card_text(a) for a in loaded]
    adapter_fms = [cards.front_matter(t) for t in adapter_texts]
    sections: dict[str, list[str]] = {}
    for t in adapter_texts:
        for k, v in cards.card_sections(t).items():
            sections.setdefault(k, []).append(v)
    base_id = cards.hub_id(base_src.repo_id, *[a.config.get("base_model_name_or_path") for a in loaded])
    base_name = base_id or base_src.path.name  # the card never names a path of this machine (issue #14)
    license_ = next((fm["license"] for fm in [*adapter_fms, base_fm] if fm.get("license")), None)
    tags = ["xpack", "lora", "merged", "peft-merged"]
    for fm in adapter_fms:
        tags += [t for t in (fm.get("tags") or []) if isinstance(t, str) and t not in tags and not t.startswith("base_model:")]
    fm = {
        **({"base_model": base_id} if base_id else {}),
        "library_name": "transformers",
        "pipeline_tag": arch.pipeline_tag,
        "tags": tags,
        "license": license_ or "other",
    }
    n_params = sum(_numel(s.shape) for s in result.plan.specs)
    dtypes = sorted({s.dtype for s in result.plan.specs if s.dtype in ("F32", "F16", "BF16")})
    files = cards.file_table(tmp, result.weight_hashes)
    text = cards.render(
        "merged_card.md.j2",
        front_matter=cards.yaml_block(fm),
        title=out_name,
        base_name=base_name,
        base_revision=base_src.revision,
        adapter_names=", ".join(f"`{_name_of(s)}`" for s in adapter_srcs),
        arch_description=arch.description,
        architecture="/".join(ckpt.architectures) or ckpt.model_type,
        vision=arch.vision,
        xpack_version=__version__,
        dtype="/".join(dtypes).lower() or "mixed",
        n_params=_human(n_params),
        n_files=len(result.weight_hashes),
        adapters=[_adapter_row(s, a, arch, result) for s, a in zip(adapter_srcs, loaded)],
        notes=result.plan.notes,
        qlora=settings.qlora,
        merge_base_parity=parity,
        out_name=out_name,
        example_prompt=EXAMPLE_PROMPT,
        intended_use="\n\n".join(sections.get("intended_use", [])) or cards.DEFAULT_INTENDED_USE,
        limitations="\n\n".join(sections.get("limitations", [])) or cards.DEFAULT_LIMITATIONS,
        files=files,
        base_hash_summary=", ".join(f"`{Path(k).name}` `{v[:16]}…`" for k, v in result.input_hashes.items() if Path(k).suffix == ".safetensors" and Path(k).is_relative_to(base_src.path)),
        license_text=(
            f"{license_}, as stated by the adapter or base model. The merged weights are also subject to the base model's license."
            if license_
            else "Subject to the licenses of the base model and of the adapter; check both before redistributing."
        ),
    )
    (tmp / CARD_FILE).write_text(text)


def _adapter_row(src: Source, a: Adapter, arch, result: MergeResult) -> dict:
    s = a.summary()
    targets = s["target_modules"]
    s["targets"] = ", ".join(targets) if isinstance(targets, list) else f"`{targets}` (regex)"
    s["name"] = _name_of(src)
    trained_on = s.get("base_model_name_or_path")
    if isinstance(trained_on, str):  # the adapter's config often names a folder of the training machine: its name only
        s["base_model_name_or_path"] = cards.hub_id(trained_on) or Path(trained_on).name
    s["parts"] = _parts(a, arch)
    s["weights_sha256"] = result.input_hashes[str(a.files[-1])][:16] + "…"
    return s


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _human(n: int) -> str:
    for unit, div in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)
