"""Datasets as tensors on the training device, batched by indexing.

Small datasets fit on the device whole, so a DataLoader's workers, collation and host-to-device copies would only add
per-step cost: batches here are index lookups into resident tensors, shuffled by a seeded generator on the device.
"""

from __future__ import annotations

import math
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from searchlab.errors import ConfigError


@dataclass(frozen=True)
class Splits:
    """Train/val/test tensors; x keeps its sample shape ((features,), (L,), (C, H, W)...) for the network.

    y holds integer class indices (int64) or float regression targets (float32, (N,) or (N, k)), as given.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor | None = None
    y_test: torch.Tensor | None = None

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def integer_targets(self) -> bool:
        return not self.y_train.is_floating_point()

    def num_outputs(self, task: str) -> int:
        """Classes (the largest label + 1) for classification, else the number of regression targets."""
        if task == "classification" or (not task and self.integer_targets):
            return int(max(int(y.max()) for y in self._ys()) + 1)
        return 1 if self.y_train.dim() == 1 else int(self.y_train.shape[1])

    def _ys(self) -> list[torch.Tensor]:
        return [y for y in (self.y_train, self.y_val, self.y_test) if y is not None]

    def for_task(self, task: str) -> Splits:
        """Targets as the task's loss takes them: float for regression (integer counts become floats)."""
        if task != "regression" or not self.integer_targets:
            return self
        return replace(self, **{f"y_{s}": getattr(self, f"y_{s}").float() for s in ("train", "val", "test")
                                if getattr(self, f"y_{s}") is not None})

    def to(self, device: torch.device) -> Splits:
        return Splits(*(None if t is None else t.to(device) for t in (
            self.x_train, self.y_train, self.x_val, self.y_val, self.x_test, self.y_test)))


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

    # Lightning saves a stateful loader's state in checkpoints: a resumed trial draws the batch orders it would have.
    def state_dict(self) -> dict[str, Any]:
        return {} if self.generator is None else {"generator": self.generator.get_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.generator is not None and "generator" in state_dict:
            self.generator.set_state(state_dict["generator"])

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


def _split(x: np.ndarray, y: np.ndarray, val_fraction: float, test_fraction: float, seed: int,
           stratify: bool = True) -> Splits:
    from sklearn.model_selection import train_test_split

    x_rest, x_test, y_rest, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y if stratify else None)
    val_share = val_fraction / (1 - test_fraction)
    x_train, x_val, y_train, y_val = train_test_split(
        x_rest, y_rest, test_size=val_share, random_state=seed, stratify=y_rest if stratify else None)
    return as_splits(x_train, y_train, x_val, y_val, x_test, y_test)


def as_splits(*arrays: np.ndarray | None) -> Splits:
    """Splits from numpy arrays (x_train, y_train, x_val, y_val[, x_test, y_test]): x as float32, y as int64 when
    it holds integers, else float32."""
    def target(a: np.ndarray) -> torch.Tensor:
        a = np.asarray(a)
        return torch.as_tensor(a.astype(np.int64 if np.issubdtype(a.dtype, np.integer) else np.float32))

    # A value beyond float32's range becomes inf without numpy's warning: searchlab.training.data_checks names it in one
    # line.
    with np.errstate(over="ignore"):
        xs = [None if a is None else torch.as_tensor(np.asarray(a, dtype=np.float32)) for a in arrays[0::2]]
        ys = [None if a is None else target(a) for a in arrays[1::2]]
    return Splits(*[t for pair in zip(xs, ys, strict=False) for t in pair])


def digits(val_fraction: float = 0.2, test_fraction: float = 0.2, seed: int = 0) -> Splits:
    """scikit-learn's handwritten digits as (N, 1, 8, 8) images in [0, 1], split by seed, stratified."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return _split((data.images / 16.0)[:, None, :, :], data.target, val_fraction, test_fraction, seed)


def synthetic(size: int = 2000, features: int = 20, informative: int = 10, classes: int = 4,
              separation: float = 1.0, label_noise: float = 0.01, val_fraction: float = 0.2,
              test_fraction: float = 0.2, seed: int = 0) -> Splits:
    """scikit-learn's make_classification, generated from seed."""
    from sklearn.datasets import make_classification

    if informative > features:
        raise ConfigError(f"data.informative: {informative} exceeds data.features ({features})")
    x, y = make_classification(
        n_samples=size, n_features=features, n_informative=informative, n_redundant=0, n_classes=classes,
        class_sep=separation, flip_y=label_noise, random_state=seed)
    return _split(x, y, val_fraction, test_fraction, seed)


