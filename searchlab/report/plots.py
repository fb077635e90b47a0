"""The report's figures: plotly for the HTML page, matplotlib (Agg) for the PNGs.

kaleido (plotly's PNG export) needs a Chrome of its own, so the PNGs are drawn by matplotlib: few figures, small dpi,
one LineCollection for many lines, so that a study of hundreds of trials plots in about a second.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display, and the fastest backend

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optuna  # noqa: E402
import plotly.graph_objects as go  # noqa: E402
from matplotlib.collections import LineCollection  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from optuna.distributions import CategoricalDistribution  # noqa: E402
from optuna.trial import FrozenTrial  # noqa: E402
from plotly.subplots import make_subplots  # noqa: E402

from searchlab.config import Objectives  # noqa: E402
from searchlab.quiet import quiet_empty_plots  # noqa: E402

quiet_empty_plots()  # a study with no complete trial: its summary says so, not Optuna's [W ...] lines

_COLS = 3  # panels per row in the slice and technique grids
_COMPLETE_COLOUR = "#1f77b4"
_PRUNED_COLOUR = "#d62728"
_PRUNED_LABEL = "pruned trial, at its last reported value"


@dataclass(frozen=True)
class View:
    """The objective of complete trials against one searched key: by category, or against its (log) value; beside
    them each pruned trial at the last value it reported (where it stood when it was stopped)."""

    title: str
    param: str
    categorical: bool
    log: bool
    xs: list[Any]  # category labels, or numeric values
    ys: list[float]
    order: list[str]  # category labels in display order
    stopped: Mapping[str, Counter[str]] = field(default_factory=dict)  # PRUNED / FAIL -> trials per category label
    pruned_xs: list[Any] = field(default_factory=list)  # like xs, for the pruned trials with a finite last value
    pruned_ys: list[float] = field(default_factory=list)  # their last reported intermediate value

    def n_stopped(self, label: str) -> int:
        """Pruned and failed trials with this choice."""
        return sum(counts[label] for counts in self.stopped.values())

    def groups(self) -> list[tuple[str, list[float]]]:
        return [(label, [y for x, y in zip(self.xs, self.ys, strict=True) if x == label]) for label in self.order]

    def pruned_groups(self) -> list[tuple[str, list[float]]]:
        return [(label, [y for x, y in zip(self.pruned_xs, self.pruned_ys, strict=True) if x == label])
                for label in self.order]


def last_value(trial: FrozenTrial) -> float | None:
    """The last intermediate value a trial reported (a pruned trial's standing when it was stopped), if finite."""
    if not trial.intermediate_values:
        return None
    value = trial.intermediate_values[max(trial.intermediate_values)]
    return float(value) if math.isfinite(value) else None


def make_view(trials: Sequence[FrozenTrial], param: str, title: str, labels: Mapping[str, str] | None = None,
              other: str | None = None) -> View | None:
    """The view of `param` over the complete trials that have it and the pruned ones at their last reported value
    (pruned and failed ones also counted per choice); None when no complete or pruned trial has it."""
    having = [t for t in trials if param in t.params and t.state.name == "COMPLETE"]
    pruned = [(t, y) for t in trials if param in t.params and t.state.name == "PRUNED"
              for y in [last_value(t)] if y is not None]
    if not having and not pruned:
        return None
    distribution = (having[-1] if having else pruned[-1][0]).distributions[param]
    pruned_ys = [y for _, y in pruned]
    if not isinstance(distribution, CategoricalDistribution):
        return View(title, param, False, bool(getattr(distribution, "log", False)),
                    [float(t.params[param]) for t in having], [float(t.values[0]) for t in having], [],
                    pruned_xs=[float(t.params[param]) for t, _ in pruned], pruned_ys=pruned_ys)
    labels = labels or {}

    def label(value: Any) -> str:
        return labels.get(str(value), other if other is not None else str(value))

    xs = [label(t.params[param]) for t in having]
    pruned_xs = [label(t.params[param]) for t, _ in pruned]
    # choices first, in their order
    order = list(dict.fromkeys([*(label(c) for c in distribution.choices), *xs, *pruned_xs]))
    stopped = {state: Counter(label(t.params[param]) for t in trials if param in t.params and t.state.name == state)
               for state in ("PRUNED", "FAIL")}
    return View(title, param, True, False, xs, [float(t.values[0]) for t in having], order, stopped, pruned_xs,
                pruned_ys)


# ---- plotly (HTML) ----

def plotly_figures(study: optuna.Study, importances: Mapping[str, float], slices: Sequence[View],
                   techniques: Sequence[View], top: Sequence[int], metric: str,
                   objectives: Objectives | None = None) -> list[tuple[str, go.Figure]]:
    """(title, figure) for each section of the HTML page; with several objectives, of the first metric."""
    # Optuna's plots of one value need a target in a multi-objective study
    target = {"target": _first_value} if objectives is not None and objectives.several else {}
    figures = [("Optimization history",
                optuna.visualization.plot_optimization_history(study, target_name=metric, **target))]
    if techniques:
        figures.append(("Techniques: the objective by each choice", _plotly_grid(techniques, metric)))
    if importances:
        names = list(importances)[::-1]
        bar = go.Figure(go.Bar(x=[importances[n] for n in names], y=names, orientation="h"))
        bar.update_layout(title="Parameter importances", height=120 + 28 * len(names), xaxis_title="importance")
        figures.append(("Parameter importances", bar))
    if not target:  # a multi-objective study's trials report no per-epoch values (their curves are in MLflow)
        figures.append(("Learning curves", _plotly_curves(study, top, metric)))
    figures.append(("Parallel coordinates",
                    optuna.visualization.plot_parallel_coordinate(study, target_name=metric, **target)))
    if slices:
        figures.append(("Slices: the objective against each searched key", _plotly_grid(slices, metric)))
    return figures


def _plotly_grid(views: Sequence[View], metric: str) -> go.Figure:
    rows = math.ceil(len(views) / _COLS)
    fig = make_subplots(rows=rows, cols=_COLS, subplot_titles=[v.title for v in views], vertical_spacing=0.45 / rows)
    for i, view in enumerate(views):
        row, col = i // _COLS + 1, i % _COLS + 1
        if view.categorical:
            trace = go.Box(x=view.xs, y=view.ys, boxpoints="all", jitter=0.4, pointpos=0, name="complete trial",
                           marker={"color": _COMPLETE_COLOUR}, line={"color": _COMPLETE_COLOUR})
            fig.update_xaxes(categoryorder="array", categoryarray=view.order, row=row, col=col)
        else:
            trace = go.Scatter(x=view.xs, y=view.ys, mode="markers", marker={"size": 5, "color": _COMPLETE_COLOUR},
                               name="complete trial")
            fig.update_xaxes(type="log" if view.log else "linear", title_text=view.param, row=row, col=col)
        fig.add_trace(trace, row=row, col=col)
        if view.pruned_ys:
            fig.add_trace(go.Scatter(x=view.pruned_xs, y=view.pruned_ys, mode="markers", name=_PRUNED_LABEL,
                                     marker={"symbol": "x", "size": 6, "color": _PRUNED_COLOUR}), row=row, col=col)
        fig.update_yaxes(title_text=metric if col == 1 else None, row=row, col=col)
    # No legend (it would sit on the panel titles): the page says that red crosses are pruned trials, and so does
    # each point's hover text.
    fig.update_layout(height=300 * rows, showlegend=False)
    return fig


def _curves(study: optuna.Study, top: Sequence[int]) -> tuple[list[FrozenTrial], list[FrozenTrial], list[FrozenTrial]]:
    """Best trials (in rank order), other complete trials, pruned trials: those with intermediate values."""
    trials = [t for t in study.get_trials(deepcopy=False) if t.intermediate_values]
    by_number = {t.number: t for t in trials}
    best = [by_number[n] for n in top if n in by_number]
    rest = [t for t in trials if t.number not in set(top)]
    return best, [t for t in rest if t.state.name == "COMPLETE"], [t for t in rest if t.state.name == "PRUNED"]


def _steps(trial: FrozenTrial) -> tuple[list[int], list[float]]:
    steps = sorted(trial.intermediate_values)
    return steps, [trial.intermediate_values[s] for s in steps]


def _plotly_curves(study: optuna.Study, top: Sequence[int], metric: str) -> go.Figure:
    best, complete, pruned = _curves(study, top)
    fig = go.Figure()
    for trials, name, style in ((complete, "complete", {"color": "rgba(120,120,120,0.25)", "width": 1}),
                                (pruned, "pruned", {"color": "rgba(215,50,50,0.5)", "width": 1})):
        xs: list[float | None] = []
        ys: list[float | None] = []
        for trial in trials:  # one trace per group, lines separated by None: fast with hundreds of trials
            steps, values = _steps(trial)
            xs += [*steps, None]
            ys += [*values, None]
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", line=style, name=f"{name} ({len(trials)})"))
    for trial in best:
        steps, values = _steps(trial)
        fig.add_trace(go.Scatter(x=steps, y=values, mode="lines+markers",
                                 name=f"#{trial.number} ({trial.values[0]:.4g})"))
    fig.update_layout(xaxis_title="epoch", yaxis_title=metric, height=450)
    return fig


def _first_value(trial: FrozenTrial) -> float:
    return trial.values[0]


def pareto_figure(study: optuna.Study, objectives: Objectives) -> go.Figure:
    """Optuna's Pareto-front plot of a multi-objective study: every complete trial, the front highlighted; of the
    first two metrics beyond three (Optuna plots two or three)."""
    if len(objectives.names) <= 3:
        fig = optuna.visualization.plot_pareto_front(study, target_names=list(objectives.names))
    else:
        fig = optuna.visualization.plot_pareto_front(study, targets=lambda t: (t.values[0], t.values[1]),
                                                     target_names=list(objectives.names[:2]))
    fig.update_layout(title=f"Pareto front ({objectives.describe()})", height=500)
    return fig


# ---- matplotlib (PNG) ----

def write_pngs(folder: Path, study: optuna.Study, importances: Mapping[str, float], slices: Sequence[View],
               techniques: Sequence[View], top: Sequence[int], metric: str, dpi: int,
               objectives: Objectives | None = None) -> list[str]:
    """The PNG files, by name, written to `folder`; with several objectives, pareto_front.png first and the others
    of the first metric."""
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    drawings = {}
    if objectives is not None and objectives.several:
        drawings["pareto_front.png"] = lambda: _pareto(complete, objectives)
    drawings["history.png"] = lambda: _history(complete, study.directions[0].name == "MAXIMIZE", metric)
    if objectives is None or not objectives.several:  # no per-epoch values are reported to a multi-objective study
        drawings["learning_curves.png"] = lambda: _learning_curves(study, top, metric)
    drawings["parallel_coordinates.png"] = lambda: _parallel(complete, [v.param for v in slices], metric)
    if importances:
        drawings["importances.png"] = lambda: _importances(importances)
    if slices:
        drawings["slices.png"] = lambda: _grid(slices, metric)
    if techniques:
        drawings["techniques.png"] = lambda: _grid(techniques, metric)
    for name, draw in drawings.items():
        fig = draw()
        fig.savefig(folder / name, dpi=dpi)
        plt.close(fig)
    return list(drawings)


def _figure(width: float, height: float, bottom: float, left: float = 0.7) -> tuple[plt.Figure, plt.Axes]:
    """One axes with margins in inches. No layout engine: constrained/tight layouts draw each figure twice."""
    fig, ax = plt.subplots(figsize=(width, height))
    fig.subplots_adjust(left=left / width, right=1 - 0.2 / width, bottom=bottom / height, top=1 - 0.35 / height)
    return fig, ax


def _history(complete: list[FrozenTrial], maximize: bool, metric: str) -> plt.Figure:
    fig, ax = _figure(8, 4, bottom=0.5)
    numbers = [t.number for t in complete]
    values = [t.values[0] for t in complete]
    ax.scatter(numbers, values, s=12, label=f"{metric} of a complete trial")
    if values:
        best = np.maximum.accumulate(values) if maximize else np.minimum.accumulate(values)
        ax.step(numbers, best, where="post", color="C3", label="best so far")
        ax.legend()
    ax.set(xlabel="trial", ylabel=metric, title="Optimization history")
    return fig


def _learning_curves(study: optuna.Study, top: Sequence[int], metric: str) -> plt.Figure:
    best, complete, pruned = _curves(study, top)
    fig, ax = _figure(8, 4.5, bottom=0.5)
    for trials, colour, name in ((complete, (0.5, 0.5, 0.5, 0.25), "complete"),
                                 (pruned, (0.85, 0.2, 0.2, 0.5), "pruned")):
        lines = [np.column_stack(_steps(t)) for t in trials]
        ax.add_collection(LineCollection(lines, colors=[colour], linewidths=0.8, label=f"{name} ({len(trials)})"))
    for trial in best:
        ax.plot(*_steps(trial), marker=".", linewidth=1.6, label=f"#{trial.number} ({trial.values[0]:.4g})")
    ax.autoscale()
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="epoch", ylabel=metric, title="Learning curves: best trials beside pruned ones")
    ax.legend(fontsize="small", ncols=2)
    return fig


