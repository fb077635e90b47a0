"""Long trials: checkpoints of a running trial and resuming from them wherever a trial is retried (an interrupt in
this process, SIGTERM to `searchlab search`, SIGKILL of a worker on the journal storage)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch
from helpers import (
    LONG,
    LONG_EPOCHS,
    SEARCHLAB,
    load_study,
    runs_of,
    terminate_after_checkpoint,
    wait_for_checkpoint,
    wait_for_running,
)

from searchlab.config import compose_config
from searchlab.training.build import load_data
from searchlab.training.checkpoints import CHECKPOINT_FILE, CheckpointPlan, read_saved
from searchlab.training.lightning import fit_rank

# Dropout, batch norm and a schedule: every state a resume must restore (RNGs, running stats, the schedule's step).
SMALL = ["trainer.max_epochs=4", "trainer.limit_train_batches=8", "data.batch_size=32", "model.width=32",
         "model.dropout=0.3", "model.batch_norm=true", "optimizer=adam", "scheduler=cosine"]


def interrupt_at(epoch: int):
    def hook(number: int, metrics: dict[str, float]) -> None:
        if number == epoch:
            raise KeyboardInterrupt

    return hook


def test_a_resumed_training_equals_the_uninterrupted_one(tmp_path):
    cfg = compose_config(SMALL)
    splits = load_data(cfg)
    whole = fit_rank(cfg, splits)
    # Interrupted during epoch 3's end: the checkpoint written on the way out is that of epoch 2, the last finished.
    plan = CheckpointPlan(tmp_path / CHECKPOINT_FILE, every=1, auto_seconds=1e9, owner={"trial": 7})
    with pytest.raises(SystemExit):  # Lightning turns KeyboardInterrupt into sys.exit(1) after its callbacks ran
        fit_rank(cfg, splits, interrupt_at(3), checkpoint=plan)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    saved = read_saved(plan.path)
    assert saved is not None and saved.epoch == 2 and saved.owner == {"trial": 7}
    timeless = [{k: v for k, v in m.items() if k != "epoch_seconds"} for m in saved.history]  # a clock: differs
    assert timeless == [{k: v for k, v in m.items() if k != "epoch_seconds"} for m in whole.history[:2]]

    trained: list[int] = []
    resumed = fit_rank(cfg, splits, lambda epoch, metrics: trained.append(epoch),
                       checkpoint=CheckpointPlan(plan.path, every=1, auto_seconds=1e9, resume=True))
    assert trained == [3, 4]  # only the remaining epochs
    assert len(resumed.history) == 4
    for alone, again in zip(whole.history, resumed.history, strict=True):
        for key in ("val_loss", "val_acc", "train_loss", "lr"):
            assert again[key] == pytest.approx(alone[key], rel=1e-6, abs=1e-7), key
    assert resumed.best_epoch == whole.best_epoch


def test_the_interrupt_writes_the_last_finished_epoch_when_the_schedule_has_not(tmp_path):
    cfg = compose_config(SMALL)
    plan = CheckpointPlan(tmp_path / CHECKPOINT_FILE, every=10, auto_seconds=1e9)
    with pytest.raises(SystemExit):
        fit_rank(cfg, load_data(cfg), interrupt_at(4), checkpoint=plan)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    assert read_saved(plan.path).epoch == 3


def test_auto_checkpoints_only_trials_that_have_trained_long_enough(tmp_path):
    cfg = compose_config(SMALL)
    splits = load_data(cfg)
    short = CheckpointPlan(tmp_path / "short" / CHECKPOINT_FILE, every=None, auto_seconds=3600)
    fit_rank(cfg, splits, checkpoint=short)
    assert not short.path.parent.exists()  # the default digits study's case: nothing written, nothing kept

    long = CheckpointPlan(tmp_path / "long" / CHECKPOINT_FILE, every=None, auto_seconds=1e-6)
    result = fit_rank(cfg, splits, checkpoint=long)
    saved = read_saved(long.path)
    assert saved is not None and 1 <= saved.epoch < len(result.history)  # the last epoch ends the trial: not written


def test_a_checkpoint_cut_short_is_never_read(tmp_path):
    path = tmp_path / CHECKPOINT_FILE
    path.write_bytes(b"PK\x03\x04 truncated")
    assert read_saved(path) is None
    assert read_saved(tmp_path / "absent.ckpt") is None


@pytest.mark.slow
def test_sigterm_exits_143_and_the_same_command_resumes_the_trial_mid_way(tmp_path, store_overrides, capsys):
    command = [SEARCHLAB, "search", "study.name=term", "study.n_trials=1", *LONG, *store_overrides]
    code, err = terminate_after_checkpoint(command, tmp_path / "artifacts", 2)
    assert code == 143, err
    assert "terminated (SIGTERM): run the same command to resume" in err and "Traceback" not in err
    stopped, queued = load_study(tmp_path, "term").trials
    assert stopped.state.name == "FAIL" and "resumable from its checkpoint of epoch" in stopped.user_attrs["reason"]
    assert queued.state.name == "WAITING" and queued.system_attrs["fixed_params"] == stopped.params  # taken next

    # The same command again, in this process: the part that needs a process of its own (SIGTERM) is done, and a
    # fresh one would import torch and Lightning again (seconds on a shared 2-core machine).
    from searchlab.cli import main

    capsys.readouterr()
    code = main(command[1:])
    out, err = capsys.readouterr()
    assert code == 0, err
    study = load_study(tmp_path, "term")
    (retry,) = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert f"(resumed from epoch {retry.user_attrs['resumed_from_epoch']})" in out
    assert retry.params == stopped.params and retry.user_attrs["retry_of"] == stopped.number
    resumed_from = retry.user_attrs["resumed_from_epoch"]
    assert resumed_from >= 2 and retry.user_attrs["epochs_trained"] == LONG_EPOCHS - resumed_from
    # the epochs before, copied for the pruner
    assert sorted(retry.intermediate_values) == list(range(1, LONG_EPOCHS + 1))
    client, _, children = runs_of(tmp_path, "term")
    run = next(r for r in children if r.info.run_id == retry.user_attrs["mlflow_run_id"])
    assert run.data.tags["searchlab.resumed_from_epoch"] == str(resumed_from)
    assert run.data.tags["searchlab.continues_run"] == stopped.user_attrs["mlflow_run_id"]
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")]
    assert sorted(steps) == list(range(1, LONG_EPOCHS + 1))  # one curve over the whole training
    assert not list((tmp_path / "artifacts" / "term" / "checkpoints").glob("*/*"))  # deleted once finished


@pytest.mark.slow
def test_a_worker_killed_at_epoch_k_is_retried_from_its_checkpoint(tmp_path, store_overrides):
    proc = subprocess.Popen(
        [SEARCHLAB, "search", "workers=2", "study.name=killed", "study.n_trials=2", *LONG, *store_overrides],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_running(tmp_path, "killed", 1, proc)
        wait_for_checkpoint(tmp_path / "artifacts", 3, proc)
        study = load_study(tmp_path, "killed")
        victim = next(t for t in study.get_trials() if t.state.name == "RUNNING"
                      and read_saved(tmp_path / "artifacts" / "killed" / "checkpoints" /
                                     f"trial-{t.number}" / CHECKPOINT_FILE) is not None)
        os.kill(victim.user_attrs["worker.pid"], signal.SIGKILL)
        _, err = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    study = load_study(tmp_path, "killed")
    (retry,) = [t for t in study.trials if t.user_attrs.get("retry_of") == victim.number]
    assert retry.state.name == "COMPLETE" and retry.params == victim.params
    resumed_from = retry.user_attrs["resumed_from_epoch"]
    assert resumed_from >= 3
    assert retry.user_attrs["epochs_trained"] == LONG_EPOCHS - resumed_from  # only the remaining epochs were trained
    print(f"killed at epoch >= 3 of {LONG_EPOCHS}: the retry resumed from epoch {resumed_from} and trained "
          f"{retry.user_attrs['epochs_trained']} epochs", file=sys.stderr)


def test_bad_checkpoint_setting_names_its_key(capsys):
    from searchlab.cli import main

    assert main(["search", "trainer.checkpoint_every_n_epochs=0"]) == 2
    assert "trainer.checkpoint_every_n_epochs: expected auto or a positive integer" in capsys.readouterr().err


def test_checkpoints_keep_the_best_epochs_weights(tmp_path):
    cfg = compose_config(SMALL)
    splits = load_data(cfg)
    whole = fit_rank(cfg, splits)
    plan = CheckpointPlan(tmp_path / CHECKPOINT_FILE, every=1, auto_seconds=1e9)
    with pytest.raises(SystemExit):
        fit_rank(cfg, splits, interrupt_at(4), checkpoint=plan)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    resumed = fit_rank(cfg, splits, checkpoint=CheckpointPlan(plan.path, every=1, auto_seconds=1e9, resume=True))
    for key, tensor in whole.weights.state.items():
        assert torch.allclose(resumed.weights.state[key].float(), tensor.float(), atol=1e-6), key
