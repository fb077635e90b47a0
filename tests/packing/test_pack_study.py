"""study.pack=K in a real study: members are trials (own params, MLflow runs, pruning, budget), the sampler fixes the
keys a pack shares, a member's command re-trains it alone, workers and a SIGKILL treat members as trials, and the
configurations a pack cannot train are refused before any store is written."""

from __future__ import annotations

import collections
import contextlib
import io
import math
import os
import signal
import subprocess
from pathlib import Path

import optuna
import pytest
from helpers import FINISHED, SEARCHLAB, assert_one_run_per_trial, load_study, runs_of, wait_for_running
from omegaconf import OmegaConf

from searchlab.attrs import RETRY_OF
from searchlab.cli import main
from searchlab.commands import _prepare
from searchlab.modules import Classifier
from searchlab.packing.engine import pack_mismatch, varies_per_member
from searchlab.study.pack_trials import shared_params
from searchlab.training.lightning import fit_rank as fit  # a lone trial on Lightning: the reference

# No dropout (a member's dropout masks come from the pack's random stream, so only dropout-free members reproduce
# exactly); per member: its optimizer family (of two) and schedule family (of three), lr, weight decay and L1; the
# width is shared by a pack.
SPACE = """\
optimizer:
  choices:
    sgd: {}
    adam:
      optimizer.beta1: {low: 0.8, high: 0.95}
scheduler: {choices: [constant, onecycle, plateau]}
optimizer.lr: {low: 1.0e-3, high: 0.1, log: true}
optimizer.weight_decay: {low: 1.0e-6, high: 1.0e-3, log: true}
module.l1: {low: 1.0e-7, high: 1.0e-4, log: true}
model.width: {choices: [16, 32]}
"""
SMALL = ["trainer.max_epochs=3", "data.batch_size=64", "model.depth=1"]


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("conf")
    (folder / "search").mkdir()
    (folder / "search" / "packtest.yaml").write_text(SPACE)
    return folder


@pytest.fixture(scope="module")
def packed_study(tmp_path_factory: pytest.TempPathFactory, user_dir: Path):
    """One packed study shared by the tests that read it: 6 trials in packs of 4, no pruning; and its stderr."""
    tmp = tmp_path_factory.mktemp("packed")
    stores = [f"study.storage={tmp}/optuna.journal", f"tracking.uri=sqlite:///{tmp}/mlflow.db",
              f"tracking.artifact_root={tmp}/artifacts", f"report.dir={tmp}/reports"]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["search", "--config-dir", str(user_dir), "search=packtest", "study.name=packed", "study.pack=4",
                     "study.pack_members=like_first",
                     "study.n_trials=6", "study.pruner=none", "tracking.log_models=best", *SMALL, *stores])
    assert code == 0, err.getvalue()
    return tmp, load_study(tmp, "packed"), err.getvalue()


@pytest.mark.slow
def test_packed_members_are_trials_each_with_its_own_run(packed_study) -> None:
    tmp, study, _ = packed_study
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 6  # the budget, exactly: a pack of 4, then of 2
    runs = assert_one_run_per_trial(tmp, "packed", study)
    client, parents, _ = runs_of(tmp, "packed")
    assert parents[0].data.params["study.pack"] == "4"
    for trial in study.trials:
        run = runs[trial.number]
        assert run.data.params["optimizer.lr"] == str(trial.params["optimizer.lr"])
        curve = [m.value for m in client.get_metric_history(run.info.run_id, "val_acc")]
        assert len(curve) == 3 and max(curve) == pytest.approx(trial.value)
        assert run.data.tags["searchlab.command"].startswith("searchlab train")


