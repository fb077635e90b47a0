"""Packs whose members differ in their optimizer family and schedule family (issue 19): each member still trains as
it would alone.

Tolerance as test_pack.py (its helpers): float32 on the CPU, the same batches from the same initial weights;
per-epoch losses within 1e-5 relative (1e-6 absolute), learning rates as exactly, accuracy, F1 and AUROC within one
flipped prediction (test_pack.DISCRETE).
"""

from __future__ import annotations

import pytest
import torch
from omegaconf import open_dict
from test_pack import BASE, _member_values, _same  # noqa: F401 (BASE: read by conftest's composer fixture)
from torch import nn

from searchlab.config import Composer
from searchlab.optim import Adam, AdamW
from searchlab.packing.engine import PackedTraining, pack_mismatch, varies_per_member
from searchlab.packing.optim import PackedOptimizers, optimizer_family, read_hyper
from searchlab.training.lightning import fit_rank as fit  # a lone trial on Lightning: the reference

pytestmark = pytest.mark.usefixtures("one_thread")

# (optimizer, scheduler, schedule settings): the families interleaved, so that the pack reorders its rows by family;
# one-cycle at step interval (cycling Adam's beta1 and RMSprop's momentum), plateau in mode max on val_loss (which
# falls: the lr halves after every epoch, from each member's own val_loss), an epoch schedule of frequency 2.
MEMBERS = [
    ("adam", "onecycle", {}),
    ("sgd", "step", {"scheduler.step_size": 1}),
    ("rmsprop", "plateau", {"scheduler.patience": 0, "scheduler.mode": "max"}),
    ("adam", "step", {"scheduler.step_size": 2}),
    ("nesterov", "cosine", {}),
    ("adamw", "warmup_cosine", {"scheduler.warmup_epochs": 1}),
    ("momentum", "exponential", {"scheduler.frequency": 2}),
    ("rmsprop", "onecycle", {}),
    ("adam", "plateau", {"scheduler.patience": 0, "scheduler.mode": "max"}),
]


def _mixed_cfgs(composer: Composer) -> list:
    cfgs = []
    for i, (optimizer, scheduler, settings) in enumerate(MEMBERS):
        values = _member_values(optimizer)[i % 3]
        cfg = composer({"optimizer": optimizer, "scheduler": scheduler, **values,
                        **{k: v for k, v in settings.items() if k != "scheduler.frequency"}})
        if "scheduler.frequency" in settings:  # a Lightning setting no option sets: added as a user would
            with open_dict(cfg):
                cfg.scheduler.frequency = settings["scheduler.frequency"]
        cfgs.append(cfg)
    return cfgs


def test_a_pack_mixing_optimizer_and_schedule_families_matches_each_member_alone(composer: Composer,
                                                                                    digits) -> None:
    """Nine members, six optimizers (five families with their flags), seven schedules; two leave the pack early
    (the only AdamW member after epoch 1, an Adam member from the middle of its family's rows after epoch 2), so
    the family groups shrink and one disappears while the others keep matching."""
    cfgs = _mixed_cfgs(composer)
    assert pack_mismatch(cfgs) is None
    pack = PackedTraining(cfgs, digits)
    assert pack.active != sorted(pack.active)  # rows grouped by family, not in config order
    assert pack.optimizer.families == ["adam", "sgd", "rmsprop", "sgd", "adam"]  # adam, sgd, rmsprop, nesterov, adamw
    stops = {(5, 1), (3, 2)}
    results = pack.fit(lambda member, epoch, metrics: "pruned" if (member, epoch) in stops else None)
    assert pack.optimizer.families == ["adam", "sgd", "rmsprop", "sgd"]  # the AdamW group is gone
    assert sorted(pack.active) == [0, 1, 2, 4, 6, 7, 8]
    lrs = []
    for i, (cfg, result) in enumerate(zip(cfgs, results, strict=True)):
        alone = fit(cfg, digits)
        epochs = next((e for m, e in stops if m == i), len(alone.history))
        assert len(result.history) == epochs
        _same(result.history, alone.history[:epochs])
        lrs.append([m["lr"] for m in result.history])
    # Plateau in mode max: epoch 2's val_loss is no higher than epoch 1's, so each lr is cut after epoch 2's
    # validation (after that epoch's lr was logged).
    assert lrs[2][2] < lrs[2][1] == lrs[2][0] and lrs[8][2] < lrs[8][1] == lrs[8][0]
    assert len(set(lrs[6])) == 2  # exponential at frequency 2: stepped once in 3 epochs


