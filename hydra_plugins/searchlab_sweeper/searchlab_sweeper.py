"""`hydra/sweeper=searchlab`: searchlab as the sweeper of an existing `@hydra.main` app.

Hydra imports every module of the `hydra_plugins` namespace package at start (of any Hydra app where searchlab is
installed), so this one stays light: the sweeper class, its ConfigStore entry, and nothing heavy at import. The work
is in `_impl` (settings and their checks in `_settings`).

The entry's keys mirror searchlab's own config groups, with their defaults (searchlab's conf/study/default.yaml,
conf/tracking/mlflow.yaml, conf/report/default.yaml): `study.*`, `tracking.*`, `report.*`, `workers`, the search
space inline as `space:` (searchlab's space format) or `search: FILE`, and `callbacks_key`, the app's config key
whose `_target_` entries its Trainer gets as callbacks (where the sweeper adds searchlab.hydra.TrialCallback);
`ckpt_path_key`, `checkpoint_every_n_epochs` and `checkpoint_auto_seconds` say how a killed job's retry resumes.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

EXIT_BAD_INPUT = 2  # as searchlab's CLI

# Two interpolations of searchlab's defaults point at its own config's keys; under hydra.sweeper they must point at
# the app's (its trainer, when it has one) and at the sweeper's own report settings.
_REWRITES = {"${trainer.max_epochs}": "${oc.select:trainer.max_epochs,auto}", "${report.top_k}": "${..report.top_k}"}


def searchlab_conf() -> Path:
    """searchlab's conf/ folder, found without importing searchlab (which Hydra's plugin scan would pay for in
    every app): the wheel's searchlab/conf, else a checkout's conf/."""
    spec = importlib.util.find_spec("searchlab")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("hydra/sweeper=searchlab needs the searchlab package installed")
    package = Path(next(iter(spec.submodule_search_locations)))
    return package / "conf" if (package / "conf").is_dir() else package.parent / "conf"


def group_defaults(group: str, option: str) -> DictConfig:
    text = (searchlab_conf() / group / f"{option}.yaml").read_text()
    for old, new in _REWRITES.items():
        text = text.replace(old, new)
    return OmegaConf.create(text)


def sweeper_defaults() -> dict[str, Any]:
    """The ConfigStore entry: searchlab's defaults, so `hydra.sweeper.study.n_trials=10` works from the command line."""
    return {
        "_target_": f"{__name__}.SearchlabSweeper",
        "_recursive_": False,  # study.samplers and study.pruners hold `_target_` entries searchlab builds itself
        "study": group_defaults("study", "default"),
        "space": None,  # searchlab's space format, inline: {model.optimizer.lr: {low: 1.0e-4, high: 0.1, log: true}}
        "search": None,  # or a YAML file of that format (relative to the current folder or the app's config folder)
        "tracking": group_defaults("tracking", "mlflow"),
        "report": group_defaults("report", "default"),
        "workers": "auto",  # N processes on the study (basic launcher), or auto: one per GPU; batches elsewhere
        "callbacks_key": "callbacks",  # where the app's Trainer callbacks come from (lightning-hydra-template's)
        # A killed or terminated job's retry resumes from its trial's checkpoint, through the app's own config key
        # that its `trainer.fit(ckpt_path=...)` reads (lightning-hydra-template's); null: no checkpoints.
        "ckpt_path_key": "ckpt_path",
        "checkpoint_every_n_epochs": "auto",  # as searchlab's trainer.checkpoint_every_n_epochs
        "checkpoint_auto_seconds": 30,  # as searchlab's trainer.checkpoint_auto_seconds
        "worker": False,  # set by the sweeper for the worker processes it starts
    }


ConfigStore.instance().store(group="hydra/sweeper", name="searchlab", node=sweeper_defaults(), provider="searchlab")


class SearchlabSweeper(Sweeper):
    """Runs an Optuna study over the app's jobs with searchlab's session: budget, pruning, workers, MLflow runs."""

    def __init__(self, **settings: Any) -> None:
        # Checked in sweep(), so that a bad setting is one line (and exit code 2), not Hydra's instantiation error.
        self.settings = settings
        self.hydra_context: HydraContext | None = None
        self.config: DictConfig | None = None
        self.launcher: Any = None
        self.task_function: TaskFunction | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context, self.config, self.task_function = hydra_context, config, task_function
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> Any:
        """Checks every setting (one line on stderr and exit code 2 for bad input, before any store is written),
        then runs the study."""
        from searchlab.config import ConfigError, redact

        try:
            from ._settings import read_settings  # light: a bad setting is told before the training modules load

            settings = read_settings(self.settings, arguments, self.hydra_context.config_loader, self.config)
            from ._impl import Sweep

            return Sweep(self, settings).run()
        except ConfigError as err:
            print(f"searchlab: error: {redact(str(err))}", file=sys.stderr, flush=True)
            sys.exit(EXIT_BAD_INPUT)