def _pareto(complete: list[FrozenTrial], objectives: Objectives) -> plt.Figure:
    """The first two metrics of every complete trial, those of the Pareto front (over all the metrics) in red with
    their numbers; points, not a line: between two trials of the front there is no trial."""
    fig, ax = _figure(7, 4.5, bottom=0.6, left=0.9)
    front = {t.number for t in complete if not any(objectives.dominates(o.values, t.values) for o in complete)}
    rest = [t for t in complete if t.number not in front]
    best = sorted((t for t in complete if t.number in front), key=lambda t: (t.values[0], t.values[1]))
    ax.scatter([t.values[0] for t in rest], [t.values[1] for t in rest], s=14, color=(0.5, 0.5, 0.5, 0.6),
               label=f"dominated trial ({len(rest)})")
    ax.scatter([t.values[0] for t in best], [t.values[1] for t in best], s=28, color="C3",
               label=f"Pareto front ({len(best)})")
    for trial in best:
        ax.annotate(f"#{trial.number}", (trial.values[0], trial.values[1]), fontsize="x-small",
                    xytext=(3, 3), textcoords="offset points")
    (x, dx), (y, dy) = zip(objectives.names[:2], objectives.directions[:2], strict=True)
    ax.set(xlabel=f"{x} ({dx})", ylabel=f"{y} ({dy})", title="Pareto front"
           + (" (of the first two metrics' plane)" if len(objectives.names) > 2 else ""))
    ax.legend(fontsize="small")
    return fig


