"""`xpack export`: parse, call packager/export/, print."""

from __future__ import annotations

from pathlib import Path

import click

from xpack.cli.params import ModelRef, Size, adapter_option, emit, qlora_options
from xpack.packager.export.job import Calibration
from xpack.packager.export.job import export as do_export


@click.command()
@click.option("--model", required=True, type=ModelRef(), help="Hugging Face checkpoint to export (e.g. the output of xpack merge), folder or hub id.")
@adapter_option("LoRA adapter to merge on the fly (GGUF: in the same streaming pass; ONNX: into a temporary checkpoint). Repeatable, PATH[:WEIGHT].")
@qlora_options()
@click.option("--format", "fmt", required=True, type=click.Choice(["gguf", "onnx"]), help="gguf for llama.cpp/ollama, onnx for onnxruntime.")
@click.option(
    "--bits",
    type=click.Choice(["32", "16", "8", "6", "5", "4"]),
    help="GGUF: 16=F16, 6=Q6_K, 5=Q5_K_M; 8 and 4: xpack's calibrated mix within the size of Q8_0 / Q4_K_M + 5% "
         "(importance matrix + a type per tensor chosen by measured sensitivity). ONNX: 32=fp32, 16=fp16; 8 and 4: int8/int4 "
         "weight-only blocks, calibrated the same way within the size of the Q8_0 / Q4_K_M GGUF + 5%.",
)
@click.option("--quant", help="Any llama.cpp quant type instead of --bits, as llama.cpp makes it (Q4_K_M, Q8_0, Q4_0, IQ4_XS, BF16, F32, ...).")
@click.option("--calibrate/--no-calibrate", "calibrate", default=None,
              help="--bits 4/8: xpack's calibrated mix (the default) or the fixed scheme (GGUF: llama.cpp's plain Q4_K_M / Q8_0; "
                   "ONNX: 8 bits for the head, attention and some MLPs). ONNX vision models get the fixed scheme.")
@click.option("--calibration", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="--bits 4/8: text the torch reference reads to measure sensitivity: plain text or chat JSONL (e.g. the adapter's "
                   "training data).  [default: a built-in medical text, disjoint from verify's evaluation text]")
@click.option("--target-size", type=Size(), help="--bits 4/8: the lowest KL within this file size (e.g. 250MB) instead of the plain type's + 5%.")
@click.option("--max-kl", type=click.FloatRange(min=0, min_open=True),
              help="--bits 4/8: the smallest file whose mean KL on the calibration text is at most this (e.g. 0.1, the 4-bit verdict).")
