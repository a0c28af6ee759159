"""The one loaded model behind the server: a bounded queue in front of it, generations in a worker thread.

Generations run in ``max_concurrency`` slots. The llamacpp runtime decodes that many text sequences together
(llamacpp_batch.py: continuous batching, llama-server's ``--parallel``; 4 by default); the ONNX and torch loops hold
one sequence, so their generations are serialised (1). A request first takes a :class:`Ticket`: when the slots and
``max_queue`` waiting places are all taken it is refused at once with 429 and Retry-After, before any work. A generation whose
client went away (or a server shutting down) is ended at its next token: ``on_token`` raises StopGeneration
("cancelled"), which every runtime's loop honours.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from xpack.errors import XpackError
from xpack.runtimes.base import Runtime
from xpack.runtimes.serve.config import ServeConfig
from xpack.runtimes.serve.metrics import Metrics
from xpack.runtimes.serve.requests import ApiError, Job
from xpack.runtimes.settings import GenerationResult, StopGeneration

PARALLEL_SEQUENCES = {"llamacpp": 64, "onnx": 1, "torch": 1}  # the most generations each runtime runs at once on one loaded model
DEFAULT_CONCURRENCY = {"llamacpp": 4}  # without --max-concurrency (llama-server's default --parallel); the others 1


class Ticket:
    """A request's place: waiting for a slot, then holding one; ``cancel`` ends its generation at the next token."""

    def __init__(self, engine: "Engine"):
        self.engine = engine
        self.cancel = threading.Event()
        self.arrived = time.perf_counter()
        self.first_token: float | None = None
        self._released = False

    def abandon(self, task) -> None:
        """Nobody waits for this request any more (its client left, or the server stops): end its generation at the next
        token, cancel its task and give its waiting place back (a task cancelled before it ran would not)."""
        self.cancel.set()
        task.cancel()
        self.release()

    def release(self) -> None:
        """Give the waiting place back (a request that never started its generation)."""
        if not self._released:
            self._released = True
            self.engine._leave_queue()


class Engine:
    def __init__(self, runtime: Runtime, config: ServeConfig, metrics: Metrics):
        limit = PARALLEL_SEQUENCES.get(runtime.name, 1)
        self.concurrency = config.max_concurrency or DEFAULT_CONCURRENCY.get(runtime.name, 1)
        if self.concurrency > limit:
            more = "one sequence at a time" if limit == 1 else f"at most {limit} sequences at once"
            raise XpackError(f"--max-concurrency {self.concurrency}: the {runtime.name} runtime runs {more} on one loaded model "
                             f"(use --max-queue to let requests wait)")
        if self.concurrency > 1:
            runtime.parallel(self.concurrency)  # its generate() may now be called from several threads
        self.runtime, self.config, self.metrics = runtime, config, metrics
        self.waiting = 0
        self.running = 0
        self._slots: asyncio.Semaphore | None = None
        self._executor = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="xpack-generate")
        # one generation at a time in a runtime that runs one sequence (the close at shutdown waits for it too)
        self._lock = threading.Lock() if self.concurrency == 1 else contextlib.nullcontext()

    # -- admission ---------------------------------------------------------------------------------

    def admit(self) -> Ticket:
        """A place in the queue, or a 429 when the slots and the queue are full."""
        if self.waiting + self.running >= self.concurrency + self.config.max_queue:
            raise ApiError(429, f"the server is busy ({self.running} generating, {self.waiting} waiting); retry after "
                                f"{self.config.retry_after_s} s", code="queue_full", headers={"Retry-After": str(self.config.retry_after_s)})
        self.waiting += 1
        self.metrics.queue_depth.set(self.waiting)
        return Ticket(self)

    def _leave_queue(self) -> None:
        self.waiting -= 1
        self.metrics.queue_depth.set(self.waiting)

    # -- generation --------------------------------------------------------------------------------

    async def generate(self, ticket: Ticket, job: Job, on_piece: Callable[[str], None] | None = None) -> GenerationResult:
        """Wait for a slot, run ``job`` in the worker thread (each new piece of text handed to ``on_piece`` in the event
        loop), give the slot back when the thread is done. Cancelling this coroutine cancels the generation."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.concurrency)
        try:
            await self._slots.acquire()
        finally:
            ticket.release()
        loop = asyncio.get_running_loop()
        self.running += 1
        self.metrics.running.set(self.running)

        def on_token(piece: str) -> None:
            if ticket.cancel.is_set():
                raise StopGeneration("cancelled")
            if ticket.first_token is None:
                ticket.first_token = time.perf_counter()
            if on_piece is not None:
                loop.call_soon_threadsafe(on_piece, piece)

        def work() -> GenerationResult:
            with self._lock:
                return self.runtime.generate(job.prompt, job.settings, image=job.image, on_token=on_token, raw=job.raw)

        future = loop.run_in_executor(self._executor, work)
        future.add_done_callback(lambda done: self._done(done, ticket))
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            ticket.cancel.set()  # the thread ends at its next token; its slot comes back then (_done)
            raise

    def _done(self, future: asyncio.Future, ticket: Ticket) -> None:
        """The worker thread finished a generation (whether or not anyone still waits for it): count it, free its slot."""
        self.running -= 1
        self.metrics.running.set(self.running)
        self._slots.release()
        if future.cancelled() or future.exception() is not None:
            return
        result = future.result()
        self.metrics.tokens.labels("prompt").inc(result.prompt_tokens)
        self.metrics.tokens.labels("completion").inc(result.completion_tokens)
        self.metrics.finished.labels(result.finish_reason).inc()
        if ticket.first_token is not None:
            self.metrics.ttft.observe(ticket.first_token - ticket.arrived)

    def close(self) -> None:
        """After the server stopped taking requests: wait for the worker thread, then free the model."""
        self._executor.shutdown(wait=True)
        with self._lock:
            self.runtime.close()
