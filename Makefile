# virtlease — the two set-up commands are `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint safety safety-long bench bench-quick bench-scale clean

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

test: $(STAMP)
	$(BIN)/ruff check src backends tests bench lab
	$(BIN)/lint-imports
	$(BIN)/mypy src/virtlease backends/virtlease_nop backends/virtlease_etcd
	$(BIN)/pytest -m "not safety" tests

# The nemesis suite alone: short seeded run (CI) and the long run for users.
safety: $(STAMP)
	$(BIN)/python -m pytest -m safety tests/safety

safety-long: $(STAMP)
	$(BIN)/python tests/safety/nemesis.py --duration 1800
	VIRTLEASE_FUZZ_EXAMPLES=20000 $(BIN)/python -m pytest -s tests/security/test_fuzz.py

bench: $(STAMP)
	$(BIN)/python bench/run.py

bench-quick: $(STAMP)
	$(BIN)/python bench/run.py --quick $(if $(BENCH_OUT),--out $(BENCH_OUT))

# 100, 300 and 1,000 host sessions on a three-member etcd, 10 minutes of churn each (~45 min)
bench-scale: $(STAMP)
	$(BIN)/python bench/run_scale.py $(if $(BENCH_OUT),--out $(BENCH_OUT)) $(SCALE_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src backends tests bench lab
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info backends/*.egg-info .pytest_cache
