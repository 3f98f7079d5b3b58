# emoji-ldm: `make demo` and `make test` set everything up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO_OUT ?= demo-out
DEMO_PORT ?= 8000

.PHONY: demo test test-fast lint install clean bench bench-scale bench-train bench-serve bench-caption bench-crawl bench-submit chromium kubectl

# The virtualenv with the package (editable), its pinned deps and test extras.
# torch==2.13.0 resolves to the CPU wheel on these machines' disk.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# The main job on the embedded default, from scratch each time (about 14 minutes on 2 cores):
# build the Twemoji dataset, caption it (metadata captioner), encode it (training the tiny VAE first), train the tiny
# UNet on 2 Ray Train workers under DeepSpeed ZeRO-2, generate a sample sheet, then serve the
# model (Ray Serve) and fetch one emoji set through POST /v1/emoji-sets.
demo: $(STAMP)
	rm -rf $(DEMO_OUT)
	$(BIN)/emoji-ldm dataset build --source twemoji --out $(DEMO_OUT)/twemoji --message "make demo"
	$(BIN)/emoji-ldm dataset caption $(DEMO_OUT)/twemoji --captioner metadata
	$(BIN)/emoji-ldm dataset show $(DEMO_OUT)/twemoji --sheet $(DEMO_OUT)/twemoji-sheet.png
	$(BIN)/emoji-ldm encode --dataset $(DEMO_OUT)/twemoji --preset tiny --out $(DEMO_OUT)/latents
	$(BIN)/emoji-ldm train --data $(DEMO_OUT)/latents --preset tiny --out $(DEMO_OUT)/run --workers 2 --zero-stage 2
	$(BIN)/emoji-ldm generate --model $(DEMO_OUT)/run --prompt "smiling cat face" --n 8 --out $(DEMO_OUT)/generated
	infra/demo_set.sh $(DEMO_OUT)/run $(DEMO_OUT)/serve $(DEMO_PORT)
	@echo "samples during training: $(DEMO_OUT)/run/samples/  loss curve: $(DEMO_OUT)/run/loss.png  generated: $(DEMO_OUT)/generated/sheet.png  emoji set: $(DEMO_OUT)/serve/emoji-set.zip"

# Debian's Chromium and ChromeDriver, for the web page and crawler tests (sudo when not root).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
chromium:
	@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || \
	  ( $(SUDO) apt-get install -y chromium chromium-driver || \
	    ( $(SUDO) apt-get update && $(SUDO) apt-get install -y chromium chromium-driver ) )

# kubectl renders k8s/ (`kubectl kustomize`); Debian's kubernetes-client when none is installed.
kubectl:
	@command -v kubectl > /dev/null || \
	  ( $(SUDO) apt-get install -y kubernetes-client || \
	    ( $(SUDO) apt-get update && $(SUDO) apt-get install -y kubernetes-client ) )

# The whole suite (real Ray, a real moto_server S3 process, local HTTP servers, headless Chromium,
# the k8s manifests, every RayJob entrypoint on a local `ray start --head`).
test: $(STAMP) chromium kubectl lint
	$(BIN)/python -m pytest

# The unit tests alone (no Ray cluster, no servers, no browser): about a minute.
test-fast: $(STAMP) lint
	$(BIN)/python -m pytest tests/unit -m "not slow"

# ruff: pyflakes, pycodestyle errors, isort, bugbear (config in pyproject.toml).
lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	$(BIN)/python bench/ingest.py

# Peak memory and images/s of `train` at 5k, 50k and 500k synthetic latent rows, vs the in-memory path.
bench-scale: $(STAMP)
	$(BIN)/python bench/scale_train.py

bench-train: $(STAMP)
	$(BIN)/python bench/train.py --demo-out $(DEMO_OUT)

bench-crawl: $(STAMP) chromium
	$(BIN)/python bench/crawl.py

bench-caption: $(STAMP)
	$(BIN)/python bench/caption.py

bench-submit: $(STAMP)
	$(BIN)/python bench/submit.py

bench-serve: $(STAMP)
	$(BIN)/python bench/serve.py --model $(DEMO_OUT)/run

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
