"""Continuous batching on one loaded GGUF: up to N text generations decoded together (``xpack serve --max-concurrency N``).

llama-cpp-python's ``Llama`` holds one sequence. llama.cpp itself decodes many at once (llama-server's ``--parallel``):
one ``llama_decode`` per step over a batch that holds the next token of every running sequence and chunks of the
prompts of new ones, each sequence in its own KV stream (``n_seq_max`` streams of the profile's ``n_ctx``). Decoding on
a CPU is bound by reading the weights, so N sequences cost little more per step than one. Why this is written here:
llama-cpp-python's own server serialises its requests on one ``Llama``, and its batch API is the low-level one used
below (``llama_cpp._internals``: LlamaContext, LlamaBatch, LlamaSampler).

The context is a second one on the runtime's loaded model: the weights are shared, only the KV streams are new. The
runtime's ``Llama`` keeps what it did (images, scoring, ``xpack run``).

Each sequence samples with the chain ``Llama.generate`` builds (``Llama._init_sampler``, mirrored in
:func:`_sampler`): OpenAI's penalties as a custom stage where asked, llama.cpp's repetition penalty over the prompt
and the answer, then greedy at temperature 0, or top-k, typical, top-p, min-p, temperature and the seeded draw.

Prompt cache: a request goes to the free slot whose KV shares the longest prefix with its prompt (the system prompt
of a chat, as llama-server's slot selection does) and only the rest is evaluated; ``prompt_cache=False`` clears the
slot first.
"""

from __future__ import annotations

import ctypes
import importlib
import queue
import threading
from dataclasses import dataclass, field

from xpack.errors import XpackError
from xpack.runtimes.penalties import penalize
from xpack.runtimes.settings import GenerationSettings

__all__ = ["BatchedLlama"]

# Tokens per llama_decode (prompt chunks and the running sequences' next tokens together), llama.cpp's default n_batch.
BATCH_TOKENS = 512


@dataclass
class _Request:
    prompt: list[int]
    settings: GenerationSettings
    limit: int  # tokens to sample at most (the consumer's max_tokens within the context)
    stop_ids: frozenset
    seed: int
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)  # sampled ids, then None (or an exception)
    closed: threading.Event = field(default_factory=threading.Event)  # the consumer stopped reading


@dataclass
class _Slot:
    seq: int
    cached: list[int] = field(default_factory=list)  # the tokens whose keys/values this sequence holds, in order
    request: _Request | None = None
    pending: list[int] = field(default_factory=list)  # prompt tokens still to evaluate
    next_token: int | None = None  # the last sampled token, evaluated in the next step
    sampler: object = None
    generated: list[int] = field(default_factory=list)
    used: int = 0  # when it last took a request (least recently used first among equals)


