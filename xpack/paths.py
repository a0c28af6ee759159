"""Where xpack keeps its cache (the materialized demo model, downloaded files) and its temporary files."""

import os
import re
import shutil
import sys
import tempfile
from pathlib import Path


def cache_home() -> Path:
    """``$XPACK_HOME``, else ``$XDG_CACHE_HOME/xpack``, else ``~/.cache/xpack``."""
    if os.environ.get("XPACK_HOME"):
        return Path(os.environ["XPACK_HOME"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "xpack"


# Temporary files and folders of a run carry the pid that owns them (``xpack-<kind>.<pid>.<random>``), so a later
# run can tell the leftovers of a killed one (SIGKILL, a power cut: no handler runs) from those of a live one and
# remove them (issue #14). tempfile makes the unique part and creates the entry exclusively.
_OWNED = re.compile(r"(?:^|\.)xpack-[a-z-]+\.(\d+)\.")


def owned_prefix(kind: str, hidden: bool = False) -> str:
    """The name prefix of this process's temporary ``kind`` (``.`` first when it sits beside user files)."""
    return f"{'.' if hidden else ''}xpack-{kind}.{os.getpid()}."


def temp_dir(kind: str, dir: Path | None = None) -> tempfile.TemporaryDirectory:
    """A TemporaryDirectory named for this process: in ``dir`` (hidden) or in the system temp folder."""
    return tempfile.TemporaryDirectory(prefix=owned_prefix(kind, hidden=dir is not None), dir=dir)


def temp_file(kind: str, suffix: str = "", dir: Path | None = None):
    """A NamedTemporaryFile named for this process (see :func:`temp_dir`)."""
    return tempfile.NamedTemporaryFile(prefix=owned_prefix(kind, hidden=dir is not None), suffix=suffix, dir=dir)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def stale_entries(folder: Path) -> list[Path]:
    """xpack's temporary files and folders in ``folder`` whose owning process is gone."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    stale = []
    for name in names:
        m = _OWNED.search(name)
        if m and (name.startswith(".") or name.startswith("xpack-")) and not pid_alive(int(m.group(1))):
            stale.append(Path(folder) / name)
    return stale


def sweep_stale(*folders: Path, in_use=None) -> list[Path]:
    """Remove the leftovers of killed xpack runs in ``folders`` (default: the system temp folder); say so on stderr.
    ``in_use(path)``: a second opinion that keeps an entry whose pid looks dead (a run in another pid namespace, a
    container sharing the folder, still holds its claim)."""
    removed = []
    for folder in folders or (Path(tempfile.gettempdir()),):
        for path in stale_entries(folder):
            if in_use is not None and in_use(path):
                continue
            try:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
            except FileNotFoundError:  # another run swept it first
                continue
            except OSError:
                continue
            removed.append(path)
    if removed:
        total = len(removed)
        shown = ", ".join(str(p) for p in removed[:3]) + (f" and {total - 3} more" if total > 3 else "")
        print(f"xpack: removed {total} temporary file(s) left by interrupted runs: {shown}", file=sys.stderr)
    return removed
