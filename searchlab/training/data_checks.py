"""Data a training cannot use, refused before a study spends its budget on it.

A NaN in one input row makes every trial diverge at its first epoch; a label encoded 1..10 in val but 0..9 in train
caps every trial's accuracy. Neither raises an error in a training, so without a check a study runs to its end on
them. Three checks, one per way the data arrives:

- `check_splits`: resident data (searchlab.data.Splits: an .npz, a built-in generator, a user's function), checked
  once when it is loaded, in one pass per split on the device where it lies;
- `check_first_batch`: a LightningDataModule, whose data only its batches show: its first training batch, in the
  preflight;
- `DivergedAtStart`: what no check sees up front (the rest of a DataModule's data, a search space whose every
  learning rate is too high): a study whose first trials all diverge at their first epoch in the same way stops.

Each refusal is one ConfigError line naming the data's source (`data.path=FILE` or `data._target_=...`), the
array and where the first bad value is.

Decided here, and why (what trains fine is not refused):
- NaN and +-inf anywhere in x or float y: refused (the loss is NaN from the first batch that holds one). An inf may be
  a value beyond float32's range (3.4e38) in the file: the message says so.
- |value| above the square root of float32's largest (1.8e19; float64's for float64 data): refused; its square
  overflows in a variance, an MSE or a norm. Smaller large values (raw pixels, prices) train, if badly: left alone.
- Classification (searchlab's classifier): labels must be non-negative integers of shape (N,); whole numbers stored
  as floats are refused with the cast to use; a class in y_val or y_test that y_train never holds is refused (a
  label encoding that differs between splits; a class the model cannot learn); a single class in y_train is
  refused. Gaps in the labels (classes 1..10, no 0) train fine and are allowed, except when the study optimizes
  val_auroc: its macro average counts a class absent from y_val as 0, so every class 0..K-1 must occur in y_val.
- x the same in every training row, or y the same in every training row: refused (nothing to learn; every trial
  scores the same). A constant feature among others is common (image borders) and allowed.
- Empty splits, x and y of different lengths, samples or targets of different shapes across splits, complex
  values, arrays that are not tensors: refused. Integer or bool x is allowed (a user's network may embed tokens).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig, OmegaConf

from searchlab.config import ConfigError, metric_names

if TYPE_CHECKING:
    import pytorch_lightning as pl

    from searchlab.data import Splits

SPLITS = ("train", "val", "test")
Refuse = Callable[[str], ConfigError]  # the message -> the error naming the data's source


def data_source(data: DictConfig) -> str:
    """How a message names the data: the entry's file or folder setting (`data.path=x.npz`), else its
    `data._target_`."""
    for key, value in OmegaConf.to_container(data, resolve=True).items():
        if key != "_target_" and isinstance(value, str) and value and os.path.exists(value):
            return f"data.{key}={value}"
    return f"data._target_={data.get('_target_')}"


def check_splits(splits: Splits, source: str, task: str, metrics: Sequence[str] = ()) -> None:
    """Refuses (ConfigError, one line starting with `source`) resident data a training cannot use. `task` is the
    module's (classification, regression, or '' for a user's module: only the checks that hold for any module);
    `metrics` the study's metric names (val_auroc needs every class in y_val)."""
    def refuse(message: str) -> ConfigError:
        return ConfigError(f"{source}: {message}")

    pairs = [(s, getattr(splits, f"x_{s}"), getattr(splits, f"y_{s}")) for s in SPLITS]
    for split, x, y in pairs:
        if (x is None) != (y is None):
            raise refuse(f"has only one of x_{split}, y_{split}; give both or neither")
    pairs = [(s, x, y) for s, x, y in pairs if x is not None]
    for split, x, y in pairs:
        for name, t in ((f"x_{split}", x), (f"y_{split}", y)):
            if not isinstance(t, torch.Tensor):
                raise refuse(f"{name} is a {type(t).__module__}.{type(t).__name__}, not a torch.Tensor; build the "
                             "Splits with searchlab.data.as_splits(...)")
            if t.is_complex():
                raise refuse(f"{name} holds complex numbers ({t.dtype}); give real ones")
        if x.dim() < 2:
            raise refuse(f"x_{split} has shape {tuple(x.shape)}: give one sample per row, (N, features) or (N, ...)")
        if len(x) != len(y):
            raise refuse(f"x_{split} has {len(x)} rows but y_{split} has {len(y)}")
        if len(x) == 0:
            raise refuse(f"x_{split} and y_{split} are empty")
    _, x_train, y_train = pairs[0]
    for split, x, y in pairs[1:]:
        if x.shape[1:] != x_train.shape[1:]:
            raise refuse(f"x_{split} samples have shape {tuple(x.shape[1:])} but x_train's have "
                         f"{tuple(x_train.shape[1:])}")
        if y.shape[1:] != y_train.shape[1:]:
            raise refuse(f"y_{split} has targets of shape {tuple(y.shape[1:])} but y_train's are "
                         f"{tuple(y_train.shape[1:])}")
        if y.is_floating_point() != y_train.is_floating_point():
            kinds = {True: "floats", False: "integers"}
            raise refuse(f"y_{split} holds {kinds[y.is_floating_point()]} but y_train "
                         f"{kinds[y_train.is_floating_point()]}; give every split the same kind of targets")
    for split, x, y in pairs:
        _check_values(f"x_{split}", x, refuse)
        _check_values(f"y_{split}", y, refuse)
    if _same_rows(x_train):
        raise refuse(f"x_train is the same in every one of its {len(x_train)} rows: there is nothing to learn from; "
                     "check how the file was written")
    if task == "classification":
        _check_labels(pairs, refuse, "val_auroc" in metrics)
    elif _same_rows(y_train):
        raise refuse(f"y_train is {_value(y_train[0])} in every one of its {len(y_train)} rows: there is nothing to "
                     "learn; check how the file was written")


