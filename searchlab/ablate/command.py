"""`searchlab ablate study.name=X`: which techniques mattered for study X's winner, and how sure we are.

A study's winner is one noisy run. The ablation re-trains, with the same seeds for every configuration (paired):

1. **Finalists**: the study's `ablate.top_k` best complete trials, each rebuilt from its stored overrides (trial user
   attr `overrides`, which hold the search's own base overrides; the command's training overrides fill in only keys
   the trial does not set, as in `searchlab best`). The first is the winner.
2. **One factor at a time from the winner**, per family of `ablate.variants` whose config key the study searched.
   The study's trials are the space as the search saw it: a family runs when its key is among their params, and
   its options are the choices of their distributions. batch_norm: flipped. dropout, weight_decay, l1: set to 0.
   schedule: constant and every other schedule of the space. optimizer: every other optimizer of the space, with its
   own keys (lr, momentum, betas...) from its best complete trial in the study, else the winner's lr and the
   optimizer's defaults (the winner's weight decay is kept: it is a family of its own). batch_size: full batch,
   stochastic (batch 1, under trainer.limit_train_batches) and every other size of the space. A variant equal to the
   winner's config, or one that cannot train (batch norm with batch 1), is skipped with the reason.
   Which config key holds each technique is the table KEYS; variants are Hydra overrides on the winner's.

**Statistics** (per configuration, over the seeds; `ablate.confidence`, default 95%): the mean of the objective (the
best epoch's value of the study's metric, as the search scores a trial) and of the test metric (`ablate.test_metric`,
the test split the search never sees) with Student-t intervals, mean +- t(n-1) * sd / sqrt(n). A variant's effect is
the paired difference variant - winner, seed by seed, with its t-interval: it matters when the interval excludes 0.
Each finalist's probability of being the best is the fraction of `ablate.bootstrap` paired bootstrap resamples of the
seeds (the same resampled seeds for every finalist; ties shared) in which its mean objective is the best.

**Storage and resume**: the ablation is an Optuna study of its own, f"{X}.ablation", in the study's storage; each
(variant, seed) training is one trial, queued with `study.enqueue_trial(user_attrs=...)` naming it (`variant`,
`family`, `seed`, `overrides`). The trials run through the search's session and trial lifecycle
(searchlab.study.session, searchlab.study.trial; AblationWork is what a trial trains): the budget (count + ask under the
storage's cross-process lock), the loop in this process or one worker per slot for workers=N (its workers run
`searchlab ablate ... ablate.worker=true`), and the trials of dead workers failed and re-queued. Whatever trial a
process is handed, it claims a (variant, seed) of the plan that no finished or running trial holds, under the same
lock, so each pair trains once. Running the command
again (after Ctrl-C, a crash, or with more seeds or families) queues only the pairs without a finished or running
trial. States: COMPLETE (also when the training diverged: the best value reached is the result; its test metric is
then missing); PRUNED when the training raised (recorded with the reason, uses its budget, not retried: it would
raise again); FAIL when interrupted or its worker was lost (retried by the next run).

**Packing** (`ablate.pack`, default 20, rounded down to a multiple of the seeds; 1 turns it off): the trainings of
configurations that can share a pack (searchlab.packing: the same network, batch size, epochs..., any optimizer,
schedule, dropout, L1 and seed) train K at a time as one vectorized model, each member with its own seed's initial
weights, data split and batch order, so each equals its lone training within float noise (dropout masks: in
distribution). The pairs are queued with such configurations side by side (pack_order); a trial handed K of them
trains each group that can share a pack as one, the rest alone. Each member is still its own trial and MLflow run.
What cannot be packed (a module or DataModule of one's own, DDP, trainer.max_time, early stopping, 16-bit...) trains
one at a time, with one line saying why.

**MLflow**: in the study's experiment an `ablation` run (tag searchlab.role=ablation, nested under the study's parent
run when there is one) holds one child run per training (tags searchlab.variant, searchlab.seed, searchlab.family;
metric `objective`, the test metrics, per-epoch curves) and, at the end, `ablation.json`, the result dict. The same
file goes to the study's report folder, where `searchlab report` leads with it (searchlab.ablate.view).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import optuna
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import CategoricalDistribution
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

from searchlab.attrs import (
    FAMILY_TAG,
    METRIC,
    OVERRIDES,
    REASON,
    RETRY_OF,
    ROLE_ABLATION_RUN,
    SEED_TAG,
    SURPLUS,
    VARIANT_TAG,
)
from searchlab.attrs import MLFLOW_PARENT_RUN_ID as PARENT_RUN_ATTR
from searchlab.config import ConfigError, Objectives, compose_config, format_override, redact, validate_config
from searchlab.data import Splits
from searchlab.locks import BudgetLock
from searchlab.packing.engine import PackedTraining, can_pack, shared_key
from searchlab.packing.lone import fit_alone
from searchlab.report import report_folder, write_report
from searchlab.study import (
    Attempt,
    NotRun,
    Session,
    SessionSettings,
    TrialOutcome,
    TrialRun,
    TrialWork,
    Verdict,
    cli_command,
    load_study,
    worker_slots,
)
from searchlab.study.search_work import train_command, training_overrides
from searchlab.tracking import Tracker
from searchlab.training import resolve_device
from searchlab.training.build import load_data

# Where each technique lives in the config: the one table to re-point when config keys move.
# schedule and optimizer are config groups (their own keys are `<group>.*`); the rest are plain keys.
KEYS = {
    "batch_norm": "model.batch_norm",
    "dropout": "model.dropout",
    "weight_decay": "optimizer.weight_decay",
    "l1": "module.l1",
    "schedule": "scheduler",
    "optimizer": "optimizer",
    "lr": "optimizer.lr",
    "batch_size": "data.batch_size",
}
CONSTANT_SCHEDULE = "constant"  # the scheduler option of a constant learning rate
FULL_BATCH = "full"  # data.batch_size of batch gradient descent
# Family -> words, in the order the verdict lists them.
LABELS = {"batch_norm": "batch norm", "dropout": "dropout", "weight_decay": "weight decay (L2)", "l1": "L1",
          "schedule": "learning-rate schedule", "optimizer": "optimizer", "batch_size": "batch-size regime"}
FINALIST = "finalist"
# Overrides of these keys shape the ablation itself, not a training.
_NOT_TRAINING = ("ablate", "seed")
EXIT_STUDY_FAILED, EXIT_INTERRUPTED = 1, 130


# ---- the plan: configurations and seeds ----

@dataclass(frozen=True)
class Variant:
    name: str  # "trial-31", "dropout=0", "optimizer=sgd"
    family: str  # FINALIST or a key of LABELS
    setting: str  # in words: "off", "0", "sgd", "full batch"; a finalist's "trial 31"
    overrides: tuple[str, ...]  # training overrides of the configuration, seed left out
    trial: int | None = None  # a finalist's trial number in the study
    study_value: float | None = None  # a finalist's value in the study


@dataclass
class Plan:
    study: str
    metric: str
    direction: str
    test_metric: str
    seeds: list[int]
    variants: list[Variant]  # finalists first, the winner first of all
    winner_settings: dict[str, str] = field(default_factory=dict)  # family -> the winner's setting in words
    skipped: list[dict[str, str]] = field(default_factory=list)  # {family, variant, reason}
    # Variant names in the order their trainings are queued and claimed ([]: the order of `variants`); packing puts
    # the variants that can share a pack side by side (pack_order).
    order: list[str] = field(default_factory=list)

    @property
    def winner(self) -> Variant:
        return self.variants[0]

    def pairs(self) -> list[tuple[str, int]]:
        names = self.order or [v.name for v in self.variants]
        return [(name, s) for name in names for s in self.seeds]

    def variant(self, name: str) -> Variant:
        return next(v for v in self.variants if v.name == name)


def check_settings(settings: DictConfig) -> None:
    """The `ablate` section, checked before anything is trained or written."""
    for key, least in (("top_k", 1), ("seeds", 1), ("seed_start", 0), ("bootstrap", 1), ("pack", 1)):
        value = settings[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ConfigError(f"ablate.{key}: expected an integer >= {least}, got {value!r}")
    if not (isinstance(settings.confidence, float) and 0 < settings.confidence < 1):
        raise ConfigError(f"ablate.confidence: expected a level between 0 and 1 (e.g. 0.95), "
                          f"got {settings.confidence!r}")
    variants = settings.variants
    if isinstance(variants, str) or not OmegaConf.is_list(variants):
        raise ConfigError(f"ablate.variants: expected a list of families (from {', '.join(LABELS)}), got "
                          f"{variants!r}; e.g. 'ablate.variants=[dropout,optimizer]'")
    unknown = [v for v in variants if v not in LABELS]
    if unknown:
        raise ConfigError(f"ablate.variants: unknown '{unknown[0]}' (choose from {', '.join(LABELS)})")
    if isinstance(settings.margin, bool) or not isinstance(settings.margin, (int, float)) or settings.margin < 0:
        raise ConfigError(f"ablate.margin: expected a number >= 0 (in the metric's units), got {settings.margin!r}")
    if not isinstance(settings.test_metric, str):
        raise ConfigError(f"ablate.test_metric: expected a metric name or auto, got {settings.test_metric!r}")


def _key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def _changed(overrides: Sequence[str], changes: Mapping[str, Any], drop_prefix: str | None = None) -> tuple[str, ...]:
    """The overrides with `changes` set (replacing the same keys), and the keys under drop_prefix removed first."""
    kept = [o for o in overrides if _key(o) not in changes
            and not (drop_prefix and _key(o).startswith(drop_prefix + "."))]
    return (*kept, *(format_override(k, v) for k, v in changes.items()))


def _trial_overrides(trial: FrozenTrial) -> list[str]:
    return list(trial.user_attrs.get(OVERRIDES) or [format_override(k, v) for k, v in trial.params.items()])


def _training_overrides(overrides: Sequence[str]) -> list[str]:
    return [o for o in training_overrides(list(overrides)) if _key(o).split(".", 1)[0] not in _NOT_TRAINING]


def _words(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _batch_words(value: Any) -> str:
    return "full batch" if str(value) == FULL_BATCH else "stochastic (1)" if str(value) == "1" else f"batch {value}"


def _why_impossible(cfg: DictConfig) -> str | None:
    """A configuration that cannot train at all (the training would raise at once)."""
    if OmegaConf.select(cfg, KEYS["batch_norm"]) and str(OmegaConf.select(cfg, KEYS["batch_size"])) == "1":
        return "impossible: batch norm cannot train on batches of 1"
    return None


def metric_for_test(metric: str, setting: str) -> str:
    if setting != "auto":
        return setting
    return "test_" + metric.split("_", 1)[1] if metric.startswith(("val_", "train_")) else "test_" + metric


def build_plan(study: optuna.Study, settings: DictConfig, overrides: Sequence[str], metric: str) -> Plan:
    """The finalists and the one-factor variants of the winner, each a list of training overrides."""
    check_settings(settings)
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    trials = study.get_trials(deepcopy=False)
    complete = sorted((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.value, reverse=maximize)
    if not complete:
        raise ConfigError(f"study.name: study '{study.study_name}' has no complete trial yet; run or resume it first")
    base = _training_overrides(overrides)
    finalists: list[Variant] = []
    for trial in complete:
        own = _trial_overrides(trial)
        merged = tuple(o for o in base if _key(o) not in {_key(x) for x in own}) + tuple(own)
        if all(merged != f.overrides for f in finalists):  # two trials of the same config are one finalist
            finalists.append(Variant(f"trial-{trial.number}", FINALIST, f"trial {trial.number}", merged,
                                     trial.number, trial.value))
        if len(finalists) == settings.top_k:
            break
    seeds = list(range(settings.seed_start, settings.seed_start + settings.seeds))
    plan = Plan(study.study_name, metric, study.direction.name.lower(), metric_for_test(metric, settings.test_metric),
                seeds, finalists)
    winner = finalists[0]
    winner_trial = next(t for t in complete if t.number == winner.trial)
    config = _composed
    winner_cfg = config(winner.overrides)
    winner_yaml = OmegaConf.to_yaml(winner_cfg)
    searched: dict[str, Any] = {}
    for trial in trials:
        for key, distribution in trial.distributions.items():
            searched.setdefault(key, distribution)
    for family in settings.variants:
        key = KEYS[family]
        if key not in searched:
            plan.skipped.append({"family": family, "variant": family, "reason": f"not searched in the study ({key})"})
            continue
        current = winner_trial.params.get(key, OmegaConf.select(winner_cfg, key))
        plan.winner_settings[family] = _batch_words(current) if family == "batch_size" else _words(current)
        if family in ("dropout", "weight_decay", "l1") and current == 0:
            plan.skipped.append({"family": family, "variant": f"{family}=0",
                                 "reason": f"{LABELS[family]} is already 0 in the winner"})
            continue
        for name, setting, changed in _family_variants(family, key, current, searched[key], complete, winner,
                                                       winner_cfg):
            try:
                cfg = config(changed)
                validate_config(cfg)
            except ConfigError as err:
                plan.skipped.append({"family": family, "variant": name, "reason": f"cannot compose: {err}"})
                continue
            reason = _why_impossible(cfg)
            if reason is None and OmegaConf.to_yaml(cfg) == winner_yaml:
                reason = "same configuration as the winner"
            if reason:
                plan.skipped.append({"family": family, "variant": name, "reason": reason})
            else:
                plan.variants.append(Variant(name, family, setting, changed))
    return plan


def _family_variants(family: str, key: str, current: Any, distribution: Any, complete: list[FrozenTrial],
                     winner: Variant, winner_cfg: DictConfig) -> list[tuple[str, str, tuple[str, ...]]]:
    """(name, setting in words, overrides) of each one-factor change of the winner in this family."""
    base = winner.overrides
    if family == "batch_norm":
        flipped = not bool(current)
        return [(f"{family}={_words(flipped)}", _words(flipped), _changed(base, {key: flipped}))]
    if family in ("dropout", "weight_decay", "l1"):
        return [(f"{family}=0", "0", _changed(base, {key: 0.0}))]
    choices = list(distribution.choices) if isinstance(distribution, CategoricalDistribution) else []
    if family == "batch_size":
        options = [FULL_BATCH, 1, *(c for c in choices if str(c) not in (FULL_BATCH, "1"))]
        return [(f"{family}={o}", _batch_words(o), _changed(base, {key: o}))
                for o in options if str(o) != str(current)]
    # A config group (schedule, optimizer): each other option with its own keys from its best complete trial.
    options = ([CONSTANT_SCHEDULE] if family == "schedule" else []) + [c for c in choices if c != CONSTANT_SCHEDULE
                                                                        or family != "schedule"]
    out = []
    for option in dict.fromkeys(options):
        if option == current:
            continue
        best = next((t for t in complete if t.params.get(key) == option), None)  # complete is sorted best first
        own = {k: v for k, v in (best.params if best else {}).items() if k.startswith(key + ".")}
        if family == "optimizer":  # its own lr (else the winner's); the winner's weight decay, a family of its own
            own.setdefault(KEYS["lr"], OmegaConf.select(winner_cfg, KEYS["lr"]))
            own[KEYS["weight_decay"]] = OmegaConf.select(winner_cfg, KEYS["weight_decay"])
            own = {k: v for k, v in own.items() if v is not None}
        out.append((f"{family}={option}", str(option), _changed(base, {key: option, **own}, drop_prefix=key)))
    return out


# ---- one training, or a pack of them ----

_CONFIGS: dict[tuple[str, ...], DictConfig] = {}  # composed configurations (seedless), per overrides
_SPLITS: dict[tuple[str, int, str], Splits] = {}
_PROBES: dict[str, str | None] = {}  # shared_key -> why such configurations cannot be packed (None: they can)


def _composed(overrides: tuple[str, ...]) -> DictConfig:
    """The configuration of a variant's overrides, composed once per process (the plan, the packing order and every
    training read it; callers copy it before changing it)."""
    if overrides not in _CONFIGS:
        _CONFIGS[overrides] = compose_config(list(overrides))
    return _CONFIGS[overrides]


def _splits(cfg: DictConfig) -> Splits | None:
    """The resident data of cfg on its device, kept per (data config, seed): the seeds of an ablation alternate, and
    each draws its own split. None for a LightningDataModule (fit builds it per training)."""
    node = {k: v for k, v in OmegaConf.to_container(cfg.data, resolve=True).items() if k != "batch_size"}
    key = (json.dumps(node, sort_keys=True, default=str), cfg.seed, cfg.trainer.accelerator)
    if key not in _SPLITS:
        data = load_data(cfg)
        if not isinstance(data, Splits):
            return None
        if len(_SPLITS) >= 16:
            _SPLITS.pop(next(iter(_SPLITS)))
        _SPLITS[key] = data.to(resolve_device(cfg.trainer.accelerator))
    return _SPLITS[key]


def _train_one(cfg: DictConfig, on_epoch: Callable[[int, dict[str, float]], None] | None = None
               ) -> tuple[float | None, dict[str, float], str | None]:
    """A training of an ablation alone: (objective, test metrics, note).

    The objective is the best epoch's value of cfg.study.metric (as the search scores a trial); the note says why
    training stopped early (divergence), when it did.
    """
    def hook(epoch: int, metrics: dict[str, float]) -> None:
        if on_epoch is not None:
            on_epoch(epoch, metrics)

    result = fit_alone(cfg, _splits(cfg), hook, test=True, metric=cfg.study.metric)
    return result.best(cfg.study.metric, cfg.study.direction), dict(result.test), result.stop_reason


def why_not_packed(cfg: DictConfig) -> str | None:
    """Why trainings of cfg's kind cannot share a pack (one line), or None: packing.engine.can_pack's probe (a pack of
    two copies trained on one batch), once per process for all configurations that would share a pack."""
    key = shared_key(cfg)
    if key not in _PROBES:
        _PROBES[key] = can_pack(cfg, _splits(cfg))
    return _PROBES[key]


def pack_order(plan: Plan) -> list[str]:
    """The plan's variant names with those that can share a pack side by side (in plan order otherwise), so that the
    K trainings a trial is handed are most often one pack."""
    keys = {v.name: shared_key(_composed(v.overrides)) for v in plan.variants}
    first = {key: i for i, key in reversed(list(enumerate(keys.values())))}
    return sorted(keys, key=lambda name: first[keys[name]])


# ---- the runs ----

def _identity(trial: FrozenTrial, by_number: Mapping[int, FrozenTrial]) -> tuple[str, int] | None:
    """(variant, seed) of a trial; a retry of a lost worker's trial (user attr retry_of) has its original's."""
    attrs, seen = trial.user_attrs, set()
    while "variant" not in attrs and attrs.get(RETRY_OF) in by_number and attrs[RETRY_OF] not in seen:
        seen.add(attrs[RETRY_OF])
        attrs = by_number[attrs[RETRY_OF]].user_attrs
    return (attrs["variant"], int(attrs["seed"])) if "variant" in attrs else None


_HELD = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)


def queue_missing(study: optuna.Study, plan: Plan) -> tuple[int, int]:
    """Queues the plan's pairs that no trial holds or waits for; returns (pairs queued, budget for Budget).

    The budget is the study's finished trials plus the plan's pairs not finished yet: the same number in every
    process of the ablation, whenever it is computed.
    """
    trials = study.get_trials(deepcopy=False)
    by_number = {t.number: t for t in trials}
    held = {_identity(t, by_number) for t in trials if t.state in (*_HELD, TrialState.WAITING)}
    finished = {_identity(t, by_number) for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)}
    queued = 0
    for name, seed in plan.pairs():
        if (name, seed) not in held:
            study.enqueue_trial({}, user_attrs=_attrs(plan.variant(name), seed))
            queued += 1
    used = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    return queued, used + sum(p not in finished for p in plan.pairs())


def _attrs(variant: Variant, seed: int) -> dict[str, Any]:
    return {"variant": variant.name, "family": variant.family, "seed": seed,
            OVERRIDES: [*variant.overrides, f"seed={seed}"]}


class AblationWork(TrialWork):
    """One (variant, seed) of the plan per trial it is handed (the lifecycle's TrialWork), up to `size` trials at
    once: those whose configurations can share a pack train as one (PackedTraining), the others alone. Pruning is
    off: its epochs are only logged."""

    pruned_run_state = "FAIL"  # in MLflow a training that raised is FAILED (in Optuna PRUNED only to use its budget)

    def __init__(self, study: optuna.Study, plan: Plan, lock: BudgetLock, tracker: Tracker, run_id: str,
                 size: int = 1) -> None:
        self.study, self.plan, self.lock, self.tracker, self.parent_run_id = study, plan, lock, tracker, run_id
        self.size = size
        self._said: set[str] = set()  # the reasons already given for training alone

    def prepare(self, attempt: Attempt) -> TrialRun:
        with self.lock():
            claim = self._claim(attempt.trial)
        if claim is None:
            attempt.trial.set_user_attr(SURPLUS, True)
            raise NotRun("not run: every training of the plan is done or running")
        variant, seed = claim
        # A training that raises would raise again: PRUNED uses its budget and is not retried. An interrupt is.
        attempt.error_state = TrialState.PRUNED
        attempt.params = {"variant": variant.name, "seed": seed}
        attempt.cfg = self._config(variant, seed)
        params = {**attempt.params, **{_key(o): o.split("=", 1)[1] for o in variant.overrides if "=" in o}}
        return TrialRun(params, command=train_command([*variant.overrides, f"seed={seed}"]),
                        name=f"{variant.name} seed {seed}", role=ROLE_ABLATION_RUN,
                        tags={VARIANT_TAG: variant.name, FAMILY_TAG: variant.family, SEED_TAG: str(seed)})

    def train(self, attempts: list[Attempt]) -> Iterator[tuple[Attempt, Verdict | Exception]]:
        groups: dict[str, list[Attempt]] = {}  # the attempts that can share a pack, in the order they came
        for attempt in attempts:
            groups.setdefault(shared_key(attempt.cfg) if len(attempts) > 1 else "", []).append(attempt)
        for group in groups.values():
            why = None if len(group) == 1 else why_not_packed(group[0].cfg)
            if len(group) > 1 and why is None:
                yield from self._train_pack(group)
            else:
                if why is not None:
                    self._say(group[0], why)
                yield from self._train_alone(group)

    def _train_alone(self, attempts: list[Attempt]) -> Iterator[tuple[Attempt, Verdict | Exception]]:
        for attempt in attempts:
            try:
                objective, test, note = _train_one(attempt.cfg, attempt.reporter)
            except Exception as err:
                yield attempt, err
                continue
            yield attempt, self._verdict(attempt, objective, test, note)

    def _train_pack(self, group: list[Attempt]) -> Iterator[tuple[Attempt, Verdict | Exception]]:
        """One pack of the group's trainings, each member with its own seed's data split; each is told as its lone
        training would be, with its share of the pack's time."""
        start = time.perf_counter()
        try:
            pack = PackedTraining([a.cfg for a in group], [_splits(a.cfg) for a in group], self.plan.metric,
                                   grouped=True)
        except ValueError as err:  # a member the probe did not cover (its optimizer, its schedule): all alone
            self._say(group[0], str(err))
            yield from self._train_alone(group)
            return
        try:
            results = pack.fit(lambda member, epoch, metrics: group[member].reporter(epoch, metrics))
        except Exception as err:  # the pack's error is each member's (an interrupt is not caught here)
            for attempt in group:
                yield attempt, err
            return
        rest = (time.perf_counter() - start - sum(r.seconds for r in results)) / len(group)
        for i, (attempt, result) in enumerate(zip(group, results, strict=True)):
            objective = result.best(attempt.cfg.study.metric, attempt.cfg.study.direction)
            verdict = self._verdict(attempt, objective, pack.test_metrics(i), result.stop_reason)
            yield attempt, dataclasses.replace(verdict, seconds=result.seconds + rest)

    def _verdict(self, attempt: Attempt, objective: float | None, test: dict[str, float],
                 note: str | None) -> Verdict:
        """COMPLETE with the objective (a diverged training too: the best value it reached, with its note), PRUNED
        when no epoch had a finite value."""
        if test:
            attempt.trial.set_user_attr("test", test)
        if objective is None:
            return Verdict(TrialState.PRUNED, None, f"no finite {self.plan.metric} in any epoch", test)
        if note:
            attempt.trial.set_user_attr("note", note)
        return Verdict(TrialState.COMPLETE, objective, None, test)

    def _say(self, attempt: Attempt, why: str) -> None:
        """One line per reason and process: these trainings run alone, and why."""
        if why not in self._said:
            self._said.add(why)
            print(f"searchlab ablate: ablate.pack: {attempt.params.get('variant', '?')} trains one seed at a time, "
                  f"not packed ({str(why).splitlines()[0]})", file=sys.stderr, flush=True)

    def _claim(self, trial: optuna.Trial) -> tuple[Variant, int] | None:
        """The trial's own (variant, seed) when the plan has it and no other trial holds it, else the first pair
        of the plan nobody holds (queued ones last); None when every pair is held. Under the budget lock."""
        trials = self.study.get_trials(deepcopy=False)
        by_number = {t.number: t for t in trials}
        taken = {_identity(t, by_number) for t in trials if t.state in _HELD and t.number != trial.number}
        waiting = {_identity(t, by_number) for t in trials if t.state == TrialState.WAITING}
        mine = _identity(by_number[trial.number], by_number)
        pairs = [p for p in self.plan.pairs() if p not in taken]
        if mine not in pairs:
            pairs.sort(key=lambda p: p in waiting)
            mine = pairs[0] if pairs else None
        if mine is None:
            return None
        variant = self.plan.variant(mine[0])
        for key, value in _attrs(variant, mine[1]).items():
            trial.set_user_attr(key, value)
        return variant, mine[1]

    def _config(self, variant: Variant, seed: int) -> DictConfig:
        cfg = _composed(variant.overrides).copy()
        OmegaConf.update(cfg, "seed", seed, merge=False)
        OmegaConf.update(cfg, "study.metric", self.plan.metric, merge=False)
        OmegaConf.update(cfg, "study.direction", self.plan.direction, merge=False)
        return cfg


# ---- the verdict ----

def interval(values: Sequence[float], confidence: float) -> dict[str, Any]:
    """Mean and Student-t interval (None bounds with fewer than 2 values)."""
    from scipy import stats  # scikit-learn's dependency

    xs = np.asarray(values, dtype=float)
    n = len(xs)
    if n == 0:
        return {"mean": None, "low": None, "high": None, "n": 0}
    mean = float(xs.mean())
    if n < 2:
        return {"mean": mean, "low": None, "high": None, "n": 1}
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1) * xs.std(ddof=1) / math.sqrt(n))
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n}


