"""Whether a job fits in this machine's memory, said in one line before any work instead of an out-of-memory kill
halfway through (issue #12). The sizes come from the checkpoint's safetensors headers (exact parameter counts), times
what each job was measured to hold:

- ONNX export, optimum's graph or the calibrated mix (the whole model in memory): ONNX_EXPORT_FACTOR x the weights in
  float32. Measured on real Gemma 3 270M (1.07 GB of float32 weights): 6.3-6.6 GB peak RSS for --bits 32, 16, 8 and 4;
  the torch check, the graph proto and the quantizer each hold a copy.
- ONNX export, xpack's streamed graph (packager/export/onnx/pending.py): the largest of its three phases, see
  :func:`streamed_onnx_need`.
- verify on a CPU profile: the torch reference in float32 + REFERENCE_OVERHEAD_GB (activations and the logits over the
  evaluation text, the runtimes themselves; the artifact runs after the reference is let go). When that exceeds what
  is available, or ``--reference-memory``, the reference streams its layers from disk within the budget
  (runtimes/torch_offload.py) instead of being refused.
Merge and GGUF export stream one tensor at a time and are not checked.
"""

from __future__ import annotations

import re
from pathlib import Path

from xpack.errors import XpackError
from xpack.packager.io.checkpoint import Checkpoint
from xpack.profiles.cgroup_memory import cgroup_memory

ONNX_EXPORT_FACTOR = 6.2
# the streamed ONNX export (streamed_onnx_need), measured on the synthetic Gemma 3 4B at --bits 4 (peak RSS 7.5 GB:
# torch check 5.1 GB with its 2.7 GB float32 embedding resident, quantizing <= 5.1 GB; the vision tower, then traced by
# torch.onnx, 7.5 GB for its 1.67 GB of float32 weights, and 2.45 GB since xpack writes its graph, vision_graph.py):
# bytes of the artifact per parameter at each --bits (4: the mixed 4/8-bit scheme, 0.84 measured), what onnxruntime
# holds per byte of artifact while running it, the largest weight's float32 copies while it is quantized, the vision
# export's multiple of its float32 weights (the tower in torch for the check), and the process itself
ARTIFACT_BYTES_PER_PARAMETER = {32: 4.0, 16: 2.0, 8: 1.1, 4: 0.85}
# fp16 on onnxruntime's CPU provider with graph optimizations on: the fp16 weights plus the float32 copy the optimizer
# folds from each weight's Cast (a check below FP32_CHECK_BYTES; above it, _large_phases)
ORT_LOAD_FACTOR = {32: 1.3, 16: 2.5, 8: 1.3, 4: 1.3}
# above this many bytes of float32 weights the streamed export writes no float32 graph and checks the artifact from its
# mapped files (pipeline.py's _Job.large), with one weight in float32 at a time (an fp16 artifact's weights cast as
# their nodes run: onnx_base.session_options' cast_per_node): _large_phases. Its estimate against the private peaks
# measured inside memory cgroups (benchmarks/scale.py --box-gb; GB = 1e9 bytes; tests/test_synthetic.py checks it):
# Gemma 3 4B int4 3.62 / 3.95 (largest weight 2.68 in float32), fp16 3.49 / 3.87; Gemma 2 2B int4 3.28 / 3.44, fp16
# 3.16 / 3.46; Llama 3.2 11B Vision int4 3.99 / 5.54, fp16 3.99 / 8.19 (largest 2.10; its vision graph's attention, run
# by the check over 4 tiles, holds more, which this leaves out)
FP32_CHECK_BYTES = 2 * 10**9
LARGE_QUANTIZE_FACTOR = 1.05
MAPPED_CHECK_FACTOR = 1.0
# bytes per parameter of a tensor as the checkpoint stores it (safetensors dtype), for the tables a large reference keeps
STORED_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8}
QUANTIZE_FACTOR = 1.5
VISION_EXPORT_FACTOR = 1.2
PROCESS_BASE_GB = 0.8
# verify's reference beyond its weights budget: the process and libraries, the activations and logits over the
# evaluation text, the safetensors pages mapped while it loads. Measured on the synthetic Gemma 3 4B with
# --reference-memory 8 and 1.0 here (7 GB of weights): peak RSS 7.95 GB while loading, 7.6 GB running
REFERENCE_OVERHEAD_GB = 1.5


def float32_bytes(ckpt: Checkpoint) -> int:
    """The checkpoint's weights in float32: 4 bytes per parameter, whatever they are stored in."""
    total = 0
    for spec in ckpt.specs.values():
        n = 4
        for d in spec.shape:
            n *= d
        total += n
    return total


def available_bytes() -> int:
    """Memory this machine can give a new job now: psutil's ``available`` (free + reclaimable cache), or less where
    this process's memory cgroup (a container's limit) leaves less (profiles/cgroup_memory.py)."""
    import psutil

    have = int(psutil.virtual_memory().available)
    box = cgroup_memory()
    return min(have, box.available) if box else have


def require_memory(need: int, what: str, fix: str) -> None:
    """One line and no work when ``need`` bytes exceed what is available."""
    have = available_bytes()
    if need > have:
        box = cgroup_memory()
        where = (f"this container (memory cgroup limit {box.limit / 1e9:.1f} GB) has" if box and box.available <= have else "this machine has")
        raise XpackError(f"{what} needs about {need / 1e9:.1f} GB of memory and {where} {have / 1e9:.1f} GB available; {fix}")


