"""xpack: merge LoRA adapters, export GGUF/ONNX artifacts, run and verify them offline."""

__version__ = "0.1.0"
