"""A config entry's `_target_` made into what it names: the callable imported, its settings and the arguments it
accepts passed, any failure a ConfigError naming the config key; and which Lightning package a config trains with.

Below searchlab.training.build (which builds a training's parts with it) so that validation can check a `_target_`
before anything is trained: searchlab.config.user_callbacks checks `trainer.callbacks` at searchlab.config's validation.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
import re
from collections.abc import Callable, Mapping
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig

from searchlab.config.lightning_package import PYTORCH_LIGHTNING, package_of
from searchlab.errors import ConfigError


def resolve_target(node: DictConfig, key: str) -> Callable[..., Any]:
    """The callable that node._target_ names, imported; errors name `key._target_` and suggest near names."""
    if not isinstance(node, DictConfig) or "_target_" not in node:
        raise ConfigError(f"{key}: no _target_ (name the class or function to build it with, e.g. _target_: "
                          f"mypackage.MyClass)")
    path = str(node._target_)
    module_path, _, name = path.rpartition(".")
    if not module_path:
        raise ConfigError(f"{key}._target_: '{path}' is not a dotted path (expected module.Name)")
    try:
        module = importlib.import_module(module_path)
    except ModuleNotFoundError as err:
        raise ConfigError(f"{key}._target_: cannot import '{module_path}' ({err}); run searchlab from the folder that "
                          f"holds it, or install it") from None
    except Exception as err:  # the user's module raised while importing
        raise ConfigError(f"{key}._target_: importing '{module_path}' failed: {type(err).__name__}: {err}") from None
    if not hasattr(module, name):
        near = difflib.get_close_matches(name, [n for n in dir(module) if not n.startswith("_")], n=1)
        hint = f"; did you mean '{module_path}.{near[0]}'?" if near else ""
        raise ConfigError(f"{key}._target_: '{module_path}' has no '{name}'{hint}")
    target = getattr(module, name)
    if not callable(target):
        raise ConfigError(f"{key}._target_: '{path}' is not a class or function")
    return target


def accepted(target: Callable[..., Any], offered: Mapping[str, Any]) -> dict[str, Any]:
    """The offered arguments that the callable's signature names."""
    try:
        names = inspect.signature(target).parameters
    except (TypeError, ValueError):  # some builtins have no signature
        return {}
    return {k: v for k, v in offered.items() if k in names}


def build(node: DictConfig, key: str, **offered: Any) -> Any:
    """The node's `_target_` called with the YAML's settings and the offered arguments it names (a partial of them
    when the YAML says `_partial_: true`); bad targets and arguments -> ConfigError naming the key.

    Offered objects (a network, a trainer-bound schedule) are passed to the call, not through Hydra's instantiate,
    which would merge them into a config and deep-copy them.
    """
    target = resolve_target(node, key)
    extra = {k: v for k, v in accepted(target, offered).items() if k not in node}  # what the YAML sets wins
    try:
        factory = instantiate(node, _partial_=True, _convert_="all")
    except InstantiationException as err:
        raise ConfigError(f"{key}: cannot build {node._target_}: {_first_line(err.__cause__ or err)}") from None
    try:
        inspect.signature(target).bind_partial(*factory.args, **factory.keywords, **extra)
    except TypeError as err:
        names = [n for n in _parameters(target) if n not in factory.keywords]
        bad = re.search(r"argument '(\w+)'", str(err))
        near = difflib.get_close_matches(bad.group(1), names, n=1) if bad else []
        hint = f"; did you mean '{key}.{near[0]}'?" if near else f" (it takes: {', '.join(_parameters(target))})"
        raise ConfigError(f"{key}: {node._target_} rejected its arguments: {err}{hint}") from None
    except ValueError:  # no signature to check against
        pass
    if node.get("_partial_", False):
        return functools.partial(factory, **extra)
    try:
        return factory(**extra)
    except ConfigError:
        raise
    except Exception as err:  # the class's own check of its arguments, e.g. the built-in CNN on flat data
        raise ConfigError(f"{key}: {node._target_}: {_first_line(err)}") from None


def _parameters(target: Callable[..., Any]) -> list[str]:
    try:
        return [n for n in inspect.signature(target).parameters if n != "self"]
    except (TypeError, ValueError):
        return []


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".strip()


def training_package_name(cfg: DictConfig) -> str:
    """The Lightning package that trains cfg, decided from the user's classes before the Trainer is made: the module
    `_target_`'s package, or the data's when it is a LightningDataModule; pytorch_lightning (the pinned dependency,
    the built-in modules') when neither says. A module of one package with a DataModule of the other trains with
    neither package's Trainer: a ConfigError."""
    module = package_of(resolve_target(cfg.module, "module"), "LightningModule")
    data = package_of(resolve_target(cfg.data, "data"), "LightningDataModule")
    if module and data and module != data:
        raise ConfigError(f"data: {cfg.data._target_} is a {data} LightningDataModule but module {cfg.module._target_} "
                          f"is a {module} LightningModule; write both with the same package (import lightning, or "
                          "import pytorch_lightning)")
    return module or data or PYTORCH_LIGHTNING
