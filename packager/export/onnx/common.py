"""One way to keep the terminal to xpack's own lines while optimum, torch.onnx, transformers and
onnxruntime's quantizer run: they log or warn at every step of an export."""

from __future__ import annotations

import contextlib
import logging
import warnings

# Loggers lowered to ERROR for the duration ("root": the root logger, which onnxruntime's quantizer uses).
LOGGERS = ("optimum", "onnxruntime", "onnxruntime.quantization", "onnxruntime.quantization.matmul_nbits_quantizer", "torch.onnx", "root")


@contextlib.contextmanager
def quiet(names: tuple[str, ...] = LOGGERS):
    """Python warnings off, the named loggers and transformers' verbosity at ERROR; restored on exit."""
    from transformers.utils import logging as hf_logging

    try:
        from optimum.utils import logging as optimum_logging

        optimum_logging.get_logger()  # optimum sets its logger's level when first asked for it: before ours, not after
    except ImportError:  # xpack's own graphs need no optimum
        pass
    loggers = {n: logging.getLogger(None if n == "root" else n) for n in names}
    saved = {n: lg.level for n, lg in loggers.items()}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    for lg in loggers.values():
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        for n, lg in loggers.items():
            lg.setLevel(saved[n])
