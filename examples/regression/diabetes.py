"""A user's own LightningDataModule and LightningModule, written as lightning-hydra-template writes them.

The data: scikit-learn's diabetes dataset (442 patients, 10 features, disease progression after one year), shipped
with scikit-learn. The module takes `net`, `optimizer` and `scheduler` (partially instantiated: searchlab chooses
them per trial), trains on standardized targets and logs RMSE, MAE and R² in the target's own units.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset


class DiabetesDataModule(pl.LightningDataModule):
    """Train/val/test split by `seed`; features and target standardized with the training split's statistics."""

    def __init__(self, batch_size: int = 32, val_fraction: float = 0.2, test_fraction: float = 0.2,
                 seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.num_outputs = 1  # read by searchlab to size the network
        self.y_mean, self.y_std = 0.0, 1.0
        self.splits: dict[str, TensorDataset] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        from sklearn.datasets import load_diabetes
        from sklearn.model_selection import train_test_split

        x, y = load_diabetes(return_X_y=True)
        h = self.hparams
        x_rest, x_test, y_rest, y_test = train_test_split(x, y, test_size=h.test_fraction, random_state=h.seed)
        x_train, x_val, y_train, y_val = train_test_split(
            x_rest, y_rest, test_size=h.val_fraction / (1 - h.test_fraction), random_state=h.seed)
        x_mean, x_std = x_train.mean(0), x_train.std(0)
        self.y_mean, self.y_std = float(y_train.mean()), float(y_train.std())
        for name, xs, ys in (("train", x_train, y_train), ("val", x_val, y_val), ("test", x_test, y_test)):
            self.splits[name] = TensorDataset(torch.tensor((xs - x_mean) / x_std, dtype=torch.float32),
                                              torch.tensor((ys - self.y_mean) / self.y_std, dtype=torch.float32))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["train"], batch_size=self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["val"], batch_size=len(self.splits["val"]))

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["test"], batch_size=len(self.splits["test"]))


class RegressionModule(pl.LightningModule):
    """MSE on standardized targets (or Huber with `huber_delta`); logs train_loss, val_loss, and val_rmse, val_mae,
    val_r2 in the target's units."""

    def __init__(self, net: torch.nn.Module, optimizer: Any, scheduler: Any = None,
                 huber_delta: float | None = None) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False, ignore=["net"])
        self.net = net
        self.outputs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)

    def loss(self, prediction: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        delta = self.hparams.huber_delta
        return F.huber_loss(prediction, y, delta=delta) if delta else F.mse_loss(prediction, y)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = self.loss(self(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def _evaluate(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> None:
        x, y = batch
        prediction = self(x)
        self.log(f"{stage}_loss", self.loss(prediction, y))
        scale = self.trainer.datamodule.y_std  # back to the target's units
        errors = (prediction - y) * scale
        self.log(f"{stage}_rmse", errors.pow(2).mean().sqrt())
        self.log(f"{stage}_mae", errors.abs().mean())
        self.log(f"{stage}_r2", 1 - (prediction - y).pow(2).sum() / (y - y.mean()).pow(2).sum())

    def configure_optimizers(self) -> Any:
        optimizer = self.hparams.optimizer(params=self.parameters())
        if self.hparams.scheduler is None:
            return {"optimizer": optimizer}
        scheduler = self.hparams.scheduler(optimizer=optimizer)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "monitor": "val_loss", "interval": "epoch", "frequency": 1}}
