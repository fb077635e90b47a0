"""The sweep: searchlab's session and trial lifecycle around the jobs of the user's `@hydra.main` app.

The sweeper is a third entry on searchlab.study.Session and the trial lifecycle (searchlab.study.trial), beside
`search` and `ablate`: `JobWork` is what its trials train, one job of the app each, launched with the trial's values
as overrides through the app's own launcher (`launcher.launch(batch, initial_job_idx)`). A trial's value is the
task function's return value (`JobReturn.return_value`; a list with several objectives).
searchlab.hydra.TrialCallback, added to the job by an override of the app's callbacks group, reports each epoch to
the trial, logs it to the trial's MLflow run and stops a pruned job. Everything else is the session's: the study
(resumed by name), the exact budget over workers, dead workers' trials re-queued, the MLflow parent run and a child
run per trial, the consecutive-failure stop; and searchlab's one progress line per trial, its summary and report.

A job killed mid-training (SIGKILL: its worker's trial is re-queued by DeadWorkers or the heartbeat; SIGTERM or
Ctrl-C: re-queued here) is retried with the same values and resumes from its trial's checkpoint, which the job's
TrialCallback writes (searchlab.training.checkpoints): the retry's job gets the app's `ckpt_path=<checkpoint>` override
(hydra.sweeper.ckpt_path_key), the key lightning-hydra-template's train.py hands to `trainer.fit`. SIGTERM to the
sweeper ends the study KILLED, as `searchlab search` does, and the same command resumes it.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import optuna
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf
from optuna.trial import TrialState

from searchlab.attrs import (
    APP_COMMAND,
    APP_VALUE,
    EPOCHS_REPORTED,
    OUTPUT_DIR_TAG,
    OVERRIDES,
    PRUNED_BY_CALLBACK,
    RESUMED_FROM_EPOCH,
    checkpoint_of,
)
from searchlab.config import ConfigError, Objectives, format_override, metric_setting, redact
from searchlab.devices import detect_gpus, worker_count
from searchlab.hydra import callback_overrides, override_value, rerun_command
from searchlab.interrupts import EXIT_TERMINATED, sigterm_as_interrupt, terminated
from searchlab.report import write_report
from searchlab.report.progress import Progress
from searchlab.study import (
    WORKER_INDEX_ENV,
    Attempt,
    Session,
    SessionSettings,
    TrialOutcome,
    TrialRun,
    TrialWork,
    Verdict,
    best_trial,
    budget_used,
    check_sampler,
    make_pruner,
    make_sampler,
    open_study,
    state_counts,
    worker_slots,
)
from searchlab.study.search_work import requeue_resumable
from searchlab.study.stopping import stop_rules
from searchlab.study.trial import describe, interrupted
from searchlab.training import checkpoints

from ._settings import PREFIX, AppComposer, SweepSettings

EXIT_INTERRUPTED = 130  # as searchlab's CLI


class Sweep:
    """One run of the sweeper: the parent (spawning workers, or running trials itself) or one of its workers."""

    def __init__(self, sweeper: Any, settings: SweepSettings) -> None:
        self.launcher, self.master = sweeper.launcher, sweeper.config
        self.loader = sweeper.hydra_context.config_loader
        self.settings, self.cfg = settings, settings.cfg
        if self.cfg.study.pack != 1:
            raise ConfigError(f"{PREFIX}.study.pack: packed trials need searchlab's own training; the sweeper runs "
                              "one job of the app per trial (leave it 1)")
        if self.cfg.study.get("warm_start"):  # its fitting of earlier trials composes searchlab's own config groups
            raise ConfigError(f"{PREFIX}.study.warm_start: not supported by the sweeper; enqueue earlier values with "
                              "searchlab search --config-dir, or leave it []")
        self.objectives = Objectives.of(self.cfg.study)
        self.composer = AppComposer(self.loader, self.master, settings.arguments)
        self.as_worker = settings.worker
        # Hydra's basic launcher runs a job in this process: N worker processes on the study, each taking the next
        # trial when free. Another launcher (joblib, submitit) runs jobs elsewhere: batches of `workers` jobs.
        self.in_process = type(self.launcher).__name__ == "BasicLauncher"
        self.slots = [] if self.as_worker or not self.in_process else worker_slots(self.cfg.workers, "auto", 1)
        self.batch = 1 if self.in_process else worker_count(self.cfg.workers, detect_gpus("auto"))
        check_sampler(self.cfg, settings.space)
        self.command = self._app_command()
        self.sweep_dir = Path(str(self.master.hydra.sweep.dir)).resolve()
        self.value_name = self._value_name()

    def _value_name(self) -> str:
        """What a trial's value is called: the app's `optimized_metric` (lightning-hydra-template's key of what its
        task function returns), else `value`; with several objectives, study.metric names the returned list."""
        if self.objectives.several:
            return self.objectives.primary
        name = OmegaConf.select(self.master, "optimized_metric", default=None)
        return name if isinstance(name, str) and name else "value"

    def _app_command(self) -> list[str]:
        """`python <script> <the command line's overrides>`, without the overrides that chose this sweeper (a
        hparams_search=... group): what re-runs one trial alone, with its values appended."""
        kept = []
        for argument in self.settings.arguments:
            if argument.split("=", 1)[0].lstrip("+~") in self.composer.groups:
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
        index = int(os.environ.get(WORKER_INDEX_ENV, "0") or 0) if self.as_worker else 0
        sampler, pruner = make_sampler(cfg, space, index), make_pruner(cfg)
        params = {
            "study.name": cfg.study.name, "study.n_trials": cfg.study.n_trials, "study.timeout": cfg.study.timeout,
            "study.direction": ", ".join(objectives.directions), "study.metric": metric_setting(objectives.names),
            "study.sampler": cfg.study.sampler, "study.pruner": cfg.study.pruner, "study.seed": cfg.study.seed,
            "study.storage": redact(cfg.study.storage), "search": space.source,
            "app": redact(shlex.join(self.command)), "launcher": type(self.launcher).__name__,
        }
        session = Session(SessionSettings.of(cfg), lambda storage: open_study(cfg, objectives, storage, sampler,
                                                                              pruner), objectives.stored, params)
        study = session.study
        study.set_user_attr(APP_COMMAND, self.command)  # `searchlab best` prints the app's command
        study.set_user_attr(APP_VALUE, self.value_name)  # ... and names the value it returned
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        out = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)  # the terminal, while jobs write to logs
        done_before = budget_used(study)
        if not self.as_worker:
            OmegaConf.save(self.master, self.sweep_dir / "multirun.yaml")
            workers = len(self.slots) if len(self.slots) > 1 else self.batch
            kind = "workers" if len(self.slots) > 1 else "jobs per launch"
            print(f"study '{cfg.study.name}': {objectives.describe()}; {done_before}/{cfg.study.n_trials} trials "
                  f"done; storage {redact(cfg.study.storage)}; tracking {redact(cfg.tracking.uri)}; space "
                  f"{space.source}; jobs of {self.command[1]} in {self.sweep_dir}"
                  + (f"; {workers} {kind}" if workers > 1 else ""), file=out, flush=True)
            for line in space.describe_constraints():
                print(line, file=out, flush=True)
        progress = Progress(self.value_name, cfg.study.n_trials, cfg.study.timeout, done_before, out,
                            others=objectives.names[1:])

        def on_trial(outcome: TrialOutcome) -> None:
            progress.trial_finished(outcome, best_trial(study))

        work = JobWork(self, session, out)
        start = time.monotonic()
        status = "FINISHED"
        try:
            with sigterm_as_interrupt():  # a preemption or `kill` ends the study KILLED, as Ctrl-C does
                status = session.run(lambda: work, on_trial, self.slots, self._worker_command(),
                                     stop_rules=stop_rules(study, cfg.study.get("stop_when"),
                                                           cfg.study.seed))
        finally:
            progress.close()
            best = best_trial(study)
            if not self.as_worker or session.budget.done() or session.stopped:
                session.end(status, None if best is None else vars(best), state_counts(study))
        if self.as_worker:
            return work.returns
        self._summary(study, out, time.monotonic() - start, session.stopped)
        if status != "KILLED":
            try:
                result = write_report(study, cfg, session.tracker)
                print(f"report: {result.folder / 'report.html'}", file=out, flush=True)
            except Exception as err:  # the study is done and stored: `searchlab report` makes it again
                print(f"searchlab: report not written ({type(err).__name__}: {redact(str(err))[:200]})",
                      file=sys.stderr)
        if status == "KILLED":  # Ctrl-C or SIGTERM: the running trial failed and was re-queued when resumable
            stopped = "terminated (SIGTERM)" if terminated() else "interrupted"
            print(f"{stopped}: run the same command to resume study '{cfg.study.name}' (a trial with a checkpoint "
                  "resumes from it)", file=sys.stderr)
            sys.exit(EXIT_TERMINATED if terminated() else EXIT_INTERRUPTED)
        if status == "FAILED":
            sys.exit(1)
        return work.returns

    def _worker_command(self) -> list[str]:
        """The app's own command line again, as a worker of this study writing into this sweep's folder (its
        number comes in $SEARCHLAB_WORKER, set by the worker pool)."""
        return [sys.executable, str(Path(sys.argv[0]).resolve()), *sys.argv[1:], f"hydra.sweep.dir={self.sweep_dir}",
                f"{PREFIX}.worker=true"]

    def _summary(self, study: optuna.Study, out: TextIO, seconds: float, stopped: str | None) -> None:
        counts = state_counts(study)
        print(f"\n{budget_used(study)}/{self.cfg.study.n_trials} trials in {seconds:.1f}s this run: "
              + ", ".join(f"{n} {state.lower()}" for state, n in counts.items())
              + (f"; stopped early: {stopped}" if stopped else ""), file=out)
        best = best_trial(study)
        if best is None:
            print("no trial completed yet", file=out, flush=True)
            return
        print(f"best {self.value_name}={best.value:.4f} (what the app returned) at trial {best.number}", file=out)
        for key, value in best.params.items():
            print(f"  {key} = {value}", file=out)
        print(f"re-run it alone:\n  {rerun_command(self.command, best.overrides)}", file=out, flush=True)


class JobWork(TrialWork):
    """What the sweeper's trials train: one job of the app each. `prepare` draws the trial's values (its MLflow run
    gets them, the app's composed config and the command that re-runs it); `train` launches the jobs, with the
    callback's settings for each trial, and judges what each job returned."""

    pruned_run_state = "PRUNED"

    def __init__(self, sweep: Sweep, session: Session, out: TextIO) -> None:
        self.sweep, self.out = sweep, out
        self.study, self.tracker, self.parent_run_id = session.study, session.tracker, session.parent_run_id
        self.objectives = None  # the job's callback reports its epochs, not this process
        self.expected = sweep.objectives
        self.size = sweep.batch
        self.cfg = sweep.cfg
        self.use_grid = self.cfg.study.sampler == "grid"
        self.returns: list[JobReturn] = []
        self.told_about_callback = False

    def prepare(self, attempt: Attempt) -> TrialRun:
        attempt.params = values = self.sweep.settings.space.sample(attempt.trial, self.use_grid)
        overrides = [format_override(k, v) for k, v in values.items()]
        attempt.cfg = overrides
        attempt.trial.set_user_attr(OVERRIDES, overrides)
        app_cfg = self.sweep.composer(values)
        config = OmegaConf.to_yaml({k: v for k, v in app_cfg.items() if k != "hydra"})
        return TrialRun(values, config, rerun_command(self.sweep.command, overrides))

    def train(self, attempts: list[Attempt]) -> Iterator[tuple[Attempt, Verdict | Exception]]:
        jobs = [[*self.sweep.settings.arguments, *attempt.cfg, *self._callback(attempt), *self._resume(attempt)]
                for attempt in attempts]
        first = attempts[0].trial.number
        try:
            with self._job_output(first) as log:
                try:
                    returns = self.sweep.launcher.launch(jobs, initial_job_idx=first)
                except BaseException as err:
                    # The interrupted job's frames hold its objects (Lightning's progress bar): freed now, what they
                    # write on closing goes to the job's log, not between the trial lines.
                    _release(err)
                    raise
        except BaseException as err:
            if interrupted(err):  # SIGTERM or Ctrl-C mid-job: a trial with a checkpoint is re-queued to resume
                for attempt in attempts:
                    attempt.note = requeue_resumable(self.study, attempt.trial, self._checkpoint(attempt.trial))
            raise
        self.returns.extend(returns)
        for attempt, ret in zip(attempts, returns, strict=True):
            yield attempt, self._verdict(attempt, ret, log if len(attempts) == 1 else None)
        log.unlink(missing_ok=True)

    def _checkpoint(self, trial: optuna.Trial) -> Path | None:
        """Where the trial's job writes its checkpoint (its retries share it, as searchlab's own trials do); None
        when the app cannot resume one (hydra.sweeper.ckpt_path_key)."""
        if self.sweep.settings.ckpt_path_key is None:
            return None
        return checkpoints.checkpoint_root(self.cfg) / f"trial-{checkpoint_of(trial)}" / checkpoints.CHECKPOINT_FILE

    def _resume(self, attempt: Attempt) -> list[str]:
        """`ckpt_path=<checkpoint>` (the app's key) when an earlier attempt at the trial, with the same values, left
        a checkpoint; a checkpoint of other values (another study under the same name) is removed."""
        path = self._checkpoint(attempt.trial)
        if path is None:
            return []
        saved = checkpoints.read_saved(path)
        if saved is None or saved.owner.get("params") != dict(attempt.trial.params):
            shutil.rmtree(path.parent, ignore_errors=True)
            return []
        return [f"{self.sweep.settings.ckpt_path_key}={override_value(str(path))}"]

    def _callback(self, attempt: Attempt) -> list[str]:
        """The overrides that add searchlab.hydra.TrialCallback for this trial to its job."""
        several = self.expected.several
        settings: dict[str, Any] = {
            "storage": _absolute(self.cfg.study.storage), "study": self.cfg.study.name,
            "trial": attempt.trial.number, "run_id": attempt.run_id,
            "metric": list(self.expected.names) if several else self.expected.primary,
            "tracking_uri": _absolute(self.cfg.tracking.uri),
            "pruner": OmegaConf.to_container(self.cfg.study.pruners[self.cfg.study.pruner], resolve=True),
        }
        path = self._checkpoint(attempt.trial)
        if path is not None:
            settings.update(checkpoint=str(path), checkpoint_every=self.cfg.trainer.checkpoint_every_n_epochs,
                            checkpoint_auto_seconds=self.cfg.trainer.checkpoint_auto_seconds)
        return callback_overrides(self.sweep.settings.callbacks_key, settings)

    @contextlib.contextmanager
    def _job_output(self, first: int) -> Iterator[Path]:
        """The jobs' stdout and stderr (Lightning's progress bars and warnings, Hydra's job log lines) into a file,
        so that the terminal shows one line per trial; a single job's file goes to its output folder afterwards."""
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

    def _verdict(self, attempt: Attempt, ret: JobReturn, log: Path | None) -> Verdict:
        """PRUNED when the callback stopped the job (whatever it returned), FAIL when it raised or returned no
        number, else COMPLETE with its value."""
        frozen = self.study._storage.get_trial(attempt.trial._trial_id)  # what the job wrote to the trial
        path = self._checkpoint(attempt.trial)
        if path is not None:  # the job ended (whatever its outcome): nothing to resume
            shutil.rmtree(path.parent, ignore_errors=True)
        resumed = frozen.user_attrs.get(RESUMED_FROM_EPOCH)
        tags: dict[str, str] = {}
        if ret.hydra_cfg is not None:
            output_dir = Path(str(ret.hydra_cfg.hydra.runtime.output_dir))
            tags[OUTPUT_DIR_TAG] = str(output_dir)
            if log is not None and log.exists() and output_dir.is_dir():
                shutil.move(str(log), output_dir / "output.log")
        self._tell_about_callback(frozen)
        if frozen.user_attrs.get(PRUNED_BY_CALLBACK):
            return Verdict(TrialState.PRUNED, reason=frozen.user_attrs[PRUNED_BY_CALLBACK], tags=tags,
                           resumed_from=resumed)
        if ret.status != JobStatus.COMPLETED:
            return Verdict(TrialState.FAIL, reason=f"the job raised {redact(describe(ret._return_value))[:300]}",
                           tags=tags, resumed_from=resumed)
        value, problem = self._value(ret._return_value)
        if value is None:
            return Verdict(TrialState.FAIL, reason=problem, tags=tags, resumed_from=resumed)
        metrics = {f"objective.{n}": v for n, v in zip(self.expected.names, value, strict=True)} \
            if isinstance(value, list) else {}
        return Verdict(TrialState.COMPLETE, value, metrics=metrics, tags=tags, resumed_from=resumed)

    def _value(self, returned: Any) -> tuple[float | list[float] | None, str | None]:
        """The objective from the task function's return value: a number (a list of them with several metrics)."""
        names, several = self.expected.names, self.expected.several
        expected = f"a list of {len(names)} numbers ({', '.join(names)})" if several else "a number"
        items = returned if several and isinstance(returned, (list, tuple)) else [returned]
        numbers = [_number(v) for v in items]
        if len(numbers) != len(names) or any(n is None for n in numbers):
            return None, (f"the job returned {redact(repr(returned))[:80]}, not {expected}: the task function must "
                          "return the optimized metric")
        if not all(math.isfinite(n) for n in numbers):
            return None, f"the job returned {numbers if several else numbers[0]}, not a finite value"
        return (list(numbers) if several else numbers[0]), None

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


def _release(err: BaseException) -> None:
    """Frees what the frames of an error and of the errors it came from hold (Lightning turns Ctrl-C into
    SystemExit during another exception's handling)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        traceback.clear_frames(err.__traceback__)
        err = err.__cause__ or err.__context__
    gc.collect()


def _number(value: Any) -> float | None:
    """A number as the job returned it: int, float, a NumPy scalar or a one-element tensor; else None."""
    if isinstance(value, (bool, str)) or value is None:
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
