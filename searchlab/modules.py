"""searchlab's LightningModules, entries of the `module` group like a user's own: a classifier and a regressor.

They follow the contract a user's module follows (docs/own-code.md): they take the network built
from `model` as `net`, and the trial's optimizer and schedule as callables (`optimizer(params)`,
`scheduler(optimizer)`, Hydra `_partial_`) that they call in configure_optimizers, and they report metrics with
`self.log`. What they add is speed: per-step values are summed in device tensors and read once per validation epoch,
so a step has no host sync; and a metric that costs (the classifier's F1 and AUROC cost more per epoch than the loss
and accuracy together) is computed only when the run reads it (`metrics`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

OptimizerFactory = Callable[..., torch.optim.Optimizer]
ScheduleFactory = Callable[[torch.optim.Optimizer], Any]
_PLAIN = (str, int, float, type(None))  # values that are never a Parameter, Module or Buffer


def macro_auroc(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """One-vs-rest AUROC averaged over classes, from the Mann-Whitney rank statistic (tied scores share their mean
    rank): the same values as torchmetrics' multiclass_auroc(average="macro"), without its per-class ROC curves,
    which cost it several times as much per epoch. A class absent from the targets counts 0, as there."""
    n, classes = scores.shape
    ordered, order = scores.sort(0)
    new_group = torch.ones_like(ordered, dtype=torch.bool)
    new_group[1:] = ordered[1:] != ordered[:-1]
    group = (new_group.long().cumsum(0) - 1 + torch.arange(classes, device=scores.device) * n).reshape(-1)
    positions = torch.arange(1, n + 1, dtype=scores.dtype, device=scores.device).unsqueeze(1).expand(n, classes)
    total = torch.zeros(n * classes, dtype=scores.dtype, device=scores.device).index_add_(0, group,
                                                                                          positions.reshape(-1))
    count = torch.zeros_like(total).index_add_(0, group, torch.ones_like(total))
    ranks = torch.empty_like(scores).scatter_(0, order, (total / count.clamp(min=1))[group].view(n, classes))
    positive = F.one_hot(targets, classes).to(scores.dtype)
    n_pos = positive.sum(0)
    return (((ranks * positive).sum(0) - n_pos * (n_pos + 1) / 2) / (n_pos * (n - n_pos)).clamp(min=1)).mean()


class _Module(pl.LightningModule):
    """What both built-in modules share: loss + L1, device-side sums, epoch metrics through self.log."""

    task = ""  # "classification" or "regression": how searchlab counts num_outputs and checks the targets

    def __init__(self, net: nn.Module, optimizer: OptimizerFactory, scheduler: ScheduleFactory | None = None,
                 l1: float = 0.0, metrics: Sequence[str | Sequence[str]] | None = None) -> None:
        """`metrics`: the metric names the run reads (conf/module/classifier.yaml gives study.metric,
        tracking.metrics and ablate.test_metric; nested lists are flattened); an optional metric is computed when
        it is named for any split (val_f1 or test_f1 asks for f1). None computes every metric."""
        super().__init__()
        self.net = net
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.l1 = float(l1)
        self.wanted = None if metrics is None else {name.split("_", 1)[-1] for name in _names(metrics)}
        self.penalized = [p for p in net.parameters() if p.dim() > 1]  # weights, not biases or norms
        self.test_metrics: dict[str, float] = {}
        self._sums: dict[str, torch.Tensor] = {}  # device tensors, read once per epoch
        self._counts: dict[str, int] = {}  # samples seen per split, kept on the host
        self._outputs: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # evaluation outputs and targets

    def __setattr__(self, name: str, value: Any) -> None:
        # Lightning sets plain attributes on the module around every hook call (~25 per step); torch's
        # Module.__setattr__ first checks each value against Parameter, Module and Buffer (slow isinstance hooks),
        # a visible share of a small model's fit. An existing plain attribute taking a plain value is none of them.
        if name in self.__dict__ and isinstance(value, _PLAIN):
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def wants(self, metric: str) -> bool:
        """Whether the optional metric (f1, auroc) is read by the run, so worth computing each epoch."""
        return self.wanted is None or metric in self.wanted

    def loss(self, output: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        raise NotImplementedError

    def epoch_metrics(self, prefix: str, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """The split's metrics (device tensors) from all its outputs and targets."""
        raise NotImplementedError

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        data_loss = self.loss(self(x), y)
        self._counts["train"] = self._counts.get("train", 0) + len(y)
        step_sum = data_loss.detach() * len(y)
        self._sums["train"] = self._sums["train"] + step_sum if "train" in self._sums else step_sum
        if self.l1 > 0:
            return data_loss + self.l1 * sum(p.abs().sum() for p in self.penalized)
        return data_loss

    def _evaluate(self, batch: tuple[torch.Tensor, torch.Tensor], prefix: str) -> None:
        x, y = batch
        self._outputs.setdefault(prefix, []).append((self(x).float(), y))

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def _take(self, prefix: str) -> dict[str, float]:
        """The split's epoch metrics, read from the device in one sync.

        Under DDP each rank trains on its own shard, so the training sum and count are summed over the ranks (one
        all-reduce per epoch; the identity on one device); every rank evaluates the whole val and test sets.
        """
        pairs = self._outputs.pop(prefix)
        metrics = self.epoch_metrics(prefix, torch.cat([o for o, _ in pairs]), torch.cat([y for _, y in pairs]))
        names = list(metrics)
        values = [metrics[name].float() for name in names]
        if prefix == "val" and "train" in self._sums:
            train = torch.stack([self._sums.pop("train").float(),
                                 torch.tensor(float(self._counts.pop("train")), device=values[0].device)])
            train = self.trainer.strategy.reduce(train, reduce_op="sum")
            names.append("train_loss")
            values.append(train[0] / train[1])
        return dict(zip(names, torch.stack(values).tolist(), strict=True))

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking or "val" not in self._outputs:
            return
        self.log_dict(self._take("val"))

    def on_test_epoch_end(self) -> None:
        self.test_metrics = self._take("test")
        self.log_dict(self.test_metrics)

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        schedule = self.scheduler_factory(optimizer)
        settings = getattr(self.scheduler_factory, "lightning", {})  # interval, monitor: see searchlab.training.build
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "monitor": "val_loss", **settings}}


