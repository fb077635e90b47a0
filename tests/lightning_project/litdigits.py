"""A user's project as lightning-hydra-template writes it (tests/test_lightning_package.py runs it from a copy):
`from lightning import ...`, torchmetrics objects, metrics named with slashes (val/acc, val/acc_best), the optimizer
called on self.trainer.model.parameters()."""

import torch
import torch.nn.functional as F
from lightning import LightningDataModule, LightningModule
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics import MaxMetric
from torchmetrics.classification import MulticlassAccuracy


class DigitsDataModule(LightningDataModule):
    def __init__(self, batch_size=64, seed=0):
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.num_classes = 10
        self.splits = {}

    def setup(self, stage=None):
        if self.splits:
            return
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.hparams.seed))
        x, y = torch.tensor(x, dtype=torch.float32)[order] / 16, torch.tensor(y)[order]
        for name, part in (("train", slice(0, 1200)), ("val", slice(1200, 1500)), ("test", slice(1500, None))):
            self.splits[name] = TensorDataset(x[part], y[part])

    def train_dataloader(self):
        return DataLoader(self.splits["train"], batch_size=self.hparams.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.splits["val"], batch_size=300)

    def test_dataloader(self):
        return DataLoader(self.splits["test"], batch_size=300)


class LitModule(LightningModule):
    def __init__(self, net, optimizer, scheduler=None):
        super().__init__()
        self.save_hyperparameters(logger=False, ignore=["net"])
        self.net = net
        self.val_acc = MulticlassAccuracy(num_classes=10, average="micro")
        self.val_acc_best = MaxMetric()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val/loss", F.cross_entropy(logits, y))
        self.val_acc(logits, y)
        self.log("val/acc", self.val_acc, on_step=False, on_epoch=True)

    def on_validation_epoch_end(self):
        self.val_acc_best(self.val_acc.compute())
        self.log("val/acc_best", self.val_acc_best.compute())

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test/acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        optimizer = self.hparams.optimizer(params=self.trainer.model.parameters())
        if self.hparams.scheduler is None:
            return {"optimizer": optimizer}
        scheduler = self.hparams.scheduler(optimizer=optimizer)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "monitor": "val/loss", "interval": "epoch"}}
