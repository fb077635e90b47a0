"""The sweep: searchlab's study around the jobs of the user's `@hydra.main` app.

What a trial trains is one job of the app, launched with the trial's values as overrides through the app's own
launcher (`launcher.launch([overrides], initial_job_idx)`); its value is the task function's return value
(`JobReturn.return_value`; a list with several objectives). searchlab.hydra.TrialCallback, added to the job by an
override of the app's callbacks group, reports each epoch to the trial, logs it to the trial's MLflow run and stops a
pruned job. Everything around the trial is searchlab's: the study (resumed by name), the exact budget over workers,
dead workers' trials re-queued, the MLflow parent run and a child run per trial, one progress line per trial, the
report at the end.

NOTE: searchlab's trial lifecycle and study session are being unified (searchlab/study/); until then this builds on
today's pieces (open_study, Budget, run_trials, WorkerPool, Tracker) and tells its trials itself, as
searchlab.trial.TrialRunner does. The part that is the sweeper's own is `JobWork`: start a trial, launch its job,
read what the job returned.
"""

from __future__ import annotations

import contextlib
import math
import os
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import optuna
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from searchlab.attrs import (
    APP_COMMAND,
    EPOCHS_REPORTED,
    MLFLOW_PARENT_RUN_ID,
    MLFLOW_RUN_ID,
    OVERRIDES,
    PRUNED_BY_CALLBACK,
    REASON,
)
from searchlab.attrs import METRIC as METRIC_ATTR
from searchlab.budget import Budget, budget_used
from searchlab.config import ConfigError, format_override, redact
from searchlab.devices import cpu_count, detect_gpus, plan_workers, worker_count
from searchlab.faults import heartbeat, heartbeat_settings
from searchlab.hydra import callback_overrides, rerun_command
from searchlab.locks import NoLock, budget_lock
from searchlab.objectives import Objectives, first_value, metric_setting
from searchlab.progress import Progress
from searchlab.report import write_report
from searchlab.storage import open_storage
from searchlab.study import (
    StudyStopped,
    best_trial,
    check_sampler,
    make_pruner,
    make_sampler,
    open_study,
    run_trials,
    state_counts,
)
from searchlab.tracking import Tracker
from searchlab.trial import TrialOutcome
from searchlab.workers import DeadWorkers, WorkerPool

from ._settings import PREFIX, AppComposer, SweepSettings

OUTPUT_DIR_TAG = "searchlab.output_dir"  # MLflow tag of a trial's run: the job's Hydra output folder


