"""Both Lightning packages: a project written with `import lightning` (lightning.pytorch), as lightning-hydra-template
writes it (tests/lightning_project/), through what searchlab does with a pytorch_lightning one: a search with pruning
and per-epoch curves, its model logged, registered and exported, resume after SIGTERM, DDP ranks; and the one-line
refusals (a module and a DataModule of different packages, study.pack)."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import lightning
import pytest
import pytorch_lightning
import torch
from helpers import (
    LIT,
    LONG,
    LONG_EPOCHS,
    SEARCHLAB,
    load_model,
    load_study,
    metrics_line,
    searchlab,
    stores,
    terminate_after_checkpoint,
)
from mlflow.tracking import MlflowClient

from searchlab.config.lightning_package import LIGHTNING, PYTORCH_LIGHTNING, package_of
from searchlab.modules import Classifier

PROJECT = Path(__file__).parents[1] / "lightning_project"


def project_module(folder: Path):
    """The project's litdigits.py, imported from its file (the tests' own process has no project folder on its
    path)."""
    spec = importlib.util.spec_from_file_location("litdigits_of_test", folder / "litdigits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_package_is_read_from_the_classes_mro():
    class Mine(lightning.LightningModule):
        pass

    class Theirs(pytorch_lightning.LightningDataModule):
        pass

    assert package_of(Mine, "LightningModule") == LIGHTNING
    assert package_of(Theirs, "LightningDataModule") == PYTORCH_LIGHTNING
    assert package_of(Classifier, "LightningModule") == PYTORCH_LIGHTNING  # the built-ins keep the pinned package
    assert package_of(Mine, "LightningDataModule") is None and package_of(print, "LightningModule") is None


def test_a_lightning_module_searches_with_pruning_and_per_epoch_curves(lit_project, tmp_path, in_process):
    """Every trial is pruned at epoch 2 (a threshold no accuracy reaches, after 2 epochs of warm-up): the pruner got
    the module's val/acc each epoch, and each run has the curves of what the module logged."""
    late = "+study.pruners.late={_target_:optuna.pruners.ThresholdPruner,lower:2.0,n_warmup_steps:2}"
    result = in_process("search", *LIT, "study.n_trials=2", "trainer.max_epochs=4", late, "study.pruner=late",
                        "tracking.log_models=none", "report.min_complete=1", *stores(tmp_path, "lit"),
                        cwd=lit_project)
    assert result.returncode == 0, result.stderr
    study = load_study(tmp_path, "lit")
    assert [t.state.name for t in study.trials] == ["PRUNED", "PRUNED"]
    assert all(sorted(t.intermediate_values) == [1, 2] for t in study.trials)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    for trial in study.trials:
        run_id = trial.user_attrs["mlflow_run_id"]
        for name in ("val/acc", "val/acc_best", "train/loss", "epoch_seconds"):
            assert [m.step for m in client.get_metric_history(run_id, name)] == [1, 2], name
        values = [m.value for m in client.get_metric_history(run_id, "val/acc")]
        assert values == pytest.approx([trial.intermediate_values[1], trial.intermediate_values[2]])


def test_a_lightning_modules_model_is_logged_registered_and_exported(lit_project, tmp_path, in_process):
    result = in_process("search", *LIT, "study.n_trials=2", "trainer.max_epochs=2", "study.pruner=none",
                        "report.min_complete=1", "tracking.register_model=lit-best", *stores(tmp_path, "litmodel"),
                        cwd=lit_project)
    assert result.returncode == 0, result.stderr
    assert "model: trial" in result.stdout and "registered as lit-best v1" in result.stdout
    study = load_study(tmp_path, "litmodel")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    logged = load_model(uri, f"runs:/{study.best_trial.user_attrs['mlflow_run_id']}/model")
    data = project_module(lit_project).DigitsDataModule(seed=0)  # the split the trials validated on (seed 0)
    data.setup()
    x, y = data.splits["val"].tensors
    assert (logged(x).argmax(1) == y).float().mean().item() == pytest.approx(study.best_value, abs=1e-6)
    assert torch.allclose(load_model(uri, "models:/lit-best/1")(x), logged(x))

    exported = tmp_path / "exported"
    best = in_process("best", *LIT, *stores(tmp_path, "litmodel"), "--export", str(exported), cwd=lit_project)
    assert best.returncode == 0, best.stderr
    assert torch.allclose(load_model(uri, str(exported))(x), logged(x), atol=1e-6)


@pytest.mark.slow
def test_sigterm_and_the_same_command_resume_a_lightning_module_mid_way(lit_project, tmp_path, in_process):
    args = ["search", *LIT, "study.n_trials=1", *LONG, *stores(tmp_path, "litterm")]
    code, err = terminate_after_checkpoint([SEARCHLAB, *args], tmp_path / "artifacts", 2, cwd=lit_project)
    assert code == 143, err
    stopped, queued = load_study(tmp_path, "litterm").trials
    assert stopped.state.name == "FAIL" and "resumable from its checkpoint of epoch" in stopped.user_attrs["reason"]

    result = in_process(*args, cwd=lit_project)  # the same command again
    assert result.returncode == 0, result.stderr
    (retry,) = [t for t in load_study(tmp_path, "litterm").trials if t.state.name == "COMPLETE"]
    resumed_from = retry.user_attrs["resumed_from_epoch"]
    assert retry.params == stopped.params and resumed_from >= 2
    assert retry.user_attrs["epochs_trained"] == LONG_EPOCHS - resumed_from  # only the remaining epochs were trained
    assert sorted(retry.intermediate_values) == list(range(1, LONG_EPOCHS + 1))


