"""Part 4 — methods: samplers and pruners compared on tasks where search methods separate (issue 12).

Every run is a real `searchlab search` (searchlab.cli.main, in this process) with the task's and the method's
overrides, a fresh journal study and its own study.seed (the sampler's seed; the data split and weights keep
`seed`, so every run searches the same landscape). A run ends when a COMPLETE trial's value first reaches the task's
target, or at the task's trial or time cap ("not reached": the cap counts, as a lower bound, marked >=). The clock
and the trial count are read back from the study's own storage: from the first trial's start to the end of the
trial that reached the target (start-up, compose, data and store opening are outside it). Runs are interleaved —
seeds outer, tasks and methods inner, the method order rotating per seed — so the shared machine's load drifts over
all methods alike.

Methods are sampler/pruner entries given as overrides (`+study.samplers.NAME={...}`, `+study.pruners.NAME={...}`),
so the references do not move when conf/study/default.yaml does; "default" is conf/ as shipped (no override).
Adding a task is one entry in TASKS (with a `prepare` step when it needs a generated file, as `signals` does).
"""

from __future__ import annotations

import contextlib
import io
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path

import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

# Every config key this part uses, in one place (rename here when conf/ changes).
KEYS = {
    "sampler": "study.sampler", "pruner": "study.pruner", "samplers": "study.samplers", "pruners": "study.pruners",
    "sampler_seed": "study.seed", "n_trials": "study.n_trials", "timeout": "study.timeout", "name": "study.name",
    "storage": "study.storage", "metric": "study.metric", "tracking_uri": "tracking.uri",
    "artifact_root": "tracking.artifact_root", "report_dir": "report.dir", "workers": "workers",
    "data": "data", "data_size": "data.size", "features": "data.features", "informative": "data.informative",
    "classes": "data.classes", "separation": "data.separation", "label_noise": "data.label_noise",
    "epochs": "trainer.max_epochs", "pack": "study.pack", "pack_members": "study.pack_members",
}


def _set(key: str, value: object) -> str:
    return f"{KEYS[key]}={value}"


@dataclass(frozen=True)
class Task:
    """A search task: overrides on conf/ (or on a project's own conf via `args`, e.g. --config-dir), the target the
    best COMPLETE trial's study.metric must reach, and the caps of one run."""

    overrides: tuple[str, ...]
    target: float
    max_trials: int
    max_seconds: float
    note: str
    args: tuple[str, ...] = ()  # `search` arguments before the overrides (a project's --config-dir)
    # Makes what the task needs in the runs' folder (once; e.g. a generated data file) and returns the overrides
    # that name it; None: nothing to make.
    prepare: Callable[[Path], tuple[str, ...]] | None = None


# The hard task: many weak features (30 informative among 60), 10% of labels flipped, 6 classes close together, and
# 25 steps per epoch. 100 random trials of the default space (study.seed 7): median 0.55, 90th percentile 0.68, best
# three 0.724, 0.724, 0.744 (chance 0.17): random search reaches 0.72 in ~25-35 trials; ~1 CPU s per trial.
HARD = ("data=synthetic", "data.size=4000", "data.features=60", "data.informative=30", "data.classes=6",
        "data.separation=0.7", "data.label_noise=0.1", "trainer.limit_train_batches=25")
# examples/signals' Net1D with the example's own model and search-space entries (--config-dir), cut from ~30 s to
# ~1 CPU s a trial: 2000 signals written by the example's script (1200 train, 400 val), 6 epochs, channels fixed at
# 16 (so out of the space). 100 random trials (study.seed 7): median 0.745, best three 0.8975, 0.9025, 0.9075 (chance
# 0.25), 1.04 CPU s per trial. Target 0.894: 358 of 400 val signals (val_acc is a float32: 0.895 reads 0.89499998).
# 4 of 300 random trials run to the end (seeds 7, 101) reached it (a median of ~50 trials at that rate); 8
# random-search runs (seeds 7, 100-106) reached it in 2, 4, 6, 22, 30, 30, 43, 46 trials (median 26).
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "signals"
SIGNALS_N = 2000  # signals generated: 1200 train, 400 val, 400 test


