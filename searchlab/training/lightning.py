"""Train one configuration with Lightning in this process: the path shared by `searchlab train`, every trial of a
study and every DDP rank (searchlab.training chooses between one process and DDP ranks)."""

from __future__ import annotations

import io
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig, OmegaConf

from searchlab.config import EPOCH_SECONDS, PARAMS, ConfigError, Objectives, metric_direction
from searchlab.config.lightning_package import Package, quiet_loggers
from searchlab.config.objectives import diverged, improves
from searchlab.config.user_callbacks import EpochLogger, build_callbacks
from searchlab.data import Splits, TensorBatches, batch_size_for
from searchlab.training.build import build_module, data_shape, load_data, module_task, training_package
from searchlab.training.checkpoints import CheckpointPlan, TrialCheckpoints

if TYPE_CHECKING:  # the training's own package at run time (searchlab.config.lightning_package): either one's classes
    import pytorch_lightning as pl

# Called after each epoch's validation with (epoch number from 1, metrics); returns a reason to stop, or None.
EpochHook = Callable[[int, dict[str, float]], "str | None"]

warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*`isinstance\\(treespec, LeafSpec\\)` is deprecated.*")
# Lightning's hint, on any machine with SLURM's `srun` installed, to launch with srun: searchlab starts its own workers
# and DDP ranks (docs/several-machines.md says how to run it under SLURM); the hint is not about them.
warnings.filterwarnings("ignore", message=".*The `srun` command is available on your system but is not used.*")
# Under DDP every rank evaluates the whole val set, so the logged val_loss is the same on all ranks: no sync needed.
warnings.filterwarnings("ignore", message=".*when logging on epoch level in distributed setting.*")


class Weights:
    """A copy, on the CPU, of a module's state_dict at one epoch. It pickles as torch.save bytes, so it crosses a
    process boundary (a DDP rank's queue) as plain bytes, not as shared-memory tensors that die with their rank."""

    def __init__(self, state: dict[str, torch.Tensor], epoch: int, value: float) -> None:
        self.state, self.epoch, self.value = state, epoch, value

    @classmethod
    def of(cls, module: torch.nn.Module, epoch: int, value: float) -> Weights:
        return cls({k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}, epoch, value)

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        torch.save({"state_dict": self.state, "epoch": self.epoch, "value": self.value}, buffer)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> Weights:
        saved = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        return cls(saved["state_dict"], int(saved["epoch"]), float(saved["value"]))

    def __reduce__(self) -> tuple[Any, tuple[bytes]]:
        return Weights.from_bytes, (self.to_bytes(),)


@dataclass
class TrainResult:
    """Per-epoch metrics (what the module logged, plus lr, params and epoch_seconds); `stop_reason` says why
    training was stopped before max_epochs (pruned, diverged); `ended` why it ended early on a limit of its own
    (trainer.max_time, early stopping): a complete training. `weights` are those of the best epoch by study.metric
    (its first metric when it lists several; `best_epoch`), and `module` is the trained LightningModule with them
    loaded (not sent back from DDP ranks; `weights` are)."""

    history: list[dict[str, float]] = field(default_factory=list)
    stop_reason: str | None = None
    ended: str | None = None
    test: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    module: pl.LightningModule | None = None
    weights: Weights | None = None
    engine: str = "lightning"  # or "packed": searchlab's packing engine trained it (alone or in a pack)

    @property
    def best_epoch(self) -> int | None:
        return None if self.weights is None else self.weights.epoch

    def best(self, metric: str, direction: str) -> float | None:
        """The best epoch's value of the metric: the trial's objective."""
        values = [m[metric] for m in self.history if metric in m and math.isfinite(m[metric])]
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


def epoch_metrics(trainer: pl.Trainer) -> dict[str, float]:
    """trainer.callback_metrics as floats (one device read for all of them), and the first optimizer's lr."""
    metrics = {k: v for k, v in trainer.callback_metrics.items() if not k.startswith("test")}
    tensors = {k: v for k, v in metrics.items() if isinstance(v, torch.Tensor) and v.numel() == 1}
    values = torch.stack([v.detach().float().cpu() for v in tensors.values()]).tolist() if tensors else []
    out = dict(zip(tensors, values, strict=True))
    out.update({k: float(v) for k, v in metrics.items() if k not in tensors and isinstance(v, (int, float))})
    if trainer.optimizers:
        out["lr"] = trainer.optimizers[0].param_groups[0]["lr"]
    return out


