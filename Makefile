# Quick start:  make train      (set up + train on the embedded digits dataset, ~1 minute on 2 CPU cores)
#               make test       (set up + run the test suite)
#               make notebooks  (set up + execute both notebooks to outputs/notebooks/*.html)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
FASHION_MNIST := /usr/share/datasets/fashion-mnist

NOTEBOOKS := notebooks/time_to_loss.ipynb notebooks/variance_reduction.ipynb

.PHONY: setup train test lint data slurm notebooks clean

setup: $(VENV)/.installed

# The venv is (re)built when it is missing or the requirements change.
$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

# Fashion-MNIST offline: Debian's dataset-fashion-mnist package (the tests use its files).
data:
	@if [ -d $(FASHION_MNIST) ]; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	else echo "note: Fashion-MNIST tests need 'sudo apt-get install dataset-fashion-mnist' (skipped without it)"; fi

# A real SLURM cluster for tests/test_slurm.py (scripts/local_slurm.sh starts it): Debian's packages.
slurm:
	@if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge; \
	else echo "note: SLURM tests need 'sudo apt-get install slurm-wlm munge' (skipped without it)"; fi

train: setup
	$(PY) train.py $(ARGS)

test: setup data slurm
	$(PY) -m pytest $(ARGS)

# Executes the notebooks as they are committed (SWEEP_DIR / RUN_DIR from the environment, relative
# to this directory; defaults: the newest sweep under multirun/ and the reference results) into
# HTML under outputs/notebooks/; the committed notebooks are never rewritten.
notebooks: setup
	$(PY) -m jupyter nbconvert --to html --execute --output-dir outputs/notebooks $(NOTEBOOKS)

lint: setup
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

clean:
	rm -rf $(VENV) outputs multirun
