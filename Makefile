# Two entry points (see README): `make demo` and `make test`. Both create/refresh the virtual environment first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
# The Milvus servers of the Milvus store's tests, in their own environment: milvus-lite depends on faiss-cpu,
# which must never enter $(VENV) (it would replace faiss-gpu's module). Its gRPC server imports pymilvus. The
# `milvus` package is Milvus 2.3.5 standalone (the Go server and an embedded etcd; no Python dependencies).
MILVUS_VENV ?= .venv-milvus
MILVUS_PACKAGES := "milvus-lite==3.2.2" "pymilvus==3.0.2" "milvus==2.3.5"
MILVUS_STAMP := $(MILVUS_VENV)/.installed-lite-3.2.2-standalone-2.3.5

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
	$(MILVUS_VENV)/bin/python -m pip install --quiet $(MILVUS_PACKAGES)
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
# The Milvus standalone tests spend most of their time waiting for the server (flushes, loads), so they run in a
# pytest process of their own beside the workers, on one thread; their report follows the workers'.
TEST_WORKERS ?= 2
BESIDE := tests/test_milvus_standalone.py
BESIDE_LOG := test-artifacts/milvus-standalone-tests.log
test: $(TEST_STAMP) browser lint $(MILVUS_STAMP)
	@mkdir -p test-artifacts
	@export METRIX_MILVUS_VENV=$(MILVUS_VENV); \
	OMP_NUM_THREADS=1 $(PY) -m pytest -q --durations=3 $(BESIDE) $(PYTEST_ARGS) > $(BESIDE_LOG) 2>&1 & beside=$$!; \
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=10 --ignore=$(BESIDE) \
		$(PYTEST_ARGS); workers=$$?; \
	wait $$beside; alone=$$?; \
	echo "---- $(BESIDE), run beside the workers ($(BESIDE_LOG)):"; tail -n 12 $(BESIDE_LOG); \
	[ $$workers -eq 0 ] && { [ $$alone -eq 0 ] || [ $$alone -eq 5 ]; }