def p_best(matrix: np.ndarray, maximize: bool, resamples: int, seed: int = 0) -> list[float]:
    """Per row (a finalist; columns: seeds), the fraction of paired bootstrap resamples of the columns in which its
    mean is the best (ties shared)."""
    rows, n = matrix.shape
    if n == 0:
        return [1.0 / rows] * rows
    index = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    means = matrix[:, index].mean(axis=2)  # rows x resamples
    best = means.max(axis=0) if maximize else means.min(axis=0)
    ties = np.isclose(means, best, rtol=0, atol=1e-12)
    return [float(p) for p in (ties / ties.sum(axis=0)).mean(axis=1)]


def _verdict(effect: Mapping[str, Any], maximize: bool, margin: float) -> str:
    """worse/better: the interval excludes 0; no effect: it lies within +-margin; inconclusive: it holds 0 but
    reaches past the margin (more seeds would tell); undetermined: one seed, no interval; failed: no run."""
    if effect["n"] == 0:
        return "failed"
    if effect["low"] is None:
        return "undetermined"
    if effect["low"] > 0:
        return "better" if maximize else "worse"
    if effect["high"] < 0:
        return "worse" if maximize else "better"
    return "no effect" if -margin <= effect["low"] and effect["high"] <= margin else "inconclusive"