def _importances(importances: Mapping[str, float]) -> plt.Figure:
    names = list(importances)[::-1]
    fig, ax = _figure(7, 1 + 0.35 * len(names), bottom=0.5, left=0.2 + 0.085 * max(map(len, names), default=0))
    ax.barh(names, [importances[n] for n in names])
    ax.set(xlabel="importance", title="Parameter importances")
    return fig


def _parallel(complete: list[FrozenTrial], params: list[str], metric: str) -> plt.Figure:
    """Each key scaled to [0, 1] (log keys on a log scale, choices by index); a trial's line skips keys it lacks."""
    axes_values = []
    for param in params:
        having = [t for t in complete if param in t.params]
        distribution = having[-1].distributions[param] if having else None
        column = []
        for trial in complete:
            if param not in trial.params:
                column.append(math.nan)
            elif isinstance(distribution, CategoricalDistribution):
                choices = list(distribution.choices)
                value = trial.params[param]
                column.append(choices.index(value) / max(len(choices) - 1, 1) if value in choices else math.nan)
            else:
                low, high, value = distribution.low, distribution.high, trial.params[param]
                if getattr(distribution, "log", False):
                    low, high, value = math.log(low), math.log(high), math.log(value)
                column.append((value - low) / (high - low) if high > low else 0.5)
        axes_values.append(column)
    values = np.array([t.values[0] for t in complete], dtype=float)
    span = (values.max() - values.min()) if len(values) else 0.0
    objective = (values - values.min()) / span if span > 0 else np.full(len(values), 0.5)
    points = np.array([*axes_values, objective]).T if complete else np.zeros((0, len(params) + 1))
    segments, colours = [], []
    for row, value in zip(points, objective, strict=True):
        present = [(i, y) for i, y in enumerate(row) if np.isfinite(y)]
        segments += [[a, b] for a, b in zip(present, present[1:], strict=False)]
        colours += [value] * (len(present) - 1)
    fig, ax = _figure(max(8, 1.1 * (len(params) + 1)), 4.5, bottom=1.3, left=1.0)
    lines = LineCollection(segments, array=np.array(colours), cmap="viridis", linewidths=0.8, alpha=0.6)
    ax.add_collection(lines)
    ax.set_xlim(-0.2, len(params) + 0.2)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xticks(range(len(params) + 1), [*params, metric], rotation=30, ha="right", fontsize="small")
    ax.set(title="Parallel coordinates (each key scaled to its range; colour: objective)", yticks=[])
    if len(colours):
        fig.colorbar(lines, ax=ax, label=f"{metric} (scaled)")
    return fig