class Sweep:
    """One run of the sweeper (the parent, a worker of it, or the only process): the study, its tracking, the
    loop."""

    def __init__(self, sweeper: Any, settings: SweepSettings) -> None:
        self.sweeper, self.launcher, self.master = sweeper, sweeper.launcher, sweeper.config
        self.loader = sweeper.hydra_context.config_loader
        self.settings = settings
        self.cfg = self.settings.cfg
        if self.cfg.study.pack != 1:
            raise ConfigError(f"{PREFIX}.study.pack: packed trials need searchlab's own training; the sweeper runs "
                              "one job of the app per trial (leave it 1)")
        self.objectives = Objectives.of(self.cfg.study)
        self.composer = AppComposer(self.loader, self.master, self.settings.arguments)
        self.as_worker = self.settings.worker is not None
        self.in_process = type(self.launcher).__name__ == "BasicLauncher"
        gpus = detect_gpus("auto")
        # Basic launcher: N worker processes on the study, each taking the next trial when free. Any other launcher
        # (joblib, submitit, ...) runs jobs elsewhere: it gets batches of `workers` jobs.
        self.slots = [] if self.as_worker or not self.in_process else plan_workers(
            self.cfg.workers, gpus, cpu_count(), 1)
        self.batch = 1 if self.in_process else worker_count(self.cfg.workers, gpus)
        check_sampler(self.cfg, self.settings.space)
        self.command = self._app_command()
        self.sweep_dir = Path(str(self.master.hydra.sweep.dir)).resolve()

    def _app_command(self) -> list[str]:
        """`python <script> <the command line's overrides>`, without the overrides that chose this sweeper (a
        hparams_search=... group) and in RUN mode: what re-runs one trial alone, with its values appended."""
        groups = self.composer.groups
        kept = []
        for argument in self.settings.arguments:
            key = argument.split("=", 1)[0].lstrip("+~")
            if key in groups:
                without = [a for a in self.settings.arguments if a != argument]
                try:
                    cfg = AppComposer(self.loader, self.master, without).compose([])
                except ConfigError:  # the command line's hydra.sweeper.* settings need it: it brought the sweeper
                    continue
                if "searchlab_sweeper" not in str(OmegaConf.select(cfg, "hydra.sweeper._target_", default="")):
                    continue  # this override brought the sweeper in
            kept.append(argument)
        script = os.path.relpath(sys.argv[0]) if Path(sys.argv[0]).is_file() else sys.argv[0]
        return ["python", script, *kept]

    def run(self) -> list[JobReturn]:
        cfg, objectives, space = self.cfg, self.objectives, self.settings.space
        sampler = make_sampler(cfg, space, self.settings.worker or 0)
        pruner = make_pruner(cfg)
        tracker = Tracker(cfg.tracking.uri, cfg.tracking.artifact_root, cfg.tracking.flush_seconds)
        storage = open_storage(cfg.study.storage, heartbeat_settings(cfg.study, tracker))
        study = open_study(cfg, objectives, storage, sampler, pruner)
        settings = {
            "study.name": cfg.study.name, "study.n_trials": cfg.study.n_trials, "study.timeout": cfg.study.timeout,
            "study.direction": ", ".join(objectives.directions), "study.metric": metric_setting(objectives.names),
            "study.sampler": cfg.study.sampler, "study.pruner": cfg.study.pruner, "study.seed": cfg.study.seed,
            "study.storage": redact(cfg.study.storage), "search": space.source,
            "app": redact(shlex.join(self.command)), "launcher": type(self.launcher).__name__,
        }
        lock = budget_lock(storage, cfg.study.storage, cfg.study.name)
        with lock():  # one parent run, however many workers start at once
            parent_run_id = tracker.study_run(cfg.study.name, settings)
            study.set_user_attr(MLFLOW_PARENT_RUN_ID, parent_run_id)
            study.set_user_attr(METRIC_ATTR, objectives.stored)
            study.set_user_attr(APP_COMMAND, self.command)
        dead = DeadWorkers(study, tracker, parent_run_id, trust_missing_pid=not isinstance(lock, NoLock))
        budget = Budget(study, cfg.study.n_trials, lock, dead)
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        out = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)  # the terminal, while jobs write to logs
        if not self.as_worker:
            OmegaConf.save(self.master, self.sweep_dir / "multirun.yaml")
        done_before = budget_used(study)
        workers = len(self.slots) if len(self.slots) > 1 else self.batch
        if not self.as_worker:
            print(f"study '{cfg.study.name}': {objectives.describe()}; {done_before}/{cfg.study.n_trials} trials "
                  f"done; storage {redact(cfg.study.storage)}; tracking {redact(cfg.tracking.uri)}; space "
                  f"{space.source}; jobs: {self.command[1]} in {self.sweep_dir}"
                  + (f"; {workers} {'workers' if len(self.slots) > 1 else 'jobs per batch'}" if workers > 1 else ""),
                  file=out, flush=True)
            for line in space.describe_constraints():
                print(line, file=out, flush=True)
        progress = Progress(objectives.primary, cfg.study.n_trials, cfg.study.timeout, done_before, out,
                            others=objectives.names[1:])
        work = JobWork(self, study, tracker, parent_run_id, out)

        def on_trial(outcome: TrialOutcome) -> None:
            progress.trial_finished(outcome, best_trial(study))

        status = "FINISHED"
        start = time.monotonic()
        try:
            if len(self.slots) > 1:
                pool = AppWorkers(self._worker_command(), self.slots, budget, cfg.study.max_consecutive_failures)
                status = pool.run(on_trial)
            elif self.batch > 1:
                run_batches(budget, work, cfg, self.batch, on_trial)
            else:
                run_trials(budget, work, cfg, on_trial)
        except KeyboardInterrupt:
            status = "KILLED"
        except StudyStopped as err:
            status = "FAILED"
            print(f"searchlab: study stopped: {redact(str(err))}", file=sys.stderr, flush=True)
        finally:
            progress.close()
            best = best_trial(study)
            if not self.as_worker or budget.done():
                tracker.end_study(parent_run_id, None if best is None else vars(best), state_counts(study), status)
        if self.as_worker:
            return work.returns
        self._summary(study, out, time.monotonic() - start, status)
        if status != "KILLED":
            try:
                result = write_report(study, cfg, tracker)
                print(f"report: {result.folder / 'report.html'}", file=out, flush=True)
            except Exception as err:  # the study is done and stored: `searchlab report` makes it again
                print(f"searchlab: report not written ({type(err).__name__}: {redact(str(err))[:200]})",
                      file=sys.stderr)
        if status == "KILLED":
            print(f"interrupted: run the same command to resume study '{cfg.study.name}'", file=sys.stderr)
            raise KeyboardInterrupt
        if status == "FAILED":
            sys.exit(1)
        return work.returns

    def _worker_command(self) -> list[str]:
        """The app's own command line again, as worker K of this study, writing into this sweep's folder."""
        script = Path(sys.argv[0]).resolve()
        return [sys.executable, str(script), *sys.argv[1:], f"hydra.sweep.dir={self.sweep_dir}"]

    def _summary(self, study: optuna.Study, out: TextIO, seconds: float, status: str) -> None:
        counts = state_counts(study)
        print(f"\n{budget_used(study)}/{self.cfg.study.n_trials} trials in {seconds:.1f}s this run: "
              + ", ".join(f"{n} {state.lower()}" for state, n in counts.items()), file=out)
        best = best_trial(study)
        if best is None:
            print("no trial completed yet", file=out, flush=True)
            return
        print(f"best {self.objectives.primary}={best.value:.4f} at trial {best.number}", file=out)
        for key, value in best.params.items():
            print(f"  {key} = {value}", file=out)
        print(f"re-run it alone:\n  {rerun_command(self.command, best.overrides)}", file=out, flush=True)


