# emoji-ldm: `make demo` and `make test` set everything up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO_OUT ?= demo-out
DEMO_PORT ?= 8000

.PHONY: demo test test-fast lint install clean small64 bench bench-scale bench-train bench-serve bench-caption bench-crawl bench-submit chromium kubectl cxx noto-font .venv-peers

# The virtualenv with the package (editable), its pinned deps and test extras, installed by uv under pip's
# configuration (infra/install.py: 30 s where pip takes 80). torch==2.13.0 resolves to the CPU wheel on these
# machines' disk.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PYTHON) infra/install.py $(VENV) -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# The main job on the embedded default, from scratch each time (infra/demo.sh; the budget: 15 minutes on a fresh
# 2-core machine, install included): build the Twemoji dataset, caption it (metadata captioner), encode it (the
# pixel32 preset: 32 px pixel patches, no VAE), train its UNet (1,600 steps) on 2 Ray Train workers under DeepSpeed
# ZeRO-2, generate a sample sheet, serve the model (Ray Serve) and fetch one emoji set through POST /v1/emoji-sets,
# trace one of its PNGs back to the data, and evaluate the model with the frozen judge. All on one local Ray head that
# the script starts and stops; wall time per step in $(DEMO_OUT)/timings.txt.
demo: $(STAMP) noto-font
	infra/demo.sh $(DEMO_OUT) $(DEMO_PORT)

# Debian's Chromium and ChromeDriver, for the web page and crawler tests (sudo when not root).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
chromium:
	@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || \
	  ( $(SUDO) apt-get install -y chromium chromium-driver || \
	    ( $(SUDO) apt-get update && $(SUDO) apt-get install -y chromium chromium-driver ) )

# Debian's Noto Color Emoji font, for `dataset build --source noto` and its tests.
noto-font:
	@test -f /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf || \
	  ( $(SUDO) apt-get install -y fonts-noto-color-emoji || \
	    ( $(SUDO) apt-get update && $(SUDO) apt-get install -y fonts-noto-color-emoji ) )

# torch.compile's inductor backend compiles C++ on CPU: g++ (Debian's) when none is installed.
cxx:
	@command -v g++ > /dev/null || \
	  ( $(SUDO) apt-get install -y g++ || ( $(SUDO) apt-get update && $(SUDO) apt-get install -y g++ ) )

# kubectl renders k8s/ (`kubectl kustomize`); Debian's kubernetes-client when none is installed.
kubectl:
	@command -v kubectl > /dev/null || \
	  ( $(SUDO) apt-get install -y kubernetes-client || \
	    ( $(SUDO) apt-get update && $(SUDO) apt-get install -y kubernetes-client ) )

# The whole suite (real Ray, a real moto_server S3 process, local HTTP servers, headless Chromium,
# the k8s manifests, every RayJob entrypoint on a local `ray start --head`).
# Two workers (pytest-xdist): the integration tests in order in one, the unit tests beside them in the other
# (tests/conftest.py says why).
test: $(STAMP) chromium kubectl cxx noto-font lint
	$(BIN)/python -m pytest -n 2

# The unit tests alone (no Ray cluster, no servers, no browser, none marked slow): about 2 minutes on 2 cores.
test-fast: $(STAMP) lint
	$(BIN)/python -m pytest tests/unit -m "not slow"

# ruff: pyflakes, pycodestyle errors, isort, bugbear (config in pyproject.toml).
lint: $(STAMP)
	$(BIN)/ruff check .

# The benchmarks. Ours runs from .venv (with the `bench` extra); the external peers the benchmarks
# compare against run from .venv-peers, a virtualenv of their own: img2dataset 1.47 needs pandas<3,
# the project pins pandas 3.1, so the two cannot share one environment. Extra flags for a script:
# `make bench-scale BENCH_ARGS="--sizes 5000 --peer-sizes 5000 --steps 10"`.
BENCH_ARGS ?=
BENCH_STAMP := $(VENV)/.bench-stamp
PEERS := .venv-peers
PEERS_STAMP := $(PEERS)/.installed-stamp
# bench/ingest.py: img2dataset, and the seed-style loop (requests + Pillow, the same Pillow as ours).
PEER_REQUIREMENTS := 'img2dataset==1.47.*' 'requests>=2.31' 'pillow==13.*'

$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(PYTHON) infra/install.py $(VENV) -e '.[test,bench]'
	touch $(BENCH_STAMP)

