"""Which GPU and how many CPU threads each worker process gets: pure functions, so they are tested without a GPU.

A worker sees only its own GPU (CUDA_VISIBLE_DEVICES set per process), so one trial runs per GPU and a worker's
`cuda:0` is always its GPU; with DDP trials (trainer.devices > 1) a worker sees its own group of that many GPUs.
Without GPUs the workers share the cores: each gets cores // workers torch threads, so N workers do not
oversubscribe the CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from searchlab.errors import ConfigError


@dataclass(frozen=True)
class WorkerSlot:
    """One worker process's share of the machine."""

    cuda_visible_devices: str  # the one GPU id it sees; "" hides every GPU (a CPU worker)
    threads: int               # torch intra-op threads (OMP_NUM_THREADS)


def visible_gpus(cuda_visible_devices: str | None, device_count: int) -> list[str]:
    """The GPUs this process sees, named as a child's CUDA_VISIBLE_DEVICES must name them.

    With CUDA_VISIBLE_DEVICES unset the ids are 0..count-1; with it set (e.g. "2,5" or GPU UUIDs) they are its
    entries, as many as CUDA reports (it stops at the first invalid entry, so count may be shorter).
    """
    if cuda_visible_devices is None:
        return [str(i) for i in range(device_count)]
    ids = [entry.strip() for entry in cuda_visible_devices.split(",") if entry.strip()]
    return ids[:device_count]


def gpu_groups(gpus: list[str], per_worker: int) -> list[str]:
    """The GPUs dealt in groups of trainer.devices (a DDP trial's ranks), each as CUDA_VISIBLE_DEVICES names it;
    GPUs left over after the last full group are not used."""
    return [",".join(gpus[i:i + per_worker]) for i in range(0, len(gpus) - per_worker + 1, per_worker)]


def worker_count(requested: object, gpus: list[str]) -> int:
    """The `workers` key: a positive integer, or `auto` = one worker per visible GPU, or GPU group (1 without)."""
    if requested == "auto":
        return max(1, len(gpus))
    if isinstance(requested, int) and not isinstance(requested, bool) and requested > 0:
        return requested
    raise ConfigError(f"workers: expected a positive integer or auto, got {requested!r}")


def plan_workers(requested: object, gpus: list[str], cpus: int, gpus_per_worker: int = 1) -> list[WorkerSlot]:
    """One slot per worker: GPUs (or groups of gpus_per_worker GPUs, for DDP trials) dealt round-robin (more workers
    than GPUs share them), cores split evenly."""
    groups = gpu_groups(gpus, gpus_per_worker)
    count = worker_count(requested, groups)
    threads = max(1, cpus // count)
    return [WorkerSlot(groups[i % len(groups)] if groups else "", threads) for i in range(count)]


def detect_gpus(accelerator: str) -> list[str]:
    """The GPUs workers may use: none when trainer.accelerator=cpu."""
    if accelerator == "cpu":
        return []
    import torch  # imported here: the parent process needs torch only to count GPUs

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return visible_gpus(os.environ.get("CUDA_VISIBLE_DEVICES"), count)


def cpu_count() -> int:
    """Cores this process may run on (its affinity mask, which containers and taskset narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def worker_env(slot: WorkerSlot, environ: dict[str, str]) -> dict[str, str]:
    """The child's environment: its GPU, and its thread count unless the user fixed OMP_NUM_THREADS."""
    env = dict(environ, CUDA_VISIBLE_DEVICES=slot.cuda_visible_devices)
    env.setdefault("OMP_NUM_THREADS", str(slot.threads))
    return env
