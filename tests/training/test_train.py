"""Real short trainings: every optimizer and schedule, the regimes, the models, determinism, device choice."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from searchlab.config.compose import Composer, ConfigError, group_options, validate_config
from searchlab.data import TensorBatches
from searchlab.packing.lone import fit_lone, lone_pack
from searchlab.training import fit
from searchlab.training.build import load_data
from searchlab.training.lightning import resolve_device, resolve_precision

OPTIMIZERS = group_options()["optimizer"]
SCHEDULERS = group_options()["scheduler"]

BASE = ["trainer.max_epochs=3"]


def test_the_seed_optimizers_and_schedules_are_all_there():
    assert {"sgd", "momentum", "nesterov", "rmsprop", "adam", "adamw"} <= set(OPTIMIZERS)
    assert {"constant", "step", "exponential", "cosine", "onecycle", "plateau", "warmup_cosine"} <= set(SCHEDULERS)


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_every_optimizer_learns(composer, digits, optimizer):
    result = fit(composer({"optimizer": optimizer}), digits)
    assert len(result.history) == 3
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert result.best("val_acc", "maximize") > 0.5  # ten classes: chance is 0.1


def _expected_lrs(scheduler: str, lr: float, epochs: int, val_losses: list[float]) -> list[float] | None:
    """The lr after each epoch's schedule step, from the schedule's formula and conf/scheduler/<name>.yaml's values
    (written out here, not taken from torch: the test checks that each schedule runs as its YAML says)."""
    def cosine(step: int, span: int, low: float) -> float:
        return low + (lr - low) * (1 + math.cos(math.pi * step / span)) / 2

    after = range(1, epochs + 1)  # the lr is read at an epoch's end, after that epoch's schedule step
    if scheduler == "constant":
        return [lr] * epochs
    if scheduler == "step":  # step_size 5, gamma 0.5
        return [lr * 0.5 ** (e // 5) for e in after]
    if scheduler == "exponential":  # gamma 0.9
        return [lr * 0.9 ** e for e in after]
    if scheduler == "cosine":  # over max_epochs, down to lr * 0.01
        return [cosine(e, epochs, lr * 0.01) for e in after]
    if scheduler == "warmup_cosine":  # 2 warmup epochs from lr * 0.1, then cosine over the rest down to lr * 0.01
        return [lr * (0.1 + 0.9 * e / 2) if e < 2 else cosine(e - 2, epochs - 2, lr * 0.01) for e in after]
    if scheduler == "plateau":  # halve the lr once val_loss has not improved (by 1e-4, relative) for 2 more epochs
        return _plateau_lrs(lr, val_losses, patience=2)
    return None  # onecycle steps every batch: its shape is checked instead


def _plateau_lrs(lr: float, val_losses: list[float], patience: int) -> list[float]:
    """ReduceLROnPlateau (mode min, factor 0.5, threshold 1e-4 relative) on these val_losses. Lightning steps it on
    the epoch's val_loss after the epoch's lr is read, so each epoch's lr shows the decisions up to the epoch before."""
    lrs, best, bad = [], math.inf, 0
    for loss in val_losses:
        lrs.append(lr)
        best, bad = (loss, 0) if loss < best * (1 - 1e-4) else (best, bad + 1)
        if bad > patience:
            lr, bad = lr * 0.5, 0
    return lrs


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_every_schedule_trains_and_moves_the_lr_as_it_should(composer, digits, scheduler):
    cfg = composer({"scheduler": scheduler, "trainer.max_epochs": 6, "optimizer.lr": 0.01})
    result = fit(cfg, digits)
    lrs = [m["lr"] for m in result.history]
    assert len(lrs) == 6 and all(math.isfinite(m["val_loss"]) for m in result.history)
    expected = _expected_lrs(scheduler, 0.01, 6, [m["val_loss"] for m in result.history])
    if expected is not None:
        assert lrs == pytest.approx(expected, rel=1e-9), scheduler
    else:  # one cycle: up from lr / 25 to its peak at 30% of the steps (in epoch 2 of 6), then down below the start
        assert scheduler == "onecycle"
        assert lrs[0] < lrs[1] and all(a > b for a, b in zip(lrs[1:], lrs[2:], strict=False))
        assert 0.9 * 0.01 < lrs[1] <= 0.01 and lrs[-1] < 0.01 / 25


