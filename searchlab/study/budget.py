"""The study's global budget: `study.n_trials` shared by every worker of the study, exact on every storage."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable

import optuna
from optuna.trial import FrozenTrial, TrialState

from searchlab.attrs import REASON, SURPLUS, WORKER_HOST, WORKER_PID
from searchlab.locks import BudgetLock, NoLock
from searchlab.study.faults import fail_stale_trials

# The budget counts these: a failed trial (a crash, an interrupt) does not use up the study's n_trials.
BUDGET_STATES = (TrialState.COMPLETE, TrialState.PRUNED)


def budget_used(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=BUDGET_STATES))


class Budget:
    """study.n_trials shared by every worker of the study: finished trials use it, RUNNING trials reserve it.

    Counting and asking happen under one cross-process lock (see searchlab.locks), so concurrent workers never take
    more trials than the budget; where the storage has no lock, a surplus trial is given back unrun. WAITING trials
    (re-queued params) reserve nothing: the next ask takes them first.
    """

    def __init__(self, study: optuna.Study, n_trials: int, lock: BudgetLock,
                 recover: Callable[[list[FrozenTrial]], list[int]] | None = None, poll_seconds: float = 0.5) -> None:
        self.study, self.n_trials, self.lock = study, n_trials, lock
        self.unlocked = isinstance(lock, NoLock)
        self.recover = recover or (lambda running: [])  # fails trials whose worker died; returns their numbers
        self.poll_seconds = poll_seconds

    def _counts(self) -> tuple[int, int]:
        """(finished, running) after failing the trials of dead workers."""
        fail_stale_trials(self.study)  # any host's, by heartbeat (RDB, grpc://); retried as WAITING trials
        running = self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        recovered = len(self.recover(running))
        return budget_used(self.study), len(running) - recovered

    def reserve(self, deadline: float | None = None, wait: bool = True) -> optuna.Trial | None:
        """The next trial, marked with this process; None once the budget is used up or the deadline passed.

        While the rest of the budget is reserved by trials running elsewhere, waits (unless `wait` is False: the
        further members of a pack): one of them may fail and free its share.
        """
        while deadline is None or time.monotonic() < deadline:
            with self.lock():
                used, running = self._counts()
                if used >= self.n_trials:
                    return None
                if used + running < self.n_trials:
                    trial = self.study.ask()
                    if not (self.unlocked and self._give_back_if_surplus(trial)):
                        trial.set_user_attr(WORKER_PID, os.getpid())
                        trial.set_user_attr(WORKER_HOST, socket.gethostname())
                        return trial
            if not wait:
                return None
            time.sleep(self.poll_seconds)
        return None

    def _give_back_if_surplus(self, trial: optuna.Trial) -> bool:
        """Without a lock (gRPC proxy, MySQL) two workers may both ask for the study's last trial. The storage numbers
        trials atomically, so the trial whose lower-numbered trials already hold the whole budget is the surplus one:
        it is failed at once, never run, with a reason (and no MLflow run). The budget stays exact, at the cost of a
        rare FAIL trial, which uses no budget."""
        held = self.study.get_trials(deepcopy=False, states=(*BUDGET_STATES, TrialState.RUNNING, TrialState.WAITING))
        if sum(t.number < trial.number for t in held) < self.n_trials:
            return False
        trial.set_user_attr(SURPLUS, True)
        trial.set_user_attr(REASON, "not run: another worker took the study's last trial at the same moment")
        self.study.tell(trial, state=TrialState.FAIL)
        return True

    def sweep(self) -> list[int]:
        """Fails (and re-queues) the trials of dead workers now; returns their numbers."""
        with self.lock():
            return self.recover(self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))

    def done(self) -> bool:
        return budget_used(self.study) >= self.n_trials
