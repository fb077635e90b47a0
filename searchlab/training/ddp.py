"""One training on several devices with DDP: one process per rank, spawned per call, the epoch hook kept here.

Lightning's `ddp` strategy re-runs the whole command (sys.argv) per rank, which for `searchlab search` would start
new workers, and `ddp_fork` cannot follow a parent that already used CUDA (the data lives on the GPU). So the ranks
are spawned here and set up as ranks launched from outside (LOCAL_RANK, MASTER_PORT..., as torchrun does), and
Lightning's DDP strategy runs in each. The Optuna trial, the tracker and the storages do not pickle, so they stay in
this process: rank 0 sends each epoch's metrics over a queue, this process runs the hook (tracking, report,
should_prune) and answers, and rank 0 broadcasts the answer (training.lightning._EpochCallback), so every rank stops
at the same epoch.
"""

from __future__ import annotations

import os
import queue
import time
import warnings
from typing import Any

import torch
import torch.multiprocessing as mp
from lightning_fabric.plugins.environments.lightning import find_free_network_port
from omegaconf import DictConfig

from searchlab.config import Objectives
from searchlab.data import Splits
from searchlab.quiet import warnings_once
from searchlab.training.checkpoints import CheckpointPlan
from searchlab.training.lightning import EpochHook, TrainResult, fit_rank

_POLL_S = 0.2  # how often the waiting parent checks that the ranks are still alive


class _HookInParent:
    """Rank 0's epoch hook: asks the parent process, which runs the real hook, and waits for its answer."""

    def __init__(self, to_parent: Any, to_rank0: Any) -> None:
        self.to_parent, self.to_rank0 = to_parent, to_rank0

    def __call__(self, epoch: int, metrics: dict[str, float]) -> str | None:
        self.to_parent.put(("epoch", epoch, metrics))
        return self.to_rank0.get()


def _rank(rank: int, world_size: int, port: int, cfg: DictConfig, splits: Splits | None, cuda: bool, test: bool,
          metric: str, to_parent: Any, to_rank0: Any, checkpoint: CheckpointPlan | None = None) -> None:
    """One rank's process: the environment Lightning reads for an externally launched rank, then fit_rank."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank), NODE_RANK="0",
                      WORLD_SIZE=str(world_size))
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    hook = _HookInParent(to_parent, to_rank0) if rank == 0 else None
    splits = None if splits is None else splits.to(device)
    if rank > 0:  # the ranks run the same code: rank 0 says what there is to say
        warnings.simplefilter("ignore")
    with warnings_once():  # one line each, and not those the study has shown (their keys come in the environment)
        result = fit_rank(cfg, splits, hook, test, rank=rank, world_size=world_size, metric=metric,
                          checkpoint=checkpoint)
    result.module = None  # the trained module stays in the rank: it need not be pickled back
    if torch.distributed.is_initialized():
        # Every rank leaves the process group together and ends gloo's threads here: left to the exit-time
        # destructors, a rank could abort ("terminate called without an active exception", SIGABRT).
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if rank == 0:
        to_parent.put(("done", result))


def fit_ddp(cfg: DictConfig, splits: Splits | None, on_epoch: EpochHook | None = None, test: bool = False,
            metric: str | None = None, cuda: bool = False, checkpoint: CheckpointPlan | None = None) -> TrainResult:
    """A training over trainer.devices ranks: GPUs 0..devices-1 of the visible ones when `cuda`, else CPU processes.
    `splits` None: each rank builds the LightningDataModule of `data`. Returns rank 0's result (its metrics are those
    of the whole: see searchlab.modules)."""
    start = time.perf_counter()
    world_size = int(cfg.trainer.devices)
    context = mp.get_context("spawn")
    to_parent, to_rank0 = context.Queue(), context.Queue()
    args = (world_size, find_free_network_port(), cfg, None if splits is None else splits.to(torch.device("cpu")),
            cuda, test, metric or Objectives.of(cfg.study).primary, to_parent, to_rank0, checkpoint)
    ranks = mp.start_processes(_rank, args=args, nprocs=world_size, join=False, start_method="spawn")
    try:
        while True:
            try:
                message = to_parent.get(timeout=_POLL_S)
            except queue.Empty:
                if ranks.join(timeout=0):  # raises with the rank's traceback when one failed
                    raise RuntimeError("the DDP ranks ended without sending a result") from None
                continue
            if message[0] == "epoch":
                to_rank0.put(on_epoch(message[1], message[2]) if on_epoch else None)
            else:
                while not ranks.join():
                    pass
                result: TrainResult = message[1]
                result.seconds = time.perf_counter() - start  # with the ranks' start-up
                return result
    finally:
        for process in ranks.processes:  # on an error or interrupt here, or a failed rank: no rank outlives the call
            if process.is_alive():
                process.terminate()
            process.join()
