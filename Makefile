# Two commands from a fresh clone (docs/browser.md):
#   make run    the service on http://127.0.0.1:1234 with a live login test, against a stand-in for Spotify
#               until .env has your app's credentials; `make run HOST=0.0.0.0` listens on every interface
#   make test   the whole test suite, installing what it needs first (system tools with apt-get)
# Command-line values (make run PORT=8000) win; the environment's HOST and PORT do not.
PYTHON = python3
VENV = .venv
HOST = 127.0.0.1
PORT = 1234
# What the tests start besides Python: a browser, a Redis, certificate tools, Node (for a Node OAuth
# client library), curl (the README's examples), nginx (deploy/nginx.conf). Debian package = command
# name (nginx's is in /usr/sbin, not on every user's PATH).
TEST_TOOLS = chromium redis-server openssl npm curl nginx
SUDO = $(if $(filter 0,$(shell id -u)),,sudo)
APT_GET = $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -qq

.PHONY: run test test-tools

run: $(VENV)/.run-installed
	$(VENV)/bin/python run.py --host $(HOST) --port $(PORT)

test: $(VENV)/.test-installed tests/node/node_modules/.installed test-tools
	$(VENV)/bin/python -m mypy
	$(VENV)/bin/python -m pytest

test-tools:
	@missing=""; for tool in $(TEST_TOOLS); do command -v $$tool >/dev/null 2>&1 || [ -x /usr/sbin/$$tool ] || missing="$$missing $$tool"; done; \
	if [ -n "$$missing" ]; then \
	  echo "Installing$$missing with apt-get"; \
	  $(APT_GET) update && $(APT_GET) install -y $$missing >/dev/null; \
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
