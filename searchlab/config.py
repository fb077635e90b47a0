"""Hydra composition of run configs and their validation.

Everything that reads `conf/` goes through here, so bad input is caught in one place and reported as one line
(`ConfigError`) before anything is written to a store.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(Exception):
    """Bad user input: the CLI prints it as one line and exits with code 2, before any store is written."""


def config_dir() -> Path:
    """The conf/ tree: $SEARCHLAB_CONFIG_DIR, else the one installed in the package, else the repo's."""
    if "SEARCHLAB_CONFIG_DIR" in os.environ:
        chosen = Path(os.environ["SEARCHLAB_CONFIG_DIR"]).resolve()
        if not (chosen / "config.yaml").is_file():
            raise ConfigError(f"SEARCHLAB_CONFIG_DIR: no config.yaml in '{chosen}'; point it at a conf/ folder")
        return chosen
    packaged = Path(__file__).parent / "conf"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "conf"


def group_options(conf: Path | None = None) -> dict[str, list[str]]:
    """Config groups and their options, read from the folder layout (conf/<group>/<option>.yaml)."""
    conf = conf or config_dir()
    return {
        group.name: sorted(p.stem for p in group.glob("*.yaml"))
        for group in sorted(conf.iterdir())
        if group.is_dir()
    }


def redact(text: str) -> str:
    """Any URL password in the text replaced by ***, for messages and logged params.

    The password runs to the last @ before the host (passwords may hold @), as URL parsers read it.
    """
    return re.sub(r"(://[^:/@\s]+:)[^\s/]*@", r"\1***@", str(text))


# `+key=value` may add entries to these tables only; anywhere else a `+` would hide a misspelt key.
_EXTENSIBLE = ("study.samplers.", "study.pruners.")


def parse_overrides(overrides: Sequence[str]) -> dict[str, str]:
    """Override key -> its text value; malformed ones and unknown group options raise ConfigError."""
    groups = group_options()
    parsed: dict[str, str] = {}
    for text in overrides:
        try:
            (override,) = OverridesParser.create().parse_overrides([text])
        except OverrideParseException as err:
            first = str(err).splitlines()[0]
            raise ConfigError(f"malformed override '{text}': {first} (expected key=value)") from None
        key = override.key_or_group
        value = override.value()
        if not key:
            raise ConfigError(f"malformed override '{text}': no key before '=' (expected key=value)")
        if key in groups and override.is_delete():
            raise ConfigError(f"{key}: a config group cannot be deleted; choose one of {', '.join(groups[key])}")
        if key in groups and not isinstance(value, str):
            raise ConfigError(f"{key}: expected one option name (choose from {', '.join(groups[key])}), got {value!r}")
        if override.is_add() and not key.startswith(_EXTENSIBLE):
            raise ConfigError(
                f"'{text}': adding keys with + is only for new entries of study.samplers or study.pruners; "
                f"to set an existing key drop the +, and check the spelling of '{key}'")
        if key in groups and value not in groups[key]:
            raise ConfigError(
                f"{key}: unknown option '{value}' (choose from {', '.join(groups[key])}; "
                f"options are the files in conf/{key}/)"
            )
        parsed[key] = text.split("=", 1)[1] if "=" in text else ""
    return parsed


def compose_config(overrides: Sequence[str]) -> DictConfig:
    """One full Hydra composition of conf/config.yaml with the overrides (~40 ms; see Composer for the fast path)."""
    parse_overrides(overrides)
    gh = GlobalHydra.instance()
    if not gh.is_initialized():
        initialize_config_dir(config_dir=str(config_dir()), version_base=None)
    try:
        cfg = compose("config", overrides=list(overrides))
        OmegaConf.to_container(cfg, resolve=True)  # a dangling ${...} fails here, not mid-study
        return cfg
    except yaml.YAMLError as err:
        raise ConfigError(f"config file error: {' '.join(str(err).split())}") from None
    except (HydraException, OmegaConfBaseException, ValueError) as err:
        raise ConfigError(_composition_message(str(err))) from None


def _composition_message(message: str) -> str:
    unknown = re.search(r"Could not override '([^']+)'", message)
    if unknown:
        return f"unknown key '{unknown.group(1)}': no such key in the composed config (see conf/ for the keys)"
    lines = [line for line in message.strip().splitlines() if line.strip()]
    return " ".join(lines[:2]) if lines else "the config could not be composed"


class Composer:
    """Builds each trial's config as Hydra would compose it from the run's and the trial's overrides.

    A Hydra compose costs ~40 ms, the largest fixed cost of a trial, so this composes once per distinct set of
    group choices (optimizer=..., scheduler=...) and sets the sampled scalar values on a copy (~0.3 ms). Both give
    the same config for plain key=value overrides; tests check it against a full compose.
    """

    def __init__(self, base_overrides: Sequence[str]) -> None:
        self.base_overrides = list(base_overrides)
        self.groups = group_options()
        self.base = compose_config(self.base_overrides)
        self._by_choices: dict[tuple[str, ...], DictConfig] = {(): self.base}

    def __call__(self, values: dict[str, Any]) -> DictConfig:
        """The config for base overrides + these key -> value settings (group keys take an option name)."""
        choices = tuple(f"{k}={v}" for k, v in values.items() if k in self.groups)
        if choices not in self._by_choices:
            self._by_choices[choices] = compose_config(self.base_overrides + list(choices))
        cfg = self._by_choices[choices].copy()
        for key, value in values.items():
            if key not in self.groups:
                if not has_key(cfg, key):
                    raise ConfigError(f"unknown key '{key}': no such key in the composed config")
                OmegaConf.update(cfg, key, value, merge=False)
        return cfg


