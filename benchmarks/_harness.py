"""The measuring every benchmark here shares: run a side in a fresh process, measure it, take medians, write JSON.

A side is one command (``xpack ...``, a library's own tool, or ``python <benchmark>.py _worker KIND
ARGS``) run by :func:`run_measured` in a fresh process: wall time (``time.perf_counter`` around it,
interpreter start and imports included) and peak RSS polled every 50 ms over the child's process
tree (``/proc/PID/status``): the larger of the kernel's high-water mark ``VmHWM`` of any one process
and the polled sum of ``VmRSS``, split into anonymous and file-backed memory. ``os.wait4``'s
``ru_maxrss`` is recorded (``kernel_maxrss_mb``) but not used: Linux carries the parent's
high-water mark over ``exec`` into the child's, so it reads at least as high as this script's own peak.

Contention: the CPU seconds other user-space processes used during the run (``other_cpu_s``). A run
during which they used more than ``CONTENTION_CORES`` cores on average is contended: :func:`pick`
leaves it out of the medians when clean runs exist. :func:`wait_idle` waits for a quiet machine first.

A worker reports its own figures on one stdout line, ``BENCH_PHASES {json}`` (:func:`emit`), which
``run_measured`` parses into ``phases``.

Every script here starts by moving its own folder from the front of ``sys.path`` (where Python puts a
script's folder) to the end: first, ``gguf.py`` and ``onnx.py`` would shadow the gguf and onnx packages;
last, ``import _harness`` still finds this file.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _dist_version
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CACHE = HERE / ".cache"
RESULTS = HERE / "results"
POLL_S = 0.05
CONTENTION_CORES = 0.1  # other processes using more than this (cores, on average) make a run "contended"
PHASES = "BENCH_PHASES "
# What run records keep in the JSON (the rest: command, output tails, the RSS timeline).
BRIEF = ("wall_s", "peak_rss_mb", "vmhwm_mb", "polled_peak_anon_mb", "polled_peak_file_mb", "user_cpu_s", "sys_cpu_s",
         "other_cpu_s", "unattributed_cpu_s", "loadavg_1min_before", "phases", "order", "attempts", "box")

T0 = time.perf_counter()  # when the script started importing (after the interpreter itself)


def log(msg: str) -> None:
    print(f"[{Path(sys.argv[0]).stem} {time.perf_counter() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def main(run_main, workers: dict) -> int:
    """``script.py _worker KIND ARGS...`` runs ``workers[KIND](*ARGS)``; anything else is the benchmark."""
    argv = sys.argv[1:]
    if argv[:1] == ["_worker"]:
        return workers[argv[1]](*argv[2:])
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # a benchmark stopped by `timeout` or `kill` still stops its servers and sides
    return run_main(argv)


def _exit_on_sigterm(signum, _frame) -> None:
    raise SystemExit(128 + signum)


def worker_cmd(*args) -> list[str]:
    """This benchmark script run again as a worker: ``python script.py _worker KIND ARGS...``."""
    return [sys.executable, str(Path(sys.argv[0]).resolve()), "_worker", *map(str, args)]


def emit(data: dict) -> None:
    """A worker's figures: one line that ``run_measured`` parses into ``phases``."""
    print(PHASES + json.dumps(data), flush=True)


def xpack(*args) -> list[str]:
    """The venv's ``xpack`` console script with ``args``."""
    exe = Path(sys.executable).with_name("xpack")
    return [str(exe if exe.is_file() else ROOT / ".venv" / "bin" / "xpack"), *map(str, args)]


