"""Nothing lost when runs meet or die (issue #14 rows 2 and 16, and its fault-injection acceptance): one run per
--out, SIGTERM handled like Ctrl-C, leftovers of killed runs removed by the next one, and --out either absent or
complete and intact whenever merge or export is killed."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from xpack.cli import cli
from xpack.cli.params import XpackGroup
from xpack.errors import Terminated, XpackError
from xpack.packager.io.atomic import atomic_dir, claim, lock_path, sweep_stale_locks, waiting_for
from xpack.paths import owned_prefix, stale_entries


def _args(twin, verb: str, out: Path) -> list[str]:
    return {"merge": ["merge", "--base", str(twin.model_dir), "--adapter", str(twin.adapter_dir), "--out", str(out)],
            "gguf": ["export", "--model", str(twin.model_dir), "--adapter", str(twin.adapter_dir), "--format", "gguf", "--quant", "Q8_0", "--out", str(out)],
            "onnx": ["export", "--model", str(twin.model_dir), "--format", "onnx", "--bits", "8", "--no-calibrate", "--out", str(out)]}[verb]


def _spawn(args: list[str], systmp: Path) -> subprocess.Popen:
    """The CLI in a process of its own, with its own system temp folder (so leftovers there can be counted)."""
    env = {**os.environ, "TMPDIR": str(systmp)}
    return subprocess.Popen([sys.executable, "-m", "xpack", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _leftovers(*folders: Path) -> list[str]:
    return sorted(p.name for f in folders for p in f.iterdir() if "xpack" in p.name)


# Row 2: one run per --out.

def test_a_second_run_to_a_claimed_out_is_refused(twin_factory, tmp_path):
    twin = twin_factory.get("llama")
    out = tmp_path / "merged"
    with claim(out):
        r = CliRunner().invoke(cli, _args(twin, "merge", out))
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert r.output.strip().splitlines()[-1] == f"Error: another xpack run (pid {os.getpid()}) is writing {out}; wait for it to finish or choose another --out"
    assert not out.exists() and not lock_path(out).exists()


def test_a_held_claim_is_not_swept(tmp_path):
    out = tmp_path / "out"
    with claim(out):
        assert sweep_stale_locks(tmp_path) == [] and lock_path(out).exists()
    assert not lock_path(out).exists()


def test_a_killed_holder_leaves_no_claim(tmp_path):
    out = tmp_path / "out"
    code = f"from xpack.packager.io.atomic import claim; import os, pathlib\nwith claim(pathlib.Path({str(out)!r})):\n    print('held', flush=True); os.kill(os.getpid(), 9)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL and "held" in proc.stdout
    with claim(out):  # the kernel dropped the dead process's lock
        pass
    assert not lock_path(out).exists()


def test_a_shared_cache_waits_for_the_run_that_fills_it(tmp_path):
    """The demo models in $XPACK_HOME: a second run waits for the first (and then finds the model made) instead of being
    refused, as a second writer of a user's --out is."""
    lock = tmp_path / ".demo.xpack-wait"
    code = (f"from xpack.packager.io.atomic import waiting_for; import pathlib, time\nwith waiting_for(pathlib.Path({str(lock)!r})):\n"
            "    print('held', flush=True); time.sleep(1.5)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    said, start = [], time.monotonic()
    with waiting_for(lock, said.append):
        waited = time.monotonic() - start
    holder.wait(timeout=30)
    assert said and "waiting for another xpack run" in said[0] and waited > 0.5
    with waiting_for(lock, said.append):  # free now: no wait, nothing said
        pass
    assert len(said) == 1


def test_an_out_that_appears_meanwhile_is_never_replaced(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(XpackError, match="appeared while this run was working"):
        with atomic_dir(out) as tmp:
            (tmp / "result.txt").write_text("ours")
            out.mkdir()  # made by something other than xpack while the run worked
            (out / "theirs.txt").write_text("theirs")
    assert sorted(p.name for p in out.iterdir()) == ["theirs.txt"]
    assert _leftovers(tmp_path) == []


def test_two_concurrent_merges_to_one_out_lose_nothing(twin_factory, tmp_path):
    twin = twin_factory.get("llama")
    out = tmp_path / "merged"
    systmp = tmp_path / "systmp"
    systmp.mkdir()
    procs = [_spawn(_args(twin, "merge", out), systmp) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 1], results
    loser = next(err for code, err in results if code == 1)
    assert "Traceback" not in loser and re.search(r"Error: (another xpack run \(pid \d+\) is writing|output folder .* already exists)", loser), loser
    assert CliRunner().invoke(cli, ["check", str(out)]).exit_code == 0
    assert _leftovers(tmp_path, systmp) == []


# Row 16: SIGTERM like Ctrl-C; stale leftovers swept.

def test_sigterm_stops_cleanly_and_leaves_nothing(twin_factory, tmp_path):
    twin = twin_factory.get("llama")
    out = tmp_path / "merged"
    systmp = tmp_path / "systmp"
    systmp.mkdir()
    proc = _spawn(_args(twin, "merge", out), systmp)
    _wait_for(lambda: any(".xpack-tmp." in p.name for p in tmp_path.iterdir()) or proc.poll() is not None)
    proc.send_signal(signal.SIGTERM)
    code, err = proc.wait(timeout=120), proc.stderr.read()
    if code == 0:
        pytest.skip("the merge finished before SIGTERM arrived")
    assert code == 128 + signal.SIGTERM and "Traceback" not in err, err
    assert err.rstrip().splitlines()[-1] == "Error: stopped by signal SIGTERM; nothing unfinished was left behind"
    assert _leftovers(tmp_path, systmp) == []


def test_leftovers_of_dead_runs_are_swept_and_said(twin_factory, tmp_path, monkeypatch):
    twin = twin_factory.get("llama")
    systmp = tmp_path / "systmp"
    systmp.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(systmp))
    dead = _dead_pid()
    stale = [tmp_path / f".merged.xpack-tmp.{dead}.abc123", tmp_path / f".xpack-gguf.{dead}.x", systmp / f"xpack-llama.{dead}.y.log"]
    live = [tmp_path / f".other.xpack-tmp.{os.getpid()}.def456"]
    (tmp_path / ".killed.xpack-lock").write_text(str(dead))  # a killed run's claim: no process holds its lock
    for p in stale[:2] + live:
        p.mkdir()
        (p / "part.bin").write_bytes(b"\0" * 1000)
    stale[2].write_text("log")
    assert set(stale_entries(tmp_path)) == set(stale[:2])
    r = CliRunner().invoke(cli, _args(twin, "merge", tmp_path / "merged"))
    assert r.exit_code == 0, r.output
    assert "xpack: removed 3 temporary file(s) left by interrupted runs" in r.output
    assert not any(p.exists() for p in stale) and live[0].exists()  # a live run's folder is not touched
    assert not (tmp_path / ".killed.xpack-lock").exists()


def test_a_claimed_output_keeps_its_temporary_folder_whatever_its_pid(tmp_path):
    """A run in another pid namespace (a container sharing the folder) has a pid that looks dead from here; its claim
    on --out still says it is alive."""
    folder = tmp_path / f".shared.xpack-tmp.{_dead_pid()}.abc"
    folder.mkdir()
    with claim(tmp_path / "shared"):
        with atomic_dir(tmp_path / "other"):
            assert folder.exists()
    with atomic_dir(tmp_path / "third"):
        assert not folder.exists()  # nobody claims "shared" now: swept


def test_temporary_names_carry_the_owner(tmp_path):
    assert owned_prefix("gguf", hidden=True) == f".xpack-gguf.{os.getpid()}."
    with atomic_dir(tmp_path / "out") as tmp:
        assert tmp.name.startswith(f".out.xpack-tmp.{os.getpid()}.")
        assert stale_entries(tmp_path) == []  # its owner is alive


# The acceptance's fault injection: kill at several points, then the invariants.

KILL_POINTS = (0.1, 0.4, 0.7, 0.95)  # fractions of the work, measured on a run that is not killed


@pytest.mark.slow
@pytest.mark.parametrize("verb", ["merge", "gguf", "onnx"])
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_at_any_point_out_is_absent_or_complete(twin_factory, tmp_path, verb, sig):
    """Kills land at several points of the work (from the moment the run's temporary folder appears to its end:
    reading, merging, writing, hashing, the card, the rename): wherever one lands, --out is absent or complete and
    passes `xpack check`, and the next run leaves no temporary file behind."""
    twin = twin_factory.get("llama")
    systmp = tmp_path / "systmp"
    systmp.mkdir()
    ref = _spawn(_args(twin, verb, tmp_path / "timing"), systmp)
    started = _work_started(ref, tmp_path / "timing")
    assert ref.wait(timeout=600) == 0, ref.stderr.read()[-3000:]
    work = time.perf_counter() - started
    for i, point in enumerate(KILL_POINTS):
        out = tmp_path / f"out{i}"
        proc = _spawn(_args(twin, verb, out), systmp)
        _work_started(proc, out)
        time.sleep(work * point)
        proc.send_signal(sig)
        code, err = proc.wait(timeout=600), proc.stderr.read()
        assert "Traceback" not in err, err[-3000:]
        if code == 0:
            assert out.is_dir()
        elif sig == signal.SIGTERM:
            assert code == 128 + sig and err.rstrip().endswith("nothing unfinished was left behind"), err[-2000:]
            assert _leftovers(tmp_path) == [], _leftovers(tmp_path)  # SIGTERM: cleaned up at once
        if out.exists():
            r = CliRunner().invoke(cli, ["check", str(out)])
            assert r.exit_code == 0, f"{verb} killed at {point:.0%} of its work: --out is there but incomplete: {r.output}"
        else:
            again = _spawn(_args(twin, verb, out), systmp)
            assert again.wait(timeout=600) == 0, again.stderr.read()[-3000:]
            assert CliRunner().invoke(cli, ["check", str(out)]).exit_code == 0
    final = _spawn(_args(twin, verb, tmp_path / "final"), systmp)  # sweeps what SIGKILL left
    assert final.wait(timeout=600) == 0
    expected = sorted(["timing", "final", *(f"out{i}" for i in range(len(KILL_POINTS)))])
    assert _leftovers(tmp_path, systmp) == [], _leftovers(tmp_path, systmp)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "systmp") == expected


