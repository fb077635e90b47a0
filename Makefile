# searchlab: `make search` tunes the default study, `make test` runs the tests. Both install what is missing first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
ARGS ?=
BENCH_ARGS ?=
# The stores `make ui`, `make dashboard` open (the defaults of tracking.uri and study.storage in conf/) and their ports.
TRACKING_URI ?= sqlite:///mlruns/mlflow.db
STUDY_STORAGE ?= mlruns/optuna.journal
UI_PORT ?= 5000
DASHBOARD_PORT ?= 8080

# Exact versions for this project's machines; pyproject.toml keeps ranges for everyone else.
# torch==2.13.0 is pinned so pip takes the CPU build on disk instead of pulling GBs of CUDA packages.
# psycopg (3): SQLAlchemy 2.1 opens plain postgresql:// URLs with it, not psycopg2 (Optuna's storage, mlflow server).
PINS := torch==2.13.0 optuna==5.0.0 mlflow==3.17.2 pytorch-lightning==2.6.6 lightning==2.6.6 hydra-core==1.3.8 \
        scikit-learn==1.9.1 numpy==2.4.6 pytest==9.2.0 pytest-timeout==2.4.0 pytest-xdist==3.8.0 execnet==2.1.2 ruff==0.17.6 import-linter==2.17 \
        plotly==7.1.0 optuna-dashboard==0.21.0 selenium==4.50.0 psycopg2-binary==2.9.13 grpcio==1.85.1 \
        psycopg==3.3.9 psycopg-binary==3.3.9

.PHONY: install system search train test test-fast e2e lint ui dashboard bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(PINS)
	# compat: the checkout on sys.path, so Hydra's plugin scan (pkgutil) finds hydra_plugins/searchlab_sweeper;
	# setuptools' default editable finder hides namespace packages from pkgutil.
	$(BIN)/python -m pip install --quiet --no-deps -e . --config-settings editable_mode=compat
	touch $@

search: install
	$(BIN)/searchlab search $(ARGS)

train: install
	$(BIN)/searchlab train $(ARGS)

# Debian packages for the tests' real servers and browser (PostgreSQL, Chromium); a no-op once installed.
system:
	bash .ci/debian-packages

# Two pytest-xdist workers, each test file on one of them (a module's shared study trains once), the heaviest files
# first (tests/conftest.py orders them). Tests in the test process train with one torch thread each; the processes
# a test starts (searchlab workers, servers, SLURM) share the cores with the other worker's test.
# Serial as before: make test TEST_WORKERS=0.
TEST_WORKERS ?= 2
PARALLEL := $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder,)

# --durations=25: the slowest tests, so CI's log shows where the suite's time goes.
test: install system lint
	$(MAKE) docs-check
	$(BIN)/python -m pytest -m "not e2e" $(PARALLEL) --durations=25 $(ARGS)

# The fast tier: no real servers, SLURM, DDP ranks or slow multi-process studies; no system packages needed.
test-fast: install
	$(BIN)/python -m pytest -m "not slow and not cluster and not ddp and not slurm and not e2e" $(PARALLEL) \
		--durations=25 $(ARGS)

# The documentation site (README.md is its front page, pages in docs/, mkdocs.yml) into site/; `docs-check` builds it
# with --strict into a scratch folder (a broken link or anchor fails), as `make test` does. Pinned like PINS.
DOCS_PINS := mkdocs==1.6.1 mkdocs-material==9.8.2
.PHONY: docs docs-check

$(VENV)/.docs-installed: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet $(DOCS_PINS)
	touch $@

docs: $(VENV)/.docs-installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

docs-check: $(VENV)/.docs-installed
	@site=$$(mktemp -d) && NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir $$site; rc=$$?; rm -rf $$site; exit $$rc

# The browser test: a tiny study, `make ui` on a free port, headless Chromium; screenshots in tests/artifacts/.
e2e: install system
	$(BIN)/python -m pytest -m e2e $(ARGS)

# Benchmarks (never part of `make test`): overhead, search efficiency, scaling, the sampler/pruner comparison
# (methods), the cost of checkpoints and packed trials; writes bench/results.md and the plots.
# ~45 min on a 2-core machine with the defaults, plus 1.5-3 h for part "methods" (issue 12's sampler/pruner comparison);
# smaller: make bench BENCH_ARGS="--parts overhead,checkpoints,packing" or BENCH_ARGS="--parts methods --methods-seeds 2"
bench: install
	$(BIN)/python -m bench $(BENCH_ARGS)

# On a machine with an NVIDIA GPU, at most ~8 min: the tests marked gpu, the overhead and packing parts on the GPU,
# one table (printed, in bench/out/gpu-check.md and bench/results.md). Without a GPU: one line, exit 2.
GPU_CHECK_ARGS ?=
.PHONY: gpu-check
gpu-check: install
	@$(BIN)/python -m bench.gpu_check $(GPU_CHECK_ARGS)

# ruff, then the architecture contracts in pyproject.toml ([tool.importlinter]): layers, no circles.
lint: install
	$(BIN)/ruff check searchlab tests bench hydra_plugins examples
	$(BIN)/lint-imports

# One worker and no job runner (the GenAI job queue starts ~8 more processes): a light local viewer. Trial artifacts
# are read from the experiments' own file:// locations, so no artifact flags are needed.
ui: install
	@echo "MLflow UI on http://127.0.0.1:$(UI_PORT) (Ctrl-C to stop); pick 'Model training' at the top left for the runs"
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(BIN)/mlflow ui --backend-store-uri $(TRACKING_URI) \
		--host 127.0.0.1 --port $(UI_PORT) --workers 1

# optuna-dashboard reads a journal file path or an RDB URL directly (it tells the two apart itself).
dashboard: install
	@case "$(STUDY_STORAGE)" in *://*) ;; *) test -f "$(STUDY_STORAGE)" || \
		{ echo "make dashboard: no study storage at $(STUDY_STORAGE): run make search first" >&2; exit 2; } ;; esac
	@echo "optuna-dashboard on http://127.0.0.1:$(DASHBOARD_PORT) (Ctrl-C to stop)"
	$(BIN)/optuna-dashboard "$(STUDY_STORAGE)" --host 127.0.0.1 --port $(DASHBOARD_PORT) --server wsgiref

clean:
	find mlruns -mindepth 1 ! -name .gitkeep -exec rm -rf {} +
