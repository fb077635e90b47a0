"""The optimizer steps of a pack: SGD (momentum, Nesterov), RMSprop, Adam and AdamW on the members' flat parameter
rows, each member with its own optimizer and hyperparameters.

Each member must get exactly the step torch.optim would give it alone, schedules included. So the hyperparameters
are not copied from the config: each member keeps a real torch optimizer of the trial's own class over one dummy
parameter (packing.engine's `_Member`), its real schedule steps that optimizer, and the pack reads lr, momentum,
betas... back from its param_groups. A OneCycleLR that cycles momentum or beta1, a ReduceLROnPlateau fed the
member's own val_loss, a searchlab.optim.Adam with beta1/beta2 as two keys: all come out as alone, with no closed
form to keep in step with torch. The updates are torch's own: its fused kernels (the `fused=True` implementation of
the same formulas) for Adam, AdamW and SGD; RMSprop's single-tensor formula line by line. They differ from the
default for-loop implementation a lone trial runs on a CPU only in rounding (tests/test_pack.py: 1e-5 relative over
30 steps, gradients from 1e-8 to 1).

Members of one pack may use different optimizers (issue 19: a pack explores the optimizer as lone trials do): the
pack keeps the rows of one family (with its flags: Nesterov, decoupled weight decay) next to each other, and
PackedOptimizers runs one PackedOptimizer per such run of rows, on views of the flat rows.
"""

from __future__ import annotations

import itertools
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


def family_key(kind: tuple[str, dict[str, Any]]) -> tuple[str, tuple[tuple[str, Any], ...]]:
    """A hashable key of (family, flags): members with equal keys step under one PackedOptimizer."""
    family, flags = kind
    return family, tuple(sorted(flags.items()))


def read_hyper(optimizer: torch.optim.Optimizer, family: str) -> dict[str, float]:
    """The member's current hyperparameters (after its schedule's changes)."""
    group = optimizer.param_groups[0]
    values = {k: float(group[k]) for k in _HYPER[family] if k in group}
    if family == "adam":
        values["beta1"], values["beta2"] = (float(b) for b in group["betas"])
    return values


