"""A calibrated GGUF: llama.cpp's quantizer with xpack's importance matrix and a per-tensor type for each weight.

The job, between the raw (F32/F16/BF16) GGUF the writer streams out and the final file:

1. llama.cpp's plain file type (e.g. Q4_K_M) is quantized once: its size is the budget's yardstick and its
   per-tensor types the starting point (and a candidate for each tensor).
2. The torch reference reads the calibration text (stats.py): importance matrix + output Fisher.
3. For each quantizable tensor and each candidate type, the bytes and the predicted KL (plan.py), from the
   raw GGUF's own tensors, so names, row order and the trimmed embedding are llama.cpp's.
4. The knapsack picks the types (within ``target_bytes`` or the plain size + 5%; or the fewest bytes within
   ``max_kl``), and llama.cpp quantizes once more with the importance matrix and those types as overrides.
5. The KL of the plain and the mixed file against the torch reference is measured on the calibration text
   (llama.cpp vs transformers, teacher-forced). With ``max_kl``, the file size is bisected with the budget
   knapsack, starting at the size the prediction names, each probe measured (mix.py's ``smallest_meeting``).

Everything measured here is on the calibration text; ``xpack verify`` measures on its own evaluation text.
"""

from __future__ import annotations

from pathlib import Path

from xpack.packager.export.calibrate.mix import SEQ_LEN, SIZE_SLACK, Clock, MixRequest, Reference, in_parallel, say, smallest_meeting
from xpack.packager.export.calibrate.names import gguf_imatrix, gguf_stats
from xpack.packager.export.calibrate.plan import Candidate, TensorOptions, joint_kl, solve, tensor_options
from xpack.packager.export.calibrate.stats import collect_stats
from xpack.packager.export.gguf.writer import quantize
from xpack.packager.io.tensors import to_f32


def _header(path: Path) -> dict[str, tuple[str, int]]:
    import gguf

    return {t.name: (t.tensor_type.name, int(t.n_bytes)) for t in gguf.GGUFReader(str(path)).tensors}


