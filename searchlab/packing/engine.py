"""Packed trials: K configurations that share their computation's shape trained at once, as one vectorized model.

A small network leaves the machine idle between its tiny matmuls and pays per-step framework cost; K members in one
process share one forward (torch.func.vmap over functional_call on the members' stacked parameters; searchlab's MLP
by batched matmuls), one backward of their summed losses and one optimizer step over the members' flat parameter
rows (searchlab.packing.optim: torch's fused kernels per member). Each member still trains exactly as alone: the same
initial weights (its network built from its own config and seed), the same batches (the order TensorBatches draws
from its own seed, on its own data split), its own optimizer state and schedule, its own BatchNorm running
statistics, its own L1 strength and dropout rate; it is validated, stopped (pruned, diverged) and reported on its
own. A stopped member leaves the pack at the end of the epoch, so it stops costing compute.

What members may differ in: everything that leaves the computation's shape alone. Their optimizer (its class and
family: SGD, momentum, Nesterov, RMSprop, Adam, AdamW) and every setting of it, their schedule (step, exponential,
cosine, one-cycle, plateau, warm-up..., with its interval, frequency and monitored metric) and every setting of it,
module.l1, model.dropout and the seed: each member builds its own optimizer and schedule from its own config, and
the pack's step runs each family on its members' rows (searchlab.packing.optim.PackedOptimizers). Everything else (the
network, batch size, batch norm, precision, epochs...) must be equal (`pack_mismatch`).

Batches: members of one seed and one data split share one stream of batches [B, ...] (the search's packs: one
seed per study). Members that differ in seed (`searchlab ablate`'s paired seeds) or data split each draw their own
order from their own seed's generator, gathered per step into [K, B, ...] (MemberBatches), and validate on their own
split. Dropout is the one thing not reproduced draw for draw: a member's dropout masks come from the pack's random
stream (vmap randomness="different"), not from the stream it would draw from alone, so its metrics match alone only
in distribution.

trainer.compile (true, or auto on a GPU) runs a step's forward and backward through torch.compile, on a GPU in mode
reduce-overhead (CUDA graphs: a small network's step is dozens of kernel launches, replayed as one). A compile that
fails is redone eagerly, with one line on stderr, and this process's later packs stay eager.
"""

from __future__ import annotations

import json
import pickle
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from types import SimpleNamespace
from typing import Any, NamedTuple

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn
from torch.func import functional_call, vmap

from searchlab.config import EPOCH_SECONDS, PARAMS, ConfigError
from searchlab.config.objectives import diverged, improves
from searchlab.config.targets import resolve_target
from searchlab.data import Splits, TensorBatches, batch_size_for
from searchlab.modules import _Module
from searchlab.packing.optim import PackedOptimizers, family_key, optimizer_family, read_hyper
from searchlab.training.build import (
    DataShape,
    build_network,
    data_shape,
    module_task,
    optimizer_factory,
    schedule_factory,
)
from searchlab.training.checkpoints import rng_states, set_rng_states
from searchlab.training.lightning import TrainResult, Weights, _direction, resolve_precision

# Called after each epoch with (member index, epoch from 1, metrics); returns a reason to stop that member, or None.
MemberHook = Callable[[int, int, dict[str, float]], "str | None"]

# Config subtrees each member builds for itself (a real torch optimizer and schedule per member): members may set
# anything under them differently, the group's choice (optimizer=adam) and _target_ included.
_PER_MEMBER_GROUPS = ("optimizer", "scheduler")
# Leaves each member keeps for itself: its L1 strength and dropout rate (rows of a buffer), its seed (its initial
# weights, its batch order and, where the data entry splits by seed, its data split).
_PER_MEMBER_KEYS = ("module.l1", "model.dropout", "seed")


