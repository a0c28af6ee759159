"""`xpack verify`: parity, speed and memory of an artifact against the torch reference (packager/verify/)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from xpack.cli.params import emit, no_check_option
from xpack.packager.verify.job import check_outputs
from xpack.packager.verify.job import update_card as write_card
from xpack.packager.verify.job import verify as do_verify
from xpack.packager.verify.reference import choose_reference


def _verify_lines(report: dict) -> list[str]:
    p = report["parity"]
    lines = [
        f"verify {report['artifact']} ({report['artifact_label']}, {report['runtime']}) against {report['reference_label']} "
        f"on profile {report['profile']['name']}",
        *[f"note: {n}" for n in report["profile_notes"]],
        f"parity over {p['tokens']} tokens: top-1 {100 * p['top1_agreement']:.1f}%, KL mean {p['kl_mean']:.4g} "
        f"(p99 {p['kl_p99']:.4g}), max logit error {p['max_abs_logit_error']:.3g}, "
        f"perplexity {p['perplexity_reference']:.3f} -> {p['perplexity_artifact']:.3f}",
    ]
    for i, q in enumerate(p["prompts"], 1):
        if q["diverges_at"] is None:
            lines.append(f"prompt {i}: all {q['reference_tokens']} greedy tokens match")
        else:
            lines.append(
                f"prompt {i}: {q['matching_tokens']} of {q['reference_tokens']} greedy tokens match, then "
                f"{q['reference_token']!r} (reference) vs {q['artifact_token']!r} (artifact)"
            )
    for q in p.get("images", []):
        lines.append(
            f"image {Path(q['image']).name}: top-1 {100 * q['top1_agreement']:.1f}%, KL mean {q['kl_mean']:.4g}, "
            f"max logit error {q['max_abs_logit_error']:.3g} over {q['tokens']} tokens after the image; "
            f"{q['greedy_matching_tokens']} of {q['reference_tokens']} greedy tokens match"
        )
    lines.append(f"{'check':<22}{'value':>12}  {'limit':<12}result")
    for c in report["checks"]:
        lines.append(f"{c['metric']:<22}{c['value']:>12.4g}  {c['limit']:<12}{'pass' if c['pass'] else 'FAIL'}")
    if "benchmark" in report:
        b = report["benchmark"]
        for who in ("artifact", "reference"):
            s = b[who]["summary"]
            lines.append(
                f"{who} ({len(b[who]['runs'])} runs, median [min-max]): load {_mm(s['load_s'])} s, "
                f"first token {_mm(s['ttft_s'], 1000)} ms, prompt {_mm(s['prompt_tok_s'])} tok/s, decode {_mm(s['decode_tok_s'])} tok/s, "
                f"256 tokens {_mm(s['gen_256_s'])} s, peak RSS {_mm(s['peak_rss_mb'])} MB"
                + (f", image encode {_mm(s['image_encode_s'], 1000)} ms" if s.get("image_encode_s") else "")
                + (f", peak GPU {_mm(s['peak_gpu_mb'])} MB" if s.get("peak_gpu_mb") else "")
            )
        if b["speedup_256"]:
            lines.append(f"speed-up over the torch reference: {b['speedup_256']:.1f}x for 256 tokens")
        for c in report["benchmark_checks"]:
            lines.append(f"profile reference {c['metric']}: {c['value']:.3g} {c['limit']}: {'within' if c['pass'] else 'MISSED'}")
    lines.append("verdict: " + ("PASS" if report["parity_pass"] else "FAIL (parity)"))
    lines.append(f"parity measured on {report['parity_text']}")
    if report["parity"].get("vocabulary"):
        lines.append(f"vocabulary: {report['parity']['vocabulary']['note']}")
    rt = report.get("reference_runtime") or {}
    if rt.get("profile_dtype") and rt.get("dtype") != rt.get("profile_dtype"):
        lines.append(f"reference dtype: {rt['dtype']}, not the profile's {rt['profile_dtype']}: {'; '.join(rt.get('notes') or [])}")
    if rt.get("streamed"):
        lines.append(f"reference memory: {rt['streamed']}")
    if report.get("advice"):
        lines.append(f"fix: {report['advice']}")
    return lines


def _mm(stat: dict, scale: float = 1.0) -> str:
    return f"{stat['median'] * scale:.3g} [{stat['min'] * scale:.3g}-{stat['max'] * scale:.3g}]"


@click.command()
@click.option("--artifact", required=True, type=click.Path(exists=True, path_type=Path), help="Export folder, .gguf file or checkpoint to check.")
@click.option("--reference", type=click.Path(exists=True, file_okay=False, path_type=Path), help="The torch reference: the merged checkpoint the artifact came from.")
@click.option("--reference-base", metavar="DIR", type=click.Path(exists=True, file_okay=False, path_type=Path), help="Instead of --reference, the model as trained: this base with --reference-adapter unmerged on top (PEFT).")
@click.option("--reference-adapter", "reference_adapters", metavar="DIR", multiple=True, type=click.Path(exists=True, file_okay=False, path_type=Path), help="Adapter over --reference-base (repeatable).")
@click.option("--reference-quant", metavar="TYPE", type=click.Choice(["nf4", "fp4", "none"]),
              help="nf4 or fp4: load --reference-base 4-bit with bitsandbytes (fp32 compute), as QLoRA trained on it; none (default): the 16-bit base.")
@click.option("--reference-double-quant", is_flag=True, help="With --reference-quant: double quantization (bnb_4bit_use_double_quant).")
@click.option("--profile", required=True, metavar="NAME|FILE", help="Hardware profile to measure on (a100, t4, cpu16 or a TOML file).")
@click.option("--prompts", "prompts_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="JSONL, one {\"prompt\": ..., \"system\": ...} per line (default: built-in radiology prompts).")
@click.option("--text", "text_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Evaluation text for teacher-forced parity (default: a built-in medical text).")
@click.option("--images", "images_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), help="Folder of images: image-conditioned parity and image encode time (vision artifacts).")
@click.option("--runs", type=click.IntRange(min=1), default=3, show_default=True, help="Benchmark runs (median and min-max are reported).")
@click.option("--max-tokens", type=click.IntRange(min=1), default=64, show_default=True, help="Greedy tokens per prompt for the divergence check.")
@click.option("--reference-memory", metavar="GB", type=click.FloatRange(min=0.5), help="Memory the CPU torch reference may use (default: what is available); beyond it its layers stream from disk, slower but within the budget.")
@click.option("--no-benchmark", is_flag=True, help="Parity only: skip the speed and memory runs.")
@click.option("--update-card", is_flag=True, help="Write the results into the artifact's README.md and manifest.json.")
@click.option("--strict", is_flag=True, help="Also fail (exit 1) when the profile's reference load/256-token/memory figures are missed.")
@no_check_option()
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON.")
@click.option("--out", "out_file", type=click.Path(dir_okay=False, path_type=Path), help="Also write the JSON report to this file.")
@click.pass_context
def verify(ctx, artifact, reference, reference_base, reference_adapters, reference_quant, reference_double_quant, profile, prompts_file, text_file, images_dir, runs, max_tokens, reference_memory, no_benchmark, update_card, strict, no_check, as_json, out_file):
    """Measure an artifact against the torch reference: output parity, speed and memory.

    Parity: teacher-forced KL divergence (mean, 99th percentile), top-1 agreement, max logit error
    and perplexity over an evaluation text, and greedy answers compared token by token. Speed and
    memory: load time, time to first token, prompt and decode tokens/s, time for 256 tokens and peak
    memory, median of --runs, for the artifact and the reference on the same profile, each in a
    process of its own. Exit 0 when every parity threshold passes, 1 when one fails.

    The reference is the merged checkpoint (--reference), or the model as trained (--reference-base,
    --reference-adapter, --reference-quant): PEFT's PeftModel over the base, 4-bit with bitsandbytes
    on CPU for a QLoRA adapter, what the user evaluated during training. On a CPU profile the reference
    runs in float32; when that does not fit in memory (or --reference-memory), its decoder and vision
    layers stream from the checkpoint's files one at a time: the same figures, more time.

    \b
    Example:
      xpack verify --artifact ./gemma3-xray-gguf --reference ./gemma3-xray --profile cpu16 --update-card
      xpack verify --artifact ./merged-nf4 --reference-base ./base --reference-adapter ./adapter \\
        --reference-quant nf4 --reference-double-quant --profile cpu16 --no-benchmark
    """

    check_outputs(artifact, update_card, out_file)
    ref = choose_reference(reference, reference_base, reference_adapters, reference_quant, reference_double_quant)
    report = do_verify(artifact, ref, profile, prompts_file=prompts_file, text_file=text_file, runs=runs,
                       max_tokens=max_tokens, benchmark=not no_benchmark, images_dir=images_dir, reference_memory=reference_memory, check=not no_check)
    if update_card:
        report["card"] = str(write_card(artifact, report))
    if out_file:
        out_file.write_text(json.dumps(report, indent=2, default=str) + "\n")
    emit(report, as_json, _verify_lines(report) + ([f"model card updated: {report['card']}"] if update_card else []))
    failed = not report["parity_pass"] or (strict and not report.get("benchmark_pass", True))
    ctx.exit(1 if failed else 0)
