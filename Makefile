# Two entry points (see README): `make demo` and `make test`. Both create/refresh the virtual environment first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
# The Milvus Lite server of the Milvus store's tests, in its own environment: milvus-lite depends on faiss-cpu,
# which must never enter $(VENV) (it would replace faiss-gpu's module). Its gRPC server imports pymilvus.
MILVUS_VENV ?= .venv-milvus
MILVUS_STAMP := $(MILVUS_VENV)/.installed

.PHONY: install demo test browser lint milvus-server

# Torch first, pinned to the CUDA build that also runs on CPUs, so no other package can pull a different one.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install --quiet -e .
	touch $(STAMP)

# The tests also need the test tools and the optional Ray engine (its tests run in the suite); the demo does not.
$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e ".[test,ray,milvus]"
	touch $(TEST_STAMP)

$(MILVUS_STAMP):
	test -x $(MILVUS_VENV)/bin/python || python3 -m venv $(MILVUS_VENV)
	$(MILVUS_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(MILVUS_VENV)/bin/python -m pip install --quiet "milvus-lite==3.2.2" "pymilvus==3.0.2"
	touch $(MILVUS_STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/retrieval demo $(DEMO_ARGS)

browser:
	bash scripts/install_browser.sh

# Lint, format check and type check of the product's packages (configured in pyproject.toml); part of `make test`.
LINTED := retrieval training app
lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/ruff format --check $(LINTED)
	$(VENV)/bin/mypy

milvus-server: $(MILVUS_STAMP)

# The suite on $(TEST_WORKERS) parallel workers, a module per worker with its servers, trained runs or Ray runtime
# (tests/conftest.py), ending with the 10 slowest tests. TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
test: $(TEST_STAMP) browser lint $(MILVUS_STAMP)
	METRIX_MILVUS_VENV=$(MILVUS_VENV) $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=10 $(PYTEST_ARGS)
