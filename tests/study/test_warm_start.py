"""study.warm_start: an earlier study's best configurations, fitted to this space, are the first trials of a new
one; a study that does not exist, or shares no key, is refused as one line with nothing written."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState, create_trial

from searchlab.cli import main

FAST = ["study.n_trials=2", "study.pruner=none", "trainer.max_epochs=1", "tracking.log_models=none"]
OPTIMIZERS = CategoricalDistribution(["adam", "momentum", "adagrad"])
LR = FloatDistribution(1e-5, 1.0, log=True)


def journal(tmp_path: Path) -> JournalStorage:
    return JournalStorage(JournalFileBackend(str(tmp_path / "optuna.journal")))


def earlier_study(tmp_path: Path, name: str = "old") -> optuna.Study:
    """A finished study of another space: no model.dropout, an lr range wider than this one's, an optimizer
    (adagrad) this space does not search."""
    study = optuna.create_study(study_name=name, storage=journal(tmp_path), direction="maximize")
    study.set_user_attr("metric", "val_acc")
    width = CategoricalDistribution([64, 128])
    trials = [
        ({"optimizer": "adam", "optimizer.lr": 0.01, "model.width": 128}, 0.95),
        ({"optimizer": "momentum", "optimizer.lr": 0.5, "optimizer.momentum": 0.8, "model.width": 64}, 0.90),
        ({"optimizer": "adagrad", "optimizer.lr": 0.01, "model.width": 64}, 0.85),
        ({"optimizer": "adam", "optimizer.lr": 0.001, "model.width": 64}, 0.50),  # not in the top 3
    ]
    for params, value in trials:
        distributions = {"optimizer": OPTIMIZERS, "optimizer.lr": LR, "model.width": width,
                         "optimizer.momentum": FloatDistribution(0.0, 1.0)}
        study.add_trial(create_trial(params=params, value=value,
                                     distributions={k: distributions[k] for k in params}))
    return study


def test_enqueued_configs_are_the_first_trials(tmp_path: Path, store_overrides, capsys):
    earlier_study(tmp_path)
    args = ["search", "study.name=new", "study.warm_start=[old]", "study.warm_start_top_k=3", *FAST,
            *store_overrides]
    assert main(args) == 0
    out = capsys.readouterr().out
    study = optuna.load_study(study_name="new", storage=journal(tmp_path))
    first, second = sorted(study.trials, key=lambda t: t.number)[:2]
    assert first.user_attrs["warm_start_of"] == "old#0" and second.user_attrs["warm_start_of"] == "old#1"
    assert (first.params["optimizer"], first.params["optimizer.lr"], first.params["model.width"]) == \
        ("adam", 0.01, 128)
    # a number outside this space's range is clipped into it (optimizer.lr: 1e-4 .. 0.3)
    assert (second.params["optimizer"], second.params["optimizer.lr"], second.params["optimizer.momentum"]) == \
        ("momentum", 0.3, 0.8)
    assert all(t.state == TrialState.COMPLETE for t in (first, second))
    line = next(line for line in out.splitlines() if line.startswith("warm start:"))
    assert "2 configurations of study 'old' enqueued as the first trials (#0 val_acc=0.95, #1 val_acc=0.9)" in line
    assert "optimizer.lr 0.5->0.3 (#1)" in line
    assert "skipped: #2 (optimizer=adagrad is not among this space's choices)" in line

    # Run again: the study has trials, nothing more is enqueued
    assert main(args) == 0
    assert "warm start: study 'new' has trials already; nothing enqueued" in capsys.readouterr().out
    assert not study.get_trials(states=(TrialState.WAITING,)) and len(study.trials) == 2


def test_a_key_the_earlier_study_lacks_takes_this_spaces_default(tmp_path: Path, store_overrides, capsys):
    earlier_study(tmp_path)
    assert main(["search", "study.name=new", "study.warm_start=[old]", "study.warm_start_top_k=1",
                 "study.n_trials=1", "study.pruner=none", "trainer.max_epochs=1", "tracking.log_models=none",
                 *store_overrides]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("warm start:"))
    assert "keys it lacks take their default" in line and "model.dropout=0" in line
    # model.dropout 0.0 (conf/model/mlp.yaml), batch size 64 (conf/data/digits.yaml), depth 2, adam's betas
    # (conf/optimizer/adam.yaml), the constant schedule (conf/config.yaml): none of them in the earlier trials
    (first,) = optuna.load_study(study_name="new", storage=journal(tmp_path)).trials
    assert first.params["model.dropout"] == 0.0 and first.params["data.batch_size"] == 64
    assert first.params["model.depth"] == 2 and first.params["scheduler"] == "constant"
    assert (first.params["optimizer.beta1"], first.params["optimizer.beta2"]) == (0.9, 0.999)


def refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str]) -> str:
    """Runs the search, expects exit 2 with one line and the stores as they were; returns the line."""
    path = tmp_path / "optuna.journal"
    before = path.read_bytes() if path.exists() else None
    assert main(["search", "study.name=new", *FAST, *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert (path.read_bytes() if path.exists() else None) == before
    assert not (tmp_path / "mlflow.db").exists()
    return err[0]


def test_a_study_that_does_not_exist_is_one_line_and_nothing_written(tmp_path: Path, store_overrides, capsys):
    line = refused(tmp_path, capsys, ["study.warm_start=[old]", *store_overrides])  # no storage at all yet
    assert "study.warm_start: no study storage at" in line
    earlier_study(tmp_path)
    line = refused(tmp_path, capsys, ["study.warm_start=[olde]", *store_overrides])
    assert "study.warm_start: no study 'olde'" in line and "did you mean 'old'?" in line
    line = refused(tmp_path, capsys, ["study.warm_start=[new]", *store_overrides])
    assert "'new' is this study" in line


def test_a_study_that_shares_no_key_is_refused(tmp_path: Path, store_overrides, capsys):
    other = optuna.create_study(study_name="alien", storage=journal(tmp_path), direction="maximize")
    other.add_trial(create_trial(params={"x": 0.5}, distributions={"x": FloatDistribution(0, 1)}, value=1.0))
    line = refused(tmp_path, capsys, [f"study.warm_start=[alien@{tmp_path}/optuna.journal]", *store_overrides])
    assert "study.warm_start: study 'alien' shares" in line and "shares no key with this space" in line


def test_bad_warm_start_settings_are_one_line(tmp_path: Path, store_overrides, capsys):
    line = refused(tmp_path, capsys, ["study.warm_start_top_k=0", *store_overrides])
    assert line.startswith("searchlab: error: study.warm_start_top_k: expected a positive integer")
    line = refused(tmp_path, capsys, ["study.warm_start=old", *store_overrides])
    assert "study.warm_start: expected a list" in line
    line = refused(tmp_path, capsys, ["study.warm_start=[old]", "study.sampler=grid", *store_overrides])
    assert "study.warm_start: a grid search" in line
