"""A lone trial on the packing engine (trainer.engine=auto, searchlab.packing.lone): where it applies, it trains what
Lightning trains; where it does not, fit() goes to Lightning; its checkpoints resume as Lightning's do.

Tolerance as test_pack.py: float32 on the CPU, the same batches from the same initial weights; per-epoch losses
within 1e-5 relative (1e-6 absolute), learning rates as exactly, accuracy within one flipped prediction.
"""

from __future__ import annotations

import signal

import pytest
import torch
from omegaconf import open_dict
from test_pack import _same

from searchlab.config import Composer, ConfigError, compose_config, validate_config
from searchlab.modules import Classifier
from searchlab.packing.lone import ENGINE_KEY, lone_pack
from searchlab.packing.lone import fit_alone as fit
from searchlab.training.checkpoints import CHECKPOINT_FILE, CheckpointPlan, read_saved
from searchlab.training.lightning import fit_rank

BASE = ["trainer.max_epochs=4", "trainer.limit_train_batches=6", "model.width=32", "model.dropout=0.0",
        "tracking.metrics=[val_f1,val_auroc]"]
pytestmark = pytest.mark.usefixtures("one_thread")

# One of each family, and the schedules whose stepping differs most (per step, on a metric, with warm-up).
CONFIGS = [
    {"optimizer": "adam", "scheduler": "onecycle"},
    {"optimizer": "rmsprop", "scheduler": "plateau", "scheduler.patience": 0, "scheduler.mode": "max"},
    {"optimizer": "nesterov", "scheduler": "warmup_cosine", "scheduler.warmup_epochs": 1},
    {"optimizer": "adamw", "scheduler": "step", "scheduler.step_size": 1, "module.l1": 1e-4, "data.batch_size": 1},
    # batch norm: torch's own kernel on the member's channels, running statistics included (the module's weights)
    {"optimizer": "momentum", "scheduler": "cosine", "model.batch_norm": True, "model.depth": 3},
]


@pytest.mark.parametrize("values", CONFIGS, ids=lambda v: f"{v['optimizer']}-{v['scheduler']}"
                         + ("-bn" if v.get("model.batch_norm") else ""))
def test_fit_trains_a_lone_builtin_trial_on_the_engine_as_lightning_does(composer: Composer, digits, values) -> None:
    cfg = composer(values)
    assert lone_pack(cfg, digits, None, None) is not None
    engine = fit(cfg, digits, test=True)
    lightning = fit_rank(cfg, digits, test=True)
    _same(engine.history, lightning.history)
    assert engine.best_epoch == lightning.best_epoch
    assert engine.test.keys() == lightning.test.keys()
    assert engine.test["test_loss"] == pytest.approx(lightning.test["test_loss"], rel=1e-5, abs=1e-6)
    # The trained module, with its best epoch's weights, as `searchlab.train()` returns it.
    assert engine.module is not None
    # Weights within 1e-4: the engine multiplies W @ h where nn.Linear does h @ W^T (the same products summed in
    # another order), and batch norm divides by a batch's deviation, which carries that rounding into the weights
    # (the depth-3 batch-norm config: up to 6e-5 after 24 steps; a wrong update is off by 1e-2 and more).
    for name, value in lightning.module.state_dict().items():
        assert engine.module.state_dict()[name].allclose(value, rtol=1e-4, atol=1e-4), name


@pytest.mark.parametrize("values", [
    {"trainer.engine": "lightning"},
    {"model": "cnn"},
    {"trainer.max_time": "00:00:10:00"},
    {"trainer.early_stopping_patience": 2},
    {"trainer.devices": 2},
], ids=lambda v: next(iter(v)))
def test_what_the_engine_has_not_goes_to_lightning(composer: Composer, digits, values) -> None:
    assert lone_pack(composer(values), digits, None, None) is None


def test_a_user_module_or_callbacks_or_a_datamodule_go_to_lightning(composer: Composer, digits) -> None:
    cfg = composer({})
    assert lone_pack(cfg, None, None, None) is None  # a LightningDataModule: no resident data
    with open_dict(cfg):
        cfg.trainer.callbacks = [{"_target_": "pytorch_lightning.callbacks.LearningRateMonitor"}]
    assert lone_pack(cfg, digits, None, None) is None
    own = composer({})
    with open_dict(own):
        own.module._target_ = f"{__name__}.OwnClassifier"  # not searchlab's own class: its steps may differ
    assert lone_pack(own, digits, None, None) is None


class OwnClassifier(Classifier):
    """A user's subclass of the built-in classifier."""


def interrupt_at(epoch: int):
    def hook(number: int, metrics: dict[str, float]) -> None:
        if number == epoch:
            raise KeyboardInterrupt

    return hook


def test_an_engine_checkpoint_resumes_the_trial_as_if_uninterrupted(composer: Composer, digits, tmp_path) -> None:
    # Dropout: the RNG state must come back with the checkpoint for the masks to go on as they would have.
    cfg = composer({"optimizer": "adam", "scheduler": "onecycle", "model.dropout": 0.3})
    whole = fit(cfg, digits)
    plan = CheckpointPlan(tmp_path / CHECKPOINT_FILE, every=1, auto_seconds=1e9, owner={"trial": 3})
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, digits, interrupt_at(3), checkpoint=plan)
    saved = read_saved(plan.path)  # the record Lightning's checkpoints have: the study reads either kind
    assert saved is not None and saved.epoch == 2 and saved.owner == {"trial": 3}
    trained: list[int] = []
    resumed = fit(cfg, digits, lambda epoch, metrics: trained.append(epoch),
                  checkpoint=CheckpointPlan(plan.path, every=1, auto_seconds=1e9, resume=True))
    assert trained == [3, 4]
    _same(resumed.history, whole.history)
    assert resumed.best_epoch == whole.best_epoch


def test_a_lightning_checkpoint_is_resumed_by_lightning(composer: Composer, digits, tmp_path) -> None:
    cfg = composer({"optimizer": "adam"})
    plan = CheckpointPlan(tmp_path / CHECKPOINT_FILE, every=1, auto_seconds=1e9)
    with pytest.raises(SystemExit):  # Lightning's way out of a KeyboardInterrupt
        fit_rank(cfg, digits, interrupt_at(3), checkpoint=plan)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Lightning ignores SIGINT after one
    resume = CheckpointPlan(plan.path, every=1, auto_seconds=1e9, resume=True)
    assert lone_pack(cfg, digits, None, resume) is None
    assert ENGINE_KEY not in torch.load(plan.path, weights_only=False)
    assert len(fit(cfg, digits, checkpoint=resume).history) == 4


def test_auto_checkpoints_on_the_engine_only_trials_that_trained_long_enough(composer: Composer, digits,
                                                                             tmp_path) -> None:
    cfg = composer({})
    short = CheckpointPlan(tmp_path / "short" / CHECKPOINT_FILE, every=None, auto_seconds=3600)
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, digits, interrupt_at(3), checkpoint=short)
    assert not short.path.exists()
    kept = CheckpointPlan(tmp_path / "kept" / CHECKPOINT_FILE, every=None, auto_seconds=0.0)
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, digits, interrupt_at(3), checkpoint=kept)
    assert read_saved(kept.path).epoch == 2


def test_a_misspelt_engine_names_its_key() -> None:
    with pytest.raises(ConfigError, match=r"trainer.engine: .*did you mean trainer.engine=lightning\?"):
        validate_config(compose_config(["trainer.engine=ligthning"]))
