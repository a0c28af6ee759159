"""Decode speed of onnxruntime-genai's own runtime vs xpack's onnx backend on the SAME int4 ONNX file.

Question: is the gap between xpack's onnx backend and onnxruntime-genai's reported 214 tok/s
(SmolLM2-135M int4, 2 cores) caused by the graph or by the runtime loop? Both sides here run
xpack's export (one model.onnx + model.onnx_data), the same prompt token ids, greedy, 128 new
tokens, EOS ignored; each measurement is a fresh process (``_harness.run_measured``), sides alternate,
several repeats.

onnxruntime-genai lives in its own venv (it pins its own onnxruntime); xpack runs from the repo's.
So this script's xpack imports stay inside the xpack workers: the genai worker runs where xpack is not installed.

    python3 -m venv /tmp/genai-venv && /tmp/genai-venv/bin/pip install onnxruntime-genai numpy
    xpack export --model ~/.cache/xpack/demo/smollm2-135m-instruct --format onnx --bits 4 --out /tmp/xg/d4
    .venv/bin/python benchmarks/genai_compare.py --export /tmp/xg/d4 --genai-model /tmp/genai-model --repeats 3

With onnxruntime-genai's OWN graph too (its model builder, all-int4 RTN; the builder shipped in the
0.18 wheel needs transformers >= 5, so with 4.57 two small local edits to a /tmp copy of it were
needed: a None rope_scaling and a missing rope_parameters):

    python builder.py -m HuggingFaceTB/SmolLM2-135M-Instruct -i ~/.cache/xpack/demo/smollm2-135m-instruct \
        -o /tmp/genai-own -p int4 -e cpu          # then /tmp/genai-own-x = same + d4's manifest/config
    .venv/bin/python benchmarks/genai_compare.py --repeats 8 --variants xpack genai-share genai-noshare genai-own xpack-own

``--genai-model`` is a copy of the export plus the genai_config.json this script writes (write_config).
decode tok/s is measured identically on both sides: (new tokens - 1) / (time from the first sampled
token to the last), i.e. the prefill is excluded. Each run also records the cores the REST of the
machine used while it ran (``other_cores``: the harness's ``other_cpu_s`` over the process's wall time),
its own cores and the 1-minute load average before it, so contended runs can be spotted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE] + [str(HERE)]  # last: see _harness.py

import _harness as H  # noqa: E402

PROMPT = "Write a long detailed report about a normal chest X-ray."
NEW_TOKENS = 128
XPACK_PY = H.ROOT / ".venv" / "bin" / "python"
GENAI_PY = Path("/tmp/genai-venv/bin/python")


# ------------------------------------------------------------------------------------------------
# workers (each run in a fresh process)


def _xpack_profile(threads: int):
    from xpack.profiles.machine import resolve_for_machine
    from xpack.profiles.profile import load_profile

    return dataclasses.replace(resolve_for_machine(load_profile("cpu16"))[0], threads=threads, n_ctx=1024)


def worker_ids(export: str) -> int:
    """The prompt's token ids as xpack feeds them (chat template + tokenizer)."""
    from xpack.runtimes.registry import load

    with load(export, _xpack_profile(1)) as rt:
        text = rt.prompt_text(PROMPT)
        H.emit({"text": text, "ids": rt.tokenize(text)})
    return 0


def worker_xpack(export: str, threads: str) -> int:
    from xpack.runtimes.registry import load
    from xpack.runtimes.settings import GenerationSettings

    settings = GenerationSettings(max_tokens=NEW_TOKENS, temperature=0, repetition_penalty=1.0, ignore_eos=True)
    with load(export, _xpack_profile(int(threads))) as rt:
        rt.generate("Write a report.", dataclasses.replace(settings, max_tokens=8))  # warm-up, as genai's side does
        r = rt.generate(PROMPT, settings)
    H.emit({"decode_tok_s": r.decode_tok_s, "prompt_tokens": r.prompt_tokens, "ids": r.token_ids})
    return 0