@click.option("--block-size", type=click.IntRange(min=16), help="ONNX 8/4 bits: weights per quantization block (a power of two).  [default: 16 for 8 bits, 32 for 4 bits]")
@click.option("--keep-lm-head", is_flag=True, help="ONNX 8/4 bits: keep the output head and token embedding in float.")
@click.option(
    "--graph", type=click.Choice(["xpack", "optimum"]), default="xpack", show_default=True,
    help="ONNX: xpack's decoder graph with onnxruntime's fused attention, or optimum-onnx's traced export.",
)
@click.option(
    "--int4", type=click.Choice(["mixed", "plain"]), default="mixed", show_default=True,
    help="ONNX 4 bits: 8 bits for the head, attention and some MLPs as Q4_K_M does (quality), or every weight 4-bit (smallest, fastest).",
)
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder to write the artifact to.")
@click.option("--name", help="GGUF file name stem (default: the model folder's name); ONNX files are model.onnx + model.onnx_data.")
@click.option("--threads", type=click.IntRange(min=0), default=0, help="Quantizer threads (0: all cores).")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option("--allow-pickle", is_flag=True, help="Accept a pickle adapter_model.bin (only for trusted files).")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON instead of a summary.")
def export(model, adapters, qlora_base, double_quant, blocksize, fmt, bits, quant, calibrate, calibration, target_size, max_kl, block_size, keep_lm_head,
           graph, int4, out, name, threads, force, allow_pickle, as_json):
    """Export a checkpoint to quantized artifacts with a model card and a manifest.

    GGUF: the text model (and, for Gemma 3 with vision, an mmproj file for the image encoder) is
    written with gguf-py and quantized by llama.cpp's own quantizer; an ollama Modelfile is written
    beside it.

    ONNX: the decoder with its KV cache, written by xpack around onnxruntime's fused attention
    (or traced by optimum-onnx with --graph optimum) and checked against torch; Gemma 3 with
    vision adds the vision tower and the token embedding as graphs of their own. 8 and 4 bits are
    onnxruntime's weight-only block quantization (MatMulNBits), the output head included unless
    --keep-lm-head; a tied embedding reads the head's packed weight.

    \b
    Calibrated GGUF (--bits 4 or 8): the merged model reads a calibration text in torch; each tensor's
    type is chosen from its predicted KL (output Fisher x importance matrix x llama.cpp's own rounding
    error) within the size of the plain type + 5% (--target-size, --max-kl), and llama.cpp quantizes with
    xpack's importance matrix. Calibrated ONNX (--bits 4 or 8, text models): the same statistics choose
    each MatMul's width and block (int4/int8, blocks of 16-128) within the size of llama.cpp's plain
    type + 10% (sized by its dry run; MatMulNBits has only 4 and 8 bits), with scales searched under the
    importance matrix. The KL on the calibration text is printed and kept in the manifest; `xpack verify`
    measures on its own evaluation text.

    \b
    Example:
      xpack export --model ./gemma3-xray --format gguf --bits 4 --out ./gemma3-xray-gguf
      xpack export --model ./gemma3-xray --format gguf --bits 4 --max-kl 0.1 --calibration train.jsonl --out ./g3-kl01
      xpack export --model ./gemma3-xray --format gguf --quant Q4_K_M --out ./gemma3-xray-plain
      xpack export --model google/gemma-2-2b --adapter ./symptom-lora --format gguf --quant Q5_K_M --out ./g2
      xpack export --model ./gemma3-xray --format onnx --bits 4 --out ./gemma3-xray-onnx
    """
    if fmt == "gguf" and bits is None and quant is None:
        raise click.UsageError("give --bits (16, 8, 6, 5, 4) or --quant TYPE")
    if fmt == "onnx" and bits is None:
        raise click.UsageError("give --bits (32, 16, 8 or 4) for an ONNX export")
    if bits is not None and quant is not None:
        raise click.UsageError("give either --bits or --quant, not both")

    manifest = do_export(
        model, fmt, out, bits=int(bits) if bits else None, quant=quant, adapters=list(adapters), force=force,
        name=name, threads=threads, allow_pickle=allow_pickle, block_size=block_size, keep_lm_head=keep_lm_head, graph=graph, int4=int4,
        qlora_base=qlora_base, double_quant=double_quant, qlora_blocksize=blocksize,
        calibration=Calibration(calibration, target_size, max_kl, calibrate),
    )
    cal = manifest.get("calibration")
    kind = manifest["quant"]
    if cal:
        kind = f"xpack's calibrated {cal['bits']}-bit mix (llama.cpp file type {manifest['quant']})" if fmt == "gguf" else f"{manifest['quant']} (xpack's calibrated mix)"
    lines = [f"exported {manifest['source']['ref']} to {fmt.upper()} {kind} in {out}"]
    for fname, info in manifest["artifacts"].items():
        size = manifest["files"][fname]["bytes"] + (manifest["files"][info["data_file"]]["bytes"] if info.get("data_file") else 0)
        fb = f"; fallbacks {info['fallbacks']}" if info.get("fallbacks") else ""
        types = f", {info['tensor_types']}" if info.get("tensor_types") else ""
        lines.append(f"  {fname}  ({info['role']}, {size / 1e6:.1f} MB{types}{fb})")
    if cal:
        if cal.get("plain"):  # GGUF: llama.cpp's plain type was made and measured too
            versus = f"; llama.cpp's plain {cal['plain']['type']} {cal['plain']['kl_mean_calibration']:.4f} at {cal['plain']['bytes'] / 1e6:.1f} MB"
        elif cal.get("yardstick"):
            versus = f" ({cal['mix']['size_ratio']:.2f}x the size of llama.cpp's {cal['yardstick']['type']} GGUF)"
        else:
            versus = ""
        lines.append(f"  calibrated on {cal['calibration']['source']} ({cal['calibration']['tokens']} tokens): mean KL on it "
                     f"{cal['mix']['kl_mean_calibration']:.4f} at {cal['mix']['bytes'] / 1e6:.1f} MB{versus}"
                     + ("" if cal["target"]["met"] else f"; MISSED --max-kl {cal['target']['max_kl']}"))
    lines += [f"model card: {out / 'README.md'}", f"manifest:   {out / 'manifest.json'}"]
    emit(manifest, as_json, lines)
    for note in manifest.get("notes") or []:  # on stderr, as `xpack merge` says them
        click.echo(f"note: {note}", err=True)
