"""Several worker processes on one study, on the embedded default stores (journal file + SQLite MLflow).

Real `searchlab search workers=N` processes: the global budget, one MLflow run per trial, a worker killed with
SIGKILL mid-trial, Ctrl-C forwarding, and a resumed study clearing what a dead process left behind.
"""

from __future__ import annotations

import collections
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import optuna
import pytest
from helpers import (
    FINISHED,
    SEARCHLAB,
    assert_one_kept_one_given_back,
    assert_one_run_per_trial,
    load_study,
    race_for_the_last_trial,
    runs_of,
    wait_for_running,
)

from searchlab.cli import main

TINY = ["trainer.max_epochs=2", "model.width=32"]
# No model logged at a study's end (a cold torch.export in a fresh process); no test here reads one.
NO_MODEL = ["tracking.log_models=none"]


@pytest.mark.slow
def test_three_workers_share_one_budget_without_lock_errors(tmp_path, store_overrides):
    # Trials of ~0.5-1 s, none pruned: TINY's (~50 ms on the packing engine) let the first worker up take all 9 before
    # the others had started (CI of 88fdf1c: one worker pid).
    longer = ["trainer.max_epochs=60", "model.width=32", "study.pruner=none"]
    result = subprocess.run(
        [SEARCHLAB, "search", "workers=3", "study.name=three", "study.n_trials=9", *longer, *NO_MODEL,
         *store_overrides],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "database is locked" not in result.stderr and "Traceback" not in result.stderr, result.stderr
    study = load_study(tmp_path, "three")
    numbers = [t.number for t in study.trials]
    assert len(numbers) == len(set(numbers))
    assert len([t for t in study.trials if t.state.name in FINISHED]) == 9  # not 27, not 10
    assert not [t for t in study.trials if t.state.name in ("RUNNING", "WAITING")]
    assert_one_run_per_trial(tmp_path, "three", study)
    # The parent printed every finished trial, whichever worker ran it; workers are its children, not itself.
    assert sum(result.stdout.count(f"trial {t.number:4d}  {t.state.name}") for t in study.trials) == len(study.trials)
    pids = {t.user_attrs["worker.pid"] for t in study.trials}
    assert len(pids) >= 2 and all(t.user_attrs["worker.host"] == socket.gethostname() for t in study.trials)


@pytest.mark.slow
def test_a_worker_killed_mid_trial_loses_no_budget(tmp_path, store_overrides):
    # 100 epochs (~2-3 s on the packing engine): the kill lands mid-trial, the retry stays short
    slow = ["data.batch_size=16", "model.batch_norm=false", "study.pruner=none", "trainer.max_epochs=100",
            "model.width=32", *NO_MODEL]
    proc = subprocess.Popen(
        [SEARCHLAB, "search", "workers=2", "study.name=killed", "study.n_trials=2", *slow, *store_overrides],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        (victim, *_) = wait_for_running(tmp_path, "killed", 1, proc)
        os.kill(victim.user_attrs["worker.pid"], signal.SIGKILL)
        out, err = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "killed by SIGKILL" in err and "replaces it" in err
    study = load_study(tmp_path, "killed")
    lost = study.trials[victim.number]
    assert lost.state.name == "FAIL" and "died mid-trial" in lost.user_attrs["reason"]
    retries = [t for t in study.trials if t.user_attrs.get("retry_of") == victim.number]
    assert len(retries) == 1 and retries[0].params == lost.params and retries[0].state.name in FINISHED
    assert len([t for t in study.trials if t.state.name in FINISHED]) == 2
    runs = assert_one_run_per_trial(tmp_path, "killed", study)
    assert runs[victim.number].info.status == "FAILED"
    assert "died mid-trial" in runs[victim.number].data.tags["optuna.trial.reason"]
    assert f"trial {victim.number:4d}  FAIL" in out


@pytest.mark.slow
def test_ctrl_c_reaches_every_worker_through_the_parent(tmp_path, store_overrides):
    # Trials that cannot end (the packing engine trains 500 of these epochs in seconds) nor be checkpointed
    # (re-queued WAITING on Ctrl-C) before the signal, however slow the machine is to start the workers.
    slow = ["data.batch_size=16", "model.batch_norm=false", "study.pruner=none", "trainer.max_epochs=100000",
            "trainer.checkpoint_auto_seconds=36000", "model.width=32"]
    proc = subprocess.Popen(
        [SEARCHLAB, "search", "workers=2", "study.name=ctrlc", "study.n_trials=4", *slow, *store_overrides],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        running = wait_for_running(tmp_path, "ctrlc", 2, proc)
        proc.send_signal(signal.SIGINT)  # the parent alone: workers run in their own sessions
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "run the same command to resume" in err and "Traceback" not in err
    for trial in running:
        pid = trial.user_attrs["worker.pid"]
        assert not Path(f"/proc/{pid}").exists(), f"worker {pid} still running"
    study = load_study(tmp_path, "ctrlc")
    assert {t.state.name for t in study.trials} == {"FAIL"}
    assert all(t.user_attrs["reason"] == "interrupted" for t in study.trials)
    _, parents, children = runs_of(tmp_path, "ctrlc")
    assert parents[0].info.status == "KILLED" and {r.info.status for r in children} == {"FAILED"}


def test_a_resumed_study_fails_and_retries_the_trial_of_a_dead_process(tmp_path, store_overrides, capsys):
    args = ["search", "study.name=orphan", "study.pruner=none", *TINY, *store_overrides]
    assert main([*args, "study.n_trials=1"]) == 0
    # A process that asked for a trial and died without telling it (as after SIGKILL with no parent watching).
    study = load_study(tmp_path, "orphan")
    dead = subprocess.Popen(["true"])
    dead.wait()
    orphan = study.ask()
    lr = orphan.suggest_float("optimizer.lr", 1e-4, 0.3, log=True)
    orphan.set_user_attr("worker.pid", dead.pid)
    orphan.set_user_attr("worker.host", socket.gethostname())
    assert main([*args, "study.n_trials=2", "workers=1"]) == 0
    study = load_study(tmp_path, "orphan")
    lost = study.trials[orphan.number]
    assert lost.state.name == "FAIL" and f"worker {dead.pid}" in lost.user_attrs["reason"]
    (retry,) = [t for t in study.trials if t.user_attrs.get("retry_of") == orphan.number]
    assert retry.params["optimizer.lr"] == lr and retry.state.name in FINISHED
    assert len([t for t in study.trials if t.state.name in FINISHED]) == 2
    runs = assert_one_run_per_trial(tmp_path, "orphan", study)
    assert runs[orphan.number].info.status == "FAILED"  # created for it: the dead process never made one


def race_for_the_budget(url: str, n_trials: int = 20, workers: int = 8, locked: bool = True) -> collections.Counter:
    """Workers (threads, each with its own storage handle and lock, as processes have) race for n_trials; a third
    of the trials fail, so workers that found the budget reserved must wait and take the freed share. Returns the
    trial states. Reusable for any study.storage URL (e.g. PostgreSQL)."""
    import random
    import threading

    from searchlab.locks import NoLock, budget_lock
    from searchlab.study.budget import Budget
    from searchlab.study.storage import open_storage

    optuna.create_study(study_name="race", storage=open_storage(url))
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        try:
            storage = open_storage(url)
            study = optuna.load_study(study_name="race", storage=storage)
            lock = budget_lock(storage, url, "race") if locked else NoLock()
            budget = Budget(study, n_trials, lock, poll_seconds=0.01)
            rng = random.Random(seed)
            while (trial := budget.reserve()) is not None:
                time.sleep(rng.uniform(0, 0.02))
                failed = rng.random() < 0.3
                study.tell(trial, None if failed else 1.0, state=optuna.trial.TrialState.FAIL if failed else None)
        except BaseException as err:  # a thread's failure is reported by the assert below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    study = optuna.load_study(study_name="race", storage=open_storage(url))
    return collections.Counter(t.state.name for t in study.trials)


@pytest.mark.parametrize("storage", ["optuna.journal", "sqlite:///{tmp}/optuna.db"])
def test_concurrent_reservations_never_overshoot_the_budget(tmp_path, storage):
    url = storage.format(tmp=tmp_path) if "://" in storage else str(tmp_path / storage)
    states = race_for_the_budget(url)
    assert states["COMPLETE"] == 20 and states["FAIL"] > 0 and set(states) == {"COMPLETE", "FAIL"}


@pytest.mark.parametrize("storage", ["optuna.journal", "sqlite:///{tmp}/optuna.db"])
def test_without_a_lock_a_surplus_trial_is_given_back_unrun(tmp_path, storage):
    """Forced: both workers count the last trial free, then both ask; the later-numbered trial is given back.
    (PostgreSQL and the gRPC proxy: test_cluster.)"""
    url = storage.format(tmp=tmp_path) if "://" in storage else str(tmp_path / storage)
    assert_one_kept_one_given_back(*race_for_the_last_trial(url, "surplus"))


def test_without_a_lock_racing_workers_still_finish_the_exact_budget(tmp_path):
    # As through the gRPC proxy: no lock, so racing workers ask past the budget (16 threads without the give-back
    # finished 21-22 of 20 in 2 of 3 races); the budget still holds.
    for race in range(3):
        states = race_for_the_budget(str(tmp_path / f"optuna{race}.journal"), workers=16, locked=False)
        assert states["COMPLETE"] == 20 and set(states) == {"COMPLETE", "FAIL"}


def test_mlflow_writes_refused_by_a_locked_sqlite_are_retried():
    from mlflow.exceptions import MlflowException

    from searchlab.tracking.mlflow import _retry_on_lock

    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise MlflowException("(sqlite3.OperationalError) database is locked")
        return "written"

    assert _retry_on_lock(flaky, attempts=5) == "written" and len(calls) == 3
    calls.clear()
    with pytest.raises(MlflowException, match="locked"):
        _retry_on_lock(flaky, attempts=2)  # gives up after its attempts (flaky succeeds only on a third)
    with pytest.raises(MlflowException, match="no such run"):  # anything else is raised at once
        _retry_on_lock(lambda: (_ for _ in ()).throw(MlflowException("no such run")), attempts=5)
