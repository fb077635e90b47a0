"""The study report: counts by state, top trials, the best configuration as a command, parameter importances, and
one view per technique of deep-learning optimization, written as one offline HTML page, PNGs and summary.json.

It reads only the Optuna study (any storage the search uses) and the config's `report` section; which searched key
shows which technique comes from that section (conf/report/), never from code. Other modules put their own sections
at the head of the report by handing `write_report` a `Section` each (the ablation verdict, when there is one: the
commands hand it over; this module imports nothing of searchlab.ablate).
"""

from __future__ import annotations

import html
import json
import re
import time
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import optuna
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import CategoricalDistribution
from optuna.importance import BaseImportanceEvaluator, PedAnovaImportanceEvaluator
from optuna.search_space import intersection_search_space
from optuna.trial import FrozenTrial, TrialState

from searchlab.attrs import MLFLOW_PARENT_RUN_ID, OVERRIDES, STOPPED
from searchlab.config import ConfigError, Objectives, format_value, metric_names, redact
from searchlab.study import Best, best_trial, state_counts
from searchlab.study.search_work import train_command
from searchlab.tracking import Tracker

if TYPE_CHECKING:
    from searchlab.report.plots import View


def check_settings(settings: DictConfig) -> None:
    """The `report` section's values, checked before a search starts so a bad one cannot cost a finished study."""
    for key in ("top_k", "dpi", "min_complete"):
        value = settings[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"report.{key}: expected a positive integer, got {value!r}")
    if settings.importance not in settings.importances:
        raise ConfigError(f"report.importance: unknown '{settings.importance}' "
                          f"(choose from {', '.join(settings.importances)})")
    for name, entry in settings.techniques.items():
        if not isinstance(entry, DictConfig) or not isinstance(entry.get("param"), str):
            raise ConfigError(f"report.techniques.{name}: expected {{param: <searched key>}}, got {entry!r}")


def best_overrides(study: optuna.Study, overrides: Sequence[str]) -> tuple[Best, list[str]]:
    """The best trial, and the overrides that compose its full config: the given ones, then the trial's (which win)."""
    best = best_trial(study)
    if best is None:
        raise ConfigError(f"study.name: study '{study.study_name}' has no complete trial yet; run or resume it first")
    return best, with_trial(overrides, best.overrides)


def with_trial(overrides: Sequence[str], trial_overrides: Sequence[str]) -> list[str]:
    """The overrides that compose a trial's full config: the given ones, then the trial's (which win)."""

    def key(override: str) -> str:
        return override.lstrip("+~").split("=", 1)[0]

    trial_keys = {key(o) for o in trial_overrides}
    return [o for o in overrides if key(o) not in trial_keys] + list(trial_overrides)


@dataclass(frozen=True)
class Section:
    """A section another module puts at the head of the report, before the counts (the ablation verdict leads it).

    `html` is the section's body, already escaped; `summary` goes to summary.json under `key`; `text` are its lines
    for the terminal (`render_text`); `figures` are plotly figures (title, figure) shown in it, and `pngs` matplotlib
    figures saved as report files (name -> figure; the report closes them)."""

    key: str
    title: str
    html: str
    summary: Any = None
    text: Sequence[str] = ()
    figures: Sequence[tuple[str, Any]] = ()
    pngs: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Report:
    folder: Path
    summary: dict[str, Any]
    mlflow_run_id: str | None  # the parent run it was logged to, None when it was not
    note: str | None  # why it was not logged to MLflow


def report_folder(cfg: DictConfig, study_name: str) -> Path:
    """Where the study's report lives: report.dir/<study name, made safe for a folder name>."""
    return Path(cfg.report.dir) / re.sub(r"[^A-Za-z0-9._-]+", "_", study_name)


