"""`xpack merge`: parse, call packager/merge/, print."""

from __future__ import annotations

from pathlib import Path

import click

from xpack.cli.params import ModelRef, Size, adapter_option, emit, qlora_options
from xpack.packager.merge.job import merge as do_merge
from xpack.packager.merge.merge_base_parity import summary_lines
from xpack.packager.merge.stream import MergeSettings


@click.command()
@click.option("--base", required=True, type=ModelRef(), help="Base model: a local folder or a hub id (owner/name[@revision]).")
@adapter_option("LoRA adapter folder or hub id, optionally with :WEIGHT (e.g. ./lora2:0.5). Repeat to merge several, in order.", required=True)
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder to write the merged checkpoint to.")
@click.option("--dtype", type=click.Choice(["auto", "bf16", "fp16", "fp32"]), default="auto", show_default=True, help="Weight dtype of the output; auto keeps the base's.")
@click.option("--max-shard-size", type=Size(), default="5GB", show_default=True, help="Largest safetensors shard to write.")
@qlora_options("--blocksize")
@click.option("--measure-merge-base", is_flag=True,
              help="For a QLoRA adapter: measure both merge bases (4-bit and 16-bit) against the model as trained and "
              "the 16-bit base + adapter (torch + bitsandbytes, teacher-forced, 256 tokens); the figures go to the manifest and card.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option("--allow-pickle", is_flag=True, help="Accept a pickle adapter_model.bin (it can run code: only for trusted files).")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON instead of a summary.")
def merge(base, adapters, out, dtype, max_shard_size, qlora_base, double_quant, blocksize, measure_merge_base, force, allow_pickle, as_json):
    """Merge LoRA adapter(s) into a base model and write a normal Hugging Face checkpoint.

    Streams the base one tensor at a time (memory stays near the largest tensor plus the adapter),
    and writes sharded safetensors, config, tokenizer, processor, chat template and generation
    config, plus manifest.json (sha256 of every file) and a model card (README.md).

    \b
    Example:
      xpack merge --base google/gemma-3-4b-it --adapter ./xray-lora --out ./gemma3-xray
      xpack merge --base ./base --adapter ./lora-a --adapter ./lora-b:0.5 --out ./merged --dtype bf16
      xpack merge --base google/gemma-3-4b-it --adapter ./qlora --qlora-base nf4 --double-quant --out ./merged
    """

    settings = MergeSettings(
        dtype=dtype, max_shard_size=max_shard_size, allow_pickle=allow_pickle,
        qlora_base=qlora_base, double_quant=double_quant, qlora_blocksize=blocksize,
    )
    manifest = do_merge(base, list(adapters), out, settings, force=force, measure_merge_base=measure_merge_base)
    m = manifest["merge"]
    weights = [f for f in manifest["files"] if f.endswith(".safetensors")]
    lines = [
        f"merged {len(manifest['adapters'])} adapter(s) into {manifest['base']['ref']}: "
        f"{m['merged_tensors']} of {m['tensors']} tensors changed",
        f"wrote {out} ({len(weights)} safetensors file(s), {m['bytes'] / 1e6:.1f} MB of weights)",
        f"model card: {out / 'README.md'}",
        f"manifest:   {out / 'manifest.json'}",
        *(summary_lines(m["merge_base_parity"]) if m["merge_base_parity"] else []),
    ]
    emit(manifest, as_json, lines)
    for note in m["notes"]:  # on stderr, so that --json's stdout stays one JSON document
        click.echo(f"note: {note}", err=True)