_NPZ_REQUIRED = ("x_train", "y_train", "x_val", "y_val")


def npz(path: str, standardize: bool = False, add_channel: bool | str = "auto") -> Splits:
    """A user's arrays from an .npz (x_train, y_train, x_val, y_val, optionally x_test, y_test); bad files raise
    ConfigError naming data.path. `standardize` scales each feature by the training split's mean and std;
    `add_channel` (auto: for 3-d x) reads x as (N, H, W) images and gives them a channel axis."""
    file = Path(str(path))
    if not file.is_file():
        raise ConfigError(f"data.path: no such file '{file}' (give an .npz with {', '.join(_NPZ_REQUIRED)})")
    try:
        with np.load(file, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise ConfigError(f"data.path: '{file}' is not a readable .npz file "
                          f"({type(err).__name__}: {str(err) or 'truncated or empty'}); write it with numpy.savez"
                          ) from None
    missing = [name for name in _NPZ_REQUIRED if name not in arrays]
    if missing:
        has = ", ".join(sorted(arrays)) or "nothing"
        raise ConfigError(f"data.path: '{file}' lacks {', '.join(missing)} (has {has})")
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise ConfigError(f"data.path: '{file}' has only one of x_test, y_test; give both or neither")
    _check_npz_arrays(file, arrays)
    if add_channel is True or (add_channel == "auto" and arrays["x_train"].ndim == 3):
        arrays = {k: (v[:, None] if k.startswith("x_") else v) for k, v in arrays.items()}
    if standardize:
        # Statistics of the finite values: a NaN or inf stays where it is, for searchlab.training.data_checks to name,
        # instead of turning its whole feature into NaN.
        finite = np.isfinite(arrays["x_train"])
        with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)  # a feature with no finite value: NaN, named there
            mean = arrays["x_train"].mean(axis=0, keepdims=True, where=finite)
            std = arrays["x_train"].std(axis=0, keepdims=True, where=finite)
        std[std == 0] = 1.0
        arrays = {k: ((v - mean) / std if k.startswith("x_") else v) for k, v in arrays.items()}
    return as_splits(*(arrays.get(f"{a}_{s}") for s in ("train", "val", "test") for a in ("x", "y")))


def _check_npz_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Shapes and types the arrays must have before npz transforms them (numeric x of one sample shape, numeric y,
    rows that agree); their values are searchlab.training.data_checks' concern, on the Splits."""
    def bad(message: str) -> ConfigError:
        return ConfigError(f"data.path: '{path}' {message}")

    sample_shape = arrays["x_train"].shape[1:]
    target_shape = arrays["y_train"].shape[1:]
    for split in ("train", "val", "test"):
        if f"x_{split}" not in arrays:
            continue
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim < 2 or not _is_real(x):
            raise bad(f"x_{split} must be a real numeric array of (N, ...) samples")
        if x.shape[1:] != sample_shape:
            raise bad(f"x_{split} samples have shape {x.shape[1:]} but x_train's have {sample_shape}")
        if y.ndim not in (1, 2) or not _is_real(y):
            raise bad(f"y_{split} must be integer class indices (N,) or float targets (N,) or (N, k)")
        if y.shape[1:] != target_shape:
            raise bad(f"y_{split} has targets of shape {y.shape[1:]} but y_train's are {target_shape}")
        if len(x) != len(y):
            raise bad(f"x_{split} has {len(x)} rows but y_{split} has {len(y)}")
        if len(y) == 0:
            raise bad(f"x_{split} and y_{split} are empty")


def _is_real(a: np.ndarray) -> bool:
    return np.issubdtype(a.dtype, np.number) and not np.issubdtype(a.dtype, np.complexfloating)
