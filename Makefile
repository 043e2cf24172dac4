# The two commands: `make quickstart` (the main job) and `make test`. Both set themselves up in .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is pinned to the CPU wheel on our machines; installing it first keeps pip from pulling a CUDA build.
TORCH := torch==2.13.0

.PHONY: quickstart test test-dist install install-dev bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.installed: $(VENV)/bin/python pyproject.toml
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e .
	touch $@

# The quickstart ends by serving the model: it needs the serve extra (FastAPI, uvicorn, grpcio, ...).
$(VENV)/.installed-serve: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[serve]'
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

quickstart: $(VENV)/.installed-serve
	$(VENV)/bin/ds quickstart $(ARGS)

# Bytecode caches on for the suite whatever the environment says (some set PYTHONDONTWRITEBYTECODE): without them
# pytest re-rewrites every test module and each of the suite's ~200 `ds`/torchrun subprocesses compiles the package
# from source again (measured: collection 23 -> 14 s, ~0.2 s per subprocess).
test test-dist: export PYTHONDONTWRITEBYTECODE =

# The playground test drives Debian's Chromium: as root with apt-get, `make test` installs it itself.
test: $(VENV)/.installed-dev
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then bash .ci/install-browser; fi
	$(PY) -m pytest -m "not dist_slow"

# The slowest multi-process tests (kill -9 of a torchrun worker, 4-process pipeline and FSDP x ep compositions):
# .ci/run runs them after `make test`.
test-dist: $(VENV)/.installed-dev
	$(PY) -m pytest -m dist_slow tests/parallel

bench: $(VENV)/.installed-dev
	for script in benchmarks/bench_*.py; do $(PY) $$script || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache runs
