"""`xpack run`: one artifact through its runtime on a hardware profile (runtimes/, profiles/)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from xpack.cli.params import no_check_option
from xpack.errors import XpackError
from xpack.profiles.machine import resolve_for_machine
from xpack.profiles.profile import load_profile, profile_names
from xpack.runtimes.messages import check_image, to_messages, user_message
from xpack.runtimes.registry import RUNTIMES, load, runtime_for
from xpack.runtimes.settings import GenerationSettings

_GEN = GenerationSettings()  # the defaults shown in `xpack run --help` (written once, in runtimes/settings.py)


def _gen_help(text: str, field: str) -> str:
    return f"{text}  [default: {getattr(_GEN, field)}]"


def _require_utf8(option: str, text: str | None) -> None:
    """A command-line text that is not UTF-8 reaches Python as lone surrogates (PEP 383), which no tokenizer takes."""
    if text is None:
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raw = text[exc.start].encode("utf-8", "surrogateescape")
        raise XpackError(f"{option} is not UTF-8 text (byte 0x{raw[0]:02x} at character {exc.start}); pass it in UTF-8") from None


@click.command()
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
@click.option("--stop", "stops", multiple=True, metavar="TEXT", help="End the answer where TEXT first appears (not printed); repeat for up to 4.")
@click.option("--raw", is_flag=True, help="Feed --prompt as written, without the chat template (base-model fine-tunes; BOS as the tokenizer adds it).")
@click.option("--runtime", "runtime_name", type=click.Choice(sorted(RUNTIMES)), help="Force a runtime instead of picking it from the artifact.")
@no_check_option()
@click.option("--json", "as_json", is_flag=True, help="Print the result (text, token counts, timings, peak memory) as JSON instead of streaming.")
def run(artifact, profile_ref, prompt, interactive, system, image, max_tokens, temperature, top_p, top_k, repetition_penalty, seed, stops, raw,
        runtime_name, no_check, as_json):
    """Run an artifact on a hardware profile: stream the answer, then report speed and memory.

    The runtime follows the artifact (GGUF: llama.cpp; Hugging Face checkpoint: transformers) and
    the prompt is written with the model's own chat template. Tokens stream to stdout; notes and
    timings go to stderr.

    \b
    Example:
      xpack run --artifact ./gemma3-xray.gguf --profile t4 --prompt "Describe this chest X-ray." --image cxr.png
      xpack run --artifact ./merged --profile cpu16 --interactive --temperature 0
      xpack run --artifact ./symptoms.gguf --profile cpu16 --raw --temperature 0 --max-tokens 50 --stop "###" \\
        --prompt $'Below is a patient case.\\n### Symptoms:\\nfever, cough\\n### Diagnosis:\\n'
    """
    if bool(prompt is not None) == bool(interactive):
        raise click.UsageError("give exactly one of --prompt TEXT or --interactive")
    if raw and (system is not None or image is not None):
        raise click.UsageError("--raw feeds the prompt as written: write the system text into it, and use the chat form for --image")
    for option, text in (("--prompt", prompt), ("--system", system), *(("--stop", t) for t in stops)):
        _require_utf8(option, text)
    if image is not None:
        check_image(image)  # its header, before a model is loaded

    settings = _GEN.with_overrides(
        max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty, seed=seed,
        stop=tuple(stops) or None,
    )
    profile, notes = resolve_for_machine(load_profile(profile_ref))
    for note in notes:
        click.echo(f"note: {note}", err=True)
    name = runtime_name or runtime_for(artifact, profile)
    click.echo(f"loading {artifact} with the {name} runtime on profile {profile.name} ({profile.device}, {profile.threads} threads)", err=True)
    with load(artifact, profile, name, check=not no_check) as rt:
        click.echo(f"loaded in {rt.load_s:.2f} s", err=True)
        stream = None if as_json else (lambda piece: (sys.stdout.write(piece), sys.stdout.flush()))

        def answer(messages):
            result = rt.generate(messages, settings, image=image, on_token=stream, raw=raw)
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
            answer(prompt if raw else to_messages([user_message(prompt, with_image=image is not None)], system=system))
            return
        messages = [] if system is None else [{"role": "system", "content": system}]
        stdin = click.get_binary_stream("stdin")  # bytes: a line that is not UTF-8 is said and skipped, not a traceback
        tty = stdin.isatty()
        first = True
        while True:
            if tty:
                click.echo("> ", nl=False, err=True)
            raw = stdin.readline()
            if not raw:
                break
            try:
                text = raw.decode("utf-8").strip()
            except UnicodeDecodeError as exc:
                click.echo(f"note: that line is not UTF-8 text (byte 0x{raw[exc.start]:02x} at {exc.start}); skipped, type it again", err=True)
                continue
            if text in ("exit", "quit"):
                break
            if not text:
                continue
            if raw:  # each line is a prompt of its own: a raw prompt has no turns to keep
                answer(text)
                continue
            messages.append(user_message(text, with_image=image is not None and first))
            first = False
            result = answer(messages)
            messages.append({"role": "assistant", "content": result.text})