def _signals(out: Path) -> tuple[str, ...]:
    """examples/signals' data, written by its own script (SIGNALS_N signals) into out/ once, and its folder
    importable (its model entry is `signals.Net1D`; the search runs in this process)."""
    path = out / f"signals-{SIGNALS_N}.npz"
    if not path.is_file():
        out.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, str(EXAMPLE / "signals.py"), str(path), "--n", str(SIGNALS_N)], check=True,
                       capture_output=True)
    if str(EXAMPLE) not in sys.path:
        sys.path.insert(0, str(EXAMPLE))
    return (f"data.path={path}",)


# The regression task: scikit-learn's Friedman #1 (y = 10 sin(pi x1 x2) + 20 (x3 - 0.5)^2 + 10 x4 + 5 x5 + noise),
# 5 informative features among 20, noise 1.0, 2000 samples (1200 train, 400 val, 400 test), searchlab's regressor
# on raw targets (mean ~14, so the learning rate and the schedule matter more than on a classification's logits),
# the default space, 25 steps per epoch. 53 random trials (study.seed 7, no pruning): median val_r2 0.67, 90th
# percentile 0.81, best three 0.852, 0.852, 0.880 (~1 CPU s a trial); target 0.85: 3 of 53 random trials reach it.
FRIEDMAN_N = 2000


def _friedman(out: Path) -> tuple[str, ...]:
    """Friedman #1 written into out/ once as an .npz for data=npz (generated: nothing downloaded)."""
    path = out / f"friedman-{FRIEDMAN_N}.npz"
    if not path.is_file():
        import numpy as np
        from sklearn.datasets import make_friedman1

        x, y = make_friedman1(n_samples=FRIEDMAN_N, n_features=20, noise=1.0, random_state=0)
        x, y = x.astype(np.float32), y.astype(np.float32)
        cut = [int(FRIEDMAN_N * 0.6), int(FRIEDMAN_N * 0.8)]
        out.mkdir(parents=True, exist_ok=True)
        np.savez(path, x_train=x[:cut[0]], y_train=y[:cut[0]], x_val=x[cut[0]:cut[1]], y_val=y[cut[0]:cut[1]],
                 x_test=x[cut[1]:], y_test=y[cut[1]:])
    return (f"data.path={path}",)


FRIEDMAN = ("data=npz", "module=regressor", "study.metric=val_r2", "trainer.limit_train_batches=25")
SIGNALS = ("model=net1d", "search=net1d", "data=npz", "model.channels=16", "trainer.max_epochs=6")
TASKS: dict[str, Task] = {
    "synthetic-hard": Task(HARD, 0.72, 200, 100.0, "generated: weak features, label noise, close classes"),
    "signals": Task(SIGNALS, 0.894, 200, 200.0, "examples/signals' Net1D on 2000 of its signals (1200 train, 400 val), "
                    "written by its signals.py at bench time (data.path)",
                    ("--config-dir", str(EXAMPLE / "conf")), _signals),
    "friedman": Task(FRIEDMAN, 0.85, 200, 300.0, "generated regression: Friedman #1, 5 of 20 features informative, "
                     "searchlab's regressor on raw targets, val_r2", prepare=_friedman),
    "digits": Task((), 0.985, 150, 80.0, "digits, the default study (quick; at 0.975 all methods tie, see above)"),
}


def _entry(table: str, name: str, target: str, **settings: object) -> str:
    """`+study.<table>.<name>={_target_: ..., k: v}`: a new sampler or pruner entry as one override."""
    body = ",".join([f"_target_:{target}", *(f"{k}:{v}" for k, v in settings.items())])
    return f"+{KEYS[table]}.{name}={{{body}}}"


def _method(sampler: tuple[str, dict[str, object]] | str, pruner: tuple[str, dict[str, object]] | str,
            ) -> tuple[str, ...]:
    """Overrides choosing a sampler and a pruner: a conf/ entry by name, or (Optuna class, settings) as a new entry."""
    out: list[str] = []
    for kind, table, choice in (("sampler", "samplers", sampler), ("pruner", "pruners", pruner)):
        if isinstance(choice, str):
            out.append(_set(kind, choice))
        else:
            cls, settings = choice
            short = cls.rsplit(".", 1)[1].lower().removesuffix("sampler").removesuffix("pruner")
            values = ("inner" if str(v).startswith("{") else str(v) for v in settings.values())  # a nested entry
            name = "bench_" + "_".join([short, *values])
            name = "".join(c if c.isalnum() or c == "_" else "" for c in name)
            out += [_entry(table, name, cls, **settings), _set(kind, name)]
    return tuple(out)


