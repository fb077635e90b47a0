"""Hydra composition of run configs and their validation.

Everything that reads `conf/` goes through here, so bad input is caught in one place and reported as one line
(`ConfigError`) before anything is written to a store.
"""

from __future__ import annotations

import difflib
import math
import os
import pickle
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from hydra import compose
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, OverrideParseException
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from searchlab.config.user_callbacks import check_callbacks
from searchlab.errors import ConfigError

# The user's config folder (`--config-dir`): the CLI sets it here, so the workers and DDP ranks it starts inherit it.
USER_CONFIG_ENV = "SEARCHLAB_CONFIG_DIR"


def config_dir() -> Path:
    """searchlab's own conf/ tree: the one installed in the package (a wheel), else the repo's (a checkout)."""
    packaged = Path(__file__).parents[1] / "conf"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "conf"


def user_config_dir() -> Path | None:
    """The user's config folder, $SEARCHLAB_CONFIG_DIR (set from --config-dir), or None."""
    text = os.environ.get(USER_CONFIG_ENV, "")
    if not text:
        return None
    chosen = Path(text).resolve()
    if not chosen.is_dir():
        raise ConfigError(f"--config-dir: no such folder '{chosen}'; give a folder of config groups "
                          "(e.g. conf/ holding model/, search/ ...)")
    return chosen


def config_dirs() -> list[Path]:
    """The config folders in the order Hydra searches them: the user's first (its options win), then searchlab's."""
    user = user_config_dir()
    return ([user] if user else []) + [config_dir()]


def group_options() -> dict[str, list[str]]:
    """Config groups and their options, read from the folder layout (conf/<group>/<option>.yaml), over the built-in
    groups and the user's folder (whose options add to the built-in groups)."""
    builtin = config_dir()
    groups = {group.name for group in builtin.iterdir() if group.is_dir()}
    return {
        name: sorted({p.stem for folder in config_dirs() for p in (folder / name).glob("*.yaml")})
        for name in sorted(groups)
    }


def redact(text: str) -> str:
    """Any URL password in the text replaced by ***, for messages and logged params.

    The password runs to the last @ before the host (passwords may hold @), as URL parsers read it.
    """
    return re.sub(r"(://[^:/@\s]+:)[^\s/]*@", r"\1***@", str(text))


# `+key=value` may add entries to these tables only; anywhere else a `+` would hide a misspelt key.
_EXTENSIBLE = ("study.samplers.", "study.pruners.", "trainer.callbacks.")


def parse_overrides(overrides: Sequence[str]) -> dict[str, str]:
    """Override key -> its text value; malformed ones and unknown group options raise ConfigError."""
    groups = group_options()
    parsed: dict[str, str] = {}
    for text in overrides:
        try:
            (override,) = OverridesParser.create().parse_overrides([text])
        except OverrideParseException as err:
            first = str(err).splitlines()[0]
            raise ConfigError(f"malformed override '{text}': {first} (expected key=value)") from None
        key = override.key_or_group
        value = override.value()
        if not key:
            raise ConfigError(f"malformed override '{text}': no key before '=' (expected key=value)")
        if key in groups and override.is_delete():
            raise ConfigError(f"{key}: a config group cannot be deleted; choose one of {', '.join(groups[key])}")
        if key in groups and not isinstance(value, str):
            raise ConfigError(f"{key}: expected one option name (choose from {', '.join(groups[key])}), got {value!r}")
        if override.is_add() and not key.startswith(_EXTENSIBLE):
            raise ConfigError(
                f"'{text}': adding keys with + is only for new entries of study.samplers, study.pruners or "
                f"trainer.callbacks; "
                f"to set an existing key drop the +, and check the spelling of '{key}'")
        if key in groups and value not in groups[key]:
            near = difflib.get_close_matches(str(value), groups[key], n=1)
            hint = f"did you mean {key}={near[0]}? " if near else ""
            raise ConfigError(
                f"{key}: unknown option '{value}' ({hint}choose from {', '.join(groups[key])}; "
                f"options are the files in conf/{key}/ and in --config-dir's {key}/)"
            )
        parsed[key] = text.split("=", 1)[1] if "=" in text else ""
    return parsed


_initialized_with: list[Path] = []


