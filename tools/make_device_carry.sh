#!/usr/bin/env bash
# Here, before a device run: what tools/device_gpu_check.sh needs on a bare GPU machine that has no network,
# in the two folders the device tool's `carry` names (both ignored through .git/info/exclude):
#
#   .whl/            cp312 manylinux wheels of what xpack pins and the device image lacks or holds in another
#                    version (transformers 4.57.6, tokenizers 0.22, huggingface-hub 0.36, peft, gguf; diskcache
#                    for llama-cpp-python)
#   .device_carry/   llama_cpp_python-0.3.36-stripped.tar.gz (the sdist less llama.cpp's vocab GGUFs, docs, web UI,
#                    tests, examples and unused backends: built there with CUDA) and smollm2/ (the materialized
#                    SmolLM2-135M-Instruct folder less its weights: config, tokenizer; gpu_check.py --synthetic-base
#                    gives it random weights of the real shapes there)
#
#   bash tools/make_device_carry.sh          # idempotent; prints what travels
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SDIST=${SDIST:-benchmarks/.cache/sdist/llama_cpp_python-0.3.36.tar.gz}
SMOLLM2=${SMOLLM2:-${XPACK_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/xpack}/demo/smollm2-135m-instruct}

for line in /.whl/ /.device_carry/; do
    grep -qxF "$line" .git/info/exclude 2>/dev/null || echo "$line" >>.git/info/exclude
done
mkdir -p .whl .device_carry

# 1. wheels (pure Python or abi3; their own needs are all in the device image: see `unzip -p W '*/METADATA'`)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
    transformers==4.57.6 tokenizers==0.22.2 huggingface-hub==0.36.2 peft==0.18.1 gguf==0.19.0 diskcache==5.6.3

# 2. the llama-cpp-python sdist, stripped to what a CUDA build of its libraries needs
out=.device_carry/llama_cpp_python-0.3.36-stripped.tar.gz
if [ ! -f "$out" ] || [ "$SDIST" -nt "$out" ]; then
    tmp=$(mktemp -d)
    tar xzf "$SDIST" -C "$tmp"
    top="$tmp/llama_cpp_python-0.3.36"
    v="$top/vendor/llama.cpp"
    rm -rf "$top"/{.git,docs,docker,examples,tests,scripts} "$v"/.git \
        "$v"/{models,docs,media,benches,tests,examples,pocs,app,ci,skills,gguf-py,conversion,requirements,scripts,grammars} \
        "$v"/convert_*.py "$v"/tools/{ui,server} "$v"/tools/mtmd/test-* \
        "$v"/ggml/src/ggml-{cann,et,hexagon,hip,metal,musa,opencl,openvino,sycl,virtgpu,vulkan,webgpu,zdnn,zendnn}
    tar czf "$out" -C "$tmp" llama_cpp_python-0.3.36
    rm -rf "$tmp"
fi

# 3. the demo base's small files (its 538 MB of float32 weights stay here)
mkdir -p .device_carry/smollm2
for f in config.json generation_config.json special_tokens_map.json tokenizer.json tokenizer_config.json .xpack-builtin.json; do
    cp "$SMOLLM2/$f" .device_carry/smollm2/
done

du -sh .whl .device_carry
