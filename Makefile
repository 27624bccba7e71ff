# gradwatch: `make train` and `make test` install what they need first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install train sweep summary tensorboard test test-fast lint bench clean

install: $(STAMP)

# Pinned by constraints.txt: torch 2.13.0 is the CPU build (docs/gpu.md: a GPU build).
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

train: install
	$(BIN)/python train.py $(ARGS)

sweep: install
	$(BIN)/python train.py experiment=study_lr_convergence $(ARGS)

# The newest sweep, or DIR=<folder>.
summary: install
	@dir="$(or $(DIR),$$(ls -d outputs/multirun/*/* 2>/dev/null | tail -n 1))"; \
	if [ -z "$$dir" ]; then echo "make summary: no sweep under outputs/multirun yet (make sweep first, or DIR=<folder>)"; exit 2; fi; \
	$(BIN)/python scripts/summarize.py "$$dir"

# The newest run or sweep (a large sweep: its mean over seeds per setting), or DIR=<folder>.
tensorboard: install
	$(BIN)/python scripts/open_tensorboard.py $(DIR)

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check src tests scripts train.py

bench: install
	$(BIN)/python scripts/bench_step.py
	$(BIN)/python scripts/bench_telemetry.py
	$(BIN)/python scripts/bench_summary.py

clean:
	rm -rf $(VENV) outputs/*/ .pytest_cache
