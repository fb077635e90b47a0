"""`searchlab ablate`'s seeds as a pack: members that differ in seed (and in optimizer, schedule, L1...) train as one
pack, each with its own seed's initial weights, data split and batch order, so that each equals its lone training.

Tolerance: float32 on the CPU, no dropout (a member's dropout masks come from the pack's stream: a match in
distribution only). Packed and lone trainings take the same batches from the same weights and differ only in the
order of floating-point operations: per-epoch val_loss and train_loss within 1e-4 relative, learning rates exactly;
accuracy within one flipped prediction of the 360 in a val or test split (3e-3). The test that members differing
only in seed get different curves is what makes the match meaningful: a pack that fed every member member 0's
batches (or split) would fail the match by far more than 1e-4.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import run_cli
from omegaconf import OmegaConf

from searchlab.ablate.command import FINALIST, Plan, Variant, pack_size
from searchlab.config import Composer
from searchlab.data import TensorBatches
from searchlab.packing.engine import MemberBatches, PackedTraining, pack_mismatch, varies_per_member
from searchlab.study import load_study
from searchlab.training.build import load_data
from searchlab.training.lightning import fit_rank as fit  # a lone trial on Lightning: the reference

REL = 1e-4
DISCRETE = 3e-3  # one flipped prediction of 360
BASE = ["trainer.max_epochs=3", "trainer.limit_train_batches=6", "model.width=32", "study.metric=val_loss"]
pytestmark = pytest.mark.usefixtures("one_thread")


def _alone(cfg):
    """What `searchlab train` of the config gives: its own seed's split (load_data), test metrics included."""
    return fit(cfg, load_data(cfg), test=True)


def _close_curves(packed: list[dict], alone: list[dict]) -> None:
    assert len(packed) == len(alone)
    for p, a in zip(packed, alone, strict=True):
        for key in ("val_loss", "train_loss"):
            assert p[key] == pytest.approx(a[key], rel=REL), key
        assert p["lr"] == a["lr"]
        assert p["val_acc"] == pytest.approx(a["val_acc"], abs=DISCRETE)


@pytest.mark.parametrize("path", ["mlp", "vmap"])
def test_packed_seeds_equal_their_lone_trainings(composer: Composer, path: str) -> None:
    """Three seeds of one configuration and two seeds of an optimizer variant, as ablate packs them: each member's
    per-epoch metrics and test metrics equal its lone training's."""
    members = [{"optimizer": "adam", "optimizer.lr": 0.003, "scheduler": "cosine", "seed": s} for s in (0, 1, 2)]
    members += [{"optimizer": "momentum", "optimizer.lr": 0.05, "module.l1": 1e-4, "seed": s} for s in (0, 1)]
    cfgs = [composer(m) for m in members]
    assert pack_mismatch(cfgs) is None
    pack = PackedTraining(cfgs, [load_data(c) for c in cfgs], path=path)
    assert not pack.shared_batches and pack.path == path
    results = pack.fit()
    for i, (cfg, result) in enumerate(zip(cfgs, results, strict=True)):
        alone = _alone(cfg)
        _close_curves(result.history, alone.history)
        assert result.best_epoch == alone.best_epoch
        tested = pack.test_metrics(i)
        assert set(tested) == set(alone.test) and "test_acc" in tested
        assert tested["test_loss"] == pytest.approx(alone.test["test_loss"], rel=REL)
        assert tested["test_acc"] == pytest.approx(alone.test["test_acc"], abs=DISCRETE)


