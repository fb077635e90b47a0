"""Search-space parsing, conditional sampling, fixing keys from the command line, and the grid."""

from __future__ import annotations

import optuna
import pytest

from searchlab.config import Composer, ConfigError, compose_config, format_override, parse_overrides
from searchlab.space import load_space, parse_space

GROUPS = {"optimizer": ["adam", "rmsprop", "sgd"], "scheduler": ["constant", "step"]}

SPEC = {
    "optimizer": {"choices": {"sgd": {}, "rmsprop": {"optimizer.alpha": {"low": 0.9, "high": 0.99}},
                              "adam": {"optimizer.beta1": {"low": 0.8, "high": 0.95}}}},
    "optimizer.lr": {"low": 1e-4, "high": 1e-1, "log": True},
    "model.depth": {"low": 1, "high": 3},
    "data.batch_size": {"choices": ["full", 1, 64]},
}


def sample_many(space, n=60, seed=0):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    out = []
    for _ in range(n):
        trial = study.ask()
        out.append(space.sample(trial))
        study.tell(trial, 0.0)
    return out


def test_conditional_keys_follow_their_choice():
    space = parse_space(SPEC, GROUPS, {}, "spec")
    samples = sample_many(space)
    assert {s["optimizer"] for s in samples} == {"sgd", "rmsprop", "adam"}
    for s in samples:
        assert ("optimizer.alpha" in s) == (s["optimizer"] == "rmsprop")
        assert ("optimizer.beta1" in s) == (s["optimizer"] == "adam")
        assert 1e-4 <= s["optimizer.lr"] <= 1e-1
        assert isinstance(s["model.depth"], int) and 1 <= s["model.depth"] <= 3
        assert s["data.batch_size"] in ("full", 1, 64)


def test_int_bounds_give_int_params_and_float_bounds_float():
    space = parse_space({"a.x": {"low": 1, "high": 4}, "a.y": {"low": 1.0, "high": 4}}, {}, {}, "s")
    trial = optuna.create_study().ask()
    values = space.sample(trial)
    assert isinstance(values["a.x"], int)
    assert isinstance(values["a.y"], float)


def test_fixing_a_group_keeps_its_own_keys_and_drops_the_rest():
    space = parse_space(SPEC, GROUPS, {"optimizer": "rmsprop", "optimizer.lr": "0.01"}, "spec")
    names = [p.name for p in space.params]
    assert "optimizer" not in names and "optimizer.lr" not in names
    assert "optimizer.alpha" in names and "optimizer.beta1" not in names


@pytest.mark.parametrize("entry, message", [
    ({"low": 2, "high": 1}, "greater than high"),
    ({"low": 0.0, "high": 1.0, "log": True}, "positive bounds"),
    ({"low": -1.0, "high": 1.0, "log": True}, "positive bounds"),
    ({"low": 1}, "needs `low` and `high`"),
    ({"low": 1, "high": 2, "lgo": True}, "allowed keys"),
    ({"choices": []}, "non-empty"),
    ({"low": "a", "high": 2}, "must be a finite number"),
    (0.5, "expected"),
], ids=["low>high", "log-zero", "log-negative", "no-high", "typo", "empty-choices", "text-bound", "scalar"])
def test_bad_ranges_name_the_file_and_key(entry, message):
    with pytest.raises(ConfigError, match=message) as err:
        parse_space({"optimizer.lr": entry}, GROUPS, {}, "conf/search/x.yaml")
    assert "conf/search/x.yaml" in str(err.value) and "optimizer.lr" in str(err.value)


def test_unknown_group_option_in_space():
    with pytest.raises(ConfigError, match="unknown option 'adagrad'"):
        parse_space({"optimizer": {"choices": ["adam", "adagrad"]}}, GROUPS, {}, "s")


def test_grid_needs_values_for_ranges():
    space = parse_space({"optimizer.lr": {"low": 1e-3, "high": 1e-1, "log": True}}, GROUPS, {}, "s")
    with pytest.raises(ConfigError, match="grid"):
        space.grid()
    space = parse_space({"optimizer.lr": {"low": 1e-3, "high": 1e-1, "grid": [1e-3, 1e-2]},
                         "optimizer": {"choices": ["adam", "sgd"]}}, GROUPS, {}, "s")
    assert space.grid() == {"optimizer.lr": [0.001, 0.01], "optimizer": ["adam", "sgd"]}


def test_default_space_is_valid_and_every_key_exists():
    composer = Composer([])
    space = load_space(composer, {})
    names = {p.name for p, _ in space.walk()}
    assert {"optimizer", "scheduler", "optimizer.lr", "optimizer.weight_decay", "data.batch_size", "model.dropout",
            "model.batch_norm", "module.l1", "optimizer.momentum", "optimizer.beta1"} <= names


def test_space_key_missing_from_config_is_rejected():
    composer = Composer([])
    space = parse_space({"optimizer": {"choices": {"sgd": {"optimizer.beta1": {"low": 0.8, "high": 0.9}}}}},
                        composer.groups, {}, "conf/search/x.yaml")
    from searchlab.space import check_keys
    with pytest.raises(ConfigError, match="'optimizer.beta1' is not a key of the config when optimizer=sgd"):
        check_keys(space, composer)


def test_fast_composition_equals_a_full_hydra_compose():
    """The Composer's cached path must give exactly what Hydra composes from the same overrides."""
    composer = Composer(["trainer.max_epochs=3"])
    values = {"optimizer": "rmsprop", "optimizer.lr": 0.0123456789, "optimizer.alpha": 0.95, "scheduler": "step",
              "scheduler.gamma": 0.5, "data.batch_size": "full", "model.batch_norm": True, "module.l1": 1e-07}
    fast = composer(values)
    full = compose_config(["trainer.max_epochs=3"] + [format_override(k, v) for k, v in values.items()])
    assert fast == full
    assert fast.optimizer._target_ == "torch.optim.RMSprop" and fast.optimizer.lr == 0.0123456789


def test_overrides_parse_to_keys():
    assert parse_overrides(["optimizer=adam", "study.n_trials=3"]) == {"optimizer": "adam", "study.n_trials": "3"}
