"""The optimizers and schedules of conf/optimizer and conf/scheduler that torch has no single class for.

Every other entry there names a torch class by `_target_` directly. These exist because a searched key must be one
number (Adam's betas are two), or because a schedule is made from the run's length (epochs, steps), which searchlab
passes when the function's signature names `max_epochs` or `total_steps` (see searchlab.training.build.Schedule).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.optim import lr_scheduler

Params = Iterable[torch.nn.Parameter] | Iterable[dict]


class Adam(torch.optim.Adam):
    """torch.optim.Adam with `beta1` and `beta2` as separate arguments."""

    def __init__(self, params: Params, lr: float = 1e-3, beta1: float = 0.9, beta2: float = 0.999,
                 weight_decay: float = 0.0) -> None:
        super().__init__(params, lr=lr, betas=(beta1, beta2), weight_decay=weight_decay)


class AdamW(torch.optim.AdamW):
    """torch.optim.AdamW with `beta1` and `beta2` as separate arguments."""

    def __init__(self, params: Params, lr: float = 1e-3, beta1: float = 0.9, beta2: float = 0.999,
                 weight_decay: float = 0.01) -> None:
        super().__init__(params, lr=lr, betas=(beta1, beta2), weight_decay=weight_decay)


def _base_lr(optimizer: torch.optim.Optimizer) -> float:
    return optimizer.param_groups[0]["lr"]


def cosine(optimizer: torch.optim.Optimizer, max_epochs: int, min_factor: float = 0.01) -> lr_scheduler.LRScheduler:
    """Cosine decay over the run's epochs, down to lr * min_factor."""
    return lr_scheduler.CosineAnnealingLR(optimizer, T_max=max_epochs, eta_min=_base_lr(optimizer) * min_factor)


def warmup_cosine(optimizer: torch.optim.Optimizer, max_epochs: int, warmup_epochs: int = 2,
                  start_factor: float = 0.1, min_factor: float = 0.01) -> lr_scheduler.LRScheduler:
    """Linear warmup from lr * start_factor over `warmup_epochs`, then cosine decay to lr * min_factor."""
    warmup = min(warmup_epochs, max_epochs - 1)
    if warmup <= 0:
        return cosine(optimizer, max_epochs, min_factor)
    eta_min = _base_lr(optimizer) * min_factor
    return lr_scheduler.SequentialLR(optimizer, milestones=[warmup], schedulers=[
        lr_scheduler.LinearLR(optimizer, start_factor=start_factor, total_iters=warmup),
        lr_scheduler.CosineAnnealingLR(optimizer, T_max=max_epochs - warmup, eta_min=eta_min),
    ])


def one_cycle(optimizer: torch.optim.Optimizer, total_steps: int, pct_start: float = 0.3,
              div_factor: float = 25.0) -> lr_scheduler.LRScheduler:
    """One cycle over all the run's optimizer steps, peaking at the optimizer's lr (step it every step)."""
    return lr_scheduler.OneCycleLR(optimizer, max_lr=_base_lr(optimizer), total_steps=max(total_steps, 1),
                                   pct_start=pct_start, div_factor=div_factor)