def _names(metrics: Sequence[str | Sequence[str]]) -> list[str]:
    """The metric names in a list that may hold lists (study.metric is a name or a list of names)."""
    return [name for entry in metrics for name in ([entry] if isinstance(entry, str) else _names(entry))]


class Classifier(_Module):
    """Cross-entropy; logs train_loss, val_loss, val_acc, and when asked for (`metrics`) val_f1 (macro) and val_auroc
    (macro, one-vs-rest)."""

    task = "classification"

    def loss(self, output: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        return F.cross_entropy(output, y, reduction=reduction)

    def epoch_metrics(self, prefix: str, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        n_classes = outputs.shape[1]
        predicted = outputs.argmax(1)
        out = {f"{prefix}_loss": F.cross_entropy(outputs, targets),
               f"{prefix}_acc": (predicted == targets).float().mean()}
        if self.wants("f1"):
            # Confusion counts by one bincount: per class, true positives, predicted and actual totals.
            confusion = torch.bincount(targets * n_classes + predicted, minlength=n_classes**2).view(n_classes,
                                                                                                      n_classes)
            hits = confusion.diagonal().float()
            totals = confusion.sum(0) + confusion.sum(1)
            f1 = 2 * hits / totals.clamp(min=1)
            present = (totals > 0).float()  # as scikit-learn: classes neither predicted nor present are left out
            out[f"{prefix}_f1"] = (f1 * present).sum() / present.sum()
        if self.wants("auroc"):
            out[f"{prefix}_auroc"] = macro_auroc(outputs.softmax(1), targets)
        return out


class Regressor(_Module):
    """Mean squared error; logs train_loss, val_loss (MSE), val_rmse, val_mae and val_r2 (averaged over targets)."""

    task = "regression"

    def loss(self, output: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        return F.mse_loss(output.view_as(y), y, reduction=reduction)

    def epoch_metrics(self, prefix: str, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs = outputs.view_as(targets)
        errors = outputs - targets
        mse = errors.pow(2).mean()
        per_target = errors.pow(2).sum(0) / (targets - targets.mean(0)).pow(2).sum(0).clamp(min=1e-12)
        return {
            f"{prefix}_loss": mse,
            f"{prefix}_rmse": mse.sqrt(),
            f"{prefix}_mae": errors.abs().mean(),
            f"{prefix}_r2": (1 - per_target).mean(),
        }