$(PEERS_STAMP): Makefile
	test -x $(PEERS)/bin/python || $(PYTHON) -m venv $(PEERS)
	$(PEERS)/bin/python -m pip install --quiet --upgrade pip
	$(PEERS)/bin/python -m pip install --quiet $(PEER_REQUIREMENTS)
	touch $(PEERS_STAMP)

.venv-peers: $(PEERS_STAMP)

# bench-train and bench-serve measure the model, latents and dataset `make demo` leaves; built when absent.
DEMO_MODEL := $(DEMO_OUT)/run/model/model_index.json
$(DEMO_MODEL): | $(STAMP)
	$(MAKE) demo

# Ingest: ours (its own Ray, and joining a running head) vs img2dataset from .venv-peers (--seed-loop adds the
# seed's loop); at scale: `make bench BENCH_ARGS="--images 40000 --repeat 2 --profile"`.
bench: $(BENCH_STAMP) .venv-peers
	$(BIN)/python bench/ingest.py $(BENCH_ARGS)

# Peak memory and images/s of `train` at 5k, 50k and 500k synthetic latent rows, vs the in-memory path.
bench-scale: $(BENCH_STAMP)
	$(BIN)/python bench/scale_train.py $(BENCH_ARGS)

# Peak memory and rows/s of build, caption, encode and bulk at 10k and 100k rows (1k and 10k prompts).
.PHONY: bench-scale-data
bench-scale-data: $(BENCH_STAMP)
	$(BIN)/python bench/scale_data.py $(BENCH_ARGS)

bench-train: $(BENCH_STAMP) $(DEMO_MODEL)
	$(BIN)/python bench/train.py --demo-out $(DEMO_OUT) $(BENCH_ARGS)

bench-crawl: $(BENCH_STAMP) chromium
	$(BIN)/python bench/crawl.py $(BENCH_ARGS)

bench-caption: $(BENCH_STAMP)
	$(BIN)/python bench/caption.py $(BENCH_ARGS)

bench-submit: $(BENCH_STAMP)
	$(BIN)/python bench/submit.py $(BENCH_ARGS)

# Recipe A (the preset) vs recipe B (min-SNR, EMA warm-up, offset noise): tiny trained twice, emoji-FID and
# prompt accuracy from the same judge (builds the demo dataset and latents when absent).
.PHONY: bench-quality
bench-quality: $(BENCH_STAMP)
	$(BIN)/python bench/quality.py --demo-out $(DEMO_OUT) $(BENCH_ARGS)

bench-serve: $(BENCH_STAMP) $(DEMO_MODEL)
	$(BIN)/python bench/serve.py --model $(DEMO_OUT)/run $(BENCH_ARGS)

# DreamBooth: class images through Ray Data vs a plain pipeline loop; the LoRA vs full training step.
.PHONY: bench-dreambooth
bench-dreambooth: $(BENCH_STAMP) $(DEMO_MODEL)
	$(BIN)/python bench/dreambooth.py --model $(DEMO_OUT)/run $(BENCH_ARGS)

# bf16 autocast vs fp32 and compile vs eager (and channels-last, gradient checkpointing) on this CPU: the tiny
# training step and the sampler, each variant one train-step-check in its own process.
.PHONY: bench-fast-path
bench-fast-path: $(BENCH_STAMP)
	$(BIN)/python bench/fast_path.py $(BENCH_ARGS)

# bench/RESULTS.md, rendered from the benchmarks' records in bench/results/ (`bench/render.py --check`: current?).
.PHONY: bench-results
bench-results: $(STAMP)
	$(BIN)/python bench/render.py

# The small64 model of the README gallery, trained on the demo's Twemoji dataset on 2 CPU cores (about 105
# minutes: 92 measured with a 500-step VAE, the RGBA VAE's 1,000 steps add about 14; builds the demo first when absent): encode (training its VAE), train, eval with the frozen judge,
# gallery. Stopped midway, `make small64 RESUME=--resume` continues from the last checkpoint.
SMALL64 := $(DEMO_OUT)/small64
RESUME ?=
small64: $(STAMP) $(DEMO_MODEL)
	test -d $(SMALL64)/latents/_delta_log || \
	  $(BIN)/emoji-ldm encode --dataset $(DEMO_OUT)/twemoji --preset small64 --out $(SMALL64)/latents
	$(BIN)/emoji-ldm train --data $(SMALL64)/latents --preset small64 --out $(SMALL64)/run --workers 2 \
	  --zero-stage 2 $(RESUME)
	$(BIN)/emoji-ldm eval --model $(SMALL64)/run --data $(SMALL64)/latents --samples 512 --out $(SMALL64)/eval.json
	$(BIN)/python bench/gallery.py --model small64=$(SMALL64)/run --model demo=$(DEMO_OUT)/run \
	  --data $(DEMO_OUT)/twemoji --out $(SMALL64)/gallery.png

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache

