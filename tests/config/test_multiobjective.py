"""Several objectives (`study.metric=[val_acc,params]`): the config's checks, a trial's values, and a tiny
multi-objective study end to end (Pareto front in the output, `best`, the report and summary.json; no pruning)."""

from __future__ import annotations

import json
import math

import pytest
from helpers import load_study
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from searchlab.cli import main
from searchlab.config import ConfigError, Objectives
from searchlab.training import TrainResult

TINY = ["trainer.max_epochs=2", "model.width=32"]
SEVERAL = "study.metric=[val_acc,params]"


@pytest.mark.parametrize("overrides, message", [
    ([SEVERAL, "study.direction=[maximize]"],
     "study.direction: 1 directions for 2 metrics in study.metric; give one per metric"),
    ([SEVERAL, "study.direction=[maximize,up]"],
     "study.direction: expected each of auto, maximize, minimize, got 'up'"),
    ([SEVERAL, "study.direction=maximize"],
     "study.direction: one direction (maximize) for 2 metrics in study.metric; give one per metric, "
     "e.g. 'study.direction=[maximize,maximize]', or auto"),
    (["study.metric=val_acc", "study.direction=[maximize,minimize]"],
     "study.direction: 2 directions for 1 metric in study.metric"),
    (["study.metric=[val_acc,val_acc]"], "study.metric: val_acc is listed twice"),
    (["study.metric=[]"], "study.metric: expected a logged metric's name or a list of names, got []"),
    (["study.metric=[val_acc,widgets]"],
     "study.direction: auto cannot tell whether widgets (study.metric's item 2) should go up or down; give one "
     "direction per metric, e.g. 'study.direction=[auto,maximize]'"),
    ([SEVERAL, "study.sampler=cmaes"], "study.sampler: cmaes cannot sample a study of several metrics"),
    (["study.metric=[val_acc,val_widgets]", "study.direction=[auto,minimize]"],
     "study.metric: the module never logs 'val_widgets' after a validation epoch"),
])
def test_bad_objectives_are_one_line_naming_the_key(tmp_path, store_overrides, capsys, overrides, message):
    code = main(["search", "study.name=bad", "study.n_trials=1", "trainer.max_epochs=1", "model.width=8",
                 *overrides, *store_overrides])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "optuna.journal").exists()  # nothing written


def result_of(history: list[dict[str, float]]) -> TrainResult:
    return TrainResult(history=history)


def test_values_are_read_at_the_first_metrics_best_epoch():
    study = OmegaConf.create({"metric": ["val_acc", "val_loss", "params", "epoch_seconds"], "direction": "auto"})
    objectives = Objectives.of(study)
    assert objectives.directions == ("maximize", "minimize", "minimize", "minimize") and objectives.several
    history = [{"val_acc": 0.5, "val_loss": 0.9, "params": 100.0, "epoch_seconds": 3.0},
               {"val_acc": 0.8, "val_loss": 0.7, "params": 100.0, "epoch_seconds": 1.0},
               {"val_acc": 0.8, "val_loss": 0.2, "params": 100.0, "epoch_seconds": 2.0},
               {"val_acc": math.nan, "val_loss": 0.1, "params": 100.0, "epoch_seconds": 9.0}]
    # epoch 2 (index 1): the first with the best val_acc; val_loss there, not its own best; the median epoch time
    assert objectives.values_of(result_of(history)) == [0.8, 0.7, 100.0, 2.5]
    assert objectives.values_of(result_of([{"val_acc": math.nan}])) is None
    single = Objectives.of(OmegaConf.create({"metric": "val_loss", "direction": "auto"}))
    assert not single.several and single.values_of(result_of(history)) == 0.1  # its best epoch, as always
    assert objectives.dominates([0.9, 0.1, 1, 1], [0.8, 0.1, 1, 1]) and not objectives.dominates([0.9, 0.2, 1, 1],
                                                                                                  [0.8, 0.1, 1, 1])
    with pytest.raises(ConfigError, match="study.direction: auto cannot tell whether study.metric=widgets"):
        Objectives.of(OmegaConf.create({"metric": "widgets", "direction": "auto"}))


