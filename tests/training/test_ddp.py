"""One trial over several devices with DDP, for real on CPU (gloo): two spawned ranks per training."""

from __future__ import annotations

import math
import multiprocessing
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from searchlab.config import Composer, ConfigError, validate_config
from searchlab.data import TensorBatches
from searchlab.devices import WorkerSlot, plan_workers
from searchlab.training import fit
from searchlab.training.build import load_data
from searchlab.training.checkpoints import CHECKPOINT_FILE, CheckpointPlan, read_saved
from searchlab.training.lightning import check_devices, process_group_backend

DDP_CPU = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "model.width=32", "optimizer.lr=0.01"]


@pytest.fixture(scope="module")
def composer() -> Composer:
    return Composer(DDP_CPU)


@pytest.fixture(scope="module")
def digits(composer):
    return load_data(composer.base)


def test_ranks_take_disjoint_equal_shards_of_one_shuffled_order():
    x = torch.arange(13).float()[:, None]
    y = torch.arange(13)
    whole = [b for _, b in TensorBatches(x, y, batch_size=100, shuffle=True, seed=3)][0]
    shards = [TensorBatches(x, y, batch_size=2, shuffle=True, seed=3, rank=r, world_size=3) for r in range(3)]
    taken = [torch.cat([b for _, b in shard]) for shard in shards]
    assert [len(s) for s in shards] == [2, 2, 2] and [len(t) for t in taken] == [4, 4, 4]
    for rank, labels in enumerate(taken):  # every 3rd index of the same permutation, its last 13 % 3 left out
        assert labels.tolist() == whole[:12][rank::3].tolist()
    assert len(set(torch.cat(taken).tolist())) == 12
    with pytest.raises(ValueError, match="only shuffled"):
        TensorBatches(x, y, batch_size=2, shuffle=False, rank=0, world_size=2)


@pytest.fixture(scope="module")
def trained(composer, digits, tmp_path_factory):
    """One 3-epoch DDP training, checkpointed every epoch: read by the two tests below (each DDP fit spawns its
    ranks, which import torch and Lightning again: seconds each on a shared 2-core machine)."""
    plan = CheckpointPlan(tmp_path_factory.mktemp("ddp") / CHECKPOINT_FILE, every=1, auto_seconds=1e9)
    seen: list[int] = []
    result = fit(composer({"trainer.max_epochs": 3}), digits, lambda epoch, metrics: seen.append(epoch),
                 checkpoint=plan)
    return {"result": result, "seen": seen, "plan": plan}


@pytest.mark.ddp
def test_ddp_trains_to_completion_with_metrics_of_the_whole(trained):
    result, seen = trained["result"], trained["seen"]
    assert seen == [1, 2, 3] and len(result.history) == 3 and result.stop_reason is None
    assert all(math.isfinite(v) for m in result.history for v in m.values())
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert result.best("val_acc", "maximize") > 0.5  # ten classes: chance is 0.1


@pytest.mark.ddp
def test_a_decision_on_rank_0_stops_every_rank_at_that_epoch(composer, digits):
    """The hook runs in this process; had rank 1 missed the decision it would go on alone into epoch 3's all-reduce
    and fail there (its peer gone, or the process group's timeout) instead of returning two epochs."""
    result = fit(composer({"trainer.max_epochs": 5, "trainer.process_group_timeout_s": 60}), digits,
                 lambda epoch, metrics: "pruned at epoch 2" if epoch == 2 else None)
    assert result.stop_reason == "pruned at epoch 2" and len(result.history) == 2


@pytest.mark.ddp
def test_rank_0_writes_the_checkpoint_and_every_rank_resumes_from_it(composer, digits, trained):
    plan = trained["plan"]
    assert read_saved(plan.path).epoch == 2  # the last epoch (3) is never written: the training ends there
    seen: list[int] = []
    result = fit(composer({"trainer.max_epochs": 4}), digits, lambda epoch, metrics: seen.append(epoch),
                 checkpoint=CheckpointPlan(plan.path, every=1, auto_seconds=1e9, resume=True))
    assert seen == [3, 4] and len(result.history) == 4


@pytest.mark.ddp
def test_a_failing_rank_fails_the_call_and_leaves_no_process(composer, digits):
    cfg = composer({"trainer.max_epochs": 1, "model._target_": "nonexistent.Net"})  # the ranks fail building it
    with pytest.raises(Exception, match="nonexistent"):
        fit(cfg, digits)
    assert not multiprocessing.active_children()


