"""THE trial lifecycle, in one place (`run_next`, as optuna's study/_optimize.py:_run_trial): reserve, heartbeat,
prepare (params, config, the trial's MLflow run), train (each epoch logged, reported, maybe pruned), tell, end the run.

What a trial trains is plugged in as a TrialWork: `prepare(attempt)` draws the trial's params and config and says
which MLflow run to open; `train(attempts)` trains them (several at once: a pack) and yields each with its Verdict
(or its error) as it finishes. The search (search_work.SearchWork), a pack (pack_trials.PackWork), an ablation's
(variant, seed) (ablate.AblationWork) and the Hydra sweeper are TrialWorks. An error fails the trial and the study
goes on; Ctrl-C or SIGTERM fails every trial not yet told and is raised again as KeyboardInterrupt.
"""

from __future__ import annotations

import abc
import contextlib
import math
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import TrialState

from searchlab.attrs import MLFLOW_RUN_ID, REASON
from searchlab.config import PARAMS, Objectives, first_value
from searchlab.interrupts import terminated
from searchlab.study.faults import heartbeat
from searchlab.study.storage import one_sync
from searchlab.tracking import ROLE_TRIAL, Tracker


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


@dataclass(frozen=True)
class TrialRun:
    """The trial's MLflow child run, as its work describes it (Tracker.start_trial opens it)."""

    params: Mapping[str, Any]
    config_yaml: str = ""
    command: str = ""  # the shell command that trains the trial alone
    name: str | None = None  # trial-<number> unless given
    role: str = ROLE_TRIAL
    tags: Mapping[str, str] = field(default_factory=dict)


class EpochReporter:
    """The per-epoch hook of one trial: logs the epoch to its MLflow run and, given objectives, reports the primary
    metric to the pruner; returns the reason to stop when the pruner says so (`pruned` then stays True)."""

    def __init__(self, trial: optuna.Trial, run_id: str, tracker: Tracker, objectives: Objectives | None) -> None:
        self.trial, self.run_id, self.tracker, self.objectives = trial, run_id, tracker, objectives
        self.pruned = False
        self._params: float | None = None  # the parameter count last logged

    def __call__(self, epoch: int, metrics: dict[str, float]) -> str | None:
        # The parameter count is logged when it changes (once, unless layers are unfrozen): each metric row of the
        # run's last write costs ~0.1 ms of a trial's fixed cost on the SQLite store (bench "overhead").
        if metrics.get(PARAMS) == self._params:
            self.tracker.log_epoch(self.run_id, epoch, {k: v for k, v in metrics.items() if k != PARAMS})
        else:
            self._params = metrics.get(PARAMS)
            self.tracker.log_epoch(self.run_id, epoch, metrics)
        if self.objectives is None or self.objectives.several:
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


@dataclass
class Attempt:
    """One trial on its way from reserve to tell. The lifecycle sets run_id and reporter; the work fills the rest."""

    trial: optuna.Trial
    start: float  # time.perf_counter() when it (or its pack) was reserved
    params: dict[str, Any] = field(default_factory=dict)  # what its progress line shows (the sampled values)
    cfg: Any = None  # the work's own: the trial's composed config
    run_id: str | None = None
    reporter: EpochReporter | None = None  # the on_epoch hook of its training
    error_state: TrialState = TrialState.FAIL  # how an error (not an interrupt) tells it
    note: str = ""  # what the reason of an interrupt adds (a checkpoint re-queued)


@dataclass(frozen=True)
class Verdict:
    """How a trained trial is told."""

    state: TrialState
    value: float | list[float] | None = None
    reason: str | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)  # logged to its run at the end
    seconds: float | None = None  # its share of a pack's time; else the time since its reserve
    resumed_from: int | None = None
    tags: Mapping[str, str] = field(default_factory=dict)  # set on its run at the end (the sweeper's output folder)


class NotRun(Exception):
    """Raised by `prepare`: the trial is told FAIL at once with this reason, unrun and without an MLflow run."""


class TrialWork(abc.ABC):
    """What a study's trials train. The lifecycle reads `study`, `tracker`, `parent_run_id`; `objectives` (None: the
    epochs are only logged) feeds the pruner; `size` > 1 prepares and trains that many trials at once."""

    study: optuna.Study
    tracker: Tracker
    parent_run_id: str
    objectives: Objectives | None = None
    size: int = 1
    pruned_run_state = "PRUNED"  # the MLflow state of a PRUNED trial's run

    @abc.abstractmethod
    def prepare(self, attempt: Attempt) -> TrialRun:
        """Draws the trial's params and config into `attempt`; returns its run (or raises NotRun)."""

    @abc.abstractmethod
    def train(self, attempts: list[Attempt]) -> Iterator[tuple[Attempt, Verdict | Exception]]:
        """Trains the prepared attempts (each epoch through attempt.reporter) and yields each as it is done."""

    def members_like(self, first: Attempt) -> AbstractContextManager[None]:
        """While the further members of a pack are reserved and prepared (size > 1): what they share with `first`."""
        return contextlib.nullcontext()