class PackedOptimizer:
    """The family's update on the members' flat parameters (one row of a [K, P] tensor per member), bound to them
    (`bind`) and stepped with the gradients as autograd gives them.

    Adam, AdamW and SGD run torch's own fused CPU/GPU kernels (`torch._fused_adam_`, `_fused_adamw_`, `_fused_sgd_`,
    what `fused=True` runs) once per member on its row, with its scalars: one pass over memory instead of the ~15 of
    an elementwise update with per-member hyperparameter tensors (bench/results.md has the measurement).
    RMSprop, which torch has no fused kernel for, runs its single-tensor formula on all members at once, one
    [K, n] part of the rows per network tensor.
    """

    def __init__(self, family: str, flags: dict[str, Any], flat: torch.Tensor,
                 sizes: Sequence[int] | None = None) -> None:
        """`flat`: the members' rows [K, P]; `sizes`: how many of a row's values each of the network's tensors holds,
        in row order (the gradients `step` gets, one tensor per name), all of P when None."""
        self.family, self.flags = family, flags
        self.sizes = list(sizes) if sizes is not None else [flat.shape[1]]
        self.steps = 0
        self._host: dict[str, list[float]] = {}
        self.hyper: dict[str, torch.Tensor] = {}
        names = {"sgd": ("momentum_buffer",), "rmsprop": ("square_avg", "momentum_buffer"),
                 "adam": ("exp_avg", "exp_avg_sq")}[family]
        # Adam's step count, a float tensor as torch keeps it for its fused kernels; the members step together.
        self.load({name: torch.zeros_like(flat) for name in names}, torch.zeros((), device=flat.device), 0)
        self.bind(flat)

    def bind(self, flat: torch.Tensor) -> None:
        """The rows `step` updates (again after the pack's rows were replaced: a checkpoint's)."""
        self.flat, self.param_rows = flat, self._rows(flat)

    def load(self, state: dict[str, torch.Tensor], step_count: torch.Tensor, steps: int) -> None:
        """The optimizer state: each buffer as [K, P] rows, the step count (as torch's fused kernels read it)."""
        self.state, self.step_count, self.steps = state, step_count.to(torch.float32), steps
        self.state_rows = {k: self._rows(v) for k, v in state.items()}

    def state_dict(self) -> dict[str, Any]:
        """The state `load` takes back (tensors as they are: the caller copies them where it keeps them)."""
        return {"state": self.state, "step_count": self.step_count, "steps": self.steps}

    def _rows(self, rows: torch.Tensor) -> list[list[torch.Tensor]]:
        """Each member's row as one 1-D view per tensor of the network: the fused kernels take the gradients as
        autograd gives them (one tensor per name), so they are never copied into [K, P] rows. RMSprop steps
        [K, n] parts of the rows and needs none."""
        if self.family == "rmsprop":
            return []
        return [list(member) for member in zip(*(part.unbind(0) for part in rows.split(self.sizes, dim=1)),
                                                 strict=True)]

    def set_hyper(self, members: Sequence[dict[str, float]], like: torch.Tensor) -> None:
        """The members' current hyperparameters: Python floats for the fused kernels; [K, 1] tensors for RMSprop."""
        self._host = {k: [m[k] for m in members] for k in members[0]}
        if self.family == "rmsprop":
            # Derived values in Python floats, as torch computes them before they meet a tensor: 1 - alpha in
            # float32 is not float32(1 - alpha).
            self._host["1-alpha"] = [1 - v for v in self._host["alpha"]]
            self.hyper = {k: torch.tensor(v, dtype=like.dtype, device=like.device).view(-1, 1)
                          for k, v in self._host.items()}

    def keep(self, index: torch.Tensor, flat: torch.Tensor) -> None:
        """Only the members at `index` (shrinking the pack): their rows of every buffer, bound to `flat`, the
        pack's rows of those members."""
        kept = index.tolist()
        self.load({k: v.index_select(0, index) for k, v in self.state.items()}, self.step_count, self.steps)
        self._host = {k: [v[i] for i in kept] for k, v in self._host.items()}
        self.hyper = {k: v.index_select(0, index) for k, v in self.hyper.items()}
        self.bind(flat)

    @torch.no_grad()
    def step(self, grads: Sequence[torch.Tensor]) -> None:
        """One step of the bound rows; `grads`: one [K, ...] tensor per `sizes` entry, in row order."""
        self.steps += 1
        self.step_count += 1  # torch increments it before its fused kernel, which reads it
        h = self._host
        if self.family == "rmsprop":
            self._rmsprop(grads)
            return
        grad_rows = list(zip(*(g.reshape(len(g), -1).unbind(0) for g in grads), strict=True))
        for k, params in enumerate(self.param_rows):
            if self.family == "adam":
                fused = torch._fused_adamw_ if self.flags["decoupled"] else torch._fused_adam_
                fused(params, list(grad_rows[k]), self.state_rows["exp_avg"][k], self.state_rows["exp_avg_sq"][k],
                      [], [self.step_count] * len(params), amsgrad=False, lr=h["lr"][k], beta1=h["beta1"][k],
                      beta2=h["beta2"][k], weight_decay=h["weight_decay"][k], eps=h["eps"][k], maximize=False,
                      grad_scale=None, found_inf=None)
            else:
                momentum = h["momentum"][k]
                torch._fused_sgd_(params, list(grad_rows[k]),
                                  self.state_rows["momentum_buffer"][k] if momentum else [],
                                  weight_decay=h["weight_decay"][k], momentum=momentum, lr=h["lr"][k],
                                  dampening=h["dampening"][k], nesterov=self.flags["nesterov"], maximize=False,
                                  is_first_step=self.steps == 1, grad_scale=None, found_inf=None)

    def _rmsprop(self, grads: Sequence[torch.Tensor]) -> None:
        """torch's single-tensor RMSprop (not centered) with [K, 1] hyperparameters, on each tensor's [K, n] part."""
        h = self.hyper
        decay = any(self._host["weight_decay"])
        parts = zip(self.flat.split(self.sizes, dim=1), self.state["square_avg"].split(self.sizes, dim=1),
                    self.state["momentum_buffer"].split(self.sizes, dim=1), grads, strict=True)
        for flat, square, buf, grad in parts:
            grad = grad.reshape(len(grad), -1)
            d = grad + h["weight_decay"] * flat if decay else grad
            square.mul_(h["alpha"]).add_(h["1-alpha"] * d * d)
            avg = square.sqrt().add_(h["eps"])
            buf.mul_(h["momentum"]).add_(d / avg)  # momentum 0 leaves buf = d / avg: torch's plain update
            flat.sub_(h["lr"] * buf)