class BatchedLlama:
    """Up to ``slots`` generations at once on ``llm``'s model (a ``llama_cpp.Llama``), driven by one thread."""

    def __init__(self, llama_cpp, llm, slots: int, n_ctx: int, threads: int, prompt_cache: bool):
        internals = importlib.import_module(f"{llama_cpp.__name__}._internals")
        self._llama_cpp, self._internals = llama_cpp, internals
        self.n_ctx, self.prompt_cache = n_ctx, prompt_cache
        self._n_vocab = llm.n_vocab()
        # the Llama's own settings (flash attention off, its threads, rope, KV types), so that a sequence computes as
        # it does there; only the streams differ
        params = type(llm.context_params).from_buffer_copy(llm.context_params)
        params.n_ctx = n_ctx * slots
        params.n_batch = params.n_ubatch = BATCH_TOKENS
        params.n_seq_max = slots
        params.n_threads = params.n_threads_batch = threads
        params.kv_unified = False  # each sequence its own stream of n_ctx: one long prompt cannot starve the others
        try:
            self._ctx = internals.LlamaContext(model=llm._model, params=params, verbose=False)
        except ValueError as exc:
            raise XpackError(f"llama.cpp could not make a context of {slots} sequences x {n_ctx} tokens ({exc}); lower --max-concurrency") from None
        self._batch = internals.LlamaBatch(n_tokens=BATCH_TOKENS, embd=0, n_seq_max=1, verbose=False)
        self._slots = [_Slot(seq=i) for i in range(slots)]
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._clock = 0
        self.widest = 0  # the most sequences one llama_decode has held (the tests read it)
        self.reused = 0  # prompt tokens whose keys/values a slot already held (the prompt cache's hits)
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="xpack-llama-batch", daemon=True)
        self._thread.start()

    # -- the consumer's side -----------------------------------------------------------------------

    def tokens(self, prompt: list[int], settings: GenerationSettings, limit: int, stop_ids: frozenset, seed: int):
        """The sampled ids of ``prompt``'s answer as they come (a stop id is the last one given); closing the generator
        ends the sequence and frees its slot at the next step."""
        if self._closing:
            raise XpackError("this runtime was closed; load the artifact again")
        if not prompt:
            raise XpackError("the prompt is empty; give the model some text")
        request = _Request(list(prompt), settings, limit, stop_ids, seed)
        self._queue.put(request)
        try:
            while True:
                item = request.out.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            request.closed.set()

    def close(self) -> None:
        """Finish the running sequences' current step, end them, free the context."""
        if self._closing:
            return
        self._closing = True
        self._queue.put(None)
        self._thread.join()
        for slot in self._slots:
            self._release(slot, XpackError("the server is shutting down"))
        self._batch.close()
        self._ctx.close()

    # -- the batch thread --------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            active = [s for s in self._slots if s.request is not None]
            if not self._admit(block=not active):
                return
            active = [s for s in self._slots if s.request is not None]
            if not active:
                continue
            try:
                self._step(active)
            except Exception as exc:  # noqa: BLE001 - whatever llama.cpp or a sampler raised goes to the requests in the step
                for slot in active:
                    self._release(slot, exc if isinstance(exc, XpackError) else XpackError(f"llama.cpp failed during a batched step ({exc})"))

    def _admit(self, block: bool) -> bool:
        """Take waiting requests into free slots (waiting for one when nothing runs); False once closing."""
        while True:
            free = [s for s in self._slots if s.request is None]
            if not free:
                return True
            try:
                request = self._queue.get() if block else self._queue.get_nowait()
            except queue.Empty:
                return True
            if request is None:
                return False
            block = False
            if request.closed.is_set():
                continue
            self._start(request, free)

    def _start(self, request: _Request, free: list[_Slot]) -> None:
        def shared(slot: _Slot) -> int:
            n = 0
            for a, b in zip(slot.cached, request.prompt):
                if a != b:
                    break
                n += 1
            return n

        slot = max(free, key=lambda s: (shared(s) if self.prompt_cache else 0, -s.used))
        keep = min(shared(slot), len(request.prompt) - 1) if self.prompt_cache else 0  # one token at least is evaluated, for its logits
        mem = self._ctx.memory
        if keep == 0 or not self._llama_cpp.llama_memory_seq_rm(mem, slot.seq, keep, -1):
            self._llama_cpp.llama_memory_seq_rm(mem, slot.seq, -1, -1)  # a sliding-window cache cannot drop a tail: all of it
            keep = 0
        self._clock += 1
        self.reused += keep
        slot.used = self._clock
        slot.cached = slot.cached[:keep]
        slot.pending = request.prompt[keep:]
        slot.next_token = None
        slot.generated = []
        slot.sampler = _sampler(self._llama_cpp, self._internals, request, slot.generated, self._n_vocab, self.n_ctx)
        slot.request = request

    def _step(self, active: list[_Slot]) -> None:
        """One llama_decode: each running sequence's last token, then prompt chunks as room allows; then sample."""
        lib, batch = self._llama_cpp, self._batch.batch
        n, outputs, fed = 0, [], []
        position = {slot.seq: len(slot.cached) for slot in active}

        def add(slot: _Slot, token: int, logits: bool) -> None:
            nonlocal n
            batch.token[n] = token
            batch.pos[n] = position[slot.seq]
            position[slot.seq] += 1
            batch.n_seq_id[n] = 1
            batch.seq_id[n][0] = slot.seq
            batch.logits[n] = logits
            if logits:
                outputs.append((slot, n))
            fed.append((slot, token))
            n += 1

        for slot in active:
            if slot.request.closed.is_set():
                self._release(slot)
            elif slot.next_token is not None:
                add(slot, slot.next_token, True)
        for slot in active:
            if slot.request is None or not slot.pending or n >= BATCH_TOKENS:
                continue
            chunk = slot.pending[: BATCH_TOKENS - n]
            slot.pending = slot.pending[len(chunk):]
            for i, token in enumerate(chunk):
                add(slot, token, not slot.pending and i == len(chunk) - 1)
        if n == 0:
            return
        batch.n_tokens = n
        self.widest = max(self.widest, len({slot.seq for slot, _ in fed}))
        code = lib.llama_decode(self._ctx.ctx, batch)
        if code != 0:
            raise XpackError(f"llama.cpp could not decode a batch of {n} tokens (llama_decode returned {code}); lower --max-concurrency or the prompt's length")
        for slot, token in fed:
            slot.cached.append(token)
            slot.next_token = None
        for slot, index in outputs:
            self._sample(slot, index)

    def _sample(self, slot: _Slot, index: int) -> None:
        request = slot.request
        token = int(slot.sampler.sample(self._ctx, index))
        slot.sampler.accept(token)
        slot.generated.append(token)
        request.out.put(token)
        if token in request.stop_ids or len(slot.generated) >= request.limit:
            self._release(slot)
        else:
            slot.next_token = token

    def _release(self, slot: _Slot, error: BaseException | None = None) -> None:
        """End the slot's request (its consumer sees the end, or ``error``); the slot's cache stays for the next prompt."""
        if slot.request is not None:
            slot.request.out.put(error)
        slot.request = None
        slot.pending = []
        slot.next_token = None
        if slot.sampler is not None:
            slot.sampler.close()
            slot.sampler = None


