# emoji-ldm: `make demo` and `make test` set everything up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO_OUT ?= demo-out

.PHONY: demo test install clean bench

# The virtualenv with the package (editable), its pinned deps and test extras.
# torch==2.13.0 resolves to the CPU wheel on these machines' disk.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# The main job on the embedded default: build the Twemoji dataset and summarise it.
demo: $(STAMP)
	$(BIN)/emoji-ldm dataset build --source twemoji --out $(DEMO_OUT)/twemoji --message "make demo"
	$(BIN)/emoji-ldm dataset versions $(DEMO_OUT)/twemoji
	$(BIN)/emoji-ldm dataset show $(DEMO_OUT)/twemoji --sheet $(DEMO_OUT)/twemoji-sheet.png

# The whole suite (real Ray, a real moto_server S3 process, local HTTP servers).
test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	$(BIN)/python bench/ingest.py

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