def _tick_label(view: View, label: str, n: int) -> str:
    stopped = view.n_stopped(label)
    return f"{label}\nn={n}" + (f"+{stopped}" if stopped else "")


def _label_reach(view: View) -> float:
    """Inches a categorical panel's tick labels reach below the axis, and as far to the left of their tick: they are
    turned 45 degrees, so that they take room by their length instead of running into each other."""
    if not view.categorical:
        return 0.0
    longest = max((len(line) for label, ys in view.groups() for line in _tick_label(view, label, len(ys)).split("\n")),
                  default=1)
    return (0.068 * longest + 0.3) * math.sin(math.radians(45))


def _grid(views: Sequence[View], metric: str) -> plt.Figure:
    """One panel per view, laid out in inches (no layout engine, which would draw the figure twice): each row is as
    deep as its turned tick labels reach, a panel is wide enough for its choices' labels to stand apart (0.45 inch a
    choice), and the first column leaves room for labels reaching left. Complete trials are dots (a box per choice);
    pruned trials are red crosses at the last value they reported."""
    rows = math.ceil(len(views) / _COLS)
    most = max((len(v.order) for v in views if v.categorical), default=0)
    left, right, title, panel_h = 0.65, 0.15, 0.35, 2.2
    panel_w = max(4.0, left + right + 0.45 * most)
    axes_w = panel_w - left - right
    pad = max([0.0] + [_label_reach(v) - left - axes_w / (2 * len(v.order)) + 0.05
                       for v in views[::_COLS] if v.categorical])
    gaps = [0.25 + max(_label_reach(v) if v.categorical else 0.3 for v in views[r * _COLS:(r + 1) * _COLS]) + 0.2
            for r in range(rows)]
    legend = 0.35 if any(v.pruned_ys for v in views) else 0.0
    width, height = pad + panel_w * _COLS, legend + sum(title + panel_h + gap for gap in gaps)
    fig = plt.figure(figsize=(width, height))
    rng = np.random.default_rng(0)
    top = height - legend
    for r in range(rows):
        top -= title + panel_h
        for c, view in enumerate(views[r * _COLS:(r + 1) * _COLS]):
            ax = fig.add_axes(((pad + c * panel_w + left) / width, top / height, axes_w / width, panel_h / height))
            _panel(ax, view, metric, rng)
        top -= gaps[r]
    if legend:
        handles = [plt.Line2D([], [], linestyle="", marker="o", markersize=4, color=_COMPLETE_COLOUR,
                              label="complete trial (its objective)"),
                   plt.Line2D([], [], linestyle="", marker="x", markersize=5, color=_PRUNED_COLOUR,
                              label=_PRUNED_LABEL)]
        fig.legend(handles=handles, loc="upper right", ncols=2, fontsize="small", frameon=False,
                   bbox_to_anchor=(1 - right / width, 1))
    return fig