def _count(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def streamed_onnx_need(ckpt: Checkpoint, bits: int, vision_prefixes: tuple[str, ...] = ()) -> int:
    """Bytes the streamed ONNX export holds at its peak, the largest of its phases:
    - the torch check with its layers streamed: everything outside the repeated layers plus one layer, in float32;
    - quantizing or converting the largest weight: QUANTIZE_FACTOR x it in float32;
    - onnxruntime running the artifact for its check: the artifact (ARTIFACT_BYTES_PER_PARAMETER) times ORT_LOAD_FACTOR[bits];
    - a vision tower (tensors under ``vision_prefixes``): its float32 weights in torch for the check (the graph is
      written weight by weight and checked after the torch model is freed), VISION_EXPORT_FACTOR x them.
      Llama 3.2 Vision passes none: its tower's layers stream in the torch check like the decoder's (mllama.py).
    Above FP32_CHECK_BYTES of float32 weights (pipeline.py's ``_Job.large``) see :func:`_large_phases`.
    Plus PROCESS_BASE_GB for the interpreter and the libraries."""
    layers: dict[str, int] = {}
    rest = largest = vision = rest_stored = 0
    for name, spec in ckpt.specs.items():
        n = _count(spec.shape)
        largest = max(largest, n)
        if any(p in name for p in vision_prefixes):
            vision += n
            continue
        m = re.search(r"\.layers\.(\d+)\.", name)
        if m:
            key = name[:m.end()]
            layers[key] = layers.get(key, 0) + n
        else:
            rest += n
            rest_stored += n * STORED_BYTES.get(getattr(spec, "dtype", "F32"), 4)
    params = rest + sum(layers.values())
    layer = 4 * max(layers.values(), default=0)
    if 4 * (params + vision) > FP32_CHECK_BYTES:
        phases = _large_phases(rest_stored, layer, 4 * largest, bits)
    else:
        phases = (4 * rest + layer, QUANTIZE_FACTOR * 4 * largest, ORT_LOAD_FACTOR[bits] * ARTIFACT_BYTES_PER_PARAMETER[bits] * params)
    return int(max(*phases, VISION_EXPORT_FACTOR * 4 * vision) + PROCESS_BASE_GB * 1e9)


def _large_phases(rest_stored: int, layer: int, largest: int, bits: int) -> tuple[float, ...]:
    """A large export's phases (bytes; ``layer`` and ``largest`` in float32). The reference streams its layers and
    keeps the tables outside them as stored (runtimes/torch_offload.py ``with_stored_tables``: 16-bit), so its part is
    those as stored plus one layer in float32; the tables are quantized or converted a chunk of rows at a time, and the
    one weight made whole is the largest (a tied head transposed), LARGE_QUANTIZE_FACTOR x it; the artifact is checked
    from its mapped files, where onnxruntime holds one weight in float32 at a time (MatMulNBits dequantizing the head,
    or an fp16 weight cast as its node runs: onnx_base.session_options' ``prepack`` and ``cast_per_node``),
    MAPPED_CHECK_FACTOR x the largest. Calibrated on the synthetic seed models' measured private peaks (the comment
    above FP32_CHECK_BYTES): the estimate stays at or below each of them, so a refusal is for a job that cannot fit."""
    made_whole = LARGE_QUANTIZE_FACTOR if bits in (8, 4) else 1.0  # fp16 and float32 write it as they read it
    return rest_stored + layer, made_whole * largest, MAPPED_CHECK_FACTOR * largest


def check_onnx_export(ckpt: Checkpoint, arch_name: str, bits: int = 32, streamed: bool = False, vision_prefixes: tuple[str, ...] = (),
                      gguf_supported: bool = True) -> None:
    """``gguf_supported``: whether the refusal may point at GGUF (llama.cpp cannot run every architecture)."""
    weights = float32_bytes(ckpt)
    need = streamed_onnx_need(ckpt, bits, vision_prefixes) if streamed else int(ONNX_EXPORT_FACTOR * weights)
    instead = ("export GGUF (it streams one tensor at a time), or use a machine with more memory" if gguf_supported else
               "use a machine with more memory, or run the merged checkpoint with the torch runtime (its layers stream from disk within "
               "the profile's memory; llama.cpp has no GGUF for this architecture)")
    require_memory(need, f"exporting {arch_name} ({weights / 4e9:.1f}B parameters) to ONNX at --bits {bits}", instead)


def reference_budget(reference: Path, cap_gb: float | None = None) -> int | None:
    """verify on a CPU profile: the bytes of float32 weights the torch reference may hold, or None when the whole model
    fits (what is available, less REFERENCE_OVERHEAD_GB, capped at ``cap_gb``). A budget makes it stream its layers."""
    weights = float32_bytes(Checkpoint(Path(reference)))
    budget = available_bytes() - int(REFERENCE_OVERHEAD_GB * 1e9)
    if cap_gb is not None:
        budget = min(budget, int(cap_gb * 1e9) - int(REFERENCE_OVERHEAD_GB * 1e9))
    return None if weights <= budget else max(budget, 0)