def has_key(cfg: DictConfig, key: str) -> bool:
    """Whether the dotted key exists, also when its value is still missing (???)."""
    head, _, tail = key.rpartition(".")
    parent = OmegaConf.select(cfg, head, throw_on_missing=False) if head else cfg
    return isinstance(parent, DictConfig) and tail in parent.keys()


_ABSENT = object()


def format_override(key: str, value: Any) -> str:
    """key=value as Hydra's override grammar reads it back to the same value."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif value is None:
        text = "null"
    elif isinstance(value, float):
        text = repr(value)
    else:
        text = str(value)
    return f"{key}={text}"


# Keys holding counts or durations: a wrong type or a non-positive value is bad input, caught before any trial.
_POSITIVE_INTS = (
    "study.n_trials", "study.max_consecutive_failures", "trainer.max_epochs", "trainer.eval_batch_size",
    "trainer.devices", "trainer.process_group_timeout_s",
    "model.width", "model.depth", "data.size", "data.features", "data.informative", "data.classes",
)
_FRACTIONS = ("data.val_fraction", "data.test_fraction")
_SEEDS = ("seed", "study.seed")  # non-negative integers (NumPy and Optuna's samplers refuse negatives)
_CHOICES = {
    "study.direction": ("maximize", "minimize"),
    "study.metric": ("val_acc", "val_loss", "train_loss"),
    "trainer.accelerator": ("auto", "cpu", "gpu", "cuda"),
    "trainer.process_group_backend": ("auto", "nccl", "gloo"),
    "trainer.precision": ("auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true"),
}


def validate_config(cfg: DictConfig) -> None:
    """Checks values the composition cannot: types and ranges of counts, durations and named choices."""
    try:
        _check_values(cfg)
    except OmegaConfBaseException as err:  # a required key deleted with ~key, or the like
        key = getattr(err, "full_key", None) or "config"
        raise ConfigError(f"{key}: required key is missing or unreadable ({str(err).splitlines()[0]})") from None


def _check_values(cfg: DictConfig) -> None:
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"{missing[0]}: required but not set; give it on the command line ({missing[0]}=...)")
    for key in _POSITIVE_INTS:
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        if value is not _ABSENT and not _is_positive_int(value):
            raise ConfigError(f"{key}: expected a positive integer, got {value!r}")
    if not isinstance(cfg.study.name, str) or not cfg.study.name:
        raise ConfigError(f"study.name: expected a name, got {cfg.study.name!r} (quote it: study.name=\"'...'\")")
    timeout = cfg.study.timeout
    if timeout is not None and not (_is_number(timeout) and timeout > 0):
        raise ConfigError(f"study.timeout: expected a positive number of seconds or null, got {timeout!r}")
    limit = cfg.trainer.limit_train_batches
    if limit is not None and not _is_positive_int(limit):
        raise ConfigError(f"trainer.limit_train_batches: expected a positive integer or null, got {limit!r}")
    batch = cfg.data.batch_size
    if batch != "full" and not _is_positive_int(batch):
        raise ConfigError(f"data.batch_size: expected a positive integer or 'full', got {batch!r}")
    for key, allowed in _CHOICES.items():
        if OmegaConf.select(cfg, key) not in allowed:
            raise ConfigError(f"{key}: expected one of {', '.join(allowed)}, got {OmegaConf.select(cfg, key)!r}")
    for key, table in (("study.sampler", "study.samplers"), ("study.pruner", "study.pruners")):
        names = list(OmegaConf.select(cfg, table))
        if OmegaConf.select(cfg, key) not in names:
            raise ConfigError(f"{key}: unknown '{OmegaConf.select(cfg, key)}' (choose from {', '.join(names)})")
    for key in _FRACTIONS:
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        if value is not _ABSENT and not (_is_number(value) and 0 < value < 1):
            raise ConfigError(f"{key}: expected a fraction between 0 and 1, got {value!r}")
    if not (_is_number(cfg.optimizer.lr) and cfg.optimizer.lr > 0):
        raise ConfigError(f"optimizer.lr: expected a positive number, got {cfg.optimizer.lr!r}")
    if not (_is_number(cfg.model.dropout) and 0 <= cfg.model.dropout < 1):
        raise ConfigError(f"model.dropout: expected a rate in [0, 1), got {cfg.model.dropout!r}")
    if not (_is_number(cfg.model.l1) and cfg.model.l1 >= 0):
        raise ConfigError(f"model.l1: expected a non-negative number, got {cfg.model.l1!r}")
    for key in _SEEDS:
        value = OmegaConf.select(cfg, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"{key}: expected a non-negative integer, got {value!r}")


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
