"""Helpers shared by the test modules (plain functions; the fixtures are in conftest.py).

One copy each: reading a study and its MLflow runs back, the CLI in this process or as a command, waiting on polled
state instead of sleeping, and the bad-input contract. Test modules import from here, never from each other.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import numpy as np
import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

T = TypeVar("T")

REPO = Path(__file__).resolve().parent.parent
SEARCHLAB = str(Path(sys.executable).parent / "searchlab")  # the console script of this venv
FINISHED = ("COMPLETE", "PRUNED")
# Enough epochs to stop a search mid-trial, checkpointed every epoch: 30 (the packing engine trains one of these
# in ~40 ms with its checkpoint, Lightning in ~0.1-0.5 s), so a signal sent after epoch 2-3's checkpoint lands
# long before the trial's end. No model is logged at the study's end (no test stopping a search reads one:
# test_model_out does).
LONG_EPOCHS = 30
LONG = ["study.pruner=none", f"trainer.max_epochs={LONG_EPOCHS}", "data.batch_size=16", "model.width=32",
        "model.batch_norm=false", "trainer.checkpoint_every_n_epochs=1", "tracking.log_models=none"]


# --- waiting: poll state, never sleep a guessed time ------------------------------------------------------------

def wait_until(ready: Callable[[], T], what: str, timeout: float, process: subprocess.Popen | None = None,
               log: Path | None = None, interval: float = 0.05) -> T:
    """Polls ready() until it returns something truthy and returns that; fails (with the log's tail) when the
    process dies first or `timeout` seconds pass. The timeout is generous: it bounds a hang, not the speed."""
    deadline = time.monotonic() + timeout
    while True:
        value = ready()
        if value:
            return value
        if process is not None and process.poll() is not None:
            reason = f"exited with {process.returncode}"
            break
        if time.monotonic() >= deadline:
            reason = f"not within {timeout:.0f}s"
            break
        time.sleep(interval)
    tail = log.read_text(errors="replace")[-2000:] if log is not None and log.exists() else ""
    if process is not None and log is None and process.poll() is not None and (process.stdout or process.stderr):
        tail = "".join(str(part or "") for part in process.communicate())[-2000:]  # what the process said
    pytest.fail(f"{what}: {reason}\n{tail}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(process: subprocess.Popen, timeout: float = 3) -> None:
    """SIGTERM to the process group the test started (a server and its own workers), SIGKILL if it lingers."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


# --- a study and its runs, read back ----------------------------------------------------------------------------

def load_study(folder: Path, name: str) -> optuna.Study:
    """The study `name` in folder/optuna.journal (the store_overrides layout)."""
    storage = JournalStorage(JournalFileBackend(str(Path(folder) / "optuna.journal")))
    return optuna.load_study(study_name=name, storage=storage)


def study_names(folder: Path) -> list[str]:
    storage = JournalStorage(JournalFileBackend(str(Path(folder) / "optuna.journal")))
    return [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]


def runs_of(folder: Path, name: str) -> tuple[MlflowClient, list, list]:
    """(client, parent runs, trial runs) of the experiment `name` in folder/mlflow.db."""
    client = MlflowClient(f"sqlite:///{folder}/mlflow.db")
    experiment = client.get_experiment_by_name(name)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("searchlab.role") == "study"]
    children = [r for r in runs if r.data.tags.get("searchlab.role") == "trial"]
    return client, parents, children


def assert_one_run_per_trial(folder: Path, name: str, study: optuna.Study) -> dict:
    """Every finished trial has exactly one child run, in its state; returns the runs by trial number."""
    _, parents, children = runs_of(folder, name)
    assert len(parents) == 1
    numbers = Counter(int(r.data.tags["optuna.trial.number"]) for r in children)
    finished = [t for t in study.trials if t.state.is_finished()]
    assert numbers == Counter(t.number for t in finished)
    by_number = {int(r.data.tags["optuna.trial.number"]): r for r in children}
    for trial in finished:
        assert by_number[trial.number].data.tags["optuna.trial.state"] == trial.state.name
    return by_number


def running_trials_with_runs(folder: Path, name: str) -> list[optuna.trial.FrozenTrial]:
    """RUNNING trials already training: their worker recorded itself and their MLflow run exists."""
    if not (Path(folder) / "optuna.journal").exists():
        return []
    try:
        study = load_study(folder, name)
    except KeyError:  # the study is not created yet
        return []
    return [t for t in study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
            if "worker.pid" in t.user_attrs and "mlflow_run_id" in t.user_attrs]


