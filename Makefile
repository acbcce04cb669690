# Two entry points (see README): `make demo` and `make test`. Both create/refresh the virtual environment first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test browser

# Torch first, pinned to the CUDA build that also runs on CPUs, so no other package can pull a different one.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install --quiet -e ".[test,ray]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/retrieval demo $(DEMO_ARGS)

browser:
	bash scripts/install_browser.sh

test: install browser
	$(PY) -m pytest -q $(PYTEST_ARGS)
