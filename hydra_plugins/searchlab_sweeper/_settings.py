"""The sweeper's settings (`hydra.sweeper.*`) checked before any store is written, with searchlab's own checks:
study and tracking settings by searchlab.config.validate_study, the space by searchlab.space.parse_space and
check_keys against the app's own config (composed by Hydra's config loader, as the launcher will compose each job).
Every problem is one line naming the key, raised as searchlab's ConfigError.
"""

from __future__ import annotations

import difflib
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from searchlab.config import ConfigError, has_key, validate_study
from searchlab.config.space import CONSTRAINTS_KEY, SearchSpace, check_keys, flat_values, parse_space
from searchlab.devices import worker_count

from .searchlab_sweeper import sweeper_defaults

PREFIX = "hydra.sweeper"
_KEYS = ("study", "space", "search", "tracking", "report", "workers", "callbacks_key", "ckpt_path_key",
         "checkpoint_every_n_epochs", "checkpoint_auto_seconds", "worker")
_NESTED = ("study", "tracking", "report")  # their keys are searchlab's: checked against its defaults
_EXTENSIBLE = ("study.samplers", "study.pruners")  # tables the user may add entries to


@dataclass(frozen=True)
class SweepSettings:
    """What the sweep runs: `cfg` holds study, tracking, report and workers as searchlab's own config does (so its
    session code reads them unchanged); `fixed` the keys the command line set (they leave the space)."""

    cfg: DictConfig
    space: SearchSpace
    callbacks_key: str
    worker: bool  # this process is one of the sweeper's workers
    arguments: list[str]
    fixed: dict[str, str]
    ckpt_path_key: str | None = None  # the app's key its trainer.fit(ckpt_path=...) reads; None: no checkpoints


def read_settings(settings: Mapping[str, Any], arguments: Sequence[str], config_loader: Any,
                  master: DictConfig) -> SweepSettings:
    """All of the sweeper's checks, in the order a user fixes them: its own keys, the study and tracking values,
    the command line, then the space against the app's config."""
    settings = OmegaConf.to_container(OmegaConf.create(dict(settings)), resolve=True)
    _check_keys(settings)
    cfg = OmegaConf.create({key: settings[key] for key in _NESTED})
    cfg.workers = settings["workers"]
    with _named():
        validate_study(cfg)
        worker_count(cfg.workers, [])
    key = settings["callbacks_key"]
    if not isinstance(key, str) or not key:
        raise ConfigError(f"{PREFIX}.callbacks_key: expected the app's config key of its Trainer callbacks "
                          f"(e.g. callbacks), got {key!r}")
    worker = settings["worker"]
    if not isinstance(worker, bool):
        raise ConfigError(f"{PREFIX}.worker: set by the sweeper for its worker processes; leave it unset")
    cfg.trainer = _checkpoint_settings(settings)  # where searchlab.training.checkpoints reads them
    ckpt_key = settings["ckpt_path_key"]
    if ckpt_key is not None and (not isinstance(ckpt_key, str) or not ckpt_key):
        raise ConfigError(f"{PREFIX}.ckpt_path_key: expected the app's config key that its trainer.fit(ckpt_path=...) "
                          f"reads (e.g. ckpt_path), or null for no checkpoints; got {ckpt_key!r}")
    if ckpt_key is not None and not has_key(master, ckpt_key):
        ckpt_key = None  # the app cannot resume a checkpoint: none is written (the README says what an app needs)
    fixed = _fixed(arguments, key)
    composer = AppComposer(config_loader, master, list(arguments))
    spec, source = _space_spec(settings, master)
    config = _flat_config(master, composer.groups) if isinstance(spec, Mapping) and CONSTRAINTS_KEY in spec else None
    space = parse_space(spec, composer.groups, fixed, source, config)
    if not space.params:
        raise ConfigError(f"{source}: the space is empty (every key in it is fixed on the command line or by a "
                          "constraint)")
    check_keys(space, composer, validate=_composes)
    from searchlab.report import check_settings  # last: it imports the tracking and training modules

    with _named():
        check_settings(cfg.report)
    return SweepSettings(cfg, space, key, worker, list(arguments), fixed, ckpt_key)