def test_plateau_halves_the_lr_when_val_loss_stalls(composer, digits):
    """With patience 0, on a run whose val_loss does not fall every epoch: the schedule must act (the check above
    would pass on a plateau schedule that never reduced)."""
    cfg = composer({"scheduler": "plateau", "scheduler.patience": 0, "trainer.max_epochs": 6, "optimizer.lr": 0.05})
    history = fit(cfg, digits).history
    expected = _plateau_lrs(0.05, [m["val_loss"] for m in history], patience=0)
    assert [m["lr"] for m in history] == pytest.approx(expected, rel=1e-9)
    assert expected[-1] < 0.05, [m["val_loss"] for m in history]  # it did halve


def test_same_config_and_seed_give_the_same_metrics(composer, digits):
    cfg = composer({"optimizer": "nesterov", "model.dropout": 0.3, "module.l1": 1e-5, "model.batch_norm": True})
    def without_clock(history: list[dict[str, float]]) -> list[dict[str, float]]:  # epoch_seconds is a clock reading
        return [{k: v for k, v in m.items() if k != "epoch_seconds"} for m in history]

    first = without_clock(fit(cfg, digits).history)
    assert first == without_clock(fit(cfg, digits).history)
    other = composer({"optimizer": "nesterov", "model.dropout": 0.3, "module.l1": 1e-5, "model.batch_norm": True,
                      "seed": 1})
    another = without_clock(fit(other, digits).history)
    # Another seed, another training: other initial weights, shuffles and dropout masks, so other losses. (Compared
    # without the clock: epoch_seconds alone would make any two histories differ.)
    assert [m["train_loss"] for m in another] != [m["train_loss"] for m in first]
    assert [m["val_loss"] for m in another] != [m["val_loss"] for m in first]


def test_regimes_full_batch_stochastic_and_mini_batch(composer, digits):
    full = fit(composer({"data.batch_size": "full"}), digits)
    stochastic = fit(composer({"data.batch_size": 1, "trainer.limit_train_batches": 20}), digits)
    mini = fit(composer({"data.batch_size": 32}), digits)
    assert all(len(r.history) == 3 for r in (full, stochastic, mini))
    # Full batch: one step per epoch, so it learns least in three epochs.
    assert full.best("val_acc", "maximize") < mini.best("val_acc", "maximize")


@pytest.mark.parametrize("engine", ["lightning", "auto"])
def test_stochastic_steps_are_bounded_by_the_step_budget(composer, digits, engine):
    values = {"data.batch_size": 1, "trainer.limit_train_batches": 30, "trainer.max_epochs": 2}
    cfg = composer({**values, "trainer.engine": engine})
    seen = []
    # one optimizer step per sample, 30 a epoch (the step budget), not one per training sample (~1 400 here)
    if engine == "lightning":
        result = fit(cfg, digits, on_epoch=lambda epoch, m: seen.append(epoch))
        steps = result.module.trainer.global_step
    else:  # the packing engine (searchlab.packing.lone): its optimizer counts its steps
        pack = lone_pack(cfg, digits, None, None)
        fit_lone(pack, cfg, on_epoch=lambda epoch, m: seen.append(epoch))
        steps = pack.optimizer.groups[0][2].steps
    assert seen == [1, 2] and steps == 2 * 30


def test_cnn_with_batch_norm_dropout_and_l1(composer, digits):
    cfg = composer({"model": "cnn", "model.width": 8, "model.batch_norm": True, "model.dropout": 0.2,
                    "module.l1": 1e-4})
    assert fit(cfg, digits).best("val_acc", "maximize") > 0.3


