"""End-to-end `searchlab search`: real tiny studies on digits, checked in Optuna's storage and MLflow's store."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import load_study, runs_of, wait_for_running

from searchlab.cli import main

TINY = ["trainer.max_epochs=2", "model.width=32"]


def test_study_is_tracked_as_a_parent_run_with_one_child_per_trial(tmp_path, store_overrides, capsys):
    assert main(["search", "study.name=tracked", "study.n_trials=3", "study.pruner=none", *TINY,
                 *store_overrides]) == 0
    out = capsys.readouterr().out
    assert out.count("COMPLETE") >= 3 and "re-run it alone:" in out
    study = load_study(tmp_path, "tracked")
    finished = [t for t in study.trials if t.state.is_finished()]
    client, parents, children = runs_of(tmp_path, "tracked")
    assert len(parents) == 1 and len(children) == len(finished)
    parent = parents[0]
    assert parent.data.params["study.n_trials"] == "3" and parent.data.params["study.direction"] == "maximize"
    assert parent.data.metrics["best_value"] == pytest.approx(study.best_value)
    assert parent.data.tags["best.trial_number"] == str(study.best_trial.number)
    assert parent.data.tags["best.optimizer.lr"] == str(study.best_params["optimizer.lr"])
    by_number = {int(r.data.tags["optuna.trial.number"]): r for r in children}
    for trial in finished:
        run = by_number[trial.number]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["optuna.trial.state"] == trial.state.name
        # the run's params: the trial's, and the keys a space constraint set instead of drawing them
        drawn_or_set = {**trial.params, **trial.user_attrs.get("constrained", {})}
        assert run.data.params == {k: str(v) for k, v in drawn_or_set.items()}
        # what trained it: the packing engine, but for batch norm (searchlab.packing.lone)
        engine = "lightning" if drawn_or_set["model.batch_norm"] else "packed"
        assert trial.state.name == "FAIL" or run.data.tags["searchlab.engine"] == engine
        if trial.state.name != "COMPLETE":
            assert run.data.tags["optuna.trial.reason"]
            continue
        for metric in ("train_loss", "val_loss", "val_acc", "lr"):
            history = client.get_metric_history(run.info.run_id, metric)
            assert [m.step for m in history] == [1, 2]
        assert max(m.value for m in client.get_metric_history(run.info.run_id, "val_acc")) == trial.value
        artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
        assert "config.yaml" in artifacts
        config = Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))).read_text()
        assert f"lr: {trial.params['optimizer.lr']}" in config


def test_pruning_stops_unpromising_trials(tmp_path, store_overrides, capsys):
    # A threshold no accuracy can reach: every trial is pruned at its first report.
    always = "+study.pruners.always={_target_:optuna.pruners.ThresholdPruner,lower:2.0}"
    assert main(["search", "study.name=pruned", "study.n_trials=2", "trainer.max_epochs=5", "model.batch_norm=false",
                 always, "study.pruner=always", *store_overrides]) == 0
    study = load_study(tmp_path, "pruned")
    pruned = [t for t in study.trials if t.state.name == "PRUNED"]
    assert len(pruned) == 2 and all(t.last_step == 1 for t in pruned)
    client, _, children = runs_of(tmp_path, "pruned")
    for run in children:
        assert run.data.tags["optuna.trial.state"] == "PRUNED"
        assert run.data.tags["optuna.trial.reason"].startswith("pruned at epoch 1")
        assert len(client.get_metric_history(run.info.run_id, "val_acc")) == 1


@pytest.mark.slow
def test_hyperband_prunes_in_a_real_search(tmp_path, store_overrides):
    # study.pruner=hyperband (min_resource 2, max_resource trainer.max_epochs=6, reduction_factor 3): two brackets,
    # with rungs at epochs 2 and 6, and at 6. The default successive halving (min_resource 3) prunes at epoch 3.
    assert main(["search", "study.name=hb", "study.pruner=hyperband", "study.n_trials=14", "trainer.max_epochs=6",
                 "model.width=32", *store_overrides]) == 0
    trials = load_study(tmp_path, "hb").trials
    states = [t.state.name for t in trials]
    assert "PRUNED" in states and "COMPLETE" in states
    pruned_at = {t.last_step for t in trials if t.state.name == "PRUNED"}
    assert pruned_at <= {2, 6}, pruned_at  # only at Hyperband's rungs: never at epoch 1, 3, 4 or 5
    _, parents, _ = runs_of(tmp_path, "hb")
    assert parents[0].data.params["study.pruner"] == "hyperband"


def test_named_study_resumes_and_the_budget_is_the_total(tmp_path, store_overrides, capsys):
    args = ["search", "study.name=resumed", "study.pruner=none", *TINY, *store_overrides]
    assert main([*args, "study.n_trials=2"]) == 0
    assert main([*args, "study.n_trials=4"]) == 0
    assert "2/4 trials done" in capsys.readouterr().out
    study = load_study(tmp_path, "resumed")
    assert len([t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]) == 4
    _, parents, children = runs_of(tmp_path, "resumed")
    assert len(parents) == 1 and len(children) == len(study.trials)
    assert main([*args, "study.n_trials=4"]) == 0  # budget reached: no new trial
    assert len(load_study(tmp_path, "resumed").trials) == len(study.trials)


def test_resuming_with_another_direction_is_refused(tmp_path, store_overrides, capsys):
    args = ["search", "study.name=dir", "study.n_trials=1", *TINY, *store_overrides]
    assert main(args) == 0
    assert main([*args, "study.direction=minimize", "study.metric=val_loss", "study.n_trials=2"]) == 2
    assert "study.direction" in capsys.readouterr().err


def test_diverging_trials_are_pruned_with_a_reason_and_the_study_goes_on(tmp_path, store_overrides):
    assert main(["search", "study.name=diverge", "study.n_trials=2", "optimizer=sgd", "optimizer.lr=1e8",
                 "model.batch_norm=false", "trainer.max_epochs=4", *store_overrides]) == 0
    study = load_study(tmp_path, "diverge")
    assert [t.state.name for t in study.trials] == ["PRUNED", "PRUNED"]
    assert all("diverged" in t.user_attrs["reason"] for t in study.trials)
    _, _, children = runs_of(tmp_path, "diverge")
    assert all("diverged" in r.data.tags["optuna.trial.reason"] for r in children)


def test_study_timeout_stops_starting_trials(tmp_path, store_overrides):
    assert main(["search", "study.name=timed", "study.n_trials=1000", "study.timeout=1", *TINY,
                 *store_overrides]) == 0
    assert 1 <= len(load_study(tmp_path, "timed").trials) < 1000


@pytest.mark.parametrize("sampler, extra", [
    ("random", []), ("qmc", []), ("cmaes", []), ("gp", []), ("tpe_random_share", []),
    ("grid", ["search=regularization", "study.n_trials=3"]),
])
def test_every_sampler_runs_the_space(tmp_path, store_overrides, sampler, extra):
    assert main(["search", f"study.name={sampler}", "study.n_trials=2", f"study.sampler={sampler}",
                 "trainer.max_epochs=1", "model.width=16", *extra, *store_overrides]) == 0
    study = load_study(tmp_path, sampler)
    assert len([t for t in study.trials if t.state.is_finished()]) >= 2


@pytest.mark.slow
def test_best_trial_re_runs_alone_to_the_same_metric(tmp_path, store_overrides):
    """The console script end to end: search, then `searchlab train` with the best trial's command."""
    searchlab = Path(sys.executable).parent / "searchlab"
    search = subprocess.run(
        [str(searchlab), "search", "study.name=rerun", "study.n_trials=2", "study.pruner=none", *TINY,
         "tracking.log_models=none", *store_overrides], capture_output=True, text=True, timeout=300)
    assert search.returncode == 0, search.stderr
    command = search.stdout.split("re-run it alone:")[1].strip().splitlines()[0].split()
    assert command[:2] == ["searchlab", "train"]
    train = subprocess.run([str(searchlab), *command[1:]], capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stderr
    metrics = json.loads(train.stdout.split("metrics: ")[1])
    study = load_study(tmp_path, "rerun")
    assert metrics["best_val_acc"] == study.best_value
    assert 0 < metrics["test_acc"] <= 1


@pytest.mark.slow
def test_ctrl_c_fails_the_running_trial_and_the_same_command_resumes(tmp_path, store_overrides, capsys):
    import signal

    searchlab = Path(sys.executable).parent / "searchlab"
    base = [str(searchlab), "search", "study.name=interrupted", "study.n_trials=3", "study.pruner=none",
            "data.batch_size=16", "model.batch_norm=false", "tracking.log_models=none", *store_overrides]
    # A trial that cannot end, nor be checkpointed (re-queued on Ctrl-C), before the signal
    endless = ["trainer.max_epochs=100000", "trainer.checkpoint_auto_seconds=36000"]
    proc = subprocess.Popen([*base, *endless], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # Wait until the first trial trains (it is RUNNING with its MLflow run), then press Ctrl-C in the middle of
        # its epochs.
        wait_for_running(tmp_path, "interrupted", 1, proc)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "run the same command to resume" in err and "Traceback" not in err
    study = load_study(tmp_path, "interrupted")
    assert [t.state.name for t in study.trials] == ["FAIL"]
    assert study.trials[0].user_attrs["reason"] == "interrupted"
    _, parents, children = runs_of(tmp_path, "interrupted")
    assert parents[0].info.status == "KILLED"
    assert children[0].info.status == "FAILED" and children[0].data.tags["optuna.trial.reason"] == "interrupted"
    # The same study, with a shorter training, resumes to its budget; the failed trial used none of it. In this
    # process: Ctrl-C needed a process of its own, this run does not (a fresh one imports torch again).
    capsys.readouterr()
    assert main([*base[1:], "trainer.max_epochs=2"]) == 0, capsys.readouterr().err
    study = load_study(tmp_path, "interrupted")
    assert len([t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]) == 3


def test_a_config_that_always_fails_stops_the_study_with_one_line(tmp_path, store_overrides, capsys):
    # A space whose every trial draws a schedule that cannot step (StepLR with step_size 0: ZeroDivisionError at the
    # first epoch's end); the config checked before the study has no schedule, so only the trials fail, and the
    # study stops after 3 in a row.
    space = tmp_path / "conf" / "search" / "broken.yaml"
    space.parent.mkdir(parents=True)
    space.write_text("scheduler:\n  choices:\n    step:\n      scheduler.step_size: {choices: [0]}\n")
    code = main(["search", "--config-dir", str(tmp_path / "conf"), "search=broken", "study.name=broken",
                 "study.n_trials=10", "study.max_consecutive_failures=3", "trainer.max_epochs=1", *store_overrides])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert "3 trials failed in a row" in err and "study.max_consecutive_failures=3" in err
    assert [t.state.name for t in load_study(tmp_path, "broken").trials] == ["FAIL"] * 3
    _, parents, children = runs_of(tmp_path, "broken")
    assert parents[0].info.status == "FAILED" and len(children) == 3


def test_trials_keep_only_training_overrides(tmp_path, store_overrides):
    assert main(["search", "study.name=attrs", "study.n_trials=1", *TINY, *store_overrides]) == 0
    (trial,) = load_study(tmp_path, "attrs").trials
    kept = trial.user_attrs["overrides"]
    assert not [o for o in kept if o.startswith(("study.", "tracking."))]
    assert set(TINY) <= set(kept) and f"optimizer.lr={trial.params['optimizer.lr']!r}" in kept
