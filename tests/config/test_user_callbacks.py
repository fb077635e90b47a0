"""trainer.callbacks: the user's own Lightning callbacks beside searchlab's, of the training's package; what they log
reaches the run per epoch; those that would fight searchlab's own (checkpoints, early stopping) are one-line errors."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
from helpers import LIT, load_study, stores
from mlflow.tracking import MlflowClient

from searchlab import commands
from searchlab.cli import main


class CountEpochs(pl.Callback):
    """A callback of the user's: counts the training epochs it sees (one class-level list per test)."""

    seen: list[int] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        CountEpochs.seen.append(trainer.current_epoch + 1)


def test_train_runs_the_users_callbacks_beside_searchlabs_and_keeps_what_they_log():
    """A mapping (lightning-hydra-template's callbacks group), pytorch_lightning's for the built-in classifier: the
    user's callback runs every epoch, LearningRateMonitor's lr-Adam is in each epoch's metrics (the cosine schedule
    moves it), and searchlab's own per-epoch metrics are still there."""
    CountEpochs.seen = []
    result = commands.train(["trainer.max_epochs=3", "model.width=32", "scheduler=cosine",
                             "+trainer.callbacks.lr._target_=pytorch_lightning.callbacks.LearningRateMonitor",
                             f"+trainer.callbacks.count._target_={__name__}.CountEpochs"], quiet=True)
    assert CountEpochs.seen == [1, 2, 3]
    rates = [m["lr-Adam"] for m in result.history]
    assert len(rates) == 3 and rates[0] == pytest.approx(1e-3) and rates[0] > rates[1] > rates[2]
    assert all("val_acc" in m and "epoch_seconds" in m for m in result.history)


def test_a_search_with_a_list_of_lightning_callbacks_logs_them_per_epoch(lit_project, tmp_path, in_process):  # noqa: F811
    """A list, lightning.pytorch's LearningRateMonitor for a module written with `import lightning`: its values are
    in each trial's MLflow run, one per epoch."""
    callbacks = "trainer.callbacks=[{_target_:lightning.pytorch.callbacks.LearningRateMonitor}]"
    result = in_process("search", *LIT, "study.n_trials=1", "trainer.max_epochs=2", "study.pruner=none",
                        "optimizer=adam", callbacks, "tracking.log_models=none", "report.min_complete=1",
                        *stores(tmp_path, "callbacks"), cwd=lit_project)
    assert result.returncode == 0, result.stderr
    (trial,) = load_study(tmp_path, "callbacks").trials
    history = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_metric_history(trial.user_attrs["mlflow_run_id"],
                                                                                  "lr-Adam")
    assert [m.step for m in history] == [1, 2]


@pytest.mark.parametrize(("override", "message"), [
    ("+trainer.callbacks.ckpt._target_=pytorch_lightning.callbacks.ModelCheckpoint",
     "trainer.callbacks.ckpt: pytorch_lightning.callbacks.ModelCheckpoint writes checkpoints, but searchlab writes and "
     "resumes the trial's own; remove it and set trainer.checkpoint_every_n_epochs=N instead"),
    ("trainer.callbacks=[{_target_:pytorch_lightning.callbacks.EarlyStopping,monitor:val_loss}]",
     "trainer.callbacks[0]: pytorch_lightning.callbacks.EarlyStopping would stop trials on its own rule; remove it and "
     "set trainer.early_stopping_patience=N (it stops on study.metric, the value the study optimizes)"),
    ("+trainer.callbacks.lr._target_=lightning.pytorch.callbacks.LearningRateMonitor",
     "trainer.callbacks.lr: lightning.pytorch.callbacks.LearningRateMonitor is a lightning.pytorch callback, but this "
     "training uses pytorch_lightning (the package of the module); take it from pytorch_lightning.callbacks"),
    ("+trainer.callbacks.odd._target_=collections.OrderedDict",
     "trainer.callbacks.odd: collections.OrderedDict is not a Lightning Callback"),
    ("+trainer.callbacks.typo._target_=pytorch_lightning.callbacks.LearningRateMonitr",
     "did you mean 'pytorch_lightning.callbacks.LearningRateMonitor'?"),
    ("trainer.callbacks=3", "trainer.callbacks: expected a list or a mapping of entries with _target_"),
    ("trainer.callbacks=[lr]", "trainer.callbacks[0]: expected an entry with _target_"),
])
def test_callbacks_that_cannot_join_searchlabs_are_one_line(override, message, capsys, tmp_path, store_overrides):
    assert main(["search", override, *store_overrides]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and message in lines[0], captured.err
    assert not (tmp_path / "optuna.journal").exists() and not (tmp_path / "artifacts").exists()
