"""Packed trials (searchlab.packing): every member trains as it would alone.

Tolerance: float32 on the CPU; packed and lone runs take the same batches from the same initial weights, and differ
only in the order of floating-point operations (batched matmuls, fused multiply-adds in torch's optimizers). Per-epoch
losses agree within 1e-5 relative after 3 epochs, learning rates exactly; accuracy, F1 and AUROC, which move in
steps when two nearly equal scores swap, within one flipped prediction (see DISCRETE).
"""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from searchlab.config import Composer
from searchlab.optim import Adam, AdamW
from searchlab.packing.engine import PackedTraining, can_pack, pack_mismatch, shared_key, varies_per_member
from searchlab.packing.optim import PackedOptimizer, optimizer_family, read_hyper
from searchlab.training.lightning import fit_rank as fit  # a lone trial on Lightning: the reference

REL, ABS = 1e-5, 1e-6
# Metrics of orderings and argmaxes move in steps when two nearly equal scores swap: one flipped val prediction is
# 1/360 of val_acc; one swapped pair of scores moves val_auroc by ~1e-5.
DISCRETE = {"val_acc": 3e-3, "val_f1": 3e-3, "val_auroc": 1e-4}
# Small and quick: digits, a 2x32 MLP, 3 epochs of at most 6 steps.
BASE = ["trainer.max_epochs=3", "trainer.limit_train_batches=6", "model.width=32", "study.metric=val_loss",
        "tracking.metrics=[val_f1,val_auroc]"]  # every metric of the classifier, packed and alone
pytestmark = pytest.mark.usefixtures("one_thread")


def _same(packed: list[dict[str, float]], alone: list[dict[str, float]]) -> None:
    assert len(packed) == len(alone)
    for p, a in zip(packed, alone, strict=True):
        assert set(p) == set(a)
        for key in set(a) - {"epoch_seconds"}:  # a clock reading
            assert p[key] == pytest.approx(a[key], rel=REL, abs=DISCRETE.get(key, ABS)), key


def _member_values(optimizer: str) -> list[dict]:
    """Three members that differ in every number the optimizer has (lr, weight decay, momentum, betas, alpha)."""
    # Learning rates that train steadily: in a chaotic regime (RMSprop at lr 0.03 here) any float noise grows.
    lrs = (0.05, 0.02, 0.1) if optimizer in ("sgd", "momentum", "nesterov") else (0.003, 0.001, 0.01)
    members = [{"optimizer.lr": lr, "optimizer.weight_decay": wd, "module.l1": l1}
               for lr, wd, l1 in zip(lrs, (0.0, 1e-3, 1e-4), (0.0, 1e-4, 0.0), strict=True)]
    for member, (momentum, beta1, alpha) in zip(members, ((0.9, 0.9, 0.99), (0.5, 0.8, 0.9), (0.0, 0.95, 0.95)),
                                                strict=True):
        if optimizer in ("momentum", "nesterov"):
            member["optimizer.momentum"] = max(momentum, 0.3)  # nesterov needs momentum > 0
        if optimizer == "rmsprop":
            member.update({"optimizer.momentum": momentum, "optimizer.alpha": alpha})
        if optimizer in ("adam", "adamw"):
            member["optimizer.beta1"] = beta1
    return members


def _check_against_alone(composer: Composer, digits, choices: dict, members: list[dict],
                         path: str = "auto") -> PackedTraining:
    cfgs = [composer({**choices, **m}) for m in members]
    pack = PackedTraining(cfgs, digits, path=path)
    results = pack.fit()
    for cfg, result in zip(cfgs, results, strict=True):
        alone = fit(cfg, digits)
        _same(result.history, alone.history)
        assert result.stop_reason == alone.stop_reason
        assert result.best_epoch == alone.best_epoch
    return pack


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "nesterov", "rmsprop", "adam", "adamw"])
def test_each_optimizer_matches_alone(composer: Composer, digits, optimizer: str) -> None:
    _check_against_alone(composer, digits, {"optimizer": optimizer}, _member_values(optimizer))


def test_the_general_vmap_path_matches_alone_too(composer: Composer, digits) -> None:
    """The MLP trains by batched matmuls by default; vmap over functional_call, every other network's path, is
    held to the same standard on it."""
    assert _check_against_alone(composer, digits, {"optimizer": "adam"}, _member_values("adam")).path == "mlp"
    assert _check_against_alone(composer, digits, {"optimizer": "adam"}, _member_values("adam"),
                                path="vmap").path == "vmap"


