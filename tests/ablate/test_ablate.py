"""`searchlab ablate`: the plan read from a study (synthetic, no training), the statistics, and one real tiny ablation
interrupted and resumed, checked against its MLflow runs and the study report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import optuna
import pytest
from helpers import run_cli
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from scipy import stats

import searchlab.ablate.command as ablate_module
from searchlab.ablate.command import build_plan, interval, p_best, summarize
from searchlab.config import compose_config, format_override
from searchlab.study import load_study

TINY = ["trainer.max_epochs=2", "model.width=32"]


# ---- the plan, from a synthetic study shaped like the default space ----

SPACE = {
    "optimizer": CategoricalDistribution(["sgd", "momentum", "nesterov", "rmsprop", "adam", "adamw"]),
    "optimizer.lr": FloatDistribution(1e-4, 0.3, log=True),
    "optimizer.weight_decay": FloatDistribution(1e-6, 1e-2, log=True),
    "scheduler": CategoricalDistribution(["constant", "step", "exponential", "cosine"]),
    "data.batch_size": CategoricalDistribution(["full", 1, 16, 32, 64, 128]),
    "model.dropout": FloatDistribution(0.0, 0.5),
    "model.batch_norm": CategoricalDistribution([False, True]),
    "module.l1": FloatDistribution(1e-7, 1e-3, log=True),
}
OWN = {"optimizer.momentum": FloatDistribution(0.5, 0.99), "optimizer.beta1": FloatDistribution(0.8, 0.95),
       "scheduler.step_size": IntDistribution(2, 8), "scheduler.gamma": FloatDistribution(0.1, 0.9)}
COMMON = {"optimizer.weight_decay": 1e-4, "data.batch_size": 64, "model.batch_norm": True, "module.l1": 1e-5}


def synthetic_study(tmp_path: Path, name: str = "synthetic", without: tuple[str, ...] = ()) -> optuna.Study:
    study = optuna.create_study(study_name=name, direction="maximize", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "optuna.journal"))))
    trials = [  # (value, params): the winner is adam with cosine, dropout 0
        (0.95, {"optimizer": "adam", "optimizer.lr": 0.01, "optimizer.beta1": 0.85, "scheduler": "cosine",
                "model.dropout": 0.0, **COMMON}),
        (0.90, {"optimizer": "sgd", "optimizer.lr": 0.1, "scheduler": "step", "scheduler.step_size": 3,
                "scheduler.gamma": 0.5, "model.dropout": 0.2, **COMMON}),
        (0.93, {"optimizer": "momentum", "optimizer.lr": 0.05, "optimizer.momentum": 0.9, "scheduler": "constant",
                "model.dropout": 0.1, **COMMON}),
        (0.80, {"optimizer": "momentum", "optimizer.lr": 0.2, "optimizer.momentum": 0.6, "scheduler": "constant",
                "model.dropout": 0.1, **COMMON}),
        (None, {"optimizer": "rmsprop", "optimizer.lr": 0.001, "scheduler": "constant", "model.dropout": 0.1,
                **COMMON}),  # pruned: rmsprop has no complete trial
    ]
    for value, params in trials:
        params = {k: v for k, v in params.items() if k not in without}
        study.add_trial(optuna.trial.create_trial(
            params=params, distributions={k: {**SPACE, **OWN}[k] for k in params}, value=value,
            state=optuna.trial.TrialState.COMPLETE if value is not None else optuna.trial.TrialState.PRUNED,
            user_attrs={"overrides": [*TINY, *(format_override(k, v) for k, v in params.items())]}))
    return study


def settings(**changes) -> OmegaConf:
    return OmegaConf.merge(compose_config([]).ablate, changes)


def overrides_of(plan, name: str) -> dict[str, str]:
    return dict(o.split("=", 1) for o in plan.variant(name).overrides)


def test_the_plan_reads_finalists_and_one_factor_variants_from_the_study(tmp_path):
    plan = build_plan(synthetic_study(tmp_path), settings(top_k=2, seeds=3, seed_start=7), ["study.name=x"],
                      "val_acc")
    assert plan.seeds == [7, 8, 9] and plan.test_metric == "test_acc"
    assert [v.name for v in plan.variants if v.family == "finalist"] == ["trial-0", "trial-2"]
    winner = overrides_of(plan, "trial-0")
    assert winner["optimizer"] == "adam" and winner["trainer.max_epochs"] == "2" and "study.name" not in winner
    skipped = {s["variant"]: s["reason"] for s in plan.skipped}
    assert "already 0" in skipped["dropout=0"]
    assert "batch norm cannot train on batches of 1" in skipped["batch_size=1"]  # the winner has batch norm on
    names = {v.name for v in plan.variants}
    assert {"batch_norm=off", "weight_decay=0", "l1=0"} <= names and "dropout=0" not in names
    assert {n for n in names if n.startswith("schedule=")} == {"schedule=constant", "schedule=step",
                                                               "schedule=exponential"}
    assert {n for n in names if n.startswith("batch_size=")} == {"batch_size=full", "batch_size=16",
                                                                 "batch_size=32", "batch_size=128"}
    assert {n for n in names if n.startswith("optimizer=")} == {
        f"optimizer={o}" for o in ("sgd", "momentum", "nesterov", "rmsprop", "adamw")}
    # Each optimizer at its own best lr (and own keys) from the study, else the winner's lr; adam's keys are gone,
    # the winner's weight decay stays.
    for name, lr, extra in (("sgd", "0.1", {}), ("momentum", "0.05", {"optimizer.momentum": "0.9"}),
                            ("rmsprop", "0.01", {}), ("adamw", "0.01", {})):
        o = overrides_of(plan, f"optimizer={name}")
        assert o["optimizer"] == name and o["optimizer.lr"] == lr and o["optimizer.weight_decay"] == "0.0001"
        assert "optimizer.beta1" not in o and all(o[k] == v for k, v in extra.items())
    step = overrides_of(plan, "schedule=step")
    assert step["scheduler.step_size"] == "3" and step["scheduler.gamma"] == "0.5"
    # A one-factor variant differs from the winner's config in its own key only.
    base = OmegaConf.to_container(compose_config(list(plan.winner.overrides)))
    for name, key in (("batch_norm=off", ("model", "batch_norm")), ("l1=0", ("module", "l1")),
                      ("batch_size=full", ("data", "batch_size"))):
        changed = OmegaConf.to_container(compose_config(list(plan.variant(name).overrides)))
        assert changed[key[0]][key[1]] != base[key[0]][key[1]]
        changed[key[0]][key[1]] = base[key[0]][key[1]]
        assert changed == base, name


def test_variants_narrow_the_families_and_unsearched_techniques_are_skipped(tmp_path):
    study = synthetic_study(tmp_path, without=("module.l1",))
    plan = build_plan(study, settings(variants=["l1", "batch_norm"]), [], "val_acc")
    assert {v.family for v in plan.variants} == {"finalist", "batch_norm"}
    assert [s for s in plan.skipped if s["family"] == "l1"][0]["reason"].startswith("not searched")
    plan = build_plan(study, settings(variants=[], top_k=10), [], "val_acc")
    assert [v.trial for v in plan.variants] == [0, 2, 1, 3]  # complete trials only, best first


@pytest.mark.parametrize("bad, message", [
    ("ablate.variants=[dropout,momentum]", "ablate.variants: unknown 'momentum'"),
    ("ablate.seeds=0", "ablate.seeds: expected an integer >= 1"),
    ("ablate.confidence=95", "ablate.confidence"),
    ("study.name=nope", "no study 'nope'"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, store_overrides, bad, message):
    synthetic_study(tmp_path, name="x")
    code, out, err = run_cli("ablate", "study.name=x", bad, *store_overrides)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


# ---- statistics ----

def test_interval_is_the_student_t_interval():
    xs = [0.91, 0.93, 0.95, 0.92]
    got = interval(xs, 0.95)
    half = stats.t.ppf(0.975, 3) * np.std(xs, ddof=1) / math.sqrt(4)
    assert got["mean"] == pytest.approx(np.mean(xs)) and got["n"] == 4
    assert (got["low"], got["high"]) == pytest.approx((np.mean(xs) - half, np.mean(xs) + half))
    assert interval([0.5], 0.95) == {"mean": 0.5, "low": None, "high": None, "n": 1}


def test_probability_best_is_paired_over_seeds():
    # Row 1 beats row 0 on every seed by a hair, though the seeds vary a lot: paired, it is always best.
    base = np.array([0.5, 0.9, 0.7, 0.6, 0.8])
    assert p_best(np.stack([base, base + 0.001]), maximize=True, resamples=2000) == [0.0, 1.0]
    assert p_best(np.stack([base, base + 0.001]), maximize=False, resamples=2000) == [1.0, 0.0]
    assert p_best(np.stack([base, base]), maximize=True, resamples=100) == [0.5, 0.5]  # ties shared
    mixed = p_best(np.stack([base, base[::-1]]), maximize=True, resamples=4000)
    assert 0.05 < mixed[0] < 0.95 and sum(mixed) == pytest.approx(1.0)


def test_verdicts_and_sentences(tmp_path):
    plan = build_plan(synthetic_study(tmp_path), settings(top_k=1, seeds=3, variants=["batch_norm", "l1",
                                                                                     "weight_decay"]), [], "val_acc")
    winner = {0: 0.90, 1: 0.95, 2: 0.92}
    shifts = {"batch_norm=off": [-0.05, -0.04, -0.06], "l1=0": [0.001, -0.001, 0.0], "weight_decay=0": [0.1, -0.1, 0]}
    values = {(plan.winner.name, s): (v, {"test_acc": v}) for s, v in winner.items()}
    for name, deltas in shifts.items():
        values.update({(name, s): (winner[s] + d, {"test_acc": winner[s]}) for s, d in enumerate(deltas)})
    result = summarize(plan, values, {}, 0.95, 1000, 0.01)
    verdicts = {e["variant"]: e["verdict"] for e in result["effects"]}
    assert verdicts == {"batch_norm=off": "worse", "l1=0": "no effect", "weight_decay=0": "inconclusive"}
    sentences = dict(s.split(":", 1) for s in result["sentences"])
    assert sentences["batch norm"].startswith(" off instead of on: -5.0 points [") and "it matters" in sentences[
        "batch norm"]
    assert "no measurable effect" in sentences["L1"] and "inconclusive with 3 seeds" in sentences["weight decay (L2)"]
    assert result["finalists"][0]["p_best"] == 1.0


# ---- one real tiny ablation: interrupted, resumed, stored ----

# ablate.pack=1: these tests follow each training through _train_one (tests/test_ablate_pack.py covers packs).
ABLATE = ["ablate.seeds=2", "ablate.top_k=2", "ablate.variants=[batch_norm,dropout,l1]", "ablate.pack=1"]


@pytest.fixture(scope="module")
def ablated(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A 4-trial study, then its ablation: stopped by Ctrl-C in the 3rd training, resumed, and run a third time."""
    root = tmp_path_factory.mktemp("ablate")
    stores = [f"study.storage={root}/optuna.journal", f"tracking.uri=sqlite:///{root}/mlflow.db",
              f"tracking.artifact_root={root}/artifacts", f"report.dir={root}/reports", "study.name=tiny"]
    code, _, err = run_cli("search", *TINY, "study.n_trials=4", "study.pruner=none", "tracking.log_models=none",
                           *stores)  # no test here reads a logged model
    assert code == 0, err
    real = ablate_module._train_one
    trained: list[list[tuple[str, int]]] = [[], [], []]
    outputs = []
    for attempt in range(3):
        def counting(cfg, on_epoch=None, attempt=attempt):
            trained[attempt].append((OmegaConf.to_yaml(cfg), cfg.seed))

            def hook(epoch, metrics):
                if attempt == 0 and len(trained[0]) == 3:
                    raise KeyboardInterrupt  # Ctrl-C in the middle of the 3rd training (Lightning: SystemExit)
                if on_epoch:
                    on_epoch(epoch, metrics)
            return real(cfg, hook)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(ablate_module, "_train_one", counting)
            # The resumed run as a user may give it, with the search's study.pack: ablate trains one at a time.
            outputs.append(run_cli("ablate", *ABLATE, *stores, *(["study.pack=2"] if attempt == 1 else [])))
    folder = root / "reports" / "tiny"
    return {"root": root, "stores": stores, "trained": trained, "outputs": outputs,
            "study": load_study(f"{root}/optuna.journal", "tiny"),
            "ablation": load_study(f"{root}/optuna.journal", "tiny.ablation"),
            "result": json.loads((folder / "ablation.json").read_text()), "folder": folder,
            "client": MlflowClient(f"sqlite:///{root}/mlflow.db")}