def _initialize_hydra() -> None:
    """Hydra's global state over searchlab's conf/ with the user's folder in front.

    Hydra's own `hydra.searchpath` appends folders after the primary one, so a user's option could not replace a
    built-in option of the same name; this builds the search path as initialize_config_dir does, with the user's
    folder prepended.
    """
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path

    dirs = config_dirs()
    gh = GlobalHydra.instance()
    if gh.is_initialized() and _initialized_with == dirs:
        return
    gh.clear()
    search_path = create_config_search_path(str(config_dir()))
    if len(dirs) > 1:
        search_path.prepend(provider="searchlab --config-dir", path=f"file://{dirs[0]}")
    Hydra.create_main_hydra2(task_name="searchlab", config_search_path=search_path)  # sets GlobalHydra
    _initialized_with[:] = dirs


def compose_config(overrides: Sequence[str]) -> DictConfig:
    """One full Hydra composition of conf/config.yaml with the overrides (~40 ms; see Composer for the fast path)."""
    return _compose(overrides)[0]


def _compose(overrides: Sequence[str]) -> tuple[DictConfig, dict[str, str]]:
    """The composed config, and the option each config group got (Hydra's `hydra.runtime.choices`)."""
    parse_overrides(overrides)
    _initialize_hydra()
    try:
        cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
        choices = {str(k): str(v) for k, v in cfg.hydra.runtime.choices.items() if not str(k).startswith("hydra/")}
        with open_dict(cfg):  # as hydra.compose(return_hydra_config=False) does
            del cfg["hydra"]
        OmegaConf.to_container(cfg, resolve=True)  # a dangling ${...} fails here, not mid-study
        return cfg, choices
    except yaml.YAMLError as err:
        raise ConfigError(f"config file error: {' '.join(str(err).split())}") from None
    except (HydraException, OmegaConfBaseException, ValueError) as err:
        raise ConfigError(_composition_message(str(err), overrides)) from None


def _composition_message(message: str, overrides: Sequence[str]) -> str:
    unknown = re.search(r"Could not override '([^']+)'", message)
    if unknown:
        key = unknown.group(1)
        return f"unknown key '{key}': no such key in the composed config{_near_key(key, overrides)}"
    lines = [line for line in message.strip().splitlines() if line.strip()]
    return " ".join(lines[:2]) if lines else "the config could not be composed"


def _near_key(key: str, overrides: Sequence[str]) -> str:
    """"; did you mean 'model.width'?" for a misspelt key, from the keys of the config its group choices compose."""
    groups = group_options()
    choices = [o for o in overrides if o.split("=", 1)[0] in groups]
    try:
        cfg = compose("config", overrides=choices)
    except Exception:  # the hint is a courtesy: no hint rather than a second error
        return " (see conf/ for the keys)"
    head, _, tail = key.rpartition(".")
    parent = OmegaConf.select(cfg, head) if head else cfg
    names = [str(k) for k in parent.keys()] if isinstance(parent, DictConfig) else []
    near = difflib.get_close_matches(tail, names, n=1)
    return f"; did you mean '{head + '.' if head else ''}{near[0]}'?" if near else " (see conf/ for the keys)"


