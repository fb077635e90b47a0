"""The Optuna study: storage, sampler and pruner from config, and the ask/tell loop over trials.

searchlab runs the loop itself (no Hydra Optuna sweeper: it pins optuna<3 and cannot prune), so each trial can
report per epoch, be pruned, and have its own MLflow run from its start.
"""

from __future__ import annotations

import inspect
import os
import socket
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import optuna
import sqlalchemy.exc
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf
from optuna.storages import BaseStorage, GrpcStorageProxy, JournalStorage, RDBStorage, run_grpc_proxy_server
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from searchlab.config import ConfigError, redact
from searchlab.faults import GrpcProxyWithHeartbeat, fail_stale_trials
from searchlab.locks import BudgetLock, NoLock
from searchlab.space import SearchSpace
from searchlab.trial import TrialOutcome, TrialRunner

optuna.logging.set_verbosity(optuna.logging.WARNING)
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # TPE's group=True, GPSampler

# The budget counts these: a failed trial (a crash, an interrupt) does not use up the study's n_trials.
BUDGET_STATES = (TrialState.COMPLETE, TrialState.PRUNED)
# User attrs naming the process that runs a trial, so a dead worker's trial can be found and retried.
WORKER_PID, WORKER_HOST = "worker.pid", "worker.host"
# User attr of a trial given back unrun because other workers had taken the budget (storages without a lock).
SURPLUS = "surplus"


class StudyStopped(Exception):
    """Too many trials failed in a row: the config, not the sampler's luck, is at fault."""


def open_storage(url: str, heartbeat: Mapping[str, Any] | None = None) -> BaseStorage:
    """study.storage -> an Optuna storage: an RDB URL (sqlite:///, postgresql://, mysql://), grpc://HOST:PORT (the
    storage proxy of `searchlab storage-proxy`) or a journal file path.

    The journal file is the default: safe for several local processes, and ~10x cheaper per trial than SQLite.
    `heartbeat` holds RDBStorage's heartbeat arguments (faults.heartbeat_settings), used by RDB and grpc:// storages.
    """
    try:
        if url.startswith("grpc://"):
            return _grpc_proxy(url, heartbeat or {})
        if "://" in url:
            return _rdb_storage(url, heartbeat or {})
        Path(url).parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(url))
    except ConfigError:
        raise
    except Exception as err:  # any failure to open is the user's URL, file or server
        reason = redact(str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__)
        raise ConfigError(f"study.storage: cannot open {redact(url)}: {reason[:200]}") from None


def _rdb_storage(url: str, heartbeat: Mapping[str, Any], attempts: int = 3) -> RDBStorage:
    """RDBStorage, retried when workers started together race to create Optuna's tables in a fresh database
    (PostgreSQL: a duplicate key in pg_type); the retry finds the tables made and uses them."""
    for attempt in range(attempts):
        try:
            return RDBStorage(url, **heartbeat)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
            if attempt == attempts - 1:
                raise
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


# Seconds to wait for a gRPC storage proxy to answer: a wrong host or port should fail in seconds, as in tracking.
_PROXY_TIMEOUT = 10


def _grpc_proxy(url: str, heartbeat: Mapping[str, Any]) -> GrpcStorageProxy:
    """A client of Optuna's gRPC storage proxy, checked to answer (GrpcStorageProxy itself connects lazily)."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    if not parts.hostname or port is None or parts.path not in ("", "/") or parts.query:
        raise ConfigError(f"study.storage: expected grpc://HOST:PORT (a `searchlab storage-proxy`), got {url!r}")
    proxy = GrpcProxyWithHeartbeat(host=parts.hostname, port=port, **heartbeat)
    try:
        proxy.wait_server_ready(timeout=_PROXY_TIMEOUT)
    except ConnectionError:
        proxy.close()
        raise ConfigError(f"study.storage: no gRPC storage proxy answers at {parts.hostname}:{port} within "
                          f"{_PROXY_TIMEOUT}s; start one with `searchlab storage-proxy study.storage=postgresql://...`"
                          ) from None
    return proxy


def serve_storage_proxy(url: str, host: str, port: int) -> None:
    """Serves the RDB storage at url to workers on grpc://host:port until interrupted.

    Hundreds of workers then hold one gRPC channel each instead of a pool of database connections each.
    """
    if "://" not in url or url.startswith("grpc://"):
        raise ConfigError(f"study.storage: the gRPC storage proxy serves an RDB storage (postgresql://...), "
                          f"got {redact(url)!r}")
    storage = optuna.storages.get_storage(open_storage(url))  # Optuna's cache in front of the RDB, as it advises
    print(f"gRPC storage proxy for {redact(url)} on {host}:{port}; workers use study.storage=grpc://{host}:{port}",
          flush=True)
    try:
        run_grpc_proxy_server(storage, host=host, port=port)
    except RuntimeError as err:  # cannot bind: not this machine's host (gRPC shares a taken port: SO_REUSEPORT)
        raise ConfigError(f"study.proxy: cannot listen on {host}:{port}: {err}") from None


def make_sampler(cfg: DictConfig, space: SearchSpace, worker: int = 0) -> optuna.samplers.BaseSampler:
    """The sampler named by study.sampler, from the study.samplers table, seeded by study.seed + worker: workers of
    one study that shared a seed would all draw the same start-up trials."""
    return _instantiate(cfg.study.samplers[cfg.study.sampler], seed=cfg.study.seed + worker,
                        search_space=space.grid() if cfg.study.sampler == "grid" else None)


def make_pruner(cfg: DictConfig) -> optuna.pruners.BasePruner:
    """The pruner named by study.pruner, from the study.pruners table."""
    return _instantiate(cfg.study.pruners[cfg.study.pruner])


def _instantiate(entry: DictConfig, **extra: Any) -> Any:
    """Like hydra's instantiate, but adds only the `extra` arguments the class takes (not every sampler has seed)."""
    settings = OmegaConf.to_container(entry, resolve=True)
    cls = get_class(settings.pop("_target_"))
    accepted = inspect.signature(cls).parameters
    settings.update({k: v for k, v in extra.items() if v is not None and k in accepted})
    return cls(**settings)