def results(study: optuna.Study) -> tuple[dict[tuple[str, int], tuple[float, dict[str, float]]], dict[str, str]]:
    """(variant, seed) -> (objective, test metrics) of the complete trials (the latest per pair), and variant -> the
    reason of a training that raised."""
    trials = study.get_trials(deepcopy=False)
    by_number = {t.number: t for t in trials}
    values, errors = {}, {}
    for trial in trials:
        pair = _identity(trial, by_number)
        if pair is None:
            continue
        if trial.state == TrialState.COMPLETE:
            values[pair] = (float(trial.value), dict(trial.user_attrs.get("test", {})))
        elif trial.state == TrialState.PRUNED:
            errors[pair[0]] = trial.user_attrs.get(REASON, "failed")
    return values, errors


def summarize(plan: Plan, values: Mapping[tuple[str, int], tuple[float, Mapping[str, float]]],
              errors: Mapping[str, str], confidence: float, resamples: int, margin: float) -> dict[str, Any]:
    """The result dict: finalists, effects with intervals, one sentence per technique."""
    maximize = plan.direction == "maximize"

    def objective(name: str, seed: int) -> float | None:
        return values[(name, seed)][0] if (name, seed) in values else None

    def test(name: str, seed: int) -> float | None:
        value = values[(name, seed)][1].get(plan.test_metric) if (name, seed) in values else None
        return None if value is None or not math.isfinite(value) else float(value)

    finalists = [v for v in plan.variants if v.family == FINALIST]
    common = [s for s in plan.seeds if all(objective(f.name, s) is not None for f in finalists)]
    chances = p_best(np.array([[objective(f.name, s) for s in common] for f in finalists], dtype=float).reshape(
        len(finalists), len(common)), maximize, resamples)
    rows = []
    def present(get: Callable[[str, int], float | None], name: str) -> list[float]:
        return [x for s in plan.seeds if (x := get(name, s)) is not None]

    for finalist, chance in zip(finalists, chances, strict=True):
        rows.append({
            "variant": finalist.name, "trial": finalist.trial, "study_value": finalist.study_value,
            "objective": interval(present(objective, finalist.name), confidence),
            "test": interval(present(test, finalist.name), confidence),
            "p_best": chance, "values": {str(s): objective(finalist.name, s) for s in plan.seeds},
            "overrides": list(finalist.overrides), "error": errors.get(finalist.name)})
    winner = plan.winner.name
    effects = []
    for variant in plan.variants:
        if variant.family == FINALIST:
            continue

        def diffs(get: Callable[[str, int], float | None], name: str = variant.name) -> list[float]:
            return [a - b for s in plan.seeds if (a := get(name, s)) is not None and (b := get(winner, s)) is not None]

        effect = interval(diffs(objective), confidence)
        effects.append({
            "family": variant.family, "technique": LABELS[variant.family], "variant": variant.name,
            "setting": variant.setting, "winner_setting": plan.winner_settings.get(variant.family),
            "objective": effect, "test": interval(diffs(test), confidence),
            "verdict": _verdict(effect, maximize, margin),
            "values": {str(s): objective(variant.name, s) for s in plan.seeds},
            "overrides": list(variant.overrides), "error": errors.get(variant.name)})
    result = {
        "study": plan.study, "ablation_study": f"{plan.study}.ablation", "metric": plan.metric,
        "test_metric": plan.test_metric, "direction": plan.direction, "confidence": confidence, "margin": margin,
        "seeds": plan.seeds, "scale": 100.0 if plan.metric.endswith("acc") else 1.0,
        "winner": {"variant": winner, "trial": plan.winner.trial, "study_value": plan.winner.study_value,
                   "command": train_command(list(plan.winner.overrides))},
        "finalists": rows, "effects": effects, "skipped": plan.skipped,
        "method": (f"mean and {confidence:.0%} Student-t interval over the seeds; effect = paired difference "
                   f"variant - winner per seed, with its t-interval: it matters when the interval excludes 0, "
                   f"no measurable effect when it lies within +-{margin:g}, inconclusive otherwise; "
                   f"P(best) = fraction of {resamples} paired bootstrap resamples of the seeds in which the "
                   f"finalist's mean {plan.metric} is the best"),
        "runs": {"planned": len(plan.pairs()), "complete": sum(p in values for p in plan.pairs()),
                 "failed": sorted({v for v in errors if any(x.name == v for x in plan.variants)})},
    }
    result["sentences"] = sentences(result)
    return result