TPE = "optuna.samplers.TPESampler"
RANDOM = ("optuna.samplers.RandomSampler", {})
NONE = ("optuna.pruners.NopPruner", {})
HB, SH = "optuna.pruners.HyperbandPruner", "optuna.pruners.SuccessiveHalvingPruner"
MEDIAN = "optuna.pruners.MedianPruner"
GP = "optuna.samplers.GPSampler"
# TPE as shipped before issue 12 (the reference "TPE"): 10 random start-up trials, multivariate, grouped.
TPE10 = (TPE, {"n_startup_trials": 10, "multivariate": True, "group": True, "constant_liar": True})
TPE5 = (TPE, {"n_startup_trials": 5, "multivariate": True, "group": True, "constant_liar": True})
TPE10_UNI = (TPE, {"n_startup_trials": 10, "multivariate": False, "group": False, "constant_liar": True})
EPOCHS = "'${trainer.max_epochs}'"


def _random_share(sampler: tuple[str, dict[str, object]], share: float) -> tuple[str, dict[str, object]]:
    """searchlab.study.samplers.RandomShare around `sampler` (its entry as a nested override value)."""
    cls, settings = sampler
    inner = ",".join([f"_target_:{cls}", *(f"{k}:{v}" for k, v in settings.items())])
    return ("searchlab.study.samplers.RandomShare", {"sampler": f"{{{inner}}}", "share": share})

@dataclass(frozen=True)
class Method:
    label: str
    sampler_pruner: tuple[str, ...]  # _method(...): the sampler and pruner overrides
    extra: tuple[str, ...] = ()  # other overrides of the method (e.g. study.pack=4), after those
    # The task's trial cap times this: study.pack=K runs K trials per draw of the shared keys, at a fraction of a
    # trial's cost, so the task's cap (200) would end its runs long before the CPU cap; K keeps the draws the same.
    max_trials_factor: int = 1

    @property
    def overrides(self) -> tuple[str, ...]:
        return (*self.sampler_pruner, *self.extra)

    def describe(self) -> str:
        """The sampler and pruner entries, short, then the extra overrides:
        `TPESampler{n_startup_trials:10,...} + NopPruner{}` (`+ study.pack=4`)."""
        if not self.overrides:
            return "conf/study/default.yaml as it is"
        entries = [o.split("=", 1)[1] for o in self.sampler_pruner if o.startswith("+")]
        cap = [f"the task's trial cap x{self.max_trials_factor}"] if self.max_trials_factor != 1 else []
        return " + ".join([*(e.replace("{_target_:optuna.samplers.", "").replace("{_target_:optuna.pruners.", "")
                             .replace(",", "{", 1).rstrip("}") + ("}" if "," in e else "")
                             for e in entries), *self.extra]) + "".join(f" ({c})" for c in cap)


