"""The Optuna study: sampler and pruner from config, opening (or resuming) it, and the loop over its trials (run_trials:
the next trial, or pack, the moment the last ends; stop rules end a study gone wrong). Its storage is
searchlab.study.storage's, its budget searchlab.study.budget's, each trial's lifecycle searchlab.study.trial's.

searchlab runs the loop itself (no Hydra Optuna sweeper: it pins optuna<3 and cannot prune), so each trial can
report per epoch, be pruned, and have its own MLflow run from its start.
"""

from __future__ import annotations

import inspect
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import optuna
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf
from optuna.storages import BaseStorage
from optuna.trial import TrialState

from searchlab.attrs import METRIC, OVERRIDES
from searchlab.config import ConfigError, Objectives, metric_names, metric_setting
from searchlab.config.space import SearchSpace
from searchlab.study.budget import Budget
from searchlab.study.storage import one_sync
from searchlab.study.trial import TrialOutcome, TrialWork, run_next

optuna.logging.set_verbosity(optuna.logging.WARNING)
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # TPE's group=True, GPSampler



class StudyStopped(Exception):
    """Too many trials failed in a row: the config, not the sampler's luck, is at fault."""


class StudyDone(Exception):
    """A stop rule marked `done` (study.stop_when) says the study has converged: it ends FINISHED, not FAILED."""


def make_sampler(cfg: DictConfig, space: SearchSpace, worker: int = 0) -> optuna.samplers.BaseSampler:
    """The sampler named by study.sampler, from the study.samplers table, seeded by study.seed + worker: workers of
    one study that shared a seed would all draw the same start-up trials."""
    return _instantiate(cfg.study.samplers[cfg.study.sampler], seed=cfg.study.seed + worker,
                        search_space=space.grid() if cfg.study.sampler == "grid" else None)


def check_sampler(cfg: DictConfig, space: SearchSpace) -> None:
    """With several objectives, draws one trial of the space with a fresh sampler on a throwaway in-memory study:
    some samplers (CMA-ES) refuse multi-objective studies, which would otherwise fail every trial of the real one."""
    if not Objectives.of(cfg.study).several:
        return
    probe = optuna.create_study(directions=list(Objectives.of(cfg.study).directions), sampler=make_sampler(cfg, space))
    try:
        space.sample(probe.ask(), cfg.study.sampler == "grid")
    except (ValueError, NotImplementedError) as err:
        raise ConfigError(f"study.sampler: {cfg.study.sampler} cannot sample a study of several metrics "
                          f"({str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}); "
                          "choose another, e.g. study.sampler=tpe") from None


def make_pruner(cfg: DictConfig) -> optuna.pruners.BasePruner:
    """The pruner named by study.pruner, from the study.pruners table; none for several objectives, whatever
    study.pruner says: Optuna cannot prune a multi-objective study (Trial.report raises there, optuna#3450)."""
    if Objectives.of(cfg.study).several:
        return optuna.pruners.NopPruner()
    return _instantiate(cfg.study.pruners[cfg.study.pruner])


def _instantiate(entry: DictConfig, **extra: Any) -> Any:
    """Like hydra's instantiate, but adds only the `extra` arguments the class takes (not every sampler has seed)."""
    settings = OmegaConf.to_container(entry, resolve=True)
    cls = get_class(settings.pop("_target_"))
    accepted = inspect.signature(cls).parameters
    settings.update({k: v for k, v in extra.items() if v is not None and k in accepted})
    return cls(**settings)


def open_study(cfg: DictConfig, objectives: Objectives, storage: BaseStorage,
               sampler: optuna.samplers.BaseSampler, pruner: optuna.pruners.BasePruner) -> optuna.Study:
    """Creates the study, or loads it by name to resume; a resumed study must keep its metrics and directions."""
    if objectives.several:
        study = optuna.create_study(study_name=cfg.study.name, storage=storage, sampler=sampler, pruner=pruner,
                                    directions=list(objectives.directions), load_if_exists=True)
    else:
        study = optuna.create_study(study_name=cfg.study.name, storage=storage, sampler=sampler, pruner=pruner,
                                    direction=objectives.direction, load_if_exists=True)
    existing = [d.name.lower() for d in study.directions]
    stored = study.user_attrs.get(METRIC)
    kept = metric_setting(metric_names(stored)) if stored is not None else None

    def check_metrics() -> None:
        if len(existing) != len(objectives.names) or (stored is not None and stored != objectives.stored):
            keep = f"keep study.metric={kept}" if kept else f"keep its {len(existing)} metrics"
            raise ConfigError(f"study.metric: study '{cfg.study.name}' optimizes {kept or f'{len(existing)} metrics'}, "
                              f"not {metric_setting(objectives.names)}; {keep} or choose a new study.name")

    if objectives.several or len(existing) > 1:  # names first: another order of the metrics is not a direction
        check_metrics()
    if not objectives.several and existing[0] != objectives.direction:
        direction = objectives.direction
        raise ConfigError(
            f"study.direction: study '{cfg.study.name}' was created to {existing[0]} its metric, this run would "
            f"{direction} {objectives.primary}; keep study.direction={existing[0]} or choose a new study.name")
    if tuple(existing) != objectives.directions:
        raise ConfigError(
            f"study.direction: study '{cfg.study.name}' was created to {', '.join(existing)} its metrics, this run "
            f"would {objectives.describe()}; keep study.direction=[{','.join(existing)}] or choose a new study.name")
    if stored is not None and stored != objectives.stored:
        raise ConfigError(f"study.metric: study '{cfg.study.name}' optimizes {kept}; keep study.metric={kept} "
                          "or choose a new study.name")
    return study


