# Two entry points (README): `make up` serves the tiny model; `make test` runs the suite.
# Both create .venv and install the project with pinned versions on first use.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-stamp

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

.PHONY: install up test bench protos
install: $(STAMP)

up: $(STAMP)
	$(VENV)/bin/elastune up

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

bench: $(STAMP)
	$(VENV)/bin/python bench/pipeline.py

protos: $(STAMP)
	$(VENV)/bin/elastune protos