# Short name (for --methods) -> method. The first four are the references the targets are stated against.
METHODS: dict[str, Method] = {
    "default": Method("default (conf as shipped)", ()),
    "random": Method("random, no pruning", _method(RANDOM, NONE)),
    "tpe": Method("TPE, no pruning", _method(TPE10, NONE)),
    "tpe-hb2": Method("TPE + Hyperband min 2 (old default)",
                      _method(TPE10, (HB, {"min_resource": 2, "max_resource": EPOCHS, "reduction_factor": 3}))),
    "tpe-hb1": Method("TPE + Hyperband min 1",
                      _method(TPE10, (HB, {"min_resource": 1, "max_resource": EPOCHS, "reduction_factor": 3}))),
    "tpe-sh1": Method("TPE + SH min 1, rf 3", _method(TPE10, (SH, {"min_resource": 1, "reduction_factor": 3}))),
    "tpe-sh1-rf4": Method("TPE + SH min 1, rf 4", _method(TPE10, (SH, {"min_resource": 1, "reduction_factor": 4}))),
    "tpe-median": Method("TPE + median (5 start-up, warm-up 3)",
                         _method(TPE10, (MEDIAN, {"n_startup_trials": 5, "n_warmup_steps": 3}))),
    "tpe5-sh1": Method("TPE start-up 5 + SH min 1, rf 3 (the default until 2026-12-03)",
                       _method(TPE5, (SH, {"min_resource": 1, "reduction_factor": 3}))),
    "tpe-uni-sh1": Method("TPE univariate + SH min 1, rf 3",
                          _method(TPE10_UNI, (SH, {"min_resource": 1, "reduction_factor": 3}))),
    "tpe-median-w5": Method("TPE + median (5 start-up, warm-up 5)",
                            _method(TPE10, (MEDIAN, {"n_startup_trials": 5, "n_warmup_steps": 5}))),
    "tpe5-median": Method("TPE start-up 5 + median (5 start-up, warm-up 3)",
                          _method(TPE5, (MEDIAN, {"n_startup_trials": 5, "n_warmup_steps": 3}))),
    "tpe-hb4": Method("TPE + Hyperband min 4",
                      _method(TPE10, (HB, {"min_resource": 4, "max_resource": EPOCHS, "reduction_factor": 3}))),
    # PatientPruner alone (no wrapped pruner): study.pruners entries cannot nest a second _target_ yet.
    "tpe-patient": Method("TPE + patient (3 epochs without gain)",
                          _method(TPE10, ("optuna.pruners.PatientPruner", {"wrapped_pruner": "null", "patience": 3}))),
    "random-sh1": Method("random + SH min 1, rf 3", _method(RANDOM, (SH, {"min_resource": 1, "reduction_factor": 3}))),
    # TPE start-up 5 inside searchlab's RandomShare: a share of the trials drawn at random (issue 20 part 4).
    **{f"tpe5-rs{int(share * 100)}-sh1": Method(f"TPE start-up 5, {share:.0%} random + SH min 1, rf 3",
                                                 _method(_random_share(TPE5, share),
                                                         (SH, {"min_resource": 1, "reduction_factor": 3})))
       for share in (0.2, 0.33)},
    "tpe5-sh3": Method("TPE start-up 5 + SH min 3, rf 3 (the default)",
                       _method(TPE5, (SH, {"min_resource": 3, "reduction_factor": 3}))),
    # Variations of the default (issue 20 part 4): prune harder, exploit sooner, weigh more EI candidates.
    "tpe5-sh3-rf4": Method("TPE start-up 5 + SH min 3, rf 4",
                           _method(TPE5, (SH, {"min_resource": 3, "reduction_factor": 4}))),
    "tpe3-sh3": Method("TPE start-up 3 + SH min 3, rf 3",
                       _method((TPE, {**TPE5[1], "n_startup_trials": 3}),
                               (SH, {"min_resource": 3, "reduction_factor": 3}))),
    "tpe5-ei64-sh3": Method("TPE start-up 5, 64 EI candidates + SH min 3, rf 3",
                            _method((TPE, {**TPE5[1], "n_ei_candidates": 64}),
                                    (SH, {"min_resource": 3, "reduction_factor": 3}))),
    # Gaussian-process BO (Optuna's GPSampler: COMPLETE trials only, so pruned ones teach it nothing), alone and
    # under the default's pruner (issue 20 part 4: "GPSampler ... after TPE's start-up").
    "gp": Method("GP (10 start-up), no pruning", _method((GP, {"n_startup_trials": 10}), NONE)),
    "gp5": Method("GP (5 start-up), no pruning", _method((GP, {"n_startup_trials": 5}), NONE)),
    "gp5-sh3": Method("GP (5 start-up) + SH min 3, rf 3",
                      _method((GP, {"n_startup_trials": 5}), (SH, {"min_resource": 3, "reduction_factor": 3}))),
    # The default of 2026-11-26 with K trials trained at once as one model (study.pack; docs/packing.md): members
    # 2..K shared the first's optimizer, schedule, shape and batch size then; TPE drew their numbers.
    **{f"tpe5-sh1-pack{k}": Method(f"the default + study.pack={k}",
                                   _method(TPE5, (SH, {"min_resource": 1, "reduction_factor": 3})),
                                   (_set("pack", k),), max_trials_factor=k) for k in (4, 8)},
    # conf as shipped with study.pack=K (issue 19 part 3): members draw their own optimizer and schedule families.
    **{f"default-pack{k}": Method(f"default + study.pack={k}", (), (_set("pack", k),), max_trials_factor=k)
       for k in (4, 8)},
    # ... with members drawn as lone trials, those of one shape packed together (study.pack_members=independent).
    **{f"default-pack{k}-independent": Method(f"default + study.pack={k}, independent members", (),
                                              (_set("pack", k), _set("pack_members", "independent")),
                                              max_trials_factor=k)
       for k in (4, 8)},
}
DEFAULT, RANDOM_REF, TPE_REF = "default", "random", "tpe"
# The method whose sampler and pruner conf/study/default.yaml ships now (drawn thick, named so in the tables).
SHIPPED = "tpe5-sh3"
# What `make bench` runs (the rest: --methods NAME,...): the references and the pruners worth a row. The packed
# default (default-pack4/8) is left out: a setting of how trials run, not a sampler or pruner, and 2 more rows.
STANDARD = ["default", "random", "tpe", "tpe-hb2", "tpe-hb1", "tpe-sh1", "tpe-median", "tpe5-sh1"]