@pytest.mark.slow
def test_multi_objective_study_end_to_end(tmp_path, store_overrides, capsys):
    args = ["search", "study.name=pareto", SEVERAL, "study.n_trials=3", *TINY, "tracking.top_k=2",
            *store_overrides]
    assert main(args) == 0  # study.pruner stays the default (successive halving): switched off for the study
    out = capsys.readouterr().out
    first = out.splitlines()[0]
    assert first.startswith("study 'pareto': maximize val_acc, minimize params (Pareto front; pruning is off: "
                            "Optuna cannot prune multi-objective studies)")
    study = load_study(tmp_path, "pareto")
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    assert all(len(t.values) == 2 and t.values[1] == int(t.values[1]) > 0 for t in study.trials)
    assert all(not t.intermediate_values for t in study.trials)  # nothing reported: no pruning
    front = sorted(study.best_trials, key=lambda t: -t.values[0])
    assert "Pareto front:" in out and all(f"# trial {t.number}: val_acc=" in out for t in front)
    # the values are the best val_acc epoch's, and the parameter count that searchlab adds to every epoch
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    for trial in study.trials:
        run_id = trial.user_attrs["mlflow_run_id"]
        assert max(m.value for m in client.get_metric_history(run_id, "val_acc")) == trial.values[0]
        assert {m.value for m in client.get_metric_history(run_id, "params")} == {trial.values[1]}
        assert len(client.get_metric_history(run_id, "epoch_seconds")) == 2
        assert client.get_run(run_id).data.metrics["objective.params"] == trial.values[1]
    # tracking.log_models=best with several objectives: the front's models, up to tracking.top_k
    experiment = client.get_experiment_by_name("pareto").experiment_id
    logged = {m.source_run_id for m in client.search_logged_models([experiment]) if m.name == "model"}
    assert logged == {t.user_attrs["mlflow_run_id"] for t in front[:2]}

    # searchlab best: the front, each trial with its values and its command
    assert main(["best", "study.name=pareto", *store_overrides]) == 0
    best = capsys.readouterr().out
    assert best.count("searchlab train ") == len(front)
    assert f"# trial {front[0].number}: val_acc={front[0].values[0]:.4f} params={front[0].values[1]:.0f}" in best

    # the report: the Pareto plot, the front in summary.json, the first metric for the views of one value
    folder = tmp_path / "reports" / "pareto"
    page = (folder / "report.html").read_text()
    assert "Pareto front: " in page and "Pareto front (maximize val_acc, minimize params)" in page
    assert "use the first metric, val_acc" in page
    summary = json.loads((folder / "summary.json").read_text())
    assert [row["number"] for row in summary["pareto_front"]] == [t.number for t in front]
    assert summary["pareto_front"][0]["values"] == {"val_acc": front[0].values[0], "params": front[0].values[1]}
    assert summary["objectives"] == [{"metric": "val_acc", "direction": "maximize"},
                                     {"metric": "params", "direction": "minimize"}]
    assert summary["best"]["number"] == front[0].number and "pareto_front.png" in summary["plots"]
    assert "learning_curves.png" not in summary["plots"]  # no per-epoch values reported: no curves to draw
    assert (folder / "pareto_front.png").stat().st_size > 0

    # a resumed study keeps its metrics and directions; ablate compares by one metric and refuses
    resume = ["search", "study.name=pareto", "study.n_trials=4", *TINY, *store_overrides]
    for overrides, message in (
            (["study.metric=val_acc"], "study.metric: study 'pareto' optimizes [val_acc,params], not val_acc"),
            (["study.metric=[val_acc,val_loss]"], "study.metric: study 'pareto' optimizes [val_acc,params]"),
            (["study.metric=[params,val_acc]"], "optimizes [val_acc,params], not [params,val_acc]"),
            ([SEVERAL, "study.direction=[maximize,maximize]"],
             "study.direction: study 'pareto' was created to maximize, minimize its metrics")):
        assert main([*resume, *overrides]) == 2
        assert message in capsys.readouterr().err
    assert len(load_study(tmp_path, "pareto").trials) == 3
    assert main(["ablate", "study.name=pareto", *store_overrides]) == 2
    assert "study.metric: study 'pareto' optimizes several metrics (val_acc, params)" in capsys.readouterr().err


def test_a_single_metric_study_is_not_resumed_with_several(tmp_path, store_overrides, capsys):
    args = ["search", "study.name=one", "trainer.max_epochs=1", "model.width=8", "study.pruner=none",
            *store_overrides]
    assert main([*args, "study.n_trials=1"]) == 0
    capsys.readouterr()
    assert main([*args, "study.n_trials=2", SEVERAL]) == 2
    assert "study.metric: study 'one' optimizes val_acc, not [val_acc,params]" in capsys.readouterr().err