def _checkpoint_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """checkpoint_every_n_epochs and checkpoint_auto_seconds, checked as searchlab's own trainer keys."""
    every, seconds = settings["checkpoint_every_n_epochs"], settings["checkpoint_auto_seconds"]
    if every != "auto" and not (isinstance(every, int) and not isinstance(every, bool) and every > 0):
        raise ConfigError(f"{PREFIX}.checkpoint_every_n_epochs: expected auto or a positive integer (epochs), "
                          f"got {every!r}")
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds <= 0:
        raise ConfigError(f"{PREFIX}.checkpoint_auto_seconds: expected a positive number of seconds, got {seconds!r}")
    return {"checkpoint_every_n_epochs": every, "checkpoint_auto_seconds": seconds}


class _named:
    """searchlab's messages name `study.n_trials`; under the sweeper the key is `hydra.sweeper.study.n_trials`."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, err: BaseException | None, _tb: Any) -> bool:
        if isinstance(err, ConfigError) and not str(err).startswith(PREFIX):
            raise ConfigError(f"{PREFIX}.{err}") from None
        return False


def _check_keys(settings: Mapping[str, Any]) -> None:
    """Unknown keys under hydra.sweeper, at any depth of study/tracking/report, with the nearest known name."""
    defaults = OmegaConf.to_container(OmegaConf.create(sweeper_defaults()), resolve=False)
    for key in settings:
        if key.startswith("_") and key.endswith("_"):
            continue
        if key not in _KEYS:
            raise ConfigError(f"{PREFIX}.{key}: unknown key{_near(key, _KEYS)} (the keys: {', '.join(_KEYS[:-1])})")
    for group in _NESTED:
        if not isinstance(settings[group], Mapping):
            raise ConfigError(f"{PREFIX}.{group}: expected a mapping of searchlab's {group} settings, "
                              f"got {settings[group]!r}")
        _check_nested(settings[group], defaults[group], group)


def _check_nested(given: Mapping[str, Any], known: Mapping[str, Any], path: str) -> None:
    for key, value in given.items():
        where = f"{path}.{key}"
        if key not in known:
            if path in _EXTENSIBLE:
                continue  # a new sampler or pruner entry
            raise ConfigError(f"{PREFIX}.{where}: unknown key{_near(str(key), known, f'{PREFIX}.{path}.')}")
        if isinstance(value, Mapping) and isinstance(known[key], Mapping):
            _check_nested(value, known[key], where)


def _near(key: str, names: Sequence[str] | Mapping[str, Any], prefix: str = "") -> str:
    close = difflib.get_close_matches(key, [str(n) for n in names], n=1)
    return f"; did you mean '{prefix}{close[0]}'?" if close else ""


def _fixed(arguments: Sequence[str], callbacks_key: str) -> dict[str, str]:
    """The command line's task overrides (key -> text value); a sweep of values (a,b or range()) is refused: the
    space is the sweeper's."""
    fixed: dict[str, str] = {}
    for text in arguments:
        try:
            (override,) = OverridesParser.create().parse_overrides([text])
        except OverrideParseException as err:
            raise ConfigError(f"malformed override '{text}': {str(err).splitlines()[0]} (expected key=value)") from None
        key = override.key_or_group
        if override.is_sweep_override():
            raise ConfigError(f"'{text}': a sweep over values on the command line; searchlab's sweeper draws its "
                              f"values from {PREFIX}.space (put {key} there, or give it one value)")
        if key == callbacks_key or key.startswith(f"{callbacks_key}.searchlab"):
            raise ConfigError(f"'{text}': {callbacks_key}.searchlab is the entry the sweeper adds to every job; "
                              f"choose another name")
        fixed[key] = text.split("=", 1)[1] if "=" in text else ""
    return fixed


