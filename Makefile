# Two commands from a fresh clone (docs/browser.md):
#   make run    the service on http://127.0.0.1:1234 with a live login test, against a stand-in for Spotify
#               until .env has your app's credentials; `make run HOST=0.0.0.0` listens on every interface
#   make test   the whole test suite, installing what it needs first (system tools with apt-get)
# PORT from make's command line or the environment alike (make run PORT=8000, PORT=8000 make run); HOST only from
# the command line (make run HOST=0.0.0.0): zsh sets HOST to the machine's name.
# Both need Python 3.11 or newer (MIN_PYTHON): `make run PYTHON=python3.12` names the interpreter.
PYTHON = python3
# The oldest Python the service runs on (pyproject.toml's requires-python says the same).
MIN_PYTHON = 3.11
VENV = .venv
HOST = 127.0.0.1
PORT := $(or $(PORT),1234)
# What the tests start besides Python: a browser, a Redis, certificate tools, Node (for a Node OAuth
# client library), curl (the README's examples), nginx (deploy/nginx.conf), prometheus (/metrics, the alerting
# rules), wrk (a short run of the benchmark), haproxy (deploy/haproxy.cfg). Debian package = command name
# (nginx's and haproxy's are in /usr/sbin, not on every user's PATH).
TEST_TOOLS = chromium redis-server openssl npm curl nginx prometheus wrk haproxy
SUDO = $(if $(filter 0,$(shell id -u 2>/dev/null)),,sudo)
APT_GET = $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -qq

.PHONY: run test test-tools python

run: python $(VENV)/.run-installed
	$(VENV)/bin/python -m devtools.run --host $(HOST) --port $(PORT)

test: python $(VENV)/.test-installed test-tools
	@if command -v npm >/dev/null 2>&1; then $(MAKE) --no-print-directory tests/node/node_modules/.installed; fi
	$(VENV)/bin/python -m mypy
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest
# tests/tools.py as a pytest plugin: where CI is set (.ci/run), a skipped test is a failure.
test: export PYTEST_PLUGINS = tests.tools
# Compiled bytecode, pytest's rewritten test modules included, is kept (in __pycache__, which git ignores) even where
# the environment sets PYTHONDONTWRITEBYTECODE (some CI images do): without it each pytest worker, and each server a
# test starts, compiles every module again (about 3 s of CPU a worker).
test: export PYTHONDONTWRITEBYTECODE =

# Installs the missing tools with apt-get. Without apt-get (macOS, Fedora, ...), it says which are missing and goes
# on: the tests that need them are skipped, each with its reason (tests/tools.py), and the rest run.
test-tools:
	@missing=""; for tool in $(TEST_TOOLS); do command -v $$tool >/dev/null 2>&1 || [ -x /usr/sbin/$$tool ] || missing="$$missing $$tool"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if command -v apt-get >/dev/null 2>&1; then \
	  echo "Installing$$missing with apt-get"; \
	  $(APT_GET) update && $(APT_GET) install -y $$missing >/dev/null; \
	else \
	  echo "Not installed:$$missing (the tests need $(TEST_TOOLS))."; \
	  echo "No apt-get here: the tests that need them are skipped, each with its reason, and the others run."; \
	  echo "To run every test, install them with your package manager (Homebrew: redis openssl node curl nginx prometheus wrk haproxy;"; \
	  echo "the browser tests run a \`chromium\` command found on PATH)."; \
	fi

# The interpreter before anything else: an old one gets a message saying what to install and how to pass it
# (rather than pip's "No matching distribution found"), and a .venv made by another Python, or whose Python is
# gone, is made again (removing a .venv that is a symlink removes the link only).
python:
	@want=$$(echo $(MIN_PYTHON) | tr . ,); \
	version=$$($(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) || version=; \
	if [ -z "$$version" ] || ! $(PYTHON) -c "import sys; sys.exit(sys.version_info[:2] < ($$want))" 2>/dev/null; then \
	  echo "Python $(MIN_PYTHON) or newer is needed; PYTHON=$(PYTHON) is $${version:+Python }$${version:-not found}." >&2; \
	  echo "Install one (python.org, brew install python@3.12, apt-get install python3.11, pyenv install 3.12)" >&2; \
	  echo "and name it: make $(or $(firstword $(MAKECMDGOALS)),run) PYTHON=python3.11" >&2; \
	  exit 1; \
	fi; \
	if [ -e $(VENV) ] || [ -L $(VENV) ]; then \
	  made=$$($(VENV)/bin/python -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) || made=; \
	  if [ "$$made" != "$$version" ]; then \
	    echo "Making $(VENV) again: it was made by $${made:+Python }$${made:-a Python that is gone}, PYTHON=$(PYTHON) is Python $$version."; \
	    rm -rf $(VENV); \
	  fi; \
	fi

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.run-installed: requirements.txt | $(VENV)/bin/python
	$(VENV)/bin/python -m pip install -q -r requirements.txt
	touch $@

$(VENV)/.test-installed: requirements.txt requirements-dev.txt | $(VENV)/bin/python
	$(VENV)/bin/python -m pip install -q -r requirements-dev.txt
	touch $@

# Node OAuth client libraries the tests run, exactly as locked.
tests/node/node_modules/.installed: tests/node/package-lock.json | test-tools
	npm ci --prefix tests/node --no-audit --no-fund --silent
	touch $@
