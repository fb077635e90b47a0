"""searchlab: hyperparameter search and tracking for deep-learning optimization (Hydra + Lightning + Optuna + MLflow).

The Python API, for notebooks and scripts; the `searchlab` command is built on the same functions:

    import searchlab
    study = searchlab.search(["study.n_trials=20", "model=net1d"], config_dir="conf")
    result = searchlab.train(["optimizer=adamw", "optimizer.lr=0.003"])
    result.module      # the trained LightningModule
    result.history     # per-epoch metrics

Arguments are Hydra overrides, as on the command line. Bad input raises searchlab.ConfigError (one line).
Heavy packages are imported on first use, so `import searchlab` is quick.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from searchlab.config import ConfigError, project

if TYPE_CHECKING:
    import optuna

    from searchlab.training import TrainResult

__all__ = ["ConfigError", "search", "train"]


def search(overrides: Sequence[str] = (), config_dir: str | os.PathLike | None = None) -> optuna.Study:
    """Runs (or resumes) the study the overrides name, as `searchlab search` does (report included), and returns
    the Optuna study: `study.best_trial`, `study.trials_dataframe()`, ... (with several metrics in study.metric,
    `study.best_trials` is the Pareto front)."""
    from searchlab import commands

    with project(config_dir):
        return commands.search(list(overrides)).study


def train(overrides: Sequence[str] = (), config_dir: str | os.PathLike | None = None,
          quiet: bool = False) -> TrainResult:
    """Trains one configuration, as `searchlab train` does, and returns its TrainResult: per-epoch `history`,
    `test` metrics, `best(metric, direction)` and the trained LightningModule as `module`."""
    from searchlab import commands

    with project(config_dir):
        return commands.train(list(overrides), quiet=quiet)