def test_cnn_refuses_vector_data(composer):
    cfg = composer({"model": "cnn", "data": "synthetic"})
    with pytest.raises(ConfigError, match="model: searchlab.networks.CNN: ValueError: needs image-shaped"):
        fit(cfg, load_data(cfg))


def test_batch_norm_with_batch_one_is_refused(composer, digits):
    with pytest.raises(ValueError, match="batch_size > 1"):
        fit(composer({"model.batch_norm": True, "data.batch_size": 1}), digits)


def test_divergence_stops_training_with_a_reason(composer, digits):
    result = fit(composer({"optimizer": "sgd", "optimizer.lr": 1e6, "trainer.max_epochs": 5}), digits)
    assert result.stop_reason and "diverged" in result.stop_reason
    assert len(result.history) < 5


def test_hook_can_stop_training(composer, digits):
    result = fit(composer({"trainer.max_epochs": 5}), digits, on_epoch=lambda e, m: "enough" if e == 2 else None)
    assert result.stop_reason == "enough" and len(result.history) == 2


def test_test_split_only_when_asked(composer, digits):
    assert fit(composer({}), digits).test == {}
    assert set(fit(composer({}), digits, test=True).test) == {"test_loss", "test_acc"}
    asked = composer({"tracking.metrics": ["val_f1", "val_auroc"]})
    assert set(fit(asked, digits, test=True).test) == {"test_loss", "test_acc", "test_f1", "test_auroc"}


def test_f1_and_auroc_are_computed_only_when_the_run_reads_them(composer, digits):
    """The classifier's costly metrics: by default neither; each when study.metric, tracking.metrics or
    ablate.test_metric names it; all of them for a module entry without `metrics` (a user's YAML naming the
    class); the metrics computed have the same values whichever others are."""
    cheap = {"train_loss", "val_loss", "val_acc", "lr", "params", "epoch_seconds"}
    runs = {
        "default": ({}, set()),
        "study.metric": ({"study.metric": "val_auroc"}, {"val_auroc"}),
        "both objectives": ({"study.metric": ["val_f1", "params"], "study.direction": ["maximize", "minimize"]},
                            {"val_f1"}),
        "tracking.metrics": ({"tracking.metrics": ["val_f1", "val_auroc"]}, {"val_f1", "val_auroc"}),
        "ablate.test_metric": ({"ablate.test_metric": "test_f1"}, {"val_f1"}),
        "no metrics key": ({"module.metrics": None}, {"val_f1", "val_auroc"}),
    }
    histories = {}
    for name, (values, extra) in runs.items():
        histories[name] = fit(composer({"trainer.max_epochs": 1, **values}), digits).history[0]
        assert set(histories[name]) == cheap | extra, name
    for name, history in histories.items():
        for metric in ("val_loss", "val_acc", "val_f1", "val_auroc"):
            if metric in history:
                assert history[metric] == histories["no metrics key"][metric], (name, metric)


def test_tracking_metrics_must_be_a_list_of_names():
    cfg = Composer(["tracking.metrics=val_f1"]).base
    with pytest.raises(ConfigError, match=r"^tracking.metrics: expected a list of metric names.*got 'val_f1'$"):
        validate_config(cfg)


def test_synthetic_data_is_configurable(composer):
    cfg = composer({"data": "synthetic", "data.size": 500, "data.features": 8, "data.informative": 4,
                    "data.classes": 3})
    splits = load_data(cfg)
    assert splits.sample_shape == (8,) and splits.num_outputs("classification") == 3
    assert len(splits.x_train) + len(splits.x_val) + len(splits.x_test) == 500
    assert fit(cfg, splits).best("val_acc", "maximize") > 0.4


