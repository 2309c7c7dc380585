# Two commands do all the set-up on a fresh machine (see README.md):
#   make repro   installs pnc into .venv, then runs `dvc repro` (the embedded default studies)
#   make test    installs pnc and its test tools into .venv, then runs the test suite
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.pnc-installed

.PHONY: install repro test bench clean-venv chromium

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

repro: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

# headless Chromium for tests/test_browser.py (Debian's package; root, or sudo when not root)
SUDO := $(shell test "$$(id -u)" = 0 || echo sudo)
chromium:
	command -v chromium >/dev/null 2>&1 || { $(SUDO) apt-get update && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium; }

test: $(STAMP) chromium
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q -n 2 --timeout 900

bench: $(STAMP)
	$(BIN)/python bench/bench_metrics.py
	$(BIN)/python bench/bench_train.py

clean-venv:
	rm -rf $(VENV)
