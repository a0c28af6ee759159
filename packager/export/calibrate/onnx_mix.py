"""A calibrated ONNX decoder: each MatMul weight's width and block (onnxruntime's ``MatMulNBits``, 4 or 8 bits in
blocks of 16-128) chosen by predicted KL within a size, its scales searched with xpack's importance matrix.

The statistics and the planner are the calibrated GGUF's (stats.py, plan.py, mix.py); what is ONNX's own:

- The candidate types are (bits, block) pairs, named ``int4-32``, ``int8-64``, ... Their error is quantize.py's own
  rounding (the searched scales, weighted by the importance matrix as llama.cpp weighs its K-quants), bit for bit
  what the file will hold. onnxruntime's int8 kernel (``accuracy_level`` 4) also rounds the activations to 8 bits
  per block of the weight's block size: plan.py's activation term, with that block. (Measured on real Gemma 3
  270M: the fp32-activation kernel would halve the 8-bit KL, 0.0065 -> 0.0027, but decodes 10-40x slower in
  onnxruntime 1.32, so every node keeps level 4 and the smaller blocks buy the activation error down instead.)
- A tied embedding is read from the output head's packed weight (quantize.py), so the head's type is the
  embedding's too: the lookup term joins the head's prediction.
- xpack's graph (decoder_graph.py) packs q|k|v into one MatMul: its statistics are the three projections', joined
  along the output rows.
- The size yardstick is the GGUF of llama.cpp's plain type for ``--bits`` (Q4_K_M, Q8_0), sized by llama.cpp's
  dry run without writing it (gguf/writer.py ``plain_size``): ``--bits 4`` ends within Q4_K_M's size + 10%
  (ONNX_SIZE_SLACK says why not 5%). ``--target-size`` and ``--max-kl`` work as for GGUF.

The mix is measured on the calibration text (onnxruntime vs the torch reference, teacher-forced); ``xpack verify``
measures on its own evaluation text.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import TYPE_CHECKING

from xpack.errors import XpackError
from xpack.packager.export.calibrate.mix import SEQ_LEN, Clock, MixRequest, Reference, in_parallel, say, smallest_meeting
from xpack.packager.export.calibrate.plan import Candidate, QuantFormat, TensorOptions, joint_kl, solve, tensor_options
from xpack.packager.export.calibrate.stats import LayerStats, TensorStats, collect_stats
from xpack.packager.export.gguf.writer import plain_size
from xpack.packager.export.onnx.common import save_model
from xpack.packager.export.onnx.quantize import (
    DEFAULT_EIGHT_BIT_PATTERNS,
    EIGHT_BIT_BLOCK_SIZE,
    dequantize_weight,
    expand_patterns,
    quantize_matmuls,
    quantize_weight,
)
from xpack.packager.export.onnx.torch_check import ort_steps
from xpack.packager.io.checkpoint import Checkpoint
from xpack.paths import temp_dir
from xpack.runtimes.artifacts import ONNX_MODEL_FILE

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import onnx

# The GGUF type whose size a --bits N mix stays within (+ ONNX_SIZE_SLACK).
YARDSTICK = {4: "Q4_K_M", 8: "Q8_0"}
# 10%, where GGUF's mix takes 5%: MatMulNBits has only 4 and 8 bits (5.1 and 8.6 bits per weight in blocks of 32) where
# llama.cpp has 5- and 6-bit types, and on models whose rows are not a multiple of 256 (SmolLM2: 576) Q4_K_M falls back
# to Q5_0/Q8_0 (6.3 bits per weight); issue #11's ONNX target is 1.1x Q4_K_M's size.
ONNX_SIZE_SLACK = 1.10
# The (bits, block) pairs --bits N may give a weight: 4 bits in blocks of 32-128 and 8 bits for what matters at
# --bits 4; at --bits 8, 8 bits in blocks down to 16 (the activation rounding shrinks with the block) and 4 bits
# for what does not matter. Blocks of 16 at 4 bits decode ~30% slower (quantize.py) and are not offered.
CANDIDATES = {
    4: ("int4-32", "int4-64", "int4-128", "int8-32", "int8-64", "int8-128"),
    8: ("int4-32", "int8-16", "int8-32", "int8-64", "int8-128"),
}
# What each weight gets without calibration (precision.py's fixed schemes): the starting point the report compares with.
FIXED_8BIT_BLOCK = 16
_TYPE = re.compile(r"^int([48])-(\d+)$")
# xpack's decoder graph joins these projections into one MatMul weight (decoder_graph.py), in this order.
PACKED = {"self_attn.qkv_proj.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")}
HEAD = "lm_head.weight"


def parse_type(name: str) -> tuple[int, int]:
    m = _TYPE.match(name)
    if not m:
        raise XpackError(f"not an ONNX weight type: {name} (int4-32, int8-64, ...)")
    return int(m.group(1)), int(m.group(2))


def _error(weight: np.ndarray, qtype: str, imatrix: np.ndarray | None) -> np.ndarray:
    """dequant(quant(W)) - W for W [rows = outputs, cols = inputs], as quantize.py writes it."""
    bits, block = parse_type(qtype)
    packed, scales, zero_points = quantize_weight(weight.T, bits, block, importance=imatrix)
    return dequantize_weight(packed, scales, zero_points, bits, weight.shape[1]).T - weight


def type_bytes(qtype: str, rows: int, cols: int) -> int:
    """MatMulNBits' bytes for a [rows = N, cols = K] weight: codes, float32 scales, packed zero points per block."""
    bits, block = parse_type(qtype)
    k_blocks = -(-cols // block)
    return rows * k_blocks * (block * bits // 8 + 4) + rows * (-(-k_blocks * bits // 8))


ONNX_FORMAT = QuantFormat("onnx", CANDIDATES, _error, type_bytes, lambda qtype, cols: parse_type(qtype)[1] <= cols, lambda qtype: parse_type(qtype)[1],
                          activation_per_position=True)


# ---------------------------------------------------------------------------------------------
# the graph's weights and their statistics


def matmul_weights(model: onnx.ModelProto) -> dict[str, str]:
    """Weight initializer -> the name of the first MatMul reading it, for every MatMul with a 2-D float32 weight."""
    inits = {i.name: i for i in model.graph.initializer}
    out: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and len(node.input) == 2 and node.input[1] in inits:
            t = inits[node.input[1]]
            if len(t.dims) == 2 and t.data_type == 1:
                out.setdefault(node.input[1], node.name)
    return out


def onnx_stats(stats: LayerStats, weights: list[str], tied: bool) -> dict[str, TensorStats]:
    """``stats`` keyed by the graph's weight initializers (xpack's graph names them after the checkpoint's weights;
    packed q|k|v joins its projections' output statistics), the embedding's lookups joined to a tied head's."""
    import numpy as np

    out: dict[str, TensorStats] = {}
    for name in weights:
        suffix = next((s for s in PACKED if name.endswith(s)), None)
        parts = [name[: -len(suffix)] + p for p in PACKED[suffix]] if suffix else [name]
        missing = [p for p in parts if p not in stats.tensors]
        if missing:
            raise XpackError(f"no calibration statistics for the ONNX weight {name} (missing {', '.join(missing)}); "
                             "calibrated ONNX needs xpack's decoder graph (drop --graph optimum)")
        got = [stats.tensors[p] for p in parts]
        first = got[0]

        def joined(field: str, axis: int):
            values = [getattr(s, field) for s in got]
            return None if any(v is None for v in values) else np.concatenate(values, axis=axis)

        out[name] = TensorStats(first.in_sq_mean, joined("out_fisher", 0), first.count, first.in_block_amax_sq,
                                in_sample=first.in_sample, out_sample=joined("out_sample", 1))
    if tied and stats.embedding is not None and HEAD in out:
        head, lookup = out[HEAD], stats.embedding[1]
        out[HEAD] = TensorStats(head.in_sq_mean, head.out_fisher, head.count, head.in_block_amax_sq, lookup.lookup_use, lookup.lookup_fisher,
                                head.in_sample, head.out_sample)
    return out


def fixed_types(weights: dict[str, str], bits: int) -> dict[str, str]:
    """The type each weight gets from precision.py's fixed scheme at ``bits`` (what calibration starts from)."""
    layers = max((int(m.group(1)) for n in weights.values() if (m := re.search(r"/layers\.(\d+)/", n))), default=-1) + 1
    eight = expand_patterns(DEFAULT_EIGHT_BIT_PATTERNS, layers)
    if bits == 8:
        return {w: f"int8-{FIXED_8BIT_BLOCK}" for w in weights}
    return {w: f"int8-{EIGHT_BIT_BLOCK_SIZE}" if any(p.search(node) for p in eight) else "int4-32" for w, node in weights.items()}


# ---------------------------------------------------------------------------------------------
# the job


def calibrated_matmuls(model: onnx.ModelProto, src: Path, request: MixRequest, threads: int, share_embedding: bool) -> tuple[onnx.ModelProto, dict]:
    """The float32 decoder ``model`` (xpack's graph of the checkpoint ``src``) quantized as the calibrated mix
    ``request`` asks for; returns the quantized model and the report the manifest and card record."""
    import numpy as np
    from onnx import numpy_helper

    clock = Clock()
    yard = None
    if request.target_bytes is None:
        if importlib.util.find_spec("llama_cpp") is None:
            raise XpackError("the calibrated ONNX mix is sized against llama.cpp's plain type, which needs llama-cpp-python: "
                             "pip install 'xpack[llama]', or give --target-size")
        say(f"the size of llama.cpp's plain {YARDSTICK[request.bits]} GGUF of this model (the yardstick; dry run)")
        yard = plain_size(src, YARDSTICK[request.bits], threads)
        clock.lap("yardstick_s")
    say(f"statistics of the torch reference on the calibration text ({request.calibration.source})")
    stats = collect_stats(src, request.calibration, max_tokens=request.stats_tokens, seq_len=SEQ_LEN, keep_logits_tokens=request.measure_tokens)
    clock.lap("stats_s")

    weights = matmul_weights(model)
    inits = {i.name: i for i in model.graph.initializer}
    tied = share_embedding and _tied_table(model, inits) is not None
    per_tensor = onnx_stats(stats, list(weights), tied)
    plain = fixed_types(weights, request.bits)
    def predict(name: str) -> TensorOptions:
        w = np.ascontiguousarray(numpy_helper.to_array(inits[name]).T)  # [N, K]: rows are outputs, as plan.py reads them
        o = tensor_options(name, w, plain[name], per_tensor[name], request.bits, fmt=ONNX_FORMAT)
        if name == HEAD and tied:  # a 4-bit head's zero points are stored again, unpacked, for the embedding's lookup
            o.candidates = [_with_gather_copy(c, w.shape) for c in o.candidates]
        return o

    options: list[TensorOptions] = in_parallel(predict, weights, len(weights), "predict KL per weight and type", threads)
    clock.lap("predict_s")

    table = _tied_table(model, inits) if tied else None
    fixed = sum(_init_bytes(i) for i in model.graph.initializer if i.name not in weights and i.name != table and not _is_table(model, i))
    fixed += sum(type_bytes("int4-32", *i.dims) for i in model.graph.initializer if i.name != table and _is_table(model, i))  # precision.py: 4-bit lookups
    budget = request.target_bytes or (int(yard["bytes"] * ONNX_SIZE_SLACK) if request.max_kl is None else None)
    reference = Reference(src, request.calibration, request.measure_tokens, stats)
    window = Checkpoint(src).config.get("sliding_window")
    clock.lap("reference_s")
    rounds: list[dict] = []
    imatrix = {name: s.in_sq_mean for name, s in per_tensor.items()}

    def probe(names: list[str], qtype: str) -> float:
        """The measured KL with only ``names`` quantized to ``qtype`` (every other MatMul left in float)."""
        others = [weights[n] for n in weights if n not in names]
        quantized, _ = quantize_matmuls(_copy(model), request.bits, plan={n: parse_type(qtype) for n in names}, importance=imatrix,
                                        exclude=others, share_embedding=share_embedding and HEAD in names)
        return _measure(quantized, reference, threads, window)[1]["kl_mean"]

    say("measuring each kind of weight at its smallest type (the predictions' correction)")
    corrections = correct_by_kind(options, probe)
    clock.lap("probes_s")

    def build(choice: dict[str, Candidate]) -> dict:
        n = len(rounds) + 1
        plan = {name: parse_type(c.type) for name, c in choice.items()}
        quantized, info = quantize_matmuls(_copy(model), request.bits, plan=plan, importance=imatrix, share_embedding=share_embedding)
        clock.lap(f"round{n}_quantize_s")
        nbytes, measured = _measure(quantized, reference, threads, window)
        clock.lap(f"round{n}_measure_s")
        rounds.append({"round": n, "bytes": nbytes, "predicted_kl": joint_kl(choice), "measured_kl": measured["kl_mean"],
                       "changed_from_fixed": sum(c.type != plain[name] for name, c in choice.items())})
        say(f"round {n}: {nbytes / 1e6:.1f} MB, KL on the calibration text {measured['kl_mean']:.4f} (predicted {joint_kl(choice):.4f})"
            + (f"; llama.cpp's plain {yard['quant']}: {yard['bytes'] / 1e6:.1f} MB" if yard else ""))
        return {"choice": choice, "measured": measured, "bytes": nbytes, "model": quantized, "info": info}

    smallest = sum(min(c.bytes for c in o.candidates) for o in options)
    if budget is not None:
        if budget - fixed < smallest and request.target_bytes:
            raise XpackError(f"--target-size {budget / 1e6:.2f} MB is below the smallest mix ({(smallest + fixed) / 1e6:.2f} MB: the rest of the graph, "
                             f"rotary tables and norms, takes {fixed / 1e6:.2f} MB); give a larger --target-size")
        # a model so small that ONNX's own tables outweigh the GGUF's budget (a test twin) gets the smallest mix, reported as missed
        result = build(solve(options, budget_bytes=max(budget - fixed, smallest)))
    else:
        result = smallest_meeting(options, request.max_kl, fixed, build)
    met = result["bytes"] <= budget if budget is not None else result["measured"]["kl_mean"] <= request.max_kl
    report = _report(request, stats, yard, result, options, plain, rounds, budget, met)
    report["corrections"] = corrections
    report["timings"] = clock.laps
    model = result["model"]
    del result["model"]
    return model, {**result["info"], "calibration": report}


# The kinds of weight a correction is measured for: the part of the name after the layer number (xpack's graph).
_KIND = re.compile(r"^(?:.*\.layers\.\d+\.)?(.+)$")
CORRECTION_RANGE = (0.5, 20.0)


def weight_kind(name: str) -> str:
    """``model.layers.7.self_attn.qkv_proj.weight`` -> ``self_attn.qkv_proj.weight``; ``lm_head.weight`` stays."""
    return _KIND.match(name).group(1)


def correct_by_kind(options: list[TensorOptions], probe) -> dict[str, dict]:
    """Scale the predictions of each kind of weight by what one measurement says of them, in place.

    The layer-local prediction is second order in each layer's output; measured on SmolLM2 + its adapter (a base
    dequantized from a Q4_1 GGUF) it is within 20% for 8 bits but 1.8-3x low for 4 bits on q|k|v and down_proj,
    where rounding back towards the base's grid erases the adapter, which is then no longer a small change. So each
    kind (q|k|v, o, gate, up, down, the head) is quantized alone at its smallest candidate and measured against the
    torch reference: measured / predicted (joint, clipped to CORRECTION_RANGE) scales the KL of that kind's candidates
    of the same width (their per-position changes by its square root). One measured probe per kind, not per tensor:
    a handful of passes whatever the model's depth. ``probe(names, type)`` -> measured mean KL."""
    import dataclasses
    import math

    kinds: dict[str, list[TensorOptions]] = {}
    for o in options:
        kinds.setdefault(weight_kind(o.name), []).append(o)
    report = {}
    for kind, group in kinds.items():
        smallest = min(group[0].candidates, key=lambda c: c.bytes).type
        if not all(any(c.type == smallest for c in o.candidates) for o in group):
            continue
        predicted = joint_kl({o.name: o.get(smallest) for o in group})
        measured = probe([o.name for o in group], smallest)
        factor = min(max(measured / predicted, CORRECTION_RANGE[0]), CORRECTION_RANGE[1]) if predicted > 0 else 1.0
        bits = parse_type(smallest)[0]
        for o in group:
            o.candidates = [dataclasses.replace(c, kl=c.kl * factor, dots=None if c.dots is None else c.dots * math.sqrt(factor))
                            if parse_type(c.type)[0] == bits else c for c in o.candidates]
        report[kind] = {"type": smallest, "tensors": len(group), "predicted_kl": predicted, "measured_kl": measured, "factor": factor}
        say(f"  {kind} x{len(group)} at {smallest}: predicted {predicted:.4f}, measured {measured:.4f} (x{factor:.2f})")
    return report


def _tied_table(model: onnx.ModelProto, inits: dict) -> str | None:
    """The embedding table a Gather reads when it is the output head's weight transposed (a tied embedding)."""
    import numpy as np
    from onnx import numpy_helper

    head = inits.get(HEAD)
    if head is None:
        return None
    for node in model.graph.node:
        if node.op_type == "Gather" and node.input[0] in inits and list(inits[node.input[0]].dims) == list(head.dims)[::-1]:
            if np.array_equal(numpy_helper.to_array(inits[node.input[0]]), numpy_helper.to_array(head).T):
                return node.input[0]
    return None


def _is_table(model: onnx.ModelProto, t) -> bool:
    """Whether an initializer is an embedding table (read by a Gather on axis 0)."""
    return len(t.dims) == 2 and any(n.op_type == "Gather" and n.input[0] == t.name and not any(a.name == "axis" and a.i for a in n.attribute)
                                    for n in model.graph.node)


def _with_gather_copy(c: Candidate, shape: tuple[int, int]) -> Candidate:
    import dataclasses

    bits, block = parse_type(c.type)
    return dataclasses.replace(c, bytes=c.bytes + (shape[0] * -(-shape[1] // block) if bits == 4 else 0))


def _init_bytes(t) -> int:
    import numpy as np
    from onnx import helper

    return int(np.prod(t.dims)) * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize if t.dims else 8


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnx

    fresh = onnx.ModelProto()
    fresh.CopyFrom(model)
    return fresh


def _measure(model: onnx.ModelProto, reference: Reference, threads: int, window: int | None) -> tuple[int, dict]:
    """The file size of ``model`` and its KL on the calibration text (onnxruntime prefill logits vs torch)."""
    import onnx

    with temp_dir("onnx-mix") as work:
        save_model(model, Path(work))
        nbytes = sum(p.stat().st_size for p in Path(work).iterdir())
        path = Path(work) / ONNX_MODEL_FILE

        def logits(ids: list[int]):
            return ort_steps(path, [*ids, ids[-1]], threads, None, window)[0]["logits"]

        measured = reference.kl(logits)
        onnx.load_external_data_for_model(model, work)  # saving moved the weights out of the proto: back in, before the folder goes
        return nbytes, measured


def _report(request, stats, yard, result, options, plain, rounds, budget, met) -> dict:
    choice, measured = result["choice"], result["measured"]
    counts: dict[str, int] = {}
    for c in choice.values():
        counts[c.type] = counts.get(c.type, 0) + 1
    fixed_predicted = joint_kl({o.name: o.get(plain[o.name]) for o in options if any(c.type == plain[o.name] for c in o.candidates)})
    return {
        "method": "xpack calibrated mix: MatMulNBits width and block per weight chosen by predicted KL (Fisher x inputs x xpack's own "
                  "rounding error, activation rounding included), scales searched with the importance matrix",
        "bits": request.bits,
        "calibration": {"source": request.calibration.source, "sha256": stats.calibration_sha256, "tokens": stats.tokens,
                        "measure_tokens": measured["tokens"], "fisher_seed": stats.fisher_seed},
        "target": {"bytes": budget, "max_kl": request.max_kl, "met": met},
        "yardstick": {"type": yard["quant"], "bytes": yard["bytes"], "how": "llama.cpp's quantizer, dry run"} if yard else None,
        "fixed": {"predicted_kl": fixed_predicted, "what": "precision.py's fixed scheme at these bits"},
        "mix": {"bytes": result["bytes"], "size_ratio": result["bytes"] / yard["bytes"] if yard else None, "kl_mean_calibration": measured["kl_mean"],
                "top1_calibration": measured["top1_agreement"], "predicted_kl": joint_kl(choice), "type_counts": counts},
        "rounds": rounds,
        "tensor_types": {name: c.type for name, c in sorted(choice.items())},
        "note": "KL here is measured on the calibration text; xpack verify measures on its own evaluation text",
    }