def test_members_differing_only_in_seed_draw_their_own_batches_and_curves(composer: Composer) -> None:
    cfgs = [composer({"seed": 0}), composer({"seed": 1})]
    splits = [load_data(c) for c in cfgs]
    assert varies_per_member("seed", 1) and pack_mismatch(cfgs) is None
    pack = PackedTraining(cfgs, splits)
    batches = pack.train_batches
    assert isinstance(batches, MemberBatches)
    x, y = next(iter(batches))
    for row, (cfg, split) in enumerate(zip(cfgs, splits, strict=True)):  # each row: its lone first batch, exactly
        lone_x, lone_y = next(iter(TensorBatches(split.x_train, split.y_train, pack.batch_size, shuffle=True,
                                                 seed=cfg.seed)))
        assert torch.equal(x[row], lone_x) and torch.equal(y[row], lone_y)
    assert not torch.equal(x[0], x[1])
    results = PackedTraining(cfgs, splits).fit()
    losses = [[m["val_loss"] for m in r.history] for r in results]
    assert all(abs(a - b) > 1e-3 * abs(b) for a, b in zip(*losses, strict=True))


def test_same_seed_members_keep_the_shared_batch_stream(composer: Composer) -> None:
    cfgs = [composer({"optimizer.lr": lr}) for lr in (0.001, 0.01)]
    assert PackedTraining(cfgs, load_data(cfgs[0])).shared_batches


def test_a_pruned_seed_leaves_the_pack_and_the_others_stay_exact(composer: Composer) -> None:
    cfgs = [composer({"seed": s}) for s in (0, 1, 2)]
    results = PackedTraining(cfgs, [load_data(c) for c in cfgs]).fit(
        lambda member, epoch, metrics: "pruned" if member == 1 and epoch == 1 else None)
    assert results[1].stop_reason == "pruned" and len(results[1].history) == 1
    for i in (0, 2):
        _close_curves(results[i].history, _alone(cfgs[i]).history)


# ---- plateau on interval step (it never stepped in a pack) ----

PLATEAU = {"optimizer": "sgd", "optimizer.lr": 0.1, "scheduler": "plateau", "scheduler.patience": 0,
           "scheduler.mode": "max"}  # mode max on a falling val_loss: it steps down every time it is stepped


def _plateau_on_steps(composer: Composer, **values):
    """conf/scheduler/plateau.yaml with `interval: step` (Lightning's setting, a key the option does not set)."""
    cfg = composer({**PLATEAU, **values})
    OmegaConf.update(cfg, "scheduler.interval", "step", force_add=True)
    return cfg


def test_plateau_on_interval_step_steps_in_a_pack_as_alone(composer: Composer) -> None:
    """One step per epoch (limit_train_batches=1): Lightning steps the plateau schedule after that step's validation;
    so must the pack, member by member (the second member with another factor and seed)."""
    cfgs = [_plateau_on_steps(composer, **{"trainer.limit_train_batches": 1, "trainer.max_epochs": 4, **m})
            for m in ({}, {"scheduler.factor": 0.2, "seed": 1})]
    results = PackedTraining(cfgs, [load_data(c) for c in cfgs]).fit()
    for cfg, result in zip(cfgs, results, strict=True):
        alone = _alone(cfg)
        lrs = [m["lr"] for m in result.history]
        assert lrs == [m["lr"] for m in alone.history]
        assert lrs[-1] < lrs[0]  # it stepped
        _close_curves(result.history, alone.history)


def test_plateau_stepping_before_the_first_validation_is_refused_as_alone(composer: Composer) -> None:
    """Every step of 6 per epoch: its first step comes before any val_loss exists; Lightning raises there, and the
    pack refuses the member when it is built (one line naming the key)."""
    cfg = _plateau_on_steps(composer)
    with pytest.raises(Exception, match="not available"):
        _alone(cfg)
    with pytest.raises(ValueError, match="scheduler.interval=step") as err:
        PackedTraining([cfg, composer({"seed": 1})], load_data(cfg))
    assert "\n" not in str(err.value)


# ---- the command: packed and one at a time agree; what cannot be packed trains alone ----

def test_ablate_pack_must_be_a_positive_integer(store_overrides: list[str]) -> None:
    code, _, err = run_cli("ablate", "study.name=x", "ablate.pack=0", *store_overrides)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "ablate.pack: expected an integer >= 1" in err, err


