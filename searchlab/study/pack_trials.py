"""study.pack=K: K trials of the study trained at once as one packed model (searchlab.packing), each still its own
Optuna trial, MLflow run and progress line; study.pack=auto: K from a probe of the machine (choose_pack_size).

The K members of a round are asked together. By default (study.pack_members=independent) each is sampled as a lone
trial would be, with constant liar for the members still running, and the members that share their shape (what
`varies_per_member` says no to: the network's group and shape, batch size, batch norm) train as one pack, the
others alone. With like_first, members 2..K are asked with those keys fixed to the first's values (Optuna's
PartialFixedSampler around the study's sampler), so every round is one pack. Either way each member draws its own
optimizer and schedule (group choices and their keys), learning rate, weight decay, momentum, betas, dropout and L1
strength, reports every epoch to its own trial, is pruned on its own (it leaves the pack, which shrinks) and is
told on its own.
The lifecycle (searchlab.study.trial) reserves every member as it reserves a trial, so n_trials, several workers and the
dead-worker retry count members exactly as trials.

Packed members are not checkpointed (packing is for trials of seconds to minutes; a long trial gains nothing from
it): an interrupted pack fails its members, which a later run samples anew; a worker killed mid-pack has every
member re-queued with its params, as any lost trial.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import Any

import optuna
from omegaconf import DictConfig, OmegaConf

from searchlab.config import Composer, ConfigError
from searchlab.config.space import SearchSpace
from searchlab.data import Splits
from searchlab.packing.engine import PackedTraining, can_pack, shared_key, varies_per_member
from searchlab.packing.probe import probe_pack_size
from searchlab.study.search_work import SearchWork
from searchlab.study.trial import Attempt, Verdict
from searchlab.training import resolve_device


def shared_params(params: dict[str, Any]) -> dict[str, Any]:
    """The params every member of a pack takes from its first member."""
    return {key: value for key, value in params.items() if not varies_per_member(key, value)}


@contextlib.contextmanager
def fixed_sampler(study: optuna.Study, fixed: dict[str, Any]) -> Iterator[None]:
    """While the block runs, the study's sampler draws with `fixed` params fixed. Optuna reads study.sampler both
    when a trial is asked (relative sampling) and at each suggest, so asking and sampling both happen inside."""
    base = study.sampler
    study.sampler = optuna.samplers.PartialFixedSampler(fixed, base)
    try:
        yield
    finally:
        study.sampler = base


def check_pack(cfg: DictConfig, splits: Splits | None, space: SearchSpace, composer: Composer) -> None:
    """Refuses study.pack > 1, before the first trial, where a pack cannot train (why_not_packed)."""
    size = cfg.study.pack
    if size == 1:
        return
    found = why_not_packed(cfg, splits, space, composer)
    if found is not None:
        reason, fix = found
        raise ConfigError(f"study.pack={size}: {reason}; {fix}")


def why_not_packed(cfg: DictConfig, splits: Splits | None, space: SearchSpace,
                   composer: Composer) -> tuple[str, str] | None:
    """(why, what to do) where the study's trials cannot train in packs: DDP, a grid search, an explicit checkpoint
    period, or a configuration the pack cannot vectorize, probed for the base config and for each option of every
    group and flag the space draws from (optimizer, schedule, network...), per choice: members of one pack may then
    draw any of the optimizer and schedule options, each of which packs. None where they can."""
    if cfg.trainer.devices > 1:
        return (f"a pack trains on one device; trainer.devices={cfg.trainer.devices} (DDP) trains one trial at a "
                "time", "set study.pack=1")
    if cfg.study.sampler == "grid":
        return ("a grid search runs each grid point once, packing would draw members off the grid",
                "set study.pack=1 with study.sampler=grid")
    every = OmegaConf.select(cfg, "trainer.checkpoint_every_n_epochs", default="auto")
    if every not in ("auto", None):
        return ("packed trials are not checkpointed", "set trainer.checkpoint_every_n_epochs=auto, or study.pack=1 "
                "for trials long enough to need it")
    if splits is not None:  # the probes train where the trials will (here, after the early returns: a copy to a GPU)
        splits = splits.to(resolve_device(cfg.trainer.accelerator))
    probes: list[tuple[str, DictConfig]] = [("the base config", cfg)]
    for param, choice in _code_choices(space, cfg, composer):
        probes.append((f"{param}={choice}", composer({param: choice})))
    for label, probe in probes:
        reason = can_pack(probe, splits)
        if reason is not None:
            return f"{label} cannot be packed ({reason})", "set study.pack=1"
    return None


def choose_pack_size(cfg: DictConfig, splits: Splits | None, space: SearchSpace, composer: Composer) -> tuple[int, str]:
    """study.pack as a number, and for study.pack=auto the line that says what was chosen and why: 1 where the
    trials cannot be packed (why_not_packed), else the probe's choice (searchlab.packing.probe) on the device the
    trials train on."""
    if cfg.study.pack != "auto":
        check_pack(cfg, splits, space, composer)
        return int(cfg.study.pack), ""
    if splits is not None:  # one copy to the device for why_not_packed's probes and the size probe
        splits = splits.to(resolve_device(cfg.trainer.accelerator))
    found = why_not_packed(cfg, splits, space, composer)
    if found is not None:
        return 1, f"study.pack=auto: packs of 1 ({found[0]})"
    assert splits is not None  # a DataModule's data (splits None) is one of why_not_packed's reasons
    auto = cfg.study.pack_auto  # validated: min_gain, max_size, seconds
    probe = probe_pack_size(cfg, splits, min(int(auto.max_size), int(cfg.study.n_trials)), float(auto.min_gain),
                            float(auto.seconds))
    return probe.size, probe.describe()


def _code_choices(space: SearchSpace, cfg: DictConfig, composer: Composer) -> list[tuple[str, Any]]:
    """(key, value) of the space's choices that change which code trains: each option of a config group
    (optimizer=..., model=...; a user's own class among them) and each flag other than the base config's
    (model.batch_norm=true). Numbers (widths, batch sizes) change only sizes, so they are not probed: each probe
    costs ~0.2 s."""
    found = []
    for param, _ in space.walk():
        for choice in param.choices:
            flag = isinstance(choice, bool) and choice != OmegaConf.select(cfg, param.name, default=None)
            if param.name in composer.groups or flag:
                found.append((param.name, choice))
    return found


class PackWork(SearchWork):
    """The search's trials K at a time (SearchWork's config cache, data, tracker, model keeper): the lifecycle
    reserves up to K (the first waits for budget as any trial; the others take only what is free now) and prepares
    the further ones with the first's shared params fixed (members_like), or, `independent` (study.pack_members),
    drawn as lone trials would be: then the members that happen to share their shape form the packs (_groups).

    Why both: fixing the shape explores K times fewer shapes per trial, which loses where the target depends on the
    shape (synthetic-hard); independent members explore as lone trials, and pack only as often as the sampler draws
    the same shape twice in one round (TPE does, more as it converges)."""

    def __init__(self, *args: Any, size: int, independent: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.size = size
        self.independent = independent
        self.warned = False

    def members_like(self, first: Attempt) -> contextlib.AbstractContextManager[None]:
        if self.independent:
            return contextlib.nullcontext()
        return fixed_sampler(self.study, shared_params(first.trial.params))

    def train(self, attempts: list[Attempt]) -> Iterator[tuple[Attempt, Verdict | Exception]]:
        if not attempts:
            return
        # Asking and starting the members, shared evenly in their seconds.
        prep = (time.perf_counter() - attempts[0].start) / len(attempts)
        for group in _groups(attempts):
            yield from self._train(group, prep)

    def _train(self, group: list[Attempt], prep: float) -> Iterator[tuple[Attempt, Verdict | Exception]]:
        """Trains one group of members that can share a pack (alone when it is one); `prep` is each member's share
        of asking and starting the pack."""
        if len(group) == 1:
            yield group[0], self.train_one(group[0])
            return
        try:
            pack = PackedTraining([m.cfg for m in group], self.splits, self.metric, grouped=True)
        except ValueError as err:  # a combination check_pack's probes did not cover: these members go one by one
            self._warn(group, err)
            for member in group:
                yield member, self.train_one(member)
            return
        group_start = time.perf_counter()
        try:
            results = pack.fit(lambda member, epoch, metrics: group[member].reporter(epoch, metrics))
        except Exception as err:  # the pack's error fails each of its members, with the reason (an interrupt is
            # not caught here: the lifecycle fails every untold member)
            for member in group:
                yield member, err
            return
        # Each member's seconds: its share of the epochs it trained in, plus an equal share of the rest.
        rest = prep + (time.perf_counter() - group_start - sum(r.seconds for r in results)) / len(group)
        for member, result in zip(group, results, strict=True):
            yield member, self.verdict(member, result, result.seconds + rest)

    def _warn(self, group: list[Attempt], err: Exception) -> None:
        if not self.warned:
            numbers = ", ".join(str(m.trial.number) for m in group)
            print(f"searchlab: study.pack: trials {numbers} train one at a time: {str(err).splitlines()[0]}",
                  file=sys.stderr, flush=True)
            self.warned = True


def _groups(members: list[Attempt]) -> list[list[Attempt]]:
    """Members in packs of configs that can share one (a re-queued trial's params may differ in a shared key from
    the first member's), in order; most often one group of all. One shared_key per member: each resolves its
    config once."""
    if len(members) == 1:
        return [members]
    groups: dict[str, list[Attempt]] = {}
    for member in members:
        groups.setdefault(shared_key(member.cfg), []).append(member)
    return list(groups.values())