def _sampler(lib, internals, request: _Request, generated: list[int], n_vocab: int, n_ctx: int):
    """The chain ``Llama._init_sampler`` builds for these settings (llama-cpp-python 0.3), with the prompt counted in the
    repetition penalty as the single-sequence path does (llamacpp._penalize_prompt)."""
    settings = request.settings
    sampler = internals.LlamaSampler()
    if settings.frequency_penalty or settings.presence_penalty:
        sampler.add_custom(_custom_stage(lib, lambda scores: penalize(scores, generated, settings.frequency_penalty, settings.presence_penalty)))
    sampler.add_penalties(n_vocab=n_vocab, penalty_last_n=n_ctx, penalty_repeat=settings.repetition_penalty, penalty_freq=0.0, penalty_present=0.0)
    if settings.temperature == 0.0:
        sampler.add_greedy()
    else:
        sampler.add_top_k(settings.top_k)
        sampler.add_typical(1.0, 1)
        sampler.add_top_p(settings.top_p, 1)
        sampler.add_min_p(0.0, 1)
        sampler.add_temp(settings.temperature)
        sampler.add_dist(request.seed)
    if settings.repetition_penalty != 1.0:
        for token in request.prompt:
            sampler.accept(token)
    return sampler


def _custom_stage(lib, process):
    """A llama.cpp sampler stage that rewrites the candidates' logits with ``process(logits) -> logits``: the same view
    of ``llama_token_data_array`` that ``Llama._init_sampler`` builds for its logits processors."""
    import numpy as np

    dtype = np.dtype([("id", np.intc), ("logit", np.single), ("p", np.single)], align=True)

    def apply(array) -> None:
        size = array.contents.size
        data = (lib.llama_token_data * size).from_address(ctypes.addressof(array.contents.data.contents))
        view = np.recarray(shape=(size,), dtype=dtype, buf=data)
        view.logit[:] = process(view.logit)

    return apply
