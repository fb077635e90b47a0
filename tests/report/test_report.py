"""The study report, `searchlab report` and `searchlab best`: checked against a real tiny study and against synthetic
studies made with Optuna's ask/tell (500 trials for the timing, a handful for the edge cases)."""

from __future__ import annotations

import json
import math
import random
import re
import shlex
import time
from pathlib import Path

import optuna
import pytest
import yaml
from helpers import run_cli
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from searchlab.config import compose_config, config_dir
from searchlab.report import write_report
from searchlab.study import load_study
from searchlab.study.storage import open_storage

TINY = ["trainer.max_epochs=3", "model.width=32", "study.n_trials=8", "report.min_complete=3"]
PNGS = {"history.png", "learning_curves.png", "parallel_coordinates.png", "slices.png", "techniques.png"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One real study of 8 tiny trainings (journal storage, SQLite MLflow), searched once for the whole module."""
    root = tmp_path_factory.mktemp("tiny")
    stores = [f"study.storage={root}/optuna.journal", f"tracking.uri=sqlite:///{root}/mlflow.db",
              f"tracking.artifact_root={root}/artifacts", f"report.dir={root}/reports", "study.name=tiny"]
    code, out, err = run_cli("search", *TINY, *stores)
    assert code == 0, err
    study = load_study(f"{root}/optuna.journal", "tiny")
    folder = root / "reports" / "tiny"
    return {"root": root, "stores": stores, "out": out, "study": study, "folder": folder,
            "summary": json.loads((folder / "summary.json").read_text())}


def test_search_ends_with_the_report_and_its_counts_match_optuna(tiny):
    study, summary = tiny["study"], tiny["summary"]
    assert f"report: {tiny['folder'] / 'report.html'}" in tiny["out"]
    trials = study.get_trials()
    for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL):
        assert summary["counts"][state.name] == sum(t.state == state for t in trials)
    assert summary["counts"]["total"] == len(trials)
    complete = sorted((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: -t.value)
    assert [row["number"] for row in summary["top_trials"]] == [t.number for t in complete][:10]
    assert summary["best"]["number"] == study.best_trial.number and summary["best"]["value"] == study.best_value
    assert summary["best"]["params"] == study.best_params
    importances = summary["importances"]["values"]
    if len(complete) >= 3:  # report.min_complete=3
        assert importances and set(importances) <= set().union(*(t.params for t in complete))
        assert sum(importances.values()) == pytest.approx(1.0)
    else:
        assert not importances and "report.min_complete" in summary["importances"]["note"]
    searched = {t["param"] for t in summary["techniques"]}
    assert {"optimizer", "optimizer.lr", "data.batch_size", "model.batch_norm", "model.dropout"} <= searched
    regime = next(t for t in summary["techniques"] if t["param"] == "data.batch_size")
    assert {c["choice"] for c in regime["choices"]} == {"full batch", "stochastic (1)", "mini-batch"}
    assert sum(c["trials"] for c in regime["choices"]) == len(complete)
    for state, key in ((TrialState.PRUNED, "pruned"), (TrialState.FAIL, "failed")):
        assert sum(c[key] for c in regime["choices"]) == sum(t.state == state for t in trials)


def test_best_config_retrains_alone_to_the_same_metric(tiny):
    command = shlex.split(tiny["summary"]["best"]["command"])
    assert command[:2] == ["searchlab", "train"]
    assert not any(arg.split("=")[0].split(".")[0] in ("study", "tracking", "report") for arg in command)
    code, out, err = run_cli("train", *command[2:])
    assert code == 0, err
    metrics = json.loads(next(line for line in out.splitlines() if line.startswith("metrics: "))[len("metrics: "):])
    assert metrics["best_val_acc"] == pytest.approx(tiny["study"].best_value, abs=1e-6)


def test_every_plot_is_a_non_empty_png_and_the_page_is_offline(tiny):
    folder, summary = tiny["folder"], tiny["summary"]
    expected = PNGS | ({"importances.png"} if summary["importances"]["values"] else set())
    assert set(summary["plots"]) == expected
    for name in expected:
        data = (folder / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000, name
    page = (folder / "report.html").read_text()
    assert not re.search(r"<(script|link|img)[^>]*(src|href)\s*=\s*[\"']?(https?:)?//", page, re.I)
    assert "<link" not in page
    assert page.count("* plotly.js v") == 1  # plotly.js embedded once, not per figure
    # history, techniques, curves, parallel coordinates, slices, and importances when there are some
    assert page.count("Plotly.newPlot") == 5 + bool(summary["importances"]["values"])
    assert f"#{summary['best']['number']}" in page and summary["best"]["command"].split()[-1] in page


def test_report_is_logged_on_the_parent_run_and_made_again_by_the_command(tiny):
    root, study = tiny["root"], tiny["study"]
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    parent = study.user_attrs["mlflow_parent_run_id"]
    logged = {Path(a.path).name for a in client.list_artifacts(parent, "report")}
    assert logged == {"report.html", "summary.json", *tiny["summary"]["plots"]}
    (tiny["folder"] / "summary.json").unlink()
    code, out, err = run_cli("report", *tiny["stores"])
    assert code == 0, err
    counts = tiny["summary"]["counts"]
    assert f"{counts['COMPLETE']} complete, {counts['PRUNED']} pruned, {counts['FAIL']} fail" in out
    assert f"MLflow run {parent} (report/)" in out
    assert json.loads((tiny["folder"] / "summary.json").read_text())["counts"] == counts


def test_best_prints_the_full_config_and_the_command(tiny):
    code, out, err = run_cli("best", *tiny["stores"])
    assert code == 0, err
    config_text, _, command = out.partition("# re-run it alone:\n")
    cfg = yaml.safe_load(config_text)
    best = tiny["study"].best_params
    assert cfg["optimizer"]["lr"] == best["optimizer.lr"] and cfg["model"]["dropout"] == best["model.dropout"]
    for group in ("optimizer", "scheduler"):  # the chosen option's entry: its _target_ and the trial's values
        option = yaml.safe_load((config_dir() / group / f"{best[group]}.yaml").read_text()) or {}
        assert (cfg[group] or {}).get("_target_") == option.get("_target_")
    assert cfg["trainer"]["max_epochs"] == 3 and cfg["model"]["width"] == 32  # the search's own base overrides
    assert command.strip() == tiny["summary"]["best"]["command"]


def test_unknown_study_or_storage_is_one_line_and_exit_2(tiny, tmp_path):
    code, out, err = run_cli("report", *tiny["stores"], "study.name=nope")
    assert code == 2 and out == "" and len(err.splitlines()) == 1
    assert "study.name" in err and "'nope'" in err and "tiny" in err
    missing = tmp_path / "none.journal"
    code, out, err = run_cli("best", f"study.storage={missing}", "study.name=tiny")
    assert code == 2 and len(err.splitlines()) == 1 and "study.storage" in err
    assert not missing.exists()


@pytest.mark.parametrize("setting", ["report.importance=nope", "report.top_k=0", "report.techniques.dropout=x"])
def test_bad_report_settings_stop_the_search_before_any_store_is_written(tmp_path, setting):
    code, out, err = run_cli("search", setting, "study.name=bad", f"study.storage={tmp_path}/optuna.journal",
                             f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"report.dir={tmp_path}/reports")
    assert code == 2 and out == "" and len(err.splitlines()) == 1
    assert setting.split("=")[0] in err
    assert list(tmp_path.iterdir()) == []


# ---- synthetic studies: no training, any size ----

def synthetic_study(n: int, name: str = "synthetic", seed: int = 0) -> optuna.Study:
    """An in-memory study shaped like searchlab's: a conditional key, the regimes, per-epoch values; ~25% pruned,
    ~5% failed. (Asked and told into a journal file it takes ~40 s for 500 trials on a loaded machine: copy it.)"""
    rng = random.Random(seed)
    study = optuna.create_study(study_name=name, direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=seed))
    for _ in range(n):
        trial = study.ask()
        optimizer = trial.suggest_categorical("optimizer", ["sgd", "momentum", "adam"])
        if optimizer == "momentum":
            trial.suggest_float("optimizer.momentum", 0.5, 0.99)
        lr = trial.suggest_float("optimizer.lr", 1e-4, 0.3, log=True)
        trial.suggest_categorical("data.batch_size", ["full", 1, 16, 64])
        trial.suggest_categorical("model.batch_norm", [False, True])
        trial.suggest_float("model.dropout", 0.0, 0.5)
        trial.set_user_attr("overrides", [f"optimizer={optimizer}", f"optimizer.lr={lr!r}"])
        final = 0.9 - 0.05 * abs(math.log10(lr) + 2.5) + (0.03 if optimizer == "adam" else 0.0)
        fate = rng.random()
        for epoch in range(1, (3 if fate < 0.3 else 10) + 1):
            trial.report(final * (1 - math.exp(-epoch / 2)) + rng.gauss(0, 0.01), epoch)
        if fate < 0.05:
            study.tell(trial, state=TrialState.FAIL)
        elif fate < 0.3:
            study.tell(trial, state=TrialState.PRUNED)
        else:
            study.tell(trial, final + rng.gauss(0, 0.01))
    return study


def test_report_of_500_trials_takes_seconds(tmp_path):
    journal = f"{tmp_path}/optuna.journal"
    optuna.copy_study(from_study_name="synthetic", from_storage=synthetic_study(500)._storage,
                      to_storage=open_storage(journal))
    # This process's CPU time, not the wall clock: other processes on a shared machine do not count against it.
    start = time.process_time()
    study = load_study(journal, "synthetic")
    report = write_report(study, compose_config([f"report.dir={tmp_path}/reports", "report.top_k=7"]), None)
    seconds = time.process_time() - start
    assert seconds < 30, seconds  # ~2-4 s on the shared 2-core machine; minutes would mean a regression
    assert report.summary["counts"]["total"] == 500
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert report.summary["counts"]["COMPLETE"] == len(complete)
    # top_k cuts the table to the k best complete trials (here 7 of ~350), best first
    best_first = sorted(complete, key=lambda t: -t.value)
    assert [row["number"] for row in report.summary["top_trials"]] == [t.number for t in best_first[:7]]
    assert "optimizer.momentum" in report.summary["importances"]["values"]  # PED-ANOVA ranks conditional keys
    assert set(report.summary["plots"]) == PNGS | {"importances.png"}
    assert report.mlflow_run_id is None and "mlflow_parent_run_id" in report.note


def test_fanova_ranks_only_the_common_search_space(tmp_path):
    study = synthetic_study(40)
    cfg = compose_config([f"report.dir={tmp_path}", "report.importance=fanova", "report.importances.fanova.n_trees=8"])
    report = write_report(study, cfg, None)
    importances = report.summary["importances"]
    assert importances["evaluator"] == "FanovaImportanceEvaluator"
    assert "optimizer.momentum" not in importances["values"] and "optimizer.lr" in importances["values"]
    assert "optimizer.momentum" in importances["note"]


def test_a_study_without_complete_trials_still_gets_a_report(tmp_path):
    study = optuna.create_study(study_name="none-complete", storage=f"sqlite:///{tmp_path}/optuna.db")
    for state in (TrialState.PRUNED, TrialState.FAIL):
        trial = study.ask()
        trial.suggest_float("optimizer.lr", 1e-4, 0.1, log=True)
        trial.report(0.5, 1)
        study.tell(trial, state=state)
    stores = ["study.name=none-complete", f"study.storage=sqlite:///{tmp_path}/optuna.db",
              f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"report.dir={tmp_path}/reports"]
    code, out, err = run_cli("report", *stores)
    assert code == 0, err
    summary = json.loads((tmp_path / "reports" / "none-complete" / "summary.json").read_text())
    assert summary["best"] is None and summary["top_trials"] == []
    assert summary["counts"] == {"COMPLETE": 0, "PRUNED": 1, "FAIL": 1, "total": 2}
    assert "report.min_complete" in summary["importances"]["note"]
    assert "not in MLflow" in out
    for name in summary["plots"]:
        assert (tmp_path / "reports" / "none-complete" / name).stat().st_size > 0
    code, out, err = run_cli("best", *stores)
    assert code == 2 and out == "" and "study.name" in err and "no complete trial" in err


def test_report_and_best_from_a_postgresql_study(tmp_path, postgres):
    url = postgres.create_database("report")
    optuna.copy_study(from_study_name="synthetic", from_storage=synthetic_study(12)._storage, to_storage=url)
    stores = ["study.name=synthetic", f"study.storage={url}", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
              f"report.dir={tmp_path}/reports"]
    code, out, err = run_cli("report", *stores)
    assert code == 0, err
    study = optuna.load_study(study_name="synthetic", storage=url)
    summary = json.loads((tmp_path / "reports" / "synthetic" / "summary.json").read_text())
    assert summary["counts"]["total"] == 12 and summary["best"]["number"] == study.best_trial.number
    code, out, err = run_cli("best", *stores)
    assert code == 0, err
    assert yaml.safe_load(out.partition("# re-run")[0])["optimizer"]["lr"] == study.best_params["optimizer.lr"]


# ---- the per-technique views: pruned trials, the importance rule, labels that do not overlap, lead sections ----

def test_pruned_trials_are_in_the_views_at_their_last_reported_value():
    from searchlab.report.plots import make_view

    study = synthetic_study(60)
    trials = study.get_trials()
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert len(pruned) >= 5
    view = make_view(trials, "optimizer", "optimizer")
    assert view.pruned_xs == [t.params["optimizer"] for t in pruned]
    assert view.pruned_ys == [t.intermediate_values[max(t.intermediate_values)] for t in pruned]
    assert {label: len(ys) for label, ys in view.pruned_groups()} == dict(view.stopped["PRUNED"])
    lr = make_view(trials, "optimizer.lr", "learning rate")
    assert lr.pruned_xs == [t.params["optimizer.lr"] for t in pruned] and len(lr.pruned_ys) == len(pruned)
    labelled = make_view(trials, "model.batch_norm", "bn", {"False": "off", "True": "on"})
    assert set(labelled.pruned_xs) <= {"off", "on"} and labelled.order == ["off", "on"]


def test_a_pruned_trial_without_a_finite_value_is_counted_not_plotted_and_a_pruned_only_key_gets_a_view():
    from searchlab.report.plots import make_view

    study = optuna.create_study(direction="maximize")
    for value, state in ((float("nan"), TrialState.PRUNED), (0.4, TrialState.PRUNED)):
        trial = study.ask()
        trial.suggest_categorical("model.batch_norm", [False, True])
        trial.report(0.1, 1)
        trial.report(value, 2)
        study.tell(trial, state=state)
    view = make_view(study.get_trials(), "model.batch_norm", "bn")
    assert view is not None and view.ys == [] and view.pruned_ys == [0.4]
    assert sum(view.stopped["PRUNED"].values()) == 2


def _study_with_a_rare_conditional_key() -> optuna.Study:
    """12 complete trials: lr drives the objective; adam (with its beta1) in only 2 of them, which also win."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    rng = random.Random(0)
    study = optuna.create_study(study_name="rare", direction="maximize")
    for i in range(12):
        adam = i < 2
        params = {"optimizer.lr": rng.uniform(0, 1), "optimizer": "adam" if adam else "sgd",
                  "model.batch_norm": i == 5}
        dists = {"optimizer.lr": FloatDistribution(0, 1), "optimizer": CategoricalDistribution(["sgd", "adam"]),
                 "model.batch_norm": CategoricalDistribution([False, True])}
        if adam:
            params["optimizer.beta1"], dists["optimizer.beta1"] = 0.8 + 0.1 * i, FloatDistribution(0.8, 0.95)
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dists,
                                                  value=params["optimizer.lr"] + 0.5 * adam,
                                                  user_attrs={"overrides": []}))
    return study


