"""Several machines: `searchlab worker` processes sharing one study on a real PostgreSQL (directly or through the gRPC
storage proxy), tracked on a real MLflow server; a worker killed mid-trial is found by Optuna's heartbeat."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from helpers import assert_one_kept_one_given_back, race_for_the_last_trial, stop, wait_until
from mlflow.tracking import MlflowClient
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState
from servers import MlflowServer

from searchlab.cli import main
from searchlab.config import ConfigError, compose_config
from searchlab.study.faults import GrpcProxyWithHeartbeat, fail_stale_trials, heartbeat, heartbeat_settings
from searchlab.study.storage import open_storage
from searchlab.training.checkpoints import CHECKPOINT_FILE, read_saved

TINY = ["trainer.max_epochs=2", "model.width=32"]
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
WORKER_SECONDS = 150  # generous: the machine running the tests may be shared


def start_worker(log: Path, overrides: list[str], env: dict[str, str] | None = None,
                 host: str | None = None) -> subprocess.Popen:
    """`searchlab worker` in its own session; with host, in its own UTS namespace under that hostname, as if it
    ran on another machine (so only the heartbeat, not the local pid check, can tell that it died)."""
    command = [sys.executable, "-m", "searchlab.cli", "worker", *overrides]
    if host is not None:
        command = ["unshare", "--uts", "sh", "-c", f'hostname {host} && exec "$@"', "sh", *command]
    with log.open("wb") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def wait_all(workers: list[subprocess.Popen], logs: list[Path]) -> None:
    deadline = time.monotonic() + WORKER_SECONDS
    try:
        for proc in workers:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pytest.fail("workers did not finish:\n" + "\n".join(log.read_text()[-1500:] for log in logs))
    finally:
        for proc in workers:
            stop(proc)
    for proc, log in zip(workers, logs, strict=True):
        assert proc.returncode == 0, log.read_text()[-3000:]


def study_overrides(name: str, storage: str, tracking: MlflowServer, n_trials: int) -> list[str]:
    return [f"study.name={name}", f"study.storage={storage}", f"study.n_trials={n_trials}",
            f"tracking.uri={tracking.uri}", "tracking.artifact_root=null"]


def check_budget_and_runs(study: optuna.Study, tracking: MlflowServer, n_trials: int) -> None:
    """Exactly n_trials finished, unique trial numbers, one MLflow child run per finished trial, one parent run."""
    trials = study.get_trials(deepcopy=False)
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers))
    finished = [t for t in trials if t.state in FINISHED]
    assert len(finished) == n_trials, [(t.number, t.state.name) for t in trials]
    # A trial given back unrun (no lock through the gRPC proxy) is FAIL with its reason and uses no budget. Workers
    # rarely race here, so this may check no trial: test_a_surplus_trial_is_given_back_on_each_server forces one.
    assert all(t.state == TrialState.FAIL and t.user_attrs["reason"].startswith("not run")
               for t in trials if t.user_attrs.get("surplus"))
    client = MlflowClient(tracking.uri)
    experiment = client.get_experiment_by_name(study.study_name)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("searchlab.role") == "study"]
    children = [r for r in runs if r.data.tags.get("searchlab.role") == "trial"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in children)
    by_number = {int(r.data.tags["optuna.trial.number"]): r for r in children}
    assert len(by_number) == len(children)  # one run per trial number
    for trial in finished:
        run = by_number[trial.number]
        assert run.info.status in ("FINISHED", "KILLED") and run.data.tags["optuna.trial.state"] == trial.state.name
        # the run's params: the trial's, and the keys a space constraint set instead of drawing them
        drawn_or_set = {**trial.params, **trial.user_attrs.get("constrained", {})}
        assert run.data.params == {k: str(v) for k, v in drawn_or_set.items()}


def test_three_workers_share_a_study_on_postgres_and_an_mlflow_server(postgres, mlflow_server, tmp_path):
    url = postgres.create_database("workers")
    n_trials = 6
    # The URL, password included, comes from the environment through OmegaConf's oc.env resolver.
    overrides = [*study_overrides("pg", "${oc.env:SEARCHLAB_TEST_STORAGE}", mlflow_server, n_trials), *TINY]
    logs = [tmp_path / f"worker{i}.log" for i in range(3)]
    workers = [start_worker(log, overrides, env={"SEARCHLAB_TEST_STORAGE": url}) for log in logs]
    wait_all(workers, logs)
    study = optuna.load_study(study_name="pg", storage=url)
    check_budget_and_runs(study, mlflow_server, n_trials)
    # The password is never printed, nor logged to MLflow.
    for log in logs:
        text = log.read_text()
        assert "study 'pg'" in text and postgres.password not in text
    parent = MlflowClient(mlflow_server.uri).search_runs(
        [MlflowClient(mlflow_server.uri).get_experiment_by_name("pg").experiment_id],
        filter_string="tags.`searchlab.role` = 'study'")[0]
    assert all(postgres.password not in v for v in parent.data.params.values())
    assert parent.data.params["study.storage"] == postgres.url("workers").replace(postgres.password, "***")


def test_three_workers_through_the_grpc_storage_proxy(postgres, mlflow_server, storage_proxy, tmp_path):
    n_trials = 6
    overrides = [*study_overrides("grpc", f"grpc://127.0.0.1:{storage_proxy.port}", mlflow_server, n_trials), *TINY]
    logs = [tmp_path / f"worker{i}.log" for i in range(3)]
    wait_all([start_worker(log, overrides) for log in logs], logs)
    # The trials went through the proxy into PostgreSQL. No cross-process lock through the proxy, yet the budget is
    # exact: a trial asked past it is given back unrun (budget.Budget).
    study = optuna.load_study(study_name="grpc", storage=storage_proxy.backend)
    check_budget_and_runs(study, mlflow_server, n_trials)
    assert postgres.password not in storage_proxy.log.read_text()


@pytest.mark.parametrize("through", ["postgresql", "grpc"])
def test_a_surplus_trial_is_given_back_on_each_server(postgres, storage_proxy, through):
    """The give-back path on the servers' storages, forced (both workers count the last trial free, then ask):
    PostgreSQL directly, and through the gRPC proxy (which has no cross-process lock)."""
    url = postgres.create_database("surplus") if through == "postgresql" else f"grpc://127.0.0.1:{storage_proxy.port}"
    assert_one_kept_one_given_back(*race_for_the_last_trial(url, f"surplus-{through}"))


def test_heartbeat_through_the_grpc_proxy_fails_and_retries_a_silent_trial(storage_proxy):
    storage = GrpcProxyWithHeartbeat(host="127.0.0.1", port=storage_proxy.port, heartbeat_interval=1, grace_period=2,
                                     heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1))
    study = optuna.create_study(study_name="grpc-heartbeat", storage=storage)
    trial = study.ask()
    trial.suggest_float("x", 0.0, 1.0)
    with heartbeat(trial):  # beating past the grace period keeps it alive
        time.sleep(3)
        fail_stale_trials(study)
        assert study.trials[trial.number].state == TrialState.RUNNING
    # Its worker is gone: once no beat came for longer than the grace period, the check fails it (polled: a busy
    # machine may take longer than 2 s to get there).
    def failed() -> list[optuna.trial.FrozenTrial]:
        fail_stale_trials(study)
        trials = optuna.load_study(study_name="grpc-heartbeat", storage=storage_proxy.backend).trials
        return trials if trials[trial.number].state == TrialState.FAIL else []

    trials = wait_until(failed, "the silent trial failed by the heartbeat check", 60)
    (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == trial.number]
    assert retry.state == TrialState.WAITING and retry.params == trial.params
    storage.close()


def test_worker_killed_mid_trial_is_failed_and_retried_by_the_heartbeat(postgres, mlflow_server, tmp_path):
    url = postgres.create_database("heartbeat")
    n_trials = 4
    epochs = 40  # epochs of ~40 ms on the packing engine (with a checkpoint each): the kill lands mid-trial
    overrides = [*study_overrides("lost", url, mlflow_server, n_trials), f"trainer.max_epochs={epochs}",
                 "model.width=32",
                 "study.pruner=none", "study.heartbeat_interval=1", "study.grace_period=3", "study.max_retry=2",
                 "trainer.checkpoint_every_n_epochs=1", f"tracking.artifact_root={tmp_path}/artifacts"]
    storage = RDBStorage(url)
    # The victim runs "on another machine": only the heartbeat can tell that it died, not a local pid check.
    victim = start_worker(tmp_path / "victim.log", overrides, host="node-b")

    def running_mid_trial() -> optuna.trial.FrozenTrial | None:
        try:
            study = optuna.load_study(study_name="lost", storage=storage)
        except KeyError:  # not created yet
            return None
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        return next((t for t in running if "mlflow_run_id" in t.user_attrs and (saved := read_saved(
            tmp_path / "artifacts" / "lost" / "checkpoints" / f"trial-{t.number}" / CHECKPOINT_FILE)) is not None
            and saved.epoch >= 2), None)

    lost = wait_until(running_mid_trial, "a trial of the victim worker", 90, victim, tmp_path / "victim.log")
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    assert lost.user_attrs["worker.host"] == "node-b"

    logs = [tmp_path / f"worker{i}.log" for i in range(2)]
    wait_all([start_worker(log, overrides) for log in logs], logs)
    study = optuna.load_study(study_name="lost", storage=url)
    check_budget_and_runs(study, mlflow_server, n_trials)
    failed = study.trials[lost.number]
    assert failed.state == TrialState.FAIL
    retries = [t for t in study.trials if t.system_attrs.get("failed_trial") == lost.number]
    assert len(retries) == 1
    retry = retries[0]
    assert retry.system_attrs["retry_history"] == [lost.number]
    assert retry.params == lost.params and retry.state == TrialState.COMPLETE
    # ... from the checkpoint the dead worker left: only the remaining epochs are trained again.
    resumed_from = retry.user_attrs["resumed_from_epoch"]
    assert resumed_from >= 2 and retry.user_attrs["epochs_trained"] == epochs - resumed_from
    run = MlflowClient(mlflow_server.uri).get_run(lost.user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED" and run.data.tags["optuna.trial.state"] == "FAIL"
    assert "no heartbeat for 3s" in run.data.tags["optuna.trial.reason"]


@pytest.mark.parametrize(("overrides", "message"), [
    (["study.heartbeat_interval=0"], "study.heartbeat_interval: expected an integer >= 1 or null, got 0"),
    (["study.grace_period=1.5"], "study.grace_period: expected an integer >= 1 or null, got 1.5"),
    (["study.max_retry=-1"], "study.max_retry: expected an integer >= 0 or null, got -1"),
    (["study.heartbeat_interval=10", "study.grace_period=10"], "study.grace_period: 10s must exceed"),
])
def test_bad_heartbeat_settings_name_their_key(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        heartbeat_settings(compose_config(overrides).study, tracker=None)


def test_heartbeat_settings_from_config():
    settings = heartbeat_settings(compose_config(["study.heartbeat_interval=5", "study.grace_period=null"]).study,
                                  tracker=None)
    assert settings["heartbeat_interval"] == 5 and settings["grace_period"] == 10  # Optuna's default: 2 beats
    assert heartbeat_settings(compose_config(["study.heartbeat_interval=null"]).study, tracker=None) == {}


@pytest.mark.parametrize("url", ["grpc://proxy-host", "grpc://proxy-host:port", "grpc://:13000",
                                 "grpc://proxy-host:13000/db"])
def test_malformed_grpc_url_names_study_storage(url):
    with pytest.raises(ConfigError, match=r"study\.storage: expected grpc://HOST:PORT"):
        open_storage(url)


def test_storage_proxy_refuses_a_journal_file(tmp_path, capsys):
    assert main(["storage-proxy", f"study.storage={tmp_path}/optuna.journal"]) == 2
    assert "study.storage: the gRPC storage proxy serves an RDB storage" in capsys.readouterr().err