def _leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_leaves(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def resolved_leaves(cfg: DictConfig, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """_leaves(OmegaConf.to_container(cfg, resolve=True)), ~3x cheaper: the unresolved container, in which only the
    values that hold an interpolation are resolved (OmegaConf's resolve=True dereferences every node). `skip`:
    top-level keys left out."""
    out: dict[str, Any] = {}

    def walk(raw: dict, node: DictConfig, prefix: str) -> None:
        for key, value in raw.items():
            if not prefix and key in skip:
                continue
            if not _interpolates(value):
                out.update(_leaves(value, f"{prefix}{key}."))
            elif isinstance(value, dict):
                walk(value, node[key], f"{prefix}{key}.")
            else:
                resolved = node[key]
                if isinstance(resolved, (DictConfig, ListConfig)):
                    resolved = OmegaConf.to_container(resolved, resolve=True)
                out.update(_leaves(resolved, f"{prefix}{key}."))

    walk(OmegaConf.to_container(cfg, resolve=False), cfg, "")
    return out


def _interpolates(value: Any) -> bool:
    if isinstance(value, str):
        return "${" in value
    if isinstance(value, list):
        return any(_interpolates(v) for v in value)
    if isinstance(value, dict):
        return any(_interpolates(v) for v in value.values())
    return False


def varies_per_member(key: str, value: Any) -> bool:
    """Whether members of one pack may set this dotted config key (or config group choice: `optimizer`,
    `scheduler`) to different values, so that the sampler samples it per member; every other key is shared by the
    pack (fixed for the members after the first). A group's option that also sets keys outside its own subtree
    (a `# @package _global_` option) is caught when the pack forms: pack_mismatch puts such members in packs of
    their own."""
    return key in _PER_MEMBER_KEYS or key.split(".", 1)[0] in _PER_MEMBER_GROUPS


# searchlab's settings around the trainings, which no training reads (what it reads of them, e.g. tracking.metrics in
# module.metrics, comes through an interpolation of a key it does read): ~80% of a config's leaves, equal for every
# configuration one study or ablation packs. Of `study` a training reads only the metric and its direction.
_AROUND_TRAINING = ("study", "search", "report", "tracking", "ablate", "workers")


def shared_key(cfg: DictConfig) -> str:
    """Everything members of a pack must share, as one string: configs of one study or ablation with equal keys
    can share a pack (pack_mismatch says None), so callers can group many configs at once. ~1.8 ms a config where
    all its leaves cost ~2.3; most of the rest is resolving module.metrics' interpolations."""
    leaves = resolved_leaves(cfg, skip=_AROUND_TRAINING)
    leaves.update({key: OmegaConf.select(cfg, key) for key in ("study.metric", "study.direction")})
    return json.dumps({k: v for k, v in sorted(leaves.items()) if not varies_per_member(k, v)}, default=str)


def pack_mismatch(cfgs: Sequence[DictConfig]) -> str | None:
    """The first key that members of a pack must share but do not (one line), or None when they can be packed."""
    first = resolved_leaves(cfgs[0])
    for i, cfg in enumerate(cfgs[1:], start=1):
        other = resolved_leaves(cfg)
        for key in sorted(set(first) | set(other)):
            a, b = first.get(key, "<unset>"), other.get(key, "<unset>")
            if a != b and not (varies_per_member(key, a) and varies_per_member(key, b)):
                return f"members 0 and {i} differ in {key} ({a} vs {b}), which a pack shares"
    return None


# --- trainer.compile ---------------------------------------------------------------------------------------------

# The first failure of torch.compile in this process (one line), or None: later packs do not pay for it again.
_compile_failure: str | None = None


def use_compile(setting: object, device: torch.device) -> bool:
    """trainer.compile -> whether a pack on `device` compiles its step: true always, auto on a GPU only (on a CPU
    there is no launch cost for CUDA graphs to save, and compiling takes longer than a small pack trains)."""
    if not (isinstance(setting, bool) or setting == "auto"):
        raise ConfigError(f"trainer.compile: expected false, true or auto (on a GPU only), got {setting!r}")
    wanted = setting is True or (setting == "auto" and device.type == "cuda")
    return wanted and _compile_failure is None


def compile_step(fn: Callable[..., torch.Tensor], device: torch.device) -> Callable[..., torch.Tensor]:
    """torch.compile of a pack's loss (its backward is compiled with it); on a GPU with CUDA graphs. dynamic=None:
    a pack that shrinks (a member stopped) compiles once more, for any K, not once per K."""
    return torch.compile(fn, mode="reduce-overhead" if device.type == "cuda" else None)


def _compile_failed(err: Exception) -> None:
    global _compile_failure
    if _compile_failure is None:
        text = str(err).strip().splitlines()
        _compile_failure = f"{type(err).__name__}: {text[0] if text else ''}"[:300]
        print(f"searchlab: trainer.compile: torch.compile failed ({_compile_failure}); packs train eagerly",
              file=sys.stderr, flush=True)


class PackedDropout(nn.Module):
    """Dropout whose rate is a buffer, so each member of a pack drops at its own rate under vmap (rate 0: the
    identity, as a member without dropout)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.register_buffer("p", torch.tensor(float(p)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        keep = 1 - self.p
        return x * (torch.rand_like(x) < keep).to(x.dtype) / keep.clamp(min=1e-12)


def _replace_dropout(module: nn.Module) -> int:
    """Swaps every nn.Dropout in place for a PackedDropout; returns how many there were."""
    count = 0
    for name, child in module.named_children():
        if type(child) is nn.Dropout:
            setattr(module, name, PackedDropout(child.p))
            count += 1
        else:
            count += _replace_dropout(child)
    return count


def _dropout_rates(network: nn.Module) -> list[float]:
    return [float(m.p) for m in network.modules() if type(m) is nn.Dropout]


class MlpLayer(NamedTuple):
    """One Linear layer of searchlab's MLP as the batched-matmul path runs it: its parameters' names, the name of
    the BatchNorm1d after it (None: none) and of the dropout-rate buffer after its ReLU (None: no dropout)."""

    weight: str
    bias: str
    norm: str | None = None
    rate: str | None = None


def _mlp_layers(template: nn.Module) -> list[MlpLayer] | None:
    """The template's layers when it is searchlab's MLP (its layers: Flatten, then per hidden layer Linear, optional
    BatchNorm1d, ReLU, optional Dropout, then Linear); else None."""
    from searchlab.networks import MLP

    if type(template) is not MLP:
        return None
    layers: list[MlpLayer] = []
    for name, module in template.named_children():
        if isinstance(module, nn.Linear):
            layers.append(MlpLayer(f"{name}.weight", f"{name}.bias"))
        elif isinstance(module, nn.BatchNorm1d):
            if not (module.affine and module.track_running_stats and module.momentum is not None):
                return None
            layers[-1] = layers[-1]._replace(norm=name)
        elif isinstance(module, PackedDropout):
            layers[-1] = layers[-1]._replace(rate=f"{name}.p")
    return layers


def _seeded_network(cfg: DictConfig, shape: DataShape) -> nn.Module:
    """The member's network with the weights a lone trial starts from: fit_rank seeds everything, then builds."""
    pl.seed_everything(cfg.seed, verbose=False)
    return build_network(cfg, shape)


def _structure_cfg(cfgs: Sequence[DictConfig]) -> DictConfig:
    """Member 0's config with the largest dropout of the pack, so the template network holds every Dropout layer a
    member may need (networks build Dropout only for a rate above 0); member 0's own when its rate is the largest
    (a copy of a whole config costs more than the pack's other set-up)."""
    rates = [OmegaConf.select(c, "model.dropout", default=None) for c in cfgs]
    if not (all(isinstance(r, (int, float)) for r in rates) and max(rates) > 0 and max(rates) != rates[0]):
        return cfgs[0]
    cfg = pickle.loads(pickle.dumps(cfgs[0]))  # as DictConfig.copy(), several times cheaper
    OmegaConf.update(cfg, "model.dropout", max(rates), merge=False)
    return cfg


def _module_class(cfg: DictConfig) -> type[_Module]:
    target = resolve_target(cfg.module, "module")
    # searchlab's own classes only: a subclass may override its steps, which the pack would silently skip.
    if not (isinstance(target, type) and issubclass(target, _Module) and target.__module__ == _Module.__module__):
        raise ValueError(f"module: packed trials train searchlab's classifier and regressor, not {cfg.module._target_} "
                         "(a module of your own trains one trial at a time)")
    return target


def _check_same_sizes(member_splits: Sequence[Splits]) -> None:
    """Members' data splits must agree in every tensor's shape: one step gathers a batch of each, one validation
    evaluates all of them."""
    def shapes(s: Splits) -> list[tuple[int, ...] | None]:
        return [None if t is None else tuple(t.shape) for t in (s.x_train, s.y_train, s.x_val, s.y_val, s.x_test,
                                                                s.y_test)]

    first = shapes(member_splits[0])
    for i, splits in enumerate(member_splits[1:], start=1):
        if shapes(splits) != first:
            raise ValueError(f"members 0 and {i} have data splits of different sizes ({first} vs {shapes(splits)}), "
                             "which a pack needs equal")


class MemberBatches:
    """Each member's own training batches, gathered per step into [K, B, ...]: the order TensorBatches(x, y,
    batch_size, shuffle=True, seed=its seed) gives the member's lone training, over its own training split.

    Members with equal seeds draw one permutation per epoch from one generator (seeded as TensorBatches seeds its
    own: the same orders), members with the same split index one stacked copy of it; each step is one gather.
    """

    def __init__(self, member_splits: Sequence[Splits], seeds: Sequence[int], batch_size: int, n_batches: int) -> None:
        distinct = list({id(s): s for s in member_splits}.values())
        self.x = torch.stack([s.x_train for s in distinct])  # [S, N, ...]
        self.y = torch.stack([s.y_train for s in distinct])
        device = self.x.device
        self.seeds = list(dict.fromkeys(seeds))
        self.generators = [torch.Generator(device=device).manual_seed(seed) for seed in self.seeds]
        # Per row (member in the pack's row order): which split, which seed's permutation.
        self.split_rows = torch.tensor([[id(d) for d in distinct].index(id(s)) for s in member_splits], device=device)
        self.seed_rows = torch.tensor([self.seeds.index(seed) for seed in seeds], device=device)
        self.distinct = distinct
        self._stacked: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # val, test: each distinct split's, stacked
        self.batch_size, self.n_batches = batch_size, n_batches

    def __len__(self) -> int:
        return self.n_batches

    def keep(self, index: torch.Tensor) -> None:
        """Only the rows at `index` (the pack shrinks); every seed's generator keeps drawing, as alone."""
        self.split_rows = self.split_rows.index_select(0, index)
        self.seed_rows = self.seed_rows.index_select(0, index)

    def rows_of(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(x [K, N, ...], y [K, N]) of each row's own `split` ("val" or "test")."""
        if split not in self._stacked:
            self._stacked[split] = (torch.stack([getattr(s, f"x_{split}") for s in self.distinct]),
                                    torch.stack([getattr(s, f"y_{split}") for s in self.distinct]))
        xs, ys = self._stacked[split]
        return xs[self.split_rows], ys[self.split_rows]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n, size = self.x.shape[1], self.batch_size
        orders = torch.stack([torch.randperm(n, device=self.x.device, generator=g) for g in self.generators])
        # [K, N]: each row's permutation, as indices into the splits' samples laid end to end: index_select on one
        # flat tensor (0.6 ms a step for 20 x 128 digits samples on the 2-core CPU; 9 ms indexing [S, N] by two
        # index tensors).
        orders = orders[self.seed_rows] + (self.split_rows * n).unsqueeze(1)
        x, y = self.x.flatten(0, 1), self.y.flatten(0, 1)
        for i in range(self.n_batches):
            index = orders[:, i * size:(i + 1) * size]
            rows = index.shape
            yield (x.index_select(0, index.reshape(-1)).view(*rows, *x.shape[1:]),
                   y.index_select(0, index.reshape(-1)).view(*rows, *y.shape[1:]))


class _Member:
    """What one member keeps for itself: its config, a real optimizer over one dummy parameter driven by its real
    schedule (the source of its lr, momentum, betas each step), its latest validation metrics, its result."""

    def __init__(self, cfg: DictConfig, epochs: int, steps_per_epoch: int) -> None:
        self.cfg = cfg
        self.optimizer = optimizer_factory(cfg)([nn.Parameter(torch.zeros(1))])
        self.kind = optimizer_family(self.optimizer)  # (family, flags); ValueError for what the pack cannot step
        self.schedule = schedule_factory(cfg, SimpleNamespace(max_epochs=epochs,
                                                              estimated_stepping_batches=steps_per_epoch * epochs))
        self.interval, self.frequency = "epoch", 1
        self.scheduler = None
        if self.schedule is not None:
            self.scheduler = self.schedule(self.optimizer)
            self.optimizer.step()  # no gradient, no change: only so torch's schedule sees its optimizer in use
            self.interval = self.schedule.lightning.get("interval", "epoch")
            self.frequency = int(self.schedule.lightning.get("frequency", 1))
        if self.plateau and self.interval == "step" and self.frequency < steps_per_epoch:
            # Lightning steps it after every `frequency`-th step with the monitored metric, which exists only after
            # the epoch's validation: a lone training raises at its first such step (MisconfigurationException).
            raise ValueError(f"scheduler.interval=step: ReduceLROnPlateau reads {self.monitor}, which exists only "
                             f"after the epoch's validation, and steps every {self.frequency} of the epoch's "
                             f"{steps_per_epoch} steps (alone, Lightning raises at the first); use interval: epoch")
        self.result = TrainResult(engine="packed")
        self.l1 = float(OmegaConf.select(cfg, "module.l1", default=0.0) or 0.0)
        self.latest: dict[str, float] | None = None  # the member's metrics of its last validation
        self.final_state: dict[str, torch.Tensor] | None = None

    @property
    def plateau(self) -> bool:
        return isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)

    @property
    def monitor(self) -> str:
        return "val_loss" if self.schedule is None else self.schedule.lightning.get("monitor", "val_loss")

    def step_schedule(self, interval: str, index: int, plateau: bool) -> bool:
        """Steps the schedule when it runs at this interval, in Lightning's order (its training epoch loop): after
        each optimizer step the step schedules, after the epoch's last step the epoch schedules (both before
        validation, `plateau` False); after each step's validation check the plateau schedules of interval step, and
        after the epoch the plateau schedules of interval epoch (`plateau` True), on the member's latest validation
        metrics (between validations: the last epoch's, as Lightning's callback_metrics hold them). `index`: the step
        in the epoch or the epoch, from 1; as Lightning, a schedule of frequency n steps when n divides it. True
        when it stepped."""
        if self.scheduler is None or self.interval != interval or self.plateau != plateau:
            return False
        if index % self.frequency:
            return False
        if plateau:
            assert self.latest is not None, "a plateau schedule steps after a validation (checked when built)"
            self.scheduler.step(self.latest[self.monitor])
        else:
            self.scheduler.step()
        return True


class PackedTraining:
    """K configurations trained as one vectorized model on resident Splits (see the module's docstring).

    `run_epoch()` trains the members still in the pack one epoch, validates each and returns their metrics;
    `stop(member, reason)` takes a member out (its weights stay as they are); `fit(on_epoch)` runs all epochs and
    returns one TrainResult per member, as searchlab.training.lightning.fit_rank returns for a lone trial.
    """

    def __init__(self, cfgs: Sequence[DictConfig], splits: Splits | Sequence[Splits], metric: str | None = None,
                 path: str = "auto", grouped: bool = False) -> None:
        """`splits`: the resident data (on the training device) every member trains on, or one Splits per member
        (in config order: each seed's own split, as `searchlab train` of that config loads it). `grouped`: the
        caller formed the pack from configs of one `shared_key`, so pack_mismatch (one resolve of every config, the
        pack's largest cost before its first step) is not run again."""
        if not cfgs:
            raise ValueError("a pack needs at least one member")
        if not isinstance(splits, Splits) and len(splits) != len(cfgs):
            raise ValueError(f"a pack of {len(cfgs)} members was given {len(splits)} data splits")
        mismatch = None if grouped or len(cfgs) == 1 else pack_mismatch(cfgs)
        if mismatch:
            raise ValueError(mismatch)
        cfg = cfgs[0]
        if cfg.trainer.devices > 1:
            raise ValueError("trainer.devices > 1 (DDP) trains one trial at a time; packed trials run on one device")
        self.module_class = _module_class(cfg)
        self.task = module_task(cfg)
        self.member_splits = [s.for_task(self.task) for s in ([splits] * len(cfgs) if isinstance(splits, Splits)
                                                             else splits)]
        self.splits = self.member_splits[0]
        _check_same_sizes(self.member_splits)
        self.device = self.splits.x_train.device
        self.metric = metric or cfg.study.metric
        self.direction = _direction(cfg, self.metric)
        self.epochs = int(cfg.trainer.max_epochs)
        precision = resolve_precision(cfg.trainer.precision, self.device)
        if precision not in ("32-true", "32", "bf16-mixed"):
            raise ValueError(f"trainer.precision={precision}: packed trials train in 32-true or bf16-mixed")
        self.bf16 = precision == "bf16-mixed"
        for key in ("trainer.max_time", "trainer.early_stopping_patience"):
            if OmegaConf.select(cfg, key, default=None) is not None:
                raise ValueError(f"{key}: not implemented for packed trials yet (a member would ignore it)")
        self.eval_batch_size = int(cfg.trainer.eval_batch_size)
        batch_size = batch_size_for(cfg.data.batch_size, len(self.splits.x_train))
        if OmegaConf.select(cfg, "model.batch_norm", default=False) and batch_size == 1:
            raise ValueError("model.batch_norm=true needs data.batch_size > 1: BatchNorm cannot train on one sample")
        # The lone training's batches (of member 0's seed and split): all members' when they share both.
        lone_batches = TensorBatches(self.splits.x_train, self.splits.y_train, batch_size, shuffle=True, seed=cfg.seed)
        self.batch_size = batch_size
        limit = cfg.trainer.limit_train_batches
        n = len(lone_batches)
        self.steps_per_epoch = (n if limit is None else min(n, int(limit)) if isinstance(limit, int)
                                else int(n * float(limit)))
        self.shape = data_shape(self.splits, self.task)
        self.members = [_Member(c, self.epochs, self.steps_per_epoch) for c in cfgs]
        # Its loss and epoch_metrics: the metrics a lone trial of the config computes (module.metrics).
        metrics = OmegaConf.select(cfg, "module.metrics")  # only that node resolved: the whole module's costs ~1 ms
        self.loss_module = self.module_class(net=nn.Identity(), optimizer=None, metrics=OmegaConf.to_container(
            metrics, resolve=True) if isinstance(metrics, (DictConfig, ListConfig)) else metrics)
        # Member indices still in the pack, in row order: the members of one optimizer family (and flags) side by
        # side, in config order within it, so that each family steps once over its rows (PackedOptimizers).
        first_seen: dict[Any, int] = {}
        for member in self.members:
            first_seen.setdefault(family_key(member.kind), len(first_seen))
        self.active = sorted(range(len(cfgs)), key=lambda i: first_seen[family_key(self.members[i].kind)])
        self.epoch = 0
        # One batch stream for all when every member has the same seed and split (no gather per step); else each
        # member's own order over its own split (MemberBatches), [K, B, ...] per step.
        self.shared_batches = len({id(s) for s in self.member_splits}) == 1 and len({c.seed for c in cfgs}) == 1
        self.train_batches: TensorBatches | MemberBatches = lone_batches if self.shared_batches else MemberBatches(
            [self.member_splits[i] for i in self.active], [int(cfgs[i].seed) for i in self.active], batch_size,
            len(lone_batches))
        self._build(cfgs, path)
        self.compiled = use_compile(OmegaConf.select(cfg, "trainer.compile", default=False), self.device)
        self._compiled_loss = compile_step(self._loss, self.device) if self.compiled else None
        self.optimizer = PackedOptimizers([self.members[i].kind for i in self.active], self.flat,
                                          [shape.numel() for shape in self.param_shapes])
        self._refresh_hyper()

    # --- building ---------------------------------------------------------------------------------------------

    def _build(self, cfgs: Sequence[DictConfig], path: str) -> None:
        """Each member's lone network (its config, its seed: its initial weights) laid out as one row of a flat
        [K, P] tensor; its buffers (BatchNorm statistics) and dropout rates stacked per name. `path`: "vmap" (any
        network), "mlp" (searchlab's MLP, by batched matmuls) or "auto" (mlp where it applies)."""
        built: dict[str, nn.Module] = {}  # members with the same network config and seed start from the same weights

        def alone_of(cfg: DictConfig) -> nn.Module:
            key = f"{id(cfg)}" if len(cfgs) == 1 else OmegaConf.to_yaml(cfg.model) + f"seed={cfg.seed}"
            return built.get(key) or built.setdefault(key, _seeded_network(cfg, self.shape))

        # The structure's network (member 0's, built once for both, unless another member's dropout is larger): its
        # weights are read with the members' below, then it becomes the pack's template (dropout swapped, on meta).
        structure = alone_of(_structure_cfg(cfgs))
        shapes = [p.shape for p in structure.parameters()]
        slots = len(_dropout_rates(structure))
        rows, member_buffers, self.rates = [], [], []
        self.lone_names: dict[int, tuple[list[str], list[str]]] = {}  # per member: its lone network's state names
        for member in self.active:  # in row order
            cfg = cfgs[member]
            alone = alone_of(cfg)
            if [p.shape for p in alone.parameters()] != shapes:
                raise ValueError("members' networks differ in their parameters' shapes, which a pack shares")
            rates = _dropout_rates(alone)
            if len(rates) not in (0, slots):
                raise ValueError("members' networks differ in their dropout layers, which a pack shares")
            self.rates.append(rates or [0.0] * slots)
            rows.append(torch.cat([p.detach().reshape(-1) for p in alone.parameters()]))
            member_buffers.append([b.detach() for _, b in alone.named_buffers()])
            self.lone_names[member] = ([n for n, _ in alone.named_parameters()], [n for n, _ in alone.named_buffers()])
        template = structure
        _replace_dropout(template)
        self.mlp_layers = _mlp_layers(template) if path in ("auto", "mlp") else None
        if path == "mlp" and self.mlp_layers is None:
            raise ValueError("path='mlp' needs searchlab.networks.MLP")
        # Each BatchNorm1d's momentum and eps (the batched path's _batch_norm reads them), by its name.
        self.norm_modules = {n: m for n, m in template.named_children() if isinstance(m, nn.BatchNorm1d)}
        self.path = "mlp" if self.mlp_layers is not None else "vmap"
        drop_names = [f"{n}.p" if n else "p" for n, m in template.named_modules() if isinstance(m, PackedDropout)]
        self.param_names = [n for n, _ in template.named_parameters()]
        self.param_shapes = shapes
        self.buffer_names = [n for n, _ in template.named_buffers() if n not in drop_names]
        self.flat = torch.stack(rows).to(self.device)
        self.buffers = {name: torch.stack([m[i] for m in member_buffers]).to(self.device)
                        for i, name in enumerate(self.buffer_names)}
        for j, name in enumerate(drop_names):
            self.buffers[name] = torch.tensor([r[j] for r in self.rates], device=self.device)
        self.template = template.to("meta")
        self.dropout = any(r > 0 for rates in self.rates for r in rates)
        self._views()

        def loss_of(p: dict, b: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                return self.loss_module.loss(functional_call(self.template, (p, b), (x,)), y)

        def output_of(p: dict, b: dict, x: torch.Tensor) -> torch.Tensor:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                return functional_call(self.template, (p, b), (x,)).float()

        randomness = "different" if self.dropout else "error"
        data = None if self.shared_batches else 0  # x, y: one batch for all members, or one per member
        self._loss = vmap(loss_of, in_dims=(0, 0, data, data), randomness=randomness)
        self._output = vmap(output_of, in_dims=(0, 0, data), randomness=randomness)
        if self.path == "mlp":
            self._loss, self._output = self._mlp_loss, self._mlp_output

    def _mlp_forward(self, x: torch.Tensor, training: bool) -> torch.Tensor:
        """searchlab's MLP for all members by batched matmuls: [K, N, outputs]: the same arithmetic as vmap without
        vmap's per-call cost, which dominates small packs (`make bench` part packing compares the two).

        Activations are kept transposed, [K, features, N] (each layer W @ h + b): autograd then gives each weight's
        gradient as a contiguous [K, out, in], the layout of the rows the optimizer steps, where h @ W^T would give
        a transposed one that costs a copy per step (~10% of a pack's step on a CPU: bench part packing)."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            if self.shared_batches:
                h = x.flatten(1).t().expand(len(self.flat), -1, -1)
            else:
                h = x.flatten(2).transpose(1, 2)
            for i, layer in enumerate(self.mlp_layers):
                h = torch.baddbmm(self.params[layer.bias].unsqueeze(2), self.params[layer.weight], h)
                if i == len(self.mlp_layers) - 1:
                    break
                if layer.norm is not None:
                    h = self._batch_norm(h, layer.norm, training)
                h = h.relu()
                if layer.rate is not None and training and self.dropout:
                    keep = (1 - self.buffers[layer.rate]).view(-1, 1, 1)
                    h = h * (torch.rand_like(h) < keep).to(h.dtype) / keep.clamp(min=1e-12)
            return h.transpose(1, 2)

    def _batch_norm(self, h: torch.Tensor, name: str, training: bool) -> torch.Tensor:
        """Each member's BatchNorm1d on its rows of h [K, F, N], as torch's own kernel: the members' features as the
        K*F channels of one [1, K*F, N] batch (statistics over the N samples), so each channel's statistics are one
        member's, and the running statistics [K, F] are updated in place through their flat views."""
        k, features, n = h.shape
        module = self.norm_modules[name]
        running_mean, running_var = self.buffers[f"{name}.running_mean"], self.buffers[f"{name}.running_var"]
        out = F.batch_norm(h.reshape(1, k * features, n), running_mean.view(-1), running_var.view(-1),
                           self.params[f"{name}.weight"].reshape(-1), self.params[f"{name}.bias"].reshape(-1),
                           training, module.momentum, module.eps)
        if training:
            self.buffers[f"{name}.num_batches_tracked"].add_(1)
        return out.view(k, features, n)

    def _mlp_loss(self, params: dict, buffers: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = self._mlp_forward(x, training=True)
        if self.task == "classification":
            k, n, classes = out.shape
            targets = y.repeat(k) if self.shared_batches else y.reshape(-1)
            return F.cross_entropy(out.reshape(k * n, classes), targets, reduction="none").view(k, n).mean(1)
        return vmap(self.loss_module.loss, in_dims=(0, None if self.shared_batches else 0))(out, y)

    def _mlp_output(self, params: dict, buffers: dict, x: torch.Tensor) -> torch.Tensor:
        return self._mlp_forward(x, training=False).float()

    def _views(self) -> None:
        """The members' parameters as [K, *shape] views of the flat rows: the network reads them, autograd gives
        their gradients, and the optimizer updates the flat rows in place underneath."""
        self.params, offset = {}, 0
        for name, shape in zip(self.param_names, self.param_shapes, strict=True):
            size = shape.numel()
            self.params[name] = self.flat[:, offset:offset + size].view(len(self.flat), *shape).requires_grad_(True)
            offset += size
        self.penalized = [n for n, shape in zip(self.param_names, self.param_shapes, strict=True) if len(shape) > 1]

    def _refresh_hyper(self) -> None:
        self.optimizer.set_hyper([read_hyper(self.members[i].optimizer, self.members[i].kind[0])
                                  for i in self.active],
                                 self.flat)

    # --- training ---------------------------------------------------------------------------------------------

    def _l1(self) -> torch.Tensor | None:
        l1 = [self.members[i].l1 for i in self.active]
        if not any(l1):
            return None
        strength = torch.tensor(l1, dtype=torch.float32, device=self.device)
        penalty = sum(self.params[n].abs().flatten(1).sum(1) for n in self.penalized)
        return strength * penalty

    def _train_epoch(self) -> torch.Tensor:
        """One epoch of steps; returns each row's summed data loss times samples (the lone train_loss sum)."""
        self.template.train()
        sums = torch.zeros(len(self.active), device=self.device)
        count = 0
        views = list(self.params.values())
        for i, (x, y) in enumerate(self.train_batches):
            if i >= self.steps_per_epoch:
                break
            losses, grads = self._step_grads(x, y, views)
            sums += losses.detach().float() * len(y)
            count += len(y)
            self.optimizer.step(grads)
            if any([self.members[m].step_schedule("step", i + 1, plateau=False) for m in self.active]):
                self._refresh_hyper()
        if any([self.members[m].step_schedule("epoch", self.epoch, plateau=False) for m in self.active]):
            self._refresh_hyper()
        return sums / max(count, 1)

    def _step_grads(self, x: torch.Tensor, y: torch.Tensor,
                    views: list[torch.Tensor]) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """A step's forward and backward: each row's data loss and the gradients of the views; through the compiled
        loss when the pack compiles, redone eagerly (and eager from then on) when compiling fails."""
        if self._compiled_loss is not None:
            try:
                if self.device.type == "cuda":  # CUDA graphs may reuse the last step's outputs: all copied by now
                    torch.compiler.cudagraph_mark_step_begin()
                return self._grads(self._compiled_loss, x, y, views)
            except Exception as err:  # no compiler, an op torch.compile cannot trace...: the eager step is exact
                self._compiled_loss = None
                _compile_failed(err)
        return self._grads(self._loss, x, y, views)

    def _grads(self, loss: Callable[..., torch.Tensor], x: torch.Tensor, y: torch.Tensor,
               views: list[torch.Tensor]) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        losses = loss(self.params, self.buffers, x, y)
        penalty = self._l1()
        total = losses if penalty is None else losses + penalty
        # A diverged member's NaN stays its own: its rows get no gradient, the others' sum stays finite.
        total = torch.where(torch.isfinite(total), total, torch.zeros_like(total)).sum()
        return losses, torch.autograd.grad(total, views)

    @torch.no_grad()
    def _validate(self) -> list[dict[str, float]]:
        """Each row's val metrics: on the one val split ([Nv, ...]), or on each row's own ([K, Nv, ...])."""
        self.template.eval()
        size = self.eval_batch_size
        if self.shared_batches:
            x, y = self.splits.x_val, self.splits.y_val
            chunks = [x[i:i + size] for i in range(0, len(x), size)]
        else:
            x, y = self.train_batches.rows_of("val")
            chunks = [x[:, i:i + size] for i in range(0, x.shape[1], size)]
        outputs = torch.cat([self._output(self.params, self.buffers, chunk) for chunk in chunks], dim=1)
        metrics = [self.loss_module.epoch_metrics("val", outputs[row], y if self.shared_batches else y[row])
                   for row in range(len(self.active))]
        names = list(metrics[0])
        values = torch.stack([torch.stack([m[k].float() for k in names]) for m in metrics]).tolist()
        return [dict(zip(names, row, strict=True)) for row in values]

    def run_epoch(self, on_epoch: MemberHook | None = None) -> dict[int, dict[str, float]]:
        """Trains and validates the members still in the pack for one epoch; returns {member: metrics} (with
        train_loss and lr, as a lone trial's history). A member that diverged (non-finite train_loss or metric), or
        that `on_epoch` says to stop, leaves the pack with that reason."""
        start = time.perf_counter()
        self.epoch += 1
        train = self._train_epoch().tolist()
        validated = self._validate()
        # The two metrics every epoch has (searchlab.config.objectives): a member's share of the pack's epoch time.
        always = {PARAMS: float(self.flat.shape[1]), EPOCH_SECONDS: (time.perf_counter() - start) / len(self.active)}
        out: dict[int, dict[str, float]] = {}
        for row, member_index in enumerate(list(self.active)):
            member = self.members[member_index]
            # Lightning's order: the step's validation, the plateau schedule of interval step (on the epoch's last
            # step), the epoch's metrics with the lr as it is now, then the plateau schedule of interval epoch.
            member.latest = {**validated[row], "train_loss": train[row]}
            member.step_schedule("step", self.steps_per_epoch, plateau=True)
            metrics = {**member.latest, "lr": member.optimizer.param_groups[0]["lr"], **always}
            member.result.history.append(metrics)
            out[member_index] = metrics
            self._keep_best(member_index, row, metrics)
            reason = diverged(metrics, self.metric, self.epoch)
            if on_epoch is not None:
                reason = on_epoch(member_index, self.epoch, metrics) or reason
            if reason:
                self.stop(member_index, reason)
            else:
                member.step_schedule("epoch", self.epoch, plateau=True)
        self._refresh_hyper_if_rows()
        elapsed = time.perf_counter() - start
        for member_index in out:  # the epoch's time split evenly among the members that trained in it
            self.members[member_index].result.seconds += elapsed / len(out)
        return out

    def _refresh_hyper_if_rows(self) -> None:
        if self.active:
            self._refresh_hyper()

    def stop(self, member: int, reason: str) -> None:
        """Takes a member out of the pack: its weights stay those of its last epoch, its result keeps `reason`;
        the pack shrinks so that it costs nothing further."""
        if member not in self.active:
            return
        m = self.members[member]
        m.final_state = self.member_state(member)
        if not m.result.stop_reason:
            m.result.stop_reason = reason
        row = self.active.index(member)
        keep = [r for r in range(len(self.active)) if r != row]
        self.active.pop(row)
        if not keep:
            return
        index = torch.tensor(keep, device=self.device)
        self.flat = self.flat.index_select(0, index)
        self.buffers = {k: v.index_select(0, index) for k, v in self.buffers.items()}
        if isinstance(self.train_batches, MemberBatches):
            self.train_batches.keep(index)
        self._views()
        self.optimizer.keep(index, self.flat)

    def fit(self, on_epoch: MemberHook | None = None) -> list[TrainResult]:
        """All epochs (or until every member has stopped); one TrainResult per member, in config order."""
        while self.epoch < self.epochs and self.active:
            self.run_epoch(on_epoch)
        for member in list(self.active):
            self.members[member].final_state = self.member_state(member)
        return [m.result for m in self.members]

    # --- checkpoints (a lone trial on the engine: searchlab.packing.lone) -----------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything the next epoch depends on, as CPU copies: the members' rows, buffers, optimizer state, each
        member's torch optimizer and schedule, history and best weights, the batch order's generators and the RNG
        states (dropout). For a pack whose members all train (a lone trial's)."""
        if len(self.active) != len(self.members):
            raise ValueError("a pack with stopped members has no state to resume")
        cpu = {"device": "cpu", "copy": True}
        batches = self.train_batches
        generators = [batches.generator] if isinstance(batches, TensorBatches) else batches.generators
        return {
            "epoch": self.epoch,
            "flat": self.flat.detach().to(**cpu),
            "buffers": {k: v.to(**cpu) for k, v in self.buffers.items()},
            "optimizers": [{"state": {k: v.to(**cpu) for k, v in group["state"].items()},
                            "step_count": group["step_count"].to(**cpu), "steps": group["steps"]}
                           for group in self.optimizer.state_dict()],
            "members": [{"optimizer": m.optimizer.state_dict(), "latest": m.latest, "history": list(m.result.history),
                         "weights": m.result.weights, "seconds": m.result.seconds,
                         "scheduler": None if m.scheduler is None else m.scheduler.state_dict()}
                        for m in self.members],
            "generators": [g.get_state() for g in generators],
            "rng": rng_states(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores state_dict()'s state into a pack built from the same configs and data: training goes on from
        the epoch after the saved one, as if it had not stopped."""
        self.epoch = int(state["epoch"])
        self.flat = state["flat"].to(self.device)
        self.buffers = {k: v.to(self.device) for k, v in state["buffers"].items()}
        self._views()
        self.optimizer.load_state_dict(state["optimizers"], self.flat)
        for member, saved in zip(self.members, state["members"], strict=True):
            member.optimizer.load_state_dict(saved["optimizer"])
            if member.scheduler is not None and saved["scheduler"] is not None:
                member.scheduler.load_state_dict(saved["scheduler"])
            member.latest = saved["latest"]
            member.result.history[:] = saved["history"]
            member.result.weights, member.result.seconds = saved["weights"], float(saved["seconds"])
        batches = self.train_batches
        generators = [batches.generator] if isinstance(batches, TensorBatches) else batches.generators
        for generator, saved in zip(generators, state["generators"], strict=True):
            generator.set_state(saved)
        set_rng_states(state["rng"])
        self._refresh_hyper()

    # --- members' weights -------------------------------------------------------------------------------------

    def member_state(self, member: int) -> dict[str, torch.Tensor]:
        """The member's network state_dict as its lone network names it (CPU copies): its own weights, to load into
        build_network(cfg) of its own config."""
        if member not in self.active:
            state = self.members[member].final_state
            assert state is not None
            return state
        row = self.active.index(member)
        param_names, buffer_names = self.lone_names[member]
        values = [v[row] for v in self.params.values()] + [self.buffers[n][row] for n in self.buffer_names]
        return {n: v.detach().to("cpu", copy=True) for n, v in zip(param_names + buffer_names, values, strict=True)}

    @torch.no_grad()
    def test_metrics(self, member: int) -> dict[str, float]:
        """The member's test metrics as its lone training reports them (searchlab.training.fit with test=True): its
        best epoch's weights on its own test split, through the module's epoch_metrics; {} for a member stopped
        early (pruned, diverged) or data without a test split, as alone."""
        m, splits = self.members[member], self.member_splits[member]
        if m.result.stop_reason or splits.x_test is None or splits.y_test is None:
            return {}
        state = ({k.removeprefix("net."): v for k, v in m.result.weights.state.items()} if m.result.weights
                 else self.member_state(member))
        network = build_network(m.cfg, self.shape)
        network.load_state_dict(state)
        network.to(self.device).eval()
        x, size = splits.x_test, self.eval_batch_size
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            outputs = torch.cat([network(x[i:i + size]).float() for i in range(0, len(x), size)])
        metrics = self.loss_module.epoch_metrics("test", outputs, splits.y_test)
        return {k: float(v) for k, v in metrics.items()}

    def _keep_best(self, member: int, row: int, metrics: dict[str, float]) -> None:
        """As training.lightning's _BestWeights: a copy of the module's state_dict ("net." keys) on an improving
        epoch."""
        value = metrics.get(self.metric)
        result = self.members[member].result
        best = result.weights
        if not improves(value, None if best is None else best.value, self.direction == "maximize"):
            return
        state = {f"net.{k}": v for k, v in self.member_state(member).items()}
        result.weights = Weights(state, self.epoch, value)


def can_pack(cfg: DictConfig, splits: Splits | None) -> str | None:
    """Why cfg cannot train in a pack (one line), or None: builds a pack of two copies and trains it on one batch,
    so a network torch.func cannot vectorize, an optimizer the pack does not implement, or a user's module is found
    before the first trial. `splits` None (a LightningDataModule `data`) cannot be packed: the members' one shared
    batch stream is TensorBatches over resident tensors."""
    if splits is None:
        return "data: packed trials need in-memory data (data=digits, synthetic, npz or a function returning Splits)"
    probe = cfg.copy()
    OmegaConf.update(probe, "trainer.limit_train_batches", 1, merge=False)
    OmegaConf.update(probe, "trainer.max_epochs", 1, merge=False)
    try:
        pack = PackedTraining([probe, probe.copy()], splits)
        pack.run_epoch()
    except Exception as err:  # the reason is the answer
        text = str(err).strip().splitlines()
        return f"{type(err).__name__}: {text[0] if text else ''}"
    return None