# study.timeout, as a multiple of the task's CPU-seconds cap: a wall-clock backstop only (a loaded machine is slower).
WALL_BACKSTOP = 8


class _Stop(KeyboardInterrupt):
    """Ends a search at a trial's end (the CLI treats it as Ctrl-C: the study is kept, no report is written)."""


@dataclass
class Run:
    task: str
    method: str
    seed: int
    reached: bool = False
    seconds: float = 0.0  # CPU seconds to the target; all of the run's when not reached
    wall_seconds: float = 0.0  # the same on the wall clock
    trials: int = 0  # finished trials (any state) to the target; all of the run's when not reached
    trace: list[tuple[float, float | None]] = field(default_factory=list)  # (CPU s, best complete value so far)
    states: dict[str, int] = field(default_factory=dict)
    exit_code: int = 0


class _Watch(io.TextIOBase):
    """The search's stdout: after each printed line (one per finished trial) reads the study's storage and ends the
    run (raises _Stop) once the target is reached or a cap is hit."""

    def __init__(self, check: Callable[[], bool]) -> None:
        self.check, self.text = check, []

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def write(self, text: str) -> int:
        self.text.append(text)
        if "\n" in text and self.check():
            raise _Stop
        return len(text)


def _trials(storage: JournalStorage, name: str) -> list[optuna.trial.FrozenTrial]:
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:  # not created yet
        return []
    return sorted((t for t in study.get_trials(deepcopy=False) if t.state.is_finished()),
                  key=lambda t: t.datetime_complete)


def _first_start(storage: JournalStorage, name: str) -> datetime | None:
    try:
        trials = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    except KeyError:
        return None
    starts = [t.datetime_start for t in trials if t.datetime_start is not None]
    return min(starts) if starts else None


def run_one(out: Path, task_name: str, task: Task, method: str, seed: int, extra: list[str]) -> Run:
    """One study of `method` on the task with sampler seed `seed`, ended at the target or a cap."""
    from searchlab.cli import main as searchlab_main

    out.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() else "-" for c in f"{task_name}-{method}-s{seed}").strip("-")
    journal = out / f"{slug}.journal"
    prepared = task.prepare(out / "data") if task.prepare else ()
    overrides = [*task.overrides, *prepared, *METHODS[method].overrides, *extra, _set("sampler_seed", seed),
                 _set("n_trials", task.max_trials), _set("timeout", WALL_BACKSTOP * task.max_seconds),
                 _set("name", slug),
                 _set("storage", journal), _set("tracking_uri", f"sqlite:///{out}/mlflow.db"),
                 _set("artifact_root", out / "artifacts"), _set("report_dir", out / "reports"), _set("workers", 1)]
    storage: JournalStorage | None = None
    cpu = {"start": None, "checks": 0.0}  # process CPU seconds at the study's start, and spent in check() since
    cpu_at: dict[int, float] = {}  # finished trials -> the run's CPU seconds when that many had finished

    def check() -> bool:
        nonlocal storage
        now = time.process_time()
        if cpu["start"] is None:  # the first line: the study is open and its loop about to start
            cpu["start"] = now
        if storage is None:
            storage = JournalStorage(JournalFileBackend(str(journal)))
        trials, start = _trials(storage, slug), _first_start(storage, slug)
        cpu_at.setdefault(len(trials), now - cpu["start"] - cpu["checks"])
        try:
            if start is None:
                return False
            if any(t.state == TrialState.COMPLETE and t.value >= task.target for t in trials):
                return True
            return len(trials) >= task.max_trials or cpu_at[len(trials)] >= task.max_seconds
        finally:
            cpu["checks"] += time.process_time() - now

    watch = _Watch(check)
    log_path = out / f"{slug}.log"
    with open(log_path, "w") as log, contextlib.redirect_stdout(watch), contextlib.redirect_stderr(log):
        code = searchlab_main(["search", *task.args, *overrides])
    with open(log_path, "a") as log:
        log.write("".join(watch.text))
    storage = JournalStorage(JournalFileBackend(str(journal)))
    run = _result(Run(task_name, method, seed, exit_code=code), _trials(storage, slug), _first_start(storage, slug),
                  task.target, cpu_at)
    if code not in (0, 130) or not run.trace:
        raise RuntimeError(f"bench methods: {slug} ended with exit code {code} and {len(run.trace)} trials; see "
                           f"{log_path}")
    return run


