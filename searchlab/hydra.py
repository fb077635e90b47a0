"""The job side of searchlab's Hydra sweeper (`hydra/sweeper=searchlab`): the Lightning callback that ties one job of
the user's `@hydra.main` app to its Optuna trial and its MLflow child run.

The sweeper adds the callback to every job through an override of the app's callbacks group (`hydra.sweeper.
callbacks_key`, default `callbacks`, where lightning-hydra-template's `instantiate_callbacks` reads them), e.g.
`+callbacks.searchlab._target_=searchlab.hydra.TrialCallback +callbacks.searchlab.trial=3 ...`. So the job learns
its trial from its own config, not from process state, and any launcher whose jobs reach the study's storage and
the MLflow store works. An app that does not instantiate callbacks from config adds `trial_callback()` to its list.

After each training epoch (and its validation) the callback logs every metric the module logged to the trial's
MLflow run, reports `study.metric` to the trial and stops the training when the pruner says so; the sweeper then
tells the trial PRUNED, whatever the job returns (the reason is in the trial's user attr `searchlab.pruned`).
`searchlab best` on a sweeper's study prints the app's own command with the best trial's values.

Checkpoints: given `checkpoint` (a path the sweeper chose per trial), the callback writes searchlab's trial checkpoint
(searchlab.training.checkpoints: atomic writes at epoch ends, the last finished epoch on SIGTERM or Ctrl-C, the metric
history and which trial it belongs to). A retry of the trial (its job killed or terminated) gets the app's own override
`ckpt_path=<that path>`, which an app in lightning-hydra-template's layout passes to `trainer.fit`; the callback then
tells the retry's trial and MLflow run which epoch it resumed from and hands them the epochs trained before.
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import optuna

from searchlab.attrs import APP_COMMAND, APP_VALUE, EPOCHS_REPORTED, OVERRIDES, PRUNED_BY_CALLBACK, RESUMED_FROM_EPOCH
from searchlab.training.checkpoints import CheckpointPlan, TrialCheckpoints

TARGET = "searchlab.hydra.TrialCallback"
ENTRY = "searchlab"  # the callback's entry in the app's callbacks group: callbacks.searchlab


def _callback_bases() -> tuple[type, ...]:
    """Lightning's Callback of each installed package: `lightning.pytorch` and `pytorch_lightning` are two copies of
    the same classes, and each package's Trainer accepts only callbacks of its own Callback class. The hooks used
    here have the same names and arguments in both."""
    bases: list[type] = []
    for package in ("lightning.pytorch", "pytorch_lightning"):
        try:
            module = __import__(package, fromlist=["Callback"])
        except ImportError:
            continue
        bases.append(module.Callback)
    if not bases:
        raise ImportError("searchlab.hydra.TrialCallback needs lightning or pytorch-lightning installed")
    return tuple(bases)


# One storage and one tracker per URL and process: with Hydra's basic launcher every job runs in the sweeper's
# process, and opening an MLflow store costs ~0.1-1 s.
_storages: dict[str, Any] = {}
_trackers: dict[str, Any] = {}


def _storage(url: str) -> Any:
    from searchlab.study import open_storage

    if url not in _storages:
        _storages[url] = open_storage(url)  # no heartbeat here: the sweeper's process keeps the trial's
    return _storages[url]


def _tracker(uri: str) -> Any:
    from searchlab.tracking import Tracker

    if uri not in _trackers:
        _trackers[uri] = Tracker(uri, None, flush_seconds=0)  # each epoch written at once: the job may end any time
    return _trackers[uri]


class TrialCallback(*_callback_bases()):  # type: ignore[misc]
    """Reports one job's epochs to its trial and MLflow run, prunes it, and (given `checkpoint`) checkpoints it.
    Without a trial (the app run alone, not by the sweeper) it does nothing, so an app may keep it in its callbacks."""

    def __init__(self, storage: str | None = None, study: str | None = None, trial: int | None = None,
                 run_id: str | None = None, metric: str | Sequence[str] | None = None,
                 tracking_uri: str | None = None, pruner: Any = None, checkpoint: str | None = None,
                 checkpoint_every: int | str = "auto", checkpoint_auto_seconds: float = 30.0) -> None:
        super().__init__()
        self.storage_url, self.study_name, self.number = storage, study, trial
        self.run_id, self.tracking_uri = run_id, tracking_uri
        names = [metric] if isinstance(metric, str) else list(metric or [])
        self.metric = names[0] if names else None
        self.several = len(names) > 1  # Optuna cannot prune a multi-objective study (Trial.report raises)
        self.pruner = _pruner(pruner)
        self.trial: optuna.Trial | None = None
        self.epochs = 0
        self.history: list[dict[str, float]] = []  # each epoch's metrics: saved with the checkpoint
        self.checkpoints: _JobCheckpoints | None = None
        if checkpoint is not None and self.active:
            every = None if checkpoint_every == "auto" else int(checkpoint_every)
            plan = CheckpointPlan(Path(checkpoint), every, float(checkpoint_auto_seconds), owner={})
            self.checkpoints = _JobCheckpoints(plan, self.history)

    @property
    def active(self) -> bool:
        return self.storage_url is not None and self.study_name is not None and self.number is not None

    @property
    def state_key(self) -> str:
        # One key for every trial's callback, so that a retry's callback gets the state its checkpoint holds.
        return TrialCheckpoints.KEY

    def state_dict(self) -> dict[str, Any]:
        return {} if self.checkpoints is None else self.checkpoints.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.checkpoints is not None and state_dict:
            self.checkpoints.load_state_dict(state_dict)

    def _open(self) -> optuna.Trial:
        if self.trial is None:
            storage = _storage(self.storage_url)
            # RandomSampler: the job never samples; loading TPE would only cost time.
            study = optuna.load_study(study_name=self.study_name, storage=storage, pruner=self.pruner,
                                      sampler=optuna.samplers.RandomSampler())
            trial_id = storage.get_trial_id_from_study_id_trial_number(study._study_id, int(self.number))
            self.trial = optuna.Trial(study, trial_id)
            if self.checkpoints is not None:  # what the checkpoint records about its trial (a retry checks it)
                self.checkpoints.plan.owner.update(params=dict(self.trial.params), run_id=self.run_id,
                                                   trial=int(self.number))
        return self.trial

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """After Lightning restored the app's `ckpt_path`: a retry resumed from its trial's checkpoint tells its
        trial (the pruner gets the epochs before) and its MLflow run (their curves) where it starts."""
        if self.checkpoints is None:
            return
        self.checkpoints.on_train_start(trainer, pl_module)
        resumed = self.checkpoints.resumed_epoch
        if not resumed or not trainer.is_global_zero:
            return
        trial = self._open()
        trial.set_user_attr(RESUMED_FROM_EPOCH, resumed)
        self.epochs = resumed
        if self.run_id and self.tracking_uri:
            _tracker(self.tracking_uri).resume_trial(self.run_id, resumed, self.checkpoints.resumed_run,
                                                     self.history)
        for epoch, metrics in enumerate(self.history, 1):
            value = metrics.get(self.metric, math.nan) if self.metric else math.nan
            if not self.several and math.isfinite(value):
                trial.report(value, epoch)

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if self.checkpoints is not None:
            self.checkpoints.on_train_epoch_start(trainer, pl_module)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        """After the epoch's validation: log, report, decide, checkpoint. Under DDP rank 0 decides and every rank
        stops."""
        if not self.active or trainer.sanity_checking:
            return
        reason = None
        if trainer.is_global_zero:
            reason = self._epoch(trainer, trainer.current_epoch + 1)
        reason = trainer.strategy.broadcast(reason, src=0)
        if reason:
            trainer.should_stop = True
        if self.checkpoints is not None:  # after the decision: a trial that stops now is not checkpointed
            self.checkpoints.on_train_epoch_end(trainer, pl_module)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if self.checkpoints is not None:  # SIGTERM, Ctrl-C: the last finished epoch is written for the retry
            self.checkpoints.on_exception(trainer, pl_module, exception)

    def _epoch(self, trainer: Any, epoch: int) -> str | None:
        from searchlab.training.lightning import epoch_metrics

        metrics = epoch_metrics(trainer)
        self.history.append(metrics)
        if self.run_id and self.tracking_uri:
            _tracker(self.tracking_uri).log_epoch(self.run_id, epoch, metrics)
        trial = self._open()
        self.epochs += 1
        trial.set_user_attr(EPOCHS_REPORTED, self.epochs)
        value = metrics.get(self.metric, math.nan) if self.metric else math.nan
        if self.several or not math.isfinite(value):
            return None
        trial.report(value, epoch)
        if not trial.should_prune():
            return None
        reason = f"pruned at epoch {epoch}: {self.metric}={value:.4g}"
        trial.set_user_attr(PRUNED_BY_CALLBACK, reason)
        return reason


class _JobCheckpoints(TrialCheckpoints):
    """searchlab's trial checkpoints, written from an app's job and resumed by the app's own
    `trainer.fit(ckpt_path=...)`, which loads with torch's `weights_only=True` (its default since torch 2.6). So the
    snapshot leaves out the module's and DataModule's hyperparameters (objects such as the `net` and `_partial_`
    optimizers; resuming a fit does not read them) and keeps NumPy's RNG state as plain numbers."""

    _OBJECTS = ("hyper_parameters", "hparams_name", "hparams_type", "datamodule_hyper_parameters",
                "datamodule_hparams_name", "datamodule_hparams_type")

    def __init__(self, plan: CheckpointPlan, history: list[dict[str, float]]) -> None:
        super().__init__(plan, history)
        self.resumed_epoch = 0
        self.resumed_run: str | None = None  # the MLflow run of the attempt whose checkpoint this one resumed

    def _snapshot(self, trainer: Any) -> dict[str, Any]:
        snapshot = super()._snapshot(trainer)
        for key in self._OBJECTS:
            snapshot.pop(key, None)
        return snapshot

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        name, key, pos, has_gauss, gauss = state["rng"]["numpy"]
        state["rng"]["numpy"] = [str(name), key.tolist(), int(pos), int(has_gauss), float(gauss)]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.resumed_epoch = int(state_dict["epoch"])
        self.resumed_run = state_dict.get("owner", {}).get("run_id")
        if self.restored_rng is not None and isinstance(self.restored_rng.get("numpy"), list):
            name, key, pos, has_gauss, gauss = self.restored_rng["numpy"]
            self.restored_rng["numpy"] = (name, np.array(key, dtype=np.uint32), pos, has_gauss, gauss)


