"""What every command shares: the group's error handling, the model/size parameter types, and output."""

from __future__ import annotations

import json
import re
from pathlib import Path

import click

from xpack.errors import XpackError
from xpack.packager.io.tensors import parse_size
from xpack.packager.merge.lora import parse_adapter_spec

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


class XpackGroup(click.Group):
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
        try:
            return parse_size(value)
        except XpackError as exc:
            self.fail(str(exc), param, ctx)


def emit(data: dict, as_json: bool, lines: list[str]) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        for line in lines:
            click.echo(line)


def adapter_option(help: str, required: bool = False):
    """``--adapter PATH[:WEIGHT]``, repeatable: LoRA adapters in the order they are applied."""
    return click.option("--adapter", "adapters", required=required, multiple=True, type=ModelRef(weighted=True), help=help)


def qlora_options(*blocksize_aliases: str):
    """``--qlora-base``, ``--double-quant``, ``--qlora-blocksize`` (+ aliases): the 4-bit base a QLoRA adapter
    was trained on. ``xpack merge`` also takes ``--blocksize``; ``xpack export`` does not, beside ONNX's ``--block-size``."""
    options = [
        click.option(
            "--qlora-base", type=click.Choice(["nf4", "fp4"]),
            help="The adapter was trained on a bitsandbytes 4-bit base (QLoRA): add it to dequant(quant(W)), "
            "the weights it was trained on, not to the 16-bit weights.",
        ),
        click.option("--double-quant", is_flag=True, help="With --qlora-base: the base used double quantization (bnb_4bit_use_double_quant)."),
        click.option("--qlora-blocksize", *blocksize_aliases, "blocksize", type=int, help="With --qlora-base: bitsandbytes' 4-bit block size.  [default: 64]"),
    ]

    def decorate(f):
        for option in reversed(options):
            f = option(f)
        return f

    return decorate