@pytest.mark.slow
def test_a_members_run_records_all_that_a_lone_trials_run_does(packed_study, tmp_path_factory, user_dir) -> None:
    """A member's run (created, configured and ended with the pack's other members) has exactly the params, the
    metrics with every epoch, the tags and the config artifact that a trial's run of a study.pack=1 study has."""
    tmp, study, _ = packed_study
    lone_tmp = tmp_path_factory.mktemp("lone")
    stores = [f"study.storage={lone_tmp}/optuna.journal", f"tracking.uri=sqlite:///{lone_tmp}/mlflow.db",
              f"tracking.artifact_root={lone_tmp}/artifacts", f"report.dir={lone_tmp}/reports"]
    with contextlib.redirect_stderr(io.StringIO()) as err:
        code = main(["search", "--config-dir", str(user_dir), "search=packtest", "study.name=lone", "study.pack=1",
                     "study.n_trials=2", "study.pruner=none", "tracking.log_models=best", *SMALL, *stores])
    assert code == 0, err.getvalue()

    def recorded(folder: Path, name: str) -> list[tuple[dict, set, dict, str]]:
        """Per trial (its params checked against its trial's, and config.yaml's): its run's {metric: steps logged},
        tag names, tags, status."""
        client, _, _ = runs_of(folder, name)
        runs = assert_one_run_per_trial(folder, name, load_study(folder, name))
        out = []
        for trial in load_study(folder, name).trials:
            run = runs[trial.number]
            run_id = run.info.run_id
            assert run.data.params == {k: str(v) for k, v in trial.params.items()}  # each one, none more
            steps = {k: [m.step for m in client.get_metric_history(run_id, k)] for k in run.data.metrics}
            assert "config.yaml" in [a.path for a in client.list_artifacts(run_id)]
            config = OmegaConf.create(Path(client.download_artifacts(run_id, "config.yaml", str(folder))).read_text())
            for key, value in trial.params.items():  # a group's choice (optimizer=adam) is its node
                assert key in ("optimizer", "scheduler") or OmegaConf.select(config, key) == value
            out.append((steps, set(run.data.tags), run.data.tags, run.info.status))
        return out

    packed, lone = recorded(tmp, "packed"), recorded(lone_tmp, "lone")
    assert {k for steps, *_ in lone for k in steps} == {"train_loss", "val_loss", "val_acc", "lr", "params",
                                                          "epoch_seconds", "objective"}
    for steps, tag_names, tags, status in packed:
        assert steps == lone[0][0]  # every metric, every epoch (and the objective once)
        assert tag_names == lone[0][1]
        assert tags["searchlab.role"] == "trial" and tags["optuna.trial.state"] == "COMPLETE"
        assert tags["searchlab.command"].startswith("searchlab train") and status == "FINISHED"


@pytest.mark.slow
def test_members_of_a_pack_share_its_keys_and_differ_in_the_rest(packed_study) -> None:
    _, study, _ = packed_study
    for pack in (study.trials[0:4], study.trials[4:6]):
        shared = [shared_params(t.params) for t in pack]
        assert all(s == shared[0] for s in shared) and set(shared[0]) == {"model.width"}
        lrs = {t.params["optimizer.lr"] for t in pack}
        assert len(lrs) == len(pack)  # the sampler drew each member's own learning rate
    assert all(varies_per_member(k, v) for k, v in study.trials[1].params.items()
               if k not in shared_params(study.trials[1].params))


@pytest.mark.slow
def test_members_of_one_pack_draw_different_optimizers_and_schedules_and_train_together(packed_study) -> None:
    """The first pack (trials 0-3) explores the optimizer and schedule families as lone trials would, and trains as
    one pack: its members' configs can share one (no split into smaller packs) and none fell back to training
    alone (which says so on stderr)."""
    _, study, err = packed_study
    pack = study.trials[0:4]
    assert len({t.params["optimizer"] for t in pack}) == 2
    assert len({t.params["scheduler"] for t in pack}) >= 2
    assert pack_mismatch([_prepare(t.user_attrs["overrides"])[1] for t in pack]) is None
    assert "train one at a time" not in err


@pytest.mark.slow
def test_a_members_command_retrains_it_alone(packed_study) -> None:
    """`searchlab train` of a member's overrides: the same val_loss per epoch as in the pack (no dropout), to 1e-4
    relative (float sums in another order)."""
    tmp, study, _ = packed_study
    client, _, _ = runs_of(tmp, "packed")
    trial = study.trials[2]
    _, cfg, _, splits = _prepare(trial.user_attrs["overrides"])  # what its `searchlab train` command composes
    alone = fit(cfg, splits).history
    packed = [m.value for m in client.get_metric_history(trial.user_attrs["mlflow_run_id"], "val_loss")]
    assert [m["val_loss"] for m in alone] == pytest.approx(packed, rel=1e-4)


