"""Checkpoints of a running trial, so that a trial that did not finish resumes where it stopped, not from epoch 0.

A checkpoint is Lightning's own (model, optimizers, schedulers, loops, callbacks' states: the metric history, the
best epoch's weights, early stopping's count, the batch order's generator) plus the RNG states and the trial it
belongs to; it is resumed with Lightning's `Trainer.fit(ckpt_path=...)`.

Lightning's ModelCheckpoint is not used to write it, for three reasons: a SIGKILL during its write leaves a truncated
file in place of the last good one (ours writes a new file and renames it over the old); its time-based setting
writes mid-epoch, which Lightning cannot resume exactly (ours writes at epoch ends only); and it cannot write, on
Ctrl-C or SIGTERM, the state of the last finished epoch (ours keeps it in memory while checkpointing is on).

When to write (trainer.checkpoint_every_n_epochs): every N epochs, or `auto`: once the trial has trained for
trainer.checkpoint_auto_seconds, at the first epoch end after that long since the last write (and never more often
than 20 times the last write's own cost). The default digits study's trials end before that: it writes nothing.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from lightning_fabric.utilities.apply_func import apply_to_collection
from omegaconf import DictConfig

if TYPE_CHECKING:  # the training's own package at run time (searchlab.config.lightning_package): either one's classes
    import pytorch_lightning as pl

CHECKPOINT_FILE = "last.ckpt"
# A write costs at most 1/_COST_RATIO of the training time between writes under `auto`.
_COST_RATIO = 20


@dataclass(frozen=True)
class CheckpointPlan:
    """Where one trial's checkpoint lives and when it is written; pickles (it goes to DDP ranks).

    `every`: write every N epochs, or None for auto (after `auto_seconds` of training). `resume`: the fit starts from
    the checkpoint at `path`. `owner`: what the checkpoint records about its trial (params, the MLflow run), so that a
    retry can tell it belongs to it and say which run it continues."""

    path: Path
    every: int | None
    auto_seconds: float
    resume: bool = False
    owner: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Saved:
    """What a checkpoint holds about its trial, read without loading its tensors."""

    epoch: int
    history: list[dict[str, float]]
    owner: dict[str, Any]


def checkpoint_every(cfg: DictConfig) -> int | None:
    """trainer.checkpoint_every_n_epochs as N, or None for auto (checked by config validation)."""
    value = cfg.trainer.get("checkpoint_every_n_epochs", "auto")
    return None if value == "auto" else int(value)


def checkpoint_root(cfg: DictConfig) -> Path:
    """The study's checkpoint folder: under tracking.artifact_root (shared by the machines of a multi-node study when
    it is a shared folder), else under mlruns/ of the current folder."""
    root = cfg.tracking.get("artifact_root") or "mlruns/artifacts"
    return Path(root).resolve() / cfg.study.name / "checkpoints"


def trial_plan(cfg: DictConfig, key: int, owner: dict[str, Any]) -> CheckpointPlan:
    """The plan of the trial whose first attempt was trial number `key` (its retries share the folder)."""
    return CheckpointPlan(checkpoint_root(cfg) / f"trial-{key}" / CHECKPOINT_FILE, checkpoint_every(cfg),
                          float(cfg.trainer.get("checkpoint_auto_seconds", 30)), owner=owner)


def read_saved(path: Path) -> Saved | None:
    """The checkpoint's epoch, metric history and owner, or None when there is none or it cannot be read (a file a
    kill cut short is never in place: writes are renamed into it). Memory-mapped: the tensors are not read."""
    if not path.is_file():
        return None
    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
        state = checkpoint["callbacks"][TrialCheckpoints.KEY]
        return Saved(int(state["epoch"]), list(state["history"]), dict(state["owner"]))
    except Exception:
        return None


def remove(plan: CheckpointPlan | None) -> None:
    """Deletes the trial's checkpoint folder: the trial has finished and will not be resumed."""
    if plan is not None and plan.path.parent.exists():
        shutil.rmtree(plan.path.parent, ignore_errors=True)


