"""Search-space parsing, conditional sampling, fixing keys from the command line, and the grid."""

from __future__ import annotations

import optuna
import pytest
import yaml
from omegaconf import DictConfig, OmegaConf

from searchlab.config.compose import (
    Composer,
    ConfigError,
    compose_config,
    config_dir,
    format_override,
    group_options,
    parse_overrides,
)
from searchlab.config.space import load_space, parse_space

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
    from searchlab.config.space import check_keys
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


def _same(fast, full) -> None:
    """Equal values, the same YAML (types, interpolations left as written) and the same struct flags."""
    assert fast == full
    assert OmegaConf.to_yaml(fast) == OmegaConf.to_yaml(full)
    for key in (None, *full.keys()):
        node_fast, node_full = (fast, full) if key is None else (fast[key], full[key])
        if isinstance(node_full, DictConfig):
            assert OmegaConf.is_struct(node_fast) == OmegaConf.is_struct(node_full), key


def _every_option() -> dict[str, list[str]]:
    return {group: options for group, options in group_options().items() if options}


def test_each_group_choice_composed_once_equals_full_composition_for_every_option_of_conf():
    """Every option of every group of conf/, alone and combined with an option of every other group at once (each
    option in some combination): the Composer's config equals Hydra's full composition, and it composed each
    option once, never a combination."""
    base = ["trainer.max_epochs=3", "optimizer.lr=0.02"]
    composer = Composer(base)
    options = _every_option()
    for group, names in options.items():
        for option in names:
            _same(composer({group: option}), compose_config(base + [f"{group}={option}"]))
    composed = composer.composed
    assert composed == 1 + sum(len(names) for names in options.values()) - len(options)  # base choices: cached
    # Options that extend another file (trainer=ddp) or name their package are not merged node by node.
    extends = {f"{g}={o}" for g, names in options.items() for o in names if _reaches_out(g, o)}
    assert extends == {"trainer=ddp"}
    in_full = 0
    for i in range(max(len(names) for names in options.values())):
        values = {group: names[i % len(names)] for group, names in options.items()}
        _same(composer(values), compose_config(base + [f"{g}={o}" for g, o in values.items()]))
        in_full += bool(extends & {f"{g}={o}" for g, o in values.items()})
    assert composer.composed == composed + in_full < composed + 7


def _reaches_out(group: str, option: str) -> bool:
    text = (config_dir() / group / f"{option}.yaml").read_text()
    return "# @package" in text or "defaults" in (yaml.safe_load(text) or {})


def test_options_that_may_reach_outside_their_node_are_composed_in_full(tmp_path, monkeypatch):
    """An option with a package header or a defaults list of its own may write other nodes or change other choices:
    a combination holding one is composed by Hydra in full, and still equals it."""
    conf = tmp_path / "conf"
    (conf / "optimizer").mkdir(parents=True)
    (conf / "scheduler").mkdir()
    (conf / "optimizer" / "global_sgd.yaml").write_text(
        "# @package _global_\noptimizer: {_target_: torch.optim.SGD, _partial_: true, lr: 0.3}\n"
        "data: {val_fraction: 0.3}\n")
    (conf / "scheduler" / "cosine_slow.yaml").write_text("defaults: [cosine, _self_]\nmin_factor: 0.5\n")
    monkeypatch.setenv("SEARCHLAB_CONFIG_DIR", str(conf))
    composer = Composer([])
    for values in ({"optimizer": "global_sgd", "scheduler": "step"}, {"optimizer": "adam", "scheduler": "cosine_slow"},
                   {"optimizer": "sgd", "scheduler": "step"}):
        before = composer.composed
        fast = composer(values)
        _same(fast, compose_config([f"{g}={o}" for g, o in values.items()]))
        plain = values == {"optimizer": "sgd", "scheduler": "step"}
        assert composer.composed - before == (2 if plain else 1), values  # each option alone, or the whole at once
    assert composer({"optimizer": "global_sgd", "scheduler": "step"}).data.val_fraction == 0.3  # another node