def write_report(study: optuna.Study, cfg: DictConfig, tracker: Tracker | None,
                 lead: Sequence[Section] = ()) -> Report:
    """Writes the report to report.dir/<study> and logs it to the study's parent MLflow run when there is one.

    `lead`: sections that open the report, in this order (see `Section`)."""
    from searchlab.report import plots  # plotly and matplotlib load only when a report is made

    start = time.perf_counter()
    settings = cfg.report
    check_settings(settings)
    objectives = Objectives.of_study(study, metric_names(cfg.study.metric))
    metric = objectives.primary  # with several objectives, the views that rank by one value use the first
    folder = report_folder(cfg, study.study_name)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"report.dir: cannot create '{folder}': {err.strerror}") from None
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    maximize = objectives.direction == "maximize"
    ranked = sorted(complete, key=lambda t: t.values[0], reverse=maximize)
    top = ranked[: settings.top_k]
    evaluator = _evaluator(settings)
    importances, importance_note = _importances(study, complete, evaluator, settings.min_complete,
                                                importance_target(objectives))
    rule = importance_rule(settings.min_complete)
    searched = list(dict.fromkeys(k for t in trials for k in t.params))
    slices = [v for v in (plots.make_view(trials, k, k) for k in searched) if v is not None]
    techniques = []
    for name, entry in settings.techniques.items():
        entry = OmegaConf.to_container(entry)
        view = plots.make_view(trials, entry["param"], name, entry.get("labels"), entry.get("other"))
        if view is not None:
            techniques.append(view)
    best = best_trial(study)
    summary = {
        "study": study.study_name, "direction": objectives.direction, "metric": metric,
        "counts": {**state_counts(study), "total": len(trials)},
        "stopped": study.user_attrs.get(STOPPED),  # why study.stop_when ended it before its budget, else None
        "best": None if best is None else {"number": best.number, "value": best.value, "params": best.params,
                                           "command": train_command(best.overrides)},
        "top_trials": [_trial_row(t) for t in top],
        "importances": {"evaluator": type(evaluator).__name__, "values": importances,
                        "note": importance_note, "rule": rule},
        "techniques": [_technique_summary(v, maximize) for v in techniques],
        "lead": [{"key": section.key, "title": section.title, "text": list(section.text)} for section in lead],
        **{section.key: section.summary for section in lead},
    }
    if objectives.several:
        summary.update(_pareto_summary(study, objectives))
    top_numbers = [t.number for t in top]
    summary["plots"] = [*_save_pngs(folder, lead, settings.dpi),
                        *plots.write_pngs(folder, study, importances, slices, techniques, top_numbers, metric,
                                          settings.dpi, objectives)]
    figures = plots.plotly_figures(study, importances, slices, techniques, top_numbers, metric, objectives)
    pareto = plots.pareto_figure(study, objectives) if objectives.several else None
    (folder / "report.html").write_text(_html(summary, figures, lead, pareto), encoding="utf-8")
    summary["seconds"] = round(time.perf_counter() - start, 3)
    (folder / "summary.json").write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
    parent = study.user_attrs.get(MLFLOW_PARENT_RUN_ID)
    if parent is None or tracker is None:
        return Report(folder, summary, None, "the study has no MLflow parent run (user attr mlflow_parent_run_id)"
                      if parent is None else "no tracking store given")
    try:
        tracker.log_report(parent, folder)
    except Exception as err:  # a study tracked in another store: the local report still stands
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return Report(folder, summary, None, f"cannot log to MLflow run {parent}: {redact(reason)[:200]}")
    return Report(folder, summary, parent, None)


def importance_target(objectives: Objectives) -> Callable[[FrozenTrial], float] | None:
    """Optuna's importance `target` in a multi-objective study: the first metric, negated when it is maximized
    (PED-ANOVA reads a target as lower-is-better; fANOVA's and MDI's importances do not depend on the sign). None
    with one metric, where Optuna reads the value and the direction itself."""
    if not objectives.several:
        return None
    sign = -1.0 if objectives.direction == "maximize" else 1.0
    return lambda trial: sign * trial.values[0]


def _pareto_summary(study: optuna.Study, objectives: Objectives) -> dict[str, Any]:
    """summary.json's keys for several objectives: each metric's direction, the front, and which metric the views of
    one value use."""
    return {
        "objectives": [{"metric": n, "direction": d} for n, d in zip(objectives.names, objectives.directions,
                                                                     strict=True)],
        "pareto_front": [{"number": t.number, "values": dict(zip(objectives.names, t.values, strict=True)),
                          "params": dict(t.params), "command": train_command(list(t.user_attrs.get(OVERRIDES, [])))}
                         for t in objectives.front(study)],
        "first_metric_note": f"{len(objectives.names)} objectives: the best trial, top trials, importances, "
                             f"techniques, slices and history use the first metric, {objectives.primary}; "
                             "pruning is off (Optuna cannot prune multi-objective studies), so trials report "
                             "no per-epoch values and there are no learning curves here (each trial's curves are "
                             "in its MLflow run)",
    }