class AppWorkers(WorkerPool):
    """searchlab's worker pool (spawn, watch, replace the dead, report each finished trial) whose workers are the
    app's own command line with `hydra.sweeper.worker=K`: each runs the study's loop and takes the next trial as soon
    as it is free; their GPUs are assigned as `searchlab search` assigns them."""

    def __init__(self, app: list[str], slots: Sequence[Any], budget: Budget, max_deaths: int) -> None:
        super().__init__(slots, [], budget, max_deaths)
        self.app = app

    def _spawn(self, index: int) -> Any:
        self.command = [*self.app, f"{PREFIX}.worker={index}"]
        return super()._spawn(index)


class JobWork:
    """What one trial trains under the sweeper: one job of the app. `run(trial)` samples the trial's values, starts
    its MLflow run, launches the job with them and the callback's settings, and tells the trial what came back."""

    def __init__(self, sweep: Sweep, study: optuna.Study, tracker: Tracker, parent_run_id: str, out: TextIO) -> None:
        self.sweep, self.study, self.tracker, self.parent_run_id, self.out = sweep, study, tracker, parent_run_id, out
        self.cfg, self.objectives = sweep.cfg, sweep.objectives
        self.use_grid = self.cfg.study.sampler == "grid"
        self.returns: list[JobReturn] = []
        self.told_about_callback = False

    def run(self, trial: optuna.Trial) -> TrialOutcome:
        return self.run_batch([trial])[0]

    def run_batch(self, trials: list[optuna.Trial]) -> list[TrialOutcome]:
        """The trials' jobs in one launch (the basic launcher: one trial at a time; others: a batch)."""
        start = time.perf_counter()
        started: list[tuple[optuna.Trial, dict[str, Any], str, list[str]]] = []
        outcomes: dict[int, TrialOutcome] = {}
        with contextlib.ExitStack() as beats:
            for trial in trials:
                beats.enter_context(heartbeat(trial))  # other workers see this one alive (RDB, grpc:// storages)
                values: dict[str, Any] = {}
                run_id = None
                try:
                    values = self.sweep.settings.space.sample(trial, self.use_grid)
                    run_id, overrides = self._start(trial, values)
                except BaseException as err:
                    outcomes[trial.number] = self._fail(trial, run_id, err, start, values)
                    continue
                started.append((trial, values, run_id, overrides))
            if started:
                try:
                    with self._job_output(started[0][0].number) as log:
                        returns = self.sweep.launcher.launch([o for *_, o in started],
                                                             initial_job_idx=started[0][0].number)
                except BaseException as err:  # the launcher itself failed (or Ctrl-C): every started trial fails
                    for trial, values, run_id, _ in started:
                        outcomes[trial.number] = self._fail(trial, run_id, err, start, values)
                    raise_if_interrupt(err)
                else:
                    self.returns.extend(returns)
                    for (trial, values, run_id, _), ret in zip(started, returns, strict=True):
                        outcomes[trial.number] = self._conclude(trial, values, run_id, ret, start, log, len(started))
        return [outcomes[t.number] for t in trials]

    def _start(self, trial: optuna.Trial, values: dict[str, Any]) -> tuple[str, list[str]]:
        """The trial's MLflow run (params, the app's config, the command that re-runs it) and its job's overrides."""
        overrides = [format_override(k, v) for k, v in values.items()]
        app_cfg = self.sweep.composer(values)
        config = OmegaConf.to_yaml({k: v for k, v in app_cfg.items() if k != "hydra"}) if app_cfg else ""
        run_id = self.tracker.start_trial(self.parent_run_id, trial.number, values, config,
                                          rerun_command(self.sweep.command, overrides))
        trial.set_user_attr(MLFLOW_RUN_ID, run_id)
        trial.set_user_attr(OVERRIDES, overrides)
        callback = callback_overrides(self.sweep.settings.callbacks_key, {
            "storage": _absolute(self.cfg.study.storage), "study": self.cfg.study.name, "trial": trial.number,
            "run_id": run_id, "metric": self.objectives.primary if not self.objectives.several
            else list(self.objectives.names), "tracking_uri": _absolute(self.cfg.tracking.uri),
            "pruner": OmegaConf.to_container(self.cfg.study.pruners[self.cfg.study.pruner], resolve=True),
        })
        return run_id, [*self.sweep.settings.arguments, *overrides, *callback]

    @contextlib.contextmanager
    def _job_output(self, first: int) -> Iterator[Path]:
        """The jobs' stdout and stderr (Lightning's progress bars and warnings, Hydra's job log lines) into a file,
        so that the terminal shows one line per trial; the file goes to the job's output folder afterwards."""
        self.sweep.sweep_dir.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(prefix=f".trial-{first}-", suffix=".log", dir=self.sweep.sweep_dir)
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        os.dup2(handle, 1)
        os.dup2(handle, 2)
        try:
            yield Path(name)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in (*saved, handle):
                os.close(fd)

    def _conclude(self, trial: optuna.Trial, values: dict[str, Any], run_id: str, ret: JobReturn, start: float,
                  log: Path, batch: int) -> TrialOutcome:
        """PRUNED when the callback stopped the job (whatever it returned), FAIL when it raised or returned no
        number, else COMPLETE with its value."""
        frozen = self.study._storage.get_trial(trial._trial_id)  # what the job wrote to the trial
        output_dir = ret.hydra_cfg.hydra.runtime.output_dir if ret.hydra_cfg is not None else None
        if output_dir is not None:
            self.tracker.client.set_tag(run_id, OUTPUT_DIR_TAG, str(output_dir))
            if batch == 1 and log.exists():
                shutil.move(str(log), Path(output_dir) / "output.log")
        self._tell_about_callback(frozen)
        value: float | list[float] | None = None
        if frozen.user_attrs.get(PRUNED_BY_CALLBACK):
            state, reason = TrialState.PRUNED, frozen.user_attrs[PRUNED_BY_CALLBACK]
        elif ret.status != JobStatus.COMPLETED:
            state, reason = TrialState.FAIL, f"the job raised {_describe(ret._return_value)}"
        else:
            value, problem = self._value(ret._return_value)
            state, reason = (TrialState.FAIL, problem) if value is None else (TrialState.COMPLETE, None)
        self._finish(trial, run_id, state, value, reason)
        several = tuple(value) if isinstance(value, list) else None
        return TrialOutcome(trial.number, state.name, first_value(value), time.perf_counter() - start, reason,
                            values, None, several)

    def _value(self, returned: Any) -> tuple[float | list[float] | None, str | None]:
        """The objective from the task function's return value: a number (a list of them with several metrics)."""
        names = self.objectives.names
        expected = (f"a list of {len(names)} numbers ({', '.join(names)})" if self.objectives.several
                    else "a number")
        items = returned if self.objectives.several and isinstance(returned, (list, tuple)) else [returned]
        numbers = [_number(v) for v in items]
        if len(numbers) != len(names) or any(n is None for n in numbers):
            shown = redact(repr(returned))[:80]
            return None, (f"the job returned {shown}, not {expected}: the task function must return the optimized "
                          "metric")
        if not all(math.isfinite(n) for n in numbers):
            return None, f"the job returned {numbers if self.objectives.several else numbers[0]}, not a finite value"
        return (list(numbers) if self.objectives.several else numbers[0]), None

    def _tell_about_callback(self, frozen: optuna.trial.FrozenTrial) -> None:
        """Once: a job that reported no epoch has no pruning and no curves; say how to add the callback."""
        if self.told_about_callback:
            return
        self.told_about_callback = True
        if frozen.user_attrs.get(EPOCHS_REPORTED):
            return
        key = self.sweep.settings.callbacks_key
        print(f"note: trial {frozen.number}'s job reported no epoch, so trials are neither pruned nor plotted per "
              f"epoch: the sweeper adds searchlab.hydra.TrialCallback as {key}.searchlab; have the app pass the "
              f"entries of `{key}` to its Trainer (or set {PREFIX}.callbacks_key), or add "
              "searchlab.hydra.trial_callback() to its Trainer's callbacks", file=self.out, flush=True)

    def _fail(self, trial: optuna.Trial, run_id: str | None, err: BaseException, start: float,
              values: dict[str, Any]) -> TrialOutcome:
        interrupted = isinstance(err, (KeyboardInterrupt, SystemExit))
        reason = "interrupted" if interrupted else _describe(err)
        self._finish(trial, run_id, TrialState.FAIL, None, reason)
        return TrialOutcome(trial.number, "FAIL", None, time.perf_counter() - start, reason, values)

    def _finish(self, trial: optuna.Trial, run_id: str | None, state: TrialState,
                value: float | list[float] | None, reason: str | None) -> None:
        if reason:
            trial.set_user_attr(REASON, reason)
        self.study.tell(trial, value, state=state)
        if run_id is None:  # failed before its run was made: every finished trial has one
            run_id = self.tracker.start_trial(self.parent_run_id, trial.number, trial.params, "", "")
        if isinstance(value, list):  # several objectives: each as objective.<metric>
            self.tracker.log_epoch(run_id, 0, {f"objective.{n}": v for n, v in zip(self.objectives.names, value,
                                                                                    strict=True)})
        self.tracker.end_trial(run_id, state.name, first_value(value), reason)


