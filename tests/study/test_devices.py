"""GPU and thread assignment of worker processes, with fake device lists (no GPU needed)."""

from __future__ import annotations

import pytest

from searchlab.config import ConfigError
from searchlab.devices import WorkerSlot, plan_workers, visible_gpus, worker_count, worker_env


@pytest.mark.parametrize("env, count, expected", [
    (None, 4, ["0", "1", "2", "3"]),
    (None, 1, ["0"]),
    (None, 0, []),
    ("2,5", 2, ["2", "5"]),
    (" 2, 5 ", 2, ["2", "5"]),
    ("GPU-aaa,GPU-bbb", 2, ["GPU-aaa", "GPU-bbb"]),
    ("", 0, []),
    ("2,5,7", 2, ["2", "5"]),  # CUDA stops at an invalid entry: trust its count
])
def test_visible_gpus(env, count, expected):
    assert visible_gpus(env, count) == expected


def test_auto_gives_one_worker_per_gpu_each_seeing_only_its_own():
    slots = plan_workers("auto", ["0", "1", "2", "3"], cpus=16)
    assert [s.cuda_visible_devices for s in slots] == ["0", "1", "2", "3"]
    assert all(s.threads == 4 for s in slots)


def test_auto_keeps_the_ids_of_a_visible_subset():
    assert [s.cuda_visible_devices for s in plan_workers("auto", ["2", "5"], cpus=8)] == ["2", "5"]


def test_one_gpu_and_no_gpu():
    assert plan_workers("auto", ["0"], cpus=8) == [WorkerSlot("0", 8)]
    assert plan_workers("auto", [], cpus=2) == [WorkerSlot("", 2)]


def test_cpu_workers_share_the_cores_and_see_no_gpu():
    assert plan_workers(2, [], cpus=2) == [WorkerSlot("", 1), WorkerSlot("", 1)]
    assert plan_workers(3, [], cpus=8) == [WorkerSlot("", 2)] * 3
    assert plan_workers(4, [], cpus=2) == [WorkerSlot("", 1)] * 4  # never fewer than one thread


def test_more_workers_than_gpus_share_them_round_robin():
    assert [s.cuda_visible_devices for s in plan_workers(5, ["2", "5"], cpus=10)] == ["2", "5", "2", "5", "2"]


@pytest.mark.parametrize("bad", [0, -1, "many", 1.5, True, None])
def test_bad_worker_counts_are_refused_naming_the_key(bad):
    with pytest.raises(ConfigError, match="^workers: expected a positive integer or auto"):
        worker_count(bad, [])


def test_worker_env_sets_the_gpu_and_respects_a_users_thread_count():
    env = worker_env(WorkerSlot("5", 3), {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "2,5"})
    assert env["CUDA_VISIBLE_DEVICES"] == "5" and env["OMP_NUM_THREADS"] == "3" and env["PATH"] == "/bin"
    assert worker_env(WorkerSlot("", 3), {"OMP_NUM_THREADS": "1"})["OMP_NUM_THREADS"] == "1"
    assert worker_env(WorkerSlot("", 1), {})["CUDA_VISIBLE_DEVICES"] == ""


def test_detect_gpus_reads_cuda_and_the_visible_subset(monkeypatch):
    import torch

    from searchlab.devices import detect_gpus

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    assert detect_gpus("auto") == ["2", "5"] and detect_gpus("gpu") == ["2", "5"]
    assert detect_gpus("cpu") == []  # trainer.accelerator=cpu: workers see no GPU
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert detect_gpus("auto") == ["0", "1"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert detect_gpus("auto") == []
