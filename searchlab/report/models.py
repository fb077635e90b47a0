"""The trained model out of a study or a training: weights kept, logged to MLflow as a model, exported to a folder.

Every training keeps the weights of its best validation epoch in memory (searchlab.training.lightning: a CPU copy of the
LightningModule's state_dict on each improving epoch) and tests with them. What reaches MLflow:

- A trial that finishes among the k best complete trials of the study so far (k = 1 for tracking.log_models=best,
  tracking.top_k for top_k; with several objectives, a trial that no complete trial dominates) saves those weights
  to its run's artifacts (weights/best.pt), in the process that ran it: the search itself, a worker of
  `search workers=N`, or a worker on another machine. A trial in the study's final top k (or front) was also in the
  top k (or front) of the trials that finished before it, so every final one has its weights; the cost is one
  small artifact per trial that enters the top k, not per trial.
- At the end of the study (the `search` parent once the budget is used; `searchlab report` for workers started by
  hand), each of the final top k trials (with several objectives: of the Pareto front, up to tracking.top_k, best
  first metric first) gets a module built from its config with those weights, logged to its child
  run as the MLflow model `model` (signature, input example; the best one registered when tracking.register_model
  names it). A trial that already has its model is skipped, so a resumed study or a second report logs nothing twice.

Why the worker that ran the trial saves its weights, rather than the parent re-training the best configuration:
re-training costs one more trial (hours, for a long one), and on a GPU it does not give the same weights
(nondeterministic kernels), so the logged model would not be the one whose value the study reports. Saving state
dicts, not MLflow models, per trial keeps the Models column to the trials that end in the top k, and the per-trial
cost to a torch.save (the export with torch.export, ~0.5-2 s, runs once per logged model, at the end).
"""

from __future__ import annotations

import sys
from pathlib import Path

import optuna
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from optuna.trial import FrozenTrial, TrialState

from searchlab.attrs import MLFLOW_RUN_ID, OVERRIDES
from searchlab.config import ConfigError, Objectives, compose_config
from searchlab.data import Splits
from searchlab.tracking import Tracker, save_model
from searchlab.training import TrainResult, Weights
from searchlab.training.build import build_module, data_shape, load_data, module_task
from searchlab.training.data_checks import first_batch

EXAMPLE_SIZE = 2  # input example rows: a batch of 2 gives the exported model a dynamic batch dimension (batch 1: not)


def models_to_log(tracking: DictConfig, several: bool = False) -> int:
    """How many of the best trials get their model logged: tracking.log_models as a count (0 for none). A study of
    several objectives has no one best trial: `best` (and `top_k`) mean its Pareto front, capped at tracking.top_k."""
    choice = OmegaConf.select(tracking, "log_models", default="best")
    if choice == "none":
        return 0
    return int(OmegaConf.select(tracking, "top_k", default=1)) if choice == "top_k" or several else 1


def check_export_dir(path: str | Path) -> Path:
    """--export DIR: a folder that does not exist yet or is empty (checked before anything is trained)."""
    folder = Path(path)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise ConfigError(f"--export: '{folder}' already exists and is not an empty folder; name a new one")
    if not folder.parent.exists():
        raise ConfigError(f"--export: the folder '{folder.parent}' that should hold '{folder.name}' does not exist")
    return folder


def export(path: Path, module: torch.nn.Module, example: torch.Tensor) -> str:
    """The module as an MLflow model in `path` (load it with mlflow.pytorch.load_model(path)); returns its format."""
    if path.exists():
        path.rmdir()  # empty (check_export_dir): MLflow makes the folder itself
    return save_model(path, module, example)


def example_input(data: Splits | pl.LightningDataModule) -> torch.Tensor:
    """A few inputs of the data on the CPU: the model's input example and the source of its signature."""
    if isinstance(data, Splits):
        x = data.x_val if len(data.x_val) >= EXAMPLE_SIZE else data.x_train
    else:
        x = first_batch(data)[0]
    return x[:EXAMPLE_SIZE].detach().cpu()


def module_with_weights(cfg: DictConfig, weights: Weights) -> tuple[pl.LightningModule, torch.Tensor]:
    """The config's module built (as a training builds it, without a Trainer) with the weights loaded, and an input
    example of its data."""
    data = load_data(cfg)
    module = build_module(cfg, data_shape(data, module_task(cfg)), None)
    module.load_state_dict(weights.state)
    return module, example_input(data)