class Composer:
    """Builds each trial's config as Hydra would compose it from the run's and the trial's overrides.

    A Hydra compose costs ~40 ms, the largest fixed cost of a trial, so each group choice (optimizer=..., one group
    at a time) is composed once per process, and a trial's config is a copy of the cached config of its group
    choices with the sampled scalar values set on it (~0.3 ms). A combination of choices (optimizer=sgd
    scheduler=step) takes each group's node from the config its choice composed alone, when every option involved
    (and the base's option of that group) is a plain file of its group (no `# @package` header, no defaults list
    of its own): Hydra merges such a file at the group's node and nowhere else, so the nodes do not interact. Any
    other combination is composed in full. Tests check every option of every group of conf/ against a full compose.
    """

    def __init__(self, base_overrides: Sequence[str]) -> None:
        self.base_overrides = list(base_overrides)
        self.groups = group_options()
        self.base, self.choices = _compose(self.base_overrides)
        self._by_choices: dict[tuple[str, ...], DictConfig] = {(): self.base}
        self._plain: dict[str, bool] = {}
        self._pickled: dict[tuple[str, ...], bytes] = {}
        self.composed = 1  # full Hydra compositions made (the tests count them)

    def __call__(self, values: dict[str, Any]) -> DictConfig:
        """The config for base overrides + these key -> value settings (group keys take an option name)."""
        # The base's own options need no composing; the rest, in one order whatever the order drawn.
        choices = tuple(sorted(f"{k}={v}" for k, v in values.items() if k in self.groups and self.choices.get(k) != v))
        # Unpickled from bytes kept per combination: the same deep copy as DictConfig.copy() (flags, types,
        # parents), and ~25% cheaper than a pickle round trip per trial (its dumps is paid once).
        if choices not in self._pickled:
            self._pickled[choices] = pickle.dumps(self._config_of(choices))
        cfg = pickle.loads(self._pickled[choices])
        for key, value in values.items():
            if key not in self.groups:
                if not has_key(cfg, key):
                    raise ConfigError(f"unknown key '{key}': no such key in the composed config")
                OmegaConf.update(cfg, key, value, merge=False)
        return cfg

    def _config_of(self, choices: tuple[str, ...]) -> DictConfig:
        """The composed config of these group choices (cached; callers copy it)."""
        if choices not in self._by_choices:
            groups = [choice.split("=", 1)[0] for choice in choices]
            if len(choices) > 1 and all(self._fills_only_its_node(c) for c in choices) and all(
                    self._fills_only_its_node(f"{g}={self.choices.get(g)}") and g in self.base for g in groups):
                cfg = pickle.loads(pickle.dumps(self.base))
                for group, choice in zip(groups, choices, strict=True):
                    cfg[group] = self._config_of((choice,))[group]
            else:
                cfg = compose_config(self.base_overrides + list(choices))
                self.composed += 1
            self._by_choices[choices] = cfg
        return self._by_choices[choices]

    def _fills_only_its_node(self, choice: str) -> bool:
        """Whether group=option is a file that Hydra merges at cfg.<group> alone: no package header (which could
        put it anywhere) and no defaults list (which could change other groups' choices)."""
        if choice not in self._plain:
            group, option = choice.split("=", 1)
            _initialize_hydra()
            loaded = GlobalHydra.instance().config_loader().repository.load_config(f"{group}/{option}")
            self._plain[choice] = loaded is not None and loaded.header.get("package") is None and all(
                entry.is_self() for entry in loaded.defaults_list or [])
        return self._plain[choice]


def has_key(cfg: DictConfig, key: str) -> bool:
    """Whether the dotted key exists, also when its value is still missing (???)."""
    head, _, tail = key.rpartition(".")
    parent = OmegaConf.select(cfg, head, throw_on_missing=False) if head else cfg
    return isinstance(parent, DictConfig) and tail in parent.keys()


_ABSENT = object()


def format_override(key: str, value: Any) -> str:
    """key=value as Hydra's override grammar reads it back to the same value."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif value is None:
        text = "null"
    elif isinstance(value, float):
        text = repr(value)
    else:
        text = str(value)
    return f"{key}={text}"


# Keys holding counts or durations: a wrong type or a non-positive value is bad input, caught before any trial.
# Keys of a group entry (model, data, ...) are checked only where the entry has them: a user's entry has its own.
_POSITIVE_INTS = (
    "study.n_trials", "study.max_consecutive_failures", "trainer.max_epochs", "trainer.eval_batch_size",
    "trainer.devices", "trainer.process_group_timeout_s",
    "model.width", "model.depth", "data.size", "data.features", "data.informative", "data.classes",
)
_FRACTIONS = ("data.val_fraction", "data.test_fraction")
_RATES = ("model.dropout",)  # in [0, 1)
_NON_NEGATIVE = ("module.l1", "optimizer.weight_decay")
_POSITIVE = ("optimizer.lr", "trainer.checkpoint_auto_seconds")
_CHOICES = {
    "trainer.accelerator": ("auto", "cpu", "gpu", "cuda"),
    "trainer.process_group_backend": ("auto", "nccl", "gloo"),
    "trainer.precision": ("auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true"),
}
DIRECTIONS = ("auto", "maximize", "minimize")
# study.direction=auto: a metric whose name holds one of these words (split at _ / . - and digits) is maximized or
# minimized (a word may end in digits: acc1). A name with none of them needs an explicit study.direction.
MAXIMIZED_WORDS = ("acc", "accuracy", "f1", "auroc", "auc", "roc", "r2", "precision", "recall", "iou", "dice", "map",
                   "ap", "score", "reward", "return")
MINIMIZED_WORDS = ("loss", "error", "err", "mse", "rmse", "mae", "mape", "nll", "perplexity", "ppl", "time",
                   "seconds", "params", "wer", "cer")


def metric_direction(metric: str) -> str | None:
    """maximize or minimize, as the metric's name says (val_acc: maximize, val_loss: minimize), else None."""
    tokens = [t for t in re.split(r"[_/.\-\s]+", metric.lower()) if t]
    words = set(tokens) | {t.rstrip("0123456789") for t in tokens}  # top5acc -> top5acc, acc1 -> acc
    if words & set(MINIMIZED_WORDS):
        return "minimize"
    if words & set(MAXIMIZED_WORDS):
        return "maximize"
    return None


