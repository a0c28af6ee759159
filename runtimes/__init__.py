"""What runs artifacts on an edge box: base (interface, registry), chat, profiles, llamacpp, torch_ref. Never imports xpack.packager."""
