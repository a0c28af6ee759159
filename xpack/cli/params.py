"""What every command shares: the group's error handling, the model/size parameter types, and output."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import threading
from pathlib import Path

import click

from xpack.errors import Terminated, XpackError, missing_module_error, os_error_message
from xpack.packager.io.tensors import parse_size
from xpack.packager.merge.lora import parse_adapter_spec

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


@contextlib.contextmanager
def _sigterm_raises():
    """While a command runs, SIGTERM raises :class:`Terminated` in the main thread (Python's default for it is to
    die at once, leaving temporary folders behind)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if _in_finalizer(frame):  # raised there, it would be printed as "Exception ignored" and dropped
            threading.Timer(0.05, os.kill, (os.getpid(), signum)).start()  # so: delivered again just after
            return
        STOPPED_BY.append(signum)
        raise Terminated(signum)

    del STOPPED_BY[:]

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        # In the `xpack` process the work is over here: a SIGTERM now would only hide its exit code. Else (a
        # caller's process, tests) the caller's handler comes back.
        signal.signal(signal.SIGTERM, signal.SIG_IGN if PROCESS["ends_with_command"] else previous)


PROCESS = {"ends_with_command": False}  # set by xpack.cli.main: this process is the `xpack` command
# The signals raised as Terminated while the command ran. Raised inside a library's callback, Terminated can come back
# as that library's own error: torch's C++ turned one into "could not determine the shape of object type
# 'torch.storage.UntypedStorage'", which the export reported as "transformers could not load ..." and exit 1. The
# command's exit still follows the signal (XpackGroup.invoke).
STOPPED_BY: list[int] = []


def _in_finalizer(frame) -> bool:
    """Whether ``frame`` runs inside a ``__del__`` or a weakref finalizer, where Python drops exceptions."""
    while frame is not None:
        if frame.f_code.co_name == "__del__" or frame.f_code.co_qualname.endswith("finalize.__call__"):
            return True
        frame = frame.f_back
    return False


class XpackGroup(click.Group):
    """Turns :class:`XpackError` into click's one-line ``Error: ...`` on stderr and a non-zero exit; with ``--json``
    the same line also goes to stdout as ``{"error": ...}``, so a machine reading stdout is never left with nothing."""

    def parse_args(self, ctx, args):
        ctx.meta["xpack_json"] = "--json" in args
        return super().parse_args(ctx, args)

    def invoke(self, ctx):
        try:
            with _sigterm_raises():
                return super().invoke(ctx)
        except click.ClickException as exc:  # a usage error: with --json, stdout says it too
            if ctx.meta.get("xpack_json") and not ctx.meta.get("xpack_json_said"):
                ctx.meta["xpack_json_said"] = True
                click.echo(json.dumps({"error": exc.format_message()}))
            raise
        except Terminated as exc:  # the temporary output is already gone (packager/io/atomic.py)
            self._stopped(ctx, exc.signum)
        except Exception as exc:  # a Terminated a library turned into an error of its own: the signal still decides the exit
            if STOPPED_BY:
                self._stopped(ctx, STOPPED_BY[-1])
            self._known_error(ctx, exc)
            raise

    def _known_error(self, ctx, exc: Exception) -> None:
        """One line for an error xpack knows the meaning of: its own, an optional extra that is not installed (which one to
        install), a full disk or a read-only --out (the output's temporary folder is already gone); else nothing."""
        where = f"xpack {ctx.invoked_subcommand or ''}".strip()
        if isinstance(exc, XpackError):
            self._fail(ctx, exc)
        error = missing_module_error(exc, where) if isinstance(exc, ImportError) else os_error_message(exc, where) if isinstance(exc, OSError) else None
        if error is not None:
            self._fail(ctx, error)

    @staticmethod
    def _stopped(ctx, signum: int):
        click.echo(f"Error: stopped by signal {signal.Signals(signum).name}; nothing unfinished was left behind", err=True)
        ctx.exit(128 + signum)

    @staticmethod
    def _fail(ctx, exc: XpackError):
        if ctx.meta.get("xpack_json") and not ctx.meta.get("xpack_json_said"):
            ctx.meta["xpack_json_said"] = True
            click.echo(json.dumps({"error": str(exc)}))
        raise click.ClickException(str(exc)) from None


class ModelRef(click.ParamType):
    """A local folder or a Hugging Face hub id (``owner/name[@revision]``); an adapter may add ``:WEIGHT``."""

    name = "PATH|HUB_ID"

    def __init__(self, weighted: bool = False):
        self.weighted = weighted

    def convert(self, value, param, ctx):
        ref = value
        if self.weighted:
            ref, _ = parse_adapter_spec(value)  # a bad weight is an XpackError: one line, as every user error
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


def no_check_option():
    """``--no-check``: skip comparing an artifact's files with its manifest.json before loading (runtimes/integrity.py)."""
    return click.option(
        "--no-check", "no_check", is_flag=True,
        help="Do not compare the artifact's files with the sha256 values in its manifest.json before loading "
        "(checked once per file: a stamp in xpack's cache makes later loads free until the file changes).",
    )
