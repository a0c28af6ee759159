"""Speed and memory of one artifact on one profile, N runs, in a process of its own.

Run as ``python -m xpack.runtimes.bench --artifact A --profile P [--runtime R] [--runs N]``: it
prints one JSON object. A fresh interpreter per artifact keeps the figures honest: a GGUF run does
not carry the memory of an earlier torch import, and every run loads the artifact again (load time
is part of the figures). Lives in runtimes/ so an edge box can benchmark without the packager.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from xpack.errors import XpackError
from xpack.profiles.profile import load_profile
from xpack.runtimes.registry import load
from xpack.runtimes.settings import GenerationSettings
from xpack.runtimes.torch_ref import PeftOnBase

BENCH_TOKENS = 256  # the seed card's "Inference Time (256 tokens)"
BENCH_PROMPT = "You are an expert radiologist. Analyze this chest X-ray showing increased opacity in the right lower lobe."
METRICS = ("load_s", "ttft_s", "prompt_tok_s", "decode_tok_s", "gen_256_s", "peak_rss_mb", "peak_gpu_mb", "image_encode_s")


def measure(artifact: str, profile_name: str, runtime: str | None, runs: int, tokens: int, image: str | None,
            peft: PeftOnBase | None = None, max_memory: int | None = None, check: bool = True) -> dict:
    """``peft``: adapters over the base ``artifact`` (the torch runtime's as-trained reference); ``max_memory``: the
    torch runtime's budget of weights in bytes (its layers stream beyond it)."""
    profile = load_profile(profile_name)
    settings = GenerationSettings(max_tokens=tokens, temperature=0, repetition_penalty=1.0, ignore_eos=True, seed=0)
    rows = []
    notes: list[str] = []
    for _ in range(runs):
        options = {k: v for k, v in (("peft", peft), ("max_memory", max_memory)) if v is not None}
        with load(artifact, profile, runtime=runtime, check=check, **options) as rt:
            r = rt.generate(BENCH_PROMPT, settings, image=image)
            notes = rt.notes
            rows.append(
                {
                    "load_s": r.load_s,
                    "ttft_s": r.ttft_s,
                    "prompt_tok_s": r.prompt_tok_s,
                    "decode_tok_s": r.decode_tok_s,
                    "gen_256_s": r.total_s * (BENCH_TOKENS / max(r.completion_tokens, 1)),
                    "peak_rss_mb": r.peak_rss_mb,
                    "peak_gpu_mb": r.peak_gpu_mb,
                    "image_encode_s": r.image_encode_s,
                    "completion_tokens": r.completion_tokens,
                    "runtime": r.runtime,
                }
            )
    return {"artifact": artifact, "profile": profile.name, "runs": rows, "summary": summarize(rows), "notes": notes}


def summarize(rows: list[dict]) -> dict:
    out = {}
    for key in METRICS:
        values = [r[key] for r in rows if r.get(key) is not None]
        if values:
            out[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    return out


def run_isolated(artifact: Path, profile: str, runtime: str | None = None, runs: int = 3, tokens: int = BENCH_TOKENS,
                 image: Path | None = None, peft: PeftOnBase | None = None, max_memory: int | None = None, check: bool = True) -> dict:
    """``measure`` in a fresh interpreter; a failure there is one clear line here."""
    cmd = [sys.executable, "-m", "xpack.runtimes.bench", "--artifact", str(artifact), "--profile", profile, "--runs", str(runs), "--tokens", str(tokens)]
    if runtime:
        cmd += ["--runtime", runtime]
    if image:
        cmd += ["--image", str(image)]
    if peft:
        cmd += [arg for adapter in peft.adapters for arg in ("--adapter", str(adapter))]
        cmd += ["--quant", peft.quant_type] if peft.quant_type else []
        cmd += ["--double-quant"] if peft.double_quant else []
    if max_memory is not None:
        cmd += ["--max-memory", str(max_memory)]
    if not check:
        cmd.append("--no-check")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise XpackError(f"benchmark of {artifact} on {profile} failed: {last}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m xpack.runtimes.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", required=True)
    ap.add_argument("--profile", required=True)
    ap.add_argument("--runtime")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=BENCH_TOKENS)
    ap.add_argument("--image")
    ap.add_argument("--adapter", action="append", help="PEFT adapter over the base --artifact (torch runtime; repeatable)")
    ap.add_argument("--quant", choices=("nf4", "fp4"), help="with --adapter: load the base 4-bit with bitsandbytes")
    ap.add_argument("--double-quant", action="store_true", help="with --quant: double quantization")
    ap.add_argument("--max-memory", type=int, help="torch runtime: bytes of weights it may hold; its layers stream beyond")
    ap.add_argument("--no-check", action="store_true", help="skip comparing the artifact's files with its manifest.json")
    args = ap.parse_args(argv)
    try:
        peft = PeftOnBase(tuple(args.adapter), args.quant, args.double_quant) if args.adapter else None
        result = measure(args.artifact, args.profile, args.runtime, args.runs, args.tokens, args.image, peft, args.max_memory, not args.no_check)
    except XpackError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
