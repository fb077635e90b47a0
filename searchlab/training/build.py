"""Everything a training is made of, instantiated from the config's `_target_`s: data, network, module, optimizer
and schedule, the way lightning-hydra-template's train.py does it.

searchlab offers each callable what only it knows — `input_shape` and `num_outputs` to the network; `net`,
`optimizer` and `scheduler` to the module; `seed` and `batch_size` to the data — and passes each one only when the
callable's signature names it, so a user's class needs no searchlab-specific arguments. A `_target_` that does not
import, or that rejects its arguments, is a ConfigError naming the config key (searchlab.config.targets).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from searchlab.config import ConfigError
from searchlab.config.lightning_package import Package, load, package_of
from searchlab.config.targets import accepted, build, resolve_target, training_package_name
from searchlab.data import Splits
from searchlab.training.data_checks import check_loaded, first_batch

if TYPE_CHECKING:  # either Lightning package's classes at run time (searchlab.config.lightning_package)
    import pytorch_lightning as pl

# Keys of a scheduler entry that are Lightning's lr_scheduler settings, read here and not passed to the schedule.
LIGHTNING_SCHEDULE_KEYS = ("interval", "frequency", "monitor")


class Schedule:
    """The trial's schedule as a callable `scheduler(optimizer)` (lightning-hydra-template's convention), which fills
    in the run's length when the schedule's function names `max_epochs` or `total_steps`. `lightning` holds the
    entry's Lightning settings (interval, monitor) for a module to put in its lr_scheduler dict."""

    def __init__(self, factory: functools.partial, trainer: pl.Trainer, lightning: Mapping[str, Any]) -> None:
        self.factory, self.trainer, self.lightning = factory, trainer, dict(lightning)

    def __deepcopy__(self, memo: dict) -> Schedule:
        # A module's save_hyperparameters() deep-copies its arguments: a copy of the bound Trainer would be wrong and
        # slow, and the factory holds no state worth copying.
        return self

    def __getstate__(self) -> dict[str, Any]:
        # Lightning drops hyperparameters that do not pickle (at fit start and in checkpoints): the Trainer does not.
        return {"factory": self.factory, "trainer": None, "lightning": self.lightning}

    def __call__(self, optimizer: torch.optim.Optimizer) -> Any:
        length = accepted(self.factory.func, {"max_epochs": None, "total_steps": None})
        if length and self.trainer is None:
            raise RuntimeError("this schedule is sized by the run it belongs to: call it in configure_optimizers")
        if "max_epochs" in length:
            length["max_epochs"] = self.trainer.max_epochs
        if "total_steps" in length:
            length["total_steps"] = int(self.trainer.estimated_stepping_batches)
        return self.factory(optimizer, **{k: v for k, v in length.items() if k not in self.factory.keywords})


def optimizer_factory(cfg: DictConfig) -> Callable[..., torch.optim.Optimizer]:
    """optimizer: a `_partial_` entry, called by the module with the parameters."""
    factory = build(cfg.optimizer, "optimizer")
    if not callable(factory):
        raise ConfigError("optimizer: expected `_partial_: true` (the module calls it with the parameters)")
    return factory


def schedule_factory(cfg: DictConfig, trainer: pl.Trainer) -> Schedule | None:
    """scheduler: None for an entry without `_target_` (a constant learning rate), else a Schedule."""
    node = cfg.scheduler
    if node is None or "_target_" not in node:
        return None
    lightning = {k: node[k] for k in LIGHTNING_SCHEDULE_KEYS if k in node}
    factory = build(OmegaConf.create({k: v for k, v in node.items() if k not in lightning}), "scheduler")
    if not isinstance(factory, functools.partial):
        raise ConfigError("scheduler: expected `_partial_: true` (the module calls it with the optimizer)")
    return Schedule(factory, trainer, lightning)


@dataclass(frozen=True)
class DataShape:
    """What the network is sized by: one sample's shape and the number of outputs."""

    input_shape: tuple[int, ...]
    num_outputs: int


def module_task(cfg: DictConfig) -> str:
    """The module's `task` attribute (searchlab's: classification, regression), '' for a user's module."""
    return str(getattr(resolve_target(cfg.module, "module"), "task", "") or "")


_splits_cache: dict[str, Splits] = {}


def _files_key(node: DictConfig) -> str:
    """Which files the entry's relative paths name from here, and their versions: the same text names another file
    from another folder, or a rewritten one, in a long process (the Python API, tests)."""
    found = []
    for value in OmegaConf.to_container(node, resolve=True).values():
        if isinstance(value, str) and os.path.isfile(value):
            stat = os.stat(value)
            found.append(f"{os.path.abspath(value)}:{stat.st_mtime_ns}:{stat.st_size}")
    return ";".join(found)


