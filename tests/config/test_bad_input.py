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
import pytest
from helpers import (
    ERROR_PREFIX,
    FAST,
    assert_nothing_written,
    assert_rejected,
    bad_input_stores,
    valid_arrays,
    write_npz,
    xy,
)

from searchlab.config import config_dir

# cli: the CLI in this process with the stores in tmp_path; isolated: cwd in tmp_path, default conf/, Hydra cleared.
pytestmark = pytest.mark.usefixtures("isolated")

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



NPZ_BUILDERS: dict[str, Callable[[Path], Path]] = {
    "missing": lambda d: d / "nowhere.npz",
    "text-file": lambda d: (d / "text.npz", (d / "text.npz").write_text("x_train,y_train\n1,0\n"))[0],
    "directory": lambda d: (d / "folder.npz", (d / "folder.npz").mkdir())[0],
    "empty-archive": lambda d: write_npz(d / "empty.npz"),
    "lacks-y_val": lambda d: write_npz(d / "no_y_val.npz", **valid_arrays(y_val=None)),
    "train-lengths-differ": lambda d: write_npz(d / "train_len.npz", **valid_arrays(y_train=xy()[1][:15])),
    "val-lengths-differ": lambda d: write_npz(d / "val_len.npz", **valid_arrays(y_val=xy()[1][:3])),
    "test-lengths-differ": lambda d: write_npz(d / "test_len.npz", **valid_arrays(x_test=xy()[0], y_test=xy()[1][:7])),
    "only-x_test": lambda d: write_npz(d / "only_x_test.npz", **valid_arrays(x_test=xy()[0])),
    "negative-labels": lambda d: write_npz(d / "negative_y.npz", **valid_arrays(y_train=xy()[1] - 1)),
    "object-array": lambda d: write_npz(d / "objects.npz", **valid_arrays(x_train=np.array([{}] * 20, dtype=object))),
    "zero-rows": lambda d: write_npz(d / "zero_rows.npz", **valid_arrays(x_train=xy()[0][:0], y_train=xy()[1][:0])),
    "scalar-array": lambda d: write_npz(d / "scalar.npz", **valid_arrays(x_train=np.float32(1.0))),
    "text-features": lambda d: write_npz(d / "text_x.npz", **valid_arrays(x_train=np.array(["a"] * 20))),
    "feature-counts-differ": lambda d: write_npz(d / "features.npz", **valid_arrays(x_val=xy()[0][:, :3])),
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
    path = write_npz(tmp_path / "lengths.npz", **valid_arrays(y_train=xy()[1][:15]))
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
    command = [sys.executable, "-m", "searchlab.cli", "search", "optimizer=nope", *bad_input_stores(tmp_path), *FAST]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(ERROR_PREFIX), lines
    assert "optimizer" in lines[0] and "nope" in lines[0]
    assert_nothing_written(tmp_path)