Reserve = Callable[[bool], "optuna.Trial | None"]  # (wait) -> the next trial, or None; wait=False for pack members


def run_next(work: TrialWork, reserve: Reserve) -> list[TrialOutcome]:
    """The next trial (up to work.size of them), from its reserve to its run's end; [] when none was reserved."""
    start = time.perf_counter()
    first = reserve(True)
    if first is None:
        return []
    told: list[TrialOutcome] = []
    untold: list[Attempt] = []
    with contextlib.ExitStack() as beats:
        try:
            _begin(work, Attempt(first, start), beats, untold, told)
            if untold and work.size > 1:
                with work.members_like(untold[0]):
                    while len(untold) + len(told) < work.size and (trial := reserve(False)) is not None:
                        _begin(work, Attempt(trial, start), beats, untold, told)
            for attempt, result in work.train(list(untold)):
                untold.remove(attempt)
                verdict = result if isinstance(result, Verdict) else _failed(attempt, result)
                told.append(_finish(work, attempt, verdict))
        except BaseException as err:  # every trial not yet told fails; an interrupt also stops the study
            for attempt in untold:
                with contextlib.suppress(KeyboardInterrupt):
                    told.append(_finish(work, attempt, _failed(attempt, err)))
            if not interrupted(err):
                return told
            signal.signal(signal.SIGINT, signal.default_int_handler)  # Lightning ignores SIGINT after one
            raise KeyboardInterrupt from None
    return told


def run_trial(work: TrialWork, trial: optuna.Trial | None = None) -> TrialOutcome:
    """One trial (asked here unless given) without a budget: what `run_trials` does for each, for benchmarks."""
    with one_sync(work.study._storage):
        given = [work.study.ask() if trial is None else trial]
        return run_next(work, lambda wait: given.pop() if wait and given else None)[0]


def _begin(work: TrialWork, attempt: Attempt, beats: contextlib.ExitStack, untold: list[Attempt],
           told: list[TrialOutcome]) -> None:
    """Heartbeat, prepare, open the run. An error tells the trial now; an interrupt leaves it to run_next."""
    beats.enter_context(heartbeat(attempt.trial))  # other workers see this one alive (RDB, grpc://; faults)
    untold.append(attempt)
    try:
        attempt.run_id = _open_run(work, attempt.trial.number, work.prepare(attempt))
        attempt.trial.set_user_attr(MLFLOW_RUN_ID, attempt.run_id)
        attempt.reporter = EpochReporter(attempt.trial, attempt.run_id, work.tracker, work.objectives)
    except NotRun as skip:
        untold.remove(attempt)
        told.append(_finish(work, attempt, Verdict(TrialState.FAIL, reason=str(skip)), open_run=False))
    except Exception as err:
        untold.remove(attempt)
        told.append(_finish(work, attempt, _failed(attempt, err)))


def _open_run(work: TrialWork, number: int, run: TrialRun) -> str:
    """Where a trial becomes an MLflow run (a nested child of the study's parent run). A pack's members log their
    params with their end (one write per run fewer: they train for seconds)."""
    return work.tracker.start_trial(work.parent_run_id, number, run.params, run.config_yaml, run.command, run.name,
                                    run.role, run.tags, params_at_end=work.size > 1)


def _failed(attempt: Attempt, err: BaseException) -> Verdict:
    if interrupted(err):  # re-queued by the next run when it has a checkpoint (attempt.note)
        return Verdict(TrialState.FAIL, reason=("terminated (SIGTERM)" if terminated() else "interrupted")
                       + attempt.note)
    return Verdict(attempt.error_state, reason=describe(err))


def _finish(work: TrialWork, attempt: Attempt, verdict: Verdict, open_run: bool = True) -> TrialOutcome:
    """Tells the trial and ends its run (made now if it failed before its run was: every told trial has one)."""
    trial, value = attempt.trial, verdict.value
    if verdict.reason:
        trial.set_user_attr(REASON, verdict.reason)
    work.study.tell(trial, value, state=verdict.state)
    if open_run:
        run_id = attempt.run_id or _open_run(work, trial.number, TrialRun(trial.params))
        shown = work.pruned_run_state if verdict.state == TrialState.PRUNED else verdict.state.name
        work.tracker.end_trial(run_id, shown, first_value(value), verdict.reason, verdict.tags, verdict.metrics)
    seconds = verdict.seconds if verdict.seconds is not None else time.perf_counter() - attempt.start
    several = tuple(value) if isinstance(value, list) else None
    return TrialOutcome(trial.number, verdict.state.name, first_value(value), seconds, verdict.reason,
                        attempt.params, verdict.resumed_from, several)


def interrupted(err: BaseException) -> bool:
    """Ctrl-C, or SIGTERM (searchlab.interrupts raises KeyboardInterrupt for it)."""
    return isinstance(err, (KeyboardInterrupt, SystemExit))


def describe(err: BaseException) -> str:
    """An error as a trial's reason: its type and first line."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__