def _pairs(study: optuna.Study, state: str) -> list[tuple[str, int]]:
    return [(t.user_attrs["variant"], t.user_attrs["seed"]) for t in study.trials if t.state.name == state]


@pytest.mark.slow
def test_ctrl_c_keeps_what_finished_and_the_rerun_trains_only_the_missing(ablated):
    (code0, _, err0), (code1, out1, err1), (code2, out2, err2) = ablated["outputs"]
    assert code0 == 130 and "run the same command to resume" in err0 and "Traceback" not in err0
    assert code1 == 0 and code2 == 0, err1 + err2
    first, second, third = ablated["trained"]
    assert len(first) == 3 and third == []  # the third run finds everything done
    planned = ablated["result"]["runs"]["planned"]
    complete = _pairs(ablated["ablation"], "COMPLETE")
    assert len(complete) == len(set(complete)) == planned == ablated["result"]["runs"]["complete"]
    assert len(second) == planned - 2  # the two finished before Ctrl-C are kept, the interrupted one re-runs
    failed = [t for t in ablated["ablation"].trials if t.state.name == "FAIL"]
    assert [t.number for t in failed] == [2] and failed[0].user_attrs["reason"] == "interrupted"
    assert _pairs(ablated["ablation"], "FAIL")[0] in complete[2:]  # trained again by the resumed run
    assert f"{planned} trainings, 2 done, {planned - 2} to run" in out1
    assert f"{planned} trainings, {planned} done, 0 to run" in out2


