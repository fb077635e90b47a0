"""The trial lifecycle and the session with a work of its own (no searchlab config, no Lightning), as the Hydra sweeper
plugs in: every trial told once with one MLflow run, packs, given-back trials, errors and interrupts."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from searchlab.config import PARAMS
from searchlab.study.session import Session, SessionSettings
from searchlab.study.trial import Attempt, EpochReporter, NotRun, TrialRun, TrialWork, Verdict
from searchlab.tracking import Tracker


class Quadratic(TrialWork):
    """x ~ U(-3, 3), value (x - 1)^2; `fail` and `interrupt` name trial numbers that raise in training,
    `skip` those given back unrun; `size` > 1 trains that many trials at once, their x shared by `members_like`."""

    def __init__(self, session: Session, size: int = 1, fail: tuple[int, ...] = (), interrupt: tuple[int, ...] = (),
                 skip: tuple[int, ...] = ()) -> None:
        self.study, self.tracker, self.parent_run_id = session.study, session.tracker, session.parent_run_id
        self.size, self.fail, self.interrupt, self.skip = size, fail, interrupt, skip
        self.batches: list[list[int]] = []
        self.shared: float | None = None

    def prepare(self, attempt: Attempt) -> TrialRun:
        if attempt.trial.number in self.skip:
            raise NotRun("not run: skipped")
        x = self.shared if self.shared is not None else attempt.trial.suggest_float("x", -3, 3)
        attempt.params = {"x": x}
        return TrialRun({"x": x}, command=f"app x={x}")

    def members_like(self, first: Attempt) -> contextlib.AbstractContextManager[None]:
        @contextlib.contextmanager
        def shared() -> Iterator[None]:
            self.shared = first.params["x"]
            try:
                yield
            finally:
                self.shared = None

        return shared()

    def train(self, attempts: list[Attempt]) -> Iterator[tuple[Attempt, Verdict | Exception]]:
        self.batches.append([a.trial.number for a in attempts])
        for attempt in attempts:
            if attempt.trial.number in self.interrupt:
                raise KeyboardInterrupt
            if attempt.trial.number in self.fail:
                yield attempt, ValueError("diverged\nmore")
                continue
            attempt.reporter(1, {"loss": 1.0})
            yield attempt, Verdict(TrialState.COMPLETE, (attempt.params["x"] - 1) ** 2)


def open_session(tmp_path: Path, n_trials: int, name: str = "quadratic") -> Session:
    settings = SessionSettings(name, f"{tmp_path}/optuna.journal", n_trials, f"sqlite:///{tmp_path}/mlflow.db",
                               f"{tmp_path}/artifacts")
    return Session(settings, lambda storage: optuna.create_study(study_name=name, storage=storage,
                                                                  load_if_exists=True), "value", {"app": "quadratic"})


def child_runs(tmp_path: Path, session: Session) -> dict[int, object]:
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name(session.settings.name)
    runs = client.search_runs([experiment.experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{session.parent_run_id}'")
    numbers = [int(r.data.tags["optuna.trial.number"]) for r in runs]
    assert len(numbers) == len(set(numbers)), "one run per trial"
    return {int(r.data.tags["optuna.trial.number"]): r for r in runs}


def test_a_work_of_its_own_runs_the_budget_with_one_run_per_trial(tmp_path):
    session = open_session(tmp_path, 4)
    seen = []
    status = session.run(lambda: Quadratic(session), seen.append)
    session.end(status)
    assert status == "FINISHED"
    assert [o.state for o in seen] == ["COMPLETE"] * 4
    trials = session.study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    runs = child_runs(tmp_path, session)
    assert sorted(runs) == [0, 1, 2, 3]
    for trial in trials:
        run = runs[trial.number]
        assert run.info.status == "FINISHED"
        assert run.data.tags["optuna.trial.state"] == "COMPLETE"
        assert run.data.metrics["objective"] == pytest.approx(trial.value)
        assert float(run.data.params["x"]) == pytest.approx(trial.params["x"])
        assert run.data.tags["searchlab.command"].startswith("app x=")
        assert trial.user_attrs["mlflow_run_id"] == run.info.run_id
    parent = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(session.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.params["app"] == "quadratic"


def test_a_pack_prepares_its_members_together_and_tells_each(tmp_path):
    session = open_session(tmp_path, 5)
    works = []

    def work() -> Quadratic:
        works.append(Quadratic(session, size=2))
        return works[0]

    seen = []
    assert session.run(work, seen.append) == "FINISHED"
    assert works[0].batches == [[0, 1], [2, 3], [4]]  # the last pack takes only what the budget leaves
    assert seen[0].params == seen[1].params and seen[2].params == seen[3].params  # members prepared like the first
    assert seen[0].params != seen[2].params
    assert len(seen) == 5 and all(o.state == "COMPLETE" for o in seen)
    assert sorted(child_runs(tmp_path, session)) == [0, 1, 2, 3, 4]


def test_an_error_fails_only_its_trial_and_a_trial_given_back_has_no_run(tmp_path):
    session = open_session(tmp_path, 3)
    seen = []
    assert session.run(lambda: Quadratic(session, fail=(1,), skip=(2,)), seen.append) == "FINISHED"
    by_number = {o.number: o for o in seen}
    assert by_number[1].state == "FAIL" and by_number[1].reason == "ValueError: diverged"
    assert by_number[2].state == "FAIL" and by_number[2].reason == "not run: skipped"
    assert [o.state for o in seen].count("COMPLETE") == 3  # failed trials use no budget
    runs = child_runs(tmp_path, session)
    assert 2 not in runs
    assert runs[1].info.status == "FAILED" and runs[1].data.tags["optuna.trial.reason"] == "ValueError: diverged"


def test_an_interrupt_fails_every_untold_member_and_stops_the_session(tmp_path):
    session = open_session(tmp_path, 6)
    seen = []
    assert session.run(lambda: Quadratic(session, size=3, interrupt=(1,)), seen.append) == "KILLED"
    states = {t.number: t.state for t in session.study.get_trials()}
    assert states == {0: TrialState.COMPLETE, 1: TrialState.FAIL, 2: TrialState.FAIL}  # nothing left RUNNING
    assert seen == []  # an interrupted batch is not reported: the study stops
    assert [t.user_attrs["reason"] for t in session.study.get_trials()[1:]] == ["interrupted", "interrupted"]
    runs = child_runs(tmp_path, session)
    assert {n: r.info.status for n, r in runs.items()} == {0: "FINISHED", 1: "FAILED", 2: "FAILED"}


def test_the_parameter_count_is_logged_when_it_changes_and_the_other_metrics_every_epoch(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", None)
    run_id = tracker.start_trial(tracker.study_run("count", {}), 0, {})
    reporter = EpochReporter(optuna.create_study().ask(), run_id, tracker, None)
    for epoch, count in enumerate([100, 100, 100, 250, 250], 1):  # layers unfrozen at epoch 4
        reporter(epoch, {"val_acc": epoch / 10, PARAMS: float(count)})
    tracker.end_trial(run_id, "COMPLETE", 0.5, None)
    assert [(m.step, m.value) for m in tracker.client.get_metric_history(run_id, PARAMS)] == [(1, 100.0), (4, 250.0)]
    assert [m.step for m in tracker.client.get_metric_history(run_id, "val_acc")] == [1, 2, 3, 4, 5]