def test_importances_rank_only_keys_enough_complete_trials_cover(tmp_path):
    from searchlab.report.report import rankable

    study = _study_with_a_rare_conditional_key()
    complete = study.get_trials()
    ranked, left_out = rankable(complete, 5)
    # beta1: 2 trials < 5; batch_norm: True seen once, so only one value drawn twice; optimizer: sgd x10, adam x2
    assert ranked == ["optimizer", "optimizer.lr"]
    assert left_out == {"optimizer.beta1": "2 complete trials", "model.batch_norm": "fewer than 2 values drawn twice"}
    assert rankable(complete, 2)[0] == ["optimizer", "optimizer.beta1", "optimizer.lr"]
    report = write_report(study, compose_config([f"report.dir={tmp_path}"]), None)
    importances = report.summary["importances"]
    assert set(importances["values"]) == {"optimizer", "optimizer.lr"}
    assert "optimizer.beta1 (2 complete trials)" in importances["note"] and "model.batch_norm" in importances["note"]
    assert importances["rule"].startswith("a key is ranked only when at least 5 complete trials")
    page = (tmp_path / "rare" / "report.html").read_text()
    assert "Rule: a key is ranked only when" in page and "optimizer.beta1 (2 complete trials)" in page


def test_too_few_trials_to_rank_is_said_in_words(tmp_path):
    study = _study_with_a_rare_conditional_key()
    cfg = compose_config([f"report.dir={tmp_path}", "report.min_complete=13"])
    summary = write_report(study, cfg, None).summary
    assert summary["importances"]["values"] == {}
    assert summary["importances"]["note"].startswith("too few trials to rank the keys: 12 complete trials, fewer "
                                                     "than report.min_complete=13")
    assert "too few trials to rank" in (tmp_path / "rare" / "report.html").read_text()
    # enough trials for the study, but no single key covered enough: said too
    categorical_only = optuna.create_study(study_name="few", direction="maximize")
    for i in range(3):
        trial = categorical_only.ask()
        trial.suggest_categorical("model.batch_norm", [False, True])
        trial.set_user_attr("overrides", [])
        categorical_only.tell(trial, float(i))
    note = write_report(categorical_only, compose_config([f"report.dir={tmp_path}", "report.min_complete=3"]),
                        None).summary["importances"]["note"]
    assert note.startswith("too few trials to rank any key") and "model.batch_norm" in note