def _evaluator(settings: DictConfig) -> BaseImportanceEvaluator:
    return instantiate(settings.importances[settings.importance])


def _save_pngs(folder: Path, sections: Sequence[Section], dpi: int) -> list[str]:
    import matplotlib.pyplot as plt

    names = []
    for section in sections:
        for name, figure in section.pngs.items():
            figure.savefig(folder / name, dpi=dpi)
            plt.close(figure)
            names.append(name)
    return names


def importance_rule(min_complete: int) -> str:
    """The rule `rankable` applies, in words, for the report and the README."""
    return (f"a key is ranked only when at least {min_complete} complete trials (report.min_complete) drew it and, "
            f"for a set of choices, at least 2 of its values were each drawn by 2 or more complete trials")


def rankable(complete: Sequence[FrozenTrial], min_complete: int) -> tuple[list[str], dict[str, str]]:
    """The keys enough complete trials cover to rank, and for each other key why it is left out.

    Why a rule: an importance compares the objective across a key's values, so it says something only when several
    complete trials drew the key, and drew more than one of its values. Without it a conditional key drawn by 2
    complete trials (optimizer.beta1, searched only for adam and adamw) was ranked first on a 20-trial study: the
    difference between two trials is noise. The per-key threshold is the one the report already applies to the whole
    study, report.min_complete (default 5; Optuna's PED-ANOVA advises 5 or more trials in its top quantile, so 5 is a
    floor, not a guarantee). A set of choices also needs two values drawn twice each: the least that compares one
    value with another on more than a single trial of each. A numeric key needs two distinct values."""
    by_key: dict[str, list[Any]] = {}
    categorical: set[str] = set()
    for trial in complete:
        for key, value in trial.params.items():
            by_key.setdefault(key, []).append(value)
            if isinstance(trial.distributions[key], CategoricalDistribution):
                categorical.add(key)
    ranked, left_out = [], {}
    for key, values in by_key.items():
        counts = Counter(map(repr, values))
        if len(values) < min_complete:
            left_out[key] = f"{len(values)} complete trial{'s' if len(values) != 1 else ''}"
        elif key in categorical and sum(n >= 2 for n in counts.values()) < 2:
            left_out[key] = "fewer than 2 values drawn twice"
        elif len(counts) < 2:
            left_out[key] = "one value only"
        else:
            ranked.append(key)
    return sorted(ranked), left_out


def _importances(study: optuna.Study, complete: list[FrozenTrial], evaluator: BaseImportanceEvaluator,
                 min_complete: int, target: Callable[[FrozenTrial], float] | None = None
                 ) -> tuple[dict[str, float], str | None]:
    """Importances of the keys `rankable` admits and, when there are none or some keys are left out, why, in words."""
    if len(complete) < min_complete:
        trials = f"{len(complete)} complete trial{'s' if len(complete) != 1 else ''}"
        return {}, (f"too few trials to rank the keys: {trials}, fewer than report.min_complete={min_complete}; "
                    f"run more trials (a larger study.n_trials) to see which keys matter")
    params, left_out = rankable(complete, min_complete)
    notes = []
    if left_out:
        notes.append(f"not ranked, too few complete trials cover them (fewer than {min_complete} drew them, or fewer "
                     f"than 2 of their values were drawn twice): "
                     + ", ".join(f"{k} ({why})" for k, why in left_out.items()))
    if not isinstance(evaluator, PedAnovaImportanceEvaluator):
        # fANOVA and mean-decrease-impurity need one common search space: the keys every complete trial has.
        common = set(intersection_search_space(complete))
        conditional = [k for k in params if k not in common]
        if conditional:
            notes.append(f"conditional keys not ranked by {type(evaluator).__name__}: {', '.join(conditional)}")
        params = [k for k in params if k in common]
    if not params:
        notes.insert(0, "too few trials to rank any key; run more trials (a larger study.n_trials)")
        return {}, "; ".join(notes)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        values = optuna.importance.get_param_importances(study, evaluator=evaluator, params=params, target=target)
    # Optuna warns once per key ("... parameter `x` ..."): one sentence per kind of warning, naming all its keys.
    keys_by_text: dict[str, list[str]] = {}
    # PED-ANOVA warns that a target is read as lower-is-better whenever one is given: importance_target sees to it
    for message in (str(w.message) for w in caught if "importance" in str(w.message).lower()
                    and not (target is not None and "low `target` values" in str(w.message))):
        keys_by_text.setdefault(re.sub(r"`[^`]+`", "{}", message), []).extend(re.findall(r"`([^`]+)`", message))
    notes += [text.replace("{}", ", ".join(keys)) if keys else text for text, keys in keys_by_text.items()]
    return {k: float(v) for k, v in values.items()}, "; ".join(notes) or None


