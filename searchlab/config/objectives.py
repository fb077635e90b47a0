"""What a study optimizes: one metric (a trial's value is its best epoch's), or several at once (an Optuna
multi-objective study, whose answer is the Pareto front of its trials).

`Objectives` is read once from study.metric and study.direction (validated by searchlab.config), and every room
that needs to know what a trial's value is asks it rather than reading the config: the trial (its value or values),
the study (its directions, whether it may prune), the report, `best` and the logged models (one best trial or a
front). With one metric it gives exactly what searchlab has always done, so the single-metric path is unchanged.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from omegaconf import DictConfig, ListConfig

from searchlab.config.compose import ConfigError, metric_direction

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

# searchlab's own per-epoch metrics (searchlab.training.lightning adds them to what the module logs): the trainable
# parameter count and the wall seconds of the epoch (training + validation).
PARAMS, EPOCH_SECONDS = "params", "epoch_seconds"
# Metrics that describe the whole training rather than one epoch: with several objectives a trial's value of one is
# read over all its epochs (the count is constant; an epoch's time is noisy, so the median), not at the best epoch.
OVER_TRAINING: dict[str, Callable[[list[float]], float]] = {PARAMS: lambda xs: xs[-1], EPOCH_SECONDS: statistics.median}

PRUNING_OFF = "pruning is off: Optuna cannot prune multi-objective studies"


def diverged(metrics: dict[str, float], metric: str, epoch: int) -> str | None:
    """Why a training stops as diverged after this epoch (a non-finite train_loss or objective), else None: one rule
    for a lone training (searchlab.training.lightning) and each member of a pack (searchlab.packing)."""
    for key in ("train_loss", metric):
        if key in metrics and not math.isfinite(metrics[key]):
            return f"diverged: {key} is {metrics[key]} at epoch {epoch}"
    return None


def improves(value: float | None, best: float | None, maximize: bool) -> bool:
    """Whether an epoch's value makes it the training's best epoch (finite and strictly better: the first of equal
    bests is kept), whose weights are the trial's model: one rule for the Lightning path and the packing engine."""
    if value is None or not math.isfinite(value):
        return False
    return best is None or (value > best if maximize else value < best)


class Trained(Protocol):
    """What a trial's value is read from: a training's result (searchlab.training.TrainResult), typed by the two
    things read of it; this module sits below training (pyproject's import contracts) and imports nothing of it."""

    history: list[dict[str, float]]

    def best(self, metric: str, direction: str) -> float | None: ...


def metric_names(metric: Any) -> list[str]:
    """study.metric as a list of names: one name, or the list given (`study.metric=[val_acc,params]`)."""
    return [str(m) for m in metric] if isinstance(metric, (ListConfig, list, tuple)) else [str(metric)]


def metric_setting(names: Sequence[str]) -> str:
    """The study.metric override that gives these names back (for messages: `keep study.metric=...`)."""
    return names[0] if len(names) == 1 else "[" + ",".join(names) + "]"


