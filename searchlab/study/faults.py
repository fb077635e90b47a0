"""A worker killed mid-trial (SIGKILL, a lost node) loses no budget on PostgreSQL or grpc://: Optuna's heartbeat.

While a trial runs, its worker records a heartbeat every study.heartbeat_interval seconds. Before asking for a trial,
every worker fails the trials whose heartbeat is older than study.grace_period; Optuna's
RetryHeartbeatStaleTrialCallback then enqueues a retry with the same params, which the next ask picks up. Optuna does
both steps only inside Study.optimize; searchlab runs its own ask/tell loop, so it calls them here. The dead worker
cannot end its trial's MLflow run either, so the callback also ends that run FAILED, with the reason.

Optuna gives RDB storages (PostgreSQL, MySQL, SQLite) a heartbeat, the journal file none. The gRPC proxy's API has no
heartbeat calls, so GrpcProxyWithHeartbeat carries the same beat as a trial system attr: behind the proxy a killed
worker's trial is failed and retried as on PostgreSQL.
"""

from __future__ import annotations

import contextlib
import copy
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import GrpcStorageProxy, RetryHeartbeatStaleTrialCallback
from optuna.storages._heartbeat import BaseHeartbeat, get_heartbeat_thread  # what Study.optimize uses
from optuna.trial import FrozenTrial, TrialState

from searchlab.attrs import ATTEMPT_ATTRS, CHECKPOINT_OF, MLFLOW_PARENT_RUN_ID, checkpoint_of
from searchlab.config import ConfigError
from searchlab.tracking import Tracker

# Study.ask warns when the storage has a heartbeat, because only Study.optimize used to drive it; we drive it here.
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")


def heartbeat_settings(study: Mapping[str, Any], tracker: Tracker) -> dict[str, Any]:
    """RDBStorage's heartbeat arguments from study.heartbeat_interval, grace_period and max_retry (each None when
    missing); {} when off."""
    for key in ("heartbeat_interval", "grace_period", "max_retry"):
        value, least = study.get(key), 0 if key == "max_retry" else 1
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value >= least):
            raise ConfigError(f"study.{key}: expected an integer >= {least} or null, got {value!r}")
    interval = study.get("heartbeat_interval")
    if interval is None:
        return {}
    grace = study.get("grace_period") or 2 * interval
    if grace <= interval:
        raise ConfigError(f"study.grace_period: {grace}s must exceed study.heartbeat_interval "
                          f"({interval}s), or every running trial looks lost")
    return {"heartbeat_interval": interval, "grace_period": grace,
            "heartbeat_stale_trial_callback": RetryAndEndRun(tracker, study.get("max_retry"), grace)}


# User attrs of one attempt at a trial (searchlab.attrs), not its params.
_ATTEMPT_ATTRS = ATTEMPT_ATTRS


class RetryAndEndRun:
    """RetryHeartbeatStaleTrialCallback that also ends the lost trial's MLflow run FAILED, with the reason."""

    def __init__(self, tracker: Tracker, max_retry: int | None, grace_period: int) -> None:
        self.tracker, self.max_retry, self.grace_period = tracker, max_retry, grace_period
        self.retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retry)

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        # The retry copies the user attrs: not those naming the dead worker and its run, or they would look dead too.
        retry = copy.deepcopy(trial)
        retry.user_attrs = {k: v for k, v in trial.user_attrs.items() if k not in _ATTEMPT_ATTRS}
        # ... and it resumes from the lost trial's checkpoint when it has one (searchlab.training.checkpoints).
        retry.user_attrs[CHECKPOINT_OF] = checkpoint_of(trial)
        self.retry(study, retry)  # first: the budget matters more than the run's status
        retries = len(RetryHeartbeatStaleTrialCallback.retry_history(trial)) + 1
        retried = self.max_retry is None or retries <= self.max_retry
        reason = (f"worker lost: no heartbeat for {self.grace_period}s; "
                  + ("retried with the same params" if retried else f"not retried (study.max_retry={self.max_retry})"))
        try:
            self.tracker.fail_lost_trial(study.user_attrs[MLFLOW_PARENT_RUN_ID], trial.number, trial.params, reason)
        except Exception as err:  # the tracking server being down must not stop this worker's study
            print(f"searchlab: could not mark the MLflow run of lost trial {trial.number} FAILED: {err}",
                  file=sys.stderr)


def fail_stale_trials(study: optuna.Study) -> None:
    """Fails the running trials whose worker stopped sending heartbeats (a no-op without a heartbeat)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


@contextlib.contextmanager
def heartbeat(trial: optuna.Trial) -> Iterator[None]:
    """Records the trial's heartbeat from a thread while the block runs (a no-op without a heartbeat)."""
    with get_heartbeat_thread(trial._trial_id, trial.study._storage):
        yield


class GrpcProxyWithHeartbeat(GrpcStorageProxy, BaseHeartbeat):
    """A client of the gRPC storage proxy with Optuna's heartbeat, which the proxy's API lacks.

    The beat is the worker's clock in the trial's system attr `searchlab.heartbeat`; a RUNNING trial is stale when
    neither its last beat nor its start is within grace_period (clocks of the machines must agree to well within it).
    """

    ATTR = "searchlab.heartbeat"

    def __init__(self, *, host: str, port: int, heartbeat_interval: int | None = None, grace_period: int | None = None,
                 heartbeat_stale_trial_callback: Callable[[optuna.Study, FrozenTrial], None] | None = None) -> None:
        super().__init__(host=host, port=port)
        self.heartbeat_interval, self.callback = heartbeat_interval, heartbeat_stale_trial_callback
        self.grace_period = grace_period or 2 * (heartbeat_interval or 0)

    def record_heartbeat(self, trial_id: int) -> None:
        with contextlib.suppress(UpdateFinishedTrialError):  # the last beat may come just after tell
            self.set_trial_system_attr(trial_id, self.ATTR, time.time())

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        oldest = time.time() - self.grace_period
        running = self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
        # A retry inherits its original's last beat: its start (when it was asked) counts as a beat too.
        return [t._trial_id for t in running
                if max(t.system_attrs.get(self.ATTR, 0.0), t.datetime_start.timestamp()) < oldest]

    def get_heartbeat_interval(self) -> int | None:
        return self.heartbeat_interval

    def get_heartbeat_stale_trial_callback(self) -> Callable[[optuna.Study, FrozenTrial], None] | None:
        return self.callback