@pytest.mark.parametrize(("override", "reason"), [("trainer.max_time=00:00:10:00", "trainer.max_time"),
                                                  ("trainer.precision=16-mixed", "precision")])
def test_an_unpackable_winner_trains_alone_with_one_line(capsys, override: str, reason: str) -> None:
    overrides = (*BASE, override)
    plan = Plan("x", "val_loss", "minimize", "test_loss", [0, 1], [Variant("trial-0", FINALIST, "trial 0",
                                                                           overrides, 0, 0.1)])
    assert pack_size(plan, 8) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ablate.pack=8" in err[0] and reason in err[0] and "runs alone" in err[0], err
    assert pack_size(plan, 8, quiet=True) == 1 and capsys.readouterr().err == ""
    assert pack_size(Plan("x", "val_loss", "minimize", "test_loss", [0], [Variant(
        "trial-0", FINALIST, "trial 0", tuple(BASE), 0, 0.1)]), 8) == 8


# A study of 3 trials without dropout (so packed and lone trainings match closely), shapes fixed but batch norm.
STUDY = ["trainer.max_epochs=2", "trainer.limit_train_batches=5", "model.width=32", "model.depth=1", "model.dropout=0",
         "data.batch_size=32", "study.metric=val_loss", "study.n_trials=3", "study.pruner=none",
         "tracking.log_models=none"]
ABLATE = ["ablate.seeds=2", "ablate.top_k=1", "ablate.variants=[batch_norm,l1,weight_decay]"]


def _stores(root: Path) -> list[str]:
    return [f"study.storage={root}/optuna.journal", f"tracking.uri=sqlite:///{root}/mlflow.db",
            f"tracking.artifact_root={root}/artifacts", f"report.dir={root}/reports", "study.name=tiny"]


@pytest.mark.slow
def test_ablate_packed_gives_the_verdict_of_one_at_a_time(tmp_path: Path) -> None:
    """The same tiny study ablated with packs of 8 and one training at a time: one run per (variant, seed), the
    same configurations, seeds and verdict shape, and each objective equal within the tolerance."""
    study = tmp_path / "study"
    code, _, err = run_cli("search", *STUDY, *_stores(study))
    assert code == 0, err
    results, outs = {}, {}
    for pack in (1, 8):
        root = tmp_path / f"pack{pack}"
        root.mkdir()
        for name in ("optuna.journal", "mlflow.db"):
            (root / name).write_bytes((study / name).read_bytes())
        code, outs[pack], err = run_cli("ablate", *ABLATE, f"ablate.pack={pack}", *_stores(root))
        assert code == 0, err
        results[pack] = json.loads((root / "reports" / "tiny" / "ablation.json").read_text())
        ablation = load_study(f"{root}/optuna.journal", "tiny.ablation")
        pairs = [(t.user_attrs["variant"], t.user_attrs["seed"]) for t in ablation.trials if t.state.name == "COMPLETE"]
        assert len(pairs) == len(set(pairs)) == results[pack]["runs"]["planned"] == len(ablation.trials)
    assert "packs of up to 8" in outs[8] and "packs of" not in outs[1]
    one, packed = results[1], results[8]
    assert [e["variant"] for e in one["effects"]] == [e["variant"] for e in packed["effects"]]
    assert one["seeds"] == packed["seeds"] and one["runs"] == packed["runs"]
    assert [e["verdict"] for e in one["effects"]] == [e["verdict"] for e in packed["effects"]]
    rows = [(r["values"], q["values"]) for r, q in zip(one["finalists"] + one["effects"],
                                                         packed["finalists"] + packed["effects"], strict=True)]
    for alone, in_pack in rows:
        assert alone.keys() == in_pack.keys()
        for seed in alone:
            assert in_pack[seed] == pytest.approx(alone[seed], rel=REL)