def test_packed_optimizers_step_mixed_members_as_torch_optim() -> None:
    """Mixed classes in row runs, against each member's torch optimizer over 30 steps (gradients from 1e-8 to 1),
    with members dropped midway: a whole run (the RMSprop one) and one row inside another."""
    generator = torch.Generator().manual_seed(0)
    settings = [(Adam, {"lr": 1e-3, "beta1": 0.8}), (Adam, {"lr": 1e-2, "weight_decay": 1e-2}),
                (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}), (torch.optim.SGD, {"lr": 0.05}),
                (torch.optim.RMSprop, {"lr": 1e-3, "momentum": 0.5}),
                (torch.optim.SGD, {"lr": 0.1, "momentum": 0.5, "nesterov": True}),
                (AdamW, {"lr": 3e-3, "weight_decay": 0.1})]
    start = torch.randn(len(settings), 4, 5, generator=generator)
    alone = [nn.Parameter(start[i].clone()) for i in range(len(settings))]
    optimizers = [cls([p], **kw) for (cls, kw), p in zip(settings, alone, strict=True)]
    kinds = [optimizer_family(o) for o in optimizers]
    packed = start.clone().view(len(settings), -1)
    stepper = PackedOptimizers(kinds, packed)
    assert stepper.families == ["adam", "sgd", "rmsprop", "sgd", "adam"]
    rows = list(range(len(settings)))  # the member of each row
    for step in range(30):
        if step == 10:  # drop the RMSprop run and the first SGD row
            keep = [r for r, m in enumerate(rows) if m not in (4, 2)]
            packed = packed[keep]
            stepper.keep(torch.tensor(keep), packed)
            rows = [rows[r] for r in keep]
            assert stepper.families == ["adam", "sgd", "sgd", "adam"]
        stepper.set_hyper([read_hyper(optimizers[m], kinds[m][0]) for m in rows], packed)
        grad = torch.randn(len(settings), 4, 5, generator=generator) * 10.0 ** torch.randint(
            -8, 1, (len(settings), 1, 1), generator=generator)
        for m in rows:
            alone[m].grad = grad[m].clone()
            optimizers[m].step()
        stepper.step([grad[rows].view(len(rows), -1)])
    for r, m in enumerate(rows):
        torch.testing.assert_close(packed[r].view_as(alone[m]), alone[m].detach(), rtol=1e-5, atol=1e-6)


def test_optimizer_and_schedule_choices_vary_per_member_and_the_network_does_not(composer: Composer,
                                                                                   digits) -> None:
    assert varies_per_member("optimizer", "adam") and varies_per_member("scheduler", "onecycle")
    assert varies_per_member("optimizer._target_", "torch.optim.SGD") and varies_per_member("optimizer.nesterov", True)
    assert varies_per_member("scheduler.interval", "step") and varies_per_member("scheduler.monitor", "val_acc")
    assert not varies_per_member("model", "cnn") and not varies_per_member("model.batch_norm", True)
    assert not varies_per_member("data.batch_size", 32) and not varies_per_member("trainer.precision", "bf16-mixed")
    assert pack_mismatch([composer({"optimizer": "sgd"}), composer({"optimizer": "adam", "scheduler": "plateau"})]) \
        is None
    assert "model" in pack_mismatch([composer({}), composer({"model": "cnn"})])
    assert "data.batch_size" in pack_mismatch([composer({}), composer({"data.batch_size": 16})])
    # A member whose optimizer the pack cannot step is refused, naming it, whatever the others use.
    adagrad = composer({"optimizer": "sgd", "optimizer._target_": "torch.optim.Adagrad"})
    with pytest.raises(ValueError, match="not Adagrad"):
        PackedTraining([composer({"optimizer": "adam"}), adagrad], digits)
