"""The tracker's cheap writes: per-epoch metrics buffered up to tracking.flush_seconds, SQLite without an fsync per
commit. A buffered trial still ends with its whole per-epoch history in MLflow."""

from __future__ import annotations

import sqlite3

import pytest
from omegaconf import OmegaConf

from searchlab.cli import main
from searchlab.config import Composer, ConfigError
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


@pytest.mark.parametrize("values", [{}, {"optimizer": "adamw", "optimizer.lr": 0.003}])
def test_config_yaml_is_omegaconfs_text(values):
    cfg = Composer([])(values)
    OmegaConf.update(cfg, "study.name", "true", merge=False)  # strings that read as bools or numbers stay quoted
    OmegaConf.update(cfg, "tracking.uri", "1e3", merge=False)
    assert config_yaml(cfg) == OmegaConf.to_yaml(cfg)