def _check_objectives(study: DictConfig) -> None:
    """study.metric: a name or a list of distinct names; study.direction: auto, maximize, minimize, or a list of them
    as long as study.metric (one word other than auto cannot stand for several metrics: which would it mean?)."""
    metric, direction = study.metric, study.direction
    if isinstance(metric, ListConfig):
        names = list(metric)
        if not names or not all(isinstance(n, str) and n for n in names):
            raise ConfigError(f"study.metric: expected a logged metric's name or a list of names, got "
                              f"{OmegaConf.to_container(metric)!r}")
        twice = [n for n in dict.fromkeys(names) if names.count(n) > 1]
        if twice:
            raise ConfigError(f"study.metric: {twice[0]} is listed twice; list each metric once")
    elif not isinstance(metric, str) or not metric:
        raise ConfigError(f"study.metric: expected the name of a logged metric, got {metric!r}")
    else:
        names = [metric]
    if isinstance(direction, ListConfig):
        directions = list(direction)
        wrong = [d for d in directions if d not in DIRECTIONS]
        if wrong:
            raise ConfigError(f"study.direction: expected each of {', '.join(DIRECTIONS)}, got {wrong[0]!r}")
        if len(directions) != len(names):
            raise ConfigError(f"study.direction: {len(directions)} directions for {len(names)} "
                              f"metric{'s' if len(names) != 1 else ''} in study.metric; give one per metric "
                              "(auto decides from the name)")
    elif direction not in DIRECTIONS:
        raise ConfigError(f"study.direction: expected one of {', '.join(DIRECTIONS)}, got {direction!r}")
    elif direction != "auto" and len(names) > 1:
        raise ConfigError(f"study.direction: one direction ({direction}) for {len(names)} metrics in study.metric; "
                          f"give one per metric, e.g. 'study.direction=[{','.join([direction] * len(names))}]', "
                          "or auto")


def validate_config(cfg: DictConfig) -> None:
    """Checks values the composition cannot: types and ranges of counts, durations and named choices."""
    try:
        _check_values(cfg)
    except OmegaConfBaseException as err:  # a required key deleted with ~key, or the like
        key = getattr(err, "full_key", None) or "config"
        raise ConfigError(f"{key}: required key is missing or unreadable ({str(err).splitlines()[0]})") from None


def _check_values(cfg: DictConfig) -> None:
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"{missing[0]}: required but not set; give it on the command line ({missing[0]}=...)")
    for group in ("data", "model", "module", "optimizer"):
        if not isinstance(cfg.get(group), DictConfig) or "_target_" not in cfg[group]:
            raise ConfigError(f"{group}: the entry has no _target_ (name the class or function that builds it)")

    def each(keys: Sequence[str]) -> list[tuple[str, Any]]:
        found = ((key, OmegaConf.select(cfg, key, default=_ABSENT)) for key in keys)
        return [(key, value) for key, value in found if value is not _ABSENT]

    for key, value in each(_POSITIVE_INTS):
        if not _is_positive_int(value):
            raise ConfigError(f"{key}: expected a positive integer, got {value!r}")
    validate_study(cfg)
    limit = cfg.trainer.limit_train_batches
    if limit is not None and not _is_positive_int(limit):
        raise ConfigError(f"trainer.limit_train_batches: expected a positive integer or null, got {limit!r}")
    batch = cfg.data.get("batch_size", 1)
    if batch != "full" and not _is_positive_int(batch):
        raise ConfigError(f"data.batch_size: expected a positive integer or 'full', got {batch!r}")
    for key, allowed in _CHOICES.items():
        if OmegaConf.select(cfg, key) not in allowed:
            raise ConfigError(f"{key}: expected one of {', '.join(allowed)}, got {OmegaConf.select(cfg, key)!r}")
    for key, value in each(_FRACTIONS):
        if not (_is_number(value) and 0 < value < 1):
            raise ConfigError(f"{key}: expected a fraction between 0 and 1, got {value!r}")
    for key, value in each(_POSITIVE):
        if not (_is_number(value) and value > 0):
            raise ConfigError(f"{key}: expected a positive number, got {value!r}")
    for key, value in each(_RATES):
        if not (_is_number(value) and 0 <= value < 1):
            raise ConfigError(f"{key}: expected a rate in [0, 1), got {value!r}")
    for key, value in each(_NON_NEGATIVE):
        if not (_is_number(value) and value >= 0):
            raise ConfigError(f"{key}: expected a non-negative number, got {value!r}")
    _check_seed(cfg, "seed")
    _check_limits(cfg)