def worker_genai(model: str, threads: str, share: str, ids_file: str, max_length: str) -> int:
    import onnxruntime_genai as og

    prompt = json.loads(Path(ids_file).read_text())
    config = og.Config(model)
    config.overlay(json.dumps({
        "model": {"decoder": {"session_options": {"intra_op_num_threads": int(threads), "inter_op_num_threads": 1}}},
        "search": {"past_present_share_buffer": bool(int(share))},
    }))
    m = og.Model(config)

    # eos 2 is <|im_end|>: min_length keeps genai from stopping, but it also masks EOS out of the
    # argmax, so a run that reaches an EOS diverges from xpack's ignore_eos there (reported as agreement).
    def run(n_new: int, ids) -> tuple[list[int], float, float]:
        params = og.GeneratorParams(m)
        length = max(int(max_length), len(ids) + n_new)  # max_length 0: a buffer of exactly prompt + new tokens
        params.set_search_options(max_length=length, min_length=len(ids) + n_new, do_sample=False, batch_size=1)
        gen = og.Generator(m, params)
        gen.append_tokens(ids)
        out, first = [], None
        while len(out) < n_new and not gen.is_done():
            gen.generate_next_token()
            out.append(int(gen.get_next_tokens()[0]))
            if first is None:
                first = time.perf_counter()
        return out, first, time.perf_counter()

    run(8, prompt[:6])  # warm-up
    out, first, end = run(NEW_TOKENS, prompt)
    H.emit({"decode_tok_s": (len(out) - 1) / (end - first), "prompt_tokens": len(prompt), "ids": out})
    return 0


WORKERS = {"ids": worker_ids, "xpack": worker_xpack, "genai": worker_genai}


# ------------------------------------------------------------------------------------------------
# driver


def write_config(export: Path, dest: Path) -> dict:
    """Copy the export to ``dest`` and write the genai_config.json genai needs for it."""
    cfg = json.loads((export / "config.json").read_text())
    dest.mkdir(parents=True, exist_ok=True)
    for f in export.iterdir():
        if f.is_file() and not (dest / f.name).exists():
            shutil.copy2(f, dest / f.name)
    genai = {
        "model": {
            "bos_token_id": cfg["bos_token_id"],
            "context_length": cfg["max_position_embeddings"],
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "intra_op_num_threads": 2, "provider_options": []},
                "filename": "model.onnx",
                "head_size": cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"],
                "hidden_size": cfg["hidden_size"],
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"},
                "num_attention_heads": cfg["num_attention_heads"],
                "num_hidden_layers": cfg["num_hidden_layers"],
                "num_key_value_heads": cfg["num_key_value_heads"],
            },
            "eos_token_id": cfg["eos_token_id"],
            "pad_token_id": cfg.get("pad_token_id", cfg["eos_token_id"]),
            "type": "llama",
            "vocab_size": cfg["vocab_size"],
        },
        "search": {
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
            "max_length": 1024, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
            "num_return_sequences": 1, "past_present_share_buffer": True, "repetition_penalty": 1.0,
            "temperature": 1.0, "top_k": 1, "top_p": 1.0,
        },
    }
    (dest / "genai_config.json").write_text(json.dumps(genai, indent=2) + "\n")
    return genai


def _call(python: Path, label: str, work: Path, *args) -> dict:
    """One worker under ``python`` in a fresh process: its figures plus the harness's load figures."""
    r = H.run_measured([str(python), str(Path(__file__).resolve()), "_worker", *map(str, args)], label, work)
    if r["returncode"] != 0 or "phases" not in r:
        raise SystemExit(f"worker failed ({' '.join(map(str, args))}):\n{r['stderr_tail']}")
    wall = max(r["wall_s"], 1e-9)
    return {**r["phases"], "own_cores": round((r["user_cpu_s"] + r["sys_cpu_s"]) / wall, 2),
            "other_cores": round(r["other_cpu_s"] / wall, 2), "loadavg1": r["loadavg_1min_before"]}


