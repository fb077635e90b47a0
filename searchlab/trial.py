"""One trial: sample the space, compose its config, train with per-epoch reporting and pruning, tell the study.

The trial's MLflow child run exists from its first moment, so a trial that crashes or is interrupted still shows,
with its state and reason, next to the finished ones.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shlex
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from omegaconf import DictConfig
from optuna.trial import TrialState

from searchlab import checkpoints
from searchlab.attrs import (
    EPOCHS_TRAINED,
    MLFLOW_RUN_ID,
    OVERRIDES,
    REASON,
    RESUMED_FROM_EPOCH,
    checkpoint_of,
    retry_attrs,
)
from searchlab.config import Composer, format_override, user_config_dir
from searchlab.data import Splits
from searchlab.faults import heartbeat
from searchlab.interrupts import terminated
from searchlab.lightning_fit import TrainResult
from searchlab.objectives import Objectives, first_value
from searchlab.space import SearchSpace
from searchlab.storage import one_sync
from searchlab.tracking import Tracker, config_yaml
from searchlab.training import fit


@dataclass(frozen=True)
class TrialOutcome:
    number: int
    state: str  # COMPLETE, PRUNED or FAIL
    value: float | None  # with several objectives, the first metric's
    seconds: float
    reason: str | None
    params: dict[str, Any]
    resumed_from: int | None = None  # the epoch of the checkpoint this attempt resumed from
    values: tuple[float, ...] | None = None  # with several objectives, all of them


# Called for a trial that finished COMPLETE, before it is told: (number, run id, result, value or values) -> whether
# it kept the trial's weights (searchlab.model_out.KeepWeights).
KeepModel = Callable[[int, str, TrainResult, "float | list[float]"], bool]

# Overrides of these keys shape the study, not the training: the re-run command leaves them out.
_STUDY_ONLY = ("study", "tracking", "search", "workers", "report")


def training_overrides(overrides: list[str]) -> list[str]:
    """The overrides that shape the training; study and tracking settings (URLs, passwords) are left out."""
    return [o for o in overrides if o.lstrip("+~").split("=", 1)[0].split(".", 1)[0] not in _STUDY_ONLY]


def train_command(overrides: list[str]) -> str:
    """The shell command that trains this configuration alone (with the --config-dir this command was given, as the
    user wrote it where it lies under the current folder)."""
    folder = user_config_dir()
    flag: list[str] = []
    if folder is not None:
        flag = ["--config-dir", os.path.relpath(folder) if folder.is_relative_to(Path.cwd()) else str(folder)]
    return " ".join(["searchlab", "train", *(shlex.quote(o) for o in [*flag, *training_overrides(overrides)])])


class TrialRunner:
    """Runs trials of one study, sharing the composed-config cache, the data and the tracker between them."""

    def __init__(self, study: optuna.Study, cfg: DictConfig, direction: str, base_overrides: list[str],
                 composer: Composer, space: SearchSpace, splits: Splits | None, tracker: Tracker,
                 parent_run_id: str, keep: KeepModel | None = None) -> None:
        """`splits`: the resident data on the training device, or None when `data` is a LightningDataModule.
        `keep` saves a finished trial's best weights when they may be logged at the study's end."""
        self.study, self.cfg, self.base_overrides = study, cfg, base_overrides
        self.composer, self.space, self.splits = composer, space, splits
        self.tracker, self.parent_run_id, self.keep = tracker, parent_run_id, keep
        self.objectives = Objectives.of(cfg.study)
        self.metric, self.direction = self.objectives.primary, direction
        self.use_grid = cfg.study.sampler == "grid"

    def run(self, trial: optuna.Trial | None = None) -> TrialOutcome:
        """One trial (asked here unless given) to tell; whatever happens after ask, the trial is told and its run
        terminated."""
        start = time.perf_counter()
        with one_sync(self.study._storage):  # its journal writes fsynced once, at its end (also in run_trials)
            trial = self.study.ask() if trial is None else trial
            with heartbeat(trial):  # lets other workers see this one is alive (RDB and grpc:// storages; see faults)
                return self._run(trial, start)

    def _run(self, trial: optuna.Trial, start: float) -> TrialOutcome:
        values: dict[str, Any] = {}
        run_id: str | None = None
        try:
            values = self.space.sample(trial, self.use_grid)
            trial_cfg, run_id = self.start(trial, values)
        except BaseException as err:  # the trial fails, the study goes on; an interrupt also stops the study
            return self.fail(trial, run_id, err, start, values)
        return self.train(trial, values, trial_cfg, run_id, start)

    def train(self, trial: optuna.Trial, values: dict[str, Any], trial_cfg: DictConfig, run_id: str,
              start: float) -> TrialOutcome:
        """Trains a started trial alone (resuming its checkpoint when an earlier attempt left one) and tells it."""
        plan: checkpoints.CheckpointPlan | None = None
        try:
            plan = self._checkpoint_plan(trial, trial_cfg, run_id)
            reporter = EpochReporter(trial, run_id, self.tracker, self.objectives)
            result = fit(trial_cfg, self.splits, reporter, metric=self.metric, checkpoint=plan)
        except BaseException as err:
            return self.fail(trial, run_id, err, start, values, plan)
        return self.conclude(trial, run_id, result, reporter.pruned, time.perf_counter() - start, values, plan)

    def start(self, trial: optuna.Trial, values: dict[str, Any]) -> tuple[DictConfig, str]:
        """The trial's config from its sampled values, and its MLflow run (started; the trial's user attrs name
        it and the overrides that re-run it)."""
        overrides = training_overrides(self.base_overrides + [format_override(k, v) for k, v in values.items()])
        trial_cfg = self.composer(values)
        run_id = self.tracker.start_trial(
            self.parent_run_id, trial.number, values, config_yaml(trial_cfg), train_command(overrides))
        trial.set_user_attr(MLFLOW_RUN_ID, run_id)
        trial.set_user_attr(OVERRIDES, overrides)
        return trial_cfg, run_id

    def fail(self, trial: optuna.Trial, run_id: str | None, err: BaseException, start: float,
             values: dict[str, Any], plan: checkpoints.CheckpointPlan | None = None) -> TrialOutcome:
        """Tells the trial FAIL with the error as its reason; an interrupt (Ctrl-C, SIGTERM) re-queues a trial
        with a checkpoint and is raised again as KeyboardInterrupt, to stop the study."""
        interrupted = isinstance(err, (KeyboardInterrupt, SystemExit))
        reason = _describe(err)
        if interrupted:
            reason = ("terminated (SIGTERM)" if terminated() else "interrupted") + self._requeue(trial, plan)
        else:
            checkpoints.remove(plan)
        self._finish(trial, run_id, TrialState.FAIL, None, reason)
        if interrupted:
            signal.signal(signal.SIGINT, signal.default_int_handler)  # Lightning ignores SIGINT after one
            raise KeyboardInterrupt from None
        return TrialOutcome(trial.number, "FAIL", None, time.perf_counter() - start, reason, values)

    def conclude(self, trial: optuna.Trial, run_id: str, result: TrainResult, pruned: bool, seconds: float,
                 values: dict[str, Any], plan: checkpoints.CheckpointPlan | None = None) -> TrialOutcome:
        """Tells a trained trial: PRUNED (by the pruner, or diverged), FAIL without a finite value, else COMPLETE
        (its weights kept when they may be logged)."""
        checkpoints.remove(plan)  # finished: nothing to resume
        if RESUMED_FROM_EPOCH in trial.user_attrs:  # what the retry trained (a trial from epoch 0: all its epochs)
            trial.set_user_attr(EPOCHS_TRAINED, len(result.history) - trial.user_attrs[RESUMED_FROM_EPOCH])
        value = self.objectives.values_of(result)
        if pruned or result.stop_reason:
            # Diverged runs are pruned, not failed: they count toward the budget, and the sampler learns from them.
            state, reason, value = TrialState.PRUNED, result.stop_reason, None
        elif value is None:
            state = TrialState.FAIL
            reason = (f"no finite {', '.join(self.objectives.names)} in any epoch"
                      + (f" ({result.ended})" if result.ended else ""))
        else:
            # A limit of its own (trainer.max_time, early stopping) ends a trial complete, with the reason.
            state, reason = TrialState.COMPLETE, result.ended
            if self.keep is not None:
                self.keep(trial.number, run_id, result, value)
        self._finish(trial, run_id, state, value, reason)
        several = tuple(value) if isinstance(value, list) else None
        return TrialOutcome(trial.number, state.name, first_value(value), seconds, reason, values,
                            trial.user_attrs.get(RESUMED_FROM_EPOCH), several)

    def _checkpoint_plan(self, trial: optuna.Trial, trial_cfg: DictConfig, run_id: str) -> checkpoints.CheckpointPlan:
        """Where this trial's checkpoint lives (one folder per trial and its retries), and whether a checkpoint left
        by an earlier attempt with the same params is there to resume: then the new run and the pruner get the
        epochs already trained, and the training goes on from the next one."""
        owner = {"params": dict(trial.params), "run_id": run_id, "trial": trial.number}
        plan = checkpoints.trial_plan(trial_cfg, checkpoint_of(trial), owner)
        saved = checkpoints.read_saved(plan.path)
        if saved is None or saved.owner.get("params") != owner["params"]:
            checkpoints.remove(plan)  # none, or another study's under the same name and number
            return plan
        trial.set_user_attr(RESUMED_FROM_EPOCH, saved.epoch)
        self.tracker.resume_trial(run_id, saved.epoch, saved.owner.get("run_id"), saved.history)
        for epoch, metrics in enumerate(saved.history, 1):  # the pruner sees the epochs trained before
            if not self.objectives.several and math.isfinite(metrics.get(self.metric, math.nan)):
                trial.report(metrics[self.metric], epoch)
        return dataclasses.replace(plan, resume=True)

    def _requeue(self, trial: optuna.Trial, plan: checkpoints.CheckpointPlan | None) -> str:
        """An interrupted trial with a checkpoint is queued again with its params: the next run of the study resumes
        it from there. Returns what the reason should add."""
        saved = None if plan is None else checkpoints.read_saved(plan.path)
        if saved is None:
            return ""
        self.study.enqueue_trial(dict(trial.params), user_attrs=retry_attrs(trial))
        return f"; resumable from its checkpoint of epoch {saved.epoch} (re-queued)"

    def _finish(self, trial: optuna.Trial, run_id: str | None, state: TrialState,
                value: float | list[float] | None, reason: str | None) -> None:
        if reason:
            trial.set_user_attr(REASON, reason)
        self.study.tell(trial, value, state=state)
        if run_id is None:  # failed or interrupted before its run was made: every finished trial has one
            run_id = self.tracker.start_trial(self.parent_run_id, trial.number, trial.params, "", "")
        if isinstance(value, list):  # several objectives: each as objective.<metric>; `objective` is the first
            self.tracker.log_epoch(run_id, 0, {f"objective.{n}": v for n, v in zip(self.objectives.names, value,
                                                                                    strict=True)})
        self.tracker.end_trial(run_id, state.name, first_value(value), reason)


class EpochReporter:
    """The per-epoch hook of one trial: logs the epoch to its MLflow run and reports its value to the pruner; returns
    the reason to stop when the pruner says so (`pruned` then stays True)."""

    def __init__(self, trial: optuna.Trial, run_id: str, tracker: Tracker, objectives: Objectives) -> None:
        self.trial, self.run_id, self.tracker, self.objectives = trial, run_id, tracker, objectives
        self.pruned = False

    def __call__(self, epoch: int, metrics: dict[str, float]) -> str | None:
        self.tracker.log_epoch(self.run_id, epoch, metrics)
        if self.objectives.several:
            return None  # no pruning: Trial.report raises in a multi-objective study (optuna#3450)
        metric = self.objectives.primary
        value = metrics.get(metric, math.nan)
        if not math.isfinite(value):
            return None  # the trainer stops a diverged run itself
        self.trial.report(value, epoch)
        if self.trial.should_prune():
            self.pruned = True
            return f"pruned at epoch {epoch}: {metric}={value:.4g}"
        return None


def _describe(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__
