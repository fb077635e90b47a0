"""The search space: YAML (conf/search/) -> Optuna suggestions -> config settings for the trial.

A key naming a config group (optimizer, scheduler, ...) is a conditional choice: each option may bring keys that are
searched only when it is chosen. Keys the user fixed on the command line leave the space.

The reserved key `_constraints_` lists impossible combinations, so that no trial is spent on them:

    _constraints_:
      - when: {data.batch_size: 1}        # when every one of these keys has this value ...
        fix: {model.batch_norm: false}    # ... these searched keys are not drawn but set to these values
        why: batch norm needs batches of 2 or more      # optional, shown by the space check

A constrained key is simply not suggested in the trials where its constraint holds (Optuna's TPE with group=True
models such conditional keys), and the trial's config gets the fixed value. A `when` key that is fixed (on the
command line, or not searched at all) is read from the composed config once: the constraint then applies to every
trial or to none.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from searchlab.attrs import CONSTRAINED
from searchlab.config.compose import Composer, ConfigError, validate_config

_RANGE_KEYS = {"low", "high", "log", "step", "grid"}
_CHOICE_KEYS = {"choices"}
CONSTRAINTS_KEY = "_constraints_"  # the one top-level key of a space file that is not a config key
_CONSTRAINT_KEYS = {"when", "fix", "why"}
_ABSENT = object()  # a key with no value in the config



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

    def allows(self, value: Any) -> bool:
        """Whether a draw could give `value`: one of the choices, or a number inside the range (an integer for an
        integer range)."""
        if self.is_choice:
            return any(same(value, choice) for choice in self.choices)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if isinstance(self.low, int) and isinstance(self.high, int) and not float(value).is_integer():
            return False
        return self.low <= value <= self.high

    def describe(self) -> str:
        return f"one of {', '.join(map(_text, self.choices))}" if self.is_choice else f"in [{self.low}, {self.high}]"


def same(a: Any, b: Any) -> bool:
    """Value equality as a config reads it: true is not 1, and 1 is 1.0."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return a == b


def _text(value: Any) -> str:
    """A value as YAML and the command line write it (false, not False)."""
    if value is _ABSENT:
        return "(not in the config)"
    return {True: "true", False: "false", None: "null"}.get(value, str(value)) if not isinstance(
        value, (int, float)) or isinstance(value, bool) else str(value)


@dataclass(frozen=True)
class Constraint:
    """When every `when` key was drawn with its value in a trial, the `fix` keys are not drawn but set to theirs.

    Only the keys the space draws are left in it: a `when` key fixed for the whole study was resolved when the space
    was read (see `parse_space`)."""

    when: Mapping[str, Any]
    fix: Mapping[str, Any]

    def holds(self, values: Mapping[str, Any]) -> bool:
        """A `when` key not drawn in this trial (its group option not chosen) does not hold."""
        return all(key in values and same(values[key], value) for key, value in self.when.items())

    def text(self) -> str:
        return _pairs(self.when)


