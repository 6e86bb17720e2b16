# lunatrain: `make luna` sets up and runs the whole Luna flow on the built-in tiny model; `make test` runs
# the tests. Both create the virtual environment first when it is missing.
VENV ?= .venv
PY := $(VENV)/bin/python
LUNATRAIN := $(VENV)/bin/lunatrain

.PHONY: setup luna test test-fast lint bench clean

# pip byte-compiles what it installs, but not this editable checkout: compile src here (only what changed), so
# the processes the flow and the tests start (trainers, workers, commands) load bytecode instead of compiling
# about 70 modules each, even where PYTHONDONTWRITEBYTECODE keeps Python from caching them itself.
setup: $(VENV)/.installed
	@$(PY) -m compileall -q src

# torch==2.13.0 first: the CPU build the build machines' wheel cache holds (elsewhere, PyTorch's CPU index); letting pip
# resolve torch on its own pulls a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

luna: setup
	$(LUNATRAIN) examples seed
	$(LUNATRAIN) luna

test: setup
	$(PY) -m pytest -n 2 --dist worksteal --durations=15

test-fast: setup
	$(PY) -m pytest -n 2 --dist worksteal -m "not slow"

lint: setup
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

bench: setup
	$(PY) bench/export.py
	$(PY) bench/prepare.py
	$(PY) bench/train_cpu.py
	$(PY) bench/memory.py
	$(PY) bench/api_load.py
	$(PY) bench/infer.py
	$(PY) bench/job_start.py
	$(PY) bench/startup.py

clean:
	rm -rf $(VENV) data reports test-output
