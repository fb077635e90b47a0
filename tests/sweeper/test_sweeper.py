"""`hydra/sweeper=searchlab`: searchlab as the sweeper of an existing `@hydra.main` app.

The example project (examples/lightning_hydra, lightning-hydra-template's layout, an `import lightning` module) runs
from a copy outside the checkout as its users run it: `python src/train.py -m hparams_search=searchlab`, with real
tiny trainings. Bad settings run against a minimal app (no Lightning), each as its own process: one line, exit code
2, nothing written.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from searchlab.hydra import TrialCallback, callback_overrides, settings_from_overrides

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "lightning_hydra"
# Tiny trainings: 2 training batches per epoch, one validation batch.
TINY = ["+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1"]


def run(*args: str, cwd: Path, timeout: float = 900, warnings: str = "ignore") -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": warnings}
    return subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def sweep(app: Path, *args: str) -> subprocess.CompletedProcess:
    return run(sys.executable, "src/train.py", "-m", "hparams_search=searchlab", *TINY, *args, cwd=app)


@pytest.fixture
def app(tmp_path: Path) -> Path:
    """The example project copied outside the checkout."""
    target = tmp_path / "app"
    shutil.copytree(EXAMPLE, target, ignore=shutil.ignore_patterns("logs", "mlruns", "__pycache__"))
    return target


def trials(app: Path, name: str = "digits_lht") -> list[optuna.trial.FrozenTrial]:
    from searchlab.study import open_storage

    storage = open_storage(str(app / "mlruns" / "optuna.journal"))
    return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)


def trials_study(app: Path, name: str = "digits_lht") -> optuna.Study:
    from searchlab.study import open_storage

    return optuna.load_study(study_name=name, storage=open_storage(str(app / "mlruns" / "optuna.journal")))


def runs(app: Path, name: str = "digits_lht") -> dict[int, object]:
    client = MlflowClient(f"sqlite:///{app}/mlruns/mlflow.db")
    experiment = client.get_experiment_by_name(name)
    found = client.search_runs([experiment.experiment_id], filter_string="tags.`searchlab.role` = 'trial'")
    return {int(r.data.tags["optuna.trial.number"]): r for r in found}


def trial_lines(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith("trial ")]


# --- the example, end to end -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_two_workers_take_the_exact_budget_prune_trials_log_curves_and_best_reruns_the_app(app):
    epochs = 4
    result = sweep(app, "hydra.sweeper.workers=2", "hydra.sweeper.study.n_trials=6", f"trainer.max_epochs={epochs}",
                   "data.batch_size=32")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 workers" in result.stdout
    lines = trial_lines(result.stdout)
    assert len(lines) == 6, result.stdout  # one line per trial, whatever the jobs print
    assert "Epoch" not in result.stdout and "GPU available" not in result.stdout + result.stderr
    finished = trials(app)
    assert sorted(t.state for t in finished) == sorted(t.state for t in finished
                                                       if t.state in (TrialState.COMPLETE, TrialState.PRUNED))
    assert len(finished) == 6  # the budget, exact over the two workers: no surplus trial, none left RUNNING
    pruned = [t for t in finished if t.state == TrialState.PRUNED]
    complete = [t for t in finished if t.state == TrialState.COMPLETE]
    assert pruned and complete
    client, by_number = MlflowClient(f"sqlite:///{app}/mlruns/mlflow.db"), runs(app)
    assert sorted(by_number) == [t.number for t in finished]
    curve = {t.number: client.get_metric_history(by_number[t.number].info.run_id, "val/acc") for t in finished}
    assert all(len(curve[t.number]) == epochs for t in complete)
    assert all(len(curve[t.number]) < epochs for t in pruned)  # stopped by the pruner, fewer epochs in its run
    for trial in finished:
        tags = by_number[trial.number].data.tags
        assert tags["optuna.trial.state"] == trial.state.name
        folder = Path(tags["searchlab.output_dir"])
        assert (folder / "output.log").is_file() and (folder / "train.log").is_file()  # the job's own logs
        assert "model.optimizer.lr" in by_number[trial.number].data.params
    best = run(sys.executable, "-m", "searchlab.cli", "best", "study.name=digits_lht",
               "study.storage=mlruns/optuna.journal", cwd=app)
    assert best.returncode == 0, best.stderr
    command = best.stdout.strip().splitlines()[-1]
    assert command.startswith("python src/train.py ") and "model.optimizer.lr=" in command
    assert "hparams_search" not in command  # it runs the app once, not the search again


def _saved_epoch(path: Path) -> int:
    from searchlab.training.checkpoints import read_saved

    saved = read_saved(path)
    return 0 if saved is None else saved.epoch


def _start_and_kill(app: Path, args: list[str], checkpoint: Path, past_epoch: int, sig: signal.Signals,
                    ) -> subprocess.CompletedProcess:
    """Starts the sweep, waits until its job's checkpoint is beyond `past_epoch` (the job mid-training), sends
    `sig` to the sweeper's process and returns what it printed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "src/train.py", "-m", "hparams_search=searchlab", *TINY, *args]
    proc = subprocess.Popen(command, cwd=app, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while _saved_epoch(checkpoint) <= past_epoch and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, "the job ended before it could be killed mid-training"
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


@pytest.mark.slow
def test_a_terminated_then_killed_job_is_retried_from_its_checkpoint_through_the_apps_ckpt_path(app):
    """SIGTERM to the sweeper (a preemption): the study ends KILLED with the resume hint (exit 143) and the running
    trial is re-queued with its checkpoint; the same command resumes it through the app's own `ckpt_path=`. SIGKILL of
    that retry mid-training: the next run re-queues it (its process is dead) and resumes from its later checkpoint."""
    args = ["trainer.max_epochs=30", "hydra.sweeper.study.n_trials=1", "hydra.sweeper.study.pruner=none",
            "hydra.sweeper.checkpoint_every_n_epochs=1", "hydra.sweeper.workers=1"]
    checkpoint = app / "mlruns" / "artifacts" / "digits_lht" / "checkpoints" / "trial-0" / "last.ckpt"
    first = _start_and_kill(app, args, checkpoint, 0, signal.SIGTERM)
    assert first.returncode == 143, first.stdout + first.stderr
    assert "terminated (SIGTERM): run the same command to resume study 'digits_lht'" in first.stderr
    assert "Epoch" not in first.stdout + first.stderr  # the job's progress bar stays in its log
    terminated, queued = trials(app)
    assert terminated.state == TrialState.FAIL and "terminated (SIGTERM); resumable from its checkpoint of epoch" \
        in terminated.user_attrs["reason"]
    assert queued.state == TrialState.WAITING and queued.system_attrs["fixed_params"] == terminated.params  # retry
    client = MlflowClient(f"sqlite:///{app}/mlruns/mlflow.db")
    parent = client.get_run(trials_study(app).user_attrs["mlflow_parent_run_id"])
    assert parent.info.status == "KILLED"
    epoch_at_term = _saved_epoch(checkpoint)

    second = _start_and_kill(app, args, checkpoint, epoch_at_term, signal.SIGKILL)
    assert second.returncode == -signal.SIGKILL
    retry = trials(app)[1]
    assert retry.user_attrs["resumed_from_epoch"] == epoch_at_term
    epoch_at_kill = _saved_epoch(checkpoint)
    assert epoch_at_kill > epoch_at_term

    third = sweep(app, *args)
    assert third.returncode == 0, third.stdout + third.stderr
    states = [t.state for t in trials(app)]
    assert states == [TrialState.FAIL, TrialState.FAIL, TrialState.COMPLETE]
    last = trials(app)[2]
    assert "died mid-trial" in trials(app)[1].user_attrs["reason"]
    assert last.user_attrs["resumed_from_epoch"] == epoch_at_kill
    assert (trial_lines(third.stdout)[-1].split()[2] == "COMPLETE"
            and f"(resumed from epoch {epoch_at_kill})" in trial_lines(third.stdout)[-1])
    job = Path(runs(app)[2].data.tags["searchlab.output_dir"])
    assert f"ckpt_path='{checkpoint}'" in (job / ".hydra" / "overrides.yaml").read_text()  # the app's own key
    run = runs(app)[2]
    assert run.data.tags["searchlab.continues_run"] == retry.user_attrs["mlflow_run_id"]
    curve = client.get_metric_history(run.info.run_id, "val/acc")
    assert sorted(m.step for m in curve) == list(range(1, 31))  # the whole training, the epochs before included
    assert sorted(last.intermediate_values) == list(range(1, 31))  # the pruner saw them all
    assert not checkpoint.parent.exists()  # done: nothing left to resume


@pytest.mark.parametrize(("setting", "reason"), [
    ("data.batch_size=0", "the job raised ValueError"),  # the app's DataLoader refuses it
    ("optimized_metric=null", "the job returned None, not a number"),  # the task function returns None
])
def test_a_failing_job_fails_its_trial_and_the_study_stops_after_failures_in_a_row(app, setting, reason):
    result = sweep(app, setting, "hydra.sweeper.study.n_trials=4", "hydra.sweeper.study.max_consecutive_failures=2",
                   "trainer.max_epochs=1", "hydra.sweeper.workers=1", "hydra.sweeper.study.pruner=none")
    assert result.returncode == 1, result.stdout + result.stderr
    lines = trial_lines(result.stdout)
    assert len(lines) == 2 and all(" FAIL " in line and reason in line for line in lines), result.stdout
    assert "study stopped: 2 trials failed in a row" in result.stderr
    assert "[W " not in result.stderr  # no Optuna "no complete trials" lines from the report's plots
    # The progress line names what the app returns: its optimized_metric, or `value` without one.
    assert ("value=-" if setting == "optimized_metric=null" else "val/acc_best=-") in lines[0]
    by_number = runs(app)
    assert [r.info.status for r in by_number.values()] == ["FAILED", "FAILED"]
    assert all(reason in r.data.tags["optuna.trial.reason"] for r in by_number.values())


def test_the_same_project_runs_under_searchlab_search_with_only_yaml_of_its_own(app):
    """The other way: `searchlab search --config-dir searchlab_conf` on the project's own `import lightning` module,
    network and DataModule, named by four YAML files (no code of the project changed); one line per trial, the
    module's own warning once."""
    study = ["data=digits_lht", "model=dense_net", "module=digits_lit", "search=digits_lht", "study.metric=val/acc"]
    result = run(sys.executable, "-m", "searchlab.cli", "search", "--config-dir", "searchlab_conf", *study,
                 "study.name=digits_lht", "study.n_trials=3", "trainer.max_epochs=2", "report.min_complete=2",
                 cwd=app, warnings="default")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = trial_lines(result.stdout)
    assert len(lines) == 3 and not any(" FAIL " in line for line in lines), result.stdout
    assert result.stderr.count("Attribute 'net' is an instance of") == 1  # once per study, not per trial
    done = [t for t in trials(app) if t.state == TrialState.COMPLETE]
    assert done and all(0.0 <= t.value <= 1.0 for t in done)
    client, by_number = MlflowClient(f"sqlite:///{app}/mlruns/mlflow.db"), runs(app)
    assert all(client.get_metric_history(by_number[t.number].info.run_id, "val/acc_best") for t in done)
    assert "searchlab train --config-dir searchlab_conf data=digits_lht model=dense_net" in result.stdout


# --- bad settings: one line, exit code 2, nothing written ----------------------------------------------------------

MINIMAL_APP = '''
import hydra


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg):
    return cfg.model.lr


if __name__ == "__main__":
    main()
'''


@pytest.fixture
def minimal_app(tmp_path: Path) -> Path:
    """An app with no Lightning: its job returns its config's model.lr."""
    root = tmp_path / "minimal"
    (root / "conf" / "hparams_search").mkdir(parents=True)
    (root / "app.py").write_text(MINIMAL_APP)
    (root / "conf" / "config.yaml").write_text("defaults:\n  - _self_\n  - hparams_search: null\n"
                                               "model: {lr: 0.1, width: 8}\n")
    (root / "conf" / "hparams_search" / "searchlab.yaml").write_text(textwrap.dedent("""\
        # @package _global_
        defaults:
          - override /hydra/sweeper: searchlab
        hydra:
          sweeper:
            study: {name: minimal, n_trials: 2, metric: val/acc, direction: maximize}
            space:
              model.lr: {low: 0.001, high: 0.1, log: true}
        """))
    (root / "space_unknown_key.yaml").write_text("model.lrr: {low: 0.001, high: 0.1}\n")
    (root / "space_bad_range.yaml").write_text("model.lr: {low: 0.1, high: 0.001}\n")
    return root


@pytest.mark.parametrize(("args", "message"), [
    (["+hydra.sweeper.study.n_trails=3"],
     "hydra.sweeper.study.n_trails: unknown key; did you mean 'hydra.sweeper.study.n_trials'?"),
    (["+hydra.sweeper.studdy.name=x"], "hydra.sweeper.studdy: unknown key; did you mean 'study'?"),
    (["hydra.sweeper.study.n_trials=0"], "hydra.sweeper.study.n_trials: expected a positive integer, got 0"),
    (["hydra.sweeper.study.sampler=tpee"], "hydra.sweeper.study.sampler: unknown 'tpee' (did you mean tpe?"),
    (["hydra.sweeper.workers=zero"], "hydra.sweeper.workers: expected a positive integer or auto"),
    (["hydra.sweeper.space=null", "hydra.sweeper.search=space_unknown_key.yaml"],
     "space_unknown_key.yaml: 'model.lrr' is not a key of the config"),
    (["hydra.sweeper.space=null", "hydra.sweeper.search=space_bad_range.yaml"],
     "space_bad_range.yaml: 'model.lr': low (0.1) is greater than high (0.001)"),
    (["hydra.sweeper.space=null", "hydra.sweeper.search=missing.yaml"], "hydra.sweeper.search: no such file"),
    (["model.width=8,16"], "'model.width=8,16': a sweep over values on the command line"),
    (["hydra.sweeper.checkpoint_every_n_epochs=0"],
     "hydra.sweeper.checkpoint_every_n_epochs: expected auto or a positive integer (epochs), got 0"),
    (["hydra.sweeper.study.warm_start=[earlier]"], "hydra.sweeper.study.warm_start: not supported by the sweeper"),
])
def test_each_bad_sweeper_setting_is_one_line_before_anything_is_written(minimal_app, args, message):
    result = run(sys.executable, "app.py", "-m", "hparams_search=searchlab", *args, cwd=minimal_app, timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip().splitlines() == [f"searchlab: error: {result.stderr.strip().split(': error: ')[1]}"]
    assert message in result.stderr
    assert not (minimal_app / "mlruns").exists() and not (minimal_app / "multirun").exists()


def test_the_minimal_app_without_callback_runs_on_its_returned_values_and_says_how_to_add_it(minimal_app):
    result = run(sys.executable, "app.py", "-m", "hparams_search=searchlab", cwd=minimal_app, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(trial_lines(result.stdout)) == 2 and all(" COMPLETE " in line for line in trial_lines(result.stdout))
    assert result.stdout.count("reported no epoch") == 1  # said once, at the first trial
    done = trials(minimal_app, "minimal")
    assert [t.value for t in done] == [t.params["model.lr"] for t in done]  # the task function's return value


def test_stop_when_ends_the_sweep_early_finished_with_the_reason(minimal_app):
    """model.lr fixed: every job returns 0.1, so after the first trial none improves; patience 2 stops the study at
    its third trial of 10, FINISHED, the reason in the summary line and on the parent run."""
    (minimal_app / "space_width.yaml").write_text("model.width: {choices: [8, 16, 32]}\n")
    result = run(sys.executable, "app.py", "-m", "hparams_search=searchlab", "model.lr=0.1",
                 "hydra.sweeper.study.n_trials=10", "hydra.sweeper.space=null", "hydra.sweeper.search=space_width.yaml",
                 "+hydra.sweeper.study.stop_when={patience: 2}", cwd=minimal_app, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(trial_lines(result.stdout)) == 3
    assert "3/10 trials" in result.stdout and "stopped early: the best value (0.1) has not improved" in result.stdout
    client = MlflowClient(f"sqlite:///{minimal_app}/mlruns/mlflow.db")
    experiment = client.get_experiment_by_name("minimal")
    [parent] = client.search_runs([experiment.experiment_id], "tags.`searchlab.role` = 'study'")
    assert parent.info.status == "FINISHED" and "has not improved" in parent.data.tags["searchlab.stopped"]


# --- the job's side, in-process ------------------------------------------------------------------------------------

def test_callback_settings_reach_the_job_through_its_overrides_unchanged():
    settings = {"storage": "/tmp/x y/optuna.journal", "study": "it's", "trial": 3, "run_id": "abc",
                "metric": ["val/acc", "params"], "tracking_uri": "sqlite:////tmp/mlflow.db",
                "pruner": {"_target_": "optuna.pruners.SuccessiveHalvingPruner", "min_resource": 1,
                           "reduction_factor": 3, "bootstrap_count": 0}}
    overrides = callback_overrides("callbacks", settings)
    assert overrides[0] == "+callbacks.searchlab._target_=searchlab.hydra.TrialCallback"
    assert settings_from_overrides(["trainer.max_epochs=3", *overrides]) == settings
    assert settings_from_overrides(["trainer.max_epochs=3"]) == {}


def test_trial_callback_is_accepted_by_both_lightning_trainers():
    import lightning.pytorch
    import pytorch_lightning

    callback = TrialCallback()
    for package in (lightning.pytorch, pytorch_lightning):
        assert isinstance(callback, package.Callback)
        trainer = package.Trainer(callbacks=[callback], logger=False, enable_checkpointing=False,
                                  enable_progress_bar=False, enable_model_summary=False, max_epochs=1)
        assert callback in trainer.callbacks
