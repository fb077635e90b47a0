"""A trial's composed config as the YAML text of its run's `config.yaml` artifact.

Why not OmegaConf.to_yaml: PyYAML represents and resolves every scalar in Python (~2 ms for the digits config even
on libyaml's C emitter, ~5 ms without it), paid by every trial. The composed config is a tree of mappings, lists
and plain scalars, which this writes directly in PyYAML's block layout (~0.2 ms); a string goes plain where no YAML
loader could read it as anything else, double-quoted otherwise (JSON's escapes, which YAML's double-quoted style
shares). Anything else (bytes, a Path node) falls back to PyYAML. Tests read the text back with OmegaConf for every
option of every group of conf/ and for strings that look like bools, numbers, nulls and interpolations.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf._utils import get_omega_conf_dumper

# A string YAML reads back as that string when written plain: a word of letters, digits and _ . / - that starts with
# a letter, _ or / (never a number, a key indicator or a document marker), and none of YAML 1.1's bools and nulls.
_PLAIN = re.compile(r"[A-Za-z_/][A-Za-z0-9_./-]*")
_RESERVED = frozenset({"y", "n", "yes", "no", "true", "false", "on", "off", "null"})
# What a YAML stream may not hold raw (PyYAML's reader refuses it) or reads as a line break: escaped as \uXXXX.
_UNPRINTABLE = re.compile("[^\x09\x0a\x0d\x20-\x7e\xa0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]|[\u2028\u2029]")


class _Unwritable(TypeError):
    """A value this writer has no YAML for: the caller falls back to PyYAML."""


def config_yaml(cfg: DictConfig) -> str:
    """The config as YAML (interpolations kept as written), read back by OmegaConf as the same config."""
    container = OmegaConf.to_container(cfg, resolve=False, enum_to_str=True)
    try:
        lines: list[str] = []
        _mapping(container, 0, lines)
        return "\n".join(lines) + "\n" if lines else "{}\n"
    except _Unwritable:
        return yaml.dump(container, Dumper=get_omega_conf_dumper(), default_flow_style=False, allow_unicode=True,
                         sort_keys=False)


def _mapping(node: dict, indent: int, lines: list[str]) -> None:
    pad = " " * indent
    for key, value in node.items():
        name = _scalar(key)
        if isinstance(value, dict) and value:
            lines.append(f"{pad}{name}:")
            _mapping(value, indent + 2, lines)
        elif isinstance(value, list) and value:
            lines.append(f"{pad}{name}:")
            _sequence(value, indent, lines)  # PyYAML's layout: a mapping's list at the key's own indent
        else:
            lines.append(f"{pad}{name}: {_scalar(value)}")


def _sequence(node: list, indent: int, lines: list[str]) -> None:
    pad = " " * indent
    for item in node:
        if (isinstance(item, dict) or isinstance(item, list)) and item:
            start = len(lines)
            (_mapping if isinstance(item, dict) else _sequence)(item, indent + 2, lines)
            lines[start] = pad + "- " + lines[start][indent + 2:]
        else:
            lines.append(f"{pad}- {_scalar(item)}")


def _scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return ".nan"
        if math.isinf(value):
            return ".inf" if value > 0 else "-.inf"
        text = repr(value).lower()
        return text.replace("e", ".0e", 1) if "." not in text and "e" in text else text  # as PyYAML: 1.0e-05
    if isinstance(value, dict):
        return "{}"  # empty: non-empty ones are written as blocks
    if isinstance(value, list):
        return "[]"
    if isinstance(value, str):
        if _PLAIN.fullmatch(value) and value.lower() not in _RESERVED:
            return value
        text = json.dumps(value, ensure_ascii=False)
        return _UNPRINTABLE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
    raise _Unwritable(type(value).__name__)
