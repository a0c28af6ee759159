"""The float32 decoder graph a decoder export starts from, before --bits: xpack's own graph with
onnxruntime's fused operators (decoder_graph.py, ``--graph xpack``) or optimum-onnx's traced export
(``--graph optimum``: ``onnx_export_from_model``, task ``text-generation-with-past``: one graph taking
``past_key_values.*`` and returning ``logits`` and ``present.*``). Both have the same inputs and outputs."""

from __future__ import annotations

from pathlib import Path

from xpack.errors import XpackError
from xpack.packager.export.onnx.common import first_line, save_model
from xpack.packager.export.onnx.decoder_graph import build_decoder, build_embedding
from xpack.runtimes.artifacts import EMBED_DATA_FILE, EMBED_FILE

TASK = "text-generation-with-past"


def xpack_graph(src: Path, raw: Path, inputs_embeds: bool) -> dict:
    """Write xpack's fused decoder graph (and, for a vision model, the embedding graph) into ``raw``; returns the graph's facts."""
    raw.mkdir()
    model, facts = build_decoder(src, inputs_embeds=inputs_embeds)
    save_model(model, raw)
    del model
    if inputs_embeds:
        save_model(build_embedding(src), raw, EMBED_FILE, EMBED_DATA_FILE)
    return facts


def optimum_graph(model, out: Path, opset: int | None) -> float:
    """optimum's export of the loaded transformers ``model`` into ``out``; returns optimum's own atol for it."""
    from optimum.exporters.onnx import onnx_export_from_model
    from optimum.exporters.tasks import TasksManager

    constructor = TasksManager.get_exporter_config_constructor(exporter="onnx", model=model, task=TASK, library_name="transformers")
    atol = constructor(model.config, task=TASK).ATOL_FOR_VALIDATION
    try:
        onnx_export_from_model(model, output=out, task=TASK, opset=opset, do_validation=False, preprocessors=[])
    except (ValueError, KeyError, RuntimeError) as exc:
        raise XpackError(f"optimum could not export {model.config.model_type} to ONNX ({first_line(exc)}); supported: llama, gemma2, gemma3") from None
    return float(atol if not isinstance(atol, dict) else atol.get("text-generation", 1e-5))