# `make gpu-check`: the GPU paths (DeepSpeed ZeRO-2/3 bf16 with the EMA, a checkpoint and a resume; the
# train-step-check MFU; DreamBooth LoRA; encode; Qwen2.5-VL captioning; fp16/bf16 sampling with and without
# torch.compile; the Generator drawing a set) in one process without Ray, on tiny random models; a JSON report
# (GPU_CHECK_OUT) and a table. DEVICE=cpu runs the same script here (at most 10 minutes on 2 cores).
# On the GPU machine: docs/development.md#gpu-check.
DEVICE ?= cuda
GPU_CHECK_OUT ?= gpu-check.json
gpu-check: $(STAMP)
	$(BIN)/python gpu_check/run.py --device $(DEVICE) --out $(GPU_CHECK_OUT)

# What travels to the GPU machine (Python 3.12, torch, transformers, accelerate, peft, pyarrow and pandas installed;
# no ray, diffusers, deepspeed or deltalake, nothing fetched there): the wheels the checks import that its image
# lacks, pinned to .venv's versions. DeepSpeed publishes only an sdist: its wheel is built here (pure Python,
# DS_BUILD_OPS=0: no ops compiled ahead; the checks use torch's AdamW).
GPU_CHECK_WHEELS := diffusers importlib_metadata zipp pillow requests urllib3 idna certifi charset-normalizer \
	hjson ninja msgpack py-cpuinfo pydantic pydantic-core annotated-types typing-inspection einops
gpu-check-wheels: $(STAMP)
	rm -rf gpu-check-wheels && mkdir -p gpu-check-wheels
	$(BIN)/pip download --quiet --python-version 3.12 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
	  --platform manylinux_2_28_x86_64 --only-binary=:all: --no-deps -d gpu-check-wheels \
	  $$(for p in $(GPU_CHECK_WHEELS); do echo "$$p==$$($(BIN)/pip show $$p | sed -n 's/^Version: //p')"; done)
	DS_BUILD_OPS=0 $(BIN)/pip wheel --quiet --no-deps --no-build-isolation -w gpu-check-wheels \
	  deepspeed==$$($(BIN)/pip show deepspeed | sed -n 's/^Version: //p')
	@ls gpu-check-wheels
	@echo "gpu-check-wheels: $$(du -sh gpu-check-wheels | cut -f1) in $$(ls gpu-check-wheels | wc -l) wheels (at most 64 MiB per call with the working tree)"

.PHONY: gpu-check gpu-check-wheels

# `make gpu-train`: one short training run at the GPU's limit (gpu_check/train.py: the largest VAE-free preset that
# fits --minutes, default 8, on every emoji style; then a gallery, a naming sheet and the frozen judge's eval), from
# the bundle `make gpu-train-bundle` prepares here (images, captions, MiniLM in fp16, the wheels; two device calls,
# docs/gpu.md). DEVICE=cpu rehearses the same path here (at most 10 minutes on 2 cores).
GPU_TRAIN_BUNDLE ?= gpu-train-bundle
GPU_TRAIN_OUT ?= gpu-train-out
gpu-train-bundle: $(STAMP)
	$(BIN)/python gpu_check/bundle.py --out $(GPU_TRAIN_BUNDLE)
gpu-train: $(STAMP)
	test -f $(GPU_TRAIN_BUNDLE)/data/images.npz || $(MAKE) gpu-train-bundle
	$(BIN)/python gpu_check/train.py --device $(DEVICE) --bundle $(GPU_TRAIN_BUNDLE) --out $(GPU_TRAIN_OUT)

.PHONY: gpu-train gpu-train-bundle

# `make image-check`: infra/Dockerfile's steps on a Debian rootfs (mmdebstrap) and the image's smoke test inside
# (emoji-ldm --version, Ray, DeepSpeed, a tiny train step, the GPU check's CPU mode), with a JSON record of what ran:
# docs/cluster.md. About 35 minutes on 2 cores; no Docker engine or registry needed.
image-check:
	$(SUDO) infra/image_check.sh

.PHONY: image-check