class _EpochCallback:
    """A callback (of the training's Lightning package: Package.subclass): after each training epoch (and its
    validation), reads what the module logged and hands it to the hook; stops the trainer when the hook says so or the
    training diverged (a non-finite train_loss or objective).

    It adds searchlab's own two metrics, always there to be optimized (`study.metric=[val_acc,params]`) unless the
    module logs its own of the same name: `params`, the module's trainable parameter count (counted once, after the
    first epoch, when lazy layers have their shapes), and `epoch_seconds`, the wall time of the epoch from its start
    to the end of its validation."""

    def __init__(self, hook: EpochHook | None, result: TrainResult, metric: str) -> None:
        self.hook, self.result, self.metric = hook, result, metric
        self.params: float | None = None
        self.epoch_start = time.perf_counter()

    def on_train_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.epoch_start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = epoch_metrics(trainer)
        for logger in trainer.loggers:  # what the user's callbacks logged (searchlab.config.user_callbacks)
            if isinstance(logger, EpochLogger):
                for name, value in logger.metrics.items():
                    metrics.setdefault(name, value)
        if self.params is None:
            self.params = float(sum(p.numel() for p in module.parameters() if p.requires_grad))
        metrics.setdefault(PARAMS, self.params)
        metrics.setdefault(EPOCH_SECONDS, time.perf_counter() - self.epoch_start)
        self.result.history.append(metrics)
        epoch = len(self.result.history)
        reason = diverged(metrics, self.metric, epoch)
        if self.hook is not None:
            reason = self.hook(epoch, metrics) or reason
        # Under DDP only rank 0 has the hook: its decision goes to every rank, so all stop at the same epoch.
        reason = trainer.strategy.broadcast(reason, src=0)
        if reason and not self.result.stop_reason:
            self.result.stop_reason = reason
            trainer.should_stop = True


class _BestWeights:
    """A callback (of the training's Lightning package: Package.subclass) that keeps a CPU copy of the module's
    state_dict from its best validation epoch by `metric` (the epoch the trial's objective comes from: the first epoch
    with the best finite value). A copy is made only on an improving epoch. Under DDP every rank keeps its own (the
    ranks' weights are the same), so each can restore it before testing."""

    def __init__(self, result: TrainResult, metric: str, direction: str) -> None:
        self.result, self.metric, self.maximize = result, metric, direction == "maximize"

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.metric not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[self.metric])
        best = self.result.weights
        if not improves(value, None if best is None else best.value, self.maximize):
            return
        self.result.weights = Weights.of(module, trainer.current_epoch + 1, value)

    def state_dict(self) -> dict[str, Any]:  # in a trial's checkpoint: a resumed trial keeps its best epoch so far
        best = self.result.weights
        return {} if best is None else {"state": best.state, "epoch": best.epoch, "value": best.value}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            self.result.weights = Weights(state_dict["state"], int(state_dict["epoch"]), float(state_dict["value"]))


def _direction(cfg: DictConfig, metric: str) -> str:
    """The direction the metric is optimized in: study.direction, or from the metric's name when it is auto (one of
    several objectives: its own direction)."""
    objectives = Objectives.of(cfg.study)
    if metric in objectives.names:
        return objectives.directions[objectives.names.index(metric)]
    direction = cfg.study.direction if cfg.study.direction != "auto" else metric_direction(metric)
    if direction is None:
        raise ConfigError(f"study.direction: auto cannot tell whether {metric} should go up or down; set "
                          "study.direction=maximize or study.direction=minimize")
    return direction


def max_time(cfg: DictConfig) -> str | dict[str, float] | None:
    """trainer.max_time as Lightning's Trainer takes it: "DD:HH:MM:SS", a dict of timedelta keywords, or None."""
    value = OmegaConf.select(cfg, "trainer.max_time", default=None)
    return OmegaConf.to_container(value) if isinstance(value, DictConfig) else value


def _limit_reached(trainer: pl.Trainer, result: TrainResult, metric: str, package: Package) -> str | None:
    """Why a training that nobody stopped ended before max_epochs: early stopping or trainer.max_time."""
    if not trainer.should_stop or result.stop_reason:
        return None
    epoch = len(result.history)
    for callback in trainer.callbacks:
        if isinstance(callback, package.callbacks.EarlyStopping) and callback.stopped_epoch > 0:
            best = float(callback.best_score)
            return (f"early stopping at epoch {epoch}: {metric} did not improve for {callback.patience} epochs "
                    f"(best {best:.4g})")
    for callback in trainer.callbacks:
        remaining = callback.time_remaining() if isinstance(callback, package.callbacks.Timer) else None
        if remaining is not None and remaining <= 0:
            return f"max_time reached at epoch {epoch}"
    return None


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