def _overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_technique_panels_labels_do_not_overlap(tmp_path):
    """Draws the panels of a study with every technique (seven schedules, six regimes) and checks, box by box, that
    no tick label runs into another, nor into another panel or its title."""
    import matplotlib.pyplot as plt

    from searchlab.report import plots

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(60):
        trial = study.ask()
        trial.suggest_categorical("scheduler", ["constant", "step", "exponential", "cosine", "onecycle", "plateau",
                                                "warmup_cosine"])
        trial.suggest_categorical("data.batch_size", ["full", 1, 16, 32, 64, 128])
        trial.suggest_categorical("optimizer", ["sgd", "momentum", "nesterov", "rmsprop", "adam", "adamw"])
        trial.suggest_float("optimizer.lr", 1e-4, 0.3, log=True)
        trial.suggest_categorical("model.kind", [f"a_long_name_{i}" for i in range(12)])  # a user's many choices
        trial.report(0.5, 1)
        study.tell(trial, 0.9 if trial.number % 4 else None, state=None if trial.number % 4 else TrialState.PRUNED)
    trials = study.get_trials()
    views = [plots.make_view(trials, "model.kind", "kind"),
             plots.make_view(trials, "scheduler", "learning-rate schedule"),
             plots.make_view(trials, "data.batch_size", "batch-size regime",
                             {"full": "full batch", "1": "stochastic (1)"}, "mini-batch"),
             plots.make_view(trials, "optimizer", "optimizer"),
             plots.make_view(trials, "optimizer.lr", "learning rate")]
    fig = plots._grid(views, "val_acc")
    fig.savefig(tmp_path / "panels.png", dpi=80)  # to look at when this fails
    fig.canvas.draw()  # at the figure's own dpi, which the boxes below are measured in
    renderer = fig.canvas.get_renderer()
    axes = fig.axes
    for ax in axes:
        low, high = sorted(ax.get_xlim())
        texts = [t for t in ax.get_xticklabels() if t.get_text() and low <= t.get_position()[0] <= high]  # drawn
        labels = [t.get_window_extent(renderer) for t in texts]
        assert labels
        angle = math.radians(texts[0].get_rotation())
        if angle == 0:
            for i, a in enumerate(labels):
                assert not any(_overlaps(a, b) for b in labels[i + 1:]), ax.get_title()
        else:
            # Turned labels are parallel strips, each hanging from its tick: two next to each other stand apart by
            # the ticks' distance times sin(angle), which must be at least a label's own (unturned) height.
            assert all(t.get_rotation_mode() == "anchor" and t.get_ha() == "right" for t in texts)
            ticks = ax.transData.transform([(t.get_position()[0], 0) for t in texts])[:, 0]
            heights = []
            for text in texts:
                text.set_rotation(0)
                heights.append(text.get_window_extent(renderer).height)
                text.set_rotation(math.degrees(angle))
            for i in range(len(texts) - 1):
                assert (ticks[i + 1] - ticks[i]) * math.sin(angle) >= max(heights[i], heights[i + 1]), ax.get_title()
        below = [*labels, ax.xaxis.label.get_window_extent(renderer)]
        for other in axes:
            if other is not ax:
                for box in below:
                    assert not _overlaps(box, other.get_window_extent(renderer)), (ax.get_title(), other.get_title())
                    assert not _overlaps(box, other.title.get_window_extent(renderer)), ax.get_title()
        assert all(0 <= box.y0 and box.x0 >= 0 and box.x1 <= fig.bbox.x1 for box in below), ax.get_title()
    plt.close(fig)


