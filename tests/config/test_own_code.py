"""The user's own code: networks, LightningModules, DataModules and metrics from a project folder of their own, run
as a user runs them (the `searchlab` command from that folder, --config-dir), plus the regressor, direction=auto,
the Python API and the bad inputs that only a built network, module or dataset can reveal.

The examples' workers, their DDP ranks, the Python API script and one bad input run as real processes; the commands
themselves run the CLI's main() in this process, from the project folder (in_process)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import optuna
import pytest
from helpers import REPO, load_study, metrics_line, searchlab, stores
from mlflow.tracking import MlflowClient

from searchlab.config.compose import MAXIMIZED_WORDS, MINIMIZED_WORDS, metric_direction

EXAMPLES = REPO / "examples"
TINY = ["trainer.max_epochs=2", "study.n_trials=4", "report.min_complete=2"]


@pytest.fixture(scope="module")
def signals_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """examples/signals copied to a folder outside the checkout, with a small signals.npz made by its script."""
    folder = tmp_path_factory.mktemp("user") / "signals"
    shutil.copytree(EXAMPLES / "signals", folder, ignore=shutil.ignore_patterns("mlruns", "*.npz", "__pycache__"))
    made = subprocess.run([sys.executable, "signals.py", "signals.npz", "--n", "600"], cwd=folder, capture_output=True,
                          text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    return folder


@pytest.fixture(scope="module")
def regression_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("user") / "regression"
    shutil.copytree(EXAMPLES / "regression", folder, ignore=shutil.ignore_patterns("mlruns", "__pycache__"))
    return folder


# --- the examples, end to end from their own folders -------------------------------------------------------------

@pytest.mark.slow
def test_signals_example_user_network_with_two_workers(signals_project, tmp_path, in_process, monkeypatch):
    """The README's signals command, with workers=2: each worker (a process of its own; the parent runs in this one)
    imports signals.Net1D from the project folder."""
    # A copy of the project whose signals.py notes the pid of every process that imports it.
    project = tmp_path / "signals"
    shutil.copytree(signals_project, project)
    imports = tmp_path / "imports.txt"
    with (project / "signals.py").open("a") as module:
        module.write("\nimport os as _os\nwith open(_os.environ['SIGNALS_IMPORTED_BY'], 'a') as _f:\n"
                     "    _f.write(f'{_os.getpid()}\\n')\n")
    monkeypatch.setenv("SIGNALS_IMPORTED_BY", str(imports))  # the workers inherit this process's environment
    result = in_process("search", "--config-dir", "conf", "model=net1d", "search=net1d", "data=npz",
                        "data.path=signals.npz", "workers=2", "model.channels=8", *TINY, "tracking.log_models=none",
                        "tracking.metrics=[val_f1,val_auroc]",
                        *stores(tmp_path, "signals"), cwd=project)
    assert result.returncode == 0, result.stderr
    assert "maximize val_acc" in result.stdout.splitlines()[0]
    study = load_study(tmp_path, "signals")
    states = [t.state for t in study.trials]
    assert len([s for s in states if s in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]) == 4
    assert optuna.trial.TrialState.FAIL not in states, [t.user_attrs.get("reason") for t in study.trials]
    assert "KeyError" not in result.stderr
    # Every trial ran in a worker, not in this (the parent) process, and each worker imported the user's module.
    workers = {t.user_attrs["worker.pid"] for t in study.trials}
    importers = {int(pid) for pid in imports.read_text().split()}
    assert os.getpid() not in workers and workers <= importers, (workers, importers)
    assert len(importers - {os.getpid()}) == 2, importers  # both workers, whether or not each got a trial
    # the network is the user's: its own keys reach it, the searched technique keys are there
    assert all("model.dropout" in t.params and "optimizer" in t.params for t in study.trials)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("signals").experiment_id],
                              "tags.searchlab.role = 'trial'")
    assert len(runs) == 4 and all("val_f1" in r.data.metrics and "val_auroc" in r.data.metrics for r in runs)


def test_signals_network_beats_the_builtin_mlp(signals_project, in_process):
    """The example's point: the user's 1-D CNN finds the pattern wherever it is; the MLP on raw samples cannot."""
    common = ["data=npz", "data.path=signals.npz", "trainer.max_epochs=6", "optimizer.lr=0.003"]
    net1d = in_process("train", "-cd", "conf", "model=net1d", "model.channels=16", *common, cwd=signals_project)
    mlp = in_process("train", *common, cwd=signals_project)
    assert net1d.returncode == 0 and mlp.returncode == 0, net1d.stderr + mlp.stderr
    assert metrics_line(net1d.stdout)["best_val_acc"] > metrics_line(mlp.stdout)["best_val_acc"] + 0.1


@pytest.mark.slow
def test_regression_example_user_module_and_datamodule_with_two_workers(regression_project, tmp_path, in_process):
    """workers=2: the workers are processes of their own, the parent runs in this one."""
    result = in_process("search", "--config-dir", "conf", "data=diabetes", "module=diabetes", "search=diabetes",
                        "study.metric=val_rmse", "workers=2", "trainer.max_epochs=3", "study.n_trials=4",
                        "report.min_complete=2", "tracking.log_models=none", *stores(tmp_path, "diabetes"),
                        cwd=regression_project)
    assert result.returncode == 0, result.stderr
    assert "minimize val_rmse" in result.stdout.splitlines()[0]
    study = load_study(tmp_path, "diabetes")
    assert study.direction == optuna.study.StudyDirection.MINIMIZE
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert complete and all(20 < t.value < 200 for t in complete)  # RMSE in the target's units (std ~77)
    # the objective is the best epoch's val_rmse: the lowest reported value
    for trial in complete:
        assert trial.value == pytest.approx(min(trial.intermediate_values.values()))
    best = in_process("best", "-cd", "conf", "data=diabetes", "module=diabetes", "search=diabetes",
                      "study.metric=val_rmse", *stores(tmp_path, "diabetes"), cwd=regression_project)
    assert best.returncode == 0, best.stderr
    assert "_target_: diabetes.RegressionModule" in best.stdout
    assert "searchlab train --config-dir conf data=diabetes module=diabetes" in best.stdout  # re-runs as searched


def test_user_module_test_metrics_and_the_template_scheduler_call(regression_project, in_process):
    """`searchlab train` with the user's module: its test_step runs on the DataModule's test split; its
    configure_optimizers calls scheduler(optimizer=...) as lightning-hydra-template does."""
    result = in_process("train", "-cd", "conf", "data=diabetes", "module=diabetes", "study.metric=val_rmse",
                       "scheduler=cosine", "trainer.max_epochs=3", cwd=regression_project)
    assert result.returncode == 0, result.stderr
    metrics = metrics_line(result.stdout)
    assert {"test_rmse", "test_mae", "test_r2", "best_val_rmse"} <= set(metrics)
    assert metrics["lr"] < 1e-3  # cosine moved it


@pytest.mark.ddp
def test_ddp_ranks_import_the_users_network(signals_project):
    """DDP ranks are spawned processes: they find signals.Net1D through the project folder on sys.path."""
    result = searchlab("train", "-cd", "conf", "model=net1d", "model.channels=4", "data=npz", "data.path=signals.npz",
                       "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_epochs=1",
                       cwd=signals_project)
    assert result.returncode == 0, result.stderr
    assert metrics_line(result.stdout)["epochs"] == 1


# --- --config-dir ------------------------------------------------------------------------------------------------

def test_config_dir_option_replaces_a_builtin_option_and_keeps_the_others(tmp_path, in_process):
    conf = tmp_path / "conf" / "model"
    conf.mkdir(parents=True)
    (conf / "mlp.yaml").write_text("_target_: searchlab.networks.MLP\nwidth: 7\ndepth: 1\n")
    best = in_process("train", "-cd", "conf", "trainer.max_epochs=1", cwd=tmp_path)
    assert best.returncode == 0, best.stderr
    shown = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import os
        os.environ["SEARCHLAB_CONFIG_DIR"] = "conf"
        from searchlab.config.compose import compose_config, group_options
        print(compose_config(["model=mlp"]).model.width, compose_config(["model=cnn"]).model.width,
              "cnn" in group_options()["model"])
    """)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert shown.stdout.split() == ["7", "32", "True"], shown.stderr