def validate_study(cfg: DictConfig) -> None:
    """The checks of study.* and tracking.* alone: a search's, and those of searchlab's Hydra sweeper, whose app
    has its own config."""
    for key in ("study.n_trials", "study.max_consecutive_failures"):
        if not _is_positive_int(OmegaConf.select(cfg, key)):
            raise ConfigError(f"{key}: expected a positive integer, got {OmegaConf.select(cfg, key)!r}")
    if not isinstance(cfg.study.name, str) or not cfg.study.name:
        raise ConfigError(f"study.name: expected a name, got {cfg.study.name!r} (quote it: study.name=\"'...'\")")
    _check_objectives(cfg.study)
    timeout = cfg.study.timeout
    if timeout is not None and not (_is_number(timeout) and timeout > 0):
        raise ConfigError(f"study.timeout: expected a positive number of seconds or null, got {timeout!r}")
    diverged = cfg.study.get("max_diverged_at_start")
    if diverged is not None and not (isinstance(diverged, int) and not isinstance(diverged, bool) and diverged >= 0):
        raise ConfigError(f"study.max_diverged_at_start: expected a non-negative integer or null, got {diverged!r}")
    _check_warm_start(cfg.study)
    _check_stop_when(cfg.study.get("stop_when"), isinstance(cfg.study.metric, ListConfig) and len(cfg.study.metric) > 1)
    for key, table in (("study.sampler", "study.samplers"), ("study.pruner", "study.pruners")):
        _check_choice(key, OmegaConf.select(cfg, key), list(OmegaConf.select(cfg, table)))
    _check_pack(cfg.study)
    _check_seed(cfg, "study.seed")
    _check_model_logging(cfg)
    check_callbacks(cfg)


_STOP_WHEN_KEYS = ("patience", "min_delta", "regret_bound", "min_trials")


def _check_choice(key: str, value: Any, names: list[str]) -> None:
    if value not in names:
        near = difflib.get_close_matches(str(value), names, n=1)
        hint = f"did you mean {near[0]}? " if near else ""
        raise ConfigError(f"{key}: unknown '{value}' ({hint}choose from {', '.join(names)})")


def _check_known_keys(key: str, node: DictConfig, allowed: Sequence[str]) -> None:
    """The first key of `node` not in `allowed` refused in one line, with the nearest allowed one."""
    unknown = [str(k) for k in node if k not in allowed]
    if unknown:
        near = difflib.get_close_matches(unknown[0], allowed, n=1)
        hint = f"did you mean {near[0]}? " if near else ""
        raise ConfigError(f"{key}: unknown key '{unknown[0]}' ({hint}keys: {', '.join(allowed)})")


PACK_MEMBERS = ("like_first", "independent")  # study.pack_members: how members 2..K are drawn (study.pack_trials)


