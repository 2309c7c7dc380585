# Two commands do all the set-up on a fresh machine (see README.md):
#   make repro   installs pnc into .venv, then runs `dvc repro` (the embedded default studies)
#   make test    installs pnc and its test tools into .venv, then runs the test suite
# Both install the exact versions of requirements.lock; `make lock` regenerates it (see README.md).
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.pnc-installed
LOCK := requirements.lock
LOCK_VENV ?= .venv-lock

.PHONY: install repro test bench clean-venv chromium postgres lock

$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c $(LOCK) -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

repro: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

# headless Chromium for tests/test_browser.py (Debian's package; root, or sudo when not root)
SUDO := $(shell test "$$(id -u)" = 0 || echo sudo)
chromium:
	command -v chromium >/dev/null 2>&1 || { $(SUDO) apt-get update && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium; }

# PostgreSQL's server programs (initdb, pg_ctl) for tests/test_team_postgres.py, which starts a throwaway cluster:
# Debian's package when neither PATH nor /usr/lib/postgresql/*/bin has them (root, or sudo when not root)
postgres:
	command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { $(SUDO) apt-get update && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql; }

test: $(STAMP) chromium postgres
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q -n 2 --dist worksteal --timeout 900

bench: $(STAMP)
	$(BIN)/python bench/bench_metrics.py
	$(BIN)/python bench/bench_train.py

# Regenerate requirements.lock: a fresh virtualenv gets the newest versions pyproject.toml's ranges allow, and the
# lock records them; pnc/model_names.json (timm's and torchvision's model lists) is regenerated in the same
# environment. Then run `make test` (it reinstalls .venv from the new lock) and commit both files.
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[test]'
	$(LOCK_VENV)/bin/python bench/make_lock.py --out $(LOCK)
	$(LOCK_VENV)/bin/python bench/make_model_names.py
	rm -rf $(LOCK_VENV)

clean-venv:
	rm -rf $(VENV)