def _pruner(spec: Any) -> optuna.pruners.BasePruner:
    """The study's pruner: Hydra instantiated it already (a nested `_target_`), or its mapping, or none."""
    if spec is None:
        return optuna.pruners.NopPruner()
    if isinstance(spec, optuna.pruners.BasePruner):
        return spec
    from hydra.utils import instantiate

    return instantiate(dict(spec) if isinstance(spec, Mapping) else spec)


def trial_callback() -> TrialCallback:
    """The callback of the running job's trial, for an app that builds its Trainer's callbacks in code:
    `Trainer(callbacks=[..., searchlab.hydra.trial_callback()])`. It reads the job's own overrides (Hydra's
    `hydra.overrides.task`, where the sweeper put the callback's settings); outside a searchlab sweep it returns a
    callback that does nothing."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return TrialCallback()
    return TrialCallback(**settings_from_overrides(list(HydraConfig.get().overrides.task)))


def settings_from_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """The callback's arguments among a job's overrides (those `callback_overrides` made), or {}."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = {o.key_or_group: o.value() for o in OverridesParser.create().parse_overrides(list(overrides))}
    prefix = next((k[: -len("_target_")] for k, v in parsed.items()
                   if k.endswith(f"{ENTRY}._target_") and v == TARGET), None)
    if prefix is None:
        return {}
    return {k[len(prefix):]: v for k, v in parsed.items() if k.startswith(prefix) and k != f"{prefix}_target_"}


