# searchlab: `make search` tunes the default study, `make test` runs the tests. Both install what is missing first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
ARGS ?=
UI_PORT ?= 5000

# Exact versions for this project's machines; pyproject.toml keeps ranges for everyone else.
# torch==2.13.0 is pinned so pip takes the CPU build on disk instead of pulling GBs of CUDA packages.
# psycopg (3): SQLAlchemy 2.1 opens plain postgresql:// URLs with it, not psycopg2 (Optuna's storage, mlflow server).
PINS := torch==2.13.0 optuna==5.0.0 mlflow==3.17.2 pytorch-lightning==2.6.6 hydra-core==1.3.8 \
        scikit-learn==1.9.1 numpy==2.4.6 pytest==9.2.0 ruff==0.17.6 \
        plotly==7.1.0 optuna-dashboard==0.21.0 selenium==4.50.0 psycopg2-binary==2.9.13 grpcio==1.85.1 \
        psycopg==3.3.9 psycopg-binary==3.3.9

.PHONY: install system search train test lint ui clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(PINS)
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $@

search: install
	$(BIN)/searchlab search $(ARGS)

train: install
	$(BIN)/searchlab train $(ARGS)

# Debian packages for the tests' real servers and browser (PostgreSQL, Chromium); a no-op once installed.
system:
	bash .ci/debian-packages

test: install system
	$(BIN)/ruff check searchlab tests
	$(BIN)/python -m pytest $(ARGS)

lint: install
	$(BIN)/ruff check searchlab tests

ui: install
	@echo "MLflow UI on http://127.0.0.1:$(UI_PORT) (Ctrl-C to stop)"
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db --host 127.0.0.1 --port $(UI_PORT)

clean:
	find mlruns -mindepth 1 ! -name .gitkeep -exec rm -rf {} +