def run_batches(budget: Budget, work: JobWork, cfg: DictConfig, size: int, on_trial: Any) -> None:
    """Launchers that run jobs elsewhere (joblib, submitit): up to `size` trials per launch, each told as its job
    returns; the study stops after study.max_consecutive_failures failed trials in a row, as run_trials does."""
    deadline = None if cfg.study.timeout is None else time.monotonic() + cfg.study.timeout
    failures_in_a_row = 0
    while True:
        first = budget.reserve(deadline)
        if first is None:
            return
        trials = [first]
        while len(trials) < size and (trial := budget.reserve(deadline, wait=False)) is not None:
            trials.append(trial)
        outcomes = work.run_batch(trials)
        for outcome in outcomes:
            on_trial(outcome)
            failures_in_a_row = failures_in_a_row + 1 if outcome.state == "FAIL" else 0
        if failures_in_a_row >= cfg.study.max_consecutive_failures:
            raise StudyStopped(
                f"{failures_in_a_row} trials failed in a row (last: {outcomes[-1].reason}); "
                f"stopping the study (study.max_consecutive_failures={cfg.study.max_consecutive_failures})")


def raise_if_interrupt(err: BaseException) -> None:
    if isinstance(err, (KeyboardInterrupt, SystemExit)):
        raise KeyboardInterrupt from None


def _number(value: Any) -> float | None:
    """A number as the job returned it: int, float, a NumPy scalar or a one-element tensor; else None."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return None
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError):
        return None


def _absolute(location: str) -> str:
    """A journal path or sqlite:/// URL made absolute: a job may run in its own folder (hydra.job.chdir)."""
    if location.startswith("sqlite:///") and not location.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(location.removeprefix("sqlite:///")).resolve())
    if "://" not in location:
        return str(Path(location).resolve())
    return location


def _describe(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {redact(text[0])[:300]}" if text else type(err).__name__