def _signed(value: float | None, scale: float) -> str:
    if value is None:
        return "?"
    return f"{value * scale:+.1f}" if scale != 1 else f"{value:+.4f}"


def sentences(result: Mapping[str, Any]) -> list[str]:
    """One plain sentence per technique: the change, its effect on the objective with the interval, the verdict."""
    scale = result["scale"]
    unit = " points" if scale != 1 else ""
    out = []
    by_family: dict[str, list[Mapping[str, Any]]] = {}
    for effect in result["effects"]:
        by_family.setdefault(effect["family"], []).append(effect)
    for family, effects in by_family.items():
        label, was = LABELS[family], effects[0]["winner_setting"]

        def told(e: Mapping[str, Any]) -> str:
            o = e["objective"]
            if o["n"] == 0:
                return f"failed ({(e['error'] or 'no run')[:80]})"
            if o["low"] is None:
                return f"{_signed(o['mean'], scale)}{unit} (one seed: no interval)"
            return f"{_signed(o['mean'], scale)}{unit} [{_signed(o['low'], scale)}, {_signed(o['high'], scale)}]"

        verdicts = [e["verdict"] for e in effects]
        better = [e["setting"] for e in effects if e["verdict"] == "better"]
        worse = verdicts.count("worse")
        if better:
            words = f"{', '.join(better)} did better than the winner's {was}: the search missed it"
        elif worse:
            words = "it matters" + (f" ({worse} of {len(effects)} alternatives worse)" if len(effects) > 1 else "")
        elif all(v == "no effect" for v in verdicts):
            words = "no measurable effect"
        elif "inconclusive" in verdicts:
            words = f"inconclusive with {len(result['seeds'])} seeds: more would tell"
        else:
            words = "not enough seeds or runs to tell"
        if len(effects) == 1:
            out.append(f"{label}: {effects[0]['setting']} instead of {was}: {told(effects[0])} — {words}")
        else:
            out.append(f"{label}: instead of {was}, " + "; ".join(f"{e['setting']} {told(e)}" for e in effects)
                       + f" — {words}")
    return out