def _trial_row(trial: FrozenTrial) -> dict[str, Any]:
    seconds = trial.duration.total_seconds() if trial.duration else None
    row = {"number": trial.number, "value": trial.values[0], "seconds": seconds, "params": dict(trial.params)}
    if len(trial.values) > 1:  # several objectives: `value` is the first metric's
        row["values"] = list(trial.values)
    return row


def _technique_summary(view: View, maximize: bool) -> dict[str, Any]:
    """Per choice: trials, median and best objective; for a continuous key: rank correlation and the best value.
    Pruned trials are counted (their last reported values are in the view's plots, not in these statistics)."""
    pick = max if maximize else min
    summary: dict[str, Any] = {"technique": view.title, "param": view.param, "complete": len(view.ys),
                               "pruned": sum(view.stopped["PRUNED"].values()) if view.categorical
                               else len(view.pruned_ys)}
    if view.categorical:
        summary["choices"] = [{"choice": label, "trials": len(ys), "median": float(np.median(ys)) if ys else None,
                               "best": pick(ys) if ys else None, "pruned": view.stopped["PRUNED"][label],
                               "failed": view.stopped["FAIL"][label]} for label, ys in view.groups()]
    else:
        xs = np.log(view.xs) if view.log else np.asarray(view.xs, dtype=float)
        summary["spearman"] = _spearman(xs, np.asarray(view.ys))
        summary["best_at"] = view.xs[view.ys.index(pick(view.ys))] if view.ys else None
    return summary


def _spearman(xs: np.ndarray, ys: np.ndarray) -> float | None:
    if len(xs) < 3 or np.ptp(xs) == 0 or np.ptp(ys) == 0:
        return None
    return float(np.corrcoef(np.argsort(np.argsort(xs)), np.argsort(np.argsort(ys)))[0, 1])


def render_text(summary: Mapping[str, Any], limit: int = 5) -> str:
    """The summary as a few terminal lines."""
    counts = summary["counts"]
    lines = [f"study '{summary['study']}': {counts['total']} trials: "
             + ", ".join(f"{counts[s]} {s.lower()}" for s in ("COMPLETE", "PRUNED", "FAIL"))
             + (f"; stopped early: {summary['stopped']}" if summary.get("stopped") else "")]
    for section in summary.get("lead", ()):
        lines += section["text"]
    best = summary["best"]
    for row in summary.get("pareto_front", ())[:limit]:
        lines.append(f"Pareto front #{row['number']}: "
                     + " ".join(f"{k}={format_value(v)}" for k, v in row["values"].items()))
    if best:
        lines.append(f"best {summary['metric']}={best['value']:.4f} at trial {best['number']}: {best['command']}")
    for row in summary["top_trials"][:limit]:
        lines.append(f"  #{row['number']:<4d} {row['value']:.4f}  " + " ".join(f"{k}={_short(v)}"
                                                                             for k, v in row["params"].items()))
    ranked = summary["importances"]["values"]
    if ranked:
        lines.append("importance: " + ", ".join(f"{k} {v:.2f}" for k, v in list(ranked.items())[:limit]))
    if summary["importances"]["note"]:
        lines.append(f"importance: {summary['importances']['note']}")
    return "\n".join(lines)


def _count_or_value(value: float) -> float | int:
    """A count (params) shown as an integer, not as 1.217e+04."""
    return int(value) if float(value).is_integer() else value


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# ---- HTML ----

_STYLE = """body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:3px 8px;font-size:90%;text-align:left}th{background:#eee}
pre{background:#f6f6f6;padding:1em;white-space:pre-wrap}.note{color:#855}"""


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_short(c) if c is not None else '')}</td>" for c in row)
                   + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _stopped(choice: Mapping[str, Any]) -> str:
    return "".join(f", {choice[k]} {k}" for k in ("pruned", "failed") if choice[k])


