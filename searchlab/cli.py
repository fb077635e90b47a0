"""The `searchlab` command: `search` runs a study, `train` trains one configuration, `report` and `best` review a
study. Wiring only.

Bad input of any kind ends here as one line on stderr and exit code 2, before any store is written.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

from omegaconf import DictConfig, OmegaConf

from searchlab.config import Composer, ConfigError, compose_config, parse_overrides, redact, validate_config
from searchlab.data import Splits, load_data
from searchlab.progress import Progress
from searchlab.report import Report, best_overrides, check_settings, load_study, render_text, write_report
from searchlab.space import load_space
from searchlab.study import (
    StudyStopped,
    best_trial,
    budget_used,
    make_pruner,
    make_sampler,
    open_storage,
    open_study,
    run_trials,
    state_counts,
)
from searchlab.tracking import Tracker
from searchlab.train import fit, resolve_device
from searchlab.trial import TrialRunner, train_command

EXIT_BAD_INPUT = 2
EXIT_STUDY_FAILED = 1
EXIT_INTERRUPTED = 130


def _prepare(overrides: Sequence[str]) -> tuple[Composer, DictConfig, dict[str, str], Splits]:
    """Compose and validate the config and load the data: every check that needs no store."""
    fixed = parse_overrides(overrides)
    composer = Composer(overrides)
    cfg = composer.base
    validate_config(cfg)
    device = resolve_device(cfg.trainer.accelerator)
    splits = load_data(cfg.data, cfg.seed).to(device)
    return composer, cfg, fixed, splits


def search(overrides: Sequence[str]) -> int:
    """Runs (or resumes) the study the config names, printing one line per finished trial."""
    composer, cfg, fixed, splits = _prepare(overrides)
    check_settings(cfg.report)
    space = load_space(composer, fixed)
    sampler, pruner = make_sampler(cfg, space), make_pruner(cfg)
    tracker = Tracker(cfg.tracking.uri, cfg.tracking.artifact_root)
    storage = open_storage(cfg.study.storage)
    study = open_study(cfg, storage, sampler, pruner)
    settings = {
        "study.name": cfg.study.name, "study.n_trials": cfg.study.n_trials, "study.timeout": cfg.study.timeout,
        "study.direction": cfg.study.direction, "study.metric": cfg.study.metric, "study.sampler": cfg.study.sampler,
        "study.pruner": cfg.study.pruner, "study.seed": cfg.study.seed, "study.storage": redact(cfg.study.storage),
        "search": space.source, "overrides": redact(" ".join(overrides)),
    }
    parent_run_id = tracker.study_run(cfg.study.name, settings)
    study.set_user_attr("mlflow_parent_run_id", parent_run_id)
    study.set_user_attr("metric", cfg.study.metric)
    runner = TrialRunner(study, cfg, list(overrides), composer, space, splits, tracker, parent_run_id)
    metric = cfg.study.metric
    done_before = budget_used(study)
    print(f"study '{cfg.study.name}': {done_before}/{cfg.study.n_trials} trials done; storage "
          f"{redact(cfg.study.storage)}; tracking {redact(cfg.tracking.uri)}; space {space.source}", flush=True)

    progress = Progress(metric, cfg.study.n_trials, cfg.study.timeout, done_before, sys.stdout)
    status = "FINISHED"
    start = time.monotonic()
    try:
        run_trials(study, runner, cfg, lambda outcome: progress.trial_finished(outcome, best_trial(study)))
    except KeyboardInterrupt:
        status = "KILLED"
        print(f"interrupted: run the same command to resume study '{cfg.study.name}'", file=sys.stderr)
    except StudyStopped as err:
        status = "FAILED"
        print(f"searchlab: study stopped: {redact(str(err))}", file=sys.stderr)
    finally:
        progress.close()
        best = best_trial(study)
        tracker.end_study(parent_run_id, None if best is None else vars(best), state_counts(study), status)
    counts = state_counts(study)
    print(f"\n{budget_used(study)}/{cfg.study.n_trials} trials in {time.monotonic() - start:.1f}s this run: "
          + ", ".join(f"{n} {state.lower()}" for state, n in counts.items()))
    if best is None:
        print("no trial completed yet")
    else:
        print(f"best {metric}={best.value:.4f} at trial {best.number}")
        for key, value in best.params.items():
            print(f"  {key} = {value}")
        print(f"re-run it alone:\n  {train_command(best.overrides)}")
    if status != "KILLED":
        try:
            _print_report(write_report(study, cfg, tracker))
        except Exception as err:  # the study is done and stored: a report can be made again with `report`
            print(f"searchlab: report not written ({type(err).__name__}: {redact(str(err))[:200]}); "
                  f"make it with: searchlab report study.name={cfg.study.name}", file=sys.stderr)
    return {"KILLED": EXIT_INTERRUPTED, "FAILED": EXIT_STUDY_FAILED}.get(status, 0)


def train(overrides: Sequence[str]) -> int:
    """Trains the configuration once, no study, and prints per-epoch and test metrics."""
    _, cfg, _, splits = _prepare(overrides)
    print(f"{'epoch':>5}  {'train_loss':>10}  {'val_loss':>8}  {'val_acc':>7}  {'lr':>9}")

    def show(epoch: int, m: dict[str, float]) -> None:
        print(f"{epoch:5d}  {m['train_loss']:10.4f}  {m['val_loss']:8.4f}  {m['val_acc']:7.4f}  {m['lr']:9.3g}",
              flush=True)

    result = fit(cfg, splits, on_epoch=show, test=True)
    summary = {"best_" + cfg.study.metric: result.best(cfg.study.metric, cfg.study.direction),
               **result.history[-1], **result.test, "epochs": len(result.history), "seconds": round(result.seconds, 3)}
    if result.stop_reason:
        summary["stopped"] = result.stop_reason
    print("metrics: " + json.dumps(summary))
    return 0


def report(overrides: Sequence[str]) -> int:
    """Writes the report of an existing study (HTML, PNGs, summary.json) and logs it to its parent MLflow run."""
    cfg = compose_config(overrides)
    validate_config(cfg)
    study = load_study(cfg.study.storage, cfg.study.name)
    result = write_report(study, cfg, Tracker(cfg.tracking.uri, cfg.tracking.artifact_root))
    print(render_text(result.summary))
    _print_report(result)
    return 0


def _print_report(result: Report) -> None:
    where = f"MLflow run {result.mlflow_run_id} (report/)" if result.mlflow_run_id else f"not in MLflow: {result.note}"
    print(f"report: {result.folder / 'report.html'} ({result.summary['seconds']:.1f}s); {where}")


def best_config(overrides: Sequence[str]) -> int:
    """Prints the best trial's full config (base overrides + the trial's) as YAML and as a command line."""
    cfg = compose_config(overrides)
    validate_config(cfg)
    study = load_study(cfg.study.storage, cfg.study.name)
    top, chosen = best_overrides(study, overrides)
    print(f"# best trial {top.number} of study '{cfg.study.name}': "
          f"{study.user_attrs.get('metric', cfg.study.metric)}={top.value:.4f}")
    print(OmegaConf.to_yaml(compose_config(chosen), resolve=True), end="")
    print(f"# re-run it alone:\n{train_command(chosen)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="searchlab", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, helptext in (("search", "run or resume the study named by study.name"),
                           ("train", "train one configuration, no study, and print its metrics"),
                           ("report", "write the report of the study named by study.name (HTML, PNGs, MLflow)"),
                           ("best", "print the best trial's full config as YAML and as a command line")):
        sub = commands.add_parser(name, help=helptext, description=helptext + ". Arguments are Hydra overrides.")
        sub.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. optimizer=adam trainer.max_epochs=5")
    args = parser.parse_args(argv)
    try:
        return {"search": search, "train": train, "report": report, "best": best_config}[args.command](args.overrides)
    except ConfigError as err:
        print(f"searchlab: error: {redact(str(err))}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
