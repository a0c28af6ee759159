"""The one exception type for user errors, shared by packager/ and runtimes/.

A user error is one line: what is wrong and how to fix it. The CLI prints it as
``Error: <message>`` and exits non-zero, never with a traceback.
"""


class XpackError(Exception):
    """A problem the user can fix (bad input, missing file, unsupported model)."""

    exit_code = 1

    def __init__(self, message: str):
        super().__init__(" ".join(message.split()))  # always one line


class Terminated(BaseException):
    """SIGTERM (what `timeout`, systemd and `docker stop` send), raised in the main thread like Ctrl-C's
    KeyboardInterrupt, so every ``finally`` and temporary-folder cleanup runs. A BaseException, so that no
    ``except Exception`` on the way swallows it."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


# The optional dependency each third-party module comes with (pyproject.toml's extras; tests/test_faults.py checks
# this table against it): a missing one is named with its `pip install` line, not a ModuleNotFoundError (issue #14).
EXTRA_OF_MODULE = {
    "torch": "pack", "transformers": "pack", "peft": "pack", "accelerate": "pack", "gguf": "pack", "sentencepiece": "pack",
    "optimum": "pack", "onnx": "pack", "onnx_ir": "pack", "bitsandbytes": "pack",
    "llama_cpp": "llama",
    "onnxruntime": "onnx", "PIL": "onnx",
}
DISTRIBUTION_OF_MODULE = {"llama_cpp": "llama-cpp-python", "PIL": "pillow", "onnx_ir": "onnx-ir"}


def missing_module_error(exc: ImportError, what: str) -> "XpackError | None":
    """The one line for ``exc`` when it is a known optional module that is not installed; None for anything else."""
    name = (getattr(exc, "name", None) or "").split(".")[0]
    if name not in EXTRA_OF_MODULE:
        return None
    dist = DISTRIBUTION_OF_MODULE.get(name, name)
    extra = EXTRA_OF_MODULE[name]
    also = " (or `pip install 'xpack[llama]'`: pillow comes with either)" if name == "PIL" else ""
    return XpackError(f"{what} needs {dist}, which is not installed: pip install 'xpack[{extra}]'{also}")


def require_modules(what: str, modules: "tuple[str, ...]") -> None:
    """Fail in one line, before any work (and before any folder is made), when a module ``what`` needs is missing."""
    import importlib.util

    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # ValueError: a module set to None in sys.modules
            found = False
        if not found:
            raise missing_module_error(ModuleNotFoundError(name=name), what) or XpackError(f"{what} needs {name}, which is not installed")


def _write_reasons() -> dict:
    import errno

    return {
        errno.ENOSPC: "no space is left on the device", errno.EDQUOT: "the disk quota is exceeded",
        errno.EFBIG: "the file grew past the size this system allows", errno.EROFS: "the file system is read-only",
        errno.EACCES: "permission is denied", errno.EPERM: "the operation is not permitted",
    }


def os_error_message(exc: OSError, what: str) -> "XpackError | None":
    """One line for a full disk, a quota, a read-only or forbidden place (issue #14: a traceback after the cleanup);
    None for other OS errors. Every output folder is written in a temporary sibling, removed on failure."""
    reason = _write_reasons().get(exc.errno)
    if reason is None and exc.errno is None and " requested and " in str(exc) and str(exc).endswith(" written"):
        reason = f"a write came up short ({exc}: a full disk or a file size limit)"  # numpy's tofile says no errno
    if reason is None:
        return None
    where = f" ({exc.filename})" if exc.filename else ""
    return XpackError(f"{what} stopped: {reason}{where}; free space or choose a writable --out. Nothing was left half-written")
