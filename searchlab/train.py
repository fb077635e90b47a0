"""Train one configuration with Lightning: the path shared by `searchlab train` and every trial of a study."""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from pytorch_lightning.strategies import DDPStrategy, Strategy

from searchlab.config import ConfigError
from searchlab.data import Splits, TensorBatches, batch_size_for
from searchlab.model import Classifier, build_network

# Called after each epoch's validation with (epoch number from 1, metrics); returns a reason to stop, or None.
EpochHook = Callable[[int, dict[str, float]], "str | None"]

for _name in ("pytorch_lightning", "lightning_fabric", "lightning.pytorch"):
    logging.getLogger(_name).setLevel(logging.WARNING)
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*`isinstance\\(treespec, LeafSpec\\)` is deprecated.*")
# Under DDP every rank evaluates the whole val set, so the logged val_loss is the same on all ranks: no sync needed.
warnings.filterwarnings("ignore", message=".*when logging on epoch level in distributed setting.*")


@dataclass
class TrainResult:
    """Per-epoch metrics; `stop_reason` says why training ended before max_epochs (pruned, diverged)."""

    history: list[dict[str, float]] = field(default_factory=list)
    stop_reason: str | None = None
    test: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    def best(self, metric: str, direction: str) -> float | None:
        """The best epoch's value of the metric: the trial's objective."""
        values = [m[metric] for m in self.history if math.isfinite(m[metric])]
        if not values:
            return None
        return max(values) if direction == "maximize" else min(values)


def resolve_device(accelerator: str, cuda_available: bool | None = None) -> torch.device:
    """trainer.accelerator (already checked by validate_config) -> the device the data and model live on: the first
    visible GPU for auto/gpu/cuda."""
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    if accelerator in ("gpu", "cuda") and not cuda:
        raise ConfigError(f"trainer.accelerator: {accelerator} asked for, but no CUDA GPU is visible")
    return torch.device("cuda", 0) if accelerator in ("auto", "gpu", "cuda") and cuda else torch.device("cpu")


def resolve_precision(precision: str, device: torch.device) -> str:
    """trainer.precision -> Lightning's setting: 'auto' is bf16 mixed precision on a GPU that has it, else fp32."""
    if precision != "auto":
        return precision
    return "bf16-mixed" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "32-true"


class _EpochCallback(pl.Callback):
    """Hands each epoch's metrics to the hook and stops the trainer when the hook or the loss says so."""

    def __init__(self, hook: EpochHook | None, result: TrainResult) -> None:
        self.hook, self.result = hook, result

    def on_validation_end(self, trainer: pl.Trainer, module: Classifier) -> None:
        if trainer.sanity_checking or not module.history:
            return
        epoch, metrics = len(module.history), module.history[-1]
        reason = None
        if not math.isfinite(metrics["train_loss"]):
            reason = f"diverged: train_loss is {metrics['train_loss']} at epoch {epoch}"
        if self.hook is not None:
            reason = self.hook(epoch, metrics) or reason
        # Under DDP only rank 0 has the hook: its decision goes to every rank, so all stop at the same epoch.
        reason = trainer.strategy.broadcast(reason, src=0)
        if reason and not self.result.stop_reason:
            self.result.stop_reason = reason
            trainer.should_stop = True


def check_devices(trainer_cfg: DictConfig, gpu_count: int | None = None) -> None:
    """trainer.devices and trainer.process_group_backend against the machine (gpu_count: fake it in tests)."""
    devices, backend = trainer_cfg.devices, trainer_cfg.process_group_backend
    count = (torch.cuda.device_count() if torch.cuda.is_available() else 0) if gpu_count is None else gpu_count
    on_gpu = trainer_cfg.accelerator in ("gpu", "cuda") or (trainer_cfg.accelerator == "auto" and count > 0)
    if on_gpu and devices > count:
        raise ConfigError(f"trainer.devices: {devices} asked for, but {count} GPU(s) are visible "
                          "(lower trainer.devices or widen CUDA_VISIBLE_DEVICES)")
    if backend == "nccl" and not on_gpu:
        raise ConfigError("trainer.process_group_backend: nccl needs GPUs; use gloo (or auto) on CPU")


def process_group_backend(setting: str, device: torch.device) -> str:
    """trainer.process_group_backend -> torch.distributed's: 'auto' is nccl on GPUs, gloo on CPU."""
    if setting != "auto":
        return setting
    return "nccl" if device.type == "cuda" else "gloo"


def fit(cfg: DictConfig, splits: Splits, on_epoch: EpochHook | None = None, test: bool = False) -> TrainResult:
    """Trains cfg on splits (already on the training device); the test split is evaluated only when asked.

    With trainer.devices > 1 the training runs in DDP ranks spawned for this call (see searchlab.ddp); on_epoch
    still runs here, in the caller's process.
    """
    if cfg.trainer.devices > 1:
        from searchlab.ddp import fit_ddp  # imported here: searchlab.ddp builds on this module

        return fit_ddp(cfg, splits, on_epoch, test)
    return fit_rank(cfg, splits, on_epoch, test)


def fit_rank(cfg: DictConfig, splits: Splits, on_epoch: EpochHook | None = None, test: bool = False,
             rank: int = 0, world_size: int = 1) -> TrainResult:
    """fit() in one process: the whole training on one device, or one DDP rank's part of it (world_size > 1, in a
    process that searchlab.ddp started and set up as Lightning's externally launched rank)."""
    start = time.perf_counter()
    device = splits.x_train.device
    pl.seed_everything(cfg.seed, verbose=False)
    network = build_network(cfg.model, splits.sample_shape, splits.n_classes)
    module = Classifier(network, cfg)
    batch_size = batch_size_for(cfg.data.batch_size, len(splits.x_train))
    if cfg.model.batch_norm and batch_size == 1:
        raise ValueError("model.batch_norm=true needs data.batch_size > 1: BatchNorm cannot train on one sample")
    train_batches = TensorBatches(splits.x_train, splits.y_train, batch_size, shuffle=True, seed=cfg.seed,
                                  rank=rank, world_size=world_size)
    val_batches = TensorBatches(splits.x_val, splits.y_val, cfg.trainer.eval_batch_size, shuffle=False)
    result = TrainResult()
    if world_size > 1:
        strategy: Strategy | str = DDPStrategy(
            process_group_backend=process_group_backend(cfg.trainer.process_group_backend, device),
            timeout=timedelta(seconds=cfg.trainer.process_group_timeout_s))
        devices: list[int] | int = world_size
    else:
        strategy, devices = "auto", [device.index or 0] if device.type == "cuda" else 1
    trainer = pl.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=devices,
        strategy=strategy,
        use_distributed_sampler=False,
        precision=resolve_precision(cfg.trainer.precision, device),
        max_epochs=cfg.trainer.max_epochs,
        limit_train_batches=cfg.trainer.limit_train_batches,
        callbacks=[_EpochCallback(on_epoch, result)],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, train_dataloaders=train_batches, val_dataloaders=val_batches)
    result.history = module.history
    if test and splits.x_test is not None and not result.stop_reason:
        trainer.test(module, TensorBatches(splits.x_test, splits.y_test, cfg.trainer.eval_batch_size, shuffle=False),
                     verbose=False)
        result.test = module.test_metrics
    result.seconds = time.perf_counter() - start
    return result