@pytest.mark.slow
def test_pruned_members_leave_the_pack_and_the_rest_finish(tmp_path, store_overrides, user_dir: Path) -> None:
    """Median pruning from the second epoch on, packs of 4: pruned members stop early (fewer epochs logged),
    complete ones train every epoch; each is told on its own."""
    assert main(["search", "--config-dir", str(user_dir), "search=packtest", "study.name=pruned", "study.pack=4",
                     "study.pack_members=like_first",
                 "study.n_trials=8", "study.pruner=median", "study.pruners.median.n_startup_trials=2",
                 "study.pruners.median.n_warmup_steps=1", "trainer.max_epochs=5", "data.batch_size=64",
                 "model.depth=1", *store_overrides]) == 0
    study = load_study(tmp_path, "pruned")
    states = collections.Counter(t.state.name for t in study.trials)
    assert states["PRUNED"] >= 1 and states["COMPLETE"] >= 1 and sum(states.values()) == 8
    client, _, _ = runs_of(tmp_path, "pruned")
    for trial in study.trials:
        epochs = len(client.get_metric_history(trial.user_attrs["mlflow_run_id"], "val_acc"))
        if trial.state.name == "PRUNED":
            assert epochs < 5 and "pruned at epoch" in trial.user_attrs["reason"]
        else:
            assert epochs == 5 and math.isfinite(trial.value)


