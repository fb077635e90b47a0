"""MLflow tracking of a study: one experiment per study, a parent run for it, a nested child run per trial.

Written on MlflowClient with explicit run ids, never MLflow's global active run: optuna-integration's MLflowCallback
logs only at trial end through the active run and makes no parent run (optuna#5148), so it cannot show a live,
nested study. One `log_batch` per epoch keeps the store's cost per trial to a few writes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from searchlab.config import ConfigError, redact

STUDY_ROLE_TAG = "searchlab.role"
logging.getLogger("mlflow").setLevel(logging.WARNING)  # "Creating initial MLflow database tables..." and the like
_FINAL_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}


@contextlib.contextmanager
def _no_retries() -> Iterator[None]:
    """MLflow retries HTTP calls for minutes by default; a probe of a wrong URL should fail in seconds."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="10")
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class Tracker:
    """The study's MLflow experiment and runs; opening it checks the store is reachable."""

    def __init__(self, uri: str, artifact_root: str | None) -> None:
        self.uri = uri
        self.artifact_root = artifact_root
        self._experiment_of: dict[str, str] = {}  # parent run id -> experiment id, saves a read per trial
        try:
            if uri.startswith("sqlite:///"):
                Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
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
        return self.client.create_experiment(name, artifact_location=location)

    def study_run(self, study_name: str, settings: Mapping[str, Any]) -> str:
        """The study's parent run, created on the first run of the study and reopened when it resumes."""
        experiment_id = self.experiment_id(study_name)
        found = self.client.search_runs(
            [experiment_id], filter_string=f"tags.`{STUDY_ROLE_TAG}` = 'study'", max_results=1,
            order_by=["attributes.start_time ASC"])
        if found:
            run_id = found[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            run_id = self.client.create_run(experiment_id, run_name=study_name, tags={
                STUDY_ROLE_TAG: "study", "optuna.study_name": study_name}).info.run_id
            self.client.log_batch(run_id, params=[Param(k, _text(v)) for k, v in settings.items()])
        self._experiment_of[run_id] = experiment_id
        return run_id

    def start_trial(self, parent_run_id: str, number: int, params: Mapping[str, Any], config_yaml: str,
                    command: str) -> str:
        """The trial's child run, created when the trial starts, with its params, config and re-run command."""
        if parent_run_id not in self._experiment_of:
            self._experiment_of[parent_run_id] = self.client.get_run(parent_run_id).info.experiment_id
        run = self.client.create_run(self._experiment_of[parent_run_id], run_name=f"trial-{number}", tags={
            MLFLOW_PARENT_RUN_ID: parent_run_id, MLFLOW_RUN_NAME: f"trial-{number}", STUDY_ROLE_TAG: "trial",
            "optuna.trial.number": str(number), "optuna.trial.state": "RUNNING", "searchlab.command": command,
        })
        self.client.log_batch(run.info.run_id, params=[Param(k, _text(v)) for k, v in params.items()])
        self.client.log_text(run.info.run_id, config_yaml, "config.yaml")
        return run.info.run_id

    def log_epoch(self, run_id: str, epoch: int, metrics: Mapping[str, float]) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(k, float(v), now, epoch) for k, v in metrics.items()])

    def end_trial(self, run_id: str, state: str, value: float | None, reason: str | None) -> None:
        """Final state tag (COMPLETE, PRUNED, FAIL), the objective value and, for pruned or failed, the reason."""
        tags = [RunTag("optuna.trial.state", state)]
        if reason:
            tags.append(RunTag("optuna.trial.reason", reason[:5000]))
        metrics = [] if value is None else [Metric("objective", value, int(time.time() * 1000), 0)]
        self.client.log_batch(run_id, metrics=metrics, tags=tags)
        self.client.set_terminated(run_id, status=_FINAL_STATUS[state])

    def end_study(self, run_id: str, best: Mapping[str, Any] | None, counts: Mapping[str, int],
                  status: str = "FINISHED") -> None:
        """Best value, trial and params (as tags: they change when the study resumes), trial counts."""
        now = int(time.time() * 1000)
        metrics = [Metric(f"trials_{state.lower()}", n, now, 0) for state, n in counts.items()]
        tags: list[RunTag] = []
        if best:
            metrics.append(Metric("best_value", best["value"], now, 0))
            tags.append(RunTag("best.trial_number", str(best["number"])))
            tags += [RunTag(f"best.{k}", _text(v)) for k, v in best["params"].items()]
        self.client.log_batch(run_id, metrics=metrics, tags=tags)
        self.client.set_terminated(run_id, status=status)

    def log_report(self, run_id: str, folder: Path) -> None:
        """The study report's files, under `report/` in the parent run's artifacts (replaced when re-made)."""
        self.client.log_artifacts(run_id, str(folder), "report")


def _text(value: Any) -> str:
    return str(value)[:6000]
