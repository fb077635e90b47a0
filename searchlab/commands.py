"""What the `searchlab` subcommands and the Python API do: `search` runs a study, `worker` joins one, `train` trains
one configuration, `report` and `best` review a study, `storage-proxy` serves a study's storage to other machines.

Each composes and checks its config first: bad input of any kind raises ConfigError before any store is written.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import optuna
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from searchlab.attrs import APP_COMMAND, ENGINE_TAG, OVERRIDES
from searchlab.config import (
    PRUNING_OFF,
    Composer,
    ConfigError,
    Objectives,
    compose_config,
    metric_names,
    metric_setting,
    parse_overrides,
    redact,
    validate_config,
)
from searchlab.config.space import load_space
from searchlab.data import Splits
from searchlab.interrupts import terminated
from searchlab.packing.lone import fit_alone
from searchlab.report import (
    Report,
    best_overrides,
    check_settings,
    render_text,
    with_trial,
    write_report,
)
from searchlab.report.models import (
    KeepWeights,
    check_export_dir,
    example_input,
    export,
    export_best,
    log_study_models,
    models_to_log,
    module_with_weights,
)
from searchlab.report.progress import Progress
from searchlab.study import (
    WORKER_INDEX_ENV,
    Session,
    SessionSettings,
    TrialOutcome,
    best_trial,
    budget_used,
    check_sampler,
    cli_command,
    load_study,
    make_pruner,
    make_sampler,
    open_study,
    serve_storage_proxy,
    state_counts,
    worker_slots,
)
from searchlab.study.pack_trials import PackWork, choose_pack_size
from searchlab.study.search_work import SearchWork, train_command, training_overrides
from searchlab.study.stopping import stop_rules
from searchlab.study.warm_start import plan as plan_warm_start
from searchlab.tracking import Tracker
from searchlab.training import TrainResult, check_devices, check_targets, preflight, resolve_device
from searchlab.training.build import load_data, module_task
from searchlab.training.data_checks import diverged_rule


@dataclass
class SearchResult:
    """What `search` ran: the Optuna study, how this run ended (FINISHED, KILLED, FAILED) and the best trial (with
    several objectives, the Pareto front's trial with the best first metric; the front is `study.best_trials`)."""

    study: optuna.Study
    status: str
    best: optuna.trial.FrozenTrial | None


def _prepare(overrides: Sequence[str], check: bool = False) -> tuple[Composer, DictConfig, dict[str, str],
                                                                       Splits | None]:
    """Compose and validate the config and load the data: every check that needs no store. Resident data comes
    back on the CPU; a LightningDataModule is built per training (None here). `check` also trains one batch
    (searchlab.training.fitting.preflight), as a search does before it writes anything."""
    fixed = parse_overrides(overrides)
    composer = Composer(overrides)
    cfg = composer.base
    validate_config(cfg)
    resolve_device(cfg.trainer.accelerator)
    check_devices(cfg.trainer)
    data = load_data(cfg)
    splits = data if isinstance(data, Splits) else None
    if check:
        device = resolve_device(cfg.trainer.accelerator)
        objectives = Objectives.of(cfg.study)
        preflight(cfg, None if splits is None else splits.to(device), objectives.primary, objectives.names[1:])
    elif splits is not None:
        check_targets(splits, module_task(cfg))
    return composer, cfg, fixed, splits


def search(overrides: Sequence[str], as_worker: bool = False) -> SearchResult:
    """Runs (or resumes) the study the config names, printing one line per finished trial.

    With workers=N (N > 1, or auto with several GPUs) this process only spawns, watches and reports N `worker`
    processes. As a worker (`searchlab worker`) it runs the loop here and ends the study's parent run only when the
    budget is used up, since other workers may still be running.
    """
    composer, cfg, fixed, splits = _prepare(overrides, check=True)
    objectives = Objectives.of(cfg.study)
    direction = objectives.direction
    slots = [] if as_worker else worker_slots(cfg.workers, cfg.trainer.accelerator, cfg.trainer.devices)
    check_settings(cfg.report)
    space = load_space(composer, fixed)
    check_sampler(cfg, space)
    pack_size, pack_line = choose_pack_size(cfg, splits, space, composer)
    warm = plan_warm_start(list(cfg.study.get("warm_start") or []), cfg.study.get("warm_start_top_k", 5),
                           cfg.study.storage, cfg.study.name, space, composer, cfg.study.n_trials)
    sampler, pruner = make_sampler(cfg, space, _worker_index() if as_worker else 0), make_pruner(cfg)
    pack_members = cfg.study.get("pack_members", "independent")  # validated: independent | like_first
    settings = {
        "study.name": cfg.study.name, "study.n_trials": cfg.study.n_trials, "study.timeout": cfg.study.timeout,
        "study.direction": ", ".join(objectives.directions), "study.metric": metric_setting(objectives.names),
        "study.sampler": cfg.study.sampler, "study.pack": pack_size,
        **({"study.pack_auto": pack_line} if pack_line else {}),
        "study.pack_members": pack_members,
        "study.pruner": cfg.study.pruner, "study.seed": cfg.study.seed, "study.storage": redact(cfg.study.storage),
        "search": space.source, "overrides": redact(" ".join(overrides)),
        "study.warm_start": redact(str(_container(cfg.study.get("warm_start")))),
        "study.stop_when": _container(cfg.study.get("stop_when")),
    }
    session = Session(SessionSettings.of(cfg), lambda storage: open_study(cfg, objectives, storage, sampler, pruner),
                      objectives.stored, settings)
    study, tracker = session.study, session.tracker
    metric = objectives.primary
    done_before = budget_used(study)
    chosen = " (auto, from its name)" if cfg.study.direction == "auto" else f" (study.direction={direction})"
    if objectives.several:
        chosen = f" (Pareto front; {PRUNING_OFF})"
    print(f"study '{cfg.study.name}': {objectives.describe()}{chosen}; {done_before}/{cfg.study.n_trials} trials done; "
          f"storage "
          f"{redact(cfg.study.storage)}; tracking {redact(cfg.tracking.uri)}; space {space.source}"
          + (f"; {len(slots)} workers" if len(slots) > 1 else ""), flush=True)
    for line in space.describe_constraints() + ([pack_line] if pack_line else []):
        print(line, flush=True)
    if warm is not None:
        taken = session.once_at_start(warm.enqueue)
        for line in taken if taken is not None else [f"warm start: study '{cfg.study.name}' has trials already; "
                                                      "nothing enqueued"]:
            print(line, flush=True)

    progress = Progress(metric, cfg.study.n_trials, cfg.study.timeout, done_before, sys.stdout,
                        others=objectives.names[1:])

    def on_trial(outcome: TrialOutcome) -> None:
        progress.trial_finished(outcome, best_trial(study))

    def work() -> SearchWork:
        keep = KeepWeights(study, tracker, models_to_log(cfg.tracking, objectives.several), objectives)
        on_device = None if splits is None else splits.to(resolve_device(cfg.trainer.accelerator))
        args = (study, cfg, list(overrides), composer, space, on_device, tracker, session.parent_run_id, keep)
        if pack_size > 1:
            return PackWork(*args, size=pack_size, independent=pack_members == "independent")
        return SearchWork(*args)

    status = "FINISHED"
    start = time.monotonic()
    try:
        # study.max_diverged_at_start: the first trials all diverged at epoch 1 (the data, not the sampler's luck)
        rules = [rule] if (rule := diverged_rule(cfg)) is not None else []
        rules += stop_rules(study, _container(cfg.study.get("stop_when")), cfg.study.seed)  # study.stop_when
        command = cli_command("worker", *with_pack_size(overrides, pack_size))
        status = session.run(work, on_trial, slots, command, stop_rules=rules)
    finally:
        progress.close()
        best = best_trial(study)
        if not as_worker or session.budget.done() or session.stopped:
            session.end(status, None if best is None else vars(best), state_counts(study))
    if status == "KILLED":
        stopped = "terminated (SIGTERM)" if terminated() else "interrupted"
        print(f"{stopped}: run the same command to resume study '{cfg.study.name}' (a trial with a checkpoint "
              "resumes from it)", file=sys.stderr)
    counts = state_counts(study)
    print(f"\n{budget_used(study)}/{cfg.study.n_trials} trials in {time.monotonic() - start:.1f}s this run: "
          + ", ".join(f"{n} {state.lower()}" for state, n in counts.items())
          + (f"; stopped early: {session.stopped}" if session.stopped else ""))
    if best is None:
        print("no trial completed yet")
    elif objectives.several:
        print("\n".join(front_lines(study, objectives, list(overrides))))
    else:
        print(f"best {metric}={best.value:.4f} at trial {best.number}")
        for key, value in best.params.items():
            print(f"  {key} = {value}")
        print(f"re-run it alone:\n  {train_command(best.overrides)}")
    if status == "FINISHED" and not as_worker:  # the budget is used: the best trials' models (model_out)
        _log_models(study, cfg, tracker)
    if status != "KILLED" and not as_worker:  # the parent reports; workers started by hand leave it to `report`
        try:
            _print_report(_write_report(study, cfg, tracker))
        except Exception as err:  # the study is done and stored: a report can be made again with `report`
            print(f"searchlab: report not written ({type(err).__name__}: {redact(str(err))[:200]}); "
                  f"make it with: searchlab report study.name={cfg.study.name}", file=sys.stderr)
    return SearchResult(study, status, None if best is None else study.trials[best.number])


def _container(node: object) -> object:
    """A config node as plain Python (a mapping or list), other values as they are."""
    return OmegaConf.to_container(node) if isinstance(node, (DictConfig, ListConfig)) else node


def with_pack_size(overrides: Sequence[str], size: int) -> list[str]:
    """The workers' overrides: study.pack=auto as the size this process chose, so that N workers started together
    do not each probe the machine the others are already training on."""
    kept = [o for o in overrides if o.lstrip("+").split("=", 1)[0] != "study.pack"]
    return [*kept, f"study.pack={size}"]


def _worker_index() -> int:
    """$SEARCHLAB_WORKER (set by `search workers=N`, or by hand: $SLURM_PROCID), else the pid: any number that
    differs between the study's workers, so their samplers differ."""
    text = os.environ.get(WORKER_INDEX_ENV, "")
    if not text:
        return os.getpid()
    if not text.isdigit():
        raise ConfigError(f"{WORKER_INDEX_ENV}: expected a non-negative integer (the worker's number), got {text!r}")
    return int(text)


def worker(overrides: Sequence[str]) -> SearchResult:
    """Joins the study the config names (started by `search` here or on another machine) and runs its trials."""
    return search(overrides, as_worker=True)


def _log_models(study: optuna.Study, cfg: DictConfig, tracker: Tracker) -> None:
    """The best trials' models to their MLflow runs; a failure is reported, not raised: the study is done."""
    try:
        for line in log_study_models(study, cfg.tracking, tracker):
            print(line, flush=True)
    except Exception as err:
        print(f"searchlab: model not logged ({type(err).__name__}: {redact(str(err))[:300]}); log it with: "
              f"searchlab report study.name={cfg.study.name}", file=sys.stderr)


TRAIN_EXPERIMENT = "searchlab-train"  # the MLflow experiment of `searchlab train tracking.log_models=...` runs


def train(overrides: Sequence[str], quiet: bool = False, export_dir: str | None = None) -> TrainResult:
    """Trains the configuration once, no study; prints per-epoch metrics (what the module logs) and a final
    `metrics: {...}` JSON line with the best epoch's value of study.metric and the test split, both measured with
    the best epoch's weights.

    `export_dir` saves the trained model (best epoch) there as an MLflow model. `tracking.log_models` given on the
    command line (best or top_k: one training has one model) also tracks the training as a run of the MLflow
    experiment `searchlab-train`, with the model logged to it; by default a training writes no MLflow store.
    """
    fixed = parse_overrides(overrides)
    folder = None if export_dir is None else check_export_dir(export_dir)
    _, cfg, _, splits = _prepare(overrides)
    objectives = Objectives.of(cfg.study)
    direction = objectives.direction
    data = splits
    splits = None if splits is None else splits.to(resolve_device(cfg.trainer.accelerator))
    tracker = run_id = None
    if fixed.get("tracking.log_models", "none") != "none":
        tracker = Tracker(cfg.tracking.uri, cfg.tracking.artifact_root, cfg.tracking.flush_seconds)
        kept = training_overrides(list(overrides))
        run_id = tracker.start_training(TRAIN_EXPERIMENT, OmegaConf.to_yaml(cfg), train_command(kept),
                                        parse_overrides(kept))

    def show(epoch: int, metrics: dict[str, float]) -> None:
        if not quiet:
            print(f"epoch {epoch:3d}  " + "  ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())), flush=True)
        if tracker is not None:
            tracker.log_epoch(run_id, epoch, metrics)

    try:
        result = fit_alone(cfg, splits, on_epoch=show, test=True)
    except BaseException as err:
        if tracker is not None:
            tracker.end_trial(run_id, "FAIL", None, f"{type(err).__name__}: {str(err)[:300]}")
        raise
    best = result.best(objectives.primary, direction)
    summary = {"best_" + objectives.primary: best, "best_epoch": result.best_epoch,
               **(result.history[-1] if result.history else {}), **result.test, "epochs": len(result.history),
               "seconds": round(result.seconds, 3)}
    if objectives.several:  # the values a study would give this training (searchlab.config.objectives)
        values = objectives.values_of(result)
        summary["objectives"] = None if values is None else dict(zip(objectives.names, values, strict=True))
    if result.stop_reason:
        summary["stopped"] = result.stop_reason
    if result.ended:
        summary["ended"] = result.ended
    if not quiet:
        print("metrics: " + json.dumps(summary))
    if folder is not None or tracker is not None:
        module, example = _trained_module(cfg, data, result)
        if folder is not None:
            serialization = export(folder, module, example)
            if not quiet:
                print(f"model: {folder} (MLflow model, {serialization}; epoch {result.best_epoch})")
        if tracker is not None:
            info = tracker.log_model(run_id, module, example, OmegaConf.select(cfg, "tracking.register_model"))
            tracker.log_epoch(run_id, len(result.history), result.test)
            tracker.end_trial(run_id, "PRUNED" if result.stop_reason else "COMPLETE", best,
                              result.stop_reason or result.ended, {ENGINE_TAG: result.engine})
            if not quiet:
                registered = f", registered v{info.registered_version}" if info.registered_version else ""
                print(f"model: {info.uri} ({info.serialization}, {info.seconds:.1f}s{registered})")
    return result


def _trained_module(cfg: DictConfig, data: Splits | None, result: TrainResult) -> tuple[torch.nn.Module,
                                                                                           torch.Tensor]:
    """The trained module with its best epoch's weights (rebuilt from them after DDP, whose ranks keep theirs),
    and an input example of the data."""
    if result.weights is None:
        raise ConfigError(f"no epoch gave a finite {Objectives.of(cfg.study).primary}: there is no best epoch's "
                          "model to save")
    if result.module is None:
        return module_with_weights(cfg, result.weights)
    return result.module, example_input(data if data is not None else load_data(cfg))


def storage_proxy(overrides: Sequence[str]) -> int:
    """Serves study.storage (an RDB URL) as Optuna's gRPC storage proxy on study.proxy.host:port until Ctrl-C."""
    cfg = compose_config(overrides)
    validate_config(cfg)
    serve_storage_proxy(cfg.study.storage, cfg.study.proxy.host, cfg.study.proxy.port)
    return 0


def report(overrides: Sequence[str]) -> int:
    """Writes the report of an existing study (HTML, PNGs, summary.json) and logs it to its parent MLflow run."""
    cfg = compose_config(overrides)
    validate_config(cfg)
    study = load_study(cfg.study.storage, cfg.study.name)
    tracker = Tracker(cfg.tracking.uri, cfg.tracking.artifact_root)
    result = _write_report(study, cfg, tracker)
    print(render_text(result.summary))
    _print_report(result)
    _log_models(study, cfg, tracker)  # for workers started by hand: no parent logged them; logged ones are skipped
    return 0


def _write_report(study: optuna.Study, cfg: DictConfig, tracker: Tracker) -> Report:
    """The study's report, led by the verdict of `searchlab ablate` when the study has one."""
    from searchlab.ablate.view import ablation_lead  # matplotlib loads only when a report is made

    return write_report(study, cfg, tracker, lead=ablation_lead(study, cfg))


def _print_report(result: Report) -> None:
    where = f"MLflow run {result.mlflow_run_id} (report/)" if result.mlflow_run_id else f"not in MLflow: {result.note}"
    print(f"report: {result.folder / 'report.html'} ({result.summary['seconds']:.1f}s); {where}")


def best_config(overrides: Sequence[str], export_dir: str | None = None) -> int:
    """Prints the best trial's full config (base overrides + the trial's) as YAML and as a command line;
    `export_dir` also writes its model (its saved best-epoch weights) there as an MLflow model. A multi-objective
    study has no one best trial: this lists its Pareto front, each trial's values and command (`export_dir`: the
    model of the front's trial with the best first metric)."""
    cfg = compose_config(overrides)
    validate_config(cfg)
    folder = None if export_dir is None else check_export_dir(export_dir)
    study = load_study(cfg.study.storage, cfg.study.name)
    if APP_COMMAND in study.user_attrs:  # a study of the Hydra sweeper: its trials are jobs of the user's app
        if folder is not None:
            raise ConfigError("--export: a study of searchlab's Hydra sweeper keeps no model weights (its app trains "
                              "them); re-run the best trial with the command `searchlab best` prints")
        from searchlab.hydra import app_best_lines  # it loads Lightning (its callback's base classes)

        print("\n".join(app_best_lines(study)))
        return 0
    if folder is not None:
        trial = export_best(study, Tracker(cfg.tracking.uri, cfg.tracking.artifact_root), folder)
        print(f"# model of trial {trial.number}: {folder} (MLflow model; mlflow.pytorch.load_model('{folder}'))")
    top, chosen = best_overrides(study, overrides)
    if len(study.directions) > 1:
        objectives = Objectives.of_study(study, metric_names(cfg.study.metric))
        print(f"# study '{cfg.study.name}': {objectives.describe()}")
        print("\n".join(front_lines(study, objectives, list(overrides))))
        return 0
    print(f"# best trial {top.number} of study '{cfg.study.name}': "
          f"{study.user_attrs.get('metric', cfg.study.metric)}={top.value:.4f}")
    print(OmegaConf.to_yaml(compose_config(chosen), resolve=True), end="")
    print(f"# re-run it alone:\n{train_command(chosen)}")
    return 0


def front_lines(study: optuna.Study, objectives: Objectives, overrides: list[str]) -> list[str]:
    """The Pareto front of a multi-objective study, best first metric first: each trial's values and the command
    that trains it alone (the given overrides, then the trial's)."""
    front = objectives.front(study)
    lines = [f"Pareto front: {len(front)} trial{'s' if len(front) != 1 else ''} that no other trial beats in every "
             f"metric ({objectives.describe()}):"]
    for trial in front:
        chosen = with_trial(overrides, trial.user_attrs.get(OVERRIDES, []))
        lines += [f"# trial {trial.number}: {objectives.format(trial.values)}", train_command(chosen)]
    return lines
