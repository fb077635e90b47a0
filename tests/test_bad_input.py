"""Bad input fails before any trial: one `searchlab: error:` line naming the key or file, exit code 2, no traceback,
and nothing written to the stores (no Optuna study, no MLflow experiment or run).

Every call points both stores into tmp_path.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import optuna
import pytest
from hydra.core.global_hydra import GlobalHydra
from mlflow.tracking import MlflowClient
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from searchlab.cli import main
from searchlab.config import config_dir

STUDY = "bad-input"
# Keeps a run short if a bad input were wrongly accepted: one trial of one epoch, stop at the first failure.
FAST = ["study.n_trials=1", "trainer.max_epochs=1", "study.max_consecutive_failures=1", "model.width=8"]
PREFIX = "searchlab: error: "


def key_of(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def store_overrides(tmp_path: Path) -> list[str]:
    return [
        f"study.storage={tmp_path}/optuna.journal",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        f"tracking.artifact_root={tmp_path}/artifacts",
        f"study.name={STUDY}",
    ]


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Default conf/, cwd in tmp_path, and no Hydra initialization carried in or out (it binds one config dir)."""
    monkeypatch.delenv("SEARCHLAB_CONFIG_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    GlobalHydra.instance().clear()
    yield
    GlobalHydra.instance().clear()


@pytest.fixture
def cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    """Runs `searchlab <command> args...` in-process with the stores in tmp_path; returns (code, stdout, stderr).

    The store, study-name and FAST overrides are added only for keys the case does not set itself.
    """

    def run(*args: str, command: str = "search") -> tuple[int, str, str]:
        given = {key_of(a) for a in args}
        extra = [o for o in (*store_overrides(tmp_path), *FAST) if key_of(o) not in given]
        code = main([command, *args, *extra])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def assert_rejected(result: tuple[int, str, str], *names: str) -> str:
    """Exit code 2, stdout empty, stderr one `searchlab: error:` line naming each of `names`; returns that line."""
    code, out, err = result
    assert "Traceback" not in out + err
    assert code == 2, f"exit code {code}\nstdout: {out}\nstderr: {err}"
    assert out.strip() == "", f"printed on stdout: {out!r}"
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {lines!r}"
    line = lines[0]
    assert line.startswith(PREFIX) and line.strip() != PREFIX.strip(), line
    for name in names:
        assert name in line, f"{name!r} not named in {line!r}"
    return line


def assert_nothing_written(tmp_path: Path) -> None:
    """No study in the journal, no experiment of the study and no run at all in the MLflow store, no artifacts."""
    journal = tmp_path / "optuna.journal"
    if journal.exists() and journal.stat().st_size:
        storage = JournalStorage(JournalFileBackend(str(journal)))
        names = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
        assert names == [], f"studies written: {names}"
    db = tmp_path / "mlflow.db"
    if db.exists():
        client = MlflowClient(f"sqlite:///{db}")
        experiments = client.search_experiments()
        assert STUDY not in [e.name for e in experiments]
        runs = client.search_runs([e.experiment_id for e in experiments]) if experiments else []
        assert len(runs) == 0, f"runs written: {[r.info.run_name for r in runs]}"
    artifacts = tmp_path / "artifacts"
    assert not artifacts.exists() or not any(artifacts.iterdir())


# --- command-line overrides ------------------------------------------------------------------------------------

OVERRIDE_CASES = [
    # unknown group options
    pytest.param(["optimizer=foo"], ["optimizer", "foo"], id="unknown-optimizer"),
    pytest.param(["scheduler=foo"], ["scheduler", "foo"], id="unknown-scheduler"),
    pytest.param(["data=foo"], ["data", "foo"], id="unknown-data"),
    pytest.param(["model=foo"], ["model", "foo"], id="unknown-model"),
    pytest.param(["search=foo"], ["search", "foo"], id="unknown-search"),
    pytest.param(["trainer=foo"], ["trainer", "foo"], id="unknown-trainer"),
    pytest.param(["optimizer=[adam,nope]"], ["nope"], id="unknown-optimizer-in-list"),
    pytest.param(["optimizer=null"], ["optimizer"], id="null-optimizer"),
    pytest.param(["optimizer=1"], ["optimizer"], id="number-optimizer"),
    pytest.param(["~optimizer"], ["optimizer"], id="deleted-optimizer"),
    # unknown keys
    pytest.param(["foo=1"], ["foo"], id="unknown-key"),
    pytest.param(["optimizer.nope=1"], ["optimizer.nope"], id="unknown-nested-key"),
    pytest.param(["optimizer=sgd", "optimizer.momentum=0.9"], ["optimizer.momentum"], id="key-of-another-option"),
    pytest.param(["data.path=x.npz"], ["data.path"], id="npz-key-on-digits"),
    # malformed overrides
    pytest.param(["optimizer.lr=[1,"], ["optimizer.lr"], id="malformed-unclosed-list"),
    pytest.param(["optimizer.lr"], ["optimizer.lr"], id="malformed-no-equals"),
    pytest.param(["=5"], ["=5"], id="malformed-no-key"),
    pytest.param(["optimizer.lr=${oops}"], ["optimizer.lr"], id="dangling-interpolation"),
    # counts and durations: wrong type or non-positive
    pytest.param(["study.n_trials=0"], ["study.n_trials"], id="n_trials-zero"),
    pytest.param(["study.n_trials=abc"], ["study.n_trials"], id="n_trials-text"),
    pytest.param(["study.n_trials=2.5"], ["study.n_trials"], id="n_trials-fraction"),
    pytest.param(["study.n_trials=true"], ["study.n_trials"], id="n_trials-bool"),
    pytest.param(["study.timeout=-5"], ["study.timeout"], id="timeout-negative"),
    pytest.param(["study.timeout=0"], ["study.timeout"], id="timeout-zero"),
    pytest.param(["study.timeout=abc"], ["study.timeout"], id="timeout-text"),
    pytest.param(["study.max_consecutive_failures=0"], ["study.max_consecutive_failures"], id="max-failures-zero"),
    pytest.param(["trainer.max_epochs=0"], ["trainer.max_epochs"], id="max_epochs-zero"),
    pytest.param(["trainer.max_epochs=abc"], ["trainer.max_epochs"], id="max_epochs-text"),
    pytest.param(["trainer.limit_train_batches=0"], ["trainer.limit_train_batches"], id="limit_train_batches-zero"),
    pytest.param(["trainer.eval_batch_size=0"], ["trainer.eval_batch_size"], id="eval_batch_size-zero"),
    pytest.param(["model.width=-1"], ["model.width"], id="width-negative"),
    pytest.param(["model.depth=0"], ["model.depth"], id="depth-zero"),
    pytest.param(["data.batch_size=0"], ["data.batch_size"], id="batch_size-zero"),
    pytest.param(["data.batch_size=abc"], ["data.batch_size"], id="batch_size-text"),
    pytest.param(["data=synthetic", "data.size=0"], ["data.size"], id="synthetic-size-zero"),
    pytest.param(["optimizer.lr=0"], ["optimizer.lr"], id="lr-zero"),
    pytest.param(["seed=abc"], ["seed"], id="seed-text"),
    pytest.param(["study.seed=abc"], ["study.seed"], id="study-seed-text"),
    # named choices
    pytest.param(["study.direction=up"], ["study.direction", "up"], id="unknown-direction"),
    pytest.param(["study.metric=foo"], ["study.metric"], id="unknown-metric"),
    pytest.param(["study.sampler=foo"], ["study.sampler", "foo"], id="unknown-sampler"),
    pytest.param(["study.pruner=foo"], ["study.pruner", "foo"], id="unknown-pruner"),
    pytest.param(["trainer.accelerator=foo"], ["trainer.accelerator"], id="unknown-accelerator"),
    pytest.param(["trainer.precision=foo"], ["trainer.precision"], id="unknown-precision"),
    pytest.param(["study.sampler=grid"], ["study.sampler=grid"], id="grid-without-grid-values"),
    pytest.param(["study.name="], ["study.name"], id="empty-study-name"),
    pytest.param(["data=npz"], ["data.path"], id="npz-without-path"),
    pytest.param(["+optimizer.lrr=0.1"], ["optimizer.lrr"], id="misspelt-key-added-with-plus"),
    pytest.param(["+foo=1"], ["foo"], id="new-key-added-with-plus"),
    pytest.param(["optimizer=[adam,sgd]"], ["optimizer"], id="two-options-for-one-group"),
    pytest.param(["seed=-1"], ["seed"], id="negative-seed"),
]


@pytest.mark.parametrize(("args", "names"), OVERRIDE_CASES)
def test_bad_override_is_rejected_before_any_store_is_written(cli, tmp_path, args, names):
    assert_rejected(cli(*args), *names)
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize(("args", "names"), [
    pytest.param(["optimizer=foo"], ["optimizer"], id="unknown-optimizer"),
    pytest.param(["trainer.max_epochs=0"], ["trainer.max_epochs"], id="max_epochs-zero"),
    pytest.param(["foo=1"], ["foo"], id="unknown-key"),
    pytest.param(["optimizer.lr=[1,"], ["optimizer.lr"], id="malformed"),
])
def test_train_rejects_bad_overrides_too(cli, tmp_path, args, names):
    assert_rejected(cli(*args, command="train"), *names)
    assert_nothing_written(tmp_path)


# --- npz data files --------------------------------------------------------------------------------------------

def _xy(n: int = 20, features: int = 4) -> tuple[np.ndarray, np.ndarray]:
    x = np.random.default_rng(0).normal(size=(n, features)).astype(np.float32)
    return x, np.arange(n) % 2


def _npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def _valid(**changes: np.ndarray | None) -> dict[str, np.ndarray]:
    x, y = _xy()
    arrays = {"x_train": x, "y_train": y, "x_val": x, "y_val": y, **changes}
    return {k: v for k, v in arrays.items() if v is not None}


NPZ_BUILDERS: dict[str, Callable[[Path], Path]] = {
    "missing": lambda d: d / "nowhere.npz",
    "text-file": lambda d: (d / "text.npz", (d / "text.npz").write_text("x_train,y_train\n1,0\n"))[0],
    "directory": lambda d: (d / "folder.npz", (d / "folder.npz").mkdir())[0],
    "empty-archive": lambda d: _npz(d / "empty.npz"),
    "lacks-y_val": lambda d: _npz(d / "no_y_val.npz", **_valid(y_val=None)),
    "train-lengths-differ": lambda d: _npz(d / "train_len.npz", **_valid(y_train=_xy()[1][:15])),
    "val-lengths-differ": lambda d: _npz(d / "val_len.npz", **_valid(y_val=_xy()[1][:3])),
    "test-lengths-differ": lambda d: _npz(d / "test_len.npz", **_valid(x_test=_xy()[0], y_test=_xy()[1][:7])),
    "only-x_test": lambda d: _npz(d / "only_x_test.npz", **_valid(x_test=_xy()[0])),
    "negative-labels": lambda d: _npz(d / "negative_y.npz", **_valid(y_train=_xy()[1] - 1)),
    "object-array": lambda d: _npz(d / "objects.npz", **_valid(x_train=np.array([{}] * 20, dtype=object))),
    "zero-rows": lambda d: _npz(d / "zero_rows.npz", **_valid(x_train=_xy()[0][:0], y_train=_xy()[1][:0])),
    "scalar-array": lambda d: _npz(d / "scalar.npz", **_valid(x_train=np.float32(1.0))),
    "text-features": lambda d: _npz(d / "text_x.npz", **_valid(x_train=np.array(["a"] * 20))),
    "feature-counts-differ": lambda d: _npz(d / "features.npz", **_valid(x_val=_xy()[0][:, :3])),
}



@pytest.mark.parametrize("case", [
    pytest.param(name, id=name) for name in NPZ_BUILDERS
])
def test_bad_npz_file_is_rejected(cli, tmp_path, case):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    path = NPZ_BUILDERS[case](data_dir)
    assert_rejected(cli("data=npz", f"data.path={path}"), "data.path", path.name)
    assert_nothing_written(tmp_path)


def test_train_rejects_a_bad_npz_file(cli, tmp_path):
    path = _npz(tmp_path / "lengths.npz", **_valid(y_train=_xy()[1][:15]))
    assert_rejected(cli("data=npz", f"data.path={path}", command="train"), "data.path", path.name)
    assert_nothing_written(tmp_path)


# --- search-space files ----------------------------------------------------------------------------------------

SPACE_CASES = [
    pytest.param("optimizer.lr: {low: 0.3, high: 0.001}\n", "optimizer.lr", id="low-above-high"),
    pytest.param("scheduler:\n  choices:\n    step:\n      scheduler.step_size: {low: 8, high: 2}\n",
                 "scheduler.step_size", id="low-above-high-in-branch"),
    pytest.param("optimizer.lr: {low: 0.0, high: 0.1, log: true}\n", "optimizer.lr", id="log-range-zero-low"),
    pytest.param("optimizer.lr: {low: -1, high: 0.1, log: true}\n", "optimizer.lr", id="log-range-negative-low"),
    pytest.param("optimizer.lrr: {low: 0.001, high: 0.1}\n", "optimizer.lrr", id="unknown-key"),
    pytest.param("foo: {choices: [1, 2]}\n", "foo", id="unknown-key-with-choices"),
    pytest.param("optimizer:\n  choices:\n    sgd:\n      optimizer.beta1: {low: 0.8, high: 0.9}\n",
                 "optimizer.beta1", id="key-missing-from-its-option"),
    pytest.param("optimizer:\n  choices: [adam, adamax]\n", "adamax", id="unknown-group-option"),
    pytest.param("optimizer: {low: 1, high: 2}\n", "optimizer", id="group-given-a-range"),
    pytest.param("optimizer.lr: {low: abc, high: 0.1}\n", "optimizer.lr", id="bound-not-a-number"),
    pytest.param("optimizer.lr: {low: 0.001, high: 0.1, lo: 1}\n", "optimizer.lr", id="unknown-range-field"),
    pytest.param("optimizer.lr: [0.1, 0.2]\n", "optimizer.lr", id="entry-not-a-mapping"),
    pytest.param("- optimizer.lr\n", "bad.yaml", id="file-not-a-mapping"),
    pytest.param("model.width: {choices: []}\n", "model.width", id="empty-choices"),
    pytest.param("model.width: {low: 8, high: 64, step: 0}\n", "model.width", id="zero-step"),
    pytest.param("optimizer.lr: {low: 0.001, high: 0.1, log: maybe}\n", "optimizer.lr", id="log-not-bool"),
    pytest.param("optimizer.lr: {low: 0.001, high: 0.1, grid: 5}\n", "optimizer.lr", id="grid-not-a-list"),
    pytest.param("# nothing\n", "bad.yaml", id="empty-space"),
    pytest.param("optimizer.lr: {low: 0.001, high: 0.1\n", "bad.yaml", id="yaml-syntax-error"),
    pytest.param("optimizer.lr: {low: 0.001, high: 0.1}\noptimizer.lr: {low: 0.01, high: 0.1}\n", "bad.yaml",
                 id="duplicate-key"),
    pytest.param("optimizer.lr: {low: .nan, high: 0.1}\n", "optimizer.lr", id="nan-bound"),
    pytest.param("optimizer.lr: {low: 0.001, high: .inf, log: true}\n", "optimizer.lr", id="inf-bound"),
    pytest.param("model.depth: {low: 0, high: 3}\n", "model.depth", id="range-reaches-a-depth-of-zero"),
    pytest.param("optimizer.lr: {choices: [0.1, abc]}\n", "optimizer.lr", id="choice-that-is-not-a-number"),
    pytest.param("model.dropout: {low: 0.0, high: 1.5}\n", "model.dropout", id="dropout-above-one"),
]


@pytest.mark.parametrize(("text", "name"), SPACE_CASES)
def test_bad_search_space_file_is_rejected(cli, tmp_path, monkeypatch, text, name):
    conf = tmp_path / "conf"
    shutil.copytree(config_dir(), conf)
    (conf / "search" / "bad.yaml").write_text(text)
    monkeypatch.setenv("SEARCHLAB_CONFIG_DIR", str(conf))
    line = assert_rejected(cli("search=bad"), name)
    assert "bad.yaml" in line
    assert_nothing_written(tmp_path)


def test_missing_config_dir_is_rejected(cli, tmp_path, monkeypatch):
    missing = tmp_path / "no-conf-here"
    monkeypatch.setenv("SEARCHLAB_CONFIG_DIR", str(missing))
    assert_rejected(cli(), str(missing))
    assert_nothing_written(tmp_path)


# --- stores that cannot be opened ------------------------------------------------------------------------------

STORE_CASES = [
    pytest.param("study.storage=postgresql://alice:s3cret@127.0.0.1:1/db", "study.storage", "s3cret",
                 id="storage-postgres-unreachable"),
    pytest.param("study.storage=sqlite:///{tmp}/afile/optuna.db", "study.storage", None,
                 id="storage-sqlite-under-a-file"),
    pytest.param("study.storage={tmp}/afile/optuna.journal", "study.storage", None, id="storage-journal-under-a-file"),
    pytest.param("study.storage={tmp}", "study.storage", None, id="storage-journal-is-a-directory"),
    pytest.param("tracking.uri=http://bob:hunter2@127.0.0.1:1", "tracking.uri", "hunter2",
                 id="tracking-http-unreachable"),
    pytest.param("tracking.uri=postgresql://bob:hunter2@127.0.0.1:1/db", "tracking.uri", "hunter2",
                 id="tracking-postgres-unreachable"),
    pytest.param("tracking.uri=foo://bob:hunter2@example.invalid/x", "tracking.uri", "hunter2",
                 id="tracking-unknown-scheme"),
    pytest.param("tracking.uri=sqlite:///{tmp}/afile/mlflow.db", "tracking.uri", None,
                 id="tracking-sqlite-under-a-file"),
    pytest.param("tracking.artifact_root={tmp}/afile/artifacts", "tracking.artifact_root", None,
                 id="artifact-root-under-a-file"),
    pytest.param("tracking.uri=http://bob:hun@ter2secret@127.0.0.1:1", "tracking.uri", "ter2secret",
                 id="tracking-password-with-at-sign"),
    pytest.param("study.storage=postgresql://alice:s3cret@127.0.0.1:1/db?sslmode=require", "study.storage", "s3cret",
                 id="malformed-storage-override-with-password"),
]


@pytest.mark.parametrize(("override", "name", "secret"), STORE_CASES)
def test_store_that_cannot_be_opened_is_rejected(cli, tmp_path, override, name, secret):
    (tmp_path / "afile").write_text("a file where a folder is expected\n")
    code, out, err = cli(override.format(tmp=tmp_path))
    assert_rejected((code, out, err), name)
    if secret:
        assert secret not in out + err
    assert_nothing_written(tmp_path)


def test_the_store_check_sees_a_written_study(cli, tmp_path):
    """Control: a good tiny run writes a study and runs, and assert_nothing_written notices each of them."""
    code, out, _ = cli()
    assert code == 0 and "trial    0" in out
    with pytest.raises(AssertionError, match="studies written"):
        assert_nothing_written(tmp_path)
    (tmp_path / "optuna.journal").unlink()
    with pytest.raises(AssertionError):
        assert_nothing_written(tmp_path)


# --- the real command ------------------------------------------------------------------------------------------

def test_command_exits_2_with_one_line_and_no_traceback(tmp_path):
    command = [sys.executable, "-m", "searchlab.cli", "search", "optimizer=nope", *store_overrides(tmp_path), *FAST]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(PREFIX), lines
    assert "optimizer" in lines[0] and "nope" in lines[0]
    assert_nothing_written(tmp_path)