def _panel(ax: plt.Axes, view: View, metric: str, rng: np.random.Generator) -> None:
    if view.categorical:
        groups = view.groups()
        ax.boxplot([ys for _, ys in groups], showfliers=False, medianprops={"color": "black"})
        for i, ((_, ys), (_, pruned)) in enumerate(zip(groups, view.pruned_groups(), strict=True), start=1):
            ax.scatter(i + rng.uniform(-0.15, 0.15, len(ys)), ys, s=8, alpha=0.6, color=_COMPLETE_COLOUR)
            ax.scatter(i + rng.uniform(-0.15, 0.15, len(pruned)), pruned, s=14, marker="x", alpha=0.7,
                       linewidths=0.8, color=_PRUNED_COLOUR)
        ax.set_xticks(range(1, len(groups) + 1), [_tick_label(view, label, len(ys)) for label, ys in groups],
                      rotation=45, ha="right", rotation_mode="anchor", fontsize="small")
        ax.set_xlabel("n = complete + pruned or failed trials", fontsize="x-small")
    else:
        ax.scatter(view.xs, view.ys, s=8, alpha=0.6, color=_COMPLETE_COLOUR)
        ax.scatter(view.pruned_xs, view.pruned_ys, s=14, marker="x", alpha=0.7, linewidths=0.8, color=_PRUNED_COLOUR)
        if view.log:
            ax.set_xscale("log")
        ax.set_xlabel(view.param, fontsize="small")
    ax.set_title(view.title, fontsize="medium")
    ax.set_ylabel(metric)
