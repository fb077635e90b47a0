"""The tracker's cheap writes: per-epoch metrics buffered up to tracking.flush_seconds, SQLite without an fsync per
commit. A buffered trial still ends with its whole per-epoch history in MLflow."""

from __future__ import annotations

import sqlite3

import pytest
from omegaconf import OmegaConf

from searchlab.cli import main
from searchlab.config import Composer, ConfigError
from searchlab.config.compose import group_options
from searchlab.tracking import Tracker, config_yaml


def _trial(tracker: Tracker) -> str:
    parent = tracker.study_run("perf", {})
    return tracker.start_trial(parent, 0, {"optimizer.lr": 0.01}, "seed: 0\n", "searchlab train")


def _steps(tracker: Tracker, run_id: str) -> list[int]:
    return [m.step for m in tracker.client.get_metric_history(run_id, "val_acc")]


def test_epoch_metrics_wait_for_the_flush_interval_and_the_trial_end_writes_them_all(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", str(tmp_path / "artifacts"), flush_seconds=3600)
    run_id = _trial(tracker)
    for epoch in (1, 2, 3):
        tracker.log_epoch(run_id, epoch, {"val_acc": 0.5 + epoch / 10, "train_loss": 1.0 / epoch})
    assert _steps(tracker, run_id) == []  # buffered
    tracker.end_trial(run_id, "COMPLETE", 0.8, None)
    assert _steps(tracker, run_id) == [1, 2, 3]
    run = tracker.client.get_run(run_id)
    assert run.data.metrics["objective"] == 0.8 and run.info.status == "FINISHED"


def test_zero_flush_seconds_writes_every_epoch_at_once(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", None, flush_seconds=0)
    run_id = _trial(tracker)
    tracker.log_epoch(run_id, 1, {"val_acc": 0.5})
    assert _steps(tracker, run_id) == [1]
    tracker.end_trial(run_id, "PRUNED", None, "pruned at epoch 1")
    assert _steps(tracker, run_id) == [1]


def test_the_sqlite_store_runs_in_wal_mode(tmp_path):
    Tracker(f"sqlite:///{tmp_path}/mlflow.db", None)
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)


@pytest.mark.parametrize("value", [-1, "soon", True])
def test_a_bad_flush_interval_is_one_line_naming_the_key(tmp_path, value):
    with pytest.raises(ConfigError, match=r"^tracking.flush_seconds: expected a number of seconds >= 0"):
        Tracker(f"sqlite:///{tmp_path}/mlflow.db", None, flush_seconds=value)


def test_the_command_refuses_a_bad_flush_interval_before_writing(tmp_path, store_overrides, capsys):
    assert main(["search", "tracking.flush_seconds=-5", *store_overrides]) == 2
    assert "tracking.flush_seconds" in capsys.readouterr().err
    assert not (tmp_path / "optuna.journal").exists()


def _read_back(text: str) -> str:
    """A config's text as OmegaConf reads it, in a form where nan equals nan."""
    return repr(OmegaConf.to_container(OmegaConf.create(text), resolve=False))


@pytest.mark.parametrize("group", sorted(g for g, options in group_options().items() if options))
def test_config_yaml_reads_back_as_the_config_for_every_option_of_every_group(group):
    composer = Composer([])
    for option in group_options()[group]:
        cfg = composer({group: option})
        assert _read_back(config_yaml(cfg)) == _read_back(OmegaConf.to_yaml(cfg)), f"{group}={option}"


TRICKY = ["true", "False", "yes", "No", "on", "OFF", "y", "n", "null", "Null", "~", "", " lead", "trail ", "1e3",
          "1e-05", "0x1f", "1_000", "12:30", ".inf", "-.inf", ".nan", "+1", "-", "a: b", "#x", "x #y", "[1]", "{a}",
          "*ref", "&anchor", "!tag", "%p", "@at", "`q`", "'single'", '"double"', "back\\slash", "${oc.env:HOME}",
          "multi\nline", "tab\there", "é ü 漢字 😀", "\x7f\x85\u2028\x00", "<<", "=", "?", "a/b-c.d_e", "/abs/path",
          "CamelCase", "_target_", "-5", "3.0"]


@pytest.mark.parametrize("value", [*TRICKY, 0, -7, 10**20, 1e-05, 1e16, -0.0, 2.5, float("inf"), float("-inf"),
                                   float("nan"), True, False, None, [], {}, [1, [2, [3]], {"k": "v"}],
                                   {"a": {"b": []}, "c": [{"d": None}, {}]}])
def test_config_yaml_reads_back_values_that_look_like_other_types(value):
    cfg = OmegaConf.create({"key": value, "list": [value, "x"], "nested": {value if isinstance(value, str) and value
                                                                         else "k": {"deep": value}}})
    assert _read_back(config_yaml(cfg)) == _read_back(OmegaConf.to_yaml(cfg))


def test_config_yaml_of_a_config_with_a_value_it_has_no_yaml_for_is_pyyamls():
    cfg = OmegaConf.create({"blob": b"\x00\x01", "name": "x"})
    assert config_yaml(cfg) == OmegaConf.to_yaml(cfg)


def _recorded(tracker: Tracker, run_id: str) -> tuple:
    """Everything a trial's run holds: params, {metric: [(step, value)]}, tags (its name aside), status, config."""
    run = tracker.client.get_run(run_id)
    history = {k: [(m.step, m.value) for m in tracker.client.get_metric_history(run_id, k)] for k in run.data.metrics}
    tags = {k: v for k, v in run.data.tags.items() if k not in ("mlflow.runName", "optuna.trial.number")}
    config = tracker.client.download_artifacts(run_id, "config.yaml")
    return run.data.params, history, tags, run.info.status, open(config).read()


@pytest.mark.parametrize("state", ["COMPLETE", "PRUNED"])
def test_a_pack_members_run_with_its_params_at_its_end_records_what_a_lone_trials_run_does(tmp_path, state):
    """start_trial(params_at_end=True), a pack member's: one write fewer, the same run in the end."""
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", str(tmp_path / "artifacts"), flush_seconds=3600)
    parent = tracker.study_run("perf", {})
    params = {"optimizer": "adam", "optimizer.lr": 0.01, "module.l1": 1e-6}
    runs = []
    for number, at_end in enumerate((False, True)):
        run_id = tracker.start_trial(parent, number, params, "seed: 0\noptimizer:\n  lr: 0.01\n", "searchlab train x",
                                     params_at_end=at_end)
        assert tracker.client.get_run(run_id).data.params == ({} if at_end else {k: str(v) for k, v in params.items()})
        for epoch in (1, 2):
            tracker.log_epoch(run_id, epoch, {"val_acc": 0.5 + epoch / 10, "train_loss": 1.0 / epoch})
        done = state == "COMPLETE"
        tracker.end_trial(run_id, state, 0.7 if done else None, None if done else "pruned", {"output": "here"},
                          {"objective.val_acc": 0.7})
        runs.append(_recorded(tracker, run_id))
    lone, member = runs
    assert lone[0] == {k: str(v) for k, v in params.items()}
    steps = {"objective.val_acc": [0], "train_loss": [1, 2], "val_acc": [1, 2]}
    assert {m: [s for s, _ in h] for m, h in lone[1].items()} == (
        {**steps, "objective": [0]} if state == "COMPLETE" else steps)
    assert lone[2]["output"] == "here" and lone[2]["optuna.trial.state"] == state
    assert member == lone


def test_a_batch_beyond_mlflows_limits_is_split_and_written_whole(tmp_path):
    """150 params (MLflow takes 100 in one log_batch) and 950 metrics at the end: all written."""
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", None, flush_seconds=3600)
    parent = tracker.study_run("perf", {})
    params = {f"p{i}": i for i in range(150)}
    run_id = tracker.start_trial(parent, 0, params, params_at_end=True)
    for epoch in range(1, 96):  # 950 metrics: the buffer flushes at 900, the end writes the rest with the params
        tracker.log_epoch(run_id, epoch, {f"m{j}": float(j) for j in range(10)})
    tracker.end_trial(run_id, "COMPLETE", 1.0, None)
    run = tracker.client.get_run(run_id)
    assert run.data.params == {k: str(v) for k, v in params.items()}
    assert [len(tracker.client.get_metric_history(run_id, f"m{j}")) for j in range(10)] == [95] * 10


def test_a_lost_members_run_gets_its_params_when_it_is_failed(tmp_path):
    """A member whose worker died before its end never logged its params: fail_lost_trial logs them."""
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", None)
    parent = tracker.study_run("perf", {})
    run_id = tracker.start_trial(parent, 3, {"optimizer.lr": 0.01}, params_at_end=True)
    Tracker(f"sqlite:///{tmp_path}/mlflow.db", None).fail_lost_trial(parent, 3, {"optimizer.lr": 0.01}, "worker lost")
    run = tracker.client.get_run(run_id)
    assert run.data.params == {"optimizer.lr": "0.01"} and run.info.status == "FAILED"
    assert run.data.tags["optuna.trial.reason"] == "worker lost"
