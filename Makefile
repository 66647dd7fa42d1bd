# virtlease — the two set-up commands are `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint safety safety-long mutate bench bench-quick bench-scale clean dist deb lock

$(STAMP): pyproject.toml lab/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,bench]' -e ./lab
	touch $(STAMP)

# `make demo LIBVIRT=1`: the agent on two real libvirt hosts (root, libvirt and QEMU needed)
demo: $(STAMP)
ifeq ($(LIBVIRT),1)
	$(BIN)/python -m virtlease_lab.libvirt.demo
else
	$(BIN)/virtlease demo
endif

test: lint
	$(BIN)/pytest -m "not safety" tests

# The nemesis suite alone: short seeded run (CI) and the long run for users.
safety: $(STAMP)
	$(BIN)/python -m pytest -m safety tests/safety

safety-long: $(STAMP)
	$(BIN)/python -m virtlease_lab.nemesis --duration 1800 --results build/safety
	VIRTLEASE_FUZZ_EXAMPLES=20000 $(BIN)/python -m pytest -s tests/security/test_fuzz.py

# Mutation testing of the safety core (tests/mutation/README.md): most of an hour, not in `make test`.
mutate: $(STAMP)
	$(BIN)/python tests/mutation/mutate.py $(MUTATE_ARGS)

# Results go to build/bench/ (untracked); BENCH_OUT=bench/results publishes the figures the
# README shows.
bench: $(STAMP)
	$(BIN)/python bench/run.py $(if $(BENCH_OUT),--out $(BENCH_OUT))

bench-quick: $(STAMP)
	$(BIN)/python bench/run.py --quick $(if $(BENCH_OUT),--out $(BENCH_OUT))

# 100, 300 and 1,000 host sessions on a three-member etcd, 10 minutes of churn each (~45 min)
bench-scale: $(STAMP)
	$(BIN)/python bench/run_scale.py $(if $(BENCH_OUT),--out $(BENCH_OUT)) $(SCALE_ARGS)

# The release's one version: src/virtlease/_version.py.
VERSION = $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' src/virtlease/_version.py)

# Wheel and sdist in dist/ (python -m build: an isolated build environment from the index).
dist: $(STAMP)
	rm -f dist/virtlease-$(VERSION)-*.whl dist/virtlease-$(VERSION).tar.gz
	$(BIN)/python -m build --outdir dist .

# The Debian package (bookworm) in dist/: deploy/build-deb.sh; its tools: deploy/packaging-tools.sh.
deb: dist
	deploy/build-deb.sh dist/virtlease-$(VERSION)-py3-none-any.whl dist

# Re-resolve the .deb's environment (exact versions, every file's hash) after changing the
# dependencies in pyproject.toml; commit the result.
lock: $(STAMP)
	$(BIN)/pip install --quiet pip-tools
	$(BIN)/pip-compile --quiet --generate-hashes --strip-extras --no-emit-index-url --no-emit-find-links \
	    --output-file deploy/debian/requirements.lock pyproject.toml

# ruff; the import-layer contracts; mypy --strict over the product, the lab and bench, and over
# the tests (one module name per test file: tests.agent.conftest, ...).
lint: $(STAMP)
	$(BIN)/ruff check src backends tests bench lab
	$(BIN)/lint-imports
	$(BIN)/mypy src/virtlease backends/virtlease_nop backends/virtlease_etcd lab/virtlease_lab bench
	$(BIN)/mypy --explicit-package-bases tests

clean:
	rm -rf $(VENV) build dist *.egg-info src/*.egg-info backends/*.egg-info lab/*.egg-info .pytest_cache
