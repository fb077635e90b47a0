"""One trial on the packing engine (a pack of one): the built-in modules' training path where nothing needs Lightning.

Why: on the bench's setting (digits, MLP 2x256, batch 64) Lightning's own per-step machinery makes a trial's steps
1.45-1.52x the plain PyTorch loop, while the engine at K=1 runs them at 0.85-0.87x (bench/results.md, "Overhead"), and
Lightning's set-up and teardown cost 21-25 ms a trial. The engine trains the same thing (the module's loss and
metrics, the config's optimizer and schedule as torch runs them, the same initial weights and batch order; tested
against Lightning, tolerance in tests/packing/test_lone.py), so trainer.engine=auto takes it where it applies:

- searchlab's own classifier or regressor module (not a subclass: its steps could differ) and MLP network, batch norm
  or not (the engine's batched-matmul path; a CNN or a network of a user's would go through vmap, not measured at
  K=1);
- resident data (not a LightningDataModule), one device, 32-true or bf16-mixed precision;
- no trainer.max_time, trainer.early_stopping_patience or trainer.callbacks (Lightning's, which the engine has not);
- no checkpoint of Lightning's to resume (one the engine wrote it resumes itself).

Everything else, and trainer.engine=lightning, trains with Lightning (searchlab.training.fit). `fit_alone` chooses.
Checkpoints follow the plan as on the Lightning path (searchlab.training.checkpoints.EpochSnapshots): the file holds the
same `searchlab.checkpoint` record (epoch, history, owner: read_saved reads either kind) and the engine's state.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from searchlab.data import Splits
from searchlab.packing.engine import PackedTraining
from searchlab.training import fit
from searchlab.training.build import build_module, data_shape
from searchlab.training.checkpoints import CheckpointPlan, EpochSnapshots, TrialCheckpoints
from searchlab.training.lightning import EpochHook, TrainResult

ENGINE_KEY = "searchlab.engine"  # the engine's state in a checkpoint file


def fit_alone(cfg: DictConfig, splits: Splits | None, on_epoch: EpochHook | None = None, test: bool = False,
              metric: str | None = None, checkpoint: CheckpointPlan | None = None) -> TrainResult:
    """One configuration trained alone, as searchlab.training.fit trains it (same arguments, same result): on the
    packing engine where it applies (trainer.engine=auto), else on Lightning. What a search's trial, `searchlab
    train` and an ablation's training call."""
    pack = lone_pack(cfg, splits, metric, checkpoint)
    if pack is None:
        return fit(cfg, splits, on_epoch, test, metric=metric, checkpoint=checkpoint)
    return fit_lone(pack, cfg, on_epoch, test, checkpoint)


def lone_pack(cfg: DictConfig, splits: Splits | None, metric: str | None,
              checkpoint: CheckpointPlan | None) -> PackedTraining | None:
    """The pack of one that trains cfg (at the epoch of the engine's checkpoint it resumes), or None where Lightning
    must (see the module's docstring). Cheap when it says None for the config's keys; a config the engine refuses
    costs building the pack's network."""
    engine = OmegaConf.select(cfg, "trainer.engine", default="auto")  # auto or lightning (validate_config)
    if engine != "auto" or splits is None or cfg.trainer.devices > 1:
        return None
    for key in ("trainer.max_time", "trainer.early_stopping_patience", "trainer.callbacks"):
        if OmegaConf.select(cfg, key, default=None) is not None:
            return None
    state = None
    if checkpoint is not None and checkpoint.resume:
        state = _engine_state(checkpoint)
        if state is None:
            return None  # Lightning's checkpoint: Lightning resumes it
    try:
        pack = PackedTraining([cfg], splits, metric, path="mlp")
    except ValueError:  # not searchlab's module and MLP, an optimizer the engine does not step...
        return None
    if state is not None:
        pack.load_state_dict(state)  # the epochs after the checkpoint's are what fit_lone trains
    return pack


def _engine_state(plan: CheckpointPlan) -> dict[str, Any] | None:
    try:
        saved = torch.load(plan.path, map_location="cpu", weights_only=False)
    except Exception:
        return None
    return saved.get(ENGINE_KEY) if isinstance(saved, dict) else None


def fit_lone(pack: PackedTraining, cfg: DictConfig, on_epoch: EpochHook | None = None, test: bool = False,
             checkpoint: CheckpointPlan | None = None) -> TrainResult:
    """Trains the pack of one (lone_pack's) to its end, as searchlab.training.fit does on Lightning: each epoch
    through `on_epoch`, checkpoints as `checkpoint` plans them (and the last finished epoch's on Ctrl-C or SIGTERM),
    test metrics and the trained module (best epoch's weights) when `test`."""
    start = time.perf_counter()
    snapshots = None if checkpoint is None else EpochSnapshots(checkpoint, pack.epoch)
    hook = None if on_epoch is None else (lambda member, epoch, metrics: on_epoch(epoch, metrics))
    try:
        while pack.epoch < pack.epochs and pack.active:
            epoch_start = time.perf_counter()
            pack.run_epoch(hook)
            if snapshots is not None:
                ends = not pack.active or pack.epoch >= pack.epochs
                snapshots.after_epoch(time.perf_counter() - epoch_start, pack.epoch, ends,
                                      lambda: _snapshot(pack, checkpoint))
    except (KeyboardInterrupt, SystemExit):
        if snapshots is not None:
            snapshots.interrupted()
        raise
    result = pack.fit()  # every epoch is done: the members' results
    [result] = result
    if test:
        result.test = pack.test_metrics(0)
        module = build_module(cfg, data_shape(pack.splits, pack.task), None)
        if result.weights is not None:
            module.load_state_dict(result.weights.state)
        result.module = module
    result.seconds = time.perf_counter() - start
    return result


def _snapshot(pack: PackedTraining, plan: CheckpointPlan) -> dict[str, Any]:
    """The checkpoint of the pack's last epoch: the engine's state, and the record read_saved reads of either kind."""
    state = pack.state_dict()
    record = {"epoch": pack.epoch, "history": state["members"][0]["history"], "owner": dict(plan.owner)}
    return {"callbacks": {TrialCheckpoints.KEY: record}, ENGINE_KEY: state}
