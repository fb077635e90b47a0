"""Views of an ablation result (the dict `searchlab ablate` writes as ablation.json): the terminal table, and the
report's section (report.Section), which leads the study report when the study has one: one sentence per technique,
a forest plot of the effects with their intervals, the tables."""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Mapping
from typing import Any

import optuna
from matplotlib.figure import Figure
from omegaconf import DictConfig

from searchlab.report import Section, report_folder
from searchlab.study import best_trial

FOREST_PNG = "ablation_effects.png"
_COLORS = {"worse": "#c0392b", "better": "#1e8449", "no effect": "#7f8c8d", "inconclusive": "#b7950b",
           "undetermined": "#b7950b", "failed": "#000000"}


def _number(value: float | None, scale: float, signed: bool = False) -> str:
    if value is None:
        return "-"
    if scale != 1:
        return f"{value * scale:+.1f}" if signed else f"{value * scale:.1f}"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def _interval(stats: Mapping[str, Any], scale: float, signed: bool = False) -> str:
    if stats["mean"] is None:
        return "-"
    if stats["low"] is None:
        return f"{_number(stats['mean'], scale, signed)} (n={stats['n']})"
    return (f"{_number(stats['mean'], scale, signed)} [{_number(stats['low'], scale, signed)}, "
            f"{_number(stats['high'], scale, signed)}]")


def _units(result: Mapping[str, Any]) -> str:
    return " (points)" if result["scale"] != 1 else ""


def render_text(result: Mapping[str, Any]) -> str:
    """The verdict as terminal lines: finalists, effects, sentences."""
    scale, metric, test = result["scale"], result["metric"], result["test_metric"]
    level = f"{result['confidence']:.0%}"
    seeds = result["seeds"]
    lines = [f"\nablation of study '{result['study']}': {len(seeds)} seeds ({seeds[0]}..{seeds[-1]}), mean "
             f"[{level} CI]{_units(result)}; {result['runs']['complete']}/{result['runs']['planned']} trainings "
             f"complete", f"{'finalist':<14} {'study':>8}  {metric + ' ' + _units(result):<26} {test:<26} P(best)"]
    for row in result["finalists"]:
        study_value = f"{row['study_value']:.4f}" if row["study_value"] is not None else "-"
        lines.append(f"{row['variant']:<14} {study_value:>8}  {_interval(row['objective'], scale):<26} "
                     f"{_interval(row['test'], scale):<26} {row['p_best']:.2f}")
    if result["effects"]:
        lines.append(f"\neffects vs the winner ({result['winner']['variant']}): variant - winner, paired")
        lines.append(f"{'variant':<26} {'d ' + metric:<26} {'d ' + test:<26} verdict")
        for e in result["effects"]:
            lines.append(f"{e['variant']:<26} {_interval(e['objective'], scale, True):<26} "
                         f"{_interval(e['test'], scale, True):<26} {e['verdict']}")
    for skipped in result["skipped"]:
        lines.append(f"skipped {skipped['variant']}: {skipped['reason']}")
    if result["sentences"]:
        lines.append("")
        lines += result["sentences"]
    return "\n".join(lines)


def forest(result: Mapping[str, Any]) -> Figure | None:
    """The effects with their intervals, objective and test metric side by side; None without effects."""
    effects = result["effects"]
    if not effects:
        return None
    scale = result["scale"]
    labels = [f"{e['technique']}: {e['setting']}" for e in effects]
    left = 0.3 + 0.062 * max(len(label) for label in labels)
    width, height = left + 2 * 3.2 + 0.6, 1.3 + 0.3 * len(effects)
    fig = Figure(figsize=(width, height))
    ys = list(range(len(effects)))[::-1]
    panel = 3.2 / width
    for i, (key, name) in enumerate((("objective", result["metric"]), ("test", result["test_metric"]))):
        ax = fig.add_axes((left / width + i * (panel + 0.3 / width), 0.45 / height, panel, 1 - 1.15 / height))
        ax.axvline(0, color="#555", lw=0.8)
        for y, e in zip(ys, effects, strict=True):
            stats = e[key]
            if stats["mean"] is None:
                continue
            mean = stats["mean"] * scale
            color = _COLORS.get(e["verdict"], "#333") if key == "objective" else "#2c3e50"
            if key == "test" and stats["low"] is not None and (stats["low"] > 0 or stats["high"] < 0):
                color = "#8e44ad"  # the test interval excludes 0 too
            if stats["low"] is not None:
                ax.plot([stats["low"] * scale, stats["high"] * scale], [y, y], color=color, lw=2)
            ax.plot([mean], [y], "o", color=color, ms=5)
        ax.set_yticks(ys)
        ax.set_yticklabels(labels if i == 0 else [], fontsize=8)
        ax.set_ylim(-0.7, len(effects) - 0.3)
        ax.set_title(f"Δ {name}{_units(result)}", fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"Effect vs the winner ({result['winner']['variant']}), {result['confidence']:.0%} CI over "
                 f"{len(result['seeds'])} seeds", fontsize=9, y=1 - 0.08 / height)
    return fig