def open_study(cfg: DictConfig, direction: str, storage: BaseStorage, sampler: optuna.samplers.BaseSampler,
               pruner: optuna.pruners.BasePruner) -> optuna.Study:
    """Creates the study, or loads it by name to resume; a resumed study must keep its direction and metric."""
    study = optuna.create_study(study_name=cfg.study.name, storage=storage, sampler=sampler, pruner=pruner,
                                direction=direction, load_if_exists=True)
    existing = study.direction.name.lower()
    if existing != direction:
        raise ConfigError(
            f"study.direction: study '{cfg.study.name}' was created to {existing} its metric, this run would "
            f"{direction} {cfg.study.metric}; keep study.direction={existing} or choose a new study.name")
    metric = study.user_attrs.get("metric")
    if metric is not None and metric != cfg.study.metric:
        raise ConfigError(f"study.metric: study '{cfg.study.name}' optimizes {metric}; keep study.metric={metric} "
                          "or choose a new study.name")
    return study


def budget_used(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=BUDGET_STATES))


@dataclass(frozen=True)
class Best:
    number: int
    value: float
    params: dict[str, Any]
    overrides: list[str]


def best_trial(study: optuna.Study) -> Best | None:
    """The best complete trial, or None before the first one."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return None
    trial = study.best_trial
    return Best(trial.number, trial.value, dict(trial.params), list(trial.user_attrs.get("overrides", [])))


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

    def reserve(self, deadline: float | None = None) -> optuna.Trial | None:
        """The next trial, marked with this process; None once the budget is used up or the deadline passed.

        While the rest of the budget is reserved by trials running elsewhere, waits: one of them may fail and
        free its share.
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
        trial.set_user_attr("reason", "not run: another worker took the study's last trial at the same moment")
        self.study.tell(trial, state=TrialState.FAIL)
        return True

    def sweep(self) -> list[int]:
        """Fails (and re-queues) the trials of dead workers now; returns their numbers."""
        with self.lock():
            return self.recover(self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))

    def done(self) -> bool:
        return budget_used(self.study) >= self.n_trials


def run_trials(budget: Budget, runner: TrialRunner, cfg: DictConfig,
               on_trial: Callable[[TrialOutcome], None]) -> None:
    """Runs trials until the study's budget (finished trials over all runs and workers) or this run's timeout is
    reached; asks for the next trial the moment the last one ends."""
    deadline = None if cfg.study.timeout is None else time.monotonic() + cfg.study.timeout
    failures_in_a_row = 0
    while (trial := budget.reserve(deadline)) is not None:
        outcome = runner.run(trial)
        on_trial(outcome)
        failures_in_a_row = failures_in_a_row + 1 if outcome.state == "FAIL" else 0
        if failures_in_a_row >= cfg.study.max_consecutive_failures:
            raise StudyStopped(
                f"{failures_in_a_row} trials failed in a row (last: {outcome.reason}); "
                f"stopping the study (study.max_consecutive_failures={cfg.study.max_consecutive_failures})")


def state_counts(study: optuna.Study) -> dict[str, int]:
    counts = {state.name: 0 for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    for trial in study.get_trials(deepcopy=False):
        if trial.state.name in counts:
            counts[trial.state.name] += 1
    return counts