# Each schedule with another optimizer, so that onecycle also cycles RMSprop's momentum, plateau sees Adam's loss.
@pytest.mark.parametrize(("scheduler", "optimizer"), [
    ("step", "sgd"), ("exponential", "momentum"), ("cosine", "nesterov"), ("onecycle", "rmsprop"),
    ("plateau", "adam"), ("warmup_cosine", "adamw"), ("onecycle", "adam")])
def test_each_schedule_matches_alone(composer: Composer, digits, scheduler: str, optimizer: str) -> None:
    members = _member_values(optimizer)[:2]
    extra = {"step": {"scheduler.step_size": 1}, "plateau": {"scheduler.patience": 0},
             "warmup_cosine": {"scheduler.warmup_epochs": 1}}.get(scheduler, {})
    _check_against_alone(composer, digits, {"optimizer": optimizer, "scheduler": scheduler, **extra}, members)


@pytest.mark.parametrize(("path", "runs"), [("auto", "mlp"), ("vmap", "vmap")])
def test_batch_norm_members_keep_their_own_statistics(composer: Composer, digits, path: str, runs: str) -> None:
    """The MLP's batched matmuls run torch's batch norm kernel on the members' features side by side; vmap runs
    each member's BatchNorm1d: both as alone, running statistics per member."""
    pack = _check_against_alone(composer, digits, {"optimizer": "momentum", "model.batch_norm": True},
                                _member_values("momentum")[:2], path=path)
    assert pack.path == runs
    states = [pack.member_state(i) for i in range(2)]
    assert not torch.equal(states[0]["2.running_mean"], states[1]["2.running_mean"])


def test_cnn_members_with_batch_norm_match_alone(composer: Composer, digits) -> None:
    """With momentum SGD. Under vmap a conv runs grouped over the members, whose sums round in another order; Adam
    divides each step by the root of the squared gradients, so on this near-chance CNN it grows those last-bit
    differences to ~3e-4 in val_loss by epoch 3 (SGD keeps them at 1e-6): noise, not a different training."""
    pack = _check_against_alone(composer, digits, {"model": "cnn", "model.width": 4, "model.batch_norm": True,
                                                   "optimizer": "momentum"}, _member_values("momentum")[:2])
    assert pack.path == "vmap"


def test_member_state_loads_into_its_own_network(composer: Composer, digits) -> None:
    """A member's weights as its lone network names them (dropout layers and all), for export and `train`."""
    cfgs = [composer({"model.dropout": d}) for d in (0.0, 0.3)]
    pack = PackedTraining(cfgs, digits)
    pack.fit()
    from searchlab.training.build import build_network
    for i, cfg in enumerate(cfgs):
        build_network(cfg, pack.shape).load_state_dict(pack.member_state(i))
        assert pack.members[i].result.weights is not None


def test_pruned_member_keeps_its_weights_and_the_others_match_alone(composer: Composer, digits) -> None:
    cfgs = [composer({"optimizer": "adam", **m}) for m in _member_values("adam")]
    pack = PackedTraining(cfgs, digits)
    at_stop: dict[str, torch.Tensor] = {}

    def prune(member: int, epoch: int, metrics: dict[str, float]) -> str | None:
        if member == 1 and epoch == 1:
            at_stop.update(pack.member_state(1))
            return "pruned at epoch 1"
        return None

    results = pack.fit(prune)
    assert results[1].stop_reason == "pruned at epoch 1" and len(results[1].history) == 1
    assert all(torch.equal(at_stop[k], v) for k, v in pack.member_state(1).items())
    _same(results[1].history, fit(cfgs[1], digits).history[:1])
    for i in (0, 2):
        assert results[i].stop_reason is None
        _same(results[i].history, fit(cfgs[i], digits).history)
    assert len(pack.active) == 2  # the pruned member left the pack


def test_diverged_member_ends_alone(composer: Composer, digits) -> None:
    members = [{"optimizer.lr": 0.05}, {"optimizer.lr": 1e6}, {"optimizer.lr": 0.01}]
    cfgs = [composer({"optimizer": "sgd", **m}) for m in members]
    results = PackedTraining(cfgs, digits).fit()
    alone = [fit(cfg, digits) for cfg in cfgs]
    assert results[1].stop_reason is not None and results[1].stop_reason.startswith("diverged")
    assert results[1].stop_reason == alone[1].stop_reason
    for i in (0, 2):
        assert results[i].stop_reason is None
        _same(results[i].history, alone[i].history)
        assert all(math.isfinite(v) for m in results[i].history for v in m.values())


