"""The networks and the LightningModule that trains them: loss (+ L1), epoch metrics, optimizers from config.

Metrics accumulate in device tensors during the epoch and are read once at its end, so there is no host sync per step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from searchlab.optim import build_optimizer, build_schedule


def mlp(cfg: DictConfig, sample_shape: tuple[int, ...], n_classes: int) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    width_in = int(torch.tensor(sample_shape).prod())
    for _ in range(cfg.depth):
        layers.append(nn.Linear(width_in, cfg.width))
        if cfg.batch_norm:
            layers.append(nn.BatchNorm1d(cfg.width))
        layers.append(nn.ReLU())
        if cfg.dropout > 0:
            layers.append(nn.Dropout(cfg.dropout))
        width_in = cfg.width
    layers.append(nn.Linear(width_in, n_classes))
    return nn.Sequential(*layers)


def cnn(cfg: DictConfig, sample_shape: tuple[int, ...], n_classes: int) -> nn.Module:
    if len(sample_shape) != 3:
        raise ValueError(f"model=cnn needs image-shaped data (C, H, W); this data has samples of shape {sample_shape}")
    channels, size, _ = sample_shape
    layers: list[nn.Module] = []
    for block in range(cfg.depth):
        width = cfg.width * 2**block
        layers.append(nn.Conv2d(channels, width, kernel_size=3, padding=1))
        if cfg.batch_norm:
            layers.append(nn.BatchNorm2d(width))
        layers.append(nn.ReLU())
        if size > 2:
            layers.append(nn.MaxPool2d(2))
            size //= 2
        channels = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    if cfg.dropout > 0:
        layers.append(nn.Dropout(cfg.dropout))
    layers.append(nn.Linear(channels, n_classes))
    return nn.Sequential(*layers)


NETWORKS: dict[str, Callable[[DictConfig, tuple[int, ...], int], nn.Module]] = {"mlp": mlp, "cnn": cnn}
_PLAIN = (str, int, float, type(None))  # values that are never a Parameter, Module or Buffer


def build_network(cfg: DictConfig, sample_shape: tuple[int, ...], n_classes: int) -> nn.Module:
    """The network named by model.name, sized for the data."""
    return NETWORKS[cfg.name](cfg, sample_shape, n_classes)


class Classifier(pl.LightningModule):
    """Cross-entropy classifier; `history` holds one dict of epoch metrics per finished validation."""

    def __init__(self, network: nn.Module, cfg: DictConfig) -> None:
        super().__init__()
        self.network = network
        self.cfg = cfg
        self.l1 = float(cfg.model.l1)
        self.penalized = [p for p in network.parameters() if p.dim() > 1]  # weights, not biases or norms
        self.history: list[dict[str, float]] = []
        self.test_metrics: dict[str, float] = {}
        self._sums: dict[str, torch.Tensor] = {}  # device tensors, read once per epoch
        self._counts: dict[str, int] = {}  # samples seen per split, kept on the host

    def __setattr__(self, name: str, value: Any) -> None:
        # Lightning sets plain attributes on the module around every hook call (~25 per step); torch's
        # Module.__setattr__ first checks each value against Parameter, Module and Buffer (slow isinstance hooks):
        # 5-7% of a small model's fit, measured. An existing plain attribute taking a plain value is none of them.
        if name in self.__dict__ and isinstance(value, _PLAIN):
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)

    def _add(self, prefix: str, n: int, **sums: torch.Tensor) -> None:
        self._counts[prefix] = self._counts.get(prefix, 0) + n
        for name, value in sums.items():
            key = f"{prefix}_{name}"
            self._sums[key] = self._sums[key] + value if key in self._sums else value

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        data_loss = F.cross_entropy(self(x), y)
        self._add("train", len(y), loss=data_loss.detach() * len(y))
        if self.l1 > 0:
            return data_loss + self.l1 * sum(p.abs().sum() for p in self.penalized)
        return data_loss

    def _evaluate(self, batch: tuple[torch.Tensor, torch.Tensor], prefix: str) -> None:
        x, y = batch
        logits = self(x)
        self._add(prefix, len(y), loss=F.cross_entropy(logits.float(), y, reduction="sum"),
                  correct=(logits.argmax(1) == y).sum())

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def _take(self, prefix: str) -> dict[str, float]:
        """Epoch means for one split, read from the device in one sync, and the sums reset.

        Under DDP each rank trains on its own shard, so the training sums and counts are summed over the ranks (one
        all-reduce per epoch; the identity on one device); every rank evaluates the whole val and test sets.
        """
        names = [name for name in self._sums if name.startswith(prefix + "_")]
        sums = [self._sums.pop(name).float() for name in names]
        stacked = torch.stack([*sums, torch.tensor(float(self._counts.pop(prefix)), device=sums[0].device)])
        if prefix == "train":
            stacked = self.trainer.strategy.reduce(stacked, reduce_op="sum")
        *totals, n = stacked.tolist()
        values = dict(zip(names, totals, strict=True))
        out = {f"{prefix}_loss": values[f"{prefix}_loss"] / n}
        if f"{prefix}_correct" in values:
            out[f"{prefix}_acc"] = values[f"{prefix}_correct"] / n
        return out

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking or "train" not in self._counts:
            return
        metrics = {**self._take("train"), **self._take("val"), "lr": self.trainer.optimizers[0].param_groups[0]["lr"]}
        self.history.append(metrics)
        self.log("val_loss", metrics["val_loss"])  # for ReduceLROnPlateau, via Lightning's callback_metrics

    def on_test_epoch_end(self) -> None:
        self.test_metrics = self._take("test")

    def configure_optimizers(self) -> dict:
        optimizer = build_optimizer(self.parameters(), self.cfg.optimizer)
        schedule = build_schedule(
            optimizer, self.cfg.scheduler, self.trainer.max_epochs, self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": schedule} if schedule else {"optimizer": optimizer}
