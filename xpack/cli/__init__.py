"""The ``xpack`` command: a thin click group; each verb is a module of its own here (parse, call, print).

Every xpack module these import is cheap to import; heavy libraries (torch, transformers, onnx,
llama_cpp, numpy, safetensors) are imported inside the functions that use them, so ``xpack --help``
stays fast (tests/test_cli.py pins that).
"""

from __future__ import annotations

import click

from xpack import __version__
from xpack.cli.check import check
from xpack.cli.demo import demo
from xpack.cli.export import export
from xpack.cli.merge import merge
from xpack.cli.params import PROCESS, XpackGroup
from xpack.cli.profiles import profiles
from xpack.cli.run import run
from xpack.cli.serve import serve
from xpack.cli.verify import verify


@click.group(cls=XpackGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="xpack")
def cli():
    """xpack: take a LoRA fine-tuned LLM from the training box to an edge or offline machine.

    \b
    Example, on the built-in demo model (SmolLM2-135M + a radiology LoRA):
      xpack demo
    Your own fine-tune:
      xpack merge --base google/gemma-3-4b-it --adapter ./my-lora --out ./merged
    """


for _command in (merge, export, demo, run, serve, profiles, verify, check):
    cli.add_command(_command)


def main() -> None:
    PROCESS["ends_with_command"] = True
    cli(prog_name="xpack")
