"""The search space: YAML (conf/search/) -> Optuna suggestions -> config settings for the trial.

A key naming a config group (optimizer, scheduler, ...) is a conditional choice: each option may bring keys that are
searched only when it is chosen. Keys the user fixed on the command line leave the space.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import optuna
from omegaconf import OmegaConf

from searchlab.config import Composer, ConfigError, validate_config

_RANGE_KEYS = {"low", "high", "log", "step", "grid"}
_CHOICE_KEYS = {"choices"}


@dataclass(frozen=True)
class Param:
    """One searched config key: a numeric range, a set of values, or a config-group choice with its branches."""

    name: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple[Any, ...] = ()
    grid: tuple[Any, ...] = ()
    branches: Mapping[str, tuple[Param, ...]] = field(default_factory=dict)

    @property
    def is_choice(self) -> bool:
        return bool(self.choices)

    def suggest(self, trial: optuna.Trial, use_grid: bool) -> Any:
        if self.is_choice:
            return trial.suggest_categorical(self.name, list(self.choices))
        if use_grid:
            return trial.suggest_categorical(self.name, list(self.grid))
        if isinstance(self.low, int) and isinstance(self.high, int):
            return trial.suggest_int(self.name, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), step=self.step, log=self.log)


@dataclass(frozen=True)
class SearchSpace:
    """The parsed space; `sample` walks it for one trial, descending into the chosen branch of each group."""

    params: tuple[Param, ...]
    source: str

    def sample(self, trial: optuna.Trial, use_grid: bool = False) -> dict[str, Any]:
        """Config key -> sampled value for one trial, in the order sampled."""
        values: dict[str, Any] = {}
        pending = list(self.params)
        while pending:
            param = pending.pop(0)
            values[param.name] = param.suggest(trial, use_grid)
            pending[0:0] = param.branches.get(values[param.name], ())
        return values

    def walk(self) -> Iterable[tuple[Param, dict[str, str]]]:
        """Every param with the group choices that must hold for it to be searched."""
        stack: list[tuple[Param, dict[str, str]]] = [(p, {}) for p in self.params]
        while stack:
            param, conditions = stack.pop(0)
            yield param, conditions
            for option, params in param.branches.items():
                stack.extend((p, {**conditions, param.name: option}) for p in params)

    def grid(self) -> dict[str, list[Any]]:
        """The grid sampler's search space: every searched key needs `choices` or `grid` values."""
        grid: dict[str, list[Any]] = {}
        for param, _ in self.walk():
            values = list(param.choices or param.grid)
            if not values:
                raise ConfigError(
                    f"{self.source}: '{param.name}' has no `grid` values; study.sampler=grid needs them "
                    f"(add grid: [...] to it, or fix it on the command line)"
                )
            grid[param.name] = sorted({*grid.get(param.name, []), *values}, key=repr)
        return grid


def parse_space(
    spec: Mapping[str, Any], groups: Mapping[str, list[str]], fixed: Mapping[str, str], source: str
) -> SearchSpace:
    """Reads a search-space mapping; `fixed` holds the keys set on the command line (key -> text value)."""
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{source}: expected a mapping of config keys to ranges or choices")
    params: list[Param] = []
    for name, entry in spec.items():
        param = _parse_param(str(name), entry, groups, fixed, source)
        if name in fixed:
            # The user fixed this key: it leaves the space, but a fixed group option keeps its own keys searched.
            params.extend(param.branches.get(fixed[name], ()))
        else:
            params.append(param)
    return SearchSpace(params=tuple(params), source=source)