# ---- the command ----

def ablate(overrides: Sequence[str]) -> int:
    """`searchlab ablate`: runs (or resumes) the ablation of study.name and prints, writes and logs its verdict."""
    begin = time.monotonic()
    _CONFIGS.clear()  # per command: another command in this process may compose from another config folder
    _PROBES.clear()
    cfg = compose_config(overrides)
    validate_config(cfg)
    check_settings(cfg.ablate)
    resolve_device(cfg.trainer.accelerator)
    study = load_study(cfg.study.storage, cfg.study.name)
    if len(study.directions) > 1:  # its trials have no one ranking, so no one winner to ablate
        names = ", ".join(Objectives.of_study(study, ()).names)
        raise ConfigError(f"study.metric: study '{cfg.study.name}' optimizes several metrics ({names}), and "
                          "searchlab ablate ranks trials by one; ablate a study of a single metric (a new "
                          f"study.name with study.metric={names.split(', ')[0]})")
    metric = study.user_attrs.get(METRIC, cfg.study.metric)
    plan = build_plan(study, cfg.ablate, overrides, metric)
    as_worker = bool(cfg.ablate.worker)
    size = pack_size(plan, cfg.ablate.pack, quiet=as_worker)
    if size > 1:
        plan.order = pack_order(plan)
    name = f"{cfg.study.name}.ablation"
    settings = {**{f"ablate.{k}": v for k, v in OmegaConf.to_container(cfg.ablate).items() if k != "worker"},
                "winner_trial": plan.winner.trial, "overrides": redact(" ".join(overrides))}

    def make_study(storage: BaseStorage) -> optuna.Study:
        return optuna.create_study(study_name=name, storage=storage, direction=plan.direction, load_if_exists=True,
                                   sampler=optuna.samplers.RandomSampler(seed=0), pruner=optuna.pruners.NopPruner())

    def parent_run(tracker: Tracker) -> str:  # in the study's experiment, under its parent run
        return tracker.ablation_run(cfg.study.name, name, study.user_attrs.get(PARENT_RUN_ATTR), settings)

    session = Session(dataclasses.replace(SessionSettings.of(cfg), name=name, n_trials=None), make_study, metric,
                      settings, parent_run)
    ablation, run_id = session.study, session.parent_run_id
    with session.lock():
        session.dead(ablation.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))  # what a crash left behind
        queued, n_trials = queue_missing(ablation, plan)
    session.limit(n_trials)
    slots = [] if as_worker else worker_slots(cfg.workers, cfg.trainer.accelerator, cfg.trainer.devices)
    total = len(plan.pairs())
    if not as_worker:
        _print_plan(plan, name, total, queued, n_trials - ablation_used(ablation), len(slots), size)
    done = [total - (n_trials - ablation_used(ablation))]

    def on_trial(outcome: TrialOutcome) -> None:
        if outcome.state != "FAIL":
            done[0] += 1
        params = outcome.params or _pair_of(ablation, outcome.number)
        value = f"{outcome.value:.4f}" if outcome.value is not None else "-"
        print(f"  {done[0]:>4}/{total}  {params.get('variant', '?'):<26} seed {params.get('seed', '?'):<3} "
              f"{outcome.state:<8} {metric}={value:<8} {outcome.seconds:6.2f}s"
              + (f"  [{outcome.reason}]" if outcome.reason else ""), flush=True)

    status = session.run(lambda: AblationWork(ablation, plan, session.lock, session.tracker, run_id, size), on_trial,
                         slots, cli_command("ablate", *overrides, "ablate.worker=true"), label="ablation")
    if as_worker:
        return {"KILLED": EXIT_INTERRUPTED, "FAILED": EXIT_STUDY_FAILED}.get(status, 0)
    if status == "KILLED":
        session.end("KILLED")
        print(f"interrupted: run the same command to resume the ablation of study '{cfg.study.name}' "
              f"({ablation_used(ablation)} trainings kept)", file=sys.stderr)
        return EXIT_INTERRUPTED
    values, errors = results(ablation)
    result = summarize(plan, values, errors, cfg.ablate.confidence, cfg.ablate.bootstrap, cfg.ablate.margin)
    result["mlflow_run_id"] = run_id
    result["seconds"] = round(time.monotonic() - begin, 1)
    _write(result, cfg, study, session.tracker, run_id)
    session.end(status, metrics={"trainings_complete": result["runs"]["complete"]})
    return {"FAILED": EXIT_STUDY_FAILED}.get(status, 0)


