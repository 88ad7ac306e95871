# Thin entry points. `make demo` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.deps-stamp
export PYO3_PYTHON := $(abspath $(PY))
export VIRTUAL_ENV := $(abspath $(VENV))

.PHONY: demo test lint bench build fmt clean

# The virtualenv and the Python dependencies (torch is large: pip's cache makes reinstalls cheap).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "maturin>=1.7,<2" "torch>=2.5" "numpy>=1.24" "tqdm>=4.60" \
		"pytest>=8" "hypothesis>=6.100" "scipy>=1.11" "pytest-benchmark>=4" "ruff>=0.6" "mypy>=1.11"
	touch $(STAMP)

# The release extension, installed into the venv in place (python/ stays the source of truth).
build: $(STAMP)
	$(VENV)/bin/maturin develop --release --quiet

demo: build
	$(VENV)/bin/spruce demo

lint: build
	cargo fmt --all --check
	cargo clippy --workspace --all-targets --quiet -- -D warnings
	$(VENV)/bin/ruff check python tests benches
	$(VENV)/bin/ruff format --check python tests benches
	$(PY) -m mypy.stubtest spruce._core --allowlist .stubtest-allowlist

test: build
	cargo test --quiet
	$(MAKE) --no-print-directory lint
	$(PY) -m pytest -q tests

bench: build
	mkdir -p benches/results
	$(PY) -m pytest -q benches --benchmark-only --benchmark-json=benches/results/latest.json \
		--benchmark-columns=min,median,mean,rounds
	$(PY) benches/report.py benches/results/latest.json --readme README.md

fmt:
	cargo fmt --all
	$(VENV)/bin/ruff format python tests benches
	$(VENV)/bin/ruff check --fix python tests benches

clean:
	rm -rf target $(VENV) .pytest_cache .ruff_cache .mypy_cache
