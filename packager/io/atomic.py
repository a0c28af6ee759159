"""Write an output folder atomically: build it in a temporary sibling, rename into place.

A failed or interrupted run leaves nothing at the destination (and no temporary folder).
"""

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from xpack.errors import XpackError


def check_destination(out: Path, force: bool) -> None:
    """Refuse an existing destination unless ``force``; call before doing any work."""
    if out.exists() and not force:
        raise XpackError(f"output folder {out} already exists; pass --force to replace it or choose another --out")
    if out.exists() and not out.is_dir():
        raise XpackError(f"output path {out} exists and is not a folder; choose another --out")


@contextlib.contextmanager
def atomic_dir(out: Path, force: bool = False):
    """Yield a fresh temporary folder; on success it replaces ``out``, on any error it is removed."""
    out = Path(out)
    check_destination(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.xpack-tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.xpack-old-{os.getpid()}"
        os.rename(out, old)
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