def test_npz_data_with_images_and_without_test(composer, tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "mine.npz"
    np.savez(path, x_train=rng.normal(size=(64, 6, 6)), y_train=rng.integers(0, 3, 64),
             x_val=rng.normal(size=(16, 6, 6)), y_val=rng.integers(0, 3, 16))
    cfg = composer({"data": "npz", "data.path": str(path), "model": "cnn", "model.width": 4})
    splits = load_data(cfg)
    assert splits.sample_shape == (1, 6, 6) and splits.x_test is None and splits.num_outputs("classification") == 3
    assert len(fit(cfg, splits, test=True).history) == 3


def test_the_same_relative_path_from_another_folder_or_rewritten_loads_that_file(composer, tmp_path, monkeypatch):
    """The data cache (one dataset per process) knows which file a relative data.path names from here, and its
    version: a long process (the Python API) that changes folder, or a rewritten file, gets the file's own data."""
    def write(folder, rows: int) -> None:
        folder.mkdir(exist_ok=True)
        np.savez(folder / "d.npz", x_train=np.eye(rows, 3), y_train=np.arange(rows) % 2,  # rows differ: data to learn
                 x_val=np.zeros((4, 3)), y_val=np.arange(4) % 2)

    write(tmp_path / "a", 8)
    write(tmp_path / "b", 12)
    cfg = composer({"data": "npz", "data.path": "d.npz"})
    monkeypatch.chdir(tmp_path / "a")
    assert len(load_data(cfg).x_train) == 8
    monkeypatch.chdir(tmp_path / "b")
    assert len(load_data(cfg).x_train) == 12
    write(tmp_path / "b", 20)
    assert len(load_data(cfg).x_train) == 20


def test_npz_missing_arrays_are_named(composer, tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, x_train=np.zeros((4, 2)), y_train=np.zeros(4, dtype=int))
    cfg = composer({"data": "npz", "data.path": str(path)})
    with pytest.raises(ConfigError, match="lacks x_val, y_val"):
        load_data(cfg)


def test_tensor_batches_cover_every_sample_once_per_epoch():
    x = torch.arange(10.0)[:, None]
    batches = TensorBatches(x, torch.arange(10), batch_size=4, shuffle=True, seed=0)
    assert len(batches) == 3
    first = torch.cat([b[1] for b in batches])
    second = torch.cat([b[1] for b in batches])
    assert sorted(first.tolist()) == list(range(10)) and first.tolist() != second.tolist()
    # A trailing batch of one sample is dropped when batches are larger (BatchNorm cannot train on it).
    assert len(TensorBatches(torch.zeros(9, 1), torch.zeros(9), batch_size=4, shuffle=False)) == 2


def test_device_choice_with_and_without_cuda():
    assert resolve_device("auto", cuda_available=False) == torch.device("cpu")
    assert resolve_device("auto", cuda_available=True) == torch.device("cuda", 0)
    assert resolve_device("cpu", cuda_available=True) == torch.device("cpu")
    with pytest.raises(ConfigError, match="trainer.accelerator"):
        resolve_device("gpu", cuda_available=False)
    assert resolve_precision("auto", torch.device("cpu")) == "32-true"
    assert resolve_precision("16-mixed", torch.device("cpu")) == "16-mixed"


@pytest.mark.parametrize("ties", [False, True])
def test_macro_auroc_equals_torchmetrics(ties):
    from torchmetrics.functional.classification import multiclass_auroc

    from searchlab.modules import macro_auroc

    generator = torch.Generator().manual_seed(int(ties))
    scores = torch.randn(300, 7, generator=generator)
    if ties:
        scores = (scores * 2).round()  # many tied scores
    probabilities, targets = scores.softmax(1), torch.randint(0, 7, (300,), generator=generator)
    expected = multiclass_auroc(probabilities, targets, 7, average="macro")
    assert float(macro_auroc(probabilities, targets)) == pytest.approx(float(expected), abs=1e-6)