class KeepWeights:
    """Called by a trial that finished COMPLETE, before it is told: saves its best-epoch weights to its run when its
    value is among the k best of the study's complete trials (see the module's docstring); with several objectives,
    when no complete trial dominates its values (it is on the Pareto front so far, so it may be on the final one)."""

    def __init__(self, study: optuna.Study, tracker: Tracker, k: int, objectives: Objectives) -> None:
        self.study, self.tracker, self.k, self.objectives = study, tracker, k, objectives
        self.maximize = objectives.direction == "maximize"

    def __call__(self, number: int, run_id: str, result: TrainResult, value: float | list[float]) -> bool:
        if self.k <= 0 or result.weights is None:
            return False
        complete = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if isinstance(value, list):
            if any(self.objectives.dominates(t.values, value) for t in complete if t.number != number and t.values):
                return False
        elif sum(1 for t in complete if t.number != number and t.value is not None
                 and (t.value > value if self.maximize else t.value < value)) >= self.k:
            return False
        try:
            self.tracker.save_weights(run_id, result.weights.to_bytes())
        except Exception as err:  # the trial itself is fine: it is told as it ended; only its model is lost
            print(f"searchlab: trial {number}: best weights not saved ({type(err).__name__}: {str(err)[:200]}); "
                  "its model cannot be logged or exported", file=sys.stderr, flush=True)
            return False
        return True


def top_trials(study: optuna.Study, k: int) -> list[FrozenTrial]:
    """The k best complete trials, best first; with several objectives, the Pareto front's, best first metric first."""
    if len(study.directions) > 1:
        return Objectives.of_study(study, ()).front(study)[:k]
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    return sorted(complete, key=lambda t: (-t.value if maximize else t.value, t.number))[:k]


def trial_weights(trial: FrozenTrial, tracker: Tracker) -> Weights | None:
    run_id = trial.user_attrs.get(MLFLOW_RUN_ID)
    data = None if run_id is None else tracker.load_weights(run_id)
    return None if data is None else Weights.from_bytes(data)


def trial_module(trial: FrozenTrial, tracker: Tracker) -> tuple[pl.LightningModule, torch.Tensor] | None:
    """The trial's module with its saved best-epoch weights, or None when none were saved."""
    weights = trial_weights(trial, tracker)
    if weights is None:
        return None
    return module_with_weights(compose_config(list(trial.user_attrs.get(OVERRIDES, []))), weights)


def log_study_models(study: optuna.Study, tracking: DictConfig, tracker: Tracker) -> list[str]:
    """Logs the models of the study's top trials (tracking.log_models) to their runs; returns lines to print."""
    lines = []
    register_as = OmegaConf.select(tracking, "register_model", default=None)
    for rank, trial in enumerate(top_trials(study, models_to_log(tracking, len(study.directions) > 1))):
        run_id = trial.user_attrs.get(MLFLOW_RUN_ID)
        if run_id is None or tracker.logged_model(run_id) is not None:
            continue
        built = trial_module(trial, tracker)
        if built is None:
            lines.append(f"model: trial {trial.number} has no saved weights (run before searchlab kept them); "
                         f"not logged")
            continue
        info = tracker.log_model(run_id, *built, register_as=register_as if rank == 0 else None)
        registered = f", registered as {register_as} v{info.registered_version}" if rank == 0 and register_as else ""
        note = f" ({info.note})" if info.note else ""
        lines.append(f"model: trial {trial.number} -> {info.uri} ({info.serialization}, {info.seconds:.1f}s"
                     f"{registered}){note}")
    return lines


def export_best(study: optuna.Study, tracker: Tracker, path: Path) -> FrozenTrial:
    """The best trial's model (its saved best-epoch weights) as an MLflow model in the folder `path`."""
    top = top_trials(study, 1)
    if not top:
        raise ConfigError(f"study.name: study '{study.study_name}' has no complete trial yet; run or resume it first")
    best = top[0]
    built = trial_module(best, tracker)
    if built is None:
        raise ConfigError(f"--export: trial {best.number} has no saved weights in its MLflow run; re-train it with "
                          f"`searchlab train {' '.join(best.user_attrs.get(OVERRIDES, []))} --export {path}`")
    export(path, *built)
    return best