def test_lead_sections_open_the_report(tmp_path):
    import matplotlib.pyplot as plt
    import plotly.graph_objects as go

    from searchlab.report import Section, render_text

    study = synthetic_study(12, name="lead")
    figure, _ = plt.subplots()
    section = Section(key="ablation", title="Ablation verdict", html="<p>batch norm: +1.8 points</p>",
                      summary={"batch norm": 1.8}, text=["ablation: batch norm +1.8 points"],
                      figures=[("Effects", go.Figure(go.Bar(x=[1.8], y=["batch norm"], orientation="h")))],
                      pngs={"ablation.png": figure})
    report = write_report(study, compose_config([f"report.dir={tmp_path}"]), None, lead=[section])
    page = (tmp_path / "lead" / "report.html").read_text()
    assert page.index("Ablation verdict") < page.index("<table") < page.index("Optimization history")
    assert page.count("* plotly.js v") == 1 and page.index("* plotly.js v") < page.index("Ablation verdict") + 2000
    assert report.summary["ablation"] == {"batch norm": 1.8} and report.summary["plots"][0] == "ablation.png"
    assert (tmp_path / "lead" / "ablation.png").stat().st_size > 0
    assert render_text(report.summary).splitlines()[1] == "ablation: batch norm +1.8 points"
