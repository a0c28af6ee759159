"""What runs artifacts on an edge box: one Runtime interface (base.py), a registry (registry.py) and one
module per runtime (torch_ref, llamacpp, onnxrt). Never imports xpack.packager (see ARCHITECTURE.md)."""