@pytest.mark.slow
def test_two_packing_workers_use_the_exact_budget(tmp_path, store_overrides, user_dir: Path) -> None:
    """Packs of 4 from two workers on a budget of 10: however the packs fall between the workers (a worker that
    starts later may find the budget gone: start-up is most of this test), exactly 10 trials finish, none twice."""
    result = subprocess.run(
        [SEARCHLAB, "search", "--config-dir", str(user_dir), "search=packtest", "workers=2", "study.pack=4",
         "study.pack_members=like_first",
         "study.name=two", "study.n_trials=10", "study.pruner=none", "tracking.log_models=none",
         "trainer.max_epochs=6", "data.batch_size=16", "model.depth=1", *store_overrides],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "2 workers" in result.stdout.splitlines()[0]
    study = load_study(tmp_path, "two")
    assert len([t for t in study.trials if t.state.name in FINISHED]) == 10  # not 12 or 16
    assert {t.state.name for t in study.trials} <= set(FINISHED)
    assert_one_run_per_trial(tmp_path, "two", study)


@pytest.mark.slow
def test_a_sigkilled_packing_worker_has_all_its_members_retried(tmp_path, store_overrides, user_dir: Path) -> None:
    slow = ["trainer.max_epochs=40", "data.batch_size=16", "study.pruner=none", "tracking.log_models=none"]
    proc = subprocess.Popen(
        [SEARCHLAB, "search", "--config-dir", str(user_dir), "search=packtest", "workers=2", "study.pack=3",
         "study.pack_members=like_first",
         "study.name=killed", "study.n_trials=6", "model.depth=1", *slow, *store_overrides],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        running = wait_for_running(tmp_path, "killed", 3, proc)
        pid = collections.Counter(t.user_attrs["worker.pid"] for t in running).most_common(1)[0][0]
        os.kill(pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    study = load_study(tmp_path, "killed")
    lost = [t for t in study.trials if t.state.name == "FAIL" and "died mid-trial" in t.user_attrs.get("reason", "")]
    # Every member the killed worker was training is lost and retried: at least 2 (3 running over 2 workers).
    assert {t.number for t in lost} == {t.number for t in study.trials
                                        if t.user_attrs.get("worker.pid") == pid and t.state.name == "FAIL"}
    assert len(lost) >= 2
    for trial in lost:
        retries = [t for t in study.trials if t.user_attrs.get(RETRY_OF) == trial.number]
        assert len(retries) == 1 and retries[0].params == trial.params and retries[0].state.name in FINISHED
    assert len([t for t in study.trials if t.state.name in FINISHED]) == 6
    runs = assert_one_run_per_trial(tmp_path, "killed", study)
    for trial in lost:  # a member logs its params at its end: the run of a member that never ended gets them too
        assert runs[trial.number].data.params == {k: str(v) for k, v in trial.params.items()}
        assert runs[trial.number].info.status == "FAILED"


@pytest.mark.parametrize(("extra", "says"), [
    (["trainer.devices=2"], "trainer.devices=2 (DDP)"),
    (["study.sampler=grid", "search=regularization"], "grid search"),
    (["trainer.checkpoint_every_n_epochs=1"], "not checkpointed"),
    (["study.pack=0"], "study.pack: expected a positive integer"),
    (["study.pack_members=indepedent"], "study.pack_members: unknown 'indepedent' (did you mean independent?"),
], ids=["ddp", "grid", "checkpoints", "zero", "members"])
def test_refusals_are_one_line_before_any_store(tmp_path, store_overrides, capsys, extra, says) -> None:
    code = main(["search", "study.pack=2", "study.name=refused", *extra, *store_overrides])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and says in err[0], err
    assert not (tmp_path / "optuna.journal").exists() and not (tmp_path / "mlflow.db").exists()


def test_a_module_of_ones_own_is_refused_naming_the_reason(tmp_path, store_overrides, capsys) -> None:
    folder = tmp_path / "conf" / "module"
    folder.mkdir(parents=True)
    (folder / "mine.yaml").write_text("_target_: test_pack_study.OwnClassifier\nl1: 0.0\n")
    code = main(["search", "--config-dir", str(tmp_path / "conf"), "module=mine", "study.pack=2",
                 "study.name=mine", *store_overrides])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "study.pack=2" in err[0] and "set study.pack=1" in err[0], err


class OwnClassifier(Classifier):
    """A module of one's own (here a subclass that could override any step): the pack cannot know its steps."""


@pytest.mark.slow
def test_independent_members_draw_their_own_shapes_and_each_trains_as_a_trial(tmp_path, user_dir) -> None:
    """study.pack_members=independent: the K trials of a round are drawn as lone trials (here widths differ within
    one round, which like_first never gives), and each is still a trial with its run, whether it trained in a pack
    or alone."""
    stores = [f"study.storage={tmp_path}/optuna.journal", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
              f"tracking.artifact_root={tmp_path}/artifacts", f"report.dir={tmp_path}/reports"]
    with contextlib.redirect_stderr(io.StringIO()) as err:
        code = main(["search", "--config-dir", str(user_dir), "search=packtest", "study.name=free", "study.pack=4",
                     "study.pack_members=independent", "study.sampler=random", "study.n_trials=8",
                     "study.pruner=none", "tracking.log_models=none", *SMALL, *stores])
    assert code == 0, err.getvalue()
    study = load_study(tmp_path, "free")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 8
    assert all(math.isfinite(t.value) for t in study.trials)
    widths = [{t.params["model.width"] for t in study.trials[i:i + 4]} for i in (0, 4)]
    assert any(len(w) == 2 for w in widths), widths  # like_first gives one width per round of 4
    assert_one_run_per_trial(tmp_path, "free", study)
    _, parents, _ = runs_of(tmp_path, "free")
    assert parents[0].data.params["study.pack_members"] == "independent"


def test_members_that_share_their_shape_form_one_pack() -> None:
    """_groups: members in packs of equal shape, in order of first appearance; what each draws alone (lr) apart."""
    from searchlab.config import Composer
    from searchlab.study.pack_trials import _groups
    from searchlab.study.trial import Attempt

    composer = Composer(SMALL)
    members = []
    for width, lr in ((16, 0.01), (32, 0.01), (16, 0.02), (32, 0.03), (16, 0.04)):
        member = Attempt(trial=None, start=0.0)
        member.cfg = composer({"model.width": width, "optimizer.lr": lr})
        members.append(member)
    groups = _groups(members)
    assert [[members.index(m) for m in group] for group in groups] == [[0, 2, 4], [1, 3]]


def test_shared_params_keep_shapes_and_drop_what_each_member_draws() -> None:
    params = {"optimizer": "adam", "optimizer.lr": 0.01, "optimizer.beta1": 0.9, "scheduler": "step",
              "scheduler.step_size": 3, "data.batch_size": 32, "model.width": 64, "model.dropout": 0.2,
              "model.batch_norm": True, "module.l1": 1e-5}
    assert shared_params(params) == {"data.batch_size": 32, "model.width": 64, "model.batch_norm": True}


def test_a_trial_asked_with_fixed_keys_keeps_them_and_samples_the_rest() -> None:
    from searchlab.study.pack_trials import fixed_sampler

    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=0, multivariate=True))
    study.optimize(lambda t: t.suggest_float("x", 0, 1) + (t.suggest_categorical("c", ["a", "b"]) == "a"),
                   n_trials=5)
    with fixed_sampler(study, {"c": "b"}):
        trial = study.ask()
        assert trial.suggest_categorical("c", ["a", "b"]) == "b"
        x = trial.suggest_float("x", 0, 1)
    assert 0 <= x <= 1 and not isinstance(study.sampler, optuna.samplers.PartialFixedSampler)
