#!/usr/bin/env python3
"""Issue #14's table of bad inputs and faults, run against the built-in demo model (SmolLM2-135M + radiology LoRA).

Each row runs the ``xpack`` command a hostile but fair user would (a fresh process, its own temporary folder as
TMPDIR) and records its exit code, whether a traceback appeared, its one ``Error:`` line and what it left behind
(files in its work folder that were not there before and are not the expected output, and xpack temporary files).
A row passes when it ends as the issue asks: one line and a non-zero exit for a refusal, nothing lost, nothing
left. The tests (tests/test_faults.py, test_integrity.py, test_interrupts.py) pin each row on tiny twins; this
script shows the whole table on real weights in one run.

Usage:
  .venv/bin/python benchmarks/faults.py [--rows 1,3,16] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE] + [str(HERE)]  # last: see _harness.py

import _harness as H  # noqa: E402
from xpack.packager.demo.base_model import demo_adapter_dir, demo_base_dir  # noqa: E402

DEFAULT_JSON = H.RESULTS / "faults.json"


@dataclass
class Outcome:
    row: str
    title: str
    rc: int | None = None
    traceback: bool = False
    error: str = ""
    left: list[str] = field(default_factory=list)
    library_files: list[str] = field(default_factory=list)  # other libraries' files in TMPDIR (not counted)
    passed: bool = False
    detail: str = ""


@dataclass
class Ran:
    rc: int
    out: str
    err: str

    @property
    def error(self) -> str:
        lines = [ln for ln in self.err.splitlines() if ln.startswith("Error: ")]
        return lines[-1] if lines else ""

    @property
    def one_line(self) -> bool:
        """A refusal as the brief wants it: non-zero, no traceback, exactly one Error: line, and it is the last."""
        lines = [ln for ln in self.err.splitlines() if ln.startswith("Error: ")]
        return self.rc != 0 and "Traceback" not in self.err and len(lines) == 1 and self.err.rstrip().endswith(lines[0])


class Bench:
    """The demo base, adapter and artifacts (built once), and a runner that counts leftovers."""

    def __init__(self, root: Path):
        self.root = root
        self.base, self.adapter = demo_base_dir(), demo_adapter_dir()
        self.shared = root / "shared"
        self.shared.mkdir(parents=True, exist_ok=True)
        self.merged = self._build("merged", "merge", "--base", self.base, "--adapter", self.adapter)
        self.gguf = self._build("gguf", "export", "--model", self.merged, "--format", "gguf", "--quant", "Q8_0")
        self.onnx = self._build("onnx", "export", "--model", self.merged, "--format", "onnx", "--bits", "8", "--no-calibrate")

    def _build(self, name: str, *args) -> Path:
        out = self.shared / name
        if not out.is_dir():
            H.log(f"building {name}")
            ran = self.xpack(self.shared, *args, "--out", out)
            assert ran.rc == 0, ran.err[-2000:]
        return out

    def xpack(self, work: Path, *args, env: dict | None = None, stdin: bytes | None = None, timeout: float = 900,
              python: str | None = None) -> Ran:
        """``xpack ARGS`` in ``work`` (TMPDIR: work/.systmp); with ``python``, that code runs the CLI instead."""
        systmp = work / ".systmp"
        systmp.mkdir(parents=True, exist_ok=True)
        full_env = {**H.child_env(), "TMPDIR": str(systmp), **(env or {})}
        cmd = [sys.executable, "-c", python] if python else H.xpack(*args)
        proc = subprocess.run(cmd, cwd=work, env=full_env, input=stdin, capture_output=True, timeout=timeout)
        return Ran(proc.returncode, proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace"))

    def spawn(self, work: Path, *args) -> subprocess.Popen:
        systmp = work / ".systmp"
        systmp.mkdir(parents=True, exist_ok=True)
        return subprocess.Popen(H.xpack(*args), cwd=work, env={**H.child_env(), "TMPDIR": str(systmp)},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def leftovers(work: Path, before: set[str], expected=()) -> list[str]:
    """New entries of ``work`` that are not expected, and xpack's files in its TMPDIR. Other libraries' files there
    (torch's torchinductor_<user> cache folder, ...) are theirs by design: see :func:`library_files`."""
    names = {p.name for p in work.iterdir()} - before - set(expected) - {".systmp"}
    systmp = work / ".systmp"
    names |= {f"$TMPDIR/{p.name}" for p in systmp.iterdir() if "xpack" in p.name} if systmp.is_dir() else set()
    return sorted(names)


def library_files(work: Path) -> list[str]:
    systmp = work / ".systmp"
    return sorted(p.name for p in systmp.iterdir() if "xpack" not in p.name) if systmp.is_dir() else []


def refused(ran: Ran, says: str) -> tuple[bool, str]:
    return ran.one_line and says in ran.error, ""


# ------------------------------------------------------------------------------------------------------------
# The rows: each takes the bench and a fresh work folder; returns (Ran, passed, detail, expected new entries).

def row1(b: Bench, w: Path):
    out = w / "out"
    ran = b.xpack(w, "export", "--model", b.merged, "--format", "gguf", "--quant", "Q8_0", "--name", "../../victim", "--out", out)
    return ran, ran.one_line and "--name" in ran.error and not (w.parent.parent / "victim-Q8_0.gguf").exists(), "", ()


def row2(b: Bench, w: Path):
    out = w / "merged"
    procs = [b.spawn(w, "merge", "--base", b.base, "--adapter", b.adapter, "--out", out) for _ in range(2)]
    done = [(p.wait(timeout=900), p.stdout.read(), p.stderr.read()) for p in procs]
    loser = next((Ran(rc, o, e) for rc, o, e in done if rc != 0), Ran(0, "", ""))
    check = b.xpack(w, "check", out)
    ok = sorted(rc for rc, _, _ in done) == [0, 1] and loser.one_line and check.rc == 0
    return loser, ok, f"exit codes {[rc for rc, _, _ in done]}; --out passes xpack check: {check.rc == 0}", ("merged",)


def _damaged_copy(src: Path, where: Path, name: str) -> Path:
    """A copy of ``src`` in ``where`` with 1 MB of its file ``name`` overwritten in place, the size kept."""
    dst = where / src.name
    shutil.copytree(src, dst)
    target = dst / name
    with open(target, "r+b") as f:
        f.seek(max(0, target.stat().st_size - (2 << 20)))
        f.write(os.urandom(1 << 20))
    return dst


def row3(b: Bench, w: Path):
    gguf_name = json.loads((b.gguf / "manifest.json").read_text())["gguf_file"]
    art = _damaged_copy(b.gguf, w, gguf_name)
    run = b.xpack(w, "run", "--artifact", art, "--profile", "cpu16", "--prompt", "hi", "--max-tokens", "4")
    check = b.xpack(w, "check", art)
    (w / "o").mkdir()
    onnx = _damaged_copy(b.onnx, w / "o", "model.onnx_data")
    run_onnx = b.xpack(w, "run", "--artifact", onnx, "--profile", "cpu16", "--prompt", "hi", "--max-tokens", "4")
    (w / "m").mkdir()
    src = _damaged_copy(b.merged, w / "m", "model.safetensors")
    export = b.xpack(w, "export", "--model", src, "--format", "gguf", "--quant", "Q8_0", "--out", w / "from-damaged")
    ok = run.one_line and check.rc == 1 and run_onnx.one_line and export.one_line and not (w / "from-damaged").exists()
    detail = f"run gguf {run.rc}, check {check.rc}, run onnx {run_onnx.rc}, export of a damaged source {export.rc}"
    return run, ok, detail, (art.name, "o", "m")


def row4(b: Bench, w: Path):
    from safetensors.numpy import load_file, save_file

    folder = w / "renamed"
    shutil.copytree(b.merged, folder, ignore=shutil.ignore_patterns("manifest.json"))
    tensors = load_file(str(folder / "model.safetensors"))
    save_file({k.replace("self_attn.q_proj", "self_attn.query"): v for k, v in tensors.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    ran = b.xpack(w, "run", "--artifact", folder, "--profile", "cpu16", "--prompt", "hi", "--runtime", "torch")
    return ran, ran.one_line and "missing" in ran.error, "", ("renamed",)


def row5(b: Bench, w: Path):
    ran = b.xpack(w, "merge", "--base", b.base, "--adapter", f"{b.adapter}:nan", "--out", w / "m")
    return ran, ran.one_line and "finite" in ran.error and not (w / "m").exists(), "", ()


def row6(b: Bench, w: Path):
    code = ("import sys; from xpack.runtimes.chat import find_chat_template; from xpack.runtimes.gguf_header import read_gguf_metadata; "
            f"from pathlib import Path; g = next(Path({str(b.gguf)!r}).glob('*.gguf')); "
            f"print(read_gguf_metadata(g).get('tokenizer.chat_template') == find_chat_template(Path({str(b.merged)!r})))")
    ran = b.xpack(w, python=code)
    return ran, ran.rc == 0 and ran.out.strip() == "True", "GGUF's template is the one the runtimes render", ()


def row7(b: Bench, w: Path):
    prompt = "word " * 20000
    results = [b.xpack(w, "run", "--artifact", a, "--profile", "cpu16", "--prompt", prompt, *rt)
               for a, rt in ((b.merged, ("--runtime", "torch")), (b.gguf, ()), (b.onnx, ()))]
    ok = all(r.one_line and "context" in r.error for r in results)
    return results[0], ok, "torch, gguf, onnx: " + ", ".join(str(r.rc) for r in results), ()


def row8(b: Bench, w: Path):
    adapter = w / "adapter"
    shutil.copytree(b.adapter, adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["target_modules"] = ["q_proj", "v_proj", "qkv_proj"]
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    ran = b.xpack(w, "merge", "--base", b.base, "--adapter", adapter, "--out", w / "m")
    said = "qkv_proj" in ran.err + ran.out
    return ran, ran.rc == 0 and said, "merged, and says which target matches nothing" if said else "not said", ("adapter", "m")


FILE_SIZE_LIMIT = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
sys.argv = ["xpack", *{args!r}]
from xpack.cli import main
main()
"""


def row9(b: Bench, w: Path):
    args = ["export", "--model", str(b.merged), "--format", "gguf", "--quant", "Q8_0", "--out", str(w / "out")]
    ran = b.xpack(w, python=FILE_SIZE_LIMIT.format(limit=50_000_000, args=args))  # a disk that fills at 50 MB
    ro = w / "ro"
    ro.mkdir()
    # A read-only file system where this machine lets us mount one (root ignores permission bits), else a read-only folder.
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True).returncode == 0
    if not mounted:
        os.chmod(ro, 0o555)
    try:
        ro_ran = b.xpack(w, "merge", "--base", b.base, "--adapter", b.adapter, "--out", ro / "m")
    finally:
        subprocess.run(["umount", str(ro)], capture_output=True) if mounted else os.chmod(ro, 0o755)
    ro_ok = ro_ran.one_line or (ro_ran.rc == 0 and not mounted and os.geteuid() == 0)  # root writes through permission bits
    how = "read-only tmpfs" if mounted else "read-only folder" + (" (root writes anyway)" if os.geteuid() == 0 else "")
    return ran, ran.one_line and "stopped" in ran.error and ro_ok, f"full disk {ran.rc}; {how} --out {ro_ran.rc}: {ro_ran.error[:80]}", ("ro",)


def row10(b: Bench, w: Path):
    bad = os.fsdecode(b"caf\xe9")
    ran = b.xpack(w, "run", "--artifact", b.gguf, "--profile", "cpu16", "--prompt", bad)
    inter = b.xpack(w, "run", "--artifact", b.gguf, "--profile", "cpu16", "--interactive", "--max-tokens", "2", stdin=b"caf\xe9\nhello\nexit\n")
    ok = ran.one_line and "UTF-8" in ran.error and inter.rc == 0 and "not UTF-8" in inter.err
    return ran, ok, f"--prompt {ran.rc}; --interactive {inter.rc} (the line skipped)", ()


def row11(b: Bench, w: Path):
    from PIL import Image

    Image.new("1", (20000, 20000)).save(w / "big.png")
    ran = b.xpack(w, "run", "--artifact", b.gguf, "--profile", "cpu16", "--prompt", "hi", "--image", w / "big.png")
    return ran, ran.one_line and "pixels" in ran.error, "", ("big.png",)


def row12(b: Bench, w: Path):
    outcomes = []
    for i, template in enumerate(("{% include 'x.jinja' %}", "{% for i in range(10**9) %}x{% endfor %}", "{{ 'ab' * 1000000000 }}")):
        art = w / f"t{i}"
        shutil.copytree(b.merged, art, ignore=shutil.ignore_patterns("manifest.json"))
        (art / "chat_template.jinja").write_text(template)
        t0 = time.perf_counter()
        outcomes.append((b.xpack(w, "run", "--artifact", art, "--profile", "cpu16", "--prompt", "hi", "--runtime", "torch"), time.perf_counter() - t0))
    ok = all(r.one_line and s < 60 for r, s in outcomes)
    return outcomes[0][0], ok, "; ".join(f"rc {r.rc} in {s:.0f} s" for r, s in outcomes), ("t0", "t1", "t2")


def row13(b: Bench, w: Path):
    ran = b.xpack(w, "verify", "--artifact", b.gguf, "--reference", b.merged, "--profile", "cpu16", "--no-benchmark", "--out", w / "missing" / "r.json")
    return ran, ran.one_line and "missing" in ran.error, "", ()


def row14(b: Bench, w: Path):
    (w / "p.toml").write_bytes(b"name = \"caf\xe9\"\n")
    ran = b.xpack(w, "run", "--artifact", b.gguf, "--profile", w / "p.toml", "--prompt", "hi")
    folder = w / "trunc"
    shutil.copytree(b.merged, folder, ignore=shutil.ignore_patterns("manifest.json"))
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    trunc = b.xpack(w, "run", "--artifact", folder, "--profile", "cpu16", "--prompt", "hi", "--runtime", "torch")
    return ran, ran.one_line and trunc.one_line, f"profile {ran.rc}; truncated safetensors {trunc.rc}", ("p.toml", "trunc")


BLOCKER = """
import sys
sys.modules[{module!r}] = None  # import {module} raises ImportError: the extra is not installed
sys.argv = ["xpack", *{args!r}]
from xpack.cli import main
main()
"""


def row15(b: Bench, w: Path):
    cases = [("gguf", ["export", "--model", str(b.merged), "--format", "gguf", "--quant", "Q8_0", "--out", str(w / "o")], "xpack[pack]"),
             ("transformers", ["verify", "--artifact", str(b.gguf), "--reference", str(b.merged), "--profile", "cpu16", "--no-benchmark"], "xpack[pack]"),
             ("torch", ["demo", "--out", str(w / "d")], "xpack[pack]"),
             ("llama_cpp", ["run", "--artifact", str(b.gguf), "--profile", "cpu16", "--prompt", "hi"], "xpack[llama]")]
    home = w / "home"
    runs = [b.xpack(w, python=BLOCKER.format(module=m, args=a), env={"XPACK_HOME": str(home)}) for m, a, _ in cases]
    ok = all(r.one_line and extra in r.error for r, (_, _, extra) in zip(runs, cases)) and not (home / "demo").exists()
    return runs[0], ok, ", ".join(f"{m}: {r.rc}" for r, (m, _, _) in zip(runs, cases)), ("home",)


def row16(b: Bench, w: Path):
    detail = []
    last = None
    ok = True
    for sig in (signal.SIGTERM, signal.SIGKILL):
        out = w / f"m-{sig.name}"
        proc = b.spawn(w, "merge", "--base", b.base, "--adapter", b.adapter, "--out", out)
        end = time.monotonic() + 300
        while not any(".xpack-tmp." in p.name for p in w.iterdir()) and proc.poll() is None and time.monotonic() < end:
            time.sleep(0.02)
        time.sleep(0.5)
        proc.send_signal(sig)
        rc, err = proc.wait(timeout=300), proc.stderr.read()
        last = Ran(rc, "", err)
        left = leftovers(w, set(), ())
        detail.append(f"{sig.name}: rc {rc}, left {len(left)}")
        if sig == signal.SIGTERM:
            ok = ok and rc == 128 + sig and last.one_line and not out.exists() and not left
    rerun = b.xpack(w, "merge", "--base", b.base, "--adapter", b.adapter, "--out", w / "m-SIGKILL", "--force")
    swept = "removed" in rerun.err
    detail.append(f"next run: rc {rerun.rc}, said it removed leftovers: {swept}")
    return last, ok and rerun.rc == 0 and swept, "; ".join(detail), ("m-SIGKILL",)


def row17(b: Bench, w: Path):
    weight = b.xpack(w, "merge", "--base", b.base, "--adapter", f"{b.adapter}:abc", "--out", w / "m")
    (w / "p.toml").write_text((Path(H.ROOT) / "profiles" / "cpu16.toml").read_text().replace("memory_budget_gb", "memory_budget_gb = nan\n#", 1))
    budget = b.xpack(w, "run", "--artifact", b.gguf, "--profile", w / "p.toml", "--prompt", "hi")
    js = b.xpack(w, "run", "--artifact", w / "nothing.gguf", "--profile", "cpu16", "--prompt", "hi", "--json")
    try:
        js_ok = "error" in json.loads(js.out)
    except ValueError:
        js_ok = False
    ok = weight.one_line and "abc" in weight.error and budget.one_line and js_ok
    return weight, ok, f"weight {weight.rc}; nan budget {budget.rc}; --json error on stdout: {js_ok}", ("p.toml",)


def row18(b: Bench, w: Path):
    cards = [b.merged / "README.md", b.gguf / "README.md", b.onnx / "README.md"]
    home = str(demo_base_dir().parent)
    leaked = [str(c.parent.name) for c in cards if home in c.read_text() or str(H.CACHE) in c.read_text()]
    return Ran(0, "", ""), not leaked, f"cards naming a path of this machine: {leaked or 'none'}", ()


ROWS = {
    "1": ("--name outside --out", row1), "2": ("two merges, one --out", row2), "3": ("1 MB overwritten in an artifact", row3),
    "4": ("torch: weights that match nothing", row4), "5": ("adapter weight :nan", row5), "6": ("one chat template rule", row6),
    "7": ("prompt past the context", row7), "8": ("target_modules matching nothing", row8), "9": ("disk full, read-only --out", row9),
    "10": ("non-UTF-8 prompt / interactive line", row10), "11": ("20000 x 20000 image", row11), "12": ("hostile chat templates", row12),
    "13": ("verify --out into a missing folder", row13), "14": ("profile not UTF-8, truncated safetensors", row14),
    "15": ("missing optional extras", row15), "16": ("SIGTERM / SIGKILL during merge", row16), "17": ("smaller ones", row17),
    "18": ("cards without local paths", row18),
}


def run_row(b: Bench, key: str, root: Path) -> Outcome:
    title, fn = ROWS[key]
    work = root / f"row{key}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t0 = time.perf_counter()
    try:
        ran, passed, detail, expected = fn(b, work)
    except Exception as exc:  # the bench itself failed: reported, the table goes on
        return Outcome(key, title, passed=False, detail=f"bench error: {type(exc).__name__}: {exc}")
    left = leftovers(work, set(), expected)
    H.log(f"row {key} ({time.perf_counter() - t0:.0f} s): {'pass' if passed and not left else 'FAIL'}")
    return Outcome(key, title, ran.rc, "Traceback" in ran.err, ran.error, left, library_files(work), passed and not left, detail)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON)
    ap.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one)")
    args = ap.parse_args(argv)
    root = args.work or Path(tempfile.mkdtemp(prefix="xpack-faults-bench-"))
    bench = Bench(root)
    outcomes = [run_row(bench, key, root) for key in H.csv(args.rows)]
    print(f"{'row':>3}  {'':4}  {'exit':>4}  {'tb':2}  {'left':4}  {'what':<40}  error line / detail")
    for o in outcomes:
        print(f"{o.row:>3}  {'ok' if o.passed else 'FAIL':4}  {str(o.rc):>4}  {'TB' if o.traceback else '-':2}  {len(o.left):4}  {o.title:<40}  "
              f"{(o.error or '')[:110]}{' | ' if o.error and o.detail else ''}{o.detail}")
    H.write_json(args.json, {"machine": H.machine_info(), "rows": [asdict(o) for o in outcomes],
                             "passed": sum(o.passed for o in outcomes), "total": len(outcomes)})
    print(f"{sum(o.passed for o in outcomes)} of {len(outcomes)} rows pass; wrote {args.json}")
    if args.work is None:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if all(o.passed for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(H.main(main, {}))