def check_loaded(splits: Splits, cfg: DictConfig, task: str) -> None:
    """check_splits for the config's data entry, as searchlab.training.build.load_data loads it (once per process)."""
    study = cfg.get("study")
    metrics = metric_names(study.metric) if study is not None and "metric" in study else []
    check_splits(splits, data_source(cfg.data), task, metrics)


def first_batch(data: pl.LightningDataModule) -> tuple[torch.Tensor, torch.Tensor]:
    """The DataModule's first training batch, as (x, y): what the checks below read, and what searchlab.training.build
    sizes the network by."""
    data.prepare_data()
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
        raise ConfigError(f"data: {type(data).__name__}'s batches must be (x, y) pairs to size the network; "
                          "or give it `input_shape` and `num_classes` / `num_outputs` attributes")
    return batch[0], batch[1]


def check_first_batch(data: pl.LightningDataModule, source: str, task: str) -> None:
    """Refuses a LightningDataModule whose first training batch holds values a training cannot use (NaN, inf,
    values whose square overflows, negative class indices). Batches that are not (x, y) pairs are not checked."""
    try:
        x, y = first_batch(data)
    except Exception:  # not (x, y) pairs, or a DataModule that fails: the preflight's training says how
        return

    def refuse(message: str) -> ConfigError:
        return ConfigError(f"{source}: the first training batch's {message}")

    for name, t in (("x", x), ("y", y)):
        if isinstance(t, torch.Tensor):
            _check_values(name, t, refuse)
    if task == "classification" and isinstance(y, torch.Tensor) and not y.is_floating_point() and len(y):
        if bool((y < 0).any()):
            raise refuse(f"y holds negative class indices ({_where(y, y < 0)}); give labels 0..K-1")


