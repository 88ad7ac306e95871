# Thin entry points. `make demo` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DEPS   := $(VENV)/.deps-stamp
BUILT  := $(VENV)/.build-stamp
EXTRAS := test bench lint
SOURCES := $(shell find rust python -name '*.rs' -o -name '*.py' -o -name '*.pyi' -o -name 'Cargo.toml') Cargo.toml pyproject.toml
export PYO3_PYTHON := $(abspath $(PY))
export VIRTUAL_ENV := $(abspath $(VENV))

.PHONY: demo test lint bench build fmt clean

# The virtualenv and the Python dependencies listed in pyproject.toml (torch is large: pip's
# cache makes reinstalls cheap).
$(DEPS): pyproject.toml tools/deps.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) tools/deps.py $(EXTRAS) > $(VENV)/requirements.txt
	$(PY) -m pip install -q -r $(VENV)/requirements.txt
	touch $@

# The release extension, installed into the venv in place (python/ stays the source of truth).
$(BUILT): $(DEPS) $(SOURCES)
	$(VENV)/bin/maturin develop --release --quiet
	touch $@

build: $(BUILT)

demo: $(BUILT)
	$(VENV)/bin/spruce demo

lint: $(BUILT)
	cargo fmt --all --check
	cargo clippy --workspace --all-targets --quiet -- -D warnings
	$(VENV)/bin/ruff check python tests benches tools
	$(VENV)/bin/ruff format --check python tests benches tools
	$(PY) -m mypy.stubtest spruce._core --allowlist .stubtest-allowlist

# pytest exits 5 when it collected no test: that fails the target like any other failure.
test: $(BUILT)
	cargo test --quiet
	$(MAKE) --no-print-directory lint
	$(PY) -m pytest -q tests

bench: $(BUILT)
	mkdir -p benches/results
	$(PY) -m pytest -q benches --benchmark-only --benchmark-json=benches/results/latest.json \
		--benchmark-columns=min,median,mean,rounds
	$(PY) benches/report.py benches/results/latest.json --readme README.md

fmt:
	cargo fmt --all
	$(VENV)/bin/ruff format python tests benches tools
	$(VENV)/bin/ruff check --fix python tests benches tools

clean:
	rm -rf target $(VENV) .pytest_cache .ruff_cache .mypy_cache
