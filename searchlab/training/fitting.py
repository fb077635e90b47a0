"""One configuration trained, on one device or over DDP ranks, and the check of a config before a study.

This sits above searchlab.training.lightning (one process) and searchlab.training.ddp (ranks that each run it), so
neither imports the other's caller.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

import torch
from omegaconf import DictConfig

from searchlab.config import ConfigError
from searchlab.data import Splits
from searchlab.training.build import load_data, module_task
from searchlab.training.checkpoints import CheckpointPlan
from searchlab.training.data_checks import check_first_batch, data_source
from searchlab.training.ddp import fit_ddp
from searchlab.training.lightning import EpochHook, TrainResult, fit_rank, resolve_device

# A classifier's labels look like a regression target when there are this many classes or more and the training split
# has fewer than _FEW samples of a class on average: a classifier cannot learn a class from a handful of examples.
_MANY_CLASSES, _FEW = 50, 5


def fit(cfg: DictConfig, splits: Splits | None, on_epoch: EpochHook | None = None, test: bool = False,
        metric: str | None = None, checkpoint: CheckpointPlan | None = None) -> TrainResult:
    """Trains cfg on splits (on the training device; None for a LightningDataModule `data`). With trainer.devices > 1
    the training runs in DDP ranks spawned for this call; on_epoch still runs here, in the caller's process.
    `checkpoint`: where the trial's checkpoints go and whether it resumes from one (searchlab.training.checkpoints)."""
    if cfg.trainer.devices > 1:
        cuda = resolve_device(cfg.trainer.accelerator).type == "cuda"
        return fit_ddp(cfg, splits, on_epoch, test, metric=metric, cuda=cuda, checkpoint=checkpoint)
    return fit_rank(cfg, splits, on_epoch, test, metric=metric, checkpoint=checkpoint)


def check_targets(splits: Splits, task: str) -> None:
    """Targets that do not fit the module: float targets for a classifier, or integer labels that look like a
    regression target (many classes, few samples each)."""
    if task != "classification":
        return
    if not splits.integer_targets:
        raise ConfigError("data: the targets are floats (a regression target) but module=classifier trains on class "
                          "indices; use module=regressor, or give integer labels")
    classes = splits.num_outputs(task)
    per_class = len(splits.y_train) / classes
    if classes >= _MANY_CLASSES and per_class < _FEW:
        raise ConfigError(f"data: {classes} classes with {per_class:.1f} training samples each on average look like "
                          "a regression target, not class labels; use module=regressor (or store labels 0..K-1)")


def _check_outputs(module: torch.nn.Module, splits: Splits, task: str) -> None:
    """A built-in module's network must give num_outputs values per sample: a classifier with more logits than
    classes trains without an error, on classes that never occur."""
    expected = splits.num_outputs(task)
    x = splits.x_val[:2]
    with torch.no_grad():
        out = module.to(x.device).eval()(x)
    got = 1 if out.dim() == 1 else int(out.shape[-1])
    if out.dim() > 2 or got != expected:
        what = "classes" if task == "classification" else "targets"
        raise ConfigError(f"model: the network gives outputs of shape {tuple(out.shape[1:])} per sample, but the "
                          f"data has {expected} {what}; build its last layer with the num_outputs argument")


def preflight(cfg: DictConfig, splits: Splits | None, metric: str, also: Sequence[str] = ()) -> dict[str, float]:
    """Builds everything and trains one batch and validates one batch on one device, before any store is written:
    a module that does not log `metric` (nor the other objectives `also`), a network whose output does not fit the
    data, or a `_target_` that does not build is bad input found now, not in every trial. Returns the metrics
    logged."""
    task = module_task(cfg)
    if splits is not None:
        check_targets(splits, task)
    else:  # a DataModule's data shows only in its batches: the first is checked
        check_first_batch(load_data(cfg), data_source(cfg.data), task)
    try:
        result = fit_rank(cfg, splits, metric=metric, probe=True)
    except ConfigError:
        raise
    except Exception as err:
        text = str(err).strip().splitlines()
        raise ConfigError(f"model/module: one training step on one batch failed: {type(err).__name__}: "
                          f"{text[0] if text else ''} (check that the network's output fits the data and the "
                          "module's loss)") from None
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if splits is not None and task and result.module is not None:
        _check_outputs(result.module, splits, task)
    logged = result.history[-1] if result.history else {}
    for name in (metric, *also):
        if name not in logged:
            names = sorted(k for k in logged if k != "lr")
            near = difflib.get_close_matches(name, names, n=1)
            hint = f"; did you mean study.metric={near[0]}?" if near else ""
            raise ConfigError(f"study.metric: the module never logs '{name}' after a validation epoch (it logs "
                              f"{', '.join(names) or 'nothing'}){hint}")
    return logged
