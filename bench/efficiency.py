"""Part 2 — search efficiency: wall time and trials until the best validation accuracy first reaches each target.

Each method is a real study through searchlab's own path (config, space, sampler/pruner tables, SearchWork,
run_trials), differing only in study.sampler / study.pruner; study.seed varies the sampler's seed. A run stops
when the highest target is reached, or at its trial cap or time cap ("not reached" counts as the cap). Seeds run in
the outer loop and methods in the inner one, so the shared machine's load drifts over all methods alike. Set-up
(compose, data, opening the stores) is outside the clock.

TPE's first n_startup_trials (conf/study/default.yaml) are drawn by a RandomSampler with the same seed, so until
then the three methods try the same configurations and differ only in pruning.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from searchlab.config import Composer, Objectives, parse_overrides, validate_config
from searchlab.config.space import load_space
from searchlab.locks import budget_lock
from searchlab.study import make_pruner, make_sampler, open_study, run_trials
from searchlab.study.budget import Budget
from searchlab.study.search_work import SearchWork
from searchlab.study.storage import open_storage
from searchlab.study.trial import TrialOutcome
from searchlab.tracking import Tracker
from searchlab.training import resolve_device
from searchlab.training.build import load_data

METHODS: dict[str, list[str]] = {
    "searchlab default (conf as shipped)": [],  # conf/study/default.yaml's sampler and pruner, whatever they are
    "random, no pruning": ["study.sampler=random", "study.pruner=none"],
    "TPE, no pruning": ["study.sampler=tpe", "study.pruner=none"],
}
DEFAULT, RANDOM, TPE = METHODS


class _Reached(Exception):
    """Raised from the per-trial callback to end a run once the target is reached."""


@dataclass
class SearchRun:
    method: str
    seed: int
    trace: list[tuple[float, int, float | None]] = field(default_factory=list)  # (seconds, trials, best so far)
    reached: dict[float, tuple[float, int]] = field(default_factory=dict)  # target -> (seconds, trials) first reached
    seconds: float = 0.0  # the run's wall time on the clock
    trials: int = 0

    def cost(self, target: float, max_seconds: float, max_trials: int) -> tuple[float, int]:
        """(seconds, trials) to the target; the caps when it was not reached."""
        return self.reached.get(target, (max_seconds, max_trials))


def run_search(out: Path, method: str, seed: int, targets: list[float], max_trials: int, max_seconds: float,
               extra: list[str]) -> SearchRun:
    """One study of `method` with `seed`, stopped at the highest target or a cap."""
    name = f"{'-'.join(o.split('=')[1] for o in METHODS[method]) or 'default'}-seed{seed}"  # e.g. tpe-none-seed0
    overrides = [*extra, *METHODS[method], f"study.seed={seed}", f"study.n_trials={max_trials}",
                 f"study.timeout={max_seconds}", f"study.name={name}", f"study.storage={out}/{name}.journal",
                 f"tracking.uri=sqlite:///{out}/mlflow.db", f"tracking.artifact_root={out}/artifacts"]
    composer = Composer(overrides)
    cfg = composer.base
    validate_config(cfg)
    splits = load_data(cfg).to(resolve_device(cfg.trainer.accelerator))
    space = load_space(composer, parse_overrides(overrides))
    tracker = Tracker(cfg.tracking.uri, cfg.tracking.artifact_root, cfg.tracking.flush_seconds)
    storage = open_storage(cfg.study.storage)
    study = open_study(cfg, Objectives.of(cfg.study), storage, make_sampler(cfg, space), make_pruner(cfg))
    budget = Budget(study, cfg.study.n_trials, budget_lock(storage, cfg.study.storage, name))
    work = SearchWork(study, cfg, overrides, composer, space, splits, tracker, tracker.study_run(name, {}))
    run = SearchRun(method, seed)
    best: float | None = None
    start = time.perf_counter()

    def on_trial(outcome: TrialOutcome) -> None:
        nonlocal best
        elapsed = time.perf_counter() - start
        run.trials += 1
        if outcome.value is not None and (best is None or outcome.value > best):
            best = outcome.value
        run.trace.append((elapsed, run.trials, best))
        for target in targets:
            if best is not None and best >= target and target not in run.reached:
                run.reached[target] = (elapsed, run.trials)
        if len(run.reached) == len(targets):
            raise _Reached

    try:
        run_trials(budget, work, on_trial, timeout=cfg.study.timeout,
                   max_consecutive_failures=cfg.study.max_consecutive_failures)
    except _Reached:
        pass
    run.seconds = time.perf_counter() - start
    return run


@dataclass
class EfficiencyResult:
    targets: list[float]
    seeds: list[int]
    max_trials: int
    max_seconds: float
    extra: list[str]
    runs: list[SearchRun]

    def costs(self, method: str, target: float) -> list[tuple[float, int]]:
        return [r.cost(target, self.max_seconds, self.max_trials) for r in self.runs if r.method == method]

    def median_seconds(self, method: str, target: float) -> float:
        return statistics.median(s for s, _ in self.costs(method, target))


def run_efficiency(out: Path, seeds: list[int], targets: list[float], max_trials: int = 60,
                   max_seconds: float = 60.0, extra: list[str] | None = None) -> EfficiencyResult:
    out.mkdir(parents=True, exist_ok=True)
    targets = sorted(targets)
    runs = [run_search(out, method, seed, targets, max_trials, max_seconds, list(extra or []))
            for seed in seeds for method in METHODS]
    return EfficiencyResult(targets, seeds, max_trials, max_seconds, list(extra or []), runs)


def _spread(values: list[float]) -> str:
    return f"{min(values):.1f}–{max(values):.1f}" if len(values) > 1 else "-"


def efficiency_markdown(r: EfficiencyResult, plot_name: str) -> str:
    """The part-2 section of bench/results.md: one table row per method and target."""
    lines = [
        f"### Search efficiency (seeds {', '.join(map(str, r.seeds))}; caps {r.max_trials} trials / "
        f"{r.max_seconds:g} s per run; not reached counts as the cap)",
        "",
        "| best val_acc >= | method | reached | median s | s min–max | median trials | trials min–max |",
        "|---|---|---|---|---|---|---|",
    ]
    for target in r.targets:
        for method in METHODS:
            costs = r.costs(method, target)
            reached = sum(1 for run in r.runs if run.method == method and target in run.reached)
            secs, trials = [c[0] for c in costs], [float(c[1]) for c in costs]
            lines.append(f"| {target} | {method} | {reached}/{len(costs)} | {statistics.median(secs):.1f} | "
                         f"{_spread(secs)} | {statistics.median(trials):.0f} | {_spread(trials).replace('.0', '')} |")
    lines.append("")
    for target in r.targets:
        default = r.median_seconds(DEFAULT, target)
        lines.append(f"- to {target}: searchlab / random **{default / r.median_seconds(RANDOM, target):.2f}** "
                     f"(target <= 0.2); searchlab / TPE without pruning "
                     f"**{default / r.median_seconds(TPE, target):.2f}** (target <= 0.5); ratios of median seconds.")
    lines += [
        f"- Extra overrides: {' '.join(r.extra) or 'none (the default study: conf/ as shipped)'}.",
        f"- Plot: best val_acc so far against wall time, one line per method (median over seeds), "
        f"seeds thin: `{plot_name}`.",
    ]
    return "\n".join(lines) + "\n"


def plot_efficiency(r: EfficiencyResult, path: Path) -> None:
    """Best value so far against wall seconds; the thick line is the median over seeds at each time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    horizon = max([r.max_seconds] + [run.seconds for run in r.runs])
    grid = [horizon * i / 200 for i in range(201)]
    for color, method in zip(("tab:blue", "tab:orange", "tab:green"), METHODS, strict=True):
        curves = []
        for run in (run for run in r.runs if run.method == method):
            curve = [_best_at(run, t) for t in grid]
            curves.append(curve)
            ax.step(grid, [float("nan") if v is None else v for v in curve], where="post", color=color, alpha=0.25,
                    linewidth=0.8)
        median = [statistics.median(vals) if all(v is not None for v in vals) else float("nan")
                  for vals in zip(*curves, strict=True)]
        ax.step(grid, median, where="post", color=color, linewidth=2, label=method)
    for target in r.targets:
        ax.axhline(target, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel("best val_acc so far")
    ax.set_ylim(max(0.0, min(r.targets) - 0.15), 1.0)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _best_at(run: SearchRun, t: float) -> float | None:
    """The run's best value at time t; held after the run ended (it stopped at the highest target or a cap)."""
    best = None
    for seconds, _, value in run.trace:
        if seconds > t:
            break
        best = value
    return best