def pack_size(plan: Plan, setting: int, quiet: bool = False) -> int:
    """How many trainings a trial takes at once: ablate.pack rounded down to whole configurations (a multiple of the
    seeds, when it holds one: the pairs are queued a configuration's seeds together, so a pack cut at a multiple of
    them leaves no configuration a lone seed), or 1 when the winner's configuration cannot be packed (said in one
    line unless `quiet`: a worker process, whose parent said it)."""
    if setting == 1:
        return 1
    seeds = len(plan.seeds)
    size = setting // seeds * seeds if setting >= seeds else setting
    cfg = _composed(plan.winner.overrides).copy()
    OmegaConf.update(cfg, "seed", plan.seeds[0], merge=False)
    why = why_not_packed(cfg)
    if why is None:
        return size
    if not quiet:
        print(f"searchlab ablate: ablate.pack={setting}: the winner's configuration cannot be packed ({why}); "
              "every training runs alone", file=sys.stderr, flush=True)
    return 1


def ablation_used(study: optuna.Study) -> int:
    return sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.get_trials(deepcopy=False))


def _pair_of(study: optuna.Study, number: int) -> dict[str, Any]:
    trials = study.get_trials(deepcopy=False)
    by_number = {t.number: t for t in trials}
    pair = _identity(by_number[number], by_number) if number in by_number else None
    return {} if pair is None else {"variant": pair[0], "seed": pair[1]}


