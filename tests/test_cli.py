"""The CLI's face: pinned --help texts, fast start-up without heavy imports, layering of the packages."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from xpack import __version__
from xpack.cli import cli

GOLDEN = Path(__file__).parent / "golden"
ROOT = Path(__file__).resolve().parents[1]
COMMANDS = [[], ["merge"], ["export"], ["verify"], ["demo"], ["run"], ["serve"], ["check"], ["profiles"], ["profiles", "list"], ["profiles", "show"], ["profiles", "detect"]]


def _help(args):
    result = CliRunner().invoke(cli, [*args, "--help"], env={"COLUMNS": "100"}, prog_name="xpack")
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("args", COMMANDS, ids=lambda a: "-".join(a) or "xpack")
def test_help_is_pinned(args):
    """Help text is part of the interface; regenerate with XPACK_UPDATE_GOLDEN=1 after a deliberate change."""
    golden = GOLDEN / f"help_{'_'.join(args) or 'xpack'}.txt"
    text = _help(args)
    if os.environ.get("XPACK_UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text()
    assert "Example" in text


def test_every_command_is_pinned():
    assert sorted(cli.commands) == sorted(a[0] for a in COMMANDS if len(a) == 1)
    for group in (c for c in cli.commands.values() if isinstance(c, click.Group)):
        assert sorted(group.commands) == sorted(a[1] for a in COMMANDS if len(a) == 2 and a[0] == group.name)


def test_start_up_imports_no_heavy_library(fresh_python):
    code = (
        "from click.testing import CliRunner; from xpack.cli import cli; "
        "r = CliRunner().invoke(cli, ['merge', '--help']); assert r.exit_code == 0"
    )
    fresh_python(code, forbidden=("torch", "transformers", "peft", "optimum", "onnxruntime", "llama_cpp", "safetensors", "numpy", "starlette", "uvicorn", "prometheus_client", "PIL"))


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_runtimes_never_import_packager():
    """An edge box installs and runs artifacts without the packager (torch, peft, optimum)."""
    offenders = {
        p.name: sorted(n for n in _imports(p) if n.startswith(("xpack.packager", "packager")))
        for p in (ROOT / "runtimes").rglob("*.py")
    }
    assert not {k: v for k, v in offenders.items() if v}


def test_version_flag():
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output
