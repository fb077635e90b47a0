"""study.warm_start: a new study starts from the best configurations of earlier ones.

Before the study's first trial, the top study.warm_start_top_k complete trials of each named study (ranked by its own
first metric and direction) are enqueued (Optuna's `enqueue_trial`): the study's first trials train them, and the
sampler learns from their results as from any trial. Each is fitted to this study's space (`fit_to_space`):

- a key this space draws that the earlier trial lacks takes this space's default (the value in the config composed
  with the trial's group choices: what a trial that did not draw it would train);
- a number outside this space's range is clipped into it (onto its integer or `step` grid);
- a choice this space does not offer (an optimizer it does not search) skips that configuration: it would be another
  configuration, not the earlier one; a default outside the choices is left to the sampler.

The earlier trials themselves are not copied into this study (Optuna's `add_trials`): the study's budget counts its
finished trials (searchlab.study.budget), so copies would eat it, and they would stand in the report, the best trial
and the model export without a run, a config or a command of this study. Enqueued, they are trained and tracked here.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf
from optuna.storages import BaseStorage
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from searchlab.attrs import CONSTRAINED, OVERRIDES, WARM_START_OF
from searchlab.config import Composer, ConfigError, Objectives, redact
from searchlab.config.space import Param, SearchSpace, same
from searchlab.study.storage import open_storage

_SKIP = object()  # the configuration cannot be fitted to this space


@dataclass(frozen=True)
class Source:
    """One study named in study.warm_start: its label as written, and its top complete trials."""

    label: str
    metric: str
    trials: tuple[FrozenTrial, ...]


@dataclass
class Fitted:
    """What fitting one earlier trial to this space did: the params to enqueue, or why it was skipped."""

    params: dict[str, Any]
    defaults: dict[str, Any] = field(default_factory=dict)
    clipped: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    skipped: str | None = None


@dataclass(frozen=True)
class WarmStart:
    """The configurations to enqueue, read and checked before any store is written (`plan`), enqueued once the
    study is open and still empty (`enqueue`)."""

    sources: tuple[Source, ...]
    space: SearchSpace
    composer: Composer
    limit: int  # at most the study's budget: more would wait in its queue unrun

    def enqueue(self, study: optuna.Study) -> list[str]:
        """Enqueues the fitted configurations; returns the lines that say what was taken."""
        lines, total = [], 0
        for source in self.sources:
            taken: list[str] = []
            defaults: dict[str, Any] = {}
            clipped: list[str] = []
            skipped: list[str] = []
            for trial in source.trials:
                fitted = fit_to_space(trial_values(trial), self.space, self.composer)
                where = f"#{trial.number}"
                if fitted.skipped is not None:
                    skipped.append(f"{where} ({fitted.skipped})")
                    continue
                if total >= self.limit:
                    skipped.append(f"{where} (past study.n_trials={self.limit})")
                    continue
                study.enqueue_trial(fitted.params, user_attrs={WARM_START_OF: f"{source.label}#{trial.number}"},
                                    skip_if_exists=True)
                total += 1
                taken.append(f"{where} {source.metric}={trial.values[0]:.4g}")
                defaults.update(fitted.defaults)
                clipped += [f"{k} {_short(a)}->{_short(b)} ({where})" for k, (a, b) in fitted.clipped.items()]
            line = (f"warm start: {len(taken)} configuration{'s' if len(taken) != 1 else ''} of study "
                    f"'{source.label}' enqueued as the first trials ({', '.join(taken) or 'none'})")
            if defaults:
                line += "; keys it lacks take their default (in this space's range): " + ", ".join(
                    f"{k}={_short(v)}" for k, v in defaults.items())
            if clipped:
                line += "; clipped into this space: " + ", ".join(clipped)
            if skipped:
                line += "; skipped: " + ", ".join(skipped)
            lines.append(line)
        return lines


def plan(entries: Sequence[str], top_k: int, storage_url: str, study_name: str, space: SearchSpace,
         composer: Composer, budget: int) -> WarmStart | None:
    """Reads study.warm_start's studies (NAME in this study's storage, or NAME@STORAGE) and their top_k complete
    trials; refuses, as one line, a study that does not exist or shares no key with this space. None when empty."""
    if not entries:
        return None
    sources = []
    for entry in entries:
        name, _, url = entry.partition("@")
        url = url or storage_url
        label = name if url == storage_url else f"{name}@{redact(url)}"
        if name == study_name and url == storage_url:
            raise ConfigError(f"study.warm_start: '{name}' is this study; name an earlier study (resuming this one "
                              "needs no warm start)")
        study = _load(name, url)
        sources.append(_top(study, label, top_k))
    keys = {p.name for p, _ in space.walk()}
    for source in sources:
        known = {k for t in source.trials for k in trial_values(t)}
        if not source.trials:
            raise ConfigError(f"study.warm_start: study '{source.label}' has no complete trial to start from; "
                              "remove it from study.warm_start")
        if not known & keys:
            raise ConfigError(f"study.warm_start: study '{source.label}' shares no key with this space "
                              f"({space.source}: {', '.join(sorted(keys)[:6])}); name a study of the same "
                              "config keys")
    return WarmStart(tuple(sources), space, composer, budget)


def _load(name: str, url: str) -> optuna.Study:
    """The existing study; a missing storage or study is refused without creating either."""
    local = url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else url
    if ("://" not in url or url.startswith("sqlite:///")) and not Path(local).is_file():
        raise ConfigError(f"study.warm_start: no study storage at {redact(url)} for study '{name}'; write it as "
                          "NAME (this study's storage) or NAME@STORAGE")
    try:
        storage = open_storage(url)
    except ConfigError as err:  # its message names study.storage: here it is a study.warm_start entry's
        raise ConfigError(f"study.warm_start: {name}@{redact(url)}: {str(err).split(': ', 1)[-1]}") from None
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        names = _names(storage)
        near = difflib.get_close_matches(name, names, n=1)
        hint = f"did you mean '{near[0]}'? " if near else ""
        raise ConfigError(f"study.warm_start: no study '{name}' in {redact(url)} ({hint}studies there: "
                          f"{', '.join(names[:10]) or 'none'})") from None


def _names(storage: BaseStorage) -> list[str]:
    return sorted(s.study_name for s in storage.get_all_studies())


def _top(study: optuna.Study, label: str, top_k: int) -> Source:
    """The study's top_k complete trials by its first metric (a multi-objective study's first metric too)."""
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if t.values and math.isfinite(t.values[0])]
    maximize = study.directions[0] == StudyDirection.MAXIMIZE
    ranked = sorted(complete, key=lambda t: t.values[0], reverse=maximize)
    metric = Objectives.of_study(study, ["value"]).primary
    return Source(label, metric, tuple(ranked[:top_k]))


def trial_values(trial: FrozenTrial) -> dict[str, Any]:
    """Config key -> value of an earlier trial: its drawn params, the keys a constraint set, and the keys its
    study fixed on the command line (in its re-run overrides), drawn params first."""
    values: dict[str, Any] = {}
    for text in trial.user_attrs.get(OVERRIDES, []):
        try:
            (override,) = OverridesParser.create().parse_overrides([text])
        except Exception:  # an override this Hydra cannot read back: that key is simply not known
            continue
        if not override.is_delete():
            values[override.key_or_group] = override.value()
    return {**values, **trial.user_attrs.get(CONSTRAINED, {}), **trial.params}


def fit_to_space(values: Mapping[str, Any], space: SearchSpace, composer: Composer) -> Fitted:
    """The params of this space for an earlier trial's values, walking the branches its group choices take."""
    fitted = Fitted(params={})
    chosen: dict[str, Any] = {}  # every value so far, for the constraints and the group choices' defaults
    pending = list(space.params)
    while pending:
        param = pending.pop(0)
        if any(param.name in c.fix and c.holds(chosen) for c in space.constraints):
            continue  # a constraint sets it in this trial: Optuna does not draw it
        if param.name in values:
            value = _fit(param, values[param.name], fitted)
            if value is _SKIP:
                fitted.skipped = f"{param.name}={_short(values[param.name])} is not among this space's choices"
                return fitted
        else:
            value = _default(param, chosen, composer)
            value = _SKIP if value is _SKIP else _fit(param, value, Fitted({}))  # a default: its value is shown
            if value is _SKIP:
                continue  # no default inside this space: the sampler draws it (and its option's keys)
            fitted.defaults[param.name] = value
        fitted.params[param.name] = chosen[param.name] = value
        pending[0:0] = param.branches.get(value, ())
    return fitted


def _default(param: Param, chosen: Mapping[str, Any], composer: Composer) -> Any:
    """The key's value in the config composed with the group options chosen so far (a group: its base option)."""
    if param.name in composer.groups:
        return composer.choices.get(param.name, _SKIP)
    cfg = composer({k: v for k, v in chosen.items() if k in composer.groups})
    return OmegaConf.select(cfg, param.name, default=_SKIP)


def _fit(param: Param, value: Any, fitted: Fitted) -> Any:
    """The value as this space can draw it: one of its choices, or a number clipped into its range."""
    if param.is_choice:
        return next((c for c in param.choices if same(c, value)), _SKIP)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return _SKIP
    integer = isinstance(param.low, int) and isinstance(param.high, int)
    new = min(max(value, param.low), param.high)
    if param.step:
        new = param.low + round((new - param.low) / param.step) * param.step
        new = min(new, param.high)
    new = int(round(new)) if integer else float(new)
    if not math.isclose(new, value, rel_tol=1e-12, abs_tol=0.0):
        fitted.clipped[param.name] = (value, new)
    return new


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return {True: "true", False: "false", None: "null"}.get(value, str(value)) if not isinstance(
        value, (int, float)) or isinstance(value, bool) else str(value)
