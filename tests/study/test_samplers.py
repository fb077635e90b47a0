"""searchlab's own samplers: RandomShare, a model-based sampler with a share of its trials drawn at random."""

from __future__ import annotations

import optuna
import pytest
from helpers import load_study
from omegaconf import OmegaConf
from optuna.samplers import BaseSampler

from searchlab.cli import main
from searchlab.study.loop import make_sampler
from searchlab.study.samplers import RandomShare

TPE = {"_target_": "optuna.samplers.TPESampler", "n_startup_trials": 3}


def objective(trial: optuna.Trial) -> float:
    return (trial.suggest_float("x", -5, 5) - 1) ** 2 + (trial.suggest_categorical("c", ["a", "b"]) == "b")


class Refusing(BaseSampler):
    """A model sampler that must never be asked: share=1 draws every trial at random."""

    def __init__(self, seed: int | None = None) -> None:
        pass

    def infer_relative_search_space(self, study, trial):
        raise AssertionError("the model sampler was asked for a random trial")

    def sample_relative(self, study, trial, search_space):
        raise AssertionError("the model sampler was asked for a random trial")

    def sample_independent(self, study, trial, param_name, param_distribution):
        raise AssertionError("the model sampler was asked for a random trial")


def test_the_random_share_is_the_asked_fraction_and_every_worker_agrees_on_it():
    first, second = RandomShare(TPE, share=0.25, seed=3), RandomShare(TPE, share=0.25, seed=3)
    picks = [first.is_random(n) for n in range(2000)]
    assert picks == [second.is_random(n) for n in range(2000)]  # a second worker of the study: the same trials
    assert 0.22 < sum(picks) / len(picks) < 0.28
    assert picks != [RandomShare(TPE, share=0.25, seed=4).is_random(n) for n in range(2000)]


def test_share_zero_draws_exactly_what_the_model_sampler_draws():
    plain = optuna.create_study(sampler=optuna.samplers.TPESampler(n_startup_trials=3, seed=5))
    shared = optuna.create_study(sampler=RandomShare(TPE, share=0.0, seed=5))
    plain.optimize(objective, n_trials=12)
    shared.optimize(objective, n_trials=12)
    assert [t.params for t in shared.trials] == [t.params for t in plain.trials]


def test_share_one_never_asks_the_model_sampler():
    study = optuna.create_study(sampler=RandomShare({"_target_": f"{__name__}.Refusing"}, share=1.0, seed=0))
    study.optimize(objective, n_trials=8)
    assert len(study.trials) == 8


def test_a_share_outside_zero_to_one_is_refused():
    with pytest.raises(ValueError, match="share must be between 0 and 1"):
        RandomShare(TPE, share=1.5)


def test_a_study_samplers_entry_seeds_the_wrapped_sampler_from_study_seed():
    entry = {"_target_": "searchlab.study.samplers.RandomShare", "sampler": TPE, "share": 0.5}
    cfg = OmegaConf.create({"study": {"samplers": {"mixed": entry}, "sampler": "mixed", "seed": 11}})
    draws = []
    for _ in range(2):
        study = optuna.create_study(sampler=make_sampler(cfg, space=None))
        study.optimize(objective, n_trials=10)
        draws.append([t.params for t in study.trials])
    assert draws[0] == draws[1]


def test_a_search_runs_with_random_share_from_the_command_line(tmp_path, store_overrides):
    entry = ("+study.samplers.mixed={_target_:searchlab.study.samplers.RandomShare,share:0.5,"
             "sampler:{_target_:optuna.samplers.TPESampler,n_startup_trials:1}}")
    assert main(["search", "study.name=mixed", "study.n_trials=3", entry, "study.sampler=mixed",
                 "trainer.max_epochs=1", "model.width=16", *store_overrides]) == 0
    assert len([t for t in load_study(tmp_path, "mixed").trials if t.state.is_finished()]) == 3