def _check_pack(study: DictConfig) -> None:
    """study.pack: K or auto; study.pack_members; study.pack_auto's probe settings (searchlab.packing.probe)."""
    pack = study.get("pack", 1)
    if pack != "auto" and not _is_positive_int(pack):
        near = " (did you mean auto?)" if isinstance(pack, str) and difflib.get_close_matches(pack, ["auto"]) else ""
        raise ConfigError(f"study.pack: expected a positive integer or auto, got {pack!r}{near}")
    _check_choice("study.pack_members", study.get("pack_members", "independent"), list(PACK_MEMBERS))
    auto = study.get("pack_auto")
    if auto is None and pack != "auto":
        return
    if not isinstance(auto, DictConfig):
        raise ConfigError(f"study.pack_auto: expected a mapping of {', '.join(_PACK_AUTO_KEYS)}, got {auto!r}")
    _check_known_keys("study.pack_auto", auto, _PACK_AUTO_KEYS)
    missing = [k for k in _PACK_AUTO_KEYS if k not in auto]
    if pack == "auto" and missing:
        raise ConfigError(f"study.pack_auto.{missing[0]}: study.pack=auto needs it (conf/study/default.yaml has "
                          f"{', '.join(_PACK_AUTO_KEYS)}); set it, or study.pack to a number")
    if "min_gain" in auto and not (_is_number(auto.min_gain) and auto.min_gain >= 1):
        raise ConfigError(f"study.pack_auto.min_gain: expected a number >= 1 (times the member-epochs per second of "
                          f"one trial), got {auto.min_gain!r}")
    if "max_size" in auto and not _is_positive_int(auto.max_size):
        raise ConfigError(f"study.pack_auto.max_size: expected a positive integer, got {auto.max_size!r}")
    if "seconds" in auto and not (_is_number(auto.seconds) and auto.seconds > 0):
        raise ConfigError(f"study.pack_auto.seconds: expected a positive number, got {auto.seconds!r}")


_PACK_AUTO_KEYS = ("min_gain", "max_size", "seconds")


def _check_warm_start(study: DictConfig) -> None:
    """study.warm_start: a list of study names (NAME, or NAME@STORAGE); study.warm_start_top_k: a positive int.
    Whether the studies exist is checked where they are read (searchlab.study.warm_start), still before any write."""
    names = study.get("warm_start")
    if names is not None and not (isinstance(names, ListConfig) and all(
            isinstance(n, str) and n.partition("@")[0] and not n.endswith("@") for n in names)):
        shown = OmegaConf.to_container(names) if isinstance(names, (ListConfig, DictConfig)) else names
        raise ConfigError(f"study.warm_start: expected a list of earlier studies' names (NAME, or NAME@STORAGE), "
                          f"e.g. study.warm_start=[digits_v1]; got {shown!r}")
    if names and study.get("sampler") == "grid":
        raise ConfigError("study.warm_start: a grid search (study.sampler=grid) runs its grid's points; drop "
                          "study.warm_start or choose another sampler")
    top_k = study.get("warm_start_top_k", 5)
    if not _is_positive_int(top_k):
        raise ConfigError(f"study.warm_start_top_k: expected a positive integer (configurations per study), "
                          f"got {top_k!r}")


def _check_stop_when(value: Any, several_metrics: bool) -> None:
    """study.stop_when: null, or a mapping of patience (+ min_delta) and/or regret_bound (+ min_trials)."""
    if value is None:
        return
    example = "e.g. study.stop_when={patience:20,min_delta:0.001} or {regret_bound:0.002}"
    if not isinstance(value, DictConfig) or not value:
        raise ConfigError(f"study.stop_when: expected null or a mapping, {example}; got {value!r}")
    _check_known_keys("study.stop_when", value, _STOP_WHEN_KEYS)
    for key, needs in (("min_delta", "patience"), ("min_trials", "regret_bound")):
        if key in value and needs not in value:
            raise ConfigError(f"study.stop_when.{key}: goes with study.stop_when.{needs}; add {needs} or drop {key}")
    if "patience" not in value and "regret_bound" not in value:
        raise ConfigError(f"study.stop_when: give patience or regret_bound (or both), {example}")
    for key in ("patience", "min_trials"):
        if key in value and not _is_positive_int(value[key]):
            raise ConfigError(f"study.stop_when.{key}: expected a positive integer (trials), got {value[key]!r}")
    if "min_delta" in value and not (_is_number(value.min_delta) and value.min_delta >= 0):
        raise ConfigError(f"study.stop_when.min_delta: expected a non-negative number (in the metric's units), "
                          f"got {value.min_delta!r}")
    if "regret_bound" in value and not (_is_number(value.regret_bound) and value.regret_bound > 0):
        raise ConfigError(f"study.stop_when.regret_bound: expected a positive number (in the metric's units), "
                          f"got {value.regret_bound!r}")
    if several_metrics:
        raise ConfigError("study.stop_when: a study of several metrics has a Pareto front, not one best value to "
                          "watch; set study.stop_when=null (or optimize one metric)")


