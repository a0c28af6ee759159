"""Peak resident memory of this process over a block of work."""

from __future__ import annotations

import threading


class PeakMemory:
    """Peak resident memory (MB) of this process over a ``with`` block.

    A daemon thread samples psutil's RSS every ``interval`` seconds; ``ru_maxrss`` (the kernel's
    exact high-water mark) is used too when it rose during the block, which catches spikes shorter
    than the sampling interval.
    """

    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self.peak_mb: float = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._maxrss_start = 0.0

    def __enter__(self) -> "PeakMemory":
        import psutil

        self._process = psutil.Process()
        self._maxrss_start = _ru_maxrss_mb()
        self._sample()
        self._thread = threading.Thread(target=self._run, name="xpack-peak-memory", daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        try:
            rss = self._process.memory_info().rss / 2**20
        except Exception:  # noqa: BLE001 - a failed sample must never break generation
            return
        if rss > self.peak_mb:
            self.peak_mb = rss

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        maxrss_end = _ru_maxrss_mb()
        if maxrss_end > self._maxrss_start:  # a new all-time high was reached inside the block
            self.peak_mb = max(self.peak_mb, maxrss_end)


def _ru_maxrss_mb() -> float:
    try:
        import resource
        import sys

        value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return value / 2**20 if sys.platform == "darwin" else value / 1024  # bytes on macOS, KiB on Linux
    except (ImportError, OSError):
        return 0.0


