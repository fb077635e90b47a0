"""Samplers of searchlab's own, where Optuna has no piece for the job (study.samplers entries name them by _target_)."""

from __future__ import annotations

import inspect
import random
from collections.abc import Mapping, Sequence
from typing import Any

from hydra.utils import get_class
from optuna import Study
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler, RandomSampler
from optuna.trial import FrozenTrial, TrialState


class RandomShare(BaseSampler):
    """A model-based sampler (`sampler`: a study.samplers-style entry) with a share of its trials drawn at random.

    A model-based sampler that settles early on one region (one optimizer family, batch norm off) can stay there for
    the rest of the budget: on the bench's friedman task, TPE with successive halving had its best value by the 20th
    trial and nothing better in the next 180. SMAC and BOHB interleave random configurations for this (BOHB: a
    third); Optuna has no such wrapper, so this is the small one. Which trials are random depends only on the seed
    and the trial's number, so every worker of a study agrees on it and a seeded study repeats.
    """

    def __init__(self, sampler: Mapping[str, Any], share: float = 0.2, seed: int | None = None) -> None:
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"share must be between 0 and 1, got {share}")
        entry = dict(sampler)
        cls = get_class(entry.pop("_target_"))
        if seed is not None and "seed" in inspect.signature(cls).parameters:
            entry.setdefault("seed", seed)
        self._model: BaseSampler = cls(**entry)
        self._random = RandomSampler(seed=seed)
        self._share, self._seed = share, seed

    def is_random(self, number: int) -> bool:
        """Whether trial `number` is one of the random share."""
        return random.Random(f"{self._seed}:{number}").random() < self._share

    def _for(self, trial: FrozenTrial) -> BaseSampler:
        return self._random if self.is_random(trial.number) else self._model

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self._for(trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study: Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        return self._for(trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study: Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return self._for(trial).sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        self._for(trial).before_trial(study, trial)

    def after_trial(self, study: Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        self._for(trial).after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._model.reseed_rng()
        self._random.reseed_rng()