@pytest.mark.slow
def test_seeds_and_variants_are_as_configured(ablated):
    result = ablated["result"]
    assert result["seeds"] == [0, 1] and result["metric"] == "val_acc" and result["test_metric"] == "test_acc"
    assert len(result["finalists"]) == 2
    families = {e["family"] for e in result["effects"]} | {s["family"] for s in result["skipped"]}
    assert families == {"batch_norm", "dropout", "l1"}
    complete = _pairs(ablated["ablation"], "COMPLETE")
    variants = [r["variant"] for r in result["finalists"]] + [e["variant"] for e in result["effects"]]
    assert sorted(complete) == sorted((v, s) for v in variants for s in (0, 1))
    # The winner's seed-0 re-training is the study's winning trial itself (same config, seed 0): the config is
    # rebuilt faithfully from the study.
    winner = result["finalists"][0]
    assert winner["trial"] == ablated["study"].best_trial.number
    assert winner["values"]["0"] == pytest.approx(ablated["study"].best_value, abs=1e-9)


@pytest.mark.slow
def test_intervals_recomputed_from_the_mlflow_runs_match(ablated):
    result, client = ablated["result"], ablated["client"]
    runs = client.search_runs([client.get_run(result["mlflow_run_id"]).info.experiment_id], max_results=1000,
                              filter_string=f"tags.mlflow.parentRunId = '{result['mlflow_run_id']}' "
                                            f"and attributes.status = 'FINISHED'")
    by = {(r.data.tags["searchlab.variant"], int(r.data.tags["searchlab.seed"])): r.data.metrics for r in runs}
    assert len(by) == len(runs) == result["runs"]["planned"]

    def t_interval(xs):
        half = stats.t.ppf(0.975, len(xs) - 1) * np.std(xs, ddof=1) / math.sqrt(len(xs))
        return pytest.approx([np.mean(xs) - half, np.mean(xs), np.mean(xs) + half], abs=1e-12)

    for row in result["finalists"]:
        for key, metric in (("objective", "objective"), ("test", "test_acc")):
            xs = [by[(row["variant"], s)][metric] for s in (0, 1)]
            assert [row[key]["low"], row[key]["mean"], row[key]["high"]] == t_interval(xs)
    winner = result["winner"]["variant"]
    for effect in result["effects"]:
        for key, metric in (("objective", "objective"), ("test", "test_acc")):
            ds = [by[(effect["variant"], s)][metric] - by[(winner, s)][metric] for s in (0, 1)]
            assert [effect[key]["low"], effect[key]["mean"], effect[key]["high"]] == t_interval(ds)