def csv(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def error_line(text: str) -> str:
    """xpack's one-line error (click's "Error: ...") where there is one, else the last line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("Error: ")]
    return errors[-1] if errors else lines[-1] if lines else "(no message)"


def ensure_cache() -> Path:
    CACHE.mkdir(parents=True, exist_ok=True)
    return CACHE


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


# --------------------------------------------------------------------------------------------
# Machine


def version(dist: str) -> str | None:
    try:
        return _dist_version(dist)
    except PackageNotFoundError:
        return None


def machine_info(*dists: str, loadavg: bool = True) -> dict:
    """Date, host, CPU, RAM, python, and the versions of torch, transformers, safetensors, xpack and ``dists``."""
    import psutil

    ram = psutil.virtual_memory().total
    info = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "ram_bytes": ram,
        "ram_gib": round(ram / (1 << 30), 1),
        "python": platform.python_version(),
    }
    info.update({d: version(d) for d in ("torch", "transformers", "safetensors", "xpack", *dists)})
    try:
        info["cpu_model"] = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                                 if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if loadavg:
        info["loadavg"] = os.getloadavg()
    return info


def child_env() -> dict:
    env = dict(os.environ)
    env.update({"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
                "TOKENIZERS_PARALLELISM": "false"})
    return env


# --------------------------------------------------------------------------------------------
# One side in a fresh process


def _proc_status_kb(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(("VmHWM:", "VmRSS:", "RssAnon:", "RssFile:", "RssShmem:")):
                    k, v = line.split(":", 1)
                    out[k] = int(v.split()[0])
    except (OSError, ValueError):
        pass
    return out


def _tree_pids(pid: int) -> list[int]:
    import psutil

    try:
        return [pid] + [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return [pid]


def _other_procs_cpu() -> dict[tuple[int, float], float]:
    """CPU seconds so far of every user-space process but this one and its children."""
    import psutil

    me = os.getpid()
    out = {}
    for p in psutil.process_iter(["pid", "ppid", "create_time", "cpu_times", "exe"]):
        info = p.info
        if info["pid"] == me or info["ppid"] in (me, 2) or info["pid"] == 2 or not info.get("exe"):
            continue  # ourselves, our children, kernel threads
        if info["cpu_times"] is not None:
            out[(info["pid"], info["create_time"])] = info["cpu_times"].user + info["cpu_times"].system
    return out


def _cpu_since(before: dict) -> float:
    return sum(v - before.get(k, 0.0) for k, v in _other_procs_cpu().items() if v >= before.get(k, 0.0))


def _busy_cpu_s() -> float:
    """Machine-wide busy CPU seconds so far (all cores, not idle or iowait)."""
    import psutil

    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)


def _thin(points: list, n: int) -> list:
    if len(points) <= n:
        return points
    step = len(points) / n
    return [points[int(i * step)] for i in range(n)] + [points[-1]]


def _cpu_s(ru) -> float:
    return ru.ru_utime + ru.ru_stime


class MemoryBox:
    """A memory cgroup limited to ``limit_mb``: the memory a machine of that size has, as its kernel enforces it.

    The peak RSS polled by :func:`run_measured` counts the pages of mapped files (safetensors shards, an artifact's
    ``.onnx.data``) that the kernel can drop and read again; a box says whether the side completes when it must: the
    kernel reclaims page cache inside the limit first and kills the side only when its private memory does not fit.
    cgroup v2 (``memory.max``) or v1 (``memory.limit_in_bytes``); :meth:`create` returns None, with the reason logged,
    where this machine does not let us make one (not root, no writable cgroup file system). No swap is allowed.
    """

    def __init__(self, path: Path, v2: bool, limit_mb: float):
        self.path, self.v2, self.limit_mb = path, v2, limit_mb

    @classmethod
    def create(cls, limit_mb: float) -> "MemoryBox | None":
        name = f"xpack-bench-{os.getpid()}-{time.monotonic_ns()}"
        limit = str(int(limit_mb * 2**20))
        for root, v2, files in ((Path("/sys/fs/cgroup"), True, {"memory.max": limit, "memory.swap.max": "0"}),
                                (Path("/sys/fs/cgroup/memory"), False, {"memory.limit_in_bytes": limit, "memory.memsw.limit_in_bytes": limit})):
            if not (root / ("cgroup.controllers" if v2 else "memory.limit_in_bytes")).is_file():
                continue
            path = root / name
            try:
                path.mkdir()
                for file, value in files.items():
                    if (path / file).exists():
                        (path / file).write_text(value)
                return cls(path, v2, limit_mb)
            except OSError as exc:
                with contextlib.suppress(OSError):
                    path.rmdir()
                log(f"no memory box of {limit_mb:.0f} MB: {exc}")
                return None
        log("no memory box: this machine has no writable memory cgroup")
        return None

    def enter(self) -> None:
        """In the child before exec: this process (and what it starts) joins the box."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def _read(self, name: str) -> str:
        try:
            return (self.path / name).read_text()
        except OSError:
            return ""

    def close(self) -> dict:
        """The box's figures (peak usage including page cache, kills by the out-of-memory killer); then it is removed."""
        peak = self._read("memory.peak" if self.v2 else "memory.max_usage_in_bytes").strip()
        events = self._read("memory.events" if self.v2 else "memory.oom_control")
        kills = next((int(line.split()[1]) for line in events.splitlines() if line.startswith("oom_kill ")), None)
        failcnt = None if self.v2 else int(self._read("memory.failcnt").strip() or 0)
        with contextlib.suppress(OSError):
            self.path.rmdir()
        return {"limit_mb": self.limit_mb, "peak_usage_mb": int(peak) / 2**20 if peak.isdigit() else None, "oom_kills": kills,
                "times_at_limit": failcnt, "cgroup": "v2" if self.v2 else "v1"}


def run_measured(cmd: list[str], label: str, workdir: Path, env: dict | None = None, limit_mb: float | None = None,
                 box: MemoryBox | None = None) -> dict:
    """Run ``cmd`` in a fresh process (cwd: the repository); wall time, peak RSS (kernel + polled), CPU, its output.
    ``limit_mb``: the process tree is killed when its RSS passes this (``killed_over_limit_mb`` in the result): a side
    that would not fit a machine of that size is reported as out of memory instead of taking this one down.
    ``box``: the side runs inside that memory cgroup (:class:`MemoryBox`); its figures go to the result's ``box``."""
    out_path, err_path = workdir / f"{label}.stdout", workdir / f"{label}.stderr"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    peak = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0, "VmHWM": 0, "samples": 0}
    timeline: list[tuple[float, int]] = []
    sys_before, self_before, others_before = _busy_cpu_s(), resource.getrusage(resource.RUSAGE_SELF), _other_procs_cpu()
    load_before = os.getloadavg()[0]
    killed = False
    with open(out_path, "wb") as fo, open(err_path, "wb") as fe:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=fo, stderr=fe, env=env or child_env(), cwd=str(ROOT), preexec_fn=box.enter if box else None)
        while True:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                wall = time.perf_counter() - t0
                break
            tot = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
            for p in _tree_pids(proc.pid):
                st = _proc_status_kb(p)
                for k in tot:
                    tot[k] += st.get(k, 0)
                peak["VmHWM"] = max(peak["VmHWM"], st.get("VmHWM", 0))
            for k in tot:
                peak[k] = max(peak[k], tot[k])
            if limit_mb is not None and tot["VmRSS"] / 1024 > limit_mb and not killed:
                for p in _tree_pids(proc.pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(p, 9)
                killed = True
            peak["samples"] += 1
            timeline.append((round(time.perf_counter() - t0, 2), tot["VmRSS"] // 1024))
            time.sleep(POLL_S)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4: tell Popen
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    other = _cpu_since(others_before)
    child_cpu = _cpu_s(after) - _cpu_s(before)
    self_cpu = _cpu_s(resource.getrusage(resource.RUSAGE_SELF)) - _cpu_s(self_before)
    res = {
        "cmd": cmd,
        "returncode": proc.returncode,
        "wall_s": wall,
        "peak_rss_mb": max(peak["VmHWM"], peak["VmRSS"]) / 1024,
        "vmhwm_mb": peak["VmHWM"] / 1024,
        "kernel_maxrss_mb": ru.ru_maxrss / 1024,  # KiB; includes this script's own peak (see the docstring): not used
        "polled_peak_rss_mb": peak["VmRSS"] / 1024,
        "polled_peak_anon_mb": peak["RssAnon"] / 1024,
        "polled_peak_file_mb": peak["RssFile"] / 1024,
        "polled_samples": peak["samples"],
        "user_cpu_s": after.ru_utime - before.ru_utime,
        "sys_cpu_s": after.ru_stime - before.ru_stime,
        # CPU that other user-space processes used meanwhile (contention makes wall times unreliable);
        # processes that started and ended within the run are not seen
        "other_cpu_s": other,
        # machine-wide busy CPU not in the child, this script or other processes: kernel work such as
        # writeback and freeing pages (large on this VM for allocation-heavy children)
        "unattributed_cpu_s": max(0.0, (_busy_cpu_s() - sys_before) - child_cpu - self_cpu - other),
        "monitor_cpu_s": self_cpu,
        "loadavg_1min_before": load_before,
        "rss_timeline_mb": _thin(timeline, 120),
    }
    if killed:
        res["killed_over_limit_mb"] = limit_mb
    if box is not None:
        res["box"] = box.close()
    stdout, stderr = out_path.read_text(errors="replace"), err_path.read_text(errors="replace")
    res["stderr_tail"] = stderr[-3000:]
    for line in stdout.splitlines():
        if line.startswith(PHASES):
            res["phases"] = json.loads(line[len(PHASES):])
    res["stdout_tail"] = stdout[-2000:]
    return res


def wait_idle(max_wait_s: float, threshold: float = CONTENTION_CORES) -> float:
    """Wait (up to ``max_wait_s``) until other processes use less than ``threshold`` cores; return the wait."""
    t0 = time.perf_counter()
    said = False
    while True:
        before = _other_procs_cpu()
        time.sleep(1.0)
        used = _cpu_since(before)
        waited = time.perf_counter() - t0
        if used < threshold or waited >= max_wait_s:
            if said:
                log(f"  waited {waited:.0f}s for the machine to go idle" + (" (gave up)" if used >= threshold else ""))
            return waited
        if not said:
            log(f"  other processes use {used:.1f} cores: waiting up to {max_wait_s:.0f}s for them to finish")
            said = True


def warm_cache(paths) -> float:
    """Read every file once (like ``cat FILES > /dev/null``) so every side starts from a warm page cache."""
    t0 = time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as fh:
            while fh.read(64 << 20):
                pass
    return time.perf_counter() - t0


def files_in(*folders: Path) -> list[Path]:
    return [p for d in folders for p in sorted(Path(d).rglob("*")) if p.is_file()]


def prepare(inputs=(), wait_s: float = 0) -> float:
    """Before a side: dirty pages synced, up to ``wait_s`` for a quiet machine, inputs read once; the read's seconds."""
    os.sync()
    if wait_s > 0:
        wait_idle(wait_s)
    return warm_cache(inputs)


def measure(cmd: list[str], label: str, workdir: Path, inputs=(), wait_s: float = 0, env: dict | None = None,
            check: bool = True, limit_mb: float | None = None, box_mb: float | None = None) -> dict:
    """``prepare`` then ``run_measured``; a failed side raises (``check``) or carries ``error``: its last line.
    ``box_mb``: in a :class:`MemoryBox` of that size where the machine allows one."""
    prepare(inputs, wait_s)
    box = MemoryBox.create(box_mb) if box_mb else None
    r = run_measured(cmd, label, workdir, env, limit_mb, box)
    r["contended"] = contended(r)
    if r["returncode"] != 0:
        r["error"] = error_line(r["stderr_tail"] + "\n" + r["stdout_tail"])
        log(f"{label} FAILED (exit {r['returncode']}): {r['error']}")
        if check:
            raise RuntimeError(f"{label} exited with {r['returncode']} ({r['error'][:200]})")
    return r


def measure_retrying(cmd: list[str], label: str, workdir: Path, inputs, wait_s: float, attempts: int) -> dict:
    """A short run during which other processes were busy is done again (up to ``attempts`` in all); the least
    contended attempt is kept, with ``attempts``. A worker that printed no figures is an error."""
    tries = []
    for a in range(attempts):
        tries.append(measure(cmd, f"{label}-{a}", workdir, inputs, wait_s))
        if not tries[-1]["contended"]:
            break
        log(f"  {label}: other processes used {tries[-1]['other_cpu_s']:.1f} CPU s; "
            + ("running it again" if a + 1 < attempts else "keeping the least contended attempt"))
    r = min(tries, key=busy)
    r["attempts"] = len(tries)
    if not r.get("phases"):
        raise RuntimeError(f"{label}: the worker printed no figures:\n{r['stdout_tail']}\n{r['stderr_tail']}")
    return r


# --------------------------------------------------------------------------------------------
# Medians


def busy(r: dict) -> float:
    """Cores other processes used, on average, during the run."""
    return r["other_cpu_s"] / max(r["wall_s"], 1e-9)


def contended(r: dict) -> bool:
    return busy(r) >= CONTENTION_CORES


def pick(runs: list[dict]) -> list[dict]:
    """The clean runs, or all of them when none is clean."""
    return [r for r in runs if not contended(r)] or runs


def med(runs: list[dict], key) -> float | None:
    """Median of ``key`` (a field name or a function of a run) over the runs that have it."""
    vals = [key(r) if callable(key) else r.get(key) for r in runs]
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def phase(name: str):
    return lambda r: r["phases"][name]


def brief(r: dict, extra: tuple[str, ...] = ()) -> dict:
    return {k: r[k] for k in BRIEF + extra if k in r}


def token_digest(ids) -> str:
    return hashlib.sha256(json.dumps([int(t) for t in ids]).encode()).hexdigest()[:16]


def first_difference(a: list, b: list) -> int:
    """How many leading items two sequences share."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


# --------------------------------------------------------------------------------------------
# Decode speed: sides that generate the same tokens, each run a worker that emits decode_tok_s


def decode_runs(cases: dict[tuple, list[str]], repeats: int, work: Path, wait_s: float, attempts: int, cmd, inputs,
                rotate: bool = False) -> dict[tuple, dict[str, list[dict]]]:
    """Every case's sides, ``repeats`` times, interleaved, each run a fresh process (``measure_retrying``).

    ``cases``: (file key, threads) -> its sides; ``cmd(side, key, threads)`` and ``inputs(key)`` give a run's
    command and the files to read first. The order of the sides alternates from one case and repeat to the
    next (``rotate``: rotates with the repeat)."""
    runs = {case: {side: [] for side in sides} for case, sides in cases.items()}
    i = 0
    for rep in range(repeats):
        for (key, t), sides in cases.items():
            k = rep % len(sides) if rotate else (rep + i) % 2
            order = sides[k:] + sides[:k] if rotate else (sides if k == 0 else sides[::-1])
            i += 1
            for side in order:
                r = measure_retrying(cmd(side, key, t), f"decode-{side}-{key}-{t}-{rep}", work, inputs(key), wait_s, attempts)
                r["order"] = order.index(side) + 1
                runs[(key, t)][side].append(r)
                ph = r["phases"]
                log(f"decode {key} threads={t} rep {rep + 1}/{repeats} {side}: {ph['decode_tok_s']:.1f} tok/s "
                    f"({ph['completion_tokens']} tokens, prompt {ph['prompt_tokens']}), peak RSS {r['peak_rss_mb']:.0f} MB, "
                    f"other processes {r['other_cpu_s']:.1f} CPU s" + (" (contended)" if r["contended"] else ""))
    return runs


def decode_summary(runs: list[dict]) -> dict:
    """One side's decode runs: medians over the clean ones (all when none is clean), every run's tok/s, token hashes."""
    picked, first = pick(runs), runs[0]["phases"]
    return {
        "decode_tok_s": med(picked, phase("decode_tok_s")),
        "decode_tok_s_all": [round(r["phases"]["decode_tok_s"], 2) for r in runs],
        "ttft_s": med(picked, phase("ttft_s")),
        "peak_rss_mb": med(picked, "peak_rss_mb"),
        "runs_used": len(picked), "runs": len(runs),
        **{k: first[k] for k in ("threads", "prompt_tokens", "completion_tokens")},
        "tokens_sha": sorted({r["phases"]["tokens_sha"] for r in runs}),
    }


def paired_ratios(a: list[dict], b: list[dict]) -> list[float]:
    """decode tok/s of a over b, run by run (the two ran next to each other)."""
    return [x["phases"]["decode_tok_s"] / y["phases"]["decode_tok_s"] for x, y in zip(a, b) if y["phases"]["decode_tok_s"]]


# --------------------------------------------------------------------------------------------
# cProfile


def profiled(cmd: list[str], prof: Path) -> list[str]:
    """``xpack ...`` (from :func:`xpack`) under cProfile: ``python -m cProfile -o PROF -m xpack ...``."""
    return [sys.executable, "-m", "cProfile", "-o", str(prof), "-m", "xpack", *cmd[1:]]


def profile_rows(prof: Path) -> tuple[float, list[dict]]:
    """(seconds profiled on the main thread, one row per function) of a cProfile file."""
    import pstats

    stats = pstats.Stats(str(prof))
    rows = [{"function": f"{Path(file).name}:{line}({func})", "path": file, "calls": nc, "tottime_s": tt, "cumtime_s": ct}
            for (file, line, func), (_cc, nc, tt, ct, _callers) in stats.stats.items()]
    return stats.total_tt, rows


def print_profile(title: str, rows: list[dict]) -> list[dict]:
    """Print the rows; return them without their ``path`` (what the JSON keeps)."""
    print(f"{'tottime s':>10}{'cumtime s':>10}{'calls':>9}  {title}")
    for row in rows:
        print(f"{row['tottime_s']:>10.3f}{row['cumtime_s']:>10.3f}{row['calls']:>9}  {row['function']}")
    return [{k: v for k, v in row.items() if k != "path"} for row in rows]
