"""One run of a study in this process: what `search`, `ablate` and the Hydra sweeper share.

    session = Session(SessionSettings(name, storage_url, n_trials, tracking_uri), make_study, metric, run_params)
    status = session.run(lambda: MyWork(session, ...), on_trial, slots, cli_command(...))   # FINISHED/KILLED/FAILED
    session.end(status, best, counts)                                                         # the parent run
`Session(...)` opens the tracker, the storage (with its heartbeat), the study (`make_study(storage)`), the budget lock,
the MLflow parent run (made under the lock: one for all workers), DeadWorkers and the Budget. `run` trains in this
process through study.run_trials, or spawns `worker_command` per slot (WorkerPool) when there are several slots.
The work is a searchlab.study.trial.TrialWork: `prepare(attempt)` -> TrialRun, `train(attempts)` -> (attempt, Verdict).
Nothing here reads searchlab's composed config; SessionSettings.of(cfg) makes the settings from it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import optuna
from omegaconf import DictConfig
from optuna.storages import BaseStorage

from searchlab.attrs import METRIC, MLFLOW_PARENT_RUN_ID, STOPPED
from searchlab.config import redact
from searchlab.devices import WorkerSlot, cpu_count, detect_gpus, plan_workers
from searchlab.locks import NoLock, budget_lock
from searchlab.study.budget import Budget
from searchlab.study.faults import heartbeat_settings
from searchlab.study.loop import StopRule, StudyDone, StudyStopped, run_trials
from searchlab.study.storage import open_storage
from searchlab.study.trial import TrialOutcome, TrialWork
from searchlab.study.workers import DeadWorkers, WorkerPool
from searchlab.tracking import Tracker

T = TypeVar("T")
_HEARTBEAT_KEYS = ("heartbeat_interval", "grace_period", "max_retry")


@dataclass(frozen=True)
class SessionSettings:
    """What a session needs to know: the study (name, storage URL, budget, limits) and where it is tracked."""

    name: str
    storage: str
    n_trials: int | None  # None: set later with Session.limit (an ablation counts its plan first)
    tracking_uri: str
    artifact_root: str | None = None
    flush_seconds: float = 0.0
    timeout: float | None = None  # seconds of this run after which no trial starts
    max_consecutive_failures: int = 5
    heartbeat: Mapping[str, Any] = field(default_factory=dict)  # study.heartbeat_interval, grace_period, max_retry

    @classmethod
    def of(cls, cfg: DictConfig) -> SessionSettings:
        """From searchlab's composed config (study.*, tracking.*)."""
        study, tracking = cfg.study, cfg.tracking
        return cls(study.name, study.storage, study.n_trials, tracking.uri, tracking.artifact_root,
                   tracking.flush_seconds, study.timeout, study.max_consecutive_failures,
                   {key: study[key] for key in _HEARTBEAT_KEYS})


def worker_slots(workers: Any, accelerator: str, devices: int) -> list[WorkerSlot]:
    """The worker processes `workers` asks for (N, or auto: one per GPU) on this machine."""
    return plan_workers(workers, detect_gpus(accelerator), cpu_count(), devices)


class Session:
    """A study opened for trials: tracker, storage, study, lock, parent run, dead-worker recovery, budget."""

    def __init__(self, settings: SessionSettings, make_study: Callable[[BaseStorage], optuna.Study], metric: str,
                 run_params: Mapping[str, Any], parent_run: Callable[[Tracker], str] | None = None) -> None:
        """`run_params`: the parent run's params when it is made; `parent_run` makes (or reopens) another parent
        run than the study's (an ablation's)."""
        self.settings = settings
        self.tracker = Tracker(settings.tracking_uri, settings.artifact_root, settings.flush_seconds)
        self.storage = open_storage(settings.storage, heartbeat_settings(settings.heartbeat, self.tracker))
        self.study = make_study(self.storage)
        self.lock = budget_lock(self.storage, settings.storage, settings.name)
        with self.lock():  # one parent run, however many workers start at once
            self.parent_run_id = (parent_run or (lambda t: t.study_run(settings.name, run_params)))(self.tracker)
            self.study.set_user_attr(MLFLOW_PARENT_RUN_ID, self.parent_run_id)
            self.study.set_user_attr(METRIC, metric)
        self.dead = DeadWorkers(self.study, self.tracker, self.parent_run_id,
                                trust_missing_pid=not isinstance(self.lock, NoLock))
        self.budget = Budget(self.study, settings.n_trials or 0, self.lock, self.dead)
        self.stopped: str | None = None  # why a stop rule marked `done` (study.stop_when) ended this run early

    def once_at_start(self, seed: Callable[[optuna.Study], T]) -> T | None:
        """`seed(study)` under the budget lock while the study has no trial yet (study.warm_start's enqueue): once,
        however many workers start together. None when the study had trials."""
        with self.lock():
            if self.study.get_trials(deepcopy=False):
                return None
            return seed(self.study)

    def limit(self, n_trials: int) -> None:
        """The study's budget, when it is known only once the study is open."""
        self.budget = Budget(self.study, n_trials, self.lock, self.dead)

    def run(self, work: Callable[[], TrialWork], on_trial: Callable[[TrialOutcome], None],
            slots: Sequence[WorkerSlot] = (), worker_command: Sequence[str] = (), label: str = "study",
            stop_rules: Sequence[StopRule] = ()) -> str:
        """Runs trials until the budget is used: here (`work()`, made only then), or in one process per slot when
        there are several (each worker then applies its own `stop_rules`, given by its own command). Returns
        FINISHED, KILLED (Ctrl-C, SIGTERM) or FAILED (StudyStopped, printed). A study a `done` rule stopped ends
        FINISHED with the reason in `self.stopped` and in the study's user attr `stopped` (workers' too)."""
        if self.study.user_attrs.get(STOPPED):  # an earlier run's: this run decides anew
            self.study.set_user_attr(STOPPED, None)
        try:
            if len(slots) > 1:
                pool = WorkerPool(slots, worker_command, self.budget, self.settings.max_consecutive_failures)
                status = pool.run(on_trial)
                if status == "FINISHED" and not self.budget.done():  # a worker's stop rule may have ended it
                    self.stopped = self.study.user_attrs.get(STOPPED)
                return status
            run_trials(self.budget, work(), on_trial, timeout=self.settings.timeout,
                       max_consecutive_failures=self.settings.max_consecutive_failures, stop_rules=stop_rules)
            return "FINISHED"
        except KeyboardInterrupt:
            return "KILLED"
        except StudyDone as err:
            self.stopped = str(err)
            self.study.set_user_attr(STOPPED, self.stopped)
            return "FINISHED"
        except StudyStopped as err:
            print(f"searchlab: {label} stopped: {redact(str(err))}", file=sys.stderr)
            return "FAILED"

    def end(self, status: str, best: Mapping[str, Any] | None = None, counts: Mapping[str, int] | None = None,
            metrics: Mapping[str, float] | None = None) -> None:
        """Ends the parent run with the status, the best trial, the trial counts, any other metrics and why a stop
        rule ended it early."""
        self.tracker.end_study(self.parent_run_id, best, counts or {}, status, metrics, self.stopped)
