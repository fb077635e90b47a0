"""MLflow tracking of a study: one experiment per study, a parent run for it, a nested child run per trial.

Written on MlflowClient with explicit run ids, never MLflow's global active run: optuna-integration's MLflowCallback
logs only at trial end through the active run and makes no parent run (optuna#5148), so it cannot show a live,
nested study. Per-epoch metrics are buffered and written in one `log_batch` every `tracking.flush_seconds` and at
the trial's end: a write to the SQLite store costs ~4-8 ms (more on a busy disk), a 10-epoch trial ~0.3 s.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy
import sqlalchemy.pool
import torch
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME
from sqlalchemy import event

from searchlab.attrs import (
    ABLATION_STUDY_TAG,
    COMMAND_TAG,
    CONTINUES_TAG,
    RESUMED_FROM_TAG,
    ROLE_ABLATION,
    ROLE_STUDY,
    ROLE_TAG,
    ROLE_TRAIN,
    ROLE_TRIAL,
    STOPPED_TAG,
    STUDY_NAME_TAG,
    TRIAL_NUMBER_TAG,
    TRIAL_REASON_TAG,
    TRIAL_STATE_TAG,
)
from searchlab.config import ConfigError, environment, redact
from searchlab.locks import FileLock

logging.getLogger("mlflow").setLevel(logging.WARNING)  # "Creating initial MLflow database tables..." and the like
# MLflow logs a traceback for every SQLite "database is locked" before raising it; _RetryOnLock retries or re-raises.
logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
_FINAL_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}
_BATCH = 900  # MLflow takes at most 1000 metrics, params and tags in one log_batch
_PARAMS_TAGS = 100  # ... of which at most 100 params, and 100 tags
# A trial's best-epoch weights (torch.save bytes of searchlab.training.Weights) in its run's artifacts, kept for
# a trial that may be among the study's best when it finishes (see searchlab.report.models).
WEIGHTS_DIR, WEIGHTS_FILE = "weights", "best.pt"
MODEL_NAME = "model"  # the logged MLflow model's name: runs:/<run id>/model


def _no_retries() -> contextlib.AbstractContextManager:
    """MLflow retries HTTP calls for minutes by default; a probe of a wrong URL should fail in seconds."""
    return environment(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="10")


class _RetryOnLock:
    """MlflowClient whose calls retry, with jittered backoff, while SQLite answers "database is locked".

    Several worker processes write one mlruns/mlflow.db. MLflow waits up to 20 s for SQLite's lock, but a
    transaction that must upgrade its lock is refused at once; a failed transaction is rolled back, so a retry
    cannot write twice.
    """

    ATTEMPTS = 12

    def __init__(self, client: MlflowClient) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._client, name)
        if not callable(method):
            return method

        def call(*args: Any, **kwargs: Any) -> Any:
            return _retry_on_lock(lambda: method(*args, **kwargs), self.ATTEMPTS)

        return call


def _retry_on_lock(call: Callable[[], Any], attempts: int) -> Any:
    for attempt in range(attempts):
        try:
            return call()
        except (MlflowException, sqlite3.OperationalError) as err:
            if "database is locked" not in str(err) or attempt == attempts - 1:
                raise
            time.sleep(min(2.0, 0.02 * 2 ** attempt) * random.uniform(0.5, 1.5))
    raise AssertionError("unreachable")


def _open_sqlite(uri: str) -> MlflowClient:
    """The client of an embedded store, created (tables, migrations) by one process at a time, in WAL mode.

    WAL lets the UI and other workers read while one writes, and makes each commit cheaper.
    """
    path = uri.removeprefix("sqlite:///")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with FileLock(path + ".lock")():
        client = MlflowClient(tracking_uri=uri)
        with _no_retries():
            client.search_experiments(max_results=1)
        _sqlite_without_fsync_per_commit(client)
    return client


def _probe_database(uri: str) -> None:
    """One quick connection: MLflow retries a database it cannot reach for ~100 s (10 tries, exponential backoff)."""
    engine = sqlalchemy.create_engine(uri, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect():
            pass
    finally:
        engine.dispose()


class Tracker:
    """The study's MLflow experiment and runs; opening it checks the store is reachable."""

    def __init__(self, uri: str, artifact_root: str | None, flush_seconds: float = 0.0) -> None:
        self.uri = uri
        self.artifact_root = artifact_root
        if isinstance(flush_seconds, bool) or not isinstance(flush_seconds, (int, float)) or not (
                0 <= flush_seconds < math.inf):
            raise ConfigError(f"tracking.flush_seconds: expected a number of seconds >= 0, got {flush_seconds!r}")
        self.flush_seconds = flush_seconds  # 0 writes every epoch at once
        self._pending: dict[str, list[Metric]] = {}  # run id -> epoch metrics not yet written
        self._flushed_at: dict[str, float] = {}
        self._experiment_of: dict[str, str] = {}  # parent run id -> experiment id, saves a read per trial
        self._params_at_end: dict[str, list[Param]] = {}  # run id -> params end_trial logs (start_trial's)
        try:
            if uri.startswith("sqlite:///"):
                self.client = _RetryOnLock(_open_sqlite(uri))
            else:
                if uri.split(":", 1)[0].split("+", 1)[0] in ("postgresql", "mysql", "mssql"):
                    _probe_database(uri)
                self.client = MlflowClient(tracking_uri=uri)
                with _no_retries():
                    self.client.search_experiments(max_results=1)
        except Exception as err:  # any failure to open the store is the user's URL or server
            reason = redact(str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__)
            raise ConfigError(f"tracking.uri: cannot open {redact(uri)}: {reason[:200]}") from None
        if artifact_root:
            try:
                Path(artifact_root).mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise ConfigError(f"tracking.artifact_root: cannot create '{artifact_root}': {err.strerror}") from None

    def experiment_id(self, name: str) -> str:
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        location = None
        if self.artifact_root:
            location = (Path(self.artifact_root).resolve() / name).as_uri()
        try:
            return self.client.create_experiment(name, artifact_location=location)
        except MlflowException as err:  # another worker created it since (no cross-process lock on grpc://)
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            return self.client.get_experiment_by_name(name).experiment_id

    def study_run(self, study_name: str, settings: Mapping[str, Any]) -> str:
        """The study's parent run, created on the first run of the study and reopened when it resumes."""
        experiment_id = self.experiment_id(study_name)
        found = self.client.search_runs(
            [experiment_id], filter_string=f"tags.`{ROLE_TAG}` = '{ROLE_STUDY}'", max_results=1,
            order_by=["attributes.start_time ASC"])
        if found:
            run_id = found[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            run_id = self.client.create_run(experiment_id, run_name=study_name, tags={
                ROLE_TAG: ROLE_STUDY, STUDY_NAME_TAG: study_name}).info.run_id
            self.client.log_batch(run_id, params=[Param(k, _text(v)) for k, v in settings.items()])
            run_id = self._earliest_parent(experiment_id, run_id)
        self._experiment_of[run_id] = experiment_id
        return run_id

    def _earliest_parent(self, experiment_id: str, mine: str) -> str:
        """Workers that start together without a cross-process lock (grpc://) may each create a parent run: every
        one keeps the earliest and deletes its own if it is not that one."""
        parents = self.client.search_runs([experiment_id], filter_string=f"tags.`{ROLE_TAG}` = '{ROLE_STUDY}'",
                                          max_results=1000)
        first = min(parents, key=lambda r: (r.info.start_time, r.info.run_id)).info.run_id
        if first != mine:
            self.client.delete_run(mine)
        return first

    def start_trial(self, parent_run_id: str, number: int, params: Mapping[str, Any], config_yaml: str = "",
                    command: str = "", name: str | None = None, role: str = ROLE_TRIAL,
                    tags: Mapping[str, str] | None = None, params_at_end: bool = False) -> str:
        """The trial's child run, created when the trial starts, with its params, config and re-run command (the
        one place a trial becomes a run: searchlab.study.trial's lifecycle, and the runs of lost trials).

        Its writes: one create_run (with the tags), one log_batch of the params, the config written straight to the
        run's artifact location (MlflowClient.log_text would read the run back first to find it). `params_at_end`
        (a pack's members, which train for seconds): the params go in end_trial's one log_batch with the metrics and
        tags instead, one write fewer per run; a run whose worker dies before its end gets them from
        fail_lost_trial."""
        if parent_run_id not in self._experiment_of:
            self._experiment_of[parent_run_id] = self.client.get_run(parent_run_id).info.experiment_id
        name = name or f"trial-{number}"
        run = self.client.create_run(self._experiment_of[parent_run_id], run_name=name, tags={
            MLFLOW_PARENT_RUN_ID: parent_run_id, MLFLOW_RUN_NAME: name, ROLE_TAG: role,
            TRIAL_NUMBER_TAG: str(number), TRIAL_STATE_TAG: "RUNNING", COMMAND_TAG: command, **(tags or {}),
        })
        run_id = run.info.run_id
        logged = [Param(k, _text(v)) for k, v in params.items()]
        if params_at_end:
            self._params_at_end[run_id] = logged
        elif logged:
            self._log_batch(run_id, params=logged)
        if config_yaml:
            self._write_text(run.info.artifact_uri, config_yaml, "config.yaml")
        return run_id

    def _write_text(self, artifact_uri: str, text: str, artifact_file: str) -> None:
        """MlflowClient.log_text to the run whose artifact location is `artifact_uri` (from its RunInfo), without
        log_text's read of the run."""
        repo = get_artifact_repository(artifact_uri, tracking_uri=self.uri)
        if isinstance(repo, LocalArtifactRepository):  # straight into the run's folder, without log_artifact's
            # temporary file and copy (bench "overhead", start_trial's own time: 1.2-1.3 -> 0.5-0.6 ms a trial)
            folder = Path(repo.artifact_dir)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / artifact_file).write_text(text, encoding="utf-8")
            return
        with tempfile.TemporaryDirectory(prefix="searchlab-text-") as folder:
            path = Path(folder) / artifact_file
            path.write_text(text, encoding="utf-8")
            repo.log_artifact(str(path))

    def _log_batch(self, run_id: str, metrics: Sequence[Metric] = (), params: Sequence[Param] = (),
                   tags: Sequence[RunTag] = ()) -> None:
        """One log_batch, or as few as MLflow's limits allow (100 params, 100 tags, 1000 entities in one call)."""
        metrics, params, tags = list(metrics), list(params), list(tags)
        while True:
            p, t = params[:_PARAMS_TAGS], tags[:_PARAMS_TAGS]
            m = metrics[:_BATCH - len(p) - len(t)]
            self.client.log_batch(run_id, metrics=m, params=p, tags=t)
            metrics, params, tags = metrics[len(m):], params[len(p):], tags[len(t):]
            if not (metrics or params or tags):
                return

    def fail_lost_trial(self, parent_run_id: str, number: int, params: Mapping[str, Any], reason: str) -> None:
        """The child run of a trial whose worker died, FAILED with the reason; created if the worker died first.
        A run without its params (a pack's member logs them at its end) gets `params` then."""
        experiment_id = self._experiment_of.get(parent_run_id) or self.client.get_run(parent_run_id).info.experiment_id
        found = self.client.search_runs([experiment_id], max_results=1, filter_string=(
            f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_run_id}' and tags.`{TRIAL_NUMBER_TAG}` = '{number}'"))
        if not found:
            self.end_trial(self.start_trial(parent_run_id, number, params), "FAIL", None, reason)
            return
        missing = {} if found[0].data.params else params
        self.end_trial(found[0].info.run_id, "FAIL", None, reason, params=missing)

    def log_epoch(self, run_id: str, epoch: int, metrics: Mapping[str, float]) -> None:
        """Buffered: the run's live curves in the UI lag by up to tracking.flush_seconds."""
        now = int(time.time() * 1000)
        pending = self._pending.setdefault(run_id, [])
        pending += [Metric(k, float(v), now, epoch) for k, v in metrics.items()]
        clock = time.monotonic()
        if clock - self._flushed_at.setdefault(run_id, clock) >= self.flush_seconds or len(pending) >= _BATCH:
            self.client.log_batch(run_id, metrics=pending)
            self._pending[run_id], self._flushed_at[run_id] = [], clock

    def resume_trial(self, run_id: str, epoch: int, continues: str | None,
                     history: Sequence[Mapping[str, float]]) -> None:
        """A trial resumed from its checkpoint of `epoch`: its new run says so (and which run it continues) and gets
        the curves of the epochs before, so that it shows the whole training."""
        now = int(time.time() * 1000)
        tags = [RunTag(RESUMED_FROM_TAG, str(epoch))]
        if continues:
            tags.append(RunTag(CONTINUES_TAG, continues))
        metrics = [Metric(k, float(v), now, number) for number, values in enumerate(history, 1)
                   for k, v in values.items()]
        for start in range(0, max(len(metrics), 1), _BATCH):
            self.client.log_batch(run_id, metrics=metrics[start:start + _BATCH], tags=tags if start == 0 else [])

    def end_trial(self, run_id: str, state: str, value: float | None, reason: str | None,
                  tags: Mapping[str, str] | None = None, metrics: Mapping[str, float] | None = None,
                  params: Mapping[str, Any] | None = None) -> None:
        """Final state tag (COMPLETE, PRUNED, FAIL), the objective value and, for pruned or failed, the reason;
        `tags` adds what is known only at the end, `metrics` final metrics (step 0), `params` params not logged yet.
        One log_batch with the epochs not yet flushed and the params kept for the end (start_trial), then the
        run's status."""
        tags = [RunTag(TRIAL_STATE_TAG, state), *(RunTag(k, str(v)) for k, v in (tags or {}).items())]
        if reason:
            tags.append(RunTag(TRIAL_REASON_TAG, reason[:5000]))
        logged = self._pending.pop(run_id, [])
        self._flushed_at.pop(run_id, None)
        now = int(time.time() * 1000)
        logged += [Metric(k, float(v), now, 0) for k, v in (metrics or {}).items()]
        if value is not None:
            logged.append(Metric("objective", value, now, 0))
        kept = self._params_at_end.pop(run_id, [])
        kept += [Param(k, _text(v)) for k, v in (params or {}).items() if k not in {p.key for p in kept}]
        self._log_batch(run_id, metrics=logged, params=kept, tags=tags)
        self.client.set_terminated(run_id, status=_FINAL_STATUS[state])

    def end_study(self, run_id: str, best: Mapping[str, Any] | None, counts: Mapping[str, int],
                  status: str = "FINISHED", metrics: Mapping[str, float] | None = None,
                  stopped: str | None = None) -> None:
        """Best value, trial and params (as tags: they change when the study resumes), trial counts, `metrics`;
        `stopped`: why study.stop_when ended the study before its budget (a tag, set or cleared on each end)."""
        now = int(time.time() * 1000)
        logged = [Metric(f"trials_{state.lower()}", n, now, 0) for state, n in counts.items()]
        logged += [Metric(k, float(v), now, 0) for k, v in (metrics or {}).items()]
        tags: list[RunTag] = [RunTag(STOPPED_TAG, stopped)] if stopped else []
        if not stopped and STOPPED_TAG in self.client.get_run(run_id).data.tags:  # an earlier run's stop
            self.client.delete_tag(run_id, STOPPED_TAG)
        if best:
            logged.append(Metric("best_value", best["value"], now, 0))
            tags.append(RunTag("best.trial_number", str(best["number"])))
            tags += [RunTag(f"best.{k}", _text(v)) for k, v in best["params"].items()]
        if logged or tags:
            self.client.log_batch(run_id, metrics=logged, tags=tags)
        self.client.set_terminated(run_id, status=status)

    def ablation_run(self, study_name: str, ablation: str, study_run_id: str | None,
                     settings: Mapping[str, Any]) -> str:
        """The `ablation` run of study `study_name`'s ablation study `ablation`, in the study's experiment (under
        its parent run `study_run_id` when that run is there); reopened when the ablation resumes."""
        experiment_id = self.experiment_id(study_name)
        found = self.client.search_runs(
            [experiment_id], max_results=1, order_by=["attributes.start_time ASC"],
            filter_string=f"tags.`{ROLE_TAG}` = '{ROLE_ABLATION}' and tags.`{ABLATION_STUDY_TAG}` = '{ablation}'")
        if found:
            run_id = found[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            tags = {ROLE_TAG: ROLE_ABLATION, ABLATION_STUDY_TAG: ablation, STUDY_NAME_TAG: ablation}
            if study_run_id:
                try:
                    if self.client.get_run(study_run_id).info.experiment_id == experiment_id:
                        tags[MLFLOW_PARENT_RUN_ID] = study_run_id
                except Exception:  # the study was tracked in another store: the ablation run stands alone
                    pass
            run_id = self.client.create_run(experiment_id, run_name="ablation", tags=tags).info.run_id
            self.client.log_batch(run_id, params=[Param(k, _text(v)) for k, v in settings.items()])
        self._experiment_of[run_id] = experiment_id
        return run_id

    def log_artifact(self, run_id: str, path: Path | str) -> None:
        self.client.log_artifact(run_id, str(path))

    def log_report(self, run_id: str, folder: Path) -> None:
        """The study report's files, under `report/` in the parent run's artifacts (replaced when re-made)."""
        self.client.log_artifacts(run_id, str(folder), "report")


    def save_weights(self, run_id: str, weights: bytes) -> None:
        """A trial's best-epoch weights under weights/best.pt in its run's artifacts (replaced if there)."""
        with tempfile.TemporaryDirectory(prefix="searchlab-weights-") as folder:
            path = Path(folder) / WEIGHTS_FILE
            path.write_bytes(weights)
            self.client.log_artifact(run_id, str(path), WEIGHTS_DIR)

    def load_weights(self, run_id: str) -> bytes | None:
        """What save_weights wrote for the run, or None."""
        if not any(a.path == f"{WEIGHTS_DIR}/{WEIGHTS_FILE}" for a in self.client.list_artifacts(run_id, WEIGHTS_DIR)):
            return None
        with tempfile.TemporaryDirectory(prefix="searchlab-weights-") as folder, environment(
                MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false"):  # a bar per file, in the middle of the study's output
            path = self.client.download_artifacts(run_id, f"{WEIGHTS_DIR}/{WEIGHTS_FILE}", folder)
            return Path(path).read_bytes()

    def logged_model(self, run_id: str) -> Any:
        """The MLflow LoggedModel named `model` that the run logged (READY), or None."""
        experiment_id = self.client.get_run(run_id).info.experiment_id
        found = self.client.search_logged_models(
            [experiment_id], filter_string=f"source_run_id = '{run_id}' AND name = '{MODEL_NAME}'", max_results=10)
        return next((m for m in found if str(m.status).endswith("READY")), None)

    def log_model(self, run_id: str, module: torch.nn.Module, example: torch.Tensor,
                  register_as: str | None = None) -> LoggedModelInfo:
        """The module (in eval mode, on the CPU) as the run's MLflow model `model`, with a signature and the input
        example; registered in the Model Registry as `register_as` when given. mlflow.pytorch.log_model takes
        the run by id (no active run, which would end the run again); it reads the tracking URI from MLflow's
        global, set for this call only (mlflow 3.17's _use_tracking_uri)."""
        import mlflow.pytorch
        from mlflow.tracking._tracking_service.utils import _use_tracking_uri

        start = time.perf_counter()
        module, signature = _for_saving(module, example)
        run = self.client.get_run(run_id)
        # Made here, in the run's experiment: log_model would make it in MLflow's active experiment (Default).
        model_id = self.client.create_logged_model(run.info.experiment_id, name=MODEL_NAME, source_run_id=run_id,
                                                   params=dict(run.data.params)).model_id
        with _use_tracking_uri(self.uri):
            for serialization in _FORMATS:
                try:
                    info = mlflow.pytorch.log_model(
                        module, name=MODEL_NAME, run_id=run_id, model_id=model_id, signature=signature,
                        input_example=example.numpy(), pip_requirements=_requirements(serialization, module),
                        serialization_format=serialization, registered_model_name=register_as)
                    break
                except Exception as err:
                    if serialization != "pt2" or not _not_exportable(err):
                        raise
                    note = f"torch.export failed ({_first_line(err)}); saved with pickle"
            else:
                raise AssertionError("unreachable")
        version = getattr(info, "registered_model_version", None)
        return LoggedModelInfo(f"runs:/{run_id}/{MODEL_NAME}", serialization, version,
                               time.perf_counter() - start, note if serialization == "pickle" else None)

    def start_training(self, experiment: str, config_yaml: str, command: str, params: Mapping[str, Any]) -> str:
        """A run of `searchlab train` (not a study's): its config, re-run command and overrides as params."""
        run = self.client.create_run(self.experiment_id(experiment), tags={
            ROLE_TAG: ROLE_TRAIN, COMMAND_TAG: command})
        self.client.log_batch(run.info.run_id, params=[Param(k, _text(v)) for k, v in params.items()])
        self.client.log_text(run.info.run_id, config_yaml, "config.yaml")
        return run.info.run_id


@dataclass(frozen=True)
class LoggedModelInfo:
    uri: str  # runs:/<run id>/model
    serialization: str  # pt2 (torch.export: loads without the model's code) or pickle
    registered_version: int | str | None
    seconds: float
    note: str | None = None


# pt2 (torch.export) first: the loaded model needs neither searchlab nor the user's code, and loading it runs no
# pickle. A network torch.export cannot trace (data-dependent control flow...) is saved with pickle instead, which
# needs the module's code importable where it is loaded.
_FORMATS = ("pt2", "pickle")


def _not_exportable(err: Exception) -> bool:
    """An error of torch.export's tracing, not of the store."""
    return not isinstance(err, (MlflowException, OSError))


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200] if text else ''}"


def _requirements(serialization: str, module: torch.nn.Module) -> list[str]:
    """Given, so MLflow does not infer them (~16 s); pickle also needs Lightning to unpickle a LightningModule."""
    from importlib.metadata import version

    requirements = [f"torch=={version('torch')}"]
    if serialization == "pickle":
        from searchlab.config.lightning_package import requirement_of

        requirements.append(requirement_of(module))  # pytorch-lightning or lightning: the one it is written with
    return requirements


def _for_saving(module: torch.nn.Module, example: torch.Tensor) -> tuple[torch.nn.Module, Any]:
    """The module on the CPU in eval mode (dropout off, batch norm's running stats), and its MLflow signature."""
    from mlflow.models import infer_signature

    module = module.cpu().eval()
    with torch.no_grad():
        output = module(example)
    outputs = output.detach().numpy() if isinstance(output, torch.Tensor) else None
    return module, infer_signature(example.numpy(), outputs)


def save_model(path: Path, module: torch.nn.Module, example: torch.Tensor) -> str:
    """The module as an MLflow model in the folder `path` (made here; it must not hold anything yet), as log_model
    saves it. Returns the serialization used (pt2, or pickle when torch.export fails)."""
    import mlflow.pytorch

    module, signature = _for_saving(module, example)
    for serialization in _FORMATS:
        try:
            mlflow.pytorch.save_model(module, str(path), signature=signature, input_example=example.numpy(),
                                      pip_requirements=_requirements(serialization, module),
                                      serialization_format=serialization)
            return serialization
        except Exception as err:
            if serialization != "pt2" or not _not_exportable(err):
                raise
            shutil.rmtree(path, ignore_errors=True)
    raise AssertionError("unreachable")


def _text(value: Any) -> str:
    return str(value)[:6000]


def _sqlite_pragmas(connection: Any, _record: Any) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _sqlite_without_fsync_per_commit(client: MlflowClient) -> None:
    """WAL journal, synchronous=NORMAL on MLflow's SQLite engine: a commit no longer waits for fsync (MLflow leaves
    SQLite's defaults; its own bulk import uses WAL), 2-3x cheaper writes on a busy disk, and readers (the UI) no
    longer block writers. A crash of the machine, not of the process, may lose the last writes. The engine is
    reached through mlflow 3.17's store internals; another store (a server) is left alone."""
    engine = getattr(getattr(client._tracking_client, "store", None), "engine", None)
    if engine is None or engine.dialect.name != "sqlite" or event.contains(engine, "connect", _sqlite_pragmas):
        return
    event.listen(engine, "connect", _sqlite_pragmas)
    engine.dispose()  # pooled connections reconnect with the pragmas
    with engine.connect():
        pass  # WAL is a property of the file: set it now, before any other process opens the store