@pytest.mark.ddp
def test_ddp_ranks_train_a_lightning_module_and_datamodule(lit_project, in_process):
    """trainer.devices=2 on CPU (gloo): each rank builds the project's DataModule and trains the module with
    lightning.pytorch's DDP strategy; rank 0's metrics, the best epoch and the test split come back."""
    result = in_process("train", *LIT, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                        "trainer.max_epochs=2", cwd=lit_project)
    assert result.returncode == 0, result.stderr
    metrics = metrics_line(result.stdout)
    assert metrics["epochs"] == 2 and metrics["best_epoch"] in (1, 2) and 0 < metrics["test/acc"] <= 1


def test_early_stopping_and_max_time_end_a_lightning_modules_training(lit_project, in_process):
    """lightning.pytorch's EarlyStopping and Timer, read back as the reasons a training ended early: with a learning
    rate of 1e-12 val/acc never improves (patience 1: stopped at epoch 2); a 1-second limit ends a long training."""
    patient = in_process("train", *LIT, "optimizer=sgd", "optimizer.lr=1e-12", "trainer.max_epochs=6",
                         "trainer.early_stopping_patience=1", cwd=lit_project)
    assert patient.returncode == 0, patient.stderr
    ended = metrics_line(patient.stdout)["ended"]
    assert metrics_line(patient.stdout)["epochs"] == 2 and ended.startswith("early stopping at epoch 2: val/acc")
    timed = in_process("train", *LIT, "trainer.max_epochs=1000", "trainer.max_time={seconds:1}", cwd=lit_project)
    assert timed.returncode == 0, timed.stderr
    metrics = metrics_line(timed.stdout)
    assert metrics["epochs"] < 1000 and metrics["ended"] == f"max_time reached at epoch {metrics['epochs']}"


def _project_files(package: str) -> dict[str, str]:
    """The project's module written with `package` (lightning or pytorch_lightning), and its conf."""
    source = (PROJECT / "litdigits.py").read_text().replace("from lightning import", f"from {package} import")
    conf = {f"conf/{p.relative_to(PROJECT / 'conf')}": p.read_text() for p in (PROJECT / "conf").rglob("*.yaml")}
    return {"litdigits.py": source, **conf}


def test_a_module_and_a_datamodule_of_different_packages_is_one_line(bad):
    files = _project_files("lightning")
    files["pldigits.py"] = _project_files("pytorch_lightning")["litdigits.py"]
    files["conf/data/pl.yaml"] = "_target_: pldigits.DigitsDataModule\n"
    line = bad(files, "module=lit", "data=pl", "search=lit", "study.metric=val/acc")
    assert "data: pldigits.DigitsDataModule is a pytorch_lightning LightningDataModule but module " \
           "litdigits.LitModule is a lightning.pytorch LightningModule" in line


@pytest.mark.parametrize("package", ["lightning", "pytorch_lightning"])
def test_pack_refuses_a_users_module_of_either_package(bad, package):
    line = bad(_project_files(package), "module=lit", "search=lit", "study.metric=val/acc", "study.pack=2")
    assert line.startswith("searchlab: error: study.pack=2: the base config cannot be packed")
    assert "not litdigits.LitModule (a module of your own trains one trial at a time)" in line


def test_a_search_on_a_module_that_warns_shows_each_warning_once_in_one_line(tmp_path):
    """The module's save_hyperparameters() keeps `net` (Lightning warns at every module built: the preflight's and
    each trial's), and no trial completes (Optuna's plots would warn at the end): each warning is one line, once,
    and stdout is the first line, one line per trial and the summary. A real process: pytest's own filters would
    hide the warnings in this one."""
    project = tmp_path / "warns"
    shutil.copytree(PROJECT, project, ignore=shutil.ignore_patterns("__pycache__"))
    source = (project / "litdigits.py").read_text()
    (project / "litdigits.py").write_text(source.replace('logger=False, ignore=["net"]', "logger=False"))
    always = "+study.pruners.always={_target_:optuna.pruners.ThresholdPruner,lower:2.0}"
    result = searchlab("search", *LIT, "study.n_trials=3", "trainer.max_epochs=1", always, "study.pruner=always",
                       "tracking.log_models=none", *stores(tmp_path, "warns"), cwd=project)
    assert result.returncode == 0, result.stderr
    assert [line.split()[0] for line in result.stdout.splitlines()[1:4]] == ["trial"] * 3
    warned = result.stderr.splitlines()
    assert sum("Attribute 'net' is an instance of `nn.Module`" in line for line in warned) == 1, result.stderr
    assert all(line.startswith("searchlab: warning: ") for line in warned), result.stderr  # no paths, no [W ...]
    assert len(warned) == len(set(warned))
    # no complete trial: the summary says so, and Optuna's plot warnings about it are silenced (quiet_empty_plots)
    assert "no trial completed yet" in result.stdout and not any("(optuna warning)" in line for line in warned)
