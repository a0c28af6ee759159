"""Calibration for quantization: which weights matter, measured on text the model reads.

text.py reads the calibration text (plain or chat JSONL; a built-in medical text by default),
stats.py runs the model over it and collects per-layer statistics (llama.cpp's importance matrix
and the diagonal Fisher of each layer's output), names.py carries them over to GGUF tensor names,
and qerror.py computes what llama.cpp's quantizer does to a weight matrix without writing a GGUF.
"""
