"""What a search's trial trains (a TrialWork of searchlab.study.trial): sample the space, compose the trial's config,
fit it (resuming the checkpoint an earlier attempt left), and judge the result: COMPLETE, PRUNED or FAIL."""

from __future__ import annotations

import dataclasses
import math
import os
import shlex
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import optuna
from omegaconf import DictConfig
from optuna.trial import TrialState

from searchlab.attrs import ENGINE_TAG, EPOCHS_TRAINED, OVERRIDES, RESUMED_FROM_EPOCH, checkpoint_of, retry_attrs
from searchlab.config import Composer, Objectives, format_override, user_config_dir
from searchlab.config.space import SearchSpace
from searchlab.data import Splits
from searchlab.packing.lone import fit_alone
from searchlab.study.trial import Attempt, TrialRun, TrialWork, Verdict, interrupted
from searchlab.tracking import Tracker, config_yaml
from searchlab.training import TrainResult, checkpoints

# Called for a trial that finished COMPLETE, before it is told: (number, run id, result, value or values) -> whether
# it kept the trial's weights (searchlab.report.models.KeepWeights).
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


class SearchWork(TrialWork):
    """The search's trials, sharing the composed-config cache, the data and the tracker between them."""

    def __init__(self, study: optuna.Study, cfg: DictConfig, base_overrides: list[str], composer: Composer,
                 space: SearchSpace, splits: Splits | None, tracker: Tracker, parent_run_id: str,
                 keep: KeepModel | None = None) -> None:
        """`splits`: the resident data on the training device, or None when `data` is a LightningDataModule.
        `keep` saves a finished trial's best weights when they may be logged at the study's end."""
        self.study, self.cfg, self.base_overrides = study, cfg, base_overrides
        self.composer, self.space, self.splits = composer, space, splits
        self.tracker, self.parent_run_id, self.keep = tracker, parent_run_id, keep
        self.objectives = Objectives.of(cfg.study)
        self.metric = self.objectives.primary
        self.use_grid = cfg.study.sampler == "grid"

    def prepare(self, attempt: Attempt) -> TrialRun:
        """The trial's sampled values and config; its user attrs name the overrides that re-run it."""
        attempt.params = values = self.space.sample(attempt.trial, self.use_grid)
        overrides = training_overrides(self.base_overrides + [format_override(k, v) for k, v in values.items()])
        attempt.cfg = self.composer(values)
        attempt.trial.set_user_attr(OVERRIDES, overrides)
        return TrialRun(values, config_yaml(attempt.cfg), train_command(overrides))

    def train(self, attempts: list[Attempt]) -> Iterator[tuple[Attempt, Verdict | Exception]]:
        for attempt in attempts:
            yield attempt, self.train_one(attempt)

    def train_one(self, attempt: Attempt) -> Verdict | Exception:
        """Trains one trial alone, resuming its checkpoint when an earlier attempt left one."""
        plan: checkpoints.CheckpointPlan | None = None
        try:
            plan = self._checkpoint_plan(attempt)
            result = fit_alone(attempt.cfg, self.splits, attempt.reporter, metric=self.metric, checkpoint=plan)
        except BaseException as err:
            if interrupted(err):  # kept: the next run of the study resumes it
                attempt.note = self._requeue(attempt.trial, plan)
                raise
            checkpoints.remove(plan)
            return err
        checkpoints.remove(plan)  # finished: nothing to resume
        return self.verdict(attempt, result)

    def verdict(self, attempt: Attempt, result: TrainResult, seconds: float | None = None) -> Verdict:
        """PRUNED (by the pruner, or diverged), FAIL without a finite value, else COMPLETE (its weights kept when
        they may be logged)."""
        seconds = time.perf_counter() - attempt.start if seconds is None else seconds
        trial = attempt.trial
        if RESUMED_FROM_EPOCH in trial.user_attrs:  # what the retry trained (a trial from epoch 0: all its epochs)
            trial.set_user_attr(EPOCHS_TRAINED, len(result.history) - trial.user_attrs[RESUMED_FROM_EPOCH])
        value = self.objectives.values_of(result)
        if attempt.reporter.pruned or result.stop_reason:
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
                self.keep(trial.number, attempt.run_id, result, value)
        # Several objectives: each as objective.<metric> on the run; `objective` is the first.
        metrics = dict(zip((f"objective.{n}" for n in self.objectives.names), value, strict=True)) if isinstance(
            value, list) else {}
        return Verdict(state, value, reason, metrics, seconds, trial.user_attrs.get(RESUMED_FROM_EPOCH),
                       {ENGINE_TAG: result.engine})

    def _checkpoint_plan(self, attempt: Attempt) -> checkpoints.CheckpointPlan:
        """Where this trial's checkpoint lives (one folder per trial and its retries), and whether a checkpoint left
        by an earlier attempt with the same params is there to resume: then the new run and the pruner get the
        epochs already trained, and the training goes on from the next one."""
        trial, run_id = attempt.trial, attempt.run_id
        owner = {"params": dict(trial.params), "run_id": run_id, "trial": trial.number}
        plan = checkpoints.trial_plan(attempt.cfg, checkpoint_of(trial), owner)
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
        return requeue_resumable(self.study, trial, None if plan is None else plan.path)


def requeue_resumable(study: optuna.Study, trial: optuna.Trial, path: Path | None) -> str:
    """An interrupted trial with a checkpoint at `path` is queued again with its params: the next run of the study
    resumes it from there (the search's trials, and the Hydra sweeper's jobs). Returns what the reason should add."""
    saved = None if path is None else checkpoints.read_saved(path)
    if saved is None:
        return ""
    study.enqueue_trial(dict(trial.params), user_attrs=retry_attrs(trial))
    return f"; resumable from its checkpoint of epoch {saved.epoch} (re-queued)"