def rng_states() -> dict[str, Any]:
    states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class EpochSnapshots:
    """A trial's checkpoints as the plan says: the state of a finished epoch kept in memory once the plan keeps them
    (every N epochs, or auto after `auto_seconds` of training), written when due, and written on Ctrl-C or SIGTERM
    when it is newer than the file. One rule for the Lightning path (TrialCheckpoints) and the packing engine's lone
    trial (searchlab.packing.lone)."""

    def __init__(self, plan: CheckpointPlan, epoch: int = 0) -> None:
        self.plan = plan
        self.snapshot: dict[str, Any] | None = None  # the state of the last kept epoch, on the CPU
        self.snapshot_epoch = self.written_epoch = epoch  # a resumed trial's file already holds `epoch`
        self.trained_seconds = 0.0  # training time of this attempt (a resumed trial starts again from 0)
        self.written_at = 0.0  # training seconds at the last write
        self.write_seconds = 0.0  # what the last write cost

    def restored(self, epoch: int) -> None:
        """The training resumed from the checkpoint of `epoch`."""
        self.snapshot_epoch = self.written_epoch = epoch

    def after_epoch(self, seconds: float, epoch: int, ends: bool, take: Callable[[], dict[str, Any]],
                    write: bool = True) -> None:
        """After `epoch`, which took `seconds`: keeps `take()` (the state to resume from) and writes it when due.
        Nothing when the trial `ends` with this epoch: there is nothing to resume. `write` False: another process
        writes (a DDP rank other than 0)."""
        self.trained_seconds += seconds
        if ends:
            return
        every = self.plan.every
        if every is not None:
            keep, due = True, epoch % every == 0
        else:
            keep = self.trained_seconds >= self.plan.auto_seconds
            since = self.trained_seconds - self.written_at
            due = keep and since >= max(self.plan.auto_seconds, _COST_RATIO * self.write_seconds)
        if not keep:
            return
        self.snapshot, self.snapshot_epoch = take(), epoch
        if due and write:
            self.write()

    def interrupted(self, write: bool = True) -> None:
        """Ctrl-C or SIGTERM: the last kept epoch's state is written when the file holds an older one."""
        if write and self.snapshot_epoch > self.written_epoch:
            self.write()

    def write(self) -> None:
        """The snapshot to the plan's path (write_file: a kill mid-write leaves the previous checkpoint whole)."""
        if self.snapshot is None:
            return
        self.write_seconds, self.written_at = write_file(self.plan.path, self.snapshot), self.trained_seconds
        self.written_epoch = self.snapshot_epoch


def write_file(path: Path, checkpoint: dict[str, Any]) -> float:
    """Writes the checkpoint beside `path`, then renames it over it (a kill mid-write leaves the previous checkpoint
    whole); returns the seconds it took."""
    start = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        torch.save(checkpoint, partial)
        os.replace(partial, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
    return time.perf_counter() - start


class TrialCheckpoints:
    """Writes the trial's checkpoint at epoch ends, as the plan says, and the last finished epoch's state on Ctrl-C or
    SIGTERM. Made a Checkpoint of the training's Lightning package (Package.subclass(TrialCheckpoints, "Checkpoint")):
    Lightning calls a Checkpoint after the other callbacks, so the epoch's metrics and best weights are already
    recorded when it writes.

    `history` is the list the epoch callback appends each epoch's metrics to (saved with the checkpoint)."""

    KEY = "searchlab.checkpoint"

    def __init__(self, plan: CheckpointPlan, history: list[dict[str, float]]) -> None:
        self.plan, self.history = plan, history
        self.snapshots = EpochSnapshots(plan)
        self._epoch_start: float | None = None
        self.restored_rng: dict[str, Any] | None = None
        self.restored_loader: dict[str, Any] | None = None
        self._loader: Any = None  # the training batches, when they have a state (a generator) to keep

    @property
    def state_key(self) -> str:
        return self.KEY

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": len(self.history), "history": list(self.history), "owner": dict(self.plan.owner),
                "rng": rng_states(), "loader": _loader_state(self._loader)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history[:] = state_dict["history"]  # epoch numbers go on from the checkpoint's
        self.snapshots.restored(int(state_dict["epoch"]))
        self.restored_rng, self.restored_loader = state_dict.get("rng"), state_dict.get("loader")

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self._loader = trainer.train_dataloader
        if self.restored_rng is not None:  # after Lightning has restored everything else: the RNGs as they were
            set_rng_states(self.restored_rng)
            self.restored_rng = None
        # Lightning restores a stateful loader only when resuming mid-epoch (_FitLoop.restarting): from an epoch's
        # end the batch order would start again from the seed, so its state (TensorBatches' generator) is set here.
        if self.restored_loader and hasattr(self._loader, "load_state_dict"):
            self._loader.load_state_dict(self.restored_loader)
        self.restored_loader = None

    def on_train_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self._epoch_start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self._epoch_start is None:
            return
        epoch = len(self.history)
        ends = trainer.should_stop or epoch >= trainer.max_epochs  # the trial ends now (pruned, at a limit, done)
        # Under DDP rank 0 writes.
        self.snapshots.after_epoch(time.perf_counter() - self._epoch_start, epoch, ends,
                                   lambda: self._snapshot(trainer), trainer.is_global_zero)

    def _snapshot(self, trainer: pl.Trainer) -> dict[str, Any]:
        """Lightning's own checkpoint content (what trainer.save_checkpoint writes), kept instead of written."""
        return _on_cpu(trainer._checkpoint_connector.dump_checkpoint(weights_only=False))

    def on_exception(self, trainer: pl.Trainer, module: pl.LightningModule, exception: BaseException) -> None:
        """Ctrl-C, SIGTERM (Lightning's SIGTERMException is a SystemExit): the last finished epoch's state is
        written, so that the retry resumes from it. An error ends the trial: nothing is written."""
        if isinstance(exception, (KeyboardInterrupt, SystemExit)):
            self.snapshots.interrupted(trainer.is_global_zero)


def _loader_state(loader: Any) -> dict[str, Any] | None:
    return loader.state_dict() if hasattr(loader, "state_dict") and hasattr(loader, "load_state_dict") else None


def _on_cpu(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """A copy whose tensors are CPU copies: the live parameters and optimizer state go on changing."""
    return apply_to_collection(checkpoint, torch.Tensor, lambda t: t.detach().to("cpu", copy=True))