def test_config_dir_that_does_not_exist_is_one_line(tmp_path):
    result = searchlab("train", "--config-dir", "nope", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.startswith("searchlab: error: --config-dir")
    assert len(result.stderr.splitlines()) == 1


# --- the regressor and npz targets ---------------------------------------------------------------------------------

def test_builtin_regressor_on_float_npz_targets_with_standardize(tmp_path, in_process):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 5)) * [1, 10, 100, 1, 1]
    y = np.stack([x @ [1, 0.1, 0.01, 0, 0], x[:, 3] - x[:, 4]], axis=1) + rng.normal(scale=0.1, size=(300, 2))
    np.savez(tmp_path / "reg.npz", x_train=x[:200], y_train=y[:200], x_val=x[200:250], y_val=y[200:250],
             x_test=x[250:], y_test=y[250:])
    result = in_process("train", "module=regressor", "data=npz", "data.path=reg.npz", "data.standardize=true",
                       "study.metric=val_rmse", "trainer.max_epochs=15", "optimizer.lr=0.01", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    metrics = metrics_line(result.stdout)
    assert {"val_rmse", "val_mae", "val_r2", "test_rmse", "test_r2"} <= set(metrics)
    assert metrics["val_r2"] > 0.8 and metrics["best_val_rmse"] <= metrics["val_rmse"]


# --- study.direction=auto ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("metric", ["val_acc", "val_f1", "val_auroc", "val_r2", "val/acc", "val/acc_best",
                                    "test_f1", "val_top5_accuracy"])