def test_device_settings_are_checked_against_the_machine(composer):
    trainer = composer({"trainer.accelerator": "gpu", "trainer.devices": 4}).trainer
    with pytest.raises(ConfigError, match=r"^trainer\.devices: 4 asked for, but 2 GPU"):
        check_devices(trainer, gpu_count=2)
    check_devices(trainer, gpu_count=4)
    check_devices(composer({"trainer.accelerator": "auto", "trainer.devices": 2}).trainer, gpu_count=0)  # CPU ranks
    with pytest.raises(ConfigError, match=r"^trainer\.process_group_backend: nccl needs GPUs"):
        check_devices(composer({"trainer.process_group_backend": "nccl"}).trainer, gpu_count=0)
    for bad in (0, -1, "two"):
        with pytest.raises(ConfigError, match=r"^trainer\.devices: expected a positive integer"):
            validate_config(composer({"trainer.devices": bad}))
    with pytest.raises(ConfigError, match=r"^trainer\.process_group_backend: expected one of"):
        validate_config(composer({"trainer.process_group_backend": "mpi"}))
    assert process_group_backend("auto", torch.device("cuda", 0)) == "nccl"
    assert process_group_backend("auto", torch.device("cpu")) == "gloo"
    assert process_group_backend("gloo", torch.device("cuda", 0)) == "gloo"


def test_workers_get_whole_gpu_groups_for_ddp_trials():
    slots = plan_workers("auto", ["0", "1", "2", "3", "4"], cpus=16, gpus_per_worker=2)
    assert [s.cuda_visible_devices for s in slots] == ["0,1", "2,3"] and all(s.threads == 8 for s in slots)
    assert [s.cuda_visible_devices for s in plan_workers(3, ["2", "5"], cpus=6, gpus_per_worker=2)] == ["2,5"] * 3
    assert plan_workers("auto", [], cpus=2, gpus_per_worker=2) == [WorkerSlot("", 2)]


@pytest.mark.ddp
def test_search_with_ddp_trials_prunes_through_optuna(tmp_path, store_overrides):
    """The console script end to end (the ranks re-import it as __mp_main__): Optuna's pruner decides in the trial
    process at epoch 2 and both ranks of each trial stop there."""
    searchlab = Path(sys.executable).parent / "searchlab"
    at_2 = "+study.pruners.at2={_target_:optuna.pruners.ThresholdPruner,lower:2.0,n_warmup_steps:2}"
    run = subprocess.run(
        [str(searchlab), "search", "study.name=ddp", "study.n_trials=2", "trainer.max_epochs=4", at_2,
         "study.pruner=at2", *DDP_CPU, *store_overrides], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    storage = JournalStorage(JournalFileBackend(str(tmp_path / "optuna.journal")))
    trials = optuna.load_study(study_name="ddp", storage=storage).trials
    assert [t.state.name for t in trials] == ["PRUNED", "PRUNED"] and all(t.last_step == 2 for t in trials)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("ddp").experiment_id])
    children = [r for r in runs if r.data.tags.get("searchlab.role") == "trial"]
    assert len(children) == 2
    for child in children:
        assert child.data.tags["optuna.trial.reason"].startswith("pruned at epoch 2")
        history = client.get_metric_history(child.info.run_id, "train_loss")
        assert [m.step for m in history] == [1, 2] and all(math.isfinite(m.value) for m in history)


_KILLED_MID_TRIAL = """
import multiprocessing, time
from searchlab.config import Composer
from searchlab.training.build import load_data
from searchlab.training.checkpoints import CHECKPOINT_FILE, CheckpointPlan, read_saved
from searchlab.training import fit

def hold(epoch, metrics):
    print(" ".join(str(p.pid) for p in multiprocessing.active_children()), flush=True)
    time.sleep(600)

if __name__ == "__main__":
    cfg = Composer({overrides!r}).base
    fit(cfg, load_data(cfg), hold)
"""


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] not in "ZX"
    except (FileNotFoundError, IndexError):
        return False


@pytest.mark.ddp
def test_ranks_exit_when_the_trial_process_is_killed(tmp_path):
    """A worker killed outright (SIGKILL, OOM) must not leave its ranks holding GPUs: torch's spawn gives each rank
    a parent-death signal (else rank 0 would wait for the hook's answer forever, and the others in a collective)."""
    script = tmp_path / "killed.py"
    script.write_text(_KILLED_MID_TRIAL.format(overrides=DDP_CPU))
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        ranks = [int(pid) for pid in parent.stdout.readline().split()]
        assert len(ranks) == 2 and all(_alive(pid) for pid in ranks)
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 60
    while any(_alive(pid) for pid in ranks) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in ranks)
