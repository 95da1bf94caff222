# Each target bootstraps .venv by itself (pip, not uv: uv ignores the torch on this disk).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench lint install clean

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[all,dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/medadapt demo

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -n 2 --dist loadfile tests

bench: $(STAMP)
	$(VENV)/bin/medadapt bench

lint: $(STAMP)
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) build dist *.egg-info
