"""Several worker processes on one study: the parent spawns them, prints every finished trial, replaces dead ones.

Every worker (a child of `searchlab search workers=N`, or `searchlab worker` started by hand on any machine) runs
the same loop (study.run_trials) against the shared storage. The journal storage has no heartbeat, so a worker
killed mid-trial would leave its trial RUNNING forever: DeadWorkers fails it with a reason, marks its MLflow run
FAILED and re-queues its params. The parent that sees its worker die runs it, and so does every worker of the
study on that host before it asks for a trial (so a resumed study first clears what a crash left behind).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from searchlab.attrs import REASON, RESUMED_FROM_EPOCH, WORKER_HOST, WORKER_PID, retry_attrs
from searchlab.devices import WorkerSlot, worker_env
from searchlab.interrupts import sigterm_as_interrupt, terminated
from searchlab.study.budget import Budget
from searchlab.study.trial import TrialOutcome
from searchlab.tracking import Tracker

# A worker's number (0..N-1 under `search workers=N`; $SLURM_PROCID or the like by hand): its sampler's seed offset.
WORKER_INDEX_ENV = "SEARCHLAB_WORKER"
FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
STOP_GRACE_SECONDS = 30.0  # after Ctrl-C, how long workers get to fail their trial and exit before SIGKILL


def is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


class DeadWorkers:
    """Fails the RUNNING trials whose worker process is gone, marks their MLflow runs FAILED with the reason and
    re-queues their params (study.enqueue_trial). A Budget calls it under its lock."""

    def __init__(self, study: optuna.Study, tracker: Tracker, parent_run_id: str, trust_missing_pid: bool) -> None:
        self.study, self.tracker, self.parent_run_id = study, tracker, parent_run_id
        # Under a cross-process budget lock a worker records itself in the same step as its ask, so a RUNNING trial
        # without a pid was asked by a process that died in between. Without such a lock it may still be recording.
        self.trust_missing_pid = trust_missing_pid
        self.host = socket.gethostname()

    def __call__(self, running: list[FrozenTrial]) -> list[int]:
        lost = []
        for trial in running:
            reason = self._why_lost(trial)
            if reason is not None:
                self._fail_and_requeue(trial, reason)
                lost.append(trial.number)
        return lost

    def _why_lost(self, trial: FrozenTrial) -> str | None:
        pid, host = trial.user_attrs.get(WORKER_PID), trial.user_attrs.get(WORKER_HOST)
        if pid is None:
            return "its worker died before recording itself; params re-queued" if self.trust_missing_pid else None
        if host == self.host and not is_alive(pid):
            return f"worker {pid} on {host} died mid-trial; params re-queued"
        return None

    def _fail_and_requeue(self, trial: FrozenTrial, reason: str) -> None:
        # The trial belongs to a dead process: a Trial handle on its id (Optuna's own heartbeat code does the same).
        handle = optuna.Trial(self.study, trial._trial_id)
        handle.set_user_attr(REASON, reason)
        self.study.tell(handle, state=TrialState.FAIL, skip_if_finished=True)
        # The retry resumes from the trial's checkpoint when it has one (searchlab.training.checkpoints).
        self.study.enqueue_trial(dict(trial.params), user_attrs=retry_attrs(trial))
        self.tracker.fail_lost_trial(self.parent_run_id, trial.number, trial.params, reason)


def cli_command(*args: str) -> list[str]:
    """The command line of a worker process: `searchlab <args>` with this Python."""
    return [sys.executable, "-m", "searchlab.cli", *args]


def outcome_of(trial: FrozenTrial) -> TrialOutcome:
    """A finished trial read from the storage, as the loop that ran it reported it."""
    seconds = (trial.datetime_complete - trial.datetime_start).total_seconds() if trial.datetime_start else 0.0
    several = tuple(trial.values) if trial.values and len(trial.values) > 1 else None  # a multi-objective study
    return TrialOutcome(trial.number, trial.state.name, trial.values[0] if trial.values else None, seconds,
                        trial.user_attrs.get(REASON), dict(trial.params), trial.user_attrs.get(RESUMED_FROM_EPOCH),
                        several)


class WorkerPool:
    """The parent of `searchlab search workers=N`: it only spawns, watches and reports.

    Each worker runs `command` (`searchlab worker <the same overrides>`, see cli_command) in its own session (so
    Ctrl-C reaches only the parent, which forwards it once), with its GPU and thread count in its environment. A
    worker killed by a signal is replaced, up to study.max_consecutive_failures deaths with no trial finishing in
    between.
    """

    def __init__(self, slots: Sequence[WorkerSlot], command: Sequence[str], budget: Budget, max_deaths: int,
                 poll_seconds: float = 0.5) -> None:
        self.slots, self.budget, self.max_deaths = list(slots), budget, max_deaths
        self.command = list(command)
        self.poll_seconds = poll_seconds
        self._seen: set[int] = set()

    def _spawn(self, index: int) -> subprocess.Popen:
        env = dict(worker_env(self.slots[index], dict(os.environ)), **{WORKER_INDEX_ENV: str(index)})
        return subprocess.Popen(self.command, env=env, stdout=subprocess.DEVNULL, start_new_session=True)

    def _report(self, on_trial: Callable[[TrialOutcome], None]) -> int:
        """Shows the trials finished since the last look, from any worker; returns how many were new."""
        new = [t for t in self.budget.study.get_trials(deepcopy=False, states=FINISHED_STATES)
               if t.number not in self._seen]
        for trial in sorted(new, key=lambda t: t.datetime_complete):
            self._seen.add(trial.number)
            on_trial(outcome_of(trial))
        return len([t for t in new if t.state != TrialState.FAIL])

    def run(self, on_trial: Callable[[TrialOutcome], None]) -> str:
        """Runs the workers until every one has exited; returns the study run's status (FINISHED, KILLED, FAILED)."""
        self._seen = {t.number for t in self.budget.study.get_trials(deepcopy=False, states=FINISHED_STATES)}
        if self.budget.done():
            return "FINISHED"
        with sigterm_as_interrupt():  # `kill <parent>` or a preemption stops the workers as Ctrl-C does
            return self._run(on_trial)

    def _run(self, on_trial: Callable[[TrialOutcome], None]) -> str:
        procs = {i: self._spawn(i) for i in range(len(self.slots))}
        codes: list[int] = []
        deaths_in_a_row = 0
        try:
            while procs:
                time.sleep(self.poll_seconds)
                if self._report(on_trial):
                    deaths_in_a_row = 0
                for i, proc in list(procs.items()):
                    code = proc.poll()
                    if code is None:
                        continue
                    del procs[i]
                    self.budget.sweep()
                    if code >= 0:
                        codes.append(code)
                        continue
                    deaths_in_a_row += 1
                    name = signal.Signals(-code).name
                    if self.budget.done() or deaths_in_a_row > self.max_deaths:
                        print(f"worker {proc.pid} killed by {name}; not replaced ({deaths_in_a_row} deaths in a row)",
                              file=sys.stderr, flush=True)
                        codes.append(code)
                        continue
                    procs[i] = self._spawn(i)
                    print(f"worker {proc.pid} killed by {name}; its trial is failed and re-queued; "
                          f"worker {procs[i].pid} replaces it", file=sys.stderr, flush=True)
        except KeyboardInterrupt:
            self._stop(list(procs.values()))
            self._report(on_trial)
            return "KILLED"
        self._report(on_trial)
        if self.budget.done() or all(code == 0 for code in codes):
            return "FINISHED"
        return "KILLED" if {130, 143} & set(codes) else "FAILED"  # interrupted (Ctrl-C) or terminated (SIGTERM)

    def _stop(self, procs: list[subprocess.Popen]) -> None:
        """Forwards Ctrl-C (or SIGTERM) once; each worker checkpoints and fails its trial ("interrupted", re-queued
        when it has a checkpoint) and exits. Stragglers are killed."""
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM if terminated() else signal.SIGINT)
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        try:
            for proc in procs:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        self.budget.sweep()