@pytest.mark.parametrize(("cls", "settings"), [
    (torch.optim.SGD, {"lr": [0.1, 0.01, 0.05], "momentum": [0.9, 0.0, 0.5], "weight_decay": [0.0, 1e-2, 1e-4]}),
    (torch.optim.SGD, {"lr": [0.1, 0.01, 0.05], "momentum": [0.9, 0.5, 0.2], "nesterov": [True] * 3,
                       "dampening": [0.0] * 3}),
    (torch.optim.RMSprop, {"lr": [1e-3, 1e-2, 3e-3], "alpha": [0.99, 0.9, 0.5], "momentum": [0.0, 0.9, 0.5],
                           "weight_decay": [0.0, 1e-2, 1e-4]}),
    (Adam, {"lr": [1e-3, 1e-2, 3e-3], "beta1": [0.9, 0.5, 0.99], "beta2": [0.999, 0.9, 0.99],
            "weight_decay": [0.0, 1e-2, 1e-4]}),
    (AdamW, {"lr": [1e-3, 1e-2, 3e-3], "beta1": [0.9, 0.5, 0.99], "weight_decay": [0.0, 1e-1, 1e-2]}),
])
@pytest.mark.parametrize("sizes", [None, [8, 12]], ids=["one tensor", "two tensors"])
def test_packed_optimizer_steps_as_torch_optim(cls: type, settings: dict, sizes: list[int] | None) -> None:
    """Member by member against the torch optimizer, on gradients from 1e-8 to 1 (where Adam amplifies noise), given
    as one [K, P] tensor or as the network's tensors ([K, 2, 4] and [K, 12]: autograd's, never copied into rows)."""
    generator = torch.Generator().manual_seed(0)
    start = torch.randn(3, 4, 5, generator=generator)
    alone = [nn.Parameter(start[i].clone()) for i in range(3)]
    optimizers = [cls([p], **{k: v[i] for k, v in settings.items()}) for i, p in enumerate(alone)]
    family, flags = optimizer_family(optimizers[0])
    packed = start.clone().view(3, -1)  # the members' flat rows
    stepper = PackedOptimizer(family, flags, packed, sizes)
    stepper.set_hyper([read_hyper(o, family) for o in optimizers], packed)
    for _ in range(30):
        grad = torch.randn(3, 4, 5, generator=generator) * 10.0 ** torch.randint(-8, 1, (3, 1, 1), generator=generator)
        for i, p in enumerate(alone):
            p.grad = grad[i].clone()
            optimizers[i].step()
        rows = grad.view(3, -1)
        stepper.step([rows] if sizes is None else [rows[:, :8].reshape(3, 2, 4).clone(), rows[:, 8:].clone()])
    for i, p in enumerate(alone):
        torch.testing.assert_close(packed[i].view_as(p), p.detach(), rtol=1e-5, atol=1e-6)