def _result(run: Run, trials: list[optuna.trial.FrozenTrial], start: datetime | None, target: float,
            cpu_at: dict[int, float]) -> Run:
    """Fills the run's figures from its finished trials (in order of completion), the first trial's start and the
    CPU seconds read after each trial."""
    best: float | None = None
    for count, t in enumerate(trials, 1):
        run.states[t.state.name] = run.states.get(t.state.name, 0) + 1
        if t.state == TrialState.COMPLETE and (best is None or t.value > best):
            best = t.value
        wall = (t.datetime_complete - start).total_seconds() if start else 0.0
        # A pack's members finish together and are read at one check: the CPU at the first check that saw them.
        cpu = cpu_at.get(count, min((c for n, c in cpu_at.items() if n >= count), default=max(cpu_at.values(),
                                                                                              default=wall)))
        run.trace.append((cpu, best))
        if not run.reached:
            run.seconds, run.wall_seconds, run.trials = cpu, wall, count
            run.reached = best is not None and best >= target
    return run


def with_caps(task: Task, max_trials: int | None, max_seconds: float | None) -> Task:
    """The task with smaller caps (a quick or smoke run)."""
    return replace(task, max_trials=min(task.max_trials, max_trials or task.max_trials),
                   max_seconds=min(task.max_seconds, max_seconds or task.max_seconds))


@dataclass
class MethodsResult:
    tasks: dict[str, Task]  # as run (caps applied)
    methods: list[str]
    seeds: list[int]
    extra: list[str]
    runs: list[Run]
    wall_seconds: float = 0.0
    threads: int | None = None

    def of(self, task: str, method: str) -> list[Run]:
        return [r for r in self.runs if r.task == task and r.method == method]

    def seconds(self, task: str, method: str) -> list[float]:
        """Seconds to the target; a run that missed counts as the task's time cap (a lower bound)."""
        cap = self.tasks[task].max_seconds
        return [r.seconds if r.reached else max(cap, r.seconds) for r in self.of(task, method)]

    def trials(self, task: str, method: str) -> list[float]:
        """Trials to the target; a run that missed counts as its trials (a lower bound)."""
        return [float(r.trials) for r in self.of(task, method)]

    def median_seconds(self, task: str, method: str) -> float:
        return statistics.median(self.seconds(task, method))

    def median_is_bound(self, task: str, method: str) -> bool:
        """Whether half or more of the runs missed: the median is then only a lower bound."""
        runs = self.of(task, method)
        return sum(not r.reached for r in runs) * 2 >= len(runs)


def run_methods(out: Path, seeds: list[int], tasks: list[str] | None = None, methods: list[str] | None = None,
                extra: list[str] | None = None, max_trials: int | None = None, max_seconds: float | None = None,
                threads: int | None = 1, progress: Callable[[Run], None] | None = None,
                log: Path | None = None) -> MethodsResult:
    """Every (task, method, seed) run, seeds outer; tasks and methods are names in TASKS and METHODS. `threads`: torch
    intra-op threads during the runs (1: CPU seconds are the work done, not threads spinning on a shared machine;
    None leaves torch's setting). Each finished run is also appended to `log` (JSON lines; load_runs reads it)."""
    import torch

    out.mkdir(parents=True, exist_ok=True)
    tasks, methods = list(tasks or TASKS), list(methods or STANDARD)
    unknown = [t for t in tasks if t not in TASKS] + [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"bench methods: unknown {', '.join(unknown)} (tasks: {', '.join(TASKS)}; methods: "
                         f"{', '.join(METHODS)})")
    specs = {t: with_caps(TASKS[t], max_trials, max_seconds) for t in tasks}
    runs: list[Run] = []
    start, threads_before = time.perf_counter(), torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        for seed in seeds:
            order = methods[seed % len(methods):] + methods[:seed % len(methods)]  # rotate: none always first
            for task in tasks:
                for method in order:
                    spec = replace(specs[task], max_trials=specs[task].max_trials * METHODS[method].max_trials_factor)
                    runs.append(run_one(out, task, spec, method, seed, list(extra or [])))
                    if log:
                        with open(log, "a") as f:
                            f.write(json.dumps(asdict(runs[-1])) + "\n")
                    if progress:
                        progress(runs[-1])
    finally:
        torch.set_num_threads(threads_before)
    return MethodsResult(specs, methods, seeds, list(extra or []), runs, time.perf_counter() - start,
                         torch.get_num_threads() if not threads else threads)


