"""``xpack verify``: does the artifact behave like the model that was trained, and how fast and heavy is it?

Parity is measured against the torch reference (the merged checkpoint, or the model as trained:
``reference.py``) with the production runtimes: teacher-forced logits over an evaluation text (KL, top-1, max logit error, perplexity)
and greedy answers to prompts (matching tokens before the first difference). Speed and memory
come from ``runtimes/bench.py`` in processes of their own, for the artifact and the reference.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from xpack import __version__
from xpack.errors import XpackError
from xpack.packager.cards.render import render
from xpack.packager.io.checkpoint import load_tokenizer
from xpack.packager.io.memory_need import reference_budget
from xpack.packager.io.tensors import sha256_file
from xpack.packager.verify.parity import compare_logits, log_softmax
from xpack.packager.verify.reference import MERGED_LABEL, Reference, merged_reference
from xpack.profiles.machine import machine_info, resolve_for_machine
from xpack.profiles.profile import list_profiles, load_profile
from xpack.runtimes.artifacts import CARD_FILE, MANIFEST_FILE, read_manifest
from xpack.runtimes.bench import run_isolated
from xpack.runtimes.registry import load, runtime_for
from xpack.runtimes.settings import GenerationSettings

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

DEFAULT_PROMPTS = [
    {"system": "You are an expert radiologist.", "prompt": "Analyze this chest X-ray showing a small pleural effusion on the right side."},
    {"prompt": "You are an expert radiologist. Compare the findings in a chest X-ray showing pulmonary edema versus one showing pneumonia."},
    {"prompt": "CT head without contrast, 70-year-old with sudden confusion. Describe the findings."},
]


@dataclass(frozen=True)
class Threshold:
    """What a precision class must reach: strict top-1 agreement (tie-aware) and mean KL."""

    top1_min: float | None
    kl_mean_max: float | None


# Per precision class; the README states these. 16-bit and fp32 are judged on top-1 and KL,
# quantized formats on KL (their top-1 moves with the model's own confidence).
THRESHOLDS: dict[str, Threshold] = {
    "fp32": Threshold(top1_min=0.99, kl_mean_max=1e-3),
    "16-bit": Threshold(top1_min=0.99, kl_mean_max=5e-3),
    "8-bit": Threshold(top1_min=None, kl_mean_max=0.01),
    "6-bit": Threshold(top1_min=None, kl_mean_max=0.03),
    "5-bit": Threshold(top1_min=None, kl_mean_max=0.05),
    "4-bit": Threshold(top1_min=None, kl_mean_max=0.1),
    "low-bit": Threshold(top1_min=None, kl_mean_max=0.3),
}
_GGUF_CLASS = {"F32": "fp32", "F16": "16-bit", "BF16": "16-bit", "Q8_0": "8-bit", "Q6_K": "6-bit"}


def eval_text(path: Path | None) -> str:
    if path is None:
        return resources.files("xpack.packager.verify").joinpath("data/eval_medical.txt").read_text()
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise XpackError(f"cannot read --text {path}: {exc.__class__.__name__}; pass a UTF-8 text file") from None
    if len(text.strip()) < 20:
        raise XpackError(f"--text {path} is too short to measure anything; give a few paragraphs")
    return text


def read_prompts(path: Path | None) -> list[dict]:
    """A JSONL file: one {"prompt": ..., "system"?: ..., "image"?: ...} or {"prompt": ..., "raw": true} per line (a raw
    prompt is fed as written, without the chat template: a base model's fine-tune, or turns written by hand)."""
    if path is None:
        return list(DEFAULT_PROMPTS)
    prompts = []
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise XpackError(f"cannot read --prompts {path}: {exc.__class__.__name__}; pass a UTF-8 JSONL file") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            raise XpackError(f"--prompts {path} line {n} is not JSON; write one object per line like {{\"prompt\": \"...\"}}") from None
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
            raise XpackError(f"--prompts {path} line {n} has no \"prompt\" string; write one object per line like {{\"prompt\": \"...\"}}")
        if not isinstance(item.get("raw", False), bool):
            raise XpackError(f"--prompts {path} line {n}: \"raw\" must be true or false")
        if item.get("raw") and (item.get("system") or item.get("image")):
            raise XpackError(f"--prompts {path} line {n}: a raw prompt is fed as written; put the system text into it and drop \"image\"")
        prompts.append(item)
    if not prompts:
        raise XpackError(f"--prompts {path} holds no prompts")
    return prompts


def precision_class(artifact: Path, runtime_name: str) -> tuple[str, str]:
    """(precision class, label) of an artifact, from its manifest or its weights."""
    folder = artifact if artifact.is_dir() else artifact.parent
    manifest = read_manifest(folder) or {}
    if manifest.get("format") == "gguf" or artifact.suffix == ".gguf":
        quant = manifest.get("quant") or _gguf_quant(artifact)
        return _GGUF_CLASS.get(quant) or _bits_class(quant), f"GGUF {quant}"
    if manifest.get("format") == "onnx":
        bits = int(manifest.get("bits", 32))
        return {32: "fp32", 16: "16-bit", 8: "8-bit", 4: "4-bit"}.get(bits, "low-bit"), f"ONNX {bits}-bit"
    cfg = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32")
    return ("fp32" if dtype == "float32" else "16-bit"), f"transformers {dtype}"


def _bits_class(quant: str) -> str:
    for bits in ("8", "6", "5", "4"):
        if quant.startswith(("Q" + bits, "IQ" + bits)):
            return f"{bits}-bit"
    return "low-bit"


def _gguf_quant(path: Path) -> str:
    import gguf

    reader = gguf.GGUFReader(path)
    field = reader.fields.get("general.file_type")
    ftype = int(field.parts[field.data[0]][0]) if field else 0
    names = {v: k.replace("MOSTLY_", "") for k, v in gguf.LlamaFileType.__members__.items()}
    return names.get(ftype, "F32").replace("ALL_F32", "F32")


# ------------------------------------------------------------------------------------------------
# parity


def perplexity(logits: "np.ndarray", ids: list[int]) -> float:
    import numpy as np

    lp = log_softmax(logits[:-1])
    nll = -lp[np.arange(len(ids) - 1), ids[1:]]
    return float(math.exp(nll.mean()))


def _first_difference(a: list[int], b: list[int]) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


IMAGE_PROMPT = "Describe the findings in this image."
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def find_images(folder: Path | None) -> list[Path]:
    if folder is None:
        return []
    folder = Path(folder)
    if not folder.is_dir():
        raise XpackError(f"--images {folder} is not a folder; pass a folder of PNG/JPEG images")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise XpackError(f"--images {folder} holds no .png/.jpg images")
    return images


@dataclass
class Side:
    """What one model (reference or artifact) produced on the evaluation."""

    ids: list[int]
    logits: "np.ndarray"
    greedy: list[dict]
    vocab_size: int
    images: list[dict] | None = None  # per image: teacher-forced logits/ids after the image, greedy answer
    info: dict | None = None  # the runtime's info(): for the torch reference, the dtype that ran and why


def _messages(item: dict) -> list[dict]:
    msgs = [{"role": "system", "content": item["system"]}] if item.get("system") else []
    return msgs + [{"role": "user", "content": item["prompt"]}]


def _run_side(path: Path, profile, runtime: str | None, text: str, prompts: list[dict], max_tokens: int,
              images: list[Path] = (), continuations: list[list[int]] | None = None, options: dict | None = None, check: bool = True) -> Side:
    """Evaluate one model. With images, each is scored teacher-forced on the prompt's tail plus a
    continuation (the reference's own greedy answer, so both sides score the same tokens).
    ``options``: the runtime's (the as-trained reference's adapters)."""

    greedy = GenerationSettings(max_tokens=max_tokens, temperature=0, repetition_penalty=1.0)
    with load(path, profile, runtime=runtime, check=check, **(options or {})) as rt:
        ids = rt.tokenize(text)
        logits = rt.logits(ids)
        answers = []
        for item in prompts:
            if item.get("raw"):
                r = rt.generate(item["prompt"], greedy, raw=True)
            else:
                r = rt.generate(_messages(item), greedy, image=item.get("image"))
            answers.append({"ids": r.token_ids, "text": r.text})
        scored = []
        if images and not rt.accepts_images:
            raise XpackError(rt.image_refusal("--images"))
        for i, image in enumerate(images):
            r = rt.generate(IMAGE_PROMPT, greedy, image=image)
            cont = continuations[i] if continuations is not None else r.token_ids
            img_logits, img_ids = rt.logits_with_image(IMAGE_PROMPT, image, continuation_ids=cont)
            scored.append({"image": str(image), "logits": img_logits, "ids": img_ids, "greedy": {"ids": r.token_ids, "text": r.text},
                           "image_encode_s": r.image_encode_s})
        info = {k: v for k, v in rt.info().items() if k in ("dtype", "profile_dtype", "device", "streamed")} if hasattr(rt, "info") else {}
        info["notes"] = list(getattr(rt, "notes", []) or [])
        return Side(ids, logits, answers, rt.vocab_size, scored or None, info)


def parity(artifact: Side, reference: Side, tokenizer) -> dict:
    if artifact.ids != reference.ids:
        at = _first_difference(artifact.ids, reference.ids)
        raise XpackError(
            f"the reference tokenizes the evaluation text differently from the artifact (first difference at token {at}); "
            "verify against the checkpoint the artifact was exported from"
        )
    rows = compared_rows(artifact.vocab_size, reference.logits.shape[1], len(tokenizer))
    figures = compare_logits(reference.logits[:, :rows], artifact.logits[:, :rows])
    ppl_ref, ppl_art = perplexity(reference.logits[:, :rows], reference.ids), perplexity(artifact.logits[:, :rows], reference.ids)
    figures.update({"perplexity_reference": ppl_ref, "perplexity_artifact": ppl_art, "perplexity_delta": ppl_art - ppl_ref})
    if rows < reference.logits.shape[1]:
        figures["vocabulary"] = {
            "compared_rows": rows, "reference_rows": int(reference.logits.shape[1]), "tokenizer_tokens": len(tokenizer),
            "note": f"compared on the {rows} rows the artifact keeps, which hold every token the tokenizer can produce ({len(tokenizer)}): "
                    f"the reference's other {reference.logits.shape[1] - rows} rows are padding of the embedding (llama.cpp's converter "
                    "trims them too); both distributions are renormalized over the compared rows",
        }
    prompts = []
    for ref, art in zip(reference.greedy, artifact.greedy):
        n = _first_difference(ref["ids"], art["ids"])
        same = n == len(ref["ids"]) == len(art["ids"])
        prompts.append(
            {
                "matching_tokens": n,
                "reference_tokens": len(ref["ids"]),
                "diverges_at": None if same else n,
                "reference_token": None if same or n >= len(ref["ids"]) else tokenizer.decode([ref["ids"][n]]),
                "artifact_token": None if same or n >= len(art["ids"]) else tokenizer.decode([art["ids"][n]]),
                "reference_text": ref["text"],
                "artifact_text": art["text"],
            }
        )
    figures["prompts"] = prompts
    if reference.images:
        figures["images"] = [_image_parity(r, a, tokenizer, rows) for r, a in zip(reference.images, artifact.images)]
        import numpy as np

        both = compare_logits(np.concatenate([r["logits"][:, :rows] for r in reference.images]), np.concatenate([a["logits"][:, :rows] for a in artifact.images]))
        figures["image_parity"] = both
    return figures


def compared_rows(artifact_vocab: int, reference_vocab: int, tokenizer_tokens: int) -> int:
    """The logit rows both sides are compared on: all the reference's, or, where the artifact keeps fewer (a GGUF of
    Gemma 3 4B holds the tokenizer's 262145 rows of the config's 262208), the artifact's when they hold every token
    the tokenizer can produce; anything else is a different vocabulary, and one clear line."""
    if artifact_vocab >= reference_vocab:
        return reference_vocab
    if tokenizer_tokens > artifact_vocab:
        raise XpackError(
            f"the artifact's vocabulary ({artifact_vocab}) is smaller than the reference's ({reference_vocab}) and than its tokenizer's "
            f"({tokenizer_tokens} tokens); verify against the checkpoint the artifact was exported from"
        )
    return artifact_vocab


def _image_parity(ref: dict, art: dict, tokenizer, rows: int | None = None) -> dict:
    if ref["ids"] != art["ids"]:
        raise XpackError(f"the artifact tokenizes the prompt around image {ref['image']} differently from the reference; "
                         "verify against the checkpoint the artifact was exported from")
    figures = compare_logits(ref["logits"][:, :rows], art["logits"][:, :rows])
    n = _first_difference(ref["greedy"]["ids"], art["greedy"]["ids"])
    figures.update({"image": ref["image"], "greedy_matching_tokens": n, "reference_tokens": len(ref["greedy"]["ids"]),
                    "reference_text": ref["greedy"]["text"], "artifact_text": art["greedy"]["text"]})
    return figures


def judge(figures: dict, cls: str) -> list[dict]:
    """The parity checks of a precision class, each with its value, limit and verdict (text, then with images)."""
    t = THRESHOLDS[cls]
    checks = []
    for prefix, f in (("", figures), ("image_", figures.get("image_parity"))):
        if f is None:
            continue
        if t.top1_min is not None:
            v = f["top1_agreement_tie_aware"]
            checks.append({"metric": prefix + "top1_agreement", "value": v, "limit": f">= {t.top1_min}", "pass": v >= t.top1_min})
        if t.kl_mean_max is not None:
            v = f["kl_mean"]
            checks.append({"metric": prefix + "kl_mean", "value": v, "limit": f"<= {t.kl_mean_max}", "pass": v <= t.kl_mean_max})
    return checks


def bench_checks(bench: dict, profile) -> list[dict]:
    """The profile's reference figures (the seed card's) against the measured medians: reported, not fatal."""
    ref = profile.reference
    if ref is None:
        return []
    s = bench["summary"]
    rows = [
        ("load_s", s["load_s"]["median"], ref.load_s),
        ("gen_256_s", s["gen_256_s"]["median"], ref.tokens256_s),
        ("memory_gb", s["peak_rss_mb"]["median"] / 1024, ref.memory_gb),
    ]
    return [{"metric": m, "value": v, "limit": f"<= {lim}", "pass": v <= lim} for m, v, lim in rows if lim is not None]


def machine_label() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    m = machine_info()
    gpus = ", ".join(g.name for g in m.gpus) or "no GPU"
    ram = f", {m.ram_gb:.0f} GB RAM" if m.ram_gb else ""
    return f"{cpu}, {m.cores} cores{ram}, {gpus}"


def verify(artifact: Path, reference: Path | Reference, profile_name: str, *, prompts_file: Path | None = None, text_file: Path | None = None,
           runs: int = 3, max_tokens: int = 64, benchmark: bool = True, runtime: str | None = None,
           images_dir: Path | None = None, cache: dict | None = None, reference_memory: float | None = None, check: bool = True) -> dict:
    """The verification report. ``reference``: the merged checkpoint's folder, or a ``Reference`` (the model
    as trained: ``reference.choose_reference``). ``cache`` (a dict the caller keeps) shares the reference's
    evaluation and benchmark between calls that verify several artifacts of one reference on one profile.
    ``reference_memory``: GB the CPU reference may use; beyond it (or what is available) its layers stream from disk.
    ``check``: compare both sides' files with their manifest.json first (runtimes/integrity.py)."""
    cache = {} if cache is None else cache
    artifact = Path(artifact)
    ref = reference if isinstance(reference, Reference) else merged_reference(reference)
    profile, notes = resolve_for_machine(load_profile(profile_name))
    text = eval_text(text_file)
    prompts = read_prompts(prompts_file)
    images = find_images(images_dir)
    runtime = runtime or runtime_for(artifact, profile)
    options = dict(ref.runtime_options)
    if profile.device == "cpu" and (ref.peft is None or ref.peft.quant_type is None):  # a 4-bit base is placed by bitsandbytes
        options["max_memory"] = reference_budget(ref.path, reference_memory)
    cls, label = precision_class(artifact, runtime)
    key = (ref.label, profile.name, text, json.dumps(prompts, sort_keys=True), max_tokens, tuple(map(str, images)))
    if key not in cache:
        cache[key] = _run_side(ref.path, profile, "torch", text, prompts, max_tokens, images, options=options, check=check)
    ref_side = cache[key]
    continuations = [r["greedy"]["ids"] for r in ref_side.images or []]
    art_side = _run_side(artifact, profile, runtime, text, prompts, max_tokens, images, continuations if images else None, check=check)
    figures = parity(art_side, ref_side, load_tokenizer(ref.path))
    checks = judge(figures, cls)
    report = {
        "artifact": str(artifact),
        "reference": str(ref.path),
        "reference_kind": ref.kind,
        "reference_label": ref.label,
        "runtime": runtime,
        "reference_runtime": ref_side.info,
        "artifact_label": label,
        "precision_class": cls,
        "profile": profile.to_dict(),
        "profile_notes": notes,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_label(),
        "xpack_version": __version__,
        "parity": figures,
        "parity_text": (f"{text_file} (given with --text)" if text_file else "the built-in evaluation text (eval_medical.txt)")
        + ", never the calibration text of a calibrated export",
        "checks": checks,
        "parity_pass": all(c["pass"] for c in checks),
    }
    if not report["parity_pass"]:
        report["advice"] = _advice(artifact, runtime, ref, checks)
    if benchmark:
        image = images[0] if images else None
        art_bench = run_isolated(artifact, profile_name, runtime=runtime, runs=runs, image=image, check=check)
        bench_key = ("bench", ref.label, profile_name, runs, str(image))
        if bench_key not in cache:
            cache[bench_key] = run_isolated(ref.path, profile_name, runtime="torch", runs=runs, image=image, peft=ref.peft,
                                            max_memory=options.get("max_memory"), check=check)
        ref_bench = cache[bench_key]
        report["benchmark"] = {"artifact": art_bench, "reference": ref_bench, "speedup_decode": _ratio(art_bench, ref_bench, "decode_tok_s"),
                               "speedup_256": _ratio(ref_bench, art_bench, "gen_256_s")}
        report["benchmark_checks"] = bench_checks(art_bench, profile)
        report["benchmark_pass"] = all(c["pass"] for c in report["benchmark_checks"])
    return report


def _advice(artifact: Path, runtime: str, ref: Reference, checks: list[dict]) -> str:
    """The export option that would meet a failed KL verdict: xpack's calibrated mix, in the artifact's format, with --max-kl."""
    kl = next((c for c in checks if c["metric"] == "kl_mean" and not c["pass"]), None)
    limit = kl["limit"].split()[-1] if kl else "0.1"
    bits = "8" if kl and float(limit) < 0.05 else "4"
    source = ref.path if ref.peft is None else "<the merged checkpoint>"
    fmt = "onnx" if runtime == "onnx" else "gguf"
    how = f"xpack export --model {source} --format {fmt} --bits {bits} --max-kl {limit} --out <folder>"
    return f"to meet KL <= {limit}, export the smallest calibrated file that meets it on the calibration text: `{how}`"


def _ratio(a: dict, b: dict, key: str) -> float | None:
    x, y = a["summary"].get(key), b["summary"].get(key)
    return x["median"] / y["median"] if x and y and y["median"] else None


# ------------------------------------------------------------------------------------------------
# model card and manifest

START, END = "<!-- xpack:verify:start -->", "<!-- xpack:verify:end -->"


def _fmt_pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _entry(report: dict) -> dict:
    """What the manifest keeps of one profile's verification."""
    p = report["parity"]
    entry = {
        "date": report["date"][:10],
        "machine": report["machine"],
        "xpack_version": report["xpack_version"],
        "artifact_label": report["artifact_label"],
        "precision_class": report["precision_class"],
        "reference_kind": report["reference_kind"],
        "reference": report["reference_label"],
        "reference_runtime": report.get("reference_runtime"),
        "parity": {k: v for k, v in p.items() if k not in ("prompts", "images")},
        "greedy_matching": [{"matching_tokens": q["matching_tokens"], "reference_tokens": q["reference_tokens"], "diverges_at": q["diverges_at"]} for q in p["prompts"]],
        "checks": report["checks"],
        "parity_pass": report["parity_pass"],
    }
    if "benchmark" in report:
        b = report["benchmark"]
        entry["benchmark"] = {"artifact": b["artifact"]["summary"], "reference": b["reference"]["summary"],
                              "speedup_decode": b["speedup_decode"], "speedup_256": b["speedup_256"]}
        entry["benchmark_checks"] = report["benchmark_checks"]
    return entry


def _section(verification: dict) -> str:
    parity_rows, bench_rows, notes = [], [], []
    for name, e in verification.items():
        p = e["parity"]
        greedy = ", ".join(f"{g['matching_tokens']}/{g['reference_tokens']}" for g in e["greedy_matching"])
        limits = "; ".join(f"{c['metric']} {c['limit']}" for c in e["checks"])
        parity_rows.append({
            "profile": name, "date": e["date"], "label": e["artifact_label"], "top1": _fmt_pct(p["top1_agreement"]),
            "kl_mean": f"{p['kl_mean']:.4g}", "kl_p99": f"{p['kl_p99']:.4g}", "max_err": f"{p['max_abs_logit_error']:.3g}",
            "ppl": f"{p['perplexity_reference']:.3f} → {p['perplexity_artifact']:.3f}", "greedy": greedy,
            "verdict": ("pass" if e["parity_pass"] else "FAIL") + f" ({e['precision_class']}: {limits})",
        })
    # The seed card's order: GPU profiles first, fastest first.
    shipped = {p.name: p for p in sorted(list_profiles(), key=lambda p: (p.device != "cuda", p.reference.load_s if p.reference else 1e9))}
    for name in [*shipped, *[n for n in verification if n not in shipped]]:
        e = verification.get(name)
        prof = shipped.get(name)
        label = (prof.reference.hardware if prof and prof.reference else name) + f" (`{name}` profile)"
        if not e or "benchmark" not in e:
            bench_rows.append({"hardware": label, "load": "not measured", "gen": "not measured", "memory": "not measured"})
            continue
        s = e["benchmark"]["artifact"]
        bench_rows.append({
            "hardware": f"{label}, measured on {e['machine']}",
            "load": f"~{s['load_s']['median']:.2f}s", "gen": f"~{s['gen_256_s']['median']:.2f}s",
            "memory": f"~{s['peak_rss_mb']['median'] / 1024:.2f} GB RAM" + (f" + {s['peak_gpu_mb']['median'] / 1024:.2f} GB GPU" if s.get("peak_gpu_mb") else ""),
        })
        r = e["benchmark"]["reference"]
        notes.append(
            f"`{name}`: median of the runs on {e['date']} with xpack {e['xpack_version']}; decode {s['decode_tok_s']['median']:.1f} tok/s, "
            f"time to first token {s['ttft_s']['median'] * 1000:.0f} ms. The torch reference on the same profile: load "
            f"{r['load_s']['median']:.2f}s, 256 tokens {r['gen_256_s']['median']:.2f}s, {r['peak_rss_mb']['median'] / 1024:.2f} GB "
            f"(256 tokens {e['benchmark']['speedup_256']:.1f}x faster here)."
        )
    return render("verify_section.md.j2", parity_rows=parity_rows, bench_rows=bench_rows, bench_notes=notes,
                  references=_references(verification)).strip() + "\n"


def _references(verification: dict) -> list[str]:
    """The as-trained references the entries were measured against (none: the merged checkpoint, the template's default)."""
    as_trained = {name: e["reference"] for name, e in verification.items() if e.get("reference_kind") == "as-trained"}
    dtype_lines = [
        f"`{name}`: the torch reference ran in {rt['dtype']}, not the profile's {rt['profile_dtype']} ({'; '.join(rt.get('notes') or [])})"
        for name, e in verification.items()
        if (rt := e.get("reference_runtime") or {}).get("profile_dtype") and rt.get("dtype") != rt.get("profile_dtype")
    ]
    if not as_trained:
        return dtype_lines
    merged = [name for name, e in verification.items() if name not in as_trained]
    lines = [f"`{name}`: the model as trained, {label}" for name, label in as_trained.items()]
    return lines + [f"`{name}`: {MERGED_LABEL} the artifact came from" for name in merged] + dtype_lines


def splice_section(card: str, section: str) -> str:
    """Put the verification section into a card, replacing an earlier one; everything else stays as it was."""
    if START in card and END in card:
        head, rest = card.split(START, 1)
        _, tail = rest.split(END, 1)
        return head + section.rstrip("\n") + tail
    marker = "\n## Limitations"
    if marker in card:
        head, tail = card.split(marker, 1)
        return head.rstrip("\n") + "\n\n" + section + marker + tail
    return card.rstrip("\n") + "\n\n" + section


def _writable(path: Path) -> bool:
    return os.access(path, os.W_OK) if path.exists() else path.parent.is_dir() and os.access(path.parent, os.W_OK)


def check_outputs(artifact: Path, card: bool, out_file: Path | None) -> None:
    """What verify will write (``--update-card``: the artifact's card and manifest; ``--out``: the report), checked
    before the run: a missing folder or a read-only artifact crashed after the whole run, losing the report (issue #14)."""
    if out_file is not None:
        parent = Path(out_file).absolute().parent
        if not parent.is_dir():
            raise XpackError(f"--out {out_file}: the folder {parent} does not exist; create it or write the report elsewhere")
        if Path(out_file).is_dir() or not _writable(Path(out_file)):
            raise XpackError(f"--out {out_file} cannot be written (a folder, or no write permission); give a writable file path")
    if card:
        folder = artifact if artifact.is_dir() else artifact.parent
        if not (folder / MANIFEST_FILE).is_file():
            raise XpackError(f"{folder} has no manifest.json: --update-card works on folders written by xpack export or merge")
        for path in (folder / CARD_FILE, folder / MANIFEST_FILE):
            if not _writable(path):
                raise XpackError(f"--update-card cannot write {path} (no write permission); make the artifact writable, "
                                 "or drop --update-card and keep the report with --out FILE")


def update_card(artifact: Path, report: dict) -> Path:
    """Write the report into the artifact's README.md and manifest.json (per profile, idempotent)."""

    folder = artifact if artifact.is_dir() else artifact.parent
    check_outputs(artifact, True, None)
    manifest = read_manifest(folder)
    verification = dict(manifest.get("verification") or {})
    verification[report["profile"]["name"]] = _entry(report)
    card_path = folder / CARD_FILE
    card = card_path.read_text() if card_path.is_file() else f"# {folder.name}\n"
    card_path.write_text(splice_section(card, _section(verification)))
    manifest["verification"] = verification
    files = manifest.setdefault("files", {})
    files[CARD_FILE] = {"bytes": card_path.stat().st_size, "sha256": sha256_file(card_path)}
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    return card_path