def callback_overrides(key: str, settings: Mapping[str, Any]) -> list[str]:
    """The overrides that add the callback with these arguments to a job: `+KEY.searchlab._target_=...` and one
    `+KEY.searchlab.NAME=VALUE` per argument, each value quoted as Hydra's override grammar reads it back."""
    entry = f"{key}.{ENTRY}"
    return [f"+{entry}._target_={TARGET}", *(f"+{entry}.{name}={override_value(value)}"
                                             for name, value in settings.items())]


def override_value(value: Any) -> str:
    """A Python value as Hydra's override grammar writes it: strings quoted (so `:` and `/` in URLs stay text),
    lists and mappings element by element."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{override_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(override_value(v) for v in value) + "]"
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def rerun_command(command: Sequence[str], overrides: Sequence[str]) -> str:
    """The shell command that runs the app once with a trial's values."""
    return shlex.join([*command, *overrides])


def app_best_lines(study: optuna.Study) -> list[str]:
    """`searchlab best` on a study of the Hydra sweeper: the best trial (with several metrics, the Pareto front) and
    the command that re-runs the app with its values."""
    from searchlab.config import Objectives, metric_names
    from searchlab.study import best_trial

    command = list(study.user_attrs[APP_COMMAND])
    names = metric_names(study.user_attrs.get("metric", "value"))
    if len(study.directions) > 1:
        objectives = Objectives.of_study(study, names)
        lines = [f"# study '{study.study_name}': Pareto front ({objectives.describe()})"]
        for trial in objectives.front(study):
            lines += [f"# trial {trial.number}: {objectives.format(trial.values)}",
                      rerun_command(command, trial.user_attrs.get(OVERRIDES, []))]
        return lines
    best = best_trial(study)
    if best is None:
        return [f"# study '{study.study_name}': no trial completed yet"]
    value = study.user_attrs.get(APP_VALUE, "value")  # the app's optimized_metric
    return [f"# best trial {best.number} of study '{study.study_name}': {value}={best.value:.4f} "
            f"(what the app returned; pruned on {', '.join(names)})", *(f"#   {k} = {v}" for k, v in
                                                                       best.params.items()),
            "# re-run it alone:", rerun_command(command, best.overrides)]