def test_direction_auto_maximizes_scores(metric):
    assert metric_direction(metric) == "maximize"


@pytest.mark.parametrize("metric", ["val_loss", "train_loss", "val_rmse", "val_mae", "val/loss", "val_mse",
                                    "val_error", "epoch_seconds", "params", "val_nll"])
def test_direction_auto_minimizes_losses_and_errors(metric):
    assert metric_direction(metric) == "minimize"


def test_direction_auto_word_tables_do_not_overlap():
    assert not set(MAXIMIZED_WORDS) & set(MINIMIZED_WORDS)


def test_direction_auto_on_an_unknown_name_asks_for_an_explicit_direction(tmp_path, in_process):
    project = tmp_path / "p"
    (project / "conf" / "module").mkdir(parents=True)
    (project / "mymod.py").write_text(MODULE_LOGGING.format(names='"val_wobble"'))
    (project / "conf" / "module" / "mine.yaml").write_text("_target_: mymod.Mine\n")
    args = ["search", "-cd", "conf", "module=mine", "search=schedule", "study.metric=val_wobble", *TINY,
            *stores(tmp_path, "w")]
    refused = in_process(*args, cwd=project)
    assert refused.returncode == 2 and "study.direction=maximize" in refused.stderr, refused.stderr
    chosen = in_process(*args, "study.direction=minimize", "study.n_trials=1", cwd=project)
    assert chosen.returncode == 0, chosen.stderr
    assert "minimize val_wobble (study.direction=minimize)" in chosen.stdout.splitlines()[0]


