# The two commands a new machine needs: `make train` and `make test`.
# Each creates the virtualenv in .venv when it is missing and installs vitlab into it.
PYTHON ?= python3
# the suite runs in 2 pytest-xdist workers (one test module per worker at a time: module fixtures run once);
# TEST_WORKERS=0 runs it in one process
TEST_WORKERS ?= 2
XDIST  := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadscope)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: train test test-fast install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

## Train the default experiment (a ViT on scikit-learn's digits) into outputs/<date>/<time>/.
train: $(STAMP)
	$(VENV)/bin/vitlab-train experiment=digits_vit $(ARGS)

## The whole test suite, slow end-to-end tests included.
test: $(STAMP)
	$(PY) -m pytest tests $(XDIST) $(PYTEST_ARGS)

## Skip the slow end-to-end runs.
test-fast: $(STAMP)
	$(PY) -m pytest tests -m "not slow" $(XDIST) $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