@pytest.mark.slow
def test_mlflow_nesting_and_tags(ablated):
    result, client, study = ablated["result"], ablated["client"], ablated["study"]
    ablation_run = client.get_run(result["mlflow_run_id"])
    parent = client.get_run(study.user_attrs["mlflow_parent_run_id"])
    assert ablation_run.info.experiment_id == parent.info.experiment_id  # the study's experiment
    assert ablation_run.data.tags["searchlab.role"] == "ablation"
    assert ablation_run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert ablation_run.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(ablation_run.info.run_id)} >= {"ablation.json",
                                                                                 "ablation_effects.png"}
    children = client.search_runs([parent.info.experiment_id], max_results=1000,
                                  filter_string=f"tags.mlflow.parentRunId = '{ablation_run.info.run_id}'")
    assert len(children) == result["runs"]["planned"] + 1  # + the interrupted one
    for run in children:
        tags = run.data.tags
        assert {"searchlab.variant", "searchlab.seed", "searchlab.family"} <= set(tags)
        assert tags["searchlab.family"] == ("finalist" if tags["searchlab.variant"].startswith("trial-")
                                            else tags["searchlab.variant"].split("=")[0])
        if run.info.status == "FINISHED":
            assert {"val_acc", "objective", "test_acc"} <= set(run.data.metrics)  # per-epoch curves, results
    failed = [r for r in children if r.info.status == "FAILED"]
    assert len(failed) == 1 and failed[0].data.tags["optuna.trial.reason"] == "interrupted"
    # One ablation run, reopened when resumed
    ablation_runs = client.search_runs([parent.info.experiment_id], filter_string="tags.`searchlab.role` = 'ablation'")
    assert len(ablation_runs) == 1


@pytest.mark.slow
def test_the_report_leads_with_the_verdict(ablated):
    folder, result = ablated["folder"], ablated["result"]
    page = (folder / "report.html").read_text()
    assert "<section id=ablation>" in page
    assert page.index("<section id=ablation>") < page.index("<h2>Best")
    for sentence in result["sentences"]:
        assert sentence.split(":")[0] in page
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["ablation"]["sentences"] == result["sentences"] and len(result["sentences"]) >= 1
    assert summary["ablation"]["effects"] == result["effects"]
    assert "ablation_effects.png" in summary["plots"]
    assert (folder / "ablation_effects.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = ablated["outputs"][1][1]
    assert "effects vs the winner" in out and all(s in out for s in result["sentences"])
    # `searchlab report` alone keeps the section
    code, _, err = run_cli("report", *ablated["stores"])
    assert code == 0, err
    assert "<section id=ablation>" in (folder / "report.html").read_text()
