#!/usr/bin/env python3
"""Benchmark ``xpack serve`` against llama-cpp-python's own OpenAI server on the same GGUF (issue #13).

Both servers run at once on loopback, each loaded once, with the same threads and context:

  xpack      ``xpack serve --artifact GGUF --profile cpu16 --max-concurrency 4``  (llama.cpp through xpack's runtime:
             up to 4 sequences decoded together, runtimes/llamacpp_batch.py; ``--xpack-concurrency 1`` for one at a time)
  llama_cpp  ``python -m llama_cpp.server --model GGUF ...``          (llama-cpp-python's FastAPI server: one
             ``Llama``, one sequence at a time; it has no parallel sequences)

llama_cpp.server runs with ``--interrupt_requests False``, so that it queues requests as xpack does: by default
each new request interrupts the one streaming (its client gets a stream cut off without a finish_reason, which
this script counts as an error).

Each server first answers 3 requests that are not measured (a process's first requests are slower). Then, for
``--rounds`` rounds (3), for N = 1, 4, 16 concurrent clients (``--clients``), each side in turn (who goes first
alternates) gets ``--seconds`` of load: every client sends the demo's radiology chat prompt, streamed, 128 tokens, greedy
(repetition penalty off on both), with OpenAI's AsyncOpenAI client, and sends the next request when its answer
ends. Per side and N: requests/s, generated tokens/s (from the answers' usage where the server sends it, else
one per streamed chunk), p50/p99 time to first token and latency, errors, and the server's RSS (peak, and at the
start and end of the phase: flat means no growth); the table gives each figure's median over the rounds (the JSON
holds every round). Targets: throughput >= 1.0x llama_cpp.server at every N,
p99 TTFT at N=16 <= 0.8x its, zero errors, RSS flat. Bounded: loopback only, N and the time per phase are capped.

Usage:
  .venv/bin/python benchmarks/serve.py [--clients 1,4,16] [--seconds 60] [--rounds 3] [--tokens 128] [--xpack-concurrency 4] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE] + [str(HERE)]  # last: see _harness.py

import _harness as H  # noqa: E402
from xpack.packager.demo.base_model import demo_gguf_path  # noqa: E402
from xpack.packager.demo.job import DEMO_PROMPT, DEMO_SYSTEM  # noqa: E402
from xpack.profiles.machine import resolve_for_machine  # noqa: E402
from xpack.profiles.profile import load_profile  # noqa: E402

DEFAULT_JSON = H.RESULTS / "serve.json"
MAX_CLIENTS, MAX_SECONDS, MAX_ROUNDS = 64, 600, 9
WARMUP_REQUESTS = 3
# a phase's fields that are rates or times: the median over the rounds; errors add up; RSS: the first start, the last end, the peak
_MEDIAN_FIELDS = ("requests_per_s", "tokens_per_s", "tokens_per_request", "ttft_p50_s", "ttft_p99_s", "latency_p50_s", "latency_p99_s")
TARGETS = {"throughput_ratio_min": 1.0, "p99_ttft_ratio_max_at_16": 0.8, "errors": 0}
MESSAGES = [{"role": "system", "content": DEMO_SYSTEM}, {"role": "user", "content": DEMO_PROMPT}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One server process on loopback, its RSS sampled every 0.2 s while it lives."""

    def __init__(self, name: str, cmd: list[str], port: int, logs: Path):
        self.name, self.port = name, port
        self.log = open(logs / f"serve-{name}.log", "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=H.child_env(), cwd=str(H.ROOT), start_new_session=True)
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        deadline = time.time() + 300
        while not self._healthy():
            if self.proc.poll() is not None or time.time() > deadline:
                raise SystemExit(f"{name} did not start; see {self.log.name}")
            time.sleep(0.5)
        self.model = self._model_id()
        threading.Thread(target=self._sample, daemon=True).start()

    def _get(self, path: str) -> bytes:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
            return r.read()

    def _healthy(self) -> bool:
        try:
            self._get("/v1/models")
            return True
        except OSError:
            return False

    def _model_id(self) -> str:
        import json

        return json.loads(self._get("/v1/models"))["data"][0]["id"]

    def _sample(self) -> None:
        while not self._stop.is_set():
            rss = sum(H._proc_status_kb(p).get("VmRSS", 0) for p in H._tree_pids(self.proc.pid)) / 1024
            self.samples.append((time.time(), rss))
            time.sleep(0.2)

    def rss_between(self, start: float, end: float) -> list[float]:
        return [rss for t, rss in self.samples if start <= t <= end]

    def stop(self) -> int | None:
        self._stop.set()
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return None
        finally:
            self.log.close()


async def one_client(client, model: str, tokens: int, until: float, records: list, requests: int | None = None) -> None:
    """Requests one after another until ``until`` (or ``requests`` of them)."""
    import openai

    while (len(records) < requests) if requests is not None else (time.perf_counter() < until):
        start, first, usage, chunks, error, finish = time.perf_counter(), None, None, 0, None, None
        try:
            stream = await client.chat.completions.create(
                model=model, messages=MESSAGES, max_tokens=tokens, temperature=0, stream=True, stream_options={"include_usage": True},
                extra_body={"repetition_penalty": 1.0, "repeat_penalty": 1.0})
            async for chunk in stream:
                if chunk.usage is not None:
                    usage = chunk.usage.completion_tokens
                if chunk.choices and chunk.choices[0].delta.content:
                    first = first or time.perf_counter()
                    chunks += 1
                if chunk.choices and chunk.choices[0].finish_reason:
                    finish = chunk.choices[0].finish_reason
        except openai.APIError as exc:
            error = f"{type(exc).__name__}: {str(exc)[:200]}"
        if error is None and finish is None:  # the stream ended without a finish_reason: the answer was cut off
            error = f"stream cut off after {chunks} chunks (no finish_reason)"
        end = time.perf_counter()
        records.append({"start": start, "ttft_s": (first - start) if first else None, "latency_s": end - start,
                        "tokens": usage if usage is not None else chunks, "tokens_from": "usage" if usage is not None else "chunks", "error": error})


async def load_phase(server: Server, clients: int, seconds: float, tokens: int, requests: int | None = None) -> dict:
    """``clients`` clients for ``seconds`` (or, with ``requests``, one client for that many: the warm-up)."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="none", max_retries=0, timeout=600)
    records: list[dict] = []
    t0_wall, t0 = time.time(), time.perf_counter()
    until = t0 + seconds
    await asyncio.gather(*(one_client(client, server.model, tokens, until, records, requests) for _ in range(clients)))
    elapsed = time.perf_counter() - t0
    await client.close()
    ok = [r for r in records if r["error"] is None]
    ttft = sorted(r["ttft_s"] for r in ok if r["ttft_s"] is not None)
    latency = sorted(r["latency_s"] for r in ok)
    rss = server.rss_between(t0_wall, time.time())
    return {
        "clients": clients, "seconds": round(elapsed, 2), "requests": len(records), "errors": len(records) - len(ok),
        "error_samples": sorted({r["error"] for r in records if r["error"]})[:3],
        "requests_per_s": len(ok) / elapsed, "tokens_per_s": sum(r["tokens"] for r in ok) / elapsed,
        "tokens_per_request": statistics.mean(r["tokens"] for r in ok) if ok else None,
        "tokens_counted_from": sorted({r["tokens_from"] for r in ok}),
        "ttft_p50_s": _pct(ttft, 50), "ttft_p99_s": _pct(ttft, 99), "latency_p50_s": _pct(latency, 50), "latency_p99_s": _pct(latency, 99),
        "rss_peak_mb": max(rss) if rss else None, "rss_start_mb": rss[0] if rss else None, "rss_end_mb": rss[-1] if rss else None,
    }


def median_phase(runs: list[dict]) -> dict:
    """One phase's figures over its rounds: the median of each rate and time, the errors of all, RSS over the whole."""
    out = dict(runs[-1])
    for key in _MEDIAN_FIELDS:
        values = [r[key] for r in runs if r[key] is not None]
        out[key] = statistics.median(values) if values else None
    out["errors"] = sum(r["errors"] for r in runs)
    out["requests"] = sum(r["requests"] for r in runs)
    out["error_samples"] = sorted({e for r in runs for e in r["error_samples"]})[:3]
    out["rss_start_mb"], out["rss_end_mb"] = runs[0]["rss_start_mb"], runs[-1]["rss_end_mb"]
    peaks = [r["rss_peak_mb"] for r in runs if r["rss_peak_mb"] is not None]
    out["rss_peak_mb"] = max(peaks) if peaks else None
    out["rounds"] = len(runs)
    return out


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    k = (len(values) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def run_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", default="1,4,16", help="concurrent clients per phase (comma-separated; at most 64)")
    ap.add_argument("--seconds", type=float, default=60.0, help="seconds of load per side and N (at most 600)")
    ap.add_argument("--tokens", type=int, default=128, help="max_tokens of each request")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON)
    ap.add_argument("--rounds", type=int, default=3, help="times each side runs each N (interleaved); the table gives their medians")
    ap.add_argument("--xpack-concurrency", type=int, default=4, help="xpack serve's --max-concurrency (its default on a GGUF)")
    a = ap.parse_args(argv)
    counts = [int(n) for n in H.csv(a.clients)]
    if not counts or max(counts) > MAX_CLIENTS or min(counts) < 1 or not 0 < a.seconds <= MAX_SECONDS or not 1 <= a.rounds <= MAX_ROUNDS:
        raise SystemExit(f"--clients must be 1..{MAX_CLIENTS}, --seconds within (0, {MAX_SECONDS}] and --rounds 1..{MAX_ROUNDS}")
    try:
        import llama_cpp.server  # noqa: F401
        import openai  # noqa: F401
    except ImportError as exc:
        raise SystemExit(f"this benchmark needs openai and llama-cpp-python's server ({exc}): pip install openai 'llama-cpp-python[server]'") from None
    gguf = demo_gguf_path()
    profile = resolve_for_machine(load_profile("cpu16"))[0]
    logs = H.ensure_cache() / "serve"
    logs.mkdir(parents=True, exist_ok=True)
    queue = str(max(counts))
    xp, lc = free_port(), free_port()
    concurrency = str(a.xpack_concurrency)
    H.log(f"starting both servers on {gguf.name} ({profile.threads} threads, n_ctx {profile.n_ctx})")
    servers = {
        "xpack": Server("xpack", H.xpack("serve", "--artifact", gguf, "--profile", "cpu16", "--port", xp, "--model-name", "demo", "--max-queue", queue,
                                         "--max-concurrency", concurrency, "--no-check"), xp, logs),
        "llama_cpp.server": Server("llama_cpp.server", [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
                                                        "--port", str(lc), "--n_threads", str(profile.threads), "--n_threads_batch",
                                                        str(profile.threads), "--n_ctx", str(profile.n_ctx), "--model_alias", "demo",
                                                        "--interrupt_requests", "False"], lc, logs),
    }
    rounds: dict[str, dict[str, list[dict]]] = {name: {str(n): [] for n in counts} for name in servers}
    try:
        for name, server in servers.items():  # the first requests of a process are slower (page faults, thread pools)
            H.log(f"{name}: warming up ({WARMUP_REQUESTS} requests, not measured)")
            asyncio.run(load_phase(server, 1, 0.0, a.tokens, requests=WARMUP_REQUESTS))
        step = 0
        for k in range(a.rounds):
            for n in counts:
                order = list(servers) if step % 2 == 0 else list(reversed(servers))  # who goes first alternates
                step += 1
                for name in order:
                    H.log(f"round {k + 1}/{a.rounds}, {name}: {n} client(s) for {a.seconds:.0f} s")
                    r = asyncio.run(load_phase(servers[name], n, a.seconds, a.tokens))
                    rounds[name][str(n)].append(r)
                    H.log(f"  {r['requests_per_s']:.2f} req/s, {r['tokens_per_s']:.1f} tok/s, ttft p50 {r['ttft_p50_s']} p99 {r['ttft_p99_s']}, "
                          f"errors {r['errors']}, RSS {r['rss_start_mb']} -> {r['rss_end_mb']} MB")
    finally:
        exits = {name: s.stop() for name, s in servers.items()}
    phases = {name: {n: median_phase(runs) for n, runs in by_n.items()} for name, by_n in rounds.items()}
    ratios = {}
    for n in map(str, counts):
        x, l = phases["xpack"][n], phases["llama_cpp.server"][n]
        ratios[n] = {
            "throughput_tokens": x["tokens_per_s"] / l["tokens_per_s"] if l["tokens_per_s"] else None,
            "throughput_requests": x["requests_per_s"] / l["requests_per_s"] if l["requests_per_s"] else None,
            "p99_ttft": x["ttft_p99_s"] / l["ttft_p99_s"] if x["ttft_p99_s"] and l["ttft_p99_s"] else None,
        }
    xs = phases["xpack"]
    verdict = {
        "throughput_ge_1x_at_every_n": all((r["throughput_tokens"] or 0) >= TARGETS["throughput_ratio_min"] for r in ratios.values()),
        "p99_ttft_at_16_le_0.8x": (ratios.get("16", {}).get("p99_ttft") or 9) <= TARGETS["p99_ttft_ratio_max_at_16"] if "16" in ratios else None,
        "zero_errors": all(p["errors"] == 0 for p in xs.values()),
        "rss_growth_mb": max(p["rss_end_mb"] for p in xs.values()) - min(p["rss_start_mb"] for p in xs.values()),
        "xpack_exit_code_on_sigterm": exits["xpack"],
    }
    result = {"machine": H.machine_info("llama_cpp_python", "openai", "uvicorn", "starlette"), "gguf": str(gguf), "threads": profile.threads,
              "n_ctx": profile.n_ctx, "tokens": a.tokens, "seconds_per_phase": a.seconds, "rounds": a.rounds,
              "xpack_max_concurrency": a.xpack_concurrency, "phases": phases, "phase_rounds": rounds, "ratios": ratios, "targets": TARGETS,
              "verdict": verdict}
    H.write_json(a.json, result)
    print(f"{'N':>3} {'side':<17} {'req/s':>7} {'tok/s':>8} {'ttft p50':>9} {'ttft p99':>9} {'lat p50':>8} {'lat p99':>8} {'err':>4} {'RSS MB':>14}")
    for n in map(str, counts):
        for name in servers:
            p = phases[name][n]
            print(f"{n:>3} {name:<17} {p['requests_per_s']:7.2f} {p['tokens_per_s']:8.1f} {p['ttft_p50_s'] or 0:9.3f} {p['ttft_p99_s'] or 0:9.3f} "
                  f"{p['latency_p50_s'] or 0:8.2f} {p['latency_p99_s'] or 0:8.2f} {p['errors']:4d} {p['rss_start_mb'] or 0:6.0f}->{p['rss_end_mb'] or 0:<6.0f}")
        r = ratios[n]
        print(f"{n:>3} xpack/llama_cpp: throughput {r['throughput_tokens'] or 0:.2f}x, p99 ttft {r['p99_ttft'] or 0:.2f}x")
    print(f"verdict: {verdict}")
    print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(H.main(run_main, {}))