class PackedOptimizers:
    """The pack's optimizer step when members use different optimizers: one PackedOptimizer per run of consecutive
    rows of one family and flags (the pack orders its rows by family, so most often one run per family), each on a
    view of those rows. `kinds`: each row's (family, flags), as optimizer_family gives them."""

    def __init__(self, kinds: Sequence[tuple[str, dict[str, Any]]], flat: torch.Tensor,
                 sizes: Sequence[int] | None = None) -> None:
        self.groups: list[tuple[int, int, PackedOptimizer]] = []
        start = 0
        for _, run in itertools.groupby(kinds, key=family_key):
            size = len(list(run))
            family, flags = kinds[start]
            self.groups.append((start, start + size, PackedOptimizer(family, flags, flat[start:start + size], sizes)))
            start += size

    def state_dict(self) -> list[dict[str, Any]]:
        """Each group's state, in row order (a checkpoint's; `load_state_dict` takes it back)."""
        return [optimizer.state_dict() for _, _, optimizer in self.groups]

    def load_state_dict(self, saved: Sequence[dict[str, Any]], flat: torch.Tensor) -> None:
        """state_dict()'s state, on `flat`'s device, each group bound to its view of `flat` (the restored rows)."""
        for (start, end, optimizer), group in zip(self.groups, saved, strict=True):
            optimizer.load({k: v.to(flat.device) for k, v in group["state"].items()},
                           group["step_count"].to(flat.device), int(group["steps"]))
            optimizer.bind(flat[start:end])

    @property
    def families(self) -> list[str]:
        """Each group's family, in row order."""
        return [optimizer.family for _, _, optimizer in self.groups]

    def set_hyper(self, members: Sequence[dict[str, float]], like: torch.Tensor) -> None:
        """Each row's current hyperparameters (read_hyper of its member), in row order."""
        for start, end, optimizer in self.groups:
            optimizer.set_hyper(members[start:end], like)

    def keep(self, index: torch.Tensor, flat: torch.Tensor) -> None:
        """Only the rows at `index` (ascending, as the pack shrinks): each group keeps its own, bound to its view of
        `flat` (the pack's kept rows); empty groups go."""
        kept = index.tolist()
        groups, start = [], 0
        for begin, end, optimizer in self.groups:
            local = [row - begin for row in kept if begin <= row < end]
            if local:
                optimizer.keep(torch.tensor(local, device=index.device), flat[start:start + len(local)])
                groups.append((start, start + len(local), optimizer))
                start += len(local)
        self.groups = groups

    def step(self, grads: Sequence[torch.Tensor]) -> None:
        """One step of every row; `grads`: the gradients autograd gave, one [K, ...] tensor per network tensor."""
        if len(self.groups) == 1:
            self.groups[0][2].step(grads)
            return
        for start, end, optimizer in self.groups:  # row slices are views: each group updates the pack's rows
            optimizer.step([g[start:end] for g in grads])