def _check_seed(cfg: DictConfig, key: str) -> None:
    """A non-negative integer: NumPy and Optuna's samplers refuse negative seeds."""
    value = OmegaConf.select(cfg, key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"{key}: expected a non-negative integer, got {value!r}")


# Lightning's Trainer(max_time=...) takes "DD:HH:MM:SS" or a dict of datetime.timedelta's keywords.
_TIMEDELTA_KEYS = ("weeks", "days", "hours", "minutes", "seconds", "milliseconds", "microseconds")
_LOG_MODELS = ("best", "top_k", "none")
_ENGINES = ("auto", "lightning")  # trainer.engine: searchlab.packing.lone


def _check_limits(cfg: DictConfig) -> None:
    """trainer.max_time and trainer.early_stopping_patience: null, or a limit Lightning accepts."""
    value = OmegaConf.select(cfg, "trainer.max_time", default=None)
    expected = ('expected "DD:HH:MM:SS" (e.g. "00:00:10:00"), a mapping like {minutes: 10}, or null, got '
                f"{OmegaConf.to_container(value) if isinstance(value, DictConfig) else value!r}")
    if isinstance(value, str):
        parts = value.strip().split(":")
        if len(parts) != 4 or not all(p.isdigit() for p in parts) or not any(int(p) for p in parts):
            raise ConfigError(f"trainer.max_time: {expected}")
    elif isinstance(value, DictConfig):
        items = OmegaConf.to_container(value)
        if not items or any(k not in _TIMEDELTA_KEYS or not _is_number(v) or v < 0 for k, v in items.items()) \
                or not any(items.values()):
            raise ConfigError(f"trainer.max_time: {expected} (keys: {', '.join(_TIMEDELTA_KEYS)})")
    elif value is not None:
        raise ConfigError(f"trainer.max_time: {expected}")
    every = OmegaConf.select(cfg, "trainer.checkpoint_every_n_epochs", default="auto")
    if every != "auto" and not _is_positive_int(every):
        raise ConfigError(f"trainer.checkpoint_every_n_epochs: expected auto or a positive integer (epochs), "
                          f"got {every!r}")
    patience = OmegaConf.select(cfg, "trainer.early_stopping_patience", default=None)
    if patience is not None and not _is_positive_int(patience):
        raise ConfigError(f"trainer.early_stopping_patience: expected a positive integer (epochs) or null, "
                          f"got {patience!r}")
    engine = OmegaConf.select(cfg, "trainer.engine", default="auto")
    if engine not in _ENGINES:
        near = difflib.get_close_matches(str(engine), _ENGINES, n=1)
        hint = f"; did you mean trainer.engine={near[0]}?" if near else ""
        raise ConfigError(f"trainer.engine: expected {' or '.join(_ENGINES)}, got {engine!r}{hint}")


def _check_model_logging(cfg: DictConfig) -> None:
    """tracking.log_models, tracking.top_k, tracking.metrics and tracking.register_model (where the tracking entry
    has them)."""
    log_models = OmegaConf.select(cfg, "tracking.log_models", default="best")
    if log_models not in _LOG_MODELS:
        raise ConfigError(f"tracking.log_models: expected one of {', '.join(_LOG_MODELS)}, got {log_models!r}")
    top_k = OmegaConf.select(cfg, "tracking.top_k", default=1)
    if not _is_positive_int(top_k):
        # tracking.top_k is ${report.top_k} by default: name the key the user set
        from_report = "tracking" in cfg and OmegaConf.is_interpolation(cfg.tracking, "top_k")
        key = "report.top_k (tracking.top_k follows it)" if from_report else "tracking.top_k"
        raise ConfigError(f"{key}: expected a positive integer, got {top_k!r}")
    metrics = OmegaConf.select(cfg, "tracking.metrics", default=[])
    if not isinstance(metrics, ListConfig) or not all(isinstance(m, str) and m for m in metrics):
        shown = OmegaConf.to_container(metrics) if isinstance(metrics, ListConfig) else metrics
        raise ConfigError(f"tracking.metrics: expected a list of metric names, e.g. "
                          f"tracking.metrics=[val_f1,val_auroc], got {shown!r}")
    name = OmegaConf.select(cfg, "tracking.register_model", default=None)
    if name is not None and not (isinstance(name, str) and name.strip()):
        raise ConfigError(f"tracking.register_model: expected a model name or null, got {name!r}")


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