@dataclass(frozen=True)
class Best:
    """The best complete trial; with several objectives the one of the Pareto front with the best first metric
    (`value` is that metric's, `values` all of them)."""

    number: int
    value: float
    params: dict[str, Any]
    overrides: list[str]
    values: tuple[float, ...] = ()


def best_trial(study: optuna.Study) -> Best | None:
    """The best complete trial, or None before the first one."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return None
    if len(study.directions) > 1:
        trial = Objectives.of_study(study, ()).front(study)[0]
        return Best(trial.number, trial.values[0], dict(trial.params), list(trial.user_attrs.get(OVERRIDES, [])),
                    tuple(trial.values))
    trial = study.best_trial
    return Best(trial.number, trial.value, dict(trial.params), list(trial.user_attrs.get(OVERRIDES, [])))


class FailureStreak:
    """Stops the study when study.max_consecutive_failures trials failed in a row: the config, not the sampler's
    luck, is at fault. A stop rule of run_trials: it sees every outcome, then says after each batch whether to stop."""

    def __init__(self, most: int) -> None:
        self.most, self.in_a_row, self.last = most, 0, None

    def __call__(self, outcome: TrialOutcome) -> None:
        self.in_a_row = self.in_a_row + 1 if outcome.state == "FAIL" else 0
        self.last = outcome.reason

    def reason(self) -> str | None:
        if self.in_a_row < self.most:
            return None
        return (f"{self.in_a_row} trials failed in a row (last: {self.last}); "
                f"stopping the study (study.max_consecutive_failures={self.most})")


class StopRule(Protocol):
    """Sees each outcome; `reason()` says why to stop (None: go on). A rule whose class sets `done = True` stops a
    study that has converged (StudyDone), any other one a study gone wrong (StudyStopped)."""

    def __call__(self, outcome: TrialOutcome) -> None: ...

    def reason(self) -> str | None: ...


def run_trials(budget: Budget, work: TrialWork, on_trial: Callable[[TrialOutcome], None], *,
               timeout: float | None = None, max_consecutive_failures: int = 5,
               stop_rules: Sequence[StopRule] = ()) -> None:
    """Runs trials until the study's budget (finished trials over all runs and workers) or this run's timeout is
    reached; asks for the next trial (or pack) the moment the last one ends. Raises StudyStopped when a stop rule
    says so, StudyDone when a rule marked `done` does (checked before the first trial too)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    rules: list[StopRule] = [FailureStreak(max_consecutive_failures), *stop_rules]

    def reserve(wait: bool) -> optuna.Trial | None:
        return budget.reserve(deadline, wait=wait)

    def next_outcomes() -> list[TrialOutcome]:
        # A trial's (or a pack's) ~20 journal writes, from its ask to its tell, fsynced once (storage.JournalFile).
        with one_sync(budget.study._storage):
            return run_next(work, reserve)

    def check() -> None:
        for rule in rules:
            if (reason := rule.reason()) is not None:
                raise (StudyDone if getattr(rule, "done", False) else StudyStopped)(reason)

    check()  # a resumed study may be done already (study.stop_when reads the study's trials)
    while outcomes := next_outcomes():
        for outcome in outcomes:
            on_trial(outcome)
            for rule in rules:
                rule(outcome)
        check()


def state_counts(study: optuna.Study) -> dict[str, int]:
    counts = {state.name: 0 for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    for trial in study.get_trials(deepcopy=False):
        if trial.state.name in counts:
            counts[trial.state.name] += 1
    return counts
