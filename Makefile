# Quick start:  make train      (set up + train on the embedded digits dataset, ~30 s after set-up)
#               make test       (set up + the whole test suite, as CI runs it)
#               make test-fast  (the tests not marked slow: the inner loop while changing code)
#               make notebooks  (set up + execute both notebooks to outputs/notebooks/*.html)
#               make bench      (every performance figure of docs/benchmarks.md, on an idle machine)
#               make gpu-check  (every GPU figure, on a machine with a GPU: results/gpu_<name>.md)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
FASHION_MNIST := /usr/share/datasets/fashion-mnist

NOTEBOOKS := notebooks/time_to_loss.ipynb notebooks/variance_reduction.ipynb

.PHONY: setup train test test-fast lint data slurm notebooks bench gpu-check clean

setup: $(VENV)/.installed

# The venv is (re)built when it is missing or the requirements change: the package with every
# extra (pyproject.toml's [dev] = [all] + pytest, ruff), at the versions pinned in requirements.txt.
$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c requirements.txt -e ".[dev]"
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

# pytest-xdist: one worker per core and one more (many tests wait on a SLURM queue, a pip
# install or a child process; on 2 cores, two more was slower); a module's (or class's)
# tests stay on one worker, so that its fixtures, e.g. one SLURM cluster or one sweep, are made
# once; the longest start first (tests/conftest.py's FIRST, kept by --no-loadscope-reorder).
WORKERS ?= $(shell echo $$(( $$(nproc 2>/dev/null || echo 1) + 1 )))
test: setup data slurm
	$(PY) -m pytest -n $(WORKERS) --dist loadscope --no-loadscope-reorder $(ARGS)

test-fast: setup data
	$(PY) -m pytest -n $(WORKERS) --dist loadscope --no-loadscope-reorder -m "not slow" $(ARGS)

# Executes the notebooks as they are committed (SWEEP_DIR / RUN_DIR from the environment, relative
# to this directory; defaults: the newest sweep under multirun/ and the reference results) into
# HTML under outputs/notebooks/; the committed notebooks are never rewritten.
notebooks: setup
	$(PY) -m jupyter nbconvert --to html --execute --output-dir outputs/notebooks $(NOTEBOOKS)

# Timed: run them on an otherwise idle machine (the report says how much of it they got).
bench: setup data
	$(PY) scripts/bench.py --out results/bench_cpu.md $(ARGS)

gpu-check: setup
	$(PY) scripts/gpu_check.py $(ARGS)

lint: setup
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

clean:
	rm -rf $(VENV) outputs multirun
