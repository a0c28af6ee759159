"""The house: the folders are the architecture, and these tests keep them so.

Layers import one way (profiles <- runtimes <- packager <- cli), every package folder is installed,
and xpack's own modules are imported at the top of the modules that use them (only heavy
third-party libraries are imported inside functions), so a reader can follow a setting from the
CLI to the writer.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
# Repository folder -> installed package name (pyproject.toml [tool.setuptools] package-dir).
LAYERS = {"profiles": "xpack.profiles", "runtimes": "xpack.runtimes", "packager": "xpack.packager", "xpack/cli": "xpack.cli"}
# What each layer may import of xpack: only the layers below it (and xpack.errors / xpack.paths / xpack.__init__).
ALLOWED = {
    "profiles": ("xpack.profiles",),
    "runtimes": ("xpack.profiles", "xpack.runtimes"),
    "packager": ("xpack.profiles", "xpack.runtimes", "xpack.packager"),
    "xpack/cli": ("xpack.profiles", "xpack.runtimes", "xpack.packager", "xpack.cli"),
}
CORE = ("xpack.errors", "xpack.paths")


def _modules(folder: str) -> list[Path]:
    """The Python files of ``folder``, less hidden folders (benchmarks/.cache holds third-party sources)."""
    return sorted(p for p in (ROOT / folder).rglob("*.py") if not any(part.startswith(".") for part in p.relative_to(ROOT).parts))


def _xpack_imports(path: Path) -> list[tuple[str, int, bool]]:
    """(module, line, inside a function) of every import of xpack's own modules in ``path``."""
    tree = ast.parse(path.read_text())
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.ImportFrom) and child.module and child.module.split(".")[0] == "xpack":
                found.append((child.module, child.lineno, in_function))
            elif isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, in_function) for a in child.names if a.name.split(".")[0] == "xpack")
            visit(child, nested)

    visit(tree, False)
    return found


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_layers_import_only_the_layers_below(layer):
    allowed = ALLOWED[layer] + CORE
    offenders = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in _modules(layer)
        for module, line, _ in _xpack_imports(path)
        if module != "xpack" and not module.startswith(allowed)
    ]
    assert not offenders, "\n".join(offenders)


# Scripts whose functions import xpack late on purpose, and why.
LATE_IMPORTS_ALLOWED = {
    "benchmarks/genai_compare.py": "its onnxruntime-genai worker runs in a venv of its own, without xpack",
}


@pytest.mark.parametrize("folder", [*sorted(LAYERS), "tests", "benchmarks", "tools", "examples"])
def test_xpack_modules_are_imported_at_the_top(folder):
    """Function-local imports of xpack's own modules hide the flow; heavy libraries are the only lazy imports."""
    offenders = [
        f"{path.relative_to(ROOT)}:{line} imports {module} inside a function"
        for path in _modules(folder)
        if str(path.relative_to(ROOT)) not in LATE_IMPORTS_ALLOWED
        for module, line, in_function in _xpack_imports(path)
        if in_function
    ]
    assert not offenders, "\n".join(offenders)


def test_every_package_folder_is_installed():
    """A folder with an __init__.py that pyproject.toml does not list would be missing from the wheel."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    package_dir = setuptools["package-dir"]
    listed = set(setuptools["packages"])
    roots = {folder: name for name, folder in package_dir.items()}
    found = set()
    for folder, name in roots.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([name, *rel.parts]))
    assert found == listed, f"unlisted: {sorted(found - listed)}; listed but absent: {sorted(listed - found)}"


def test_package_data_globs_match_files():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {name: folder for name, folder in setuptools["package-dir"].items()}
    for package, globs in setuptools["package-data"].items():
        parent = next(n for n in sorted(folders, key=len, reverse=True) if package == n or package.startswith(n + "."))
        folder = ROOT / folders[parent] / Path(*package[len(parent) + 1 :].split(".") if package != parent else ())
        for pattern in globs:
            assert list(folder.glob(pattern)), f"{package}: {pattern} matches nothing in {folder.relative_to(ROOT)}"