class ItemNet(nn.Module):
    """A network whose control flow depends on its weights' values, which vmap cannot vectorize."""

    def __init__(self, input_shape: list[int], num_outputs: int) -> None:
        super().__init__()
        self.linear = nn.Linear(math.prod(input_shape), num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        return self.linear(x) if self.linear.weight.sum().item() > 0 else -self.linear(x)


def test_refusals_name_the_reason(composer: Composer, digits) -> None:
    assert can_pack(composer({}), digits) is None
    assert can_pack(composer({"model": "cnn", "model.width": 4, "model.batch_norm": True}), digits) is None
    item = composer({})
    item.model = OmegaConf.create({"_target_": f"{__name__}.ItemNet"})
    reason = can_pack(item, digits)
    assert reason is not None and ".item()" in reason and "\n" not in reason
    assert "DDP" in can_pack(composer({"trainer.devices": 2}), digits)
    assert "in-memory data" in can_pack(composer({}), None)
    assert "max_time" in can_pack(composer({"trainer.max_time": "00:00:10:00"}), digits)
    assert "precision" in can_pack(composer({"trainer.precision": "16-mixed"}), digits)
    assert "not Adagrad" in can_pack(composer({"optimizer": "sgd", "optimizer._target_": "torch.optim.Adagrad"}),
                                     digits)
    assert "module" in can_pack(composer({"module._target_": "pytorch_lightning.LightningModule"}), digits)
    assert pack_mismatch([composer({}), composer({"optimizer.lr": 0.1})]) is None
    assert varies_per_member("optimizer.lr", 0.1) and varies_per_member("model.dropout", 0.2)
    assert not varies_per_member("model.width", 64) and not varies_per_member("data.batch_size", 32)
    assert "model.width" in pack_mismatch([composer({}), composer({"model.width": 16})])
    assert pack_mismatch([composer({}), composer({"optimizer": "sgd"})]) is None  # tests/packing/test_pack_mixed.py


def test_shared_key_groups_what_a_pack_may_share(composer: Composer) -> None:
    """Configs that may share a pack have one key (what members draw alone, and the study's settings around the
    trainings, left out); a shared key, the metric a pack reads, or a value that reaches the training through an
    interpolation from those settings gives another."""
    base = shared_key(composer({}))
    assert shared_key(composer({"optimizer": "sgd", "optimizer.lr": 0.1, "model.dropout": 0.3})) == base
    assert shared_key(composer({"study.n_trials": 7, "report.top_k": 2, "tracking.flush_seconds": 1})) == base
    assert shared_key(composer({"model.width": 16})) != base
    assert shared_key(composer({"data.batch_size": 32})) != base
    assert shared_key(composer({"study.metric": "val_acc"})) != base  # BASE: val_loss
    assert shared_key(composer({"tracking.metrics": ["val_f1"]})) != base  # module.metrics reads it (BASE: two)


def test_bench_packing_part_smoke() -> None:
    """`python -m bench --parts packing` at a tiny size: every way timed, the table well-formed (no timing checks)."""
    from bench.packing import packing_markdown, run_packing

    result = run_packing("digits", [1, 2], repeats=1, extra=["model.width=16", "trainer.max_epochs=1",
                                                              "trainer.limit_train_batches=2"], threads=1)
    assert set(result.seconds) == {"plain", "lightning", "pack 1", "pack 2"}
    assert all(len(v) == 1 and v[0] > 0 for v in result.seconds.values())
    text = packing_markdown(result)
    assert "| (c) pack K=2 |" in text and "| (a) plain PyTorch loop, one trial |" in text


def test_regressor_members_match_alone(composer: Composer, digits) -> None:
    _check_against_alone(composer, digits, {"module": "regressor", "optimizer": "adam"}, _member_values("adam")[:2])


def test_mlp_paths_measure_both_ways() -> None:
    from bench.packing import mlp_paths, mlp_paths_markdown

    paths = mlp_paths([1, 2], repeats=1, steps=1)
    assert all(paths[name][k] > 0 for name in ("vmap", "bmm") for k in (1, 2))
    assert "| K=1 | K=2 |" in mlp_paths_markdown(paths)


@pytest.mark.parametrize("batch_norm", [False, True], ids=["plain", "batch-norm"])
def test_a_bf16_pack_on_the_cpu_computes_in_bf16_and_follows_lightnings_bf16_mixed(composer: Composer, digits,
                                                                                     batch_norm: bool) -> None:
    """trainer.precision=bf16-mixed (a GPU's default) through the CPU's autocast, so the GPU's path runs here: the
    pack's matmuls give bf16 (the dtype check: on these losses fp32 would pass too), and each member's per-epoch
    losses follow its lone Lightning bf16-mixed training within bf16's rounding (8 bits of mantissa, products summed
    in another order: up to 0.3% apart here; 1% asserted)."""
    cfgs = [composer({"optimizer": "adam", "trainer.precision": "bf16-mixed", "model.batch_norm": batch_norm, **m})
            for m in _member_values("adam")[:2]]
    pack = PackedTraining(cfgs, digits)
    assert pack.bf16 and pack.path == "mlp"
    assert pack._mlp_forward(digits.x_val[:8], training=False).dtype == torch.bfloat16
    for packed, cfg in zip(pack.fit(), cfgs, strict=True):
        alone = fit(cfg, digits)
        for p, a in zip(packed.history, alone.history, strict=True):
            for key in ("train_loss", "val_loss"):
                assert p[key] == pytest.approx(a[key], rel=1e-2), key
            assert p["val_acc"] == pytest.approx(a["val_acc"], abs=2e-2)