def load_runs(path: Path, seeds: list[int] | None = None, tasks: list[str] | None = None,
              methods: list[str] | None = None, max_trials: int | None = None,
              max_seconds: float | None = None, threads: int | None = 1) -> MethodsResult:
    """A result from a runs.jsonl written by run_methods (a run that was stopped part-way: what it had done)."""
    runs = [Run(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
    runs = [r for r in runs if (seeds is None or r.seed in seeds) and (tasks is None or r.task in tasks)
            and (methods is None or r.method in methods)]
    tasks = tasks or list(dict.fromkeys(r.task for r in runs))
    methods = methods or list(dict.fromkeys(r.method for r in runs))
    specs = {t: with_caps(TASKS[t], max_trials, max_seconds) for t in tasks}
    return MethodsResult(specs, methods, sorted({r.seed for r in runs}), [], runs, 0.0, threads)


def _quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def _fmt(x: float) -> str:
    return f"{x:.1f}" if x < 100 else f"{x:.0f}"


def methods_markdown(r: MethodsResult, plot_name: str) -> str:
    """The part-4 section of bench/results.md: per task, one row per method, with spread and ratios."""
    lines = [f"### Search methods on tasks where they differ (study.seed 0..N-1 per task and method, interleaved; "
             f"torch threads {r.threads or 'as set'}"
             + (f"; {r.wall_seconds / 60:.0f} min in all)" if r.wall_seconds else ")"), ""]
    for task, spec in r.tasks.items():
        seeds = sorted({run.seed for run in r.runs if run.task == task})
        metric = next((o.split("=", 1)[1] for o in spec.overrides if o.startswith(f"{KEYS['metric']}=")), "val_acc")
        lines += [
            f"**{task}** ({len(seeds)} seeds) — {spec.note}; target: best {metric} >= {spec.target} (a COMPLETE "
            f"trial); caps {spec.max_trials} trials / {spec.max_seconds:g} CPU s per run; overrides: "
            f"`{' '.join([*spec.args, *spec.overrides]).replace(f'{EXAMPLE.parent.parent}/', '') or 'none'}`",
            "",
            "| method | reached | median CPU s | IQR | min–max | median wall s | median trials | IQR | vs TPE | "
            "vs random |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        ref_tpe = r.median_seconds(task, TPE_REF) if r.of(task, TPE_REF) else None
        ref_random = r.median_seconds(task, RANDOM_REF) if r.of(task, RANDOM_REF) else None
        for method in (m for m in r.methods if r.of(task, m)):
            secs, trials = r.seconds(task, method), r.trials(task, method)
            reached = sum(run.reached for run in r.of(task, method))
            bound = ">=" if r.median_is_bound(task, method) else ""
            med = statistics.median(secs)
            (s1, s3), (t1, t3) = _quartiles(secs), _quartiles(trials)
            vs_tpe = f"{med / ref_tpe:.2f}" if ref_tpe else "-"
            vs_random = f"{med / ref_random:.2f}" if ref_random else "-"
            wall = statistics.median(run.wall_seconds for run in r.of(task, method))
            lines.append(f"| {METHODS[method].label} | {reached}/{len(secs)} | {bound}{_fmt(med)} | "
                         f"{_fmt(s1)}–{_fmt(s3)} | {_fmt(min(secs))}–{_fmt(max(secs))} | {bound}{_fmt(wall)} | "
                         f"{bound}{statistics.median(trials):.0f} | {t1:.0f}–{t3:.0f} | {vs_tpe} | {vs_random} |")
        lines.append("")
    lines += [
        "- Time to target: CPU seconds of the search process (all its threads) from the study's start to the end "
        "of the trial that reached the target — on a shared machine the work done, where wall time is mostly the "
        "neighbours' load; the wall-clock median is beside it. A run that missed counts as the CPU cap (>=: half or "
        "more missed, so the median is a lower bound). Trials: finished trials (complete, pruned, failed) up to that "
        "one, or all of a run that missed. vs TPE / vs random: median CPU seconds over those of \"TPE, no pruning\" / "
        "\"random, no pruning\" (the issue's targets for the default on a hard task: <= 0.5 and <= 0.2).",
        f"- Extra overrides: {' '.join(r.extra) or 'none'}. Method overrides: "
        + "; ".join(f"{METHODS[m].label}: `{METHODS[m].describe()}`" for m in r.methods) + ".",
        f"- Plot (time to target): the share of runs that reached the target by each CPU second, per task and "
        f"method: `{plot_name}`.",
    ]
    return "\n".join(lines) + "\n"


def plot_methods(r: MethodsResult, path: Path) -> None:
    """Time-to-target plot: per task, the share of runs that reached the target by each second (log time)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(r.tasks), figsize=(5.5 * len(r.tasks) + 2.5, 4.6), squeeze=False)
    cmap = plt.get_cmap("tab20" if len(r.methods) > 10 else "tab10")
    for ax, (task, spec) in zip(axes[0], r.tasks.items(), strict=True):
        fastest = min([run.seconds for run in r.runs if run.task == task and run.reached] + [spec.max_seconds])
        for i, method in enumerate(r.methods):
            runs = r.of(task, method)
            if not runs:
                continue
            times = sorted(run.seconds for run in runs if run.reached)
            xs = [fastest * 0.5, *times, spec.max_seconds]
            ys = [0.0, *[(k + 1) / len(runs) for k in range(len(times))], len(times) / len(runs)]
            reference = method in (DEFAULT, RANDOM_REF, TPE_REF, SHIPPED)
            ax.step(xs, ys, where="post", color=cmap(i), label=METHODS[method].label,
                    linewidth=2.6 if reference else 1.2)
        ax.set_xscale("log")
        ax.set_xlim(fastest * 0.5, spec.max_seconds)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("CPU seconds of the search (log scale)")
        ax.set_ylabel("share of runs that reached the target")
        ax.set_title(f"{task}: target {spec.target} (caps {spec.max_trials} trials / {spec.max_seconds:g} CPU s)",
                     fontsize=9)
        ax.grid(alpha=0.3, which="both")
    shown = {label: handle for ax in axes[0] for handle, label in zip(*ax.get_legend_handles_labels(), strict=True)}
    axes[0][-1].legend(shown.values(), shown.keys(), loc="upper left", fontsize=7, bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def rebuild(jsonl: list[Path], out: Path, command: str, note: str = "") -> str:
    """The part's section and plot from runs already recorded (one or more runs.jsonl), merged into
    out/results.md; e.g. after runs of different tasks or methods made apart."""
    from bench.results import machine, merge_results

    joined = out / "methods-runs.jsonl"
    lines = [line for path in jsonl for line in path.read_text().splitlines() if line.strip()]
    joined.write_text("\n".join(lines) + "\n")
    result = load_runs(joined)
    result.tasks = {t: result.tasks[t] for t in TASKS if t in result.tasks}  # TASKS' order
    plot = out / "methods.png"
    plot_methods(result, plot)
    section = methods_markdown(result, plot.name)
    results = out / "results.md"
    stamp = f"{datetime.now():%Y-%m-%d %H:%M}"
    run_line = (f"- Rebuilt {stamp} from recorded runs: `{command}`\n- Machine (now): {machine()}\n"
                + (f"- {note}\n" if note else ""))
    results.write_text(merge_results(results.read_text() if results.is_file() else "", run_line,
                                     {"methods": [section]}))
    return section


if __name__ == "__main__":
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m bench.methods",
                                     description="rebuild the methods section and plot from recorded runs")
    parser.add_argument("runs", nargs="+", type=Path, help="runs.jsonl files written by `python -m bench`")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    parser.add_argument("--note", default="", help="a line on how the runs were made (commands, machine load)")
    parsed = parser.parse_args()
    print(rebuild(parsed.runs, parsed.out, "python -m bench.methods " + " ".join(sys.argv[1:]).split(" --note")[0],
                  parsed.note))