def _space_spec(settings: Mapping[str, Any], master: DictConfig) -> tuple[Any, str]:
    """The space mapping and where it came from: hydra.sweeper.space, or the YAML file hydra.sweeper.search names
    (relative to the current folder, else to the app's primary config folder)."""
    space, search = settings["space"], settings["search"]
    if space is not None and search is not None:
        raise ConfigError(f"{PREFIX}.space and {PREFIX}.search are both set; give the space once (inline in space, "
                          "or as a file in search)")
    if space is not None:
        return space, f"{PREFIX}.space"
    if search is None:
        raise ConfigError(f"{PREFIX}.space: no search space; give space: {{model.optimizer.lr: {{low: 1.0e-4, "
                          f"high: 0.1, log: true}}, ...}} or search: FILE (searchlab's space format)")
    if not isinstance(search, str) or not search:
        raise ConfigError(f"{PREFIX}.search: expected the path of a YAML space file, got {search!r}")
    candidates = [Path(search)]
    primary = _primary_config_dir(master)
    if primary is not None and not Path(search).is_absolute():
        candidates.append(primary / search)
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise ConfigError(f"{PREFIX}.search: no such file '{search}' (looked in the current folder"
                          f"{' and ' + str(primary) if primary else ''})")
    try:
        return yaml.safe_load(path.read_text()) or {}, str(path)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(err).split())[:200]})") from None


def _primary_config_dir(master: DictConfig) -> Path | None:
    for source in master.hydra.runtime.config_sources:
        if source.provider == "main" and str(source.path).startswith("file://"):
            return Path(str(source.path).removeprefix("file://"))
    return None


def _composes(cfg: DictConfig) -> None:
    """The app's config has no searchlab schema: a space value is checked by Hydra composing it (in AppComposer)."""


class AppComposer:
    """The app's config for a trial's values, as Hydra's launcher composes a job (load_sweep_config): once per
    distinct set of group choices, scalars set on a copy. searchlab.config.space.check_keys composes each searched key's
    extremes with it, so a key the app does not have is refused before any trial."""

    def __init__(self, config_loader: Any, master: DictConfig, arguments: list[str]) -> None:
        self.loader, self.master, self.arguments = config_loader, master, arguments
        self.groups = app_groups(config_loader)
        self._by_choices: dict[tuple[str, ...], DictConfig] = {}

    def compose(self, overrides: Sequence[str]) -> DictConfig:
        try:
            return self.loader.load_sweep_config(self.master, [*self.arguments, *overrides])
        except (HydraException, OmegaConfBaseException, ValueError) as err:
            lines = [line for line in str(err).strip().splitlines() if line.strip()]
            raise ConfigError(" ".join(lines[:2]) or "the app's config could not be composed") from None

    def __call__(self, values: Mapping[str, Any]) -> DictConfig:
        choices = tuple(f"{k}={v}" for k, v in values.items() if k in self.groups)
        if choices not in self._by_choices:
            self._by_choices[choices] = self.compose(choices)
        cfg = pickle.loads(pickle.dumps(self._by_choices[choices]))
        for key, value in values.items():
            if key in self.groups:
                continue
            if not has_key(cfg, key):
                raise ConfigError(f"unknown key '{key}': no such key in the app's config")
            OmegaConf.update(cfg, key, value, merge=False)
        return cfg


def app_groups(config_loader: Any, parent: str = "") -> dict[str, list[str]]:
    """The app's config groups (hydra's own left out) and their options, nested groups as `a/b`."""
    groups: dict[str, list[str]] = {}
    for name in config_loader.list_groups(parent):
        full = f"{parent}/{name}" if parent else name
        if full == "hydra":
            continue
        groups[full] = sorted(config_loader.get_group_options(full))
        groups.update(app_groups(config_loader, full))
    return groups


def _flat_config(master: DictConfig, groups: Mapping[str, list[str]]) -> dict[str, Any]:
    """Every key of the app's config (dotted) and each group's chosen option, for `_constraints_` over keys the space
    does not draw. Interpolations are left unresolved (${hydra:...} resolves only inside a job)."""
    app = {k: v for k, v in OmegaConf.to_container(master, resolve=False).items() if k != "hydra"}
    return flat_values(app, groups, master.hydra.runtime.choices)