def test_overrides_parse_to_keys():
    assert parse_overrides(["optimizer=adam", "study.n_trials=3"]) == {"optimizer": "adam", "study.n_trials": "3"}


# ---- constraints (`_constraints_` in a space file) ----

BN_RULE = {"when": {"data.batch_size": 1}, "fix": {"model.batch_norm": False}, "why": "batch norm needs 2 or more"}
BN_SPEC = {"data.batch_size": {"choices": ["full", 1, 64]}, "model.batch_norm": {"choices": [False, True]},
           "optimizer.lr": {"low": 1e-4, "high": 1e-1, "log": True}, "_constraints_": [BN_RULE]}


def tpe_samples(space, n, seed=0):
    """n trials of the default study's TPE (multivariate, group, constant liar) told a made-up objective that
    rewards batch norm, so that TPE would draw it often, and batch 1 too."""
    sampler = optuna.samplers.TPESampler(n_startup_trials=10, multivariate=True, group=True, constant_liar=True,
                                         seed=seed)
    study = optuna.create_study(sampler=sampler, direction="maximize")
    out = []
    for _ in range(n):
        trial = study.ask()
        values = space.sample(trial)
        out.append((values, dict(trial.params), dict(trial.user_attrs)))
        study.tell(trial, float(values.get("model.batch_norm") is True) + float(values.get("data.batch_size") == 1))
    return out


def test_the_default_space_never_draws_batch_norm_with_batch_size_1():
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = load_space(Composer([]), {})
    samples = tpe_samples(space, 200)
    batch_1 = [s for s in samples if s[0]["data.batch_size"] == 1]
    assert len(batch_1) >= 10 and any(s[0]["model.batch_norm"] is True for s in samples)  # both were drawn
    for values, params, attrs in batch_1:
        assert values["model.batch_norm"] is False  # the trial's config gets the fixed value ...
        assert "model.batch_norm" not in params  # ... and Optuna never drew it
        assert attrs["constrained"] == {"model.batch_norm": False}
    for values, params, _ in samples:
        if values["data.batch_size"] != 1:
            assert params["model.batch_norm"] == values["model.batch_norm"]
    (line,) = space.describe_constraints()
    assert line.startswith("constraint (conf/search/default.yaml): ")
    assert "model.batch_norm is not drawn when data.batch_size=1" in line and "model.batch_norm=false" in line


def test_a_when_key_fixed_on_the_command_line_applies_the_constraint_to_every_trial():
    composer = Composer(["data.batch_size=1"])
    space = load_space(composer, {"data.batch_size": "1"})
    names = {p.name for p, _ in space.walk()}
    assert "model.batch_norm" not in names and "data.batch_size" not in names
    assert space.fixed == {"model.batch_norm": False}
    assert all(values["model.batch_norm"] is False for values, _, _ in tpe_samples(space, 12))
    assert "not drawn in any trial, since data.batch_size=1" in space.describe_constraints()[0]


def test_a_when_key_left_at_its_config_value_makes_the_constraint_inactive_and_says_so():
    space = load_space(Composer(["search=regularization"]), {"search": "regularization"})
    assert not space.constraints and not space.fixed
    assert "model.batch_norm" in {p.name for p in space.params}
    assert "never applies in this study, since data.batch_size=64" in space.describe_constraints()[0]
    space = load_space(Composer(["search=regularization", "data.batch_size=1"]),
                       {"search": "regularization", "data.batch_size": "1"})
    assert space.fixed == {"model.batch_norm": False} and "model.batch_norm" not in {p.name for p in space.params}


def test_a_fixed_key_against_the_constraint_rules_the_when_value_out():
    space = load_space(Composer(["model.batch_norm=true"]), {"model.batch_norm": "true"})
    (batch,) = [p for p in space.params if p.name == "data.batch_size"]
    assert 1 not in batch.choices and "full" in batch.choices
    assert all(values["data.batch_size"] != 1 for values, _, _ in tpe_samples(space, 30))
    assert "data.batch_size=1 is not drawn, since model.batch_norm=true is fixed" in space.describe_constraints()[0]