def load_data(cfg: DictConfig) -> Splits | pl.LightningDataModule:
    """The `data` entry built: resident Splits (cached per process: every trial of a study shares them), or a
    LightningDataModule (built per training, since data.batch_size may change per trial)."""
    node = OmegaConf.create({k: v for k, v in cfg.data.items() if k != "batch_size"})
    target = resolve_target(node, "data")
    if package_of(target, "LightningDataModule"):  # of either Lightning package
        offered = {"batch_size": cfg.data.get("batch_size"), "seed": cfg.seed}
        if offered["batch_size"] == "full":
            raise ConfigError("data.batch_size: 'full' needs in-memory data (data=npz or a function returning "
                              "Splits); give a LightningDataModule a number")
        return build(cfg.data if "batch_size" in accepted(target, offered) else node, "data", seed=cfg.seed)
    key = OmegaConf.to_yaml(node) + f"seed={cfg.seed}" + _files_key(node)
    if key not in _splits_cache:
        splits = build(node, "data", seed=cfg.seed)
        if not isinstance(splits, Splits):
            raise ConfigError(f"data: {node._target_} returned {type(splits).__name__}; a data entry builds a "
                              "LightningDataModule or returns searchlab.data.Splits (see searchlab.data.as_splits)")
        check_loaded(splits, cfg, module_task(cfg))
        _splits_cache.clear()  # one dataset at a time
        _splits_cache[key] = splits
    return _splits_cache[key]


def data_shape(data: Splits | pl.LightningDataModule, task: str) -> DataShape:
    """input_shape and num_outputs for the network: from the Splits, or from the DataModule's `input_shape` and
    `num_classes` / `num_outputs` attributes, else from its first training batch."""
    if isinstance(data, Splits):
        return DataShape(data.sample_shape, data.num_outputs(task))
    declared = getattr(data, "num_outputs", None) or getattr(data, "num_classes", None)
    shape = getattr(data, "input_shape", None)
    if declared is not None and shape is not None:
        return DataShape(tuple(shape), int(declared))
    x, y = first_batch(data)
    shape = tuple(shape) if shape is not None else tuple(x.shape[1:])
    if declared is not None:
        return DataShape(shape, int(declared))
    if task == "classification" or (not task and not y.is_floating_point()):
        raise ConfigError(f"data: {type(data).__name__} does not say how many classes it has; give it a "
                          "`num_classes` attribute (or `num_outputs`)")
    return DataShape(shape, 1 if y.dim() == 1 else int(y.shape[1]))


def build_network(cfg: DictConfig, shape: DataShape) -> nn.Module:
    """model: the user's or a built-in network, offered input_shape and num_outputs."""
    network = build(cfg.model, "model", input_shape=list(shape.input_shape), num_outputs=shape.num_outputs)
    if not isinstance(network, nn.Module):
        raise ConfigError(f"model: {cfg.model._target_} built a {type(network).__name__}, not a torch.nn.Module")
    return network


def build_module(cfg: DictConfig, shape: DataShape, trainer: pl.Trainer) -> pl.LightningModule:
    """module: the LightningModule, offered the network, the optimizer factory and the schedule."""
    target = resolve_target(cfg.module, "module")
    offers = accepted(target, {"net": None, "optimizer": None, "scheduler": None})
    offered: dict[str, Any] = {}
    if "net" in offers:
        offered["net"] = build_network(cfg, shape)
    if "optimizer" in offers:
        offered["optimizer"] = optimizer_factory(cfg)
    if "scheduler" in offers:
        offered["scheduler"] = schedule_factory(cfg, trainer)
    module = build(cfg.module, "module", **offered)
    built = package_of(type(module), "LightningModule")
    if built is None:
        raise ConfigError(f"module: {cfg.module._target_} built a {type(module).__name__}, not a LightningModule (of "
                          "lightning or pytorch_lightning)")
    expected = package_of(type(trainer), "Trainer")
    if trainer is not None and built != expected:  # a function _target_: its class is known only once built
        raise ConfigError(f"module: {cfg.module._target_} built a {built} LightningModule, but the training was set "
                          f"up for {expected}; name the LightningModule class itself as module._target_")
    return module


def training_package(cfg: DictConfig) -> Package:
    """The Lightning package that trains cfg (its Trainer, callbacks, strategy), imported."""
    return load(training_package_name(cfg))
