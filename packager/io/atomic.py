"""Write an output folder atomically: claim the destination, build in a temporary sibling, rename into place.

A failed or interrupted run (an error, Ctrl-C, SIGTERM) leaves nothing at the destination and no temporary
folder; a killed one (SIGKILL) leaves a temporary folder that the next run removes (xpack.paths.sweep_stale).
Two runs never write one destination: the first holds a lock on it for its whole run, the second is refused
at its start, and the final rename refuses a destination that appeared meanwhile instead of replacing it.
"""

import contextlib
import ctypes
import errno
import fcntl
import os
import re
import shutil
import tempfile
from pathlib import Path

from xpack.errors import XpackError
from xpack.paths import owned_prefix, sweep_stale


def check_destination(out: Path, force: bool) -> None:
    """Refuse an existing destination unless ``force``; call before doing any work."""
    if out.exists() and not force:
        raise XpackError(f"output folder {out} already exists; pass --force to replace it or choose another --out")
    if out.exists() and not out.is_dir():
        raise XpackError(f"output path {out} exists and is not a folder; choose another --out")


def lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.xpack-lock"


@contextlib.contextmanager
def claim(out: Path):
    """Hold an exclusive lock on ``out`` for the whole run; a second claim is refused in one line.

    flock: the kernel drops the lock when its process dies, even by SIGKILL, so a crash never leaves the
    destination claimed. The lock file is removed at the end; a claimant that opened it just before checks that
    what it locked is still the file at that path, else it locks the new one.
    """
    path = lock_path(out)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise XpackError(
                f"another xpack run (pid {holder}) is writing {out}; wait for it to finish or choose another --out"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


@contextlib.contextmanager
def waiting_for(path: Path, say=None):
    """An exclusive flock on ``path`` (created if needed), waiting for another process that holds it: for a shared cache
    that two runs may fill at once (the demo models in ``$XPACK_HOME``), where the second should use what the first
    made rather than be refused as a second writer of a user's ``--out`` is. ``say`` is called once if it waits."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if say is not None:
                say(f"waiting for another xpack run that is preparing {path.name.removeprefix('.').removesuffix('.xpack-wait')}")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # the lock file stays: removing it would let a third run lock a new file while the second holds the old


_SIBLING = re.compile(r"^\.(?P<out>.+)\.xpack-(tmp|old)\.\d+\.")


def _claimed(entry: Path) -> bool:
    """Whether the output a temporary sibling belongs to is claimed now: its lock held by a live run, which a pid
    check cannot see from another pid namespace (containers sharing a folder)."""
    m = _SIBLING.match(entry.name)
    if not m:
        return False
    try:
        fd = os.open(entry.parent / f".{m['out']}.xpack-lock", os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def sweep_stale_locks(folder: Path) -> list[Path]:
    """Remove the lock files a killed run left in ``folder`` (no process holds their lock). Taking the lock before
    the unlink keeps this safe against a run claiming it at the same moment (see :func:`claim`)."""
    removed = []
    for path in Path(folder).glob(".*.xpack-lock"):
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                os.unlink(path)
                removed.append(path)
        except OSError:  # held by a live run, or gone meanwhile
            pass
        finally:
            os.close(fd)
    return removed


_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``, failing with FileExistsError when ``dst`` exists: one system call
    (Linux renameat2 RENAME_NOREPLACE), so nothing that appeared at ``dst`` is ever replaced. Where the call is
    missing (not Linux, an old libc or a file system without it) a check then a rename comes closest."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is not None:
        if renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise FileExistsError(err, os.strerror(err), str(dst))
        if err not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), str(dst))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


@contextlib.contextmanager
def atomic_dir(out: Path, force: bool = False):
    """Yield a fresh temporary folder; on success it becomes ``out`` (replacing it only with ``force``), on any
    error it is removed."""
    out = Path(out)
    check_destination(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(out.parent, Path(tempfile.gettempdir()), in_use=_claimed)
    sweep_stale_locks(out.parent)
    with claim(out):
        check_destination(out, force)  # a run that held the claim before us may have finished it
        tmp = Path(tempfile.mkdtemp(prefix=_sibling_prefix(out, "tmp"), dir=out.parent))
        try:
            yield tmp
            _put_in_place(tmp, out, force)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _sibling_prefix(out: Path, kind: str) -> str:
    """``.<out name>.xpack-<kind>.<pid>.``: hidden beside ``out``, named for it and for this process."""
    return "." + out.name + owned_prefix(kind, hidden=True)


def _put_in_place(tmp: Path, out: Path, force: bool) -> None:
    old = None
    if force and out.exists():
        old = Path(tempfile.mkdtemp(prefix=_sibling_prefix(out, "old"), dir=out.parent))
        os.rename(out, old / out.name)
    try:
        rename_noreplace(tmp, out)
    except FileExistsError:
        if old is not None:  # keep what --force was to replace rather than lose both
            with contextlib.suppress(OSError):
                rename_noreplace(old / out.name, out.parent / f"{out.name}.replaced")
        raise XpackError(
            f"{out} appeared while this run was working (not by xpack, which holds a lock on it); it was left "
            f"untouched and this run's output was discarded; remove it or choose another --out, then run again"
        ) from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