def _check_values(name: str, t: torch.Tensor, refuse: Refuse) -> None:
    """NaN, inf and values whose square overflows float32 (float64 for float64 data), in one pass (min and max)
    unless one is found."""
    if not t.is_floating_point() or t.numel() == 0:
        return  # integers hold no NaN or inf, and a network takes them its own way (an embedding)
    low, high = (float(v) for v in torch.aminmax(t.detach().reshape(-1)))
    if math.isfinite(low) and math.isfinite(high):
        # float32's (or float64's) limit: half-precision data is computed on in float32 where it matters (losses,
        # norms, mixed precision), and 65504's root (256) would refuse raw pixels.
        wide = torch.float64 if t.dtype == torch.float64 else torch.float32
        limit = math.sqrt(torch.finfo(wide).max)
        if max(-low, high) > limit:
            huge = t.abs() > limit
            count = int(huge.sum())
            raise refuse(f"{name} has {count} value{'s' if count > 1 else ''} beyond ±{limit:.3g} (up to "
                         f"{max(-low, high):.3g}; first at {_where(t, huge)}): their squares overflow "
                         f"{_dtype(wide)}; rescale it (data.standardize=true for an .npz)")
        return
    nan, inf = torch.isnan(t), torch.isinf(t)
    counts = [f"{int(nan.sum())} NaN" if bool(nan.any()) else "",
              f"{int(inf.sum())} ±inf" if bool(inf.any()) else ""]
    bad = nan | inf
    n = int(bad.sum())
    where = _where(t, bad)
    hint = "clean or impute it" if not bool(inf.any()) else (
        f"clean or impute it (an inf may be a value beyond {_dtype(t)}'s ±{torch.finfo(t.dtype).max:.3g} in the "
        "file)")
    raise refuse(f"{name} has {' and '.join(c for c in counts if c)} ({'' if n == 1 else 'first at '}{where}): {hint}")


def _check_labels(pairs: list[tuple[str, torch.Tensor, torch.Tensor]], refuse: Refuse, auroc: bool) -> None:
    """Class indices for searchlab's classifier: non-negative integers of shape (N,), every class of val and test
    seen in training, at least two classes, and (for val_auroc) every class 0..K-1 in y_val."""
    y_train = pairs[0][2]
    if y_train.dim() != 1:
        hint = "y.ravel()" if y_train.shape[1:] == (1,) else "class indices, e.g. y.argmax(1) of one-hot rows"
        raise refuse(f"y_train has shape {tuple(y_train.shape)}; the classifier takes class indices of shape (N,): "
                     f"give {hint}")
    if y_train.is_floating_point():
        if all(bool((y == y.round()).all()) for _, _, y in pairs):
            raise refuse("y_train holds class labels stored as floats; store them as integers "
                         "(numpy: y.astype('int64'))")
        return  # fractional targets: searchlab.training.fitting.check_targets names module=regressor
    for split, _, y in pairs:
        if bool((y < 0).any()):
            raise refuse(f"y_{split} holds negative class indices ({int((y < 0).sum())}, first at "
                         f"{_where(y, y < 0)}); give labels 0..K-1")
    seen = torch.unique(y_train)
    if len(seen) < 2:
        raise refuse(f"y_train holds only class {int(seen[0])}: a classifier needs at least two classes")
    for split, _, y in pairs[1:]:
        unseen = ~torch.isin(y, seen)
        if bool(unseen.any()):
            classes = torch.unique(y[unseen]).tolist()
            raise refuse(f"y_{split} has {_classes(classes)} ({int(unseen.sum())} rows, first at "
                         f"{_where(y, unseen)}) that y_train never holds: no trial can learn to predict it; encode "
                         "labels the same way in every split (or move those rows to training)")
    if auroc:
        classes = int(max(int(y.max()) for _, _, y in pairs)) + 1
        val = pairs[1][2]
        absent = sorted(set(range(classes)) - set(torch.unique(val).tolist()))
        if absent:
            raise refuse(f"y_val lacks {_classes(absent)} of 0..{classes - 1}: val_auroc's macro average counts an "
                         "absent class as 0; give labels 0..K-1 with every class in y_val, or optimize another metric "
                         "(study.metric=val_f1)")


