"""study.stop_when: each rule on studies of known values, and one tiny study on digits that stops early and ends
FINISHED with the reason in its summary line, its MLflow parent run and its report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.distributions import FloatDistribution
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState, create_trial

from searchlab.cli import main
from searchlab.study.loop import StudyDone, StudyStopped
from searchlab.study.stopping import Patience, RegretBound, stop_rules

X = {"x": FloatDistribution(0.0, 1.0)}


def study_of(values: list[float | None], direction: str = "maximize") -> optuna.Study:
    """An in-memory study whose trials finished in this order with these values (None: pruned)."""
    study = optuna.create_study(direction=direction)
    for i, value in enumerate(values):
        state = TrialState.PRUNED if value is None else TrialState.COMPLETE
        study.add_trial(create_trial(params={"x": i / max(len(values), 1)}, distributions=X, value=value,
                                     state=state))
    return study


def test_patience_stops_when_the_best_has_not_improved_by_min_delta():
    # best 0.6 at the 2nd trial; 0.605 and 0.609 are gains of min_delta or less: they do not count
    rule = Patience(study_of([0.5, 0.6, 0.605, 0.609]), patience=3, min_delta=0.01)
    assert rule.reason() is None  # two trials without improvement, three needed
    rule = Patience(study_of([0.5, 0.6, 0.605, 0.609, 0.55]), patience=3, min_delta=0.01)
    assert rule.reason() is not None and "in the last 3 finished trials" in rule.reason()
    assert "0.6" in rule.reason()
    # an improvement by more than min_delta resets the count
    assert Patience(study_of([0.5, 0.6, 0.605, 0.62, 0.55]), patience=3, min_delta=0.01).reason() is None


def test_patience_counts_pruned_trials_and_follows_the_direction():
    assert Patience(study_of([0.3, None, None], "minimize"), patience=2).reason() is not None
    assert Patience(study_of([0.3, None, 0.2], "minimize"), patience=2).reason() is None  # 0.2 < 0.3 improves
    assert Patience(study_of([0.3, None, 0.2], "maximize"), patience=2).reason() is not None
    assert Patience(study_of([None, None, None]), patience=2).reason() is None  # no best yet: nothing to watch


def test_regret_bound_stops_a_study_whose_space_is_flat():
    flat = study_of([0.9 + 1e-4 * math.sin(i) for i in range(12)])
    assert RegretBound(flat, bound=0.5, min_trials=13).reason() is None  # fewer complete trials than min_trials
    rule = RegretBound(flat, bound=0.5, min_trials=10)
    reason = rule.reason()
    assert reason is not None and "regret bound of 12 complete trials" in reason
    assert rule.regret is not None and 0 <= rule.regret < 0.5
    strict = RegretBound(flat, bound=rule.regret / 2, min_trials=10)  # a bound below this one: goes on
    assert strict.reason() is None and strict.regret == pytest.approx(rule.regret, rel=0.5)


def test_stop_rules_are_done_rules_and_off_for_null():
    study = study_of([0.5])
    assert stop_rules(study, None) == []
    rules = stop_rules(study, {"patience": 3, "min_delta": 0.1, "regret_bound": 0.01})
    assert [type(r) for r in rules] == [Patience, RegretBound] and all(r.done for r in rules)
    assert not issubclass(StudyDone, StudyStopped)  # a converged study is not a failed one


def test_stop_when_study_ends_finished_with_the_reason(tmp_path: Path, store_overrides, capsys):
    # min_delta=1: no accuracy gain can exceed it, so the study stops 2 trials after its first complete one
    args = ["search", "study.name=early", "study.n_trials=6", "study.stop_when={patience:2,min_delta:1.0}",
            "study.pruner=none", "trainer.max_epochs=1", "model.width=16", "tracking.log_models=none",
            *store_overrides]
    assert main(args) == 0
    out = capsys.readouterr().out
    study = optuna.load_study(study_name="early",
                              storage=JournalStorage(JournalFileBackend(str(tmp_path / "optuna.journal"))))
    finished = [t for t in study.trials if t.state.is_finished()]
    assert len(finished) == 3
    summary = next(line for line in out.splitlines() if "trials in" in line and "this run" in line)
    assert summary.startswith("3/6 trials") and "stopped early: the best value" in summary
    assert "study.stop_when.patience=2" in study.user_attrs["stopped"]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("early")
    (parent,) = client.search_runs([experiment.experiment_id], filter_string="tags.`searchlab.role` = 'study'")
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["searchlab.stopped"] == study.user_attrs["stopped"]
    report = json.loads((tmp_path / "reports" / "early" / "summary.json").read_text())
    assert report["stopped"] == study.user_attrs["stopped"]
    assert "Stopped early" in (tmp_path / "reports" / "early" / "report.html").read_text()

    # The same command again: the study is still done, so no trial starts
    assert main(args) == 0
    out = capsys.readouterr().out
    assert len([t for t in study.trials if t.state.is_finished()]) == 3
    assert "stopped early" in next(line for line in out.splitlines() if "this run" in line)


def test_workers_stop_together_and_the_parent_ends_the_study_finished(tmp_path: Path, store_overrides, capsys):
    # Each `searchlab worker` judges the study's trials, not only its own: all stop once the study has converged
    assert main(["search", "workers=2", "study.name=early2", "study.n_trials=12",
                 "study.stop_when={patience:2,min_delta:1.0}", "study.pruner=none", "trainer.max_epochs=1",
                 "model.width=16", "tracking.log_models=none", *store_overrides]) == 0
    out = capsys.readouterr().out
    study = optuna.load_study(study_name="early2",
                              storage=JournalStorage(JournalFileBackend(str(tmp_path / "optuna.journal"))))
    # the 3rd finished trial stops the worker that saw it; the other stops after the trial it was training
    assert 3 <= len([t for t in study.trials if t.state.is_finished()]) <= 4
    assert "stopped early: the best value" in next(line for line in out.splitlines() if "this run" in line)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("early2")
    (parent,) = client.search_runs([experiment.experiment_id], filter_string="tags.`searchlab.role` = 'study'")
    assert parent.info.status == "FINISHED" and "patience=2" in parent.data.tags["searchlab.stopped"]


@pytest.mark.parametrize(("value", "message"), [
    ("{patience:0}", "study.stop_when.patience: expected a positive integer"),
    ("{min_delta:0.1}", "study.stop_when.min_delta: goes with study.stop_when.patience"),
    ("{patiense:3}", "did you mean patience?"),
    ("{regret_bound:-1}", "study.stop_when.regret_bound: expected a positive number"),
    ("5", "study.stop_when: expected null or a mapping"),
])
def test_bad_stop_when_is_one_line_and_writes_nothing(tmp_path: Path, store_overrides, capsys, value, message):
    assert main(["search", f"study.stop_when={value}", "study.n_trials=1", *store_overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "optuna.journal").exists() and not (tmp_path / "mlflow.db").exists()


def test_stop_when_refuses_several_metrics(tmp_path: Path, store_overrides, capsys):
    assert main(["search", "study.stop_when={patience:3}", "study.metric=[val_acc,params]", *store_overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "study.stop_when: a study of several metrics" in err[0]