def _print_plan(plan: Plan, name: str, total: int, queued: int, todo: int, workers: int, pack: int) -> None:
    value = f"{plan.winner.study_value:.4f}" if plan.winner.study_value is not None else "?"
    print(f"ablation '{name}': winner trial {plan.winner.trial} ({plan.metric}={value}); "
          f"{len(plan.variants)} configurations x {len(plan.seeds)} seeds = {total} trainings, {total - todo} done, "
          f"{todo} to run" + (f" ({queued} queued now)" if queued else "")
          + (f"; {workers} workers" if workers > 1 else "") + (f"; packs of up to {pack}" if pack > 1 else ""),
          flush=True)
    for skipped in plan.skipped:
        print(f"  skipped {skipped['variant']}: {skipped['reason']}")


def _write(result: dict[str, Any], cfg: DictConfig, study: optuna.Study, tracker: Tracker, run_id: str) -> None:
    """Prints the verdict, writes ablation.json next to the study report, re-writes the report (which leads with
    it) and logs both to the ablation run."""
    from searchlab.ablate.view import ablation_lead, render_text

    folder = report_folder(cfg, study.study_name)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "ablation.json"
    path.write_text(json.dumps(result, indent=2, default=str), encoding="utf-8")
    print(render_text(result))
    tracker.log_artifact(run_id, path)
    try:
        report = write_report(study, cfg, tracker, lead=ablation_lead(study, cfg))
        for name in report.summary.get("plots", []):
            if name.startswith("ablation"):
                tracker.log_artifact(run_id, folder / name)
        print(f"report: {folder / 'report.html'}; ablation.json; MLflow ablation run {run_id}")
    except Exception as err:  # the verdict is stored; the report can be made again with `searchlab report`
        print(f"searchlab: report not written ({type(err).__name__}: {redact(str(err))[:200]}); ablation.json in "
              f"{folder}; make the report with: searchlab report study.name={study.study_name}", file=sys.stderr)