def test_val_loss_with_auto_direction_minimizes_and_picks_the_lowest(tmp_path, in_process):
    result = in_process("search", "study.metric=val_loss", "search=schedule", "optimizer=adam", *TINY,
                       *stores(tmp_path, "loss"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    study = load_study(tmp_path, "loss")
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert study.direction == optuna.study.StudyDirection.MINIMIZE
    assert study.best_trial.value == min(t.value for t in complete)


# --- bad input only a built module or dataset reveals ------------------------------------------------------------

MODULE_LOGGING = '''
import torch
import pytorch_lightning as pl
import torch.nn.functional as F


class Mine(pl.LightningModule):
    def __init__(self, net, optimizer, scheduler=None):
        super().__init__()
        self.net, self.make_optimizer = net, optimizer

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        for name in [{names}]:
            self.log(name, F.cross_entropy(self.net(x), y))

    def configure_optimizers(self):
        return self.make_optimizer(params=self.parameters())
'''

NET_WRONG_OUTPUTS = '''
from torch import nn


def make(input_shape, num_outputs):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, num_outputs + 3))
'''

NOT_CALLABLE = "NET = 3\n"


def test_target_that_does_not_import_is_named_with_a_near_name(bad):
    line = bad({"nets.py": NET_WRONG_OUTPUTS, "conf/model/x.yaml": "_target_: nets.mkae\n"}, "model=x", command=True)
    assert "model._target_" in line and "did you mean 'nets.make'" in line


def test_target_module_that_does_not_exist(bad):
    line = bad({"conf/model/x.yaml": "_target_: nowhere.Net\n"}, "model=x")
    assert "model._target_" in line and "nowhere" in line


def test_target_that_is_not_callable(bad):
    line = bad({"nets.py": NOT_CALLABLE, "conf/model/x.yaml": "_target_: nets.NET\n"}, "model=x")
    assert "model._target_" in line and "not a class or function" in line


def test_constructor_arguments_it_rejects(bad):
    line = bad({"conf/model/x.yaml": "_target_: searchlab.networks.MLP\nwidht: 3\n"}, "model=x")
    assert "model:" in line and "widht" in line and "did you mean 'model.width'" in line


def test_network_whose_output_does_not_fit_num_outputs(bad):
    line = bad({"nets.py": NET_WRONG_OUTPUTS, "conf/model/x.yaml": "_target_: nets.make\n"}, "model=x",
               "search=schedule")
    assert line.startswith("searchlab: error: model:") and "outputs of shape (13,)" in line and "10 classes" in line


def test_module_that_never_logs_the_metric_suggests_what_it_logs(bad):
    line = bad({"mymod.py": MODULE_LOGGING.format(names='"val_accuracy"'),
                "conf/module/mine.yaml": "_target_: mymod.Mine\n"}, "module=mine", "search=schedule")
    assert "study.metric" in line and "never logs 'val_acc'" in line and "study.metric=val_accuracy" in line


def test_builtin_metric_misspelt(bad):
    line = bad({}, "study.metric=val_acx", "study.direction=maximize")
    assert "did you mean study.metric=val_acc" in line


def test_cnn_on_data_that_is_not_image_shaped(bad):
    line = bad({}, "model=cnn", "data=synthetic")
    assert line.startswith("searchlab: error: model:") and "image-shaped" in line


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04truncated"], ids=["empty", "truncated"])
def test_empty_or_truncated_npz(bad, tmp_path, content):
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "x.npz").write_bytes(content)
    line = bad({}, "data=npz", "data.path=x.npz")
    assert "data.path" in line and "x.npz" in line


def _npz(path: Path, y: np.ndarray) -> None:
    x = np.random.default_rng(0).normal(size=(len(y), 4)).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x_train=x, y_train=y, x_val=x[:20], y_val=y[:20])


def test_float_targets_given_to_the_classifier(bad, tmp_path):
    _npz(tmp_path / "project" / "x.npz", np.random.default_rng(0).normal(size=100))
    line = bad({}, "data=npz", "data.path=x.npz")
    assert "module=regressor" in line and "floats" in line


def test_integer_labels_that_look_like_a_regression_target(bad, tmp_path):
    _npz(tmp_path / "project" / "x.npz", np.arange(300) % 150)  # 150 classes, 2 samples each
    line = bad({}, "data=npz", "data.path=x.npz")
    assert "module=regressor" in line and "150 classes" in line


# --- responsiveness: the heavy packages wait for a config that passed its checks ---------------------------------