def summarize(runs: list[dict], variants: list[str], threads: list[int]) -> list[dict]:
    def graph(v: str) -> str:
        return "genai-builder" if v.endswith("-own") else "xpack"

    reference = {}  # (graph, threads) -> the first xpack-backend run's ids on that graph
    for r in runs:
        if r["variant"] in ("xpack", "xpack-own"):
            reference.setdefault((graph(r["variant"]), r["threads"]), r["ids"])
    summary = []
    for v in variants:
        for t in threads:
            rs = [r for r in runs if r["variant"] == v and r["threads"] == t]
            ref = reference.get((graph(v), t))
            agree = None if ref is None else [H.first_difference(r["ids"], ref) for r in rs]
            # paired: this variant's speed over the xpack backend's on the same graph, same repeat and threads
            base = "xpack-own" if graph(v) == "genai-builder" else "xpack"
            pairs = [r["decode_tok_s"] / b["decode_tok_s"] for r in rs for b in runs
                     if b["variant"] == base and b["threads"] == t and b["repeat"] == r["repeat"]]
            summary.append({
                "paired_vs_xpack_backend_same_graph": round(statistics.median(pairs), 3) if pairs else None,
                "variant": v, "threads": t, "median_tok_s": round(H.med(rs, "decode_tok_s"), 1),
                "runs": [round(r["decode_tok_s"], 1) for r in rs], "max_other_cores": max(r["other_cores"] for r in rs),
                "graph": graph(v), "ids_equal_to_xpack_prefix": agree,
            })
    return summary


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--export", default="/tmp/xg/d4")
    ap.add_argument("--genai-model", default="/tmp/genai-model")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-length", type=int, default=0, help="genai KV buffer length (0: prompt + new tokens, as xpack allocates)")
    ap.add_argument("--variants", nargs="+", default=["xpack", "genai-share", "genai-noshare"],
                    help="xpack, genai-share, genai-noshare, genai-share-1024, genai-own, xpack-own")
    ap.add_argument("--own-graph", default="/tmp/genai-own", help="onnxruntime-genai model builder output (-p int4 -e cpu)")
    ap.add_argument("--own-graph-x", default="/tmp/genai-own-x", help="the same with xpack's manifest.json/config.json beside it")
    ap.add_argument("--out", default=str(H.RESULTS / "genai_compare.json"))
    a = ap.parse_args(argv)

    config = write_config(Path(a.export), Path(a.genai_model))
    work = Path(tempfile.mkdtemp(prefix="xpack-genai-compare-"))
    prompt = _call(XPACK_PY, "ids", work, "ids", a.export)
    ids_file = work / "prompt-ids.json"
    ids_file.write_text(json.dumps(prompt["ids"]))

    def side(variant: str, t: int, label: str) -> dict:
        # xpack / genai-*: xpack's export; *-own: the graph onnxruntime-genai's model builder writes
        # (--own-graph, all int4 RTN; --own-graph-x is a copy with an xpack manifest so xpack loads it)
        if variant in ("xpack", "xpack-own"):
            return _call(XPACK_PY, label, work, "xpack", a.export if variant == "xpack" else a.own_graph_x, t)
        share = 0 if variant == "genai-noshare" else 1
        max_length = 1024 if variant.endswith("-1024") else a.max_length
        return _call(GENAI_PY, label, work, "genai", a.own_graph if variant == "genai-own" else a.genai_model, t, share, ids_file, max_length)

    runs = []
    try:
        for rep in range(a.repeats):
            for t in a.threads:
                order = a.variants if (rep + t) % 2 == 0 else list(reversed(a.variants))
                for v in order:
                    r = side(v, t, f"{v}-{t}-{rep}")
                    r.update(variant=v, threads=t, repeat=rep)
                    runs.append(r)
                    print(f"rep {rep} t={t} {v:16s} {r['decode_tok_s']:7.1f} tok/s  other_cores={r['other_cores']:.2f} load1={r['loadavg1']:.2f}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = summarize(runs, a.variants, a.threads)
    result = {
        "prompt": PROMPT, "prompt_ids": prompt["ids"], "new_tokens": NEW_TOKENS, "export": a.export,
        "cpus": os.cpu_count(), "genai_config": config, "summary": summary, "runs": runs,
    }
    for s in summary:
        print(f"{s['variant']:16s} t={s['threads']} median {s['median_tok_s']:7.1f} paired {s['paired_vs_xpack_backend_same_graph']} "
              f"runs {s['runs']} max_other_cores {s['max_other_cores']} agree {s['ids_equal_to_xpack_prefix']}")
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(H.main(main, WORKERS))