def _pairs(values: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={_text(v)}" for k, v in values.items())


def _keys(values: Mapping[str, Any]) -> str:
    return f"{', '.join(values)} {'is' if len(values) == 1 else 'are'}"


@dataclass(frozen=True)
class SearchSpace:
    """The parsed space; `sample` walks it for one trial, descending into the chosen branch of each group.

    `constraints` fix keys per trial; `fixed` holds the keys a constraint fixed for every trial (they left the
    space); `notes` says in words what each constraint of the space file does in this study."""

    params: tuple[Param, ...]
    source: str
    constraints: tuple[Constraint, ...] = ()
    fixed: Mapping[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def sample(self, trial: optuna.Trial, use_grid: bool = False) -> dict[str, Any]:
        """Config key -> value for one trial, in the order drawn, then the keys constraints fixed for every trial.

        A key a constraint fixes in this trial is not suggested to Optuna (so it is not one of the trial's params);
        its value is still returned, so that the trial's config and command carry it, and it is recorded in the
        trial's user attr `constrained`."""
        values: dict[str, Any] = {}
        constrained: dict[str, Any] = {}
        pending = list(self.params)
        while pending:
            param = pending.pop(0)
            rule = next((c for c in self.constraints if param.name in c.fix and c.holds(values)), None)
            if rule is None:
                values[param.name] = param.suggest(trial, use_grid)
            else:
                values[param.name] = constrained[param.name] = rule.fix[param.name]
            pending[0:0] = param.branches.get(values[param.name], ())
        if constrained:
            trial.set_user_attr(CONSTRAINED, constrained)
        return {**values, **self.fixed}

    def walk(self) -> Iterable[tuple[Param, dict[str, str]]]:
        """Every param with the group choices that must hold for it to be searched."""
        stack: list[tuple[Param, dict[str, str]]] = [(p, {}) for p in self.params]
        while stack:
            param, conditions = stack.pop(0)
            yield param, conditions
            for option, params in param.branches.items():
                stack.extend((p, {**conditions, param.name: option}) for p in params)

    def grid(self) -> dict[str, list[Any]]:
        """The grid sampler's search space: every searched key needs `choices` or `grid` values.

        Constraints: a key fixed for every trial is not in the grid; a value a constraint rules out is not in it
        either. A key a constraint fixes only in some trials keeps its grid values: in the grid points where the
        constraint holds, the key is set to the fixed value instead, so those points train the same configuration
        (as points differing only in the keys of an unchosen option do). The grid stays complete and finite."""
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

    def describe_constraints(self) -> list[str]:
        """One line per constraint of the space file: what it does in this study (for the study's first lines)."""
        return [f"constraint ({self.source}): {note}" for note in self.notes]


def parse_space(
    spec: Mapping[str, Any], groups: Mapping[str, list[str]], fixed: Mapping[str, str], source: str,
    config: Mapping[str, Any] | None = None,
) -> SearchSpace:
    """Reads a search-space mapping; `fixed` holds the keys set on the command line (key -> text value).

    `config` maps every config key (dotted, and each group to its chosen option) to its value in the composed
    config: a constraint's `when` keys that the space does not draw are read there. Without it, only the space's
    keys and the command line's are known."""
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{source}: expected a mapping of config keys to ranges or choices")
    spec = dict(spec)
    rules = spec.pop(CONSTRAINTS_KEY, None)
    params: list[Param] = []
    for name, entry in spec.items():
        param = _parse_param(str(name), entry, groups, fixed, source)
        if name in fixed:
            # The user fixed this key: it leaves the space, but a fixed group option keeps its own keys searched.
            params.extend(param.branches.get(fixed[name], ()))
        else:
            params.append(param)
    space = SearchSpace(params=tuple(params), source=source)
    if rules is None:
        return space
    # Every key the file can draw, before the command line fixed any: a constraint is checked against all of them.
    every = SearchSpace(tuple(_parse_param(str(n), e, groups, {}, source) for n, e in spec.items()), source)
    return _constrain(space, every, rules, fixed, config, groups)


def _constrain(space: SearchSpace, every: SearchSpace, rules: Any, fixed: Mapping[str, str],
               config: Mapping[str, Any] | None, groups: Mapping[str, list[str]]) -> SearchSpace:
    """Checks the `_constraints_` list and applies it to the space: per trial, for every trial, or by ruling out a
    value the command line made impossible."""
    source = space.source
    where = f"{source}: {CONSTRAINTS_KEY}"
    if not isinstance(rules, list) or not rules:
        raise ConfigError(f"{where}: expected a list of {{when: {{key: value}}, fix: {{key: value}}}} entries")
    drawable = {p.name: [q for q, _ in every.walk() if q.name == p.name] for p, _ in every.walk()}
    known = set(drawable) | set(groups) | set(fixed) | set(config or {})

    def static(key: str) -> Any:
        """The value of a key the space does not draw: set by an earlier constraint, else from the composed config,
        else from the command line."""
        if key in always:
            return always[key]
        if config is not None:
            return config.get(key, _ABSENT)
        if key in fixed:
            (override,) = OverridesParser.create().parse_overrides([f"{key}={fixed[key]}"])
            return override.value()
        return _ABSENT

    params, constraints, notes = list(space.params), [], []
    always: dict[str, Any] = {}
    for i, rule in enumerate(rules):
        at = f"{where}[{i}]"
        when, fix, why = _read_rule(rule, at)
        for key, value in when.items():
            if key not in known:
                raise ConfigError(f"{at}: unknown key '{key}' in `when`{_did_you_mean(key, known)}")
            if key in drawable and not any(p.allows(value) for p in drawable[key]):
                raise ConfigError(f"{at}: `when` {key}={_text(value)} can never hold: the space draws {key} "
                                  f"{drawable[key][0].describe()}")
        for key, value in fix.items():
            if key not in drawable:
                hint = " (a constraint fixes only keys the space searches)" if key in known else ""
                raise ConfigError(f"{at}: unknown key '{key}' in `fix`{hint}{_did_you_mean(key, drawable)}")
            if key in when:
                raise ConfigError(f"{at}: '{key}' is in both `when` and `fix`")
            bad = next((p for p in drawable[key] if not p.allows(value)), None)
            if bad is not None:
                raise ConfigError(f"{at}: `fix` {key}={_text(value)} is outside the space: it draws {key} "
                                  f"{bad.describe()}")
        searched = {p.name for p, _ in SearchSpace(tuple(params), source).walk()}
        dynamic = {k: v for k, v in when.items() if k in searched}
        static_when = {k: v for k, v in when.items() if k not in searched}
        because = f" ({why})" if why else ""
        differ = {k: static(k) for k, v in static_when.items() if not same(static(k), v)}
        if differ:
            notes.append(f"never applies in this study, since {_pairs(differ)} (it applies when {_pairs(when)})")
            continue
        conflicts = {k: v for k, v in fix.items() if k not in searched and k in fixed and not same(static(k), v)}
        if conflicts:
            # The command line fixed a key against the constraint: the combination `when` names must not be drawn.
            key, value = next(iter(conflicts.items()))
            told = f"{key}={fixed[key]} is fixed on the command line, but the constraint sets {key}={_text(value)}"
            if not dynamic:
                raise ConfigError(f"{at}: {told} when {_pairs(when)}, which holds in every trial; change one of them")
            ruled = next(iter(dynamic)) if len(dynamic) == 1 else None
            if ruled is None or not all(p.is_choice for p in drawable[ruled]):
                raise ConfigError(f"{at}: {told} when {_pairs(when)}; fix {', '.join(dynamic)} on the command line "
                                  f"too, or drop the constraint")
            params = _without(params, ruled, dynamic[ruled], at)
            notes.append(f"{ruled}={_text(dynamic[ruled])} is not drawn, since {key}={fixed[key]} is fixed on the "
                         f"command line{because}")
            continue
        drawn = {k: v for k, v in fix.items() if k in searched}
        if not drawn:
            continue  # every key it fixes is fixed already, to the same value
        if dynamic:
            constraints.append(Constraint(when=dynamic, fix=drawn))
            notes.append(f"{_keys(drawn)} not drawn when {_pairs(dynamic)}, but set: {_pairs(drawn)}{because}")
        else:
            params = _drop(params, drawn)
            always.update(drawn)
            notes.append(f"{_keys(drawn)} not drawn in any trial, since {_pairs(static_when)}, but set: "
                         f"{_pairs(drawn)}{because}")
    ordered = _order(tuple(params), constraints, source)
    return SearchSpace(ordered, source, tuple(constraints), always, tuple(notes))


def _read_rule(rule: Any, at: str) -> tuple[dict[str, Any], dict[str, Any], str | None]:
    if not isinstance(rule, Mapping) or not {"when", "fix"} <= set(rule) or set(rule) - _CONSTRAINT_KEYS:
        raise ConfigError(f"{at}: expected {{when: {{key: value}}, fix: {{key: value}}}} (and an optional `why`), "
                          f"got {rule!r}")
    parts = []
    for part in ("when", "fix"):
        entry = rule[part]
        if not isinstance(entry, Mapping) or not entry:
            raise ConfigError(f"{at}: `{part}` must be a non-empty mapping of config keys to values, got {entry!r}")
        for key, value in entry.items():
            if isinstance(value, (Mapping, list, tuple)):
                raise ConfigError(f"{at}: `{part}` {key} must be one value (a number, text, true/false), got {value!r}")
        parts.append({str(k): v for k, v in entry.items()})
    why = rule.get("why")
    if why is not None and not isinstance(why, str):
        raise ConfigError(f"{at}: `why` must be text, got {why!r}")
    return parts[0], parts[1], why


def _did_you_mean(key: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, sorted(candidates), n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


def _without(params: list[Param], key: str, value: Any, at: str) -> list[Param]:
    """The params with `value` taken out of `key`'s choices, wherever the key is drawn."""
    out = []
    for param in params:
        if param.name == key:
            choices = tuple(c for c in param.choices if not same(c, value))
            if not choices:
                raise ConfigError(f"{at}: no value of {key} is left to draw once {key}={_text(value)} is ruled out; "
                                  f"fix {key} on the command line instead")
            param = replace(param, choices=choices, branches={o: b for o, b in param.branches.items() if o in choices})
        out.append(replace(param, branches={o: tuple(_without(list(b), key, value, at))
                                            for o, b in param.branches.items()}))
    return out


def _drop(params: list[Param], values: Mapping[str, Any]) -> list[Param]:
    """The params without the keys fixed for every trial; a fixed group option keeps its own keys searched, as when
    the command line fixes it."""
    out: list[Param] = []
    for param in params:
        if param.name in values:
            out.extend(_drop(list(param.branches.get(values[param.name], ())), values))
        else:
            out.append(replace(param, branches={o: tuple(_drop(list(b), values)) for o, b in param.branches.items()}))
    return out


def _order(params: tuple[Param, ...], constraints: list[Constraint], source: str) -> tuple[Param, ...]:
    """The params reordered so that every `when` key is drawn before the keys its constraint fixes (a stable
    topological order, in each list of keys: the top level, and each option's own keys).

    A key decides whether its group option's keys are drawn, so a constraint that fixes a group from a key of one of
    its own options can never be ordered: that is refused."""
    params = tuple(replace(p, branches={o: _order(b, constraints, source) for o, b in p.branches.items()})
                   for p in params)
    subtrees = [{q.name for q, _ in SearchSpace((p,), source).walk()} for p in params]
    after: dict[int, set[int]] = {i: set() for i in range(len(params))}  # i -> entries that must come before it
    for constraint in constraints:
        for w in constraint.when:
            for f in constraint.fix:
                for i, names in enumerate(subtrees):
                    for j, others in enumerate(subtrees):
                        if w not in names or f not in others:
                            continue
                        if i != j:
                            after[j].add(i)
                        elif params[i].name == f:
                            raise ConfigError(f"{source}: {CONSTRAINTS_KEY}: '{f}' cannot be fixed from '{w}', which "
                                              f"is drawn only for some options of '{f}'")
    ordered: list[int] = []
    while len(ordered) < len(params):
        ready = [i for i in range(len(params)) if i not in ordered and after[i] <= set(ordered)]
        if not ready:
            stuck = sorted(params[i].name for i in range(len(params)) if i not in ordered)
            raise ConfigError(f"{source}: {CONSTRAINTS_KEY}: the constraints form a circle among {', '.join(stuck)}; "
                              f"each `when` key must be drawn before the keys it fixes")
        ordered.append(ready[0])
    return tuple(params[i] for i in ordered)


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


def check_keys(space: SearchSpace, composer: Composer,
               validate: Callable[[DictConfig], None] = validate_config) -> None:
    """Every searched key must exist in the config its conditions compose, and its extreme values (or each
    choice) must pass the config's own checks: a width of 0 or a text lr fails here, not in a trial. `composer` is
    anything that composes a config from values (the Hydra sweeper's composes the user's app; `validate` its
    checks)."""
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
                validate(cfg)
            except ConfigError as err:
                raise ConfigError(
                    f"{space.source}: '{param.name}' value {value!r} is not allowed{when}: {err}") from None
    if space.fixed:  # keys a constraint fixed for every trial: they left the space, but the trials still set them
        try:
            validate(composer(dict(space.fixed)))
        except ConfigError as err:
            raise ConfigError(f"{space.source}: {CONSTRAINTS_KEY} fixes {_pairs(space.fixed)}: {err}") from None


def flat_values(config: Mapping[str, Any], groups: Iterable[str], choices: Mapping[str, Any]) -> dict[str, Any]:
    """Every key of a config as plain containers (dotted) -> its value, and each config group -> its chosen option:
    what `_constraints_` read for keys the space does not draw (searchlab's config and a Hydra app's alike)."""
    values: dict[str, Any] = {}

    def flatten(node: Any, prefix: str) -> None:
        if isinstance(node, Mapping):
            for key, value in node.items():
                flatten(value, f"{prefix}{key}.")
        else:
            values[prefix[:-1]] = node

    flatten(config, "")
    values.update({group: choices[group] for group in groups if group in choices})
    return values


def config_values(composer: Composer) -> dict[str, Any]:
    """flat_values of the composed base config, with the group choices the Composer kept from its base composition
    (Hydra's `hydra.runtime.choices`)."""
    return flat_values(OmegaConf.to_container(composer.base, resolve=True), composer.groups, composer.choices)


def load_space(composer: Composer, fixed: Mapping[str, str]) -> SearchSpace:
    """The space of the composed config's `search` group, validated against the config it will set."""
    base = composer.base
    source = f"conf/search/{fixed.get('search', 'default')}.yaml"
    spec = OmegaConf.to_container(base.search, resolve=True) if "search" in base else {}
    config = config_values(composer) if isinstance(spec, Mapping) and CONSTRAINTS_KEY in spec else None
    space = parse_space(spec or {}, composer.groups, fixed, source, config)
    if not space.params:
        raise ConfigError(f"{source}: the space is empty (every key in it is fixed on the command line or by a "
                          f"constraint)")
    check_keys(space, composer)
    return space

