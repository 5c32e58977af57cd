# rcdet: `make demo` (the main job on the built-in dataset) and `make test` work on a fresh machine.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.rcdet-setup-done
# The built-in dataset's root, in the order rcdet.data.shapes.default_root() uses, so that
# `make data` writes where the tools look: $RCDET_SHAPES_ROOT, else
# $DETECTRON2_DATASETS/rcdet_shapes, else datasets/rcdet_shapes.
SHAPES_ROOT ?= $(or $(RCDET_SHAPES_ROOT),$(if $(DETECTRON2_DATASETS),$(DETECTRON2_DATASETS)/rcdet_shapes,datasets/rcdet_shapes))
export RCDET_SHAPES_ROOT := $(SHAPES_ROOT)

.PHONY: setup data demo test lint format compare compare-quick bench clean

setup: $(STAMP)

# Re-runs only when the pins or the package metadata change.
$(STAMP): requirements.txt setup.py tools/setup_venv.sh
	bash tools/setup_venv.sh $(VENV)
	touch $@

data: setup
	@if [ -f $(SHAPES_ROOT)/ImageSets/Main/test.txt ]; then echo "[data] $(SHAPES_ROOT) exists"; \
	else $(PY) datasets/generate_shapes.py --out $(SHAPES_ROOT); fi

demo: data
	$(PY) tools/demo.py --output output/demo

test: setup
	$(PY) -m pytest -q tests

# The Python tree that black, isort and ruff check (settings: pyproject.toml, setup.cfg).
LINT_PATHS := rcdet tools tests datasets/generate_shapes.py setup.py

lint: setup
	$(VENV)/bin/black --check $(LINT_PATHS)
	$(VENV)/bin/isort --check-only $(LINT_PATHS)
	$(VENV)/bin/ruff check $(LINT_PATHS)

format: setup
	$(VENV)/bin/isort $(LINT_PATHS)
	$(VENV)/bin/black $(LINT_PATHS)

compare: data
	$(PY) tools/compare_methods.py

compare-quick: data
	$(PY) tools/compare_methods.py --quick

bench: setup
	$(PY) tools/benchmark_loss.py --json output/bench/loss.json
	$(PY) tools/benchmark_overhead.py --json output/bench/overhead.json

clean:
	rm -rf output