def _html(summary: Mapping[str, Any], figures: list[tuple[str, Any]], lead: Sequence[Section] = (),
          pareto: Any = None) -> str:
    """One self-contained page: plotly.js embedded once (with the first figure), no CDN, no external CSS; the lead
    sections first. `pareto`: the Pareto-front figure of a multi-objective study, shown with the front's table."""
    counts, best, metric = summary["counts"], summary["best"], summary["metric"]
    aim = ", ".join(f"{o['direction']} {o['metric']}" for o in summary.get("objectives", ())) or \
        f"{summary['direction']} {metric}"
    parts = [f"<h1>Study {html.escape(summary['study'])}</h1>",
             f"<p>{html.escape(aim)}; generated {time.strftime('%Y-%m-%d %H:%M:%S')}</p>"]
    if summary.get("stopped"):
        parts.append(f"<p class=note>Stopped early (study.stop_when): {html.escape(summary['stopped'])}.</p>")
    plotly_js = True  # embedded with the first figure on the page, wherever it is

    def figure_html(figure: Any) -> str:
        nonlocal plotly_js
        text, plotly_js = figure.to_html(full_html=False, include_plotlyjs=plotly_js), False
        return text

    for section in lead:
        parts += [f"<h2>{html.escape(section.title)}</h2>", section.html]
        parts += [f"<h3>{html.escape(title)}</h3>{figure_html(figure)}" for title, figure in section.figures]
    parts.append(_table(["state", "trials"], [[s.lower(), n] for s, n in counts.items()]))
    if "pareto_front" in summary:
        front = summary["pareto_front"]
        names = [o["metric"] for o in summary["objectives"]]
        parts += [f"<h2>Pareto front: {len(front)} trial{'s' if len(front) != 1 else ''} that no other trial beats "
                  f"in every metric</h2>", f"<p class=note>{html.escape(summary['first_metric_note'])}.</p>",
                  _table(["trial", *names, "command"], [[r["number"], *map(_count_or_value, r["values"].values()),
                                                         r["command"]] for r in front])]
        if pareto is not None:
            parts.append(figure_html(pareto))
    if best:
        first = " (the first metric)" if "pareto_front" in summary else ""
        parts += [f"<h2>Best: {html.escape(metric)}={best['value']:.4f}{first} at trial {best['number']}</h2>",
                  f"<pre>{html.escape(best['command'])}</pre>"]
    else:
        parts.append("<h2>No complete trial yet</h2>")
    keys = list(dict.fromkeys(k for row in summary["top_trials"] for k in row["params"]))
    parts += [f"<h2>Top {len(summary['top_trials'])} trials</h2>",
              _table(["trial", metric, "seconds", *keys],
                     [[r["number"], r["value"], r["seconds"], *(r["params"].get(k) for k in keys)]
                      for r in summary["top_trials"]])]
    importance = summary["importances"]
    parts.append(f"<h2>Parameter importances ({importance['evaluator']})</h2>")
    parts.append(f"<p>Rule: {html.escape(importance['rule'])}.</p>")
    if importance["note"]:
        parts.append(f"<p class=note>{html.escape(importance['note'])}</p>")
    parts.append(_table(["key", "importance"], [[k, v] for k, v in importance["values"].items()]))
    rows = []
    for tech in summary["techniques"]:
        if "choices" in tech:
            text = "; ".join(f"{c['choice']}: median {_short(c['median'])}, best {_short(c['best'])} (n={c['trials']}"
                             f"{_stopped(c)})" for c in tech["choices"] if c["trials"] + c["pruned"] + c["failed"])
        else:
            text = (f"rank correlation {_short(tech['spearman'])}; best at {_short(tech['best_at'])}"
                    + (f"; {tech['pruned']} pruned" if tech["pruned"] else ""))
        rows.append([tech["technique"], tech["param"], text])
    parts += ["<h2>Techniques</h2>", _table(["technique", "key", "objective of complete trials"], rows),
              "<p>In the plots, a pruned trial is a red cross at the last value it reported before it was stopped; "
              "the statistics above are of complete trials.</p>"]
    for title, figure in figures:
        parts.append(f"<h2>{html.escape(title)}</h2>")
        parts.append(figure_html(figure))
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(summary['study'])}</title>"
            f"<style>{_STYLE}</style></head><body>{''.join(parts)}</body></html>")
