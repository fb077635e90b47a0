"""The optimizer steps of a pack: SGD (momentum, Nesterov), RMSprop, Adam and AdamW over stacked parameters, every
hyperparameter a tensor with one value per member.

Each member must get exactly the step torch.optim would give it alone, schedules included. So the hyperparameters
are not copied from the config: each member keeps a real torch optimizer of the trial's own class over one dummy
parameter (`Member`), its real schedule steps that optimizer, and the pack reads lr, momentum, betas... back from its
param_groups. A OneCycleLR that cycles momentum or beta1, a ReduceLROnPlateau fed the member's own val_loss, a
searchlab.optim.Adam with beta1/beta2 as two keys: all come out as alone, with no closed form to keep in step with
torch. The update formulas follow torch's single-tensor (CPU default) implementations line by line.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

# What each family reads from a member's param_groups[0] each time its schedule may have changed them.
_HYPER = {
    "sgd": ("lr", "weight_decay", "momentum", "dampening"),
    "rmsprop": ("lr", "weight_decay", "alpha", "eps", "momentum"),
    "adam": ("lr", "weight_decay", "beta1", "beta2", "eps"),
}


def optimizer_family(optimizer: torch.optim.Optimizer) -> tuple[str, dict[str, Any]]:
    """(family, flags shared by the pack) of a member's real optimizer; ValueError with the reason when the pack
    cannot reproduce it."""
    group = optimizer.param_groups[0]
    name = type(optimizer).__name__
    for flag in ("maximize", "amsgrad", "centered", "differentiable", "capturable"):
        if group.get(flag):
            raise ValueError(f"optimizer: {name} with {flag}=True is not implemented for packed trials")
    if isinstance(optimizer, torch.optim.SGD):
        return "sgd", {"nesterov": bool(group["nesterov"])}
    if isinstance(optimizer, torch.optim.RMSprop):
        return "rmsprop", {}
    if isinstance(optimizer, torch.optim.Adam):  # AdamW is Adam with decoupled_weight_decay in torch 2.13
        return "adam", {"decoupled": bool(group.get("decoupled_weight_decay", False))}
    raise ValueError(f"optimizer: packed trials implement SGD, RMSprop, Adam and AdamW, not {name}")


def read_hyper(optimizer: torch.optim.Optimizer, family: str) -> dict[str, float]:
    """The member's current hyperparameters (after its schedule's changes)."""
    group = optimizer.param_groups[0]
    values = {k: float(group[k]) for k in _HYPER[family] if k in group}
    if family == "adam":
        values["beta1"], values["beta2"] = (float(b) for b in group["betas"])
    return values


class PackedOptimizer:
    """The family's update applied to every stacked tensor at once; `state` holds the stacked moment buffers."""

    def __init__(self, family: str, flags: dict[str, Any], params: Sequence[torch.Tensor]) -> None:
        self.family, self.flags = family, flags
        self.steps = 0
        self.hyper: dict[str, torch.Tensor] = {}
        self._host: dict[str, list[float]] = {}
        self.state: list[dict[str, torch.Tensor]] = [{} for _ in params]
        for p, state in zip(params, self.state, strict=True):
            if family == "sgd":
                state["momentum_buffer"] = torch.zeros_like(p)
            elif family == "rmsprop":
                state["square_avg"] = torch.zeros_like(p)
                state["momentum_buffer"] = torch.zeros_like(p)
            else:
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)

    def set_hyper(self, members: Sequence[dict[str, float]], like: torch.Tensor) -> None:
        """One tensor per hyperparameter, a value per member (float64 values on the host kept for the bias
        corrections, which torch computes in Python floats)."""
        self._host = {k: [m[k] for m in members] for k in members[0]}
        # Derived values in Python floats, as torch computes them before they meet a tensor: 1 - beta1 in float32
        # is not float32(1 - beta1), and Adam amplifies such differences where gradients are tiny.
        for name in ("beta1", "beta2", "alpha", "dampening"):
            if name in self._host:
                self._host[f"1-{name}"] = [1 - v for v in self._host[name]]
        self._host["1-lr*wd"] = [1 - lr * wd for lr, wd in zip(self._host["lr"], self._host["weight_decay"],
                                                                strict=True)]
        self.hyper = {k: torch.tensor(v, dtype=like.dtype, device=like.device) for k, v in self._host.items()}

    def keep(self, index: torch.Tensor) -> None:
        """Only the members at `index` (shrinking the pack): their rows of every buffer."""
        self.state = [{k: v.index_select(0, index) for k, v in s.items()} for s in self.state]
        kept = index.tolist()
        self._host = {k: [v[i] for i in kept] for k, v in self._host.items()}
        self.hyper = {k: v.index_select(0, index) for k, v in self.hyper.items()}

    def _h(self, name: str, p: torch.Tensor) -> torch.Tensor:
        return self.hyper[name].view(-1, *([1] * (p.dim() - 1)))

    @torch.no_grad()
    def step(self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> None:
        self.steps += 1
        if self.family == "adam":
            # Bias corrections per member in Python floats, as torch's single-tensor Adam computes them.
            b1, b2, lr = self._host["beta1"], self._host["beta2"], self._host["lr"]
            like = params[0]
            step_size = torch.tensor([lr[i] / (1 - b1[i] ** self.steps) for i in range(len(lr))], dtype=like.dtype,
                                     device=like.device)
            bc2_sqrt = torch.tensor([(1 - b2[i] ** self.steps) ** 0.5 for i in range(len(lr))], dtype=like.dtype,
                                    device=like.device)
        any_decay = any(v != 0 for v in self._host["weight_decay"])
        for p, g, state in zip(params, grads, self.state, strict=True):
            lr, wd = self._h("lr", p), self._h("weight_decay", p)
            if self.family == "sgd":
                d = g + wd * p if any_decay else g
                buf = state["momentum_buffer"]
                momentum = self._h("momentum", p)
                if self.steps == 1:
                    buf.copy_(d)  # torch starts the buffer as the first gradient, undamped
                else:
                    buf.mul_(momentum).add_(self._h("1-dampening", p) * d)
                d = d + momentum * buf if self.flags["nesterov"] else buf
                p.sub_(lr * d)
            elif self.family == "rmsprop":
                d = g + wd * p if any_decay else g
                square = state["square_avg"]
                square.mul_(self._h("alpha", p)).add_(self._h("1-alpha", p) * d * d)
                avg = square.sqrt() + self._h("eps", p)
                buf = state["momentum_buffer"]  # momentum 0 leaves buf = d / avg: torch's plain update
                buf.mul_(self._h("momentum", p)).add_(d / avg)
                p.sub_(lr * buf)
            else:
                if any_decay and self.flags["decoupled"]:
                    p.mul_(self._h("1-lr*wd", p))
                    d = g
                else:
                    d = g + wd * p if any_decay else g
                state["exp_avg"].lerp_(d, self._h("1-beta1", p))
                state["exp_avg_sq"].mul_(self._h("beta2", p)).add_(self._h("1-beta2", p) * d * d)
                shape = (-1, *([1] * (p.dim() - 1)))
                denom = state["exp_avg_sq"].sqrt() / bc2_sqrt.view(shape) + self._h("eps", p)
                p.sub_(step_size.view(shape) * (state["exp_avg"] / denom))