def _weights(raw: Path, names: list[str]):
    """(name, float32 [rows, row length]) of the raw GGUF, one tensor at a time."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(str(raw))
    for t in reader.tensors:
        if t.name in names:
            kind = t.tensor_type.name
            data = np.asarray(t.data).view(np.uint16) if kind == "BF16" else np.asarray(t.data)
            yield t.name, np.ascontiguousarray(to_f32(data, kind)).reshape(int(t.shape[1]), int(t.shape[0]))


def calibrated_quantize(raw: Path, final: Path, model_dir: Path, base_quant: str, request: MixRequest, threads: int, work: Path) -> dict:
    """Quantize ``raw`` into ``final`` as the calibrated mix ``request`` asks for; ``work`` holds the plain file.
    Returns the report the manifest and card record."""
    clock = Clock()
    plain = Path(work) / f"plain-{base_quant}.gguf"
    say(f"llama.cpp's plain {base_quant} (the size yardstick)")
    quantize(raw, plain, base_quant, threads)
    clock.lap("plain_quantize_s")
    plain_types = _header(plain)
    plain_size = plain.stat().st_size

    say(f"statistics of the torch reference on the calibration text ({request.calibration.source})")
    stats = collect_stats(model_dir, request.calibration, max_tokens=request.stats_tokens, seq_len=SEQ_LEN, keep_logits_tokens=request.measure_tokens)
    per_tensor = gguf_stats(stats, model_dir)
    imatrix = gguf_imatrix(stats, model_dir)
    planned = [n for n in per_tensor if n in plain_types and plain_types[n][0] not in ("F32",)]
    clock.lap("stats_s")

    options: list[TensorOptions] = in_parallel(lambda item: tensor_options(item[0], item[1], plain_types[item[0]][0], per_tensor[item[0]], request.bits),
                                               _weights(raw, planned), len(planned), "predict KL per tensor and type", threads)
    fixed = plain_size - sum(plain_types[o.name][1] for o in options)
    budget_file = request.target_bytes if request.target_bytes else int(plain_size * SIZE_SLACK) if request.max_kl is None else None

    clock.lap("predict_s")
    reference = Reference(model_dir, request.calibration, request.measure_tokens, stats)
    clock.lap("reference_s")
    plain_kl = reference.kl_of_gguf(plain)
    clock.lap("measure_plain_s")
    rounds: list[dict] = []

    def build(choice: dict[str, Candidate]) -> dict:
        """Quantize ``choice`` into ``final`` and measure it: one round."""
        n = len(rounds) + 1
        types = _types(choice)
        # every planned tensor is named, also where the plain type is kept: llama.cpp's own choice for a tensor
        # depends on the others (e.g. Q4_K_M's use_more_bits counts the ffn_down tensors it has seen)
        quantize(raw, final, base_quant, threads, imatrix=imatrix, overrides=types)
        clock.lap(f"round{n}_quantize_s")
        measured = reference.kl_of_gguf(final)
        clock.lap(f"round{n}_measure_s")
        rounds.append({"round": n, "bytes": final.stat().st_size, "predicted_kl": joint_kl(choice), "measured_kl": measured["kl_mean"],
                       "changed_from_plain": sum(t != plain_types[name][0] for name, t in types.items())})
        say(f"round {n}: {final.stat().st_size / 1e6:.1f} MB, KL on the calibration text {measured['kl_mean']:.4f} "
             f"(predicted {joint_kl(choice):.4f}; plain {base_quant}: {plain_kl['kl_mean']:.4f}, {plain_size / 1e6:.1f} MB)")
        return {"choice": choice, "measured": measured, "bytes": final.stat().st_size}

    if budget_file is not None:
        result = build(solve(options, budget_bytes=budget_file - fixed))
    else:
        result = smallest_meeting(options, request.max_kl, fixed, build)
        if rounds[-1]["bytes"] != result["bytes"]:  # the last probe was not the one kept: write the kept one again
            quantize(raw, final, base_quant, threads, imatrix=imatrix, overrides=_types(result["choice"]))
    choice, measured = result["choice"], result["measured"]
    met = request.max_kl is None or measured["kl_mean"] <= request.max_kl
    report = _report(request, stats, base_quant, plain_size, plain_kl, final, measured, choice, options, plain_types, rounds, budget_file, met)
    report["timings"] = clock.laps
    return report


def _types(choice: dict[str, Candidate]) -> dict[str, str]:
    return {name: c.type for name, c in choice.items()}


def _report(request, stats, base_quant, plain_size, plain_kl, final, measured, choice: dict[str, Candidate], options, plain_types,
            rounds, budget_file, met) -> dict:
    plain_predicted = joint_kl({o.name: o.get(o.plain_type) for o in options if any(c.type == o.plain_type for c in o.candidates)})
    counts: dict[str, int] = {}
    for c in choice.values():
        counts[c.type] = counts.get(c.type, 0) + 1
    return {
        "method": "xpack calibrated mix: importance matrix + per-tensor types chosen by predicted KL (Fisher x imatrix x llama.cpp's own rounding error)",
        "bits": request.bits,
        "base_type": base_quant,
        "calibration": {"source": request.calibration.source, "sha256": stats.calibration_sha256, "tokens": stats.tokens,
                        "measure_tokens": measured["tokens"], "fisher_seed": stats.fisher_seed},
        "target": {"bytes": budget_file, "max_kl": request.max_kl, "met": met},
        "plain": {"type": base_quant, "bytes": plain_size, "kl_mean_calibration": plain_kl["kl_mean"], "top1_calibration": plain_kl["top1_agreement"],
                  "predicted_kl": plain_predicted},
        "mix": {"bytes": final.stat().st_size, "size_ratio": final.stat().st_size / plain_size, "kl_mean_calibration": measured["kl_mean"],
                "top1_calibration": measured["top1_agreement"], "predicted_kl": joint_kl(choice), "type_counts": counts},
        "rounds": rounds,
        "tensor_types": {name: c.type for name, c in sorted(choice.items())},
        "note": "KL here is measured on the calibration text; xpack verify measures on its own evaluation text",
    }


