# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

export DO_NOT_TRACK := 1
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DVC_NO_ANALYTICS := 1

.PHONY: install run test lint bench params docs clean

install: $(STAMP)

# torch first: `torch==2.13.0` takes the local CPU wheel here; an unpinned torch pulls GBs of CUDA.
$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

# The main job: the DVC pipeline on the default data, then what it gave (`vaepipe summary`): the
# held-out log-likelihood beside the full Gaussian, where the model, plots and MLflow UI are, @champion.
run: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro
	@echo
	@$(BIN)/vaepipe summary

# Two pytest workers (pytest-xdist), a module per worker (module fixtures such as test_user_table's
# repository stay whole): most tests wait on subprocesses, so two beat one even on 2 cores
# (418 s vs 593-660 s on the 2-vCPU box). Each worker is its own session: its own Prefect harness,
# Prefect home and MLflow store (tests/conftest.py). TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2

test: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

lint: install
	$(BIN)/ruff check vae pipeline tests benchmarks
	$(BIN)/mypy

# params.yaml and docs/params.md are written from the settings' declarations (pipeline/config.py,
# vae/config.py: default, type, help); a test fails when either is stale. `make params` resets
# params.yaml to the built-in defaults: your own values in it are lost.
params: install
	$(BIN)/python -m pipeline.params_doc --yaml > params.yaml.tmp && mv params.yaml.tmp params.yaml

docs: install
	$(BIN)/python -m pipeline.params_doc > docs/params.md.tmp && mv docs/params.md.tmp docs/params.md

bench: install
	$(BIN)/python benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