def test_help_and_composition_errors_do_not_import_torch(tmp_path):
    probe = textwrap.dedent("""
        import sys
        from searchlab.cli import main
        code = main(["train", "model.widht=3"])
        try:
            main(["--help"])
        except SystemExit:
            pass
        print(code, [m for m in ("torch", "pytorch_lightning", "mlflow", "optuna") if m in sys.modules])
    """)
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.stdout.strip().splitlines()[-1] == "2 []", result.stdout + result.stderr
    assert "did you mean 'model.width'" in result.stderr


# --- the Python API from a plain script ------------------------------------------------------------------------

@pytest.mark.slow
def test_python_api_from_a_plain_script(signals_project, tmp_path):
    script = tmp_path / "tune.py"
    script.write_text(textwrap.dedent(f"""
        import searchlab

        study = searchlab.search(["model=net1d", "search=net1d", "data=npz", "data.path=signals.npz",
                                  "model.channels=8", "trainer.max_epochs=2", "study.n_trials=3",
                                  "report.min_complete=2", *{stores(tmp_path, "api")!r}], config_dir="conf")
        print("best", study.best_trial.number, study.best_value)
        result = searchlab.train(["model=net1d", "data=npz", "data.path=signals.npz", "model.channels=8",
                                  "trainer.max_epochs=2"], config_dir="conf", quiet=True)
        print("module", type(result.module).__name__, type(result.module.net).__name__, len(result.history))
        try:
            searchlab.train(["optimizer=adamm"])
        except searchlab.ConfigError as err:
            print("error", err)
    """))
    result = subprocess.run([sys.executable, str(script)], cwd=signals_project, capture_output=True, text=True,
                            timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(re.match(r"best \d+ 0\.\d+", line) for line in lines)
    assert "module Classifier Net1D 2" in lines
    assert any(line.startswith("error optimizer: unknown option 'adamm' (did you mean optimizer=adam?")
               for line in lines)


# --- the docs' contract example (docs/own-code.md), as written -------------------------------------------------------

EXAMPLE_IMPORT = "import pytorch_lightning as pl"


@pytest.mark.slow
@pytest.mark.parametrize("package", ["pytorch_lightning", "lightning.pytorch"])
def test_docs_contract_example_runs_as_written(tmp_path, in_process, package):
    """The example as docs/own-code.md writes it, and with its import switched to `lightning` as its comment says:
    each trains with its own package's Trainer (the other's refuses its module)."""
    page = (REPO / "docs" / "own-code.md").read_text()
    example = page.split("<!-- contract-example -->", 1)[1].split("<!-- /contract-example -->", 1)[0]
    blocks = re.findall(r"```(\w+)\n(.*?)```", example, flags=re.S)
    project = tmp_path / "myproject"
    written = []
    for language, text in blocks:
        first = text.splitlines()[0]
        if language in ("python", "yaml") and first.startswith("# ") and "." in first:
            path = project / first[2:].strip()
            path.parent.mkdir(parents=True, exist_ok=True)
            if language == "python":
                (line,) = [line for line in text.splitlines() if line.startswith(EXAMPLE_IMPORT)]
                assert f"import {package} as pl" in line  # the page names both ways on the import's line
                text = text.replace(line, f"import {package} as pl")
            path.write_text(text)
            written.append(path.name)
    assert written == ["mymodels.py", "tiny.yaml", "lit.yaml", "tiny.yaml"]
    (command,) = [text.strip() for language, text in blocks if language == "shell"]
    words = command.split()
    assert words[:2] == ["searchlab", "search"]
    result = in_process(*words[1:], "trainer.max_epochs=2", "study.n_trials=3", "report.min_complete=2",
                       *stores(tmp_path, "tiny"), cwd=project)
    assert result.returncode == 0, result.stderr
    study = load_study(tmp_path, "tiny")
    assert len(study.trials) == 3 and all(t.state != optuna.trial.TrialState.FAIL for t in study.trials)
    assert all("module.label_smoothing" in t.params for t in study.trials)
