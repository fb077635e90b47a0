"""Datasets as tensors on the training device, batched by indexing.

Small datasets fit on the device whole, so a DataLoader's workers, collation and host-to-device copies would only add
per-step cost: batches here are index lookups into resident tensors, shuffled by a seeded generator on the device.
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from searchlab.config import ConfigError


@dataclass(frozen=True)
class Splits:
    """Train/val/test tensors; x keeps its sample shape ((features,) or (C, H, W)) for the model to read."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor | None
    y_test: torch.Tensor | None
    n_classes: int

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def to(self, device: torch.device) -> Splits:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return Splits(*(move(t) for t in (self.x_train, self.y_train, self.x_val, self.y_val, self.x_test,
                                          self.y_test)), n_classes=self.n_classes)


class TensorBatches:
    """An iterable of (x, y) batches for Lightning, reshuffled each epoch by a seeded generator on x's device.

    Under DDP (world_size > 1, shuffled training data only) every rank draws the same permutation (same seed, same
    draws per epoch) and takes every world_size-th index of it, as DistributedSampler does; the epoch's last
    len(x) % world_size samples of the permutation are left out so that every rank runs the same number of steps.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool, seed: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        if world_size > 1 and not shuffle:
            raise ValueError("TensorBatches shards only shuffled (training) data across ranks")
        self.x, self.y, self.batch_size, self.shuffle = x, y, batch_size, shuffle
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator(device=x.device).manual_seed(seed) if shuffle else None
        n = len(x) // world_size
        # A trailing batch of one sample is dropped when batches are larger: BatchNorm cannot train on it.
        self.n_batches = math.ceil(n / batch_size) if batch_size == 1 or n % batch_size != 1 else n // batch_size

    def __len__(self) -> int:
        return self.n_batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n, size = len(self.x), self.batch_size
        if not self.shuffle:
            for i in range(self.n_batches):
                yield self.x[i * size:(i + 1) * size], self.y[i * size:(i + 1) * size]
            return
        order = torch.randperm(n, device=self.x.device, generator=self.generator)
        if self.world_size > 1:
            order = order[:n - n % self.world_size][self.rank::self.world_size]
        for i in range(self.n_batches):
            index = order[i * size:(i + 1) * size]
            yield self.x[index], self.y[index]


def batch_size_for(setting: int | str, n_train: int) -> int:
    """data.batch_size as a number: 'full' is the whole training set (batch gradient descent)."""
    return n_train if setting == "full" else int(setting)


def load_data(cfg: DictConfig, seed: int) -> Splits:
    """The dataset named by data.name, split by `seed`; bad files raise ConfigError naming data.path."""
    if cfg.name not in LOADERS:
        raise ConfigError(f"data.name: unknown '{cfg.name}' (choose from {', '.join(LOADERS)})")
    return LOADERS[cfg.name](cfg, seed)


def _split(x: np.ndarray, y: np.ndarray, cfg: DictConfig, seed: int) -> Splits:
    from sklearn.model_selection import train_test_split

    x_rest, x_test, y_rest, y_test = train_test_split(
        x, y, test_size=cfg.test_fraction, random_state=seed, stratify=y)
    val_share = cfg.val_fraction / (1 - cfg.test_fraction)
    x_train, x_val, y_train, y_val = train_test_split(
        x_rest, y_rest, test_size=val_share, random_state=seed, stratify=y_rest)
    return _as_splits(x_train, y_train, x_val, y_val, x_test, y_test)


def _as_splits(*arrays: np.ndarray | None) -> Splits:
    xs = [None if a is None else torch.as_tensor(np.asarray(a, dtype=np.float32)) for a in arrays[0::2]]
    ys = [None if a is None else torch.as_tensor(np.asarray(a, dtype=np.int64)) for a in arrays[1::2]]
    labels = torch.cat([y for y in ys if y is not None])
    return Splits(xs[0], ys[0], xs[1], ys[1], xs[2], ys[2], n_classes=int(labels.max()) + 1)


def _digits(cfg: DictConfig, seed: int) -> Splits:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0)[:, None, :, :]  # (N, 1, 8, 8), pixels in [0, 1]
    return _split(images, digits.target, cfg, seed)


def _synthetic(cfg: DictConfig, seed: int) -> Splits:
    from sklearn.datasets import make_classification

    if cfg.informative > cfg.features:
        raise ConfigError(f"data.informative: {cfg.informative} exceeds data.features ({cfg.features})")
    x, y = make_classification(
        n_samples=cfg.size, n_features=cfg.features, n_informative=cfg.informative, n_redundant=0,
        n_classes=cfg.classes, class_sep=cfg.separation, flip_y=cfg.label_noise, random_state=seed,
    )
    return _split(x, y, cfg, seed)


_NPZ_REQUIRED = ("x_train", "y_train", "x_val", "y_val")


def _npz(cfg: DictConfig, seed: int) -> Splits:
    path = Path(str(cfg.path))
    if not path.is_file():
        raise ConfigError(f"data.path: no such file '{path}' (give an .npz with {', '.join(_NPZ_REQUIRED)})")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (ValueError, OSError, zipfile.BadZipFile) as err:
        raise ConfigError(f"data.path: '{path}' is not a readable .npz file ({err})") from None
    missing = [name for name in _NPZ_REQUIRED if name not in arrays]
    if missing:
        has = ", ".join(sorted(arrays)) or "nothing"
        raise ConfigError(f"data.path: '{path}' lacks {', '.join(missing)} (has {has})")
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise ConfigError(f"data.path: '{path}' has only one of x_test, y_test; give both or neither")
    _check_npz_arrays(path, arrays)
    if arrays["x_train"].ndim == 3:  # (N, H, W) images: add the channel axis
        arrays = {k: (v[:, None] if k.startswith("x_") else v) for k, v in arrays.items()}
    return _as_splits(*(arrays.get(f"{a}_{s}") for s in ("train", "val", "test") for a in ("x", "y")))


def _check_npz_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Shapes and types a training can use: numeric x of one sample shape, integer labels, rows that agree."""
    def bad(message: str) -> ConfigError:
        return ConfigError(f"data.path: '{path}' {message}")

    sample_shape = arrays["x_train"].shape[1:]
    for split in ("train", "val", "test"):
        if f"x_{split}" not in arrays:
            continue
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        real = np.issubdtype(x.dtype, np.number) and not np.issubdtype(x.dtype, np.complexfloating)
        if x.ndim not in (2, 3, 4) or not real:
            raise bad(f"x_{split} must be a real numeric array of (N, features), (N, H, W) or (N, C, H, W)")
        if x.shape[1:] != sample_shape:
            raise bad(f"x_{split} samples have shape {x.shape[1:]} but x_train's have {sample_shape}")
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise bad(f"y_{split} must be a 1-d array of integer class indices")
        if len(x) != len(y):
            raise bad(f"x_{split} has {len(x)} rows but y_{split} has {len(y)}")
        if len(y) == 0:
            raise bad(f"x_{split} and y_{split} are empty")
        if y.min() < 0:
            raise bad(f"y_{split} holds negative class indices")


LOADERS: dict[str, Callable[[DictConfig, int], Splits]] = {
    "digits": _digits,
    "synthetic": _synthetic,
    "npz": _npz,
}
