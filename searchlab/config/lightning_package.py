"""Which Lightning package trains a configuration, and that package's classes: the one place that knows there are two.

`pytorch_lightning` (searchlab's pinned dependency; its built-in classifier and regressor) and `lightning.pytorch`
(`import lightning`, as Lightning's own documentation and lightning-hydra-template write) are two copies of the same
classes: a module of one is not an instance of the other's LightningModule, and each package's Trainer accepts only
its own modules and callbacks. A training therefore takes its Trainer, callbacks, strategy and helpers from the
package of the user's classes (read from their MRO, without importing the other package), decided once.

This module imports neither package at import time: `lightning.pytorch` is imported only for a training that needs
it (it costs ~0.5 s more on top of pytorch_lightning), so `pip install searchlab` without the `lightning` extra works.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import logging
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from searchlab.errors import ConfigError

PYTORCH_LIGHTNING = "pytorch_lightning"
LIGHTNING = "lightning.pytorch"
# The package's import name -> its fabric (the Trainer's lower layer) and its pip distribution.
_FABRIC = {PYTORCH_LIGHTNING: "lightning_fabric", LIGHTNING: "lightning.fabric"}
_DISTRIBUTION = {PYTORCH_LIGHTNING: "pytorch-lightning", LIGHTNING: "lightning"}


@dataclass(frozen=True)
class Package:
    """One Lightning package's classes and helpers, as a training uses them."""

    name: str  # its import name: pytorch_lightning or lightning.pytorch
    module: ModuleType

    @property
    def distribution(self) -> str:
        """Its pip name with the installed version (an MLflow model pickled with it needs it to load)."""
        name = _DISTRIBUTION[self.name]
        return f"{name}=={importlib.metadata.version(name)}"

    @property
    def Trainer(self) -> type:
        return self.module.Trainer

    @property
    def LightningModule(self) -> type:
        return self.module.LightningModule

    @property
    def LightningDataModule(self) -> type:
        return self.module.LightningDataModule

    @property
    def Callback(self) -> type:
        return self.module.Callback

    @property
    def callbacks(self) -> ModuleType:
        """Its callbacks module: EarlyStopping, Timer, Checkpoint, ModelCheckpoint, LearningRateMonitor..."""
        return self.module.callbacks

    @property
    def DDPStrategy(self) -> type:
        return self.module.strategies.DDPStrategy

    def seed_everything(self, seed: int) -> None:
        self.module.seed_everything(seed, verbose=False)

    def is_overridden(self, method_name: str, instance: object) -> bool:
        """Whether the module or DataModule defines the hook itself (the package's own check: the other's raises)."""
        return importlib.import_module(f"{self.name}.utilities.model_helpers").is_overridden(method_name, instance)

    def subclass(self, plain: type, base: str = "Callback") -> type:
        """`plain` (a class of hooks written once, for any package) with this package's callbacks.<base> (or
        loggers.<base>) added as its base: the class this package's Trainer accepts.

        Why a class per package rather than one class inheriting from both packages' bases (which both Trainers'
        isinstance checks would also accept): the two-base class would import lightning.pytorch wherever it is
        installed, in every process, whether or not the training uses it; this one imports only the package in use,
        and needs no `lightning` installed for a pytorch_lightning training."""
        return _subclass(plain, getattr(self.module.callbacks, base, None) or getattr(self.module.loggers, base))


@functools.cache
def _subclass(plain: type, base: type) -> type:
    # The name and qualname of the plain class: a callback's state key in a checkpoint is its class's qualname.
    return type(plain.__name__, (plain, base), {"__module__": plain.__module__, "__qualname__": plain.__qualname__})


@functools.cache
def load(name: str = PYTORCH_LIGHTNING) -> Package:
    """The package by import name, imported now; lightning.pytorch without the extra installed is a ConfigError."""
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError:
        raise ConfigError(f"module: your classes use {name}, which is not installed; pip install 'searchlab[lightning]'"
                          ) from None
    # Lightning scans every installed package's entry points for callback factories at each Trainer(): ~3-5 ms a
    # trial here. Installed packages do not change while a study runs, so the scan is made once per process.
    registry = importlib.import_module(f"{_FABRIC[name]}.utilities.registry")
    registry.entry_points = functools.cache(importlib.metadata.entry_points)
    return Package(name, module)


def quiet_loggers() -> None:
    """Lightning's INFO lines (GPU available, tips, `Trainer.fit` stopped) are noise in a search: set to WARNING at
    each training, not once, because each package sets its loggers to INFO when it is imported, and both packages
    log through the logger of whichever was imported last (lightning_utilities' rank_zero_module.log is shared)."""
    for name in (PYTORCH_LIGHTNING, LIGHTNING, *_FABRIC.values()):
        logging.getLogger(name).setLevel(logging.WARNING)


def package_of(cls: Any, base: str) -> str | None:
    """The Lightning package whose class `base` (e.g. LightningModule, LightningDataModule, Callback) `cls` derives
    from, read from its MRO (nothing is imported); None when it does not derive from one, or is not a class."""
    for klass in getattr(cls, "__mro__", ()):
        if klass.__name__ == base:
            for name in (PYTORCH_LIGHTNING, LIGHTNING):
                if klass.__module__ == name or klass.__module__.startswith(name + "."):
                    return name
    return None



def requirement_of(module: object) -> str:
    """The pip requirement (name==version) of the Lightning package a LightningModule is written with: what loading
    it from a pickle needs."""
    return load(package_of(type(module), "LightningModule") or PYTORCH_LIGHTNING).distribution
