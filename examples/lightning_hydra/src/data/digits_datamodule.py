from typing import Any

import torch
from lightning import LightningDataModule
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, Dataset, TensorDataset, random_split


class DigitsDataModule(LightningDataModule):
    """scikit-learn's 1 797 handwritten 8x8 digits (shipped with scikit-learn: nothing is downloaded), split into
    train, validation and test sets as lightning-hydra-template splits MNIST."""

    def __init__(self, train_val_test_split: tuple[int, int, int] = (1297, 250, 250), batch_size: int = 64,
                 num_workers: int = 0, pin_memory: bool = False, seed: int = 42) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.data_train: Dataset | None = None
        self.data_val: Dataset | None = None
        self.data_test: Dataset | None = None
        self.batch_size_per_device = batch_size

    @property
    def num_classes(self) -> int:
        return 10

    def setup(self, stage: str | None = None) -> None:
        if self.trainer is not None:
            if self.hparams.batch_size % self.trainer.world_size != 0:
                raise RuntimeError(f"Batch size ({self.hparams.batch_size}) is not divisible by the number of "
                                   f"devices ({self.trainer.world_size}).")
            self.batch_size_per_device = self.hparams.batch_size // self.trainer.world_size
        if self.data_train is None:
            digits = load_digits()
            x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
            y = torch.tensor(digits.target, dtype=torch.long)
            self.data_train, self.data_val, self.data_test = random_split(
                TensorDataset(x, y), list(self.hparams.train_val_test_split),
                generator=torch.Generator().manual_seed(self.hparams.seed))

    def _loader(self, data: Dataset, shuffle: bool) -> DataLoader[Any]:
        return DataLoader(data, batch_size=self.batch_size_per_device, num_workers=self.hparams.num_workers,
                          pin_memory=self.hparams.pin_memory, shuffle=shuffle)

    def train_dataloader(self) -> DataLoader[Any]:
        return self._loader(self.data_train, shuffle=True)

    def val_dataloader(self) -> DataLoader[Any]:
        return self._loader(self.data_val, shuffle=False)

    def test_dataloader(self) -> DataLoader[Any]:
        return self._loader(self.data_test, shuffle=False)