def wait_for_running(folder: Path, name: str, count: int, proc: subprocess.Popen,
                     timeout: float = 180) -> list[optuna.trial.FrozenTrial]:
    """Polls until `count` trials of the study run (with their MLflow runs); fails if `proc` exits first."""
    def running() -> list[optuna.trial.FrozenTrial]:
        trials = running_trials_with_runs(folder, name)
        return trials if len(trials) >= count else []

    return wait_until(running, f"{count} running trials of study {name!r}", timeout, proc)


def checkpoint_epoch(folder: Path) -> int:
    """The latest epoch of any trial's checkpoint under folder (a tracking.artifact_root)."""
    from searchlab.training.checkpoints import CHECKPOINT_FILE, read_saved

    epochs = [read_saved(p) for p in Path(folder).glob(f"*/checkpoints/*/{CHECKPOINT_FILE}")]
    return max((s.epoch for s in epochs if s is not None), default=0)


def wait_for_checkpoint(folder: Path, epoch: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    wait_until(lambda: checkpoint_epoch(folder) >= epoch, f"a checkpoint of epoch {epoch}", timeout, proc)


def terminate_after_checkpoint(command: list[str], artifacts: Path, epoch: int, cwd: Path | None = None
                               ) -> tuple[int, str]:
    """Starts `command`, sends SIGTERM once its trial has a checkpoint of `epoch` under `artifacts` (as a preemption
    would), and returns its exit code and stderr."""
    proc = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_checkpoint(artifacts, epoch, proc)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    return proc.returncode, err


def load_model(tracking_uri: str, model_uri: str):
    """mlflow.pytorch.load_model of a runs:/ or models:/ URI from this store (those URIs read the tracking URI: set
    for this call as searchlab.tracking does, over any global an earlier test left, e.g. Lightning's MLFlowLogger)."""
    import mlflow.pytorch
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    with _use_tracking_uri(tracking_uri):
        return mlflow.pytorch.load_model(model_uri)


# --- the CLI ----------------------------------------------------------------------------------------------------

def run_cli(*args: str) -> tuple[int, str, str]:
    """`searchlab ARGS` by the CLI's main() in this process: (exit code, stdout, stderr)."""
    from searchlab.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def stores(root: Path, name: str) -> list[str]:
    """Overrides putting every store of study `name` under root (a project folder's test: its name included)."""
    return [f"study.storage={root}/optuna.journal", f"tracking.uri=sqlite:///{root}/mlflow.db",
            f"tracking.artifact_root={root}/artifacts", f"report.dir={root}/reports", f"study.name={name}"]


def searchlab(*args: str, cwd: Path, timeout: float = 600, env: dict[str, str] | None = None
              ) -> subprocess.CompletedProcess:
    """The `searchlab` command as a user runs it, from `cwd` (its own project folder)."""
    return subprocess.run([sys.executable, "-m", "searchlab.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


# tests/lightning_project's module and DataModule (the lit_project fixture), the metric it logs, a small network.
LIT = ["-cd", "conf", "module=lit", "data=litdigits", "search=lit", "study.metric=val/acc", "model.width=32"]


def metrics_line(stdout: str) -> dict:
    """The `metrics: {...}` line `searchlab train` prints."""
    line = next(line for line in stdout.splitlines() if line.startswith("metrics: "))
    return json.loads(line.removeprefix("metrics: "))


@contextlib.contextmanager
def from_folder(cwd: Path) -> Iterator[None]:
    """This process as a fresh `searchlab` process started in `cwd` would be, for the block: cwd the current folder,
    no data cached, no Hydra state; afterwards the folder, sys.path, the modules imported from the folder (e.g. a
    project's nets.py: the next project has its own), Hydra's state and the data cache are as before."""
    from hydra.core.global_hydra import GlobalHydra

    from searchlab.training import build

    here, path, modules, cache = os.getcwd(), list(sys.path), set(sys.modules), build._splits_cache
    os.chdir(cwd)
    # The data cache is keyed by the config's text: data.path=x.npz, relative to the folder, would be an earlier
    # test's x.npz.
    build._splits_cache = {}
    GlobalHydra.instance().clear()
    try:
        yield
    finally:
        os.chdir(here)
        sys.path[:] = path
        build._splits_cache = cache
        for name in set(sys.modules) - modules:
            if str(getattr(sys.modules[name], "__file__", None) or "").startswith(str(cwd)):
                del sys.modules[name]
        GlobalHydra.instance().clear()


# --- the bad-input contract (test_bad_input, test_data_checks) -----------------------------------------------

BAD_STUDY = "bad-input"
ERROR_PREFIX = "searchlab: error: "
# Keeps a run short if a bad input were wrongly accepted: one trial of one epoch, stop at the first failure.
FAST = ["study.n_trials=1", "trainer.max_epochs=1", "study.max_consecutive_failures=1", "model.width=8"]


def key_of(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def bad_input_stores(tmp_path: Path) -> list[str]:
    return [f"study.storage={tmp_path}/optuna.journal", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
            f"tracking.artifact_root={tmp_path}/artifacts", f"study.name={BAD_STUDY}"]


def assert_rejected(result: tuple[int, str, str], *names: str) -> str:
    """Exit code 2, stdout empty, stderr one `searchlab: error:` line naming each of `names`; returns that line."""
    code, out, err = result
    assert "Traceback" not in out + err
    assert code == 2, f"exit code {code}\nstdout: {out}\nstderr: {err}"
    assert out.strip() == "", f"printed on stdout: {out!r}"
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {lines!r}"
    line = lines[0]
    assert line.startswith(ERROR_PREFIX) and line.strip() != ERROR_PREFIX.strip(), line
    for name in names:
        assert name in line, f"{name!r} not named in {line!r}"
    return line


def assert_nothing_written(tmp_path: Path) -> None:
    """No study in the journal, no experiment of the study and no run at all in the MLflow store, no artifacts."""
    journal = tmp_path / "optuna.journal"
    if journal.exists() and journal.stat().st_size:
        names = study_names(tmp_path)
        assert names == [], f"studies written: {names}"
    db = tmp_path / "mlflow.db"
    if db.exists():
        client = MlflowClient(f"sqlite:///{db}")
        experiments = client.search_experiments()
        assert BAD_STUDY not in [e.name for e in experiments]
        runs = client.search_runs([e.experiment_id for e in experiments]) if experiments else []
        assert len(runs) == 0, f"runs written: {[r.info.run_name for r in runs]}"
    artifacts = tmp_path / "artifacts"
    assert not artifacts.exists() or not any(artifacts.iterdir())


def xy(n: int = 20, features: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """A small classification set: standard normal features, alternating labels."""
    x = np.random.default_rng(0).normal(size=(n, features)).astype(np.float32)
    return x, np.arange(n) % 2


def write_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def valid_arrays(**changes: np.ndarray | None) -> dict[str, np.ndarray]:
    """The four arrays of a valid npz file, with `changes` (None drops an array)."""
    x, y = xy()
    arrays = {"x_train": x, "y_train": y, "x_val": x, "y_val": y, **changes}
    return {k: v for k, v in arrays.items() if v is not None}


# --- the budget race ----------------------------------------------------------------------------------------------

def race_for_the_last_trial(url: str, name: str) -> tuple[list, list[optuna.trial.FrozenTrial]]:
    """Two workers (threads, each with its own storage handle) without a lock both find the study's one-trial budget
    free, then both ask: a barrier between counting and asking forces the race that real workers hit rarely (as
    through the gRPC proxy, which has no cross-process lock). Returns (what each reserve() returned, the trials)."""
    import threading

    from searchlab.locks import NoLock
    from searchlab.study.budget import Budget
    from searchlab.study.storage import open_storage

    optuna.create_study(study_name=name, storage=open_storage(url))
    barrier = threading.Barrier(2, timeout=120)
    reserved: list = [None, None]
    errors: list[BaseException] = []

    def work(index: int) -> None:
        try:
            budget = Budget(optuna.load_study(study_name=name, storage=open_storage(url)), 1, NoLock())
            count = budget._counts

            def count_then_wait() -> tuple[int, int]:
                counts = count()
                barrier.wait()  # both have counted the budget free before either asks
                return counts

            budget._counts = count_then_wait
            reserved[index] = budget.reserve(wait=False)
        except BaseException as err:  # reported by the caller's assert
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    assert not errors, errors
    return reserved, optuna.load_study(study_name=name, storage=open_storage(url)).get_trials()


def assert_one_kept_one_given_back(reserved: list, trials: list[optuna.trial.FrozenTrial]) -> None:
    """The first-numbered trial is the worker's to run; the other was failed unrun, marked surplus, with a reason."""
    kept = [trial for trial in reserved if trial is not None]
    assert len(kept) == 1 and len(trials) == 2, (reserved, trials)
    first, second = sorted(trials, key=lambda t: t.number)
    assert kept[0].number == first.number and first.state == optuna.trial.TrialState.RUNNING
    assert second.state == optuna.trial.TrialState.FAIL and second.user_attrs["surplus"] is True
    assert second.user_attrs["reason"].startswith("not run: another worker took the study's last trial")
