"""The user's own Lightning callbacks (`trainer.callbacks`), added to searchlab's own in every training.

`trainer.callbacks` is a list of `_target_` entries, or a mapping name -> entry (as lightning-hydra-template's
`callbacks` group; an entry set to null is left out), each built with the training's Lightning package
(searchlab.config.lightning_package). Refused with one line naming the key, before any store is written:
- a callback of the other package: the training's Trainer would reject it;
- a ModelCheckpoint (any Checkpoint): searchlab writes the trial's checkpoints itself and resumes from them
  (trainer.checkpoint_every_n_epochs); a second writer would checkpoint states searchlab never resumes;
- an EarlyStopping: trainer.early_stopping_patience stops on study.metric, the value the study optimizes and reports;
  a rule on another metric would end trials on a value the study never sees.

What a callback logs to the Trainer's logger (LearningRateMonitor's `lr-Adam`, ...) reaches the trial's MLflow run per
epoch with the module's metrics: a training with callbacks of the user's gets a logger that keeps each name's last
value in the epoch (searchlab's own trainings have no logger: nothing to pay for it there).
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from searchlab.config.lightning_package import package_of
from searchlab.config.targets import build, resolve_target, training_package_name
from searchlab.errors import ConfigError

KEY = "trainer.callbacks"


def entries(cfg: DictConfig) -> list[tuple[str, DictConfig]]:
    """(key, entry) of each callback the config gives, in order; a malformed list or entry is a ConfigError."""
    node = OmegaConf.select(cfg, KEY, default=None)
    if node is None:
        return []
    if isinstance(node, DictConfig):
        items = [(f"{KEY}.{name}", entry) for name, entry in node.items()]
    elif isinstance(node, ListConfig):
        items = [(f"{KEY}[{index}]", entry) for index, entry in enumerate(node)]
    else:
        raise ConfigError(f"{KEY}: expected a list or a mapping of entries with _target_ (e.g. "
                          "{lr: {_target_: lightning.pytorch.callbacks.LearningRateMonitor}}), got {node!r}")
    found = []
    for key, entry in items:
        if entry is None:  # switched off, as `callbacks.name: null` in lightning-hydra-template
            continue
        if not isinstance(entry, DictConfig) or "_target_" not in entry:
            raise ConfigError(f"{key}: expected an entry with _target_ (the callback's class), got "
                              f"{OmegaConf.to_container(entry) if isinstance(entry, DictConfig) else entry!r}")
        found.append((key, entry))
    return found


def _check(key: str, target: str, cls: type, package: str) -> None:
    """Why the callback class (of the entry's `_target_`) cannot join searchlab's own in a training of `package`, as
    a ConfigError."""
    of = package_of(cls, "Callback")
    if of is None:
        raise ConfigError(f"{key}: {target} is not a Lightning Callback (a subclass of lightning.pytorch.Callback "
                          "or pytorch_lightning.Callback)")
    if package_of(cls, "Checkpoint"):
        raise ConfigError(f"{key}: {target} writes checkpoints, but searchlab writes and resumes the trial's own; "
                          "remove it and set trainer.checkpoint_every_n_epochs=N instead")
    if package_of(cls, "EarlyStopping"):
        raise ConfigError(f"{key}: {target} would stop trials on its own rule; remove it and set "
                          "trainer.early_stopping_patience=N (it stops on study.metric, the value the study optimizes)")
    if of != package:
        raise ConfigError(f"{key}: {target} is a {of} callback, but this training uses {package} (the package of "
                          f"the module); take it from {package}.callbacks")


def check_callbacks(cfg: DictConfig) -> None:
    """trainer.callbacks checked at config validation: the entries' form, and each class against the training's
    package and searchlab's own callbacks. Imports nothing when there are none."""
    found = entries(cfg)
    if not found:
        return
    package = training_package_name(cfg)
    for key, entry in found:
        target = resolve_target(entry, key)
        if isinstance(target, type):  # a function's callback is checked once built
            _check(key, entry._target_, target, package)


def build_callbacks(cfg: DictConfig, package: str) -> list[Any]:
    """The user's callbacks, built for a training of `package`."""
    built = []
    for key, entry in entries(cfg):
        callback = build(entry, key)
        _check(key, entry._target_, type(callback), package)
        built.append(callback)
    return built


class EpochLogger:
    """A Lightning logger (of the training's package: Package.subclass(EpochLogger, "Logger")) that keeps the last
    value of each metric logged to it in the epoch; searchlab's epoch callback adds them to the epoch's metrics."""

    def __init__(self) -> None:
        self.metrics: dict[str, float] = {}

    @property
    def name(self) -> str:
        return "searchlab"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.update({k: float(v) for k, v in metrics.items() if k != "epoch"})

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        """Hyperparameters are the trial's params, tracked by searchlab."""