def _parse_param(
    name: str, entry: Any, groups: Mapping[str, list[str]], fixed: Mapping[str, str], source: str
) -> Param:
    where = f"{source}: '{name}'"
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{where}: expected {{low: ..., high: ...}} or {{choices: [...]}}, got {entry!r}")
    keys = set(entry)
    if name in groups:
        if keys != _CHOICE_KEYS:
            raise ConfigError(f"{where} is a config group: give its options as `choices` (a list or a mapping)")
        return _parse_group(name, entry["choices"], groups, fixed, source)
    if "choices" in keys:
        if keys != _CHOICE_KEYS:
            raise ConfigError(f"{where}: `choices` cannot be combined with {sorted(keys - _CHOICE_KEYS)}")
        choices = entry["choices"]
        if not isinstance(choices, (list, tuple)) or not choices:
            raise ConfigError(f"{where}: `choices` must be a non-empty list")
        return Param(name=name, choices=tuple(choices))
    unknown = keys - _RANGE_KEYS
    if unknown or not {"low", "high"} <= keys:
        raise ConfigError(f"{where}: a range needs `low` and `high` (allowed keys: {', '.join(sorted(_RANGE_KEYS))})")
    low, high, log, step = entry["low"], entry["high"], entry.get("log", False), entry.get("step")
    for bound in ("low", "high"):
        if isinstance(entry[bound], bool) or not isinstance(entry[bound], (int, float)) or not math.isfinite(
                entry[bound]):
            raise ConfigError(f"{where}: `{bound}` must be a finite number, got {entry[bound]!r}")
    if low > high:
        raise ConfigError(f"{where}: low ({low}) is greater than high ({high})")
    if not isinstance(log, bool):
        raise ConfigError(f"{where}: `log` must be true or false")
    if log and low <= 0:
        raise ConfigError(f"{where}: a log range needs positive bounds, got low={low}")
    if log and step is not None:
        raise ConfigError(f"{where}: `step` cannot be combined with `log: true`")
    if step is not None and not (isinstance(step, (int, float)) and step > 0):
        raise ConfigError(f"{where}: `step` must be a positive number, got {step!r}")
    grid = entry.get("grid", ())
    if not isinstance(grid, (list, tuple)):
        raise ConfigError(f"{where}: `grid` must be a list of values")
    return Param(name=name, low=low, high=high, log=log, step=step, grid=tuple(grid))


def _parse_group(
    name: str, choices: Any, groups: Mapping[str, list[str]], fixed: Mapping[str, str], source: str
) -> Param:
    where = f"{source}: '{name}'"
    if isinstance(choices, (list, tuple)):
        choices = {option: {} for option in choices}
    if not isinstance(choices, Mapping) or not choices:
        raise ConfigError(f"{where}: `choices` must be a non-empty list or mapping of options")
    branches: dict[str, tuple[Param, ...]] = {}
    for option, sub in choices.items():
        if option not in groups[name]:
            raise ConfigError(f"{where}: unknown option '{option}' (choose from {', '.join(groups[name])})")
        sub = sub or {}
        if not isinstance(sub, Mapping):
            raise ConfigError(f"{where}: option '{option}' must map to its own keys ({{}} for none)")
        branches[option] = tuple(
            _parse_param(str(key), value, groups, fixed, source) for key, value in sub.items() if key not in fixed
        )
    return Param(name=name, choices=tuple(branches), branches=branches)


def check_keys(space: SearchSpace, composer: Composer) -> None:
    """Every searched key must exist in the config its conditions compose, and its extreme values (or each
    choice) must pass the config's own checks: a width of 0 or a text lr fails here, not in a trial."""
    for param, conditions in space.walk():
        if param.name in composer.groups:
            continue
        when = f" when {', '.join(f'{k}={v}' for k, v in conditions.items())}" if conditions else ""
        for value in param.choices or (param.low, param.high, *param.grid):
            try:
                cfg = composer({**conditions, param.name: value})
            except ConfigError:
                raise ConfigError(f"{space.source}: '{param.name}' is not a key of the config{when}") from None
            try:
                validate_config(cfg)
            except ConfigError as err:
                raise ConfigError(
                    f"{space.source}: '{param.name}' value {value!r} is not allowed{when}: {err}") from None


def load_space(composer: Composer, fixed: Mapping[str, str]) -> SearchSpace:
    """The space of the composed config's `search` group, validated against the config it will set."""
    base = composer.base
    source = f"conf/search/{fixed.get('search', 'default')}.yaml"
    spec = OmegaConf.to_container(base.search, resolve=True) if "search" in base else {}
    space = parse_space(spec or {}, composer.groups, fixed, source)
    if not space.params:
        raise ConfigError(f"{source}: the space is empty (every key in it is fixed on the command line)")
    check_keys(space, composer)
    return space