def test_both_keys_fixed_against_the_constraint_is_one_line_error():
    with pytest.raises(ConfigError) as err:
        load_space(Composer(["data.batch_size=1", "model.batch_norm=true"]),
                   {"data.batch_size": "1", "model.batch_norm": "true"})
    message = str(err.value)
    assert "\n" not in message and message.startswith("conf/search/default.yaml: _constraints_[0]: ")
    assert "model.batch_norm=true is fixed on the command line" in message and "change one of them" in message


def test_without_a_config_the_command_line_text_is_read_as_hydra_reads_it():
    space = parse_space(BN_SPEC, {}, {"data.batch_size": "1"}, "s.yaml")
    assert space.fixed == {"model.batch_norm": False}
    space = parse_space(BN_SPEC, {}, {"data.batch_size": "full"}, "s.yaml")
    assert not space.fixed and not space.constraints and "never applies" in space.describe_constraints()[0]


def test_a_when_key_listed_after_the_key_it_fixes_is_drawn_first():
    spec = {"model.batch_norm": {"choices": [False, True]}, "optimizer.lr": {"low": 1e-4, "high": 1e-1},
            "data.batch_size": {"choices": [1, 64]}, "_constraints_": [BN_RULE]}
    space = parse_space(spec, {}, {}, "s.yaml")
    assert [p.name for p in space.params] == ["optimizer.lr", "data.batch_size", "model.batch_norm"]
    samples = tpe_samples(space, 40)
    assert {v["data.batch_size"] for v, _, _ in samples} == {1, 64}
    assert all(v["model.batch_norm"] is False for v, _, _ in samples if v["data.batch_size"] == 1)


def test_a_constraint_reaches_keys_inside_group_options_and_can_fix_a_group():
    spec = {"optimizer": {"choices": {"sgd": {}, "adam": {"optimizer.beta1": {"low": 0.8, "high": 0.95}}}},
            "scheduler": {"choices": ["constant", "step"]},
            "data.batch_size": {"choices": ["full", 64]},
            "_constraints_": [{"when": {"data.batch_size": "full"}, "fix": {"optimizer": "sgd"}},
                              {"when": {"optimizer": "adam"}, "fix": {"scheduler": "constant"}}]}
    space = parse_space(spec, GROUPS, {}, "s.yaml")
    assert [p.name for p in space.params] == ["data.batch_size", "optimizer", "scheduler"]
    samples = tpe_samples(space, 60)
    # both rules had cases to act on (else the loop below would check nothing)
    assert {v["data.batch_size"] for v, _, _ in samples} == {"full", 64} and any(
        v["optimizer"] == "adam" for v, _, _ in samples)
    for values, params, _ in samples:
        if values["data.batch_size"] == "full":
            assert values["optimizer"] == "sgd" and "optimizer" not in params
        if values["optimizer"] == "adam":
            assert values["scheduler"] == "constant" and "scheduler" not in params and "optimizer.beta1" in params


def test_grid_with_constraints_stays_finite_and_never_trains_the_impossible_pair():
    spec = {**BN_SPEC, "optimizer.lr": {"low": 1e-4, "high": 1e-1, "grid": [1e-3, 1e-2]}}
    space = parse_space(spec, {}, {}, "s.yaml")
    grid = space.grid()
    assert grid["model.batch_norm"] == [False, True]  # kept: it is drawn when the batch is not 1
    study = optuna.create_study(sampler=optuna.samplers.GridSampler(grid, seed=0))
    seen = []
    study.optimize(lambda trial: seen.append(space.sample(trial, use_grid=True)) or 0.0, n_trials=20)
    assert len(seen) == 3 * 2 * 2  # the grid sampler stops the study when its grid is done
    assert not any(v["data.batch_size"] == 1 and v["model.batch_norm"] for v in seen)
    static = parse_space(spec, {}, {"data.batch_size": "1"}, "s.yaml")
    assert "model.batch_norm" not in static.grid() and static.fixed == {"model.batch_norm": False}
    ruled = parse_space(spec, {}, {"model.batch_norm": "true"}, "s.yaml")
    assert ruled.grid()["data.batch_size"] == ["full", 64]