def _png(fig: Figure, dpi: int) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def section(result: Mapping[str, Any], dpi: int = 80, current_best: int | None = None
            ) -> tuple[str, dict[str, Figure]]:
    """(HTML fragment, figures by PNG file name) of the ablation verdict, its title aside (see `title`); the fragment
    embeds the PNG itself, so the page stays one offline file."""
    scale, metric, test = result["scale"], result["metric"], result["test_metric"]
    winner = result["winner"]
    parts = [f"<p>{len(result['seeds'])} seeds per configuration, the same for all (paired); "
             f"{result['runs']['complete']}/{result['runs']['planned']} trainings complete. "
             f"{html.escape(result['method'])}.</p>"]
    if current_best is not None and current_best != winner["trial"]:
        parts.append(f"<p class=note>The study's best is now trial {current_best}; this ablation is of trial "
                     f"{winner['trial']}: run <code>searchlab ablate study.name={html.escape(result['study'])}</code> "
                     f"again.</p>")
    if result["sentences"]:
        parts.append("<ul>" + "".join(f"<li>{html.escape(s)}</li>" for s in result["sentences"]) + "</ul>")
    figures: dict[str, Figure] = {}
    fig = forest(result)
    if fig is not None:
        figures[FOREST_PNG] = fig
        data = base64.b64encode(_png(fig, dpi)).decode("ascii")
        parts.append(f"<p><img alt='effects with intervals' src='data:image/png;base64,{data}'></p>")
    units = _units(result)
    parts.append(_table(
        ["finalist", "trial", f"{metric} in the study", f"{metric} mean [CI]{units}", f"{test} mean [CI]{units}",
         "P(best)"],
        [[r["variant"], r["trial"], "-" if r["study_value"] is None else f"{r['study_value']:.4f}",
          _interval(r["objective"], scale), _interval(r["test"], scale), f"{r['p_best']:.2f}"]
         for r in result["finalists"]]))
    if result["effects"]:
        parts.append(_table(
            ["technique", "variant", "winner's setting", f"Δ {metric} [CI]{units}", f"Δ {test} [CI]{units}", "n",
             "verdict"],
            [[e["technique"], e["variant"], e["winner_setting"], _interval(e["objective"], scale, True),
              _interval(e["test"], scale, True), e["objective"]["n"], e["verdict"] + (
                  f" ({e['error']})" if e.get("error") else "")] for e in result["effects"]]))
    if result["skipped"]:
        parts.append("<p>Not run: " + "; ".join(html.escape(f"{s['variant']} ({s['reason']})")
                                                for s in result["skipped"]) + "</p>")
    parts.append(f"<pre>winner: {html.escape(winner['command'])}</pre>")
    return "<section id=ablation>" + "".join(parts) + "</section>", figures


def title(result: Mapping[str, Any]) -> str:
    return f"Which techniques mattered: ablation of trial {result['winner']['trial']}"


def ablation_lead(study: optuna.Study, cfg: DictConfig) -> list[Section]:
    """The ablation verdict as the report's lead section (write_report's `lead`), from ablation.json in the study's
    report folder; none when the study has no ablation. The whole result goes to summary.json under "ablation"."""
    path = report_folder(cfg, study.study_name) / "ablation.json"
    if not path.is_file():
        return []
    result = json.loads(path.read_text(encoding="utf-8"))
    if result.get("study") != study.study_name:
        return []
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    fragment, figures = section(result, cfg.report.dpi, best_trial(study).number if complete else None)
    return [Section(key="ablation", title=title(result), html=fragment, text=list(result["sentences"]),
                    summary={k: v for k, v in result.items() if k != "seconds"}, pngs=figures)]