def fit_rank(cfg: DictConfig, splits: Splits | None, on_epoch: EpochHook | None = None, test: bool = False,
             rank: int = 0, world_size: int = 1, metric: str | None = None, probe: bool = False,
             checkpoint: CheckpointPlan | None = None) -> TrainResult:
    """One training in this process: the whole of it on one device, or one DDP rank's part of it (world_size > 1, in
    a process that searchlab.training.ddp started and set up as Lightning's externally launched rank).

    `splits` are the resident tensors (already on the training device), or None when `data` is a
    LightningDataModule, which is built here. `metric` (default study.metric, its first) is watched for divergence.
    `probe` trains one batch and validates one batch: the check of a config before a study. `checkpoint`: where the
    trial's checkpoint is written and whether the training resumes from it (searchlab.training.checkpoints).
    """
    start = time.perf_counter()
    package = training_package(cfg)  # pytorch_lightning or lightning.pytorch: the Lightning classes below are its
    package.seed_everything(cfg.seed)
    quiet_loggers()
    task = module_task(cfg)
    data: Splits | pl.LightningDataModule = splits.for_task(task) if splits is not None else load_data(cfg)
    if isinstance(data, Splits):
        device = data.x_train.device
    else:
        device = resolve_device(cfg.trainer.accelerator)
        if world_size > 1 and device.type == "cuda":
            device = torch.device("cuda", rank)
    result = TrainResult()
    metric = metric or Objectives.of(cfg.study).primary
    callbacks: list[pl.Callback] = [package.subclass(_EpochCallback)(on_epoch, result, metric)]
    if not probe:
        callbacks.append(package.subclass(_BestWeights)(result, metric, _direction(cfg, metric)))
        patience = OmegaConf.select(cfg, "trainer.early_stopping_patience", default=None)
        if patience is not None:
            # check_finite off: a non-finite metric is a diverged run, stopped (and pruned) by _EpochCallback.
            mode = "max" if _direction(cfg, metric) == "maximize" else "min"
            callbacks.append(package.callbacks.EarlyStopping(monitor=metric, mode=mode, patience=patience,
                                                             check_finite=False))
        if checkpoint is not None:
            callbacks.append(package.subclass(TrialCheckpoints, "Checkpoint")(checkpoint, result.history))
    users = build_callbacks(cfg, package.name)  # trainer.callbacks, after searchlab's own
    callbacks.extend(users)
    resume = str(checkpoint.path) if checkpoint is not None and checkpoint.resume and not probe else None
    if world_size > 1:
        strategy: Any = package.DDPStrategy(
            process_group_backend=process_group_backend(cfg.trainer.process_group_backend, device),
            timeout=timedelta(seconds=cfg.trainer.process_group_timeout_s))
        devices: list[int] | int = world_size
    else:
        strategy, devices = "auto", [device.index or 0] if device.type == "cuda" else 1
    trainer = package.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=devices,
        strategy=strategy,
        use_distributed_sampler=not isinstance(data, Splits),
        precision=resolve_precision(cfg.trainer.precision, device),
        max_epochs=1 if probe else cfg.trainer.max_epochs,
        max_time=None if probe else max_time(cfg),
        limit_train_batches=1 if probe else cfg.trainer.limit_train_batches,
        limit_val_batches=1 if probe else None,
        callbacks=callbacks,
        logger=package.subclass(EpochLogger, "Logger")() if users else False,
        log_every_n_steps=1,  # with a logger: what a callback logs per step is kept (and no warning on short epochs)
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=any(isinstance(c, TrialCheckpoints) for c in callbacks),
        num_sanity_val_steps=0,
    )
    shape = data_shape(data, task)
    module = build_module(cfg, shape, trainer)
    if isinstance(data, Splits):
        batch_size = batch_size_for(cfg.data.batch_size, len(data.x_train))
        if OmegaConf.select(cfg, "model.batch_norm", default=False) and batch_size == 1:
            raise ValueError("model.batch_norm=true needs data.batch_size > 1: BatchNorm cannot train on one sample")
        train_batches = TensorBatches(data.x_train, data.y_train, batch_size, shuffle=True, seed=cfg.seed,
                                      rank=rank, world_size=world_size)
        val_batches = TensorBatches(data.x_val, data.y_val, cfg.trainer.eval_batch_size, shuffle=False)
        trainer.fit(module, train_dataloaders=train_batches, val_dataloaders=val_batches, ckpt_path=resume,
                    weights_only=False)
    else:
        trainer.fit(module, datamodule=data, ckpt_path=resume, weights_only=False)
    result.ended = _limit_reached(trainer, result, metric, package)
    if result.weights is not None:  # the best epoch's weights, for testing, logging and export
        module.load_state_dict(result.weights.state)
    result.module = module
    if test and not result.stop_reason and package.is_overridden("test_step", module):
        if isinstance(data, Splits) and data.x_test is not None:
            tested = trainer.test(module, TensorBatches(data.x_test, data.y_test, cfg.trainer.eval_batch_size,
                                                        shuffle=False), verbose=False)
        elif not isinstance(data, Splits) and package.is_overridden("test_dataloader", data):
            tested = trainer.test(module, datamodule=data, verbose=False)
        else:
            tested = []
        result.test = {k: float(v) for d in tested for k, v in d.items()}
    result.seconds = time.perf_counter() - start
    return result