@dataclass
class DivergedAtStart:
    """Stops a study whose first `limit` trials all diverged at their first epoch in the same way (PRUNED with
    `diverged: <metric> is <value> at epoch 1`): the data, or something every trial shares, cannot train, and the
    rest of the budget would go the same way. One trial that does anything else disarms it for the run.

    Fed each trial's outcome as it ends (`see`); returns the stop reason once `limit` such trials are seen."""

    limit: int
    source: str = "the data"
    seen: int = 0
    how: str | None = None
    armed: bool = True
    params: list[dict[str, Any]] = field(default_factory=list)
    stop: str | None = None

    def __call__(self, outcome: Any) -> None:
        """A stop rule of searchlab.study.loop.run_trials: sees each TrialOutcome."""
        self.stop = self.stop or self.see(outcome.state, outcome.reason, outcome.params)

    def reason(self) -> str | None:
        return self.stop

    # The stop reason of a diverged training, as searchlab.config.objectives.diverged words it.
    _DIVERGED = re.compile(r"^diverged: (?P<how>.+) at epoch (?P<epoch>\d+)$")

    def see(self, state: str, reason: str | None, params: dict[str, Any] | None = None) -> str | None:
        if not self.armed or self.limit <= 0:
            return None
        match = self._DIVERGED.match(reason or "") if state == "PRUNED" else None
        how = None if match is None or int(match["epoch"]) > 1 else match["how"]
        if how is None or (self.how is not None and how != self.how):
            self.armed = False
            return None
        self.how, self.seen = how, self.seen + 1
        self.params.append(dict(params or {}))
        if self.seen < self.limit:
            return None
        self.armed = False
        # Keys every one of them drew (not a choice's own keys), with different values: what the failure ignores.
        varied = [k for k in self.params[0] if all(k in p for p in self.params)
                  and len({repr(p[k]) for p in self.params}) > 1]
        whatever = f" whatever their {_listed(varied[:3], 'and')}" if varied else ""
        return (f"the first {self.seen} trials all diverged at epoch 1 ({self.how}){whatever}: check the data "
                f"({self.source}), then what every trial shares (study.max_diverged_at_start={self.limit})")


def diverged_rule(cfg: DictConfig) -> DivergedAtStart | None:
    """The rule as study.max_diverged_at_start sets it (0 or null: off), naming the config's data source."""
    limit = cfg.study.get("max_diverged_at_start")
    if not limit:
        return None
    return DivergedAtStart(int(limit), data_source(cfg.data) if "data" in cfg else "the data")


def _same_rows(t: torch.Tensor) -> bool:
    """Every row equal to the first; two differing rows at the start (nearly always) answer without a pass."""
    return len(t) > 1 and bool((t[1] == t[0]).all()) and bool((t == t[:1]).all())


def _where(t: torch.Tensor, mask: torch.Tensor) -> str:
    """The first True of mask as `row R` (1-d), `row R, column C` (2-d), or `row R, at (i, j, ...)`."""
    flat = int(torch.argmax(mask.reshape(-1).to(torch.uint8)))
    index = []
    for size in reversed(t.shape):
        index.append(flat % size)
        flat //= size
    row, *rest = reversed(index)
    if not rest:
        return f"row {row}"
    if len(rest) == 1:
        return f"row {row}, column {rest[0]}"
    return f"row {row}, at {tuple(rest)}"


def _value(t: torch.Tensor) -> str:
    values = t.reshape(-1).tolist()
    return f"{values[0]:g}" if len(values) == 1 else str(values[:4])[:-1] + (", ...]" if len(values) > 4 else "]")


def _dtype(t: torch.Tensor | torch.dtype) -> str:
    return str(t if isinstance(t, torch.dtype) else t.dtype).removeprefix("torch.")


def _classes(classes: list[int]) -> str:
    return f"class{'es' if len(classes) > 1 else ''} {_listed(classes)}"


def _listed(items: Iterable[Any], last: str = "and") -> str:
    items = [str(i) for i in items]
    if len(items) > 6:
        items = [*items[:5], f"{len(items) - 5} more"]
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} {last} {items[-1]}"
