# Two commands a newcomer needs: `make demo` and `make test`. Both share one set-up.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION := 2.13.0

.PHONY: setup demo test lint clean

$(BIN)/dreamrt: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned: an unpinned resolve can pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/pip install --quiet -e ".[dev,ros]"
	touch $(BIN)/dreamrt

setup: $(BIN)/dreamrt

demo: setup
	MUJOCO_GL=egl $(BIN)/dreamrt demo

test: setup
	MUJOCO_GL=egl $(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info
