# blip_peft developer entry points. `make test` sets up everything on a fresh machine and runs the
# whole suite; `make demo` sets up and runs the main job. Run `make help` for the list.

VENV ?= .venv
PYTHON ?= python3
export VIRTUAL_ENV := $(abspath $(VENV))
export PATH := $(VIRTUAL_ENV)/bin:$(PATH)
# Build torch-sys against the torch wheel installed in the virtual environment.
export LIBTORCH_USE_PYTORCH := 1
PY := $(VIRTUAL_ENV)/bin/python
TORCH_LIB = $(shell $(PY) -c "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))")

.PHONY: help install system-packages build demo test test-rs test-py lint format clean bench bench-kernel fuzz

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(VENV)/.installed: requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

install: $(VENV)/.installed system-packages ## create the virtual environment with torch 2.11.0 and the test tools

# System packages, installed with apt when missing (root, or sudo without a password); a no-op when all are
# there. Elsewhere it says what to install. Chromium and chromedriver: the web page's browser test
# (tests/test_serve_browser.py, driven by selenium from requirements-dev.txt; `make test` fails that test
# without them). nasm: libjpeg-turbo's SIMD code for JPEG decoding (src/processor/jpeg.rs, the `jpeg-simd`
# feature); without it the build decodes JPEGs to the same pixels through the C code, about half as fast.
SYSTEM_PACKAGES := chromium chromium-driver nasm
system-packages: ## Chromium, chromedriver (the browser test) and nasm (SIMD JPEG decoding), with apt when missing
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 \
	  && command -v nasm >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(SYSTEM_PACKAGES); \
	elif command -v apt-get >/dev/null 2>&1 && sudo -n true 2>/dev/null; then \
	  sudo apt-get update -q && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(SYSTEM_PACKAGES); \
	else echo "make system-packages: install Chromium, chromedriver and nasm" \
	  "(Debian: apt-get install $(SYSTEM_PACKAGES))"; fi

# libjpeg-turbo's SIMD paths when nasm is there (they give the C paths' pixels, tests/test_jpeg.py checks).
JPEG_SIMD = $(if $(shell command -v nasm 2>/dev/null),--features python$(comma)jpeg-simd)
comma := ,

build: install ## build the native module (release) into python/blip_peft
	maturin develop --release --quiet $(JPEG_SIMD)

demo: build ## fresh machine: set up, then fine-tune the bundled model on a new domain and caption (offline)
	$(PY) -m blip_peft demo --output-dir blip-peft-demo

bench: build ## the side-by-side benchmark against transformers + peft on this machine
	$(PY) bench/compare.py --suite cpu

bench-kernel: install ## the decoding kernel against torch's linear on decoder shapes (src/nn/few_rows.rs)
	LD_LIBRARY_PATH=$(TORCH_LIB) cargo test --release --no-default-features few_rows_speed -- --ignored --nocapture

test-rs: install ## the core's Rust tests (no Python involved)
	LD_LIBRARY_PATH=$(TORCH_LIB) cargo test --release --no-default-features

# The tests marked cpu_isa (numbers that rest on the kernels a CPU's instruction set picks) run a second time on
# the code an AVX2-only CPU runs, so every machine checks both paths (tests/test_cpu_capability.py). A CPU
# without AVX-512 already ran that code in the first run (torch's path and our kernels' are AVX2 or less), so it
# skips the repeat.
# BLIP_PEFT_REQUIRE_BROWSER=1: the browser test fails (instead of skipping) when Chromium or selenium is missing.
RUNS_AVX512 = import sys, torch, blip_peft as bp; paths = bp._blip_peft.kernel_code_paths(); \
	sys.exit(0 if "avx512" in (torch.backends.cpu.get_cpu_capability().lower(), paths["decoding"], paths["resize"]) else 3)
test-py: build ## the Python test suite against transformers and peft (cpu_isa tests also capped at AVX2)
	BLIP_PEFT_REQUIRE_BROWSER=1 $(PY) -m pytest -q
	$(PY) -c '$(RUNS_AVX512)'; case $$? in \
	0) BLIP_PEFT_CPU_CAPABILITY=avx2 $(PY) -m pytest -q -m cpu_isa ;; \
	3) echo "cpu_isa tests not repeated at AVX2: this CPU has no AVX-512, the run above took the AVX2 paths" ;; \
	*) exit 1 ;; esac

lint: build ## rustfmt, clippy, ruff and the stub check
	cargo fmt --check
	cargo clippy --release --all-targets -- -D warnings
	$(PY) -m ruff check python tests bench examples scripts
	$(PY) -m ruff format --check python tests bench examples scripts
	$(PY) -m mypy.stubtest blip_peft._blip_peft
	$(PY) -m mypy --ignore-missing-imports python/blip_peft

test: lint test-rs test-py ## everything: set up, build, lint, Rust tests, Python tests

# The file loaders under cargo-fuzz (nightly + `cargo install cargo-fuzz`), FUZZ_RUNS executions each, from the
# committed seeds in fuzz/corpus/<target>/ (new inputs go to fuzz/work/, crashes to fuzz/artifacts/). Outside
# `make test`, which runs the same targets briefly over the seeds (tests/fuzz_seeded.rs). See fuzz/README.md.
FUZZ_RUNS ?= 1000000
FUZZ_TARGETS ?= config_json processor_config_json adapter_config_json safetensors tokenizer_json image
fuzz: install ## fuzz the file loaders (cargo-fuzz), FUZZ_RUNS executions per loader
	mkdir -p fuzz/work /tmp/blip-peft-fuzz
	cd fuzz && for t in $(FUZZ_TARGETS); do mkdir -p work/$$t; \
	  FUZZ_TMP=/tmp/blip-peft-fuzz LD_LIBRARY_PATH=$(TORCH_LIB) cargo +nightly fuzz run --sanitizer none $$t \
	    work/$$t corpus/$$t -- -runs=$(FUZZ_RUNS) -max_len=65536 -rss_limit_mb=4096 -timeout=10 || exit 1; done

format: install ## format Rust and Python sources
	cargo fmt
	$(PY) -m ruff format python tests
	$(PY) -m ruff check --fix python tests

clean: ## remove build outputs (keeps the virtual environment)
	cargo clean
	rm -f python/blip_peft/*.so
