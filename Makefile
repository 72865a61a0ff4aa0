# The two commands of the README: each creates .venv and installs the package with
# the tested versions (constraints.txt pins torch==2.13.0, the local CPU wheel) first.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

# make train ENV=... ALLOCATOR=... STEPS=... SEED=... N_ENVS=... (N_ENVS empty: the zoo config's)
ENV ?= mamujoco:HalfCheetah-2x3
ALLOCATOR ?= uniform
STEPS ?= 100000
SEED ?= 0
N_ENVS ?=
# a short logger table every LOG_INTERVAL iterations (the per-agent figures are in the final summary)
LOG_INTERVAL ?= 5
LOG_FOLDER ?= logs
TRAIN_ARGS ?=
# make test PYTEST_ARGS="-k kkt"
PYTEST_ARGS ?=

.PHONY: install train test slow-test lint format clean

install: $(STAMP)

$(STAMP): setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[all]"
	touch $(STAMP)

train: $(STAMP)
	WANDB_MODE=$${WANDB_MODE:-offline} $(PY) -m sb3_hatrpo.train --env $(ENV) --allocator $(ALLOCATOR) \
		-n $(STEPS) --seed $(SEED) $(if $(N_ENVS),--n-envs $(N_ENVS)) -f $(LOG_FOLDER) --log-interval $(LOG_INTERVAL) --track \
		$(TRAIN_ARGS)

test: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

slow-test: $(STAMP)
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check sb3_hatrpo tests benchmarks
	$(VENV)/bin/ruff format --check sb3_hatrpo tests benchmarks
	$(VENV)/bin/mypy sb3_hatrpo

format: $(STAMP)
	$(VENV)/bin/ruff format sb3_hatrpo tests benchmarks
	$(VENV)/bin/ruff check --fix sb3_hatrpo tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
