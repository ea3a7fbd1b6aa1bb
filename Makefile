# The two set-up commands of the README. Each installs what it needs into .venv on first use:
# PyTorch's CPU build when the machine has no NVIDIA GPU, then memplug with its test extra.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: quick test

quick: $(VENV)/.installed  ## the main job: the quick ablation on an embedded default
	$(VENV)/bin/memplug ablate --preset quick --out runs/quick

# Two pytest workers: the Triton interpreter's tests run on one core, so a single process leaves
# the other idle for most of the suite (tests/conftest.py gives each worker one torch thread).
test: $(VENV)/.installed  ## the CPU test suite
	$(PY) -m pytest tests -n 2 --dist worksteal

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	if nvidia-smi -L >/dev/null 2>&1; then echo "GPU found: default torch build"; \
	else $(PY) -m pip install --quiet torch==2.13.0; fi
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@
