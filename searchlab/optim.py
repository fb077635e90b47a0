"""Optimizers and learning-rate schedules, each made from its config by one table entry.

Adding an optimizer or a schedule is one entry here plus one YAML file in conf/optimizer/ or conf/scheduler/.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from omegaconf import DictConfig
from torch.optim import lr_scheduler

Params = Iterable[torch.nn.Parameter]

OPTIMIZERS: dict[str, Callable[[Params, DictConfig], torch.optim.Optimizer]] = {
    "sgd": lambda p, c: torch.optim.SGD(p, lr=c.lr, weight_decay=c.weight_decay),
    "momentum": lambda p, c: torch.optim.SGD(p, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay),
    "nesterov": lambda p, c: torch.optim.SGD(
        p, lr=c.lr, momentum=c.momentum, nesterov=True, weight_decay=c.weight_decay),
    "rmsprop": lambda p, c: torch.optim.RMSprop(
        p, lr=c.lr, alpha=c.alpha, momentum=c.momentum, weight_decay=c.weight_decay),
    "adam": lambda p, c: torch.optim.Adam(p, lr=c.lr, betas=(c.beta1, c.beta2), weight_decay=c.weight_decay),
    "adamw": lambda p, c: torch.optim.AdamW(p, lr=c.lr, betas=(c.beta1, c.beta2), weight_decay=c.weight_decay),
}


def _warmup_cosine(opt: torch.optim.Optimizer, c: DictConfig, epochs: int, steps: int) -> lr_scheduler.LRScheduler:
    warmup = min(c.warmup_epochs, epochs - 1)
    if warmup <= 0:
        return lr_scheduler.CosineAnnealingLR(opt, T_max=epochs, eta_min=_base_lr(opt) * c.min_factor)
    return lr_scheduler.SequentialLR(opt, milestones=[warmup], schedulers=[
        lr_scheduler.LinearLR(opt, start_factor=c.start_factor, total_iters=warmup),
        lr_scheduler.CosineAnnealingLR(opt, T_max=epochs - warmup, eta_min=_base_lr(opt) * c.min_factor),
    ])


def _base_lr(opt: torch.optim.Optimizer) -> float:
    return opt.param_groups[0]["lr"]


# name -> (make(optimizer, cfg, max_epochs, total_steps), Lightning interval). None: a constant learning rate.
SCHEDULERS: dict[str, tuple[Callable[..., Any], str] | None] = {
    "constant": None,
    "step": (lambda o, c, e, s: lr_scheduler.StepLR(o, step_size=c.step_size, gamma=c.gamma), "epoch"),
    "exponential": (lambda o, c, e, s: lr_scheduler.ExponentialLR(o, gamma=c.gamma), "epoch"),
    "cosine": (lambda o, c, e, s: lr_scheduler.CosineAnnealingLR(o, T_max=e, eta_min=_base_lr(o) * c.min_factor),
               "epoch"),
    "onecycle": (lambda o, c, e, s: lr_scheduler.OneCycleLR(
        o, max_lr=_base_lr(o), total_steps=s, pct_start=c.pct_start, div_factor=c.div_factor), "step"),
    "plateau": (lambda o, c, e, s: lr_scheduler.ReduceLROnPlateau(
        o, mode="min", factor=c.factor, patience=c.patience), "epoch"),
    "warmup_cosine": (_warmup_cosine, "epoch"),
}


def build_optimizer(params: Params, cfg: DictConfig) -> torch.optim.Optimizer:
    """The optimizer named by optimizer.name."""
    return OPTIMIZERS[cfg.name](params, cfg)


def build_schedule(opt: torch.optim.Optimizer, cfg: DictConfig, max_epochs: int, total_steps: int) -> dict | None:
    """Lightning's lr_scheduler dict for scheduler.name, or None for a constant rate.

    Plateau watches val_loss whatever the study optimizes: it is the signal every task has.
    """
    entry = SCHEDULERS[cfg.name]
    if entry is None:
        return None
    make, interval = entry
    return {"scheduler": make(opt, cfg, max_epochs, max(total_steps, 1)), "interval": interval, "monitor": "val_loss"}