@pytest.mark.parametrize("rules, message", [
    ("x", "expected a list"),
    ([{"when": {"data.batch_size": 1}}], "expected {when:"),
    ([{"when": {"data.batch_size": 1}, "fix": {"model.batch_norm": False}, "because": "x"}], "expected {when:"),
    ([{"when": {}, "fix": {"model.batch_norm": False}}], "`when` must be a non-empty mapping"),
    ([{"when": {"data.batch_size": [1, 2]}, "fix": {"model.batch_norm": False}}], "must be one value"),
    ([{"when": {"data.batch_sise": 1}, "fix": {"model.batch_norm": False}}],
     "unknown key 'data.batch_sise' in `when`; did you mean 'data.batch_size'?"),
    ([{"when": {"data.batch_size": 1}, "fix": {"model.batchnorm": False}}],
     "unknown key 'model.batchnorm' in `fix`; did you mean 'model.batch_norm'?"),
    ([{"when": {"data.batch_size": 1}, "fix": {"optimizer": "sgd"}}],
     "unknown key 'optimizer' in `fix` \\(a constraint fixes only keys the space searches\\)"),
    ([{"when": {"data.batch_size": 1}, "fix": {"model.batch_norm": "off"}}],
     "`fix` model.batch_norm=off is outside the space: it draws model.batch_norm one of false, true"),
    ([{"when": {"data.batch_size": 1}, "fix": {"optimizer.lr": 0.5}}],
     "`fix` optimizer.lr=0.5 is outside the space: it draws optimizer.lr in \\[0.0001, 0.1\\]"),
    ([{"when": {"data.batch_size": 2}, "fix": {"model.batch_norm": False}}],
     "`when` data.batch_size=2 can never hold: the space draws data.batch_size one of full, 1, 64"),
    ([{"when": {"model.batch_norm": True}, "fix": {"model.batch_norm": False}}], "in both `when` and `fix`"),
    ([BN_RULE, {"when": {"model.batch_norm": False}, "fix": {"data.batch_size": 64}}], "form a circle"),
], ids=["not-a-list", "no-fix", "extra-key", "empty-when", "list-value", "typo-when", "typo-fix", "fix-unsearched",
        "fix-not-a-choice", "fix-outside-range", "when-impossible", "when-and-fix", "circle"])
def test_bad_constraints_are_one_line_naming_the_file_and_key(rules, message):
    with pytest.raises(ConfigError, match=message) as err:
        parse_space({**BN_SPEC, "_constraints_": rules}, GROUPS, {}, "conf/search/x.yaml")
    assert str(err.value).startswith("conf/search/x.yaml: _constraints_") and "\n" not in str(err.value)


def test_a_constraint_fixing_a_group_from_its_own_option_key_is_refused():
    spec = {"optimizer": {"choices": {"sgd": {}, "adam": {"optimizer.beta1": {"choices": [0.8, 0.9]}}}},
            "_constraints_": [{"when": {"optimizer.beta1": 0.9}, "fix": {"optimizer": "sgd"}}]}
    with pytest.raises(ConfigError, match="'optimizer' cannot be fixed from 'optimizer.beta1'"):
        parse_space(spec, GROUPS, {}, "s.yaml")


def test_an_unknown_when_key_is_checked_against_the_whole_config():
    composer = Composer([])
    from searchlab.config.space import config_values
    config = config_values(composer)
    assert config["data.batch_size"] == 64 and config["optimizer"] == "adam"
    spec = {**BN_SPEC, "_constraints_": [{"when": {"trainer.max_epoch": 3}, "fix": {"model.batch_norm": False}}]}
    with pytest.raises(ConfigError, match="did you mean 'trainer.max_epochs'"):
        parse_space(spec, composer.groups, {}, "s.yaml", config)
    spec["_constraints_"][0]["when"] = {"optimizer": "sgd"}  # a group the space does not draw: its chosen option
    assert "since optimizer=adam" in parse_space(spec, composer.groups, {}, "s.yaml", config).describe_constraints()[0]