def _work_started(proc: subprocess.Popen, out: Path) -> float:
    """When ``proc``'s temporary folder for ``out`` appeared (its work began), or it ended."""
    mark = f".{out.name}.xpack-tmp.{proc.pid}."
    _wait_for(lambda: any(p.name.startswith(mark) for p in out.parent.iterdir()) or proc.poll() is not None, timeout=300)
    return time.perf_counter()


def _wait_for(condition, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


def _dead_pid() -> int:
    """A pid no process has: one above the kernel's pid_max."""
    return int(Path("/proc/sys/kernel/pid_max").read_text()) + 1


@pytest.mark.parametrize("turned_into", [XpackError, RuntimeError], ids=["xpack-error", "library-error"])
def test_a_sigterm_a_library_turns_into_its_own_error_still_stops_with_the_signal(turned_into):
    """Terminated raised inside a library's callback can come back as that library's error: torch's C++ gave
    "could not determine the shape of object type 'torch.storage.UntypedStorage'", which the ONNX export reported as
    "transformers could not load ..." with exit 1 (a CI run of the kill test). The exit and the line follow the signal."""

    @click.group(cls=XpackGroup)
    def group():
        pass

    @group.command()
    def work():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        except Terminated:
            raise turned_into("could not determine the shape of object type 'torch.storage.UntypedStorage'") from None

    r = CliRunner().invoke(group, ["work"])
    assert r.exit_code == 128 + signal.SIGTERM, r.output
    assert r.output.strip().splitlines()[-1] == "Error: stopped by signal SIGTERM; nothing unfinished was left behind"
    r = CliRunner().invoke(group, ["work", "--help"])  # the next command starts with no signal on record
    assert r.exit_code == 0


def test_an_error_without_a_signal_is_still_the_error():
    @click.group(cls=XpackGroup)
    def group():
        pass

    @group.command()
    def fail():
        raise XpackError("the model folder is empty")

    r = CliRunner().invoke(group, ["fail"])
    assert r.exit_code == 1 and r.output.strip() == "Error: the model folder is empty"