@dataclass(frozen=True)
class Objectives:
    """The metrics a study optimizes, each with its direction (maximize or minimize), the first being the primary.

    The primary metric picks a trial's best epoch (its weights are the trial's model) and is the one used where a
    view needs one value (the best trial, importances, technique panels, the progress line)."""

    names: tuple[str, ...]
    directions: tuple[str, ...]

    @classmethod
    def of(cls, study: DictConfig) -> Objectives:
        """From the study config (already checked by validate_config): `auto` directions decided from the names."""
        names = metric_names(study.metric)
        given = study.direction
        directions = [str(d) for d in given] if isinstance(given, (ListConfig, list)) else [str(given)] * len(names)
        resolved = []
        for i, (name, direction) in enumerate(zip(names, directions, strict=True)):
            if direction == "auto":
                direction = metric_direction(name)
            if direction is None:
                if len(names) == 1:
                    raise ConfigError(f"study.direction: auto cannot tell whether study.metric={name} should go up "
                                      "or down; set study.direction=maximize or study.direction=minimize")
                example = ",".join("maximize" if j == i else "auto" for j in range(len(names)))
                raise ConfigError(f"study.direction: auto cannot tell whether {name} (study.metric's item {i + 1}) "
                                  f"should go up or down; give one direction per metric, e.g. "
                                  f"'study.direction=[{example}]'")
            resolved.append(direction)
        return cls(tuple(names), tuple(resolved))

    @classmethod
    def of_study(cls, study: optuna.Study, names: Sequence[str]) -> Objectives:
        """An existing study's objectives: its directions, and the names it stored (`names` where it has none)."""
        from searchlab.attrs import METRIC

        stored = study.user_attrs.get(METRIC)
        directions = tuple(d.name.lower() for d in study.directions)
        known = metric_names(stored) if stored is not None else list(names)
        if len(known) != len(directions):  # a study made outside searchlab: name its values by position
            known = [f"objective {i}" for i in range(len(directions))]
        return cls(tuple(known), directions)

    @property
    def primary(self) -> str:
        return self.names[0]

    @property
    def direction(self) -> str:
        """The primary metric's direction."""
        return self.directions[0]

    @property
    def several(self) -> bool:
        """A multi-objective study: a Pareto front, no pruning (Trial.report raises there, optuna#3450)."""
        return len(self.names) > 1

    @property
    def stored(self) -> str | list[str]:
        """What the study keeps as its metric user attr: the name, or the list of names."""
        return list(self.names) if self.several else self.primary

    def describe(self) -> str:
        """'maximize val_acc' or 'maximize val_acc, minimize params'."""
        return ", ".join(f"{d} {n}" for n, d in zip(self.names, self.directions, strict=True))

    def values_of(self, result: Trained) -> float | list[float] | None:
        """The trial's value (one metric) or values (several); None when there is no finite one.

        One metric: its best epoch's value, as always. Several: the primary metric's best epoch (the first with its
        best finite value, whose weights the training kept) decides the epoch, and the other metrics are read at
        that same epoch, so the values describe one model, the one logged; except the metrics of OVER_TRAINING
        (params: constant; epoch_seconds: the median over the trial's epochs)."""
        if not self.several:
            return result.best(self.primary, self.direction)
        epoch = self.best_epoch(result.history)
        if epoch is None:
            return None
        values = []
        for name in self.names:
            if name in OVER_TRAINING:
                series = [m[name] for m in result.history if name in m and math.isfinite(m[name])]
                value = OVER_TRAINING[name](series) if series else math.nan
            else:
                value = result.history[epoch].get(name, math.nan)
            if not math.isfinite(value):
                return None
            values.append(float(value))
        return values

    def best_epoch(self, history: Sequence[dict[str, float]]) -> int | None:
        """Index of the first epoch with the primary metric's best finite value, or None."""
        scored = [(m[self.primary], i) for i, m in enumerate(history)
                  if self.primary in m and math.isfinite(m[self.primary])]
        if not scored:
            return None
        best = max(v for v, _ in scored) if self.direction == "maximize" else min(v for v, _ in scored)
        return next(i for v, i in scored if v == best)

    def dominates(self, a: Sequence[float], b: Sequence[float]) -> bool:
        """Whether values `a` Pareto-dominate `b`: no worse in every metric and better in one."""
        signs = [1.0 if d == "maximize" else -1.0 for d in self.directions]
        better = [s * x > s * y for s, x, y in zip(signs, a, b, strict=True)]
        worse = [s * x < s * y for s, x, y in zip(signs, a, b, strict=True)]
        return any(better) and not any(worse)

    def front(self, study: optuna.Study) -> list[FrozenTrial]:
        """The study's Pareto front (Optuna's best_trials), best primary metric first."""
        trials = list(study.best_trials)
        maximize = self.direction == "maximize"
        return sorted(trials, key=lambda t: (-t.values[0] if maximize else t.values[0], t.number))

    def format(self, values: Sequence[float]) -> str:
        """'val_acc=0.9611 params=12170 epoch_seconds=0.0610'."""
        return " ".join(f"{n}={format_value(v)}" for n, v in zip(self.names, values, strict=True))


def format_value(value: float) -> str:
    """A count as an integer (params=12170), anything else with 4 decimals."""
    return f"{value:.0f}" if float(value).is_integer() and abs(value) >= 10 else f"{value:.4f}"


def first_value(value: float | Sequence[float] | None) -> float | None:
    """The primary metric's value of a trial's value or values."""
    if value is None or isinstance(value, (int, float)):
        return value
    return float(value[0])
