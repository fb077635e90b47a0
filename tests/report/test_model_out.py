"""The trained model out: best-epoch weights, MLflow models logged at a study's end and registered, --export, and
the limits per trial (trainer.max_time, early stopping) that end a trial COMPLETE with a reason."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
from pathlib import Path

import mlflow.pytorch
import pytest
import torch
from helpers import SEARCHLAB, load_model, load_study
from mlflow.tracking import MlflowClient

from searchlab import commands
from searchlab.cli import main
from searchlab.config import Composer
from searchlab.report.models import module_with_weights
from searchlab.training import fit
from searchlab.training.build import load_data

TINY = ["trainer.max_epochs=3", "model.width=32"]
REPO = Path(__file__).resolve().parents[2]


def logged_models(client: MlflowClient, experiment: str) -> dict[str, object]:
    """source run id -> the LoggedModel named `model`."""
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    return {m.source_run_id: m for m in client.search_logged_models([experiment_id]) if m.name == "model"}


def digits_test_inputs() -> torch.Tensor:
    return load_data(Composer([]).base).x_test[:50]


def predictions(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.cpu().eval()(x)


# --- weights of the best epoch --------------------------------------------------------------------------------------

def test_test_metrics_come_from_the_best_epoch_not_the_last():
    # A high constant learning rate: accuracy peaks early, then the run falls apart (but stays finite).
    overrides = ["trainer.max_epochs=6", "model.width=32", "optimizer=sgd", "optimizer.lr=2.0"]
    result = commands.train(overrides, quiet=True)
    accs = [m["val_acc"] for m in result.history]
    assert result.stop_reason is None and len(accs) == 6
    best_epoch = accs.index(max(accs)) + 1
    assert result.best_epoch == best_epoch and accs[-1] < max(accs) - 0.05  # the last epoch is clearly worse
    # The module that comes back holds the best epoch's weights: it scores that epoch's val_acc on the val split.
    splits = load_data(Composer(overrides).base)
    val_acc = (predictions(result.module, splits.x_val).argmax(1) == splits.y_val).float().mean().item()
    assert val_acc == pytest.approx(max(accs), abs=1e-6)
    # ... and the test metrics were measured with them.
    test_acc = (predictions(result.module, splits.x_test).argmax(1) == splits.y_test).float().mean().item()
    assert result.test["test_acc"] == pytest.approx(test_acc, abs=1e-6)
    # The same weights rebuilt from the kept copy (as a study's end does) predict the same.
    rebuilt, _ = module_with_weights(Composer(overrides).base, result.weights)
    assert torch.allclose(predictions(rebuilt, splits.x_test), predictions(result.module, splits.x_test))


def test_weights_cross_a_process_boundary_as_bytes():
    result = fit(Composer(TINY).base, load_data(Composer(TINY).base))
    copy = pickle.loads(pickle.dumps(result.weights))
    assert copy.epoch == result.best_epoch and copy.value == result.weights.value
    assert all(torch.equal(copy.state[k], v) for k, v in result.weights.state.items())


# --- limits per trial -----------------------------------------------------------------------------------------------

def test_max_time_ends_a_trial_complete_with_its_reason(tmp_path, store_overrides):
    assert main(["search", "study.name=timed", "study.n_trials=1", "study.pruner=none", "trainer.max_epochs=10000",
                 "model.width=32", "trainer.max_time={seconds:3}", "tracking.log_models=none",
                 *store_overrides]) == 0
    (trial,) = load_study(tmp_path, "timed").trials
    epochs = len(trial.intermediate_values)
    assert trial.state.name == "COMPLETE" and 1 <= epochs < 10000
    assert trial.user_attrs["reason"] == f"max_time reached at epoch {epochs}"
    assert trial.value == max(trial.intermediate_values.values())  # its best value so far
    run = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(trial.user_attrs["mlflow_run_id"])
    assert run.data.tags["optuna.trial.reason"] == trial.user_attrs["reason"] and run.info.status == "FINISHED"


def test_early_stopping_ends_a_trial_complete_not_pruned(tmp_path, store_overrides):
    assert main(["search", "study.name=patient", "study.n_trials=2", "study.pruner=none", "trainer.max_epochs=40",
                 "model.width=32", "trainer.early_stopping_patience=2", "tracking.log_models=none",
                 *store_overrides]) == 0
    trials = load_study(tmp_path, "patient").trials
    stopped = [t for t in trials if "early stopping" in t.user_attrs.get("reason", "")]
    assert stopped, [(t.state.name, t.user_attrs.get("reason"), len(t.intermediate_values)) for t in trials]
    for trial in stopped:
        values = [trial.intermediate_values[e] for e in sorted(trial.intermediate_values)]
        assert trial.state.name == "COMPLETE" and len(values) < 40
        # stopped after 2 epochs without a better val_acc than the best before them
        assert max(values[-2:]) <= max(values[:-2]) and trial.value == max(values)
        assert trial.user_attrs["reason"].startswith(f"early stopping at epoch {len(values)}: val_acc did not "
                                                     "improve for 2 epochs")


def test_early_stopping_follows_the_direction_of_a_minimized_metric():
    result = commands.train(["trainer.max_epochs=40", "model.width=32", "study.metric=val_loss",
                             "trainer.early_stopping_patience=1", "optimizer.lr=0.05"], quiet=True)
    losses = [m["val_loss"] for m in result.history]
    assert result.ended and result.ended.startswith(f"early stopping at epoch {len(losses)}: val_loss")
    assert losses[-1] >= min(losses[:-1]) and result.best_epoch == losses.index(min(losses)) + 1


@pytest.mark.parametrize(("override", "message"), [
    ("trainer.max_time=10", 'trainer.max_time: expected "DD:HH:MM:SS"'),
    ("trainer.max_time={minute:10}", "trainer.max_time: expected"),
    ("trainer.early_stopping_patience=0", "trainer.early_stopping_patience: expected a positive integer"),
    ("tracking.log_models=all", "tracking.log_models: expected one of best, top_k, none"),
    ("tracking.top_k=0", "tracking.top_k: expected a positive integer"),
])
def test_bad_limits_and_model_settings_are_one_line_errors(override, message, capsys):
    assert main(["train", override]) == 2
    assert message in capsys.readouterr().err


# --- the study's best model in MLflow -------------------------------------------------------------------------------

def test_the_best_model_is_logged_registered_and_predicts_like_the_trained_module(tmp_path, store_overrides,
                                                                                  capsys):
    assert main(["search", "study.name=models", "study.n_trials=4", "study.pruner=none", *TINY,
                 "tracking.register_model=digits-best", *store_overrides]) == 0
    assert "model: trial" in capsys.readouterr().out
    study = load_study(tmp_path, "models")
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    models = logged_models(client, "models")
    best_run = study.best_trial.user_attrs["mlflow_run_id"]
    assert list(models) == [best_run]  # log_models=best: the best trial's only
    x = digits_test_inputs()
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    loaded = load_model(uri, f"runs:/{best_run}/model")
    # The trained module: the best trial trained again alone (deterministic on CPU), its best epoch restored.
    trained = commands.train(study.best_trial.user_attrs["overrides"], quiet=True).module
    assert torch.allclose(loaded(x), predictions(trained, x), atol=1e-5)
    assert loaded(x[:7]).shape == (7, 10)  # any batch size, not only the example's
    splits = load_data(Composer(study.best_trial.user_attrs["overrides"]).base)
    assert (loaded(splits.x_val).argmax(1) == splits.y_val).float().mean().item() == pytest.approx(study.best_value,
                                                                                                  abs=1e-6)
    # In the Model Registry of the SQLite store, as version 1, from the best trial's run.
    (version,) = client.search_model_versions("name = 'digits-best'")
    assert int(version.version) == 1 and version.run_id == best_run
    from_registry = load_model(uri, "models:/digits-best/1")
    assert torch.allclose(from_registry(x), loaded(x))
    # Resuming or reporting logs nothing twice.
    assert main(["report", "study.name=models", *store_overrides]) == 0
    assert len(logged_models(client, "models")) == 1


def test_top_k_logs_the_k_best_trials_and_none_logs_nothing(tmp_path, store_overrides):
    assert main(["search", "study.name=topk", "study.n_trials=4", "study.pruner=none", *TINY,
                 "tracking.log_models=top_k", "tracking.top_k=2", *store_overrides]) == 0
    study = load_study(tmp_path, "topk")
    ranked = sorted((t for t in study.trials if t.state.name == "COMPLETE"), key=lambda t: -t.value)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert set(logged_models(client, "topk")) == {t.user_attrs["mlflow_run_id"] for t in ranked[:2]}
    assert main(["search", "study.name=nomodel", "study.n_trials=2", "study.pruner=none", *TINY,
                 "tracking.log_models=none", *store_overrides]) == 0
    assert logged_models(client, "nomodel") == {}


@pytest.mark.slow
def test_with_two_workers_the_worker_saves_the_weights_and_the_parent_logs_them(tmp_path, store_overrides):
    parent = subprocess.Popen([SEARCHLAB, "search", "workers=2", "study.name=pair", "study.n_trials=4",
                               "study.pruner=none", *TINY, *store_overrides], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        stdout, stderr = parent.communicate(timeout=600)
    finally:
        parent.kill()
    assert parent.returncode == 0, stderr
    study = load_study(tmp_path, "pair")
    best_run = study.best_trial.user_attrs["mlflow_run_id"]
    assert f"runs:/{best_run}/model" in stdout
    # The best trial ran in a worker, not in the parent (`searchlab` is the parent's own process: a console script).
    assert study.best_trial.user_attrs["worker.pid"] not in (parent.pid, os.getpid())
    # The logged model is the trial's best epoch: it scores the trial's value on the val split. (Not compared with a
    # re-training here: the workers train with one thread, and float sums in another order drift over epochs.)
    loaded = load_model(f"sqlite:///{tmp_path}/mlflow.db", f"runs:/{best_run}/model")
    splits = load_data(Composer(study.best_trial.user_attrs["overrides"]).base)
    val_acc = (loaded(splits.x_val).argmax(1) == splits.y_val).float().mean().item()
    assert val_acc == pytest.approx(study.best_value, abs=1e-6)


def test_registration_on_the_mlflow_server(mlflow_server, tmp_path):
    overrides = ["study.name=served", "study.n_trials=2", "study.pruner=none", *TINY,
                 f"study.storage={tmp_path}/optuna.journal", f"tracking.uri={mlflow_server.uri}",
                 "tracking.artifact_root=null", f"report.dir={tmp_path}/reports",
                 "tracking.register_model=served-best"]
    assert main(["search", *overrides]) == 0
    study = load_study(tmp_path, "served")
    client = MlflowClient(mlflow_server.uri)
    (version,) = client.search_model_versions("name = 'served-best'")
    assert version.run_id == study.best_trial.user_attrs["mlflow_run_id"]
    loaded = load_model(mlflow_server.uri, "models:/served-best/1")
    x = digits_test_inputs()
    trained = commands.train(study.best_trial.user_attrs["overrides"], quiet=True).module
    assert torch.allclose(loaded(x), predictions(trained, x), atol=1e-5)


# --- export -------------------------------------------------------------------------------------------------------

def test_train_export_writes_a_loadable_model_of_the_best_epoch(tmp_path):
    folder = tmp_path / "model"
    result = commands.train(["trainer.max_epochs=4", "model.width=32", "optimizer=sgd", "optimizer.lr=2.0"],
                            quiet=True, export_dir=str(folder))
    x = digits_test_inputs()
    assert torch.allclose(mlflow.pytorch.load_model(str(folder))(x), predictions(result.module, x), atol=1e-5)
    # a folder that already holds something is refused before any training
    assert main(["train", "--export", str(folder), *TINY]) == 2


def test_best_export_writes_the_best_trials_model(tmp_path, store_overrides, capsys):
    assert main(["search", "study.name=tobest", "study.n_trials=2", "study.pruner=none", *TINY,
                 *store_overrides]) == 0
    study = load_study(tmp_path, "tobest")
    assert main(["best", "--export", str(tmp_path / "exported"), "study.name=tobest", *store_overrides]) == 0
    assert f"# model of trial {study.best_trial.number}" in capsys.readouterr().out
    x = digits_test_inputs()
    run_id = study.best_trial.user_attrs["mlflow_run_id"]
    logged = load_model(f"sqlite:///{tmp_path}/mlflow.db", f"runs:/{run_id}/model")
    assert torch.allclose(mlflow.pytorch.load_model(str(tmp_path / "exported"))(x), logged(x))


def test_train_logs_its_model_to_an_mlflow_run_when_asked(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert main(["train", *TINY, "tracking.log_models=best", f"tracking.uri={uri}",
                 f"tracking.artifact_root={tmp_path}/artifacts"]) == 0
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("searchlab-train").experiment_id])
    assert run.data.tags["searchlab.role"] == "train" and "test_acc" in run.data.metrics
    assert run.data.tags["optuna.trial.state"] == "COMPLETE"
    assert run.data.tags["searchlab.engine"] == "packed"  # searchlab's MLP: the packing engine trained it
    model = load_model(uri, f"runs:/{run.info.run_id}/model")
    assert model(digits_test_inputs()).shape == (50, 10)


def test_a_users_module_and_datamodule_export(tmp_path):
    """The regression example's own LightningModule and DataModule, from its folder: exported, loaded, predicting."""
    project = tmp_path / "regression"
    shutil.copytree(REPO / "examples" / "regression", project, ignore=shutil.ignore_patterns("mlruns", "__pycache__"))
    result = subprocess.run([SEARCHLAB, "train", "-cd", "conf", "data=diabetes", "module=diabetes",
                             "study.metric=val_rmse", "trainer.max_epochs=3", "--export", "out"],
                            cwd=project, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    loaded = mlflow.pytorch.load_model(str(project / "out"))  # pt2: loads without the project's code
    out = loaded(torch.zeros(5, 10))
    assert out.shape[0] == 5 and torch.isfinite(out).all()


@pytest.mark.ddp
def test_ddp_ranks_test_with_the_best_weights_and_send_them_back(tmp_path):
    """trainer.devices=2 on CPU (gloo): the module stays in the ranks, its best weights come back and export."""
    overrides = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "model.width=32", "optimizer=sgd",
                 "optimizer.lr=2.0", "trainer.max_epochs=4"]
    result = commands.train(overrides, quiet=True, export_dir=str(tmp_path / "ddp-model"))
    accs = [m["val_acc"] for m in result.history]
    assert result.module is None and result.best_epoch == accs.index(max(accs)) + 1
    splits = load_data(Composer(overrides).base)
    exported = mlflow.pytorch.load_model(str(tmp_path / "ddp-model"))
    test_acc = (exported(splits.x_test).argmax(1) == splits.y_test).float().mean().item()
    assert result.test["test_acc"] == pytest.approx(test_acc, abs=1e-6)  # the ranks tested the best epoch's weights
