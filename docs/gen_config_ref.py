"""The configuration reference page, generated from conf/ so that it cannot drift from the YAML searchlab composes.

Every group, option and key comes from the files themselves, with each key's comments (the line above it and the
rest of its own line) as its description. The site build calls `render()` (docs/hooks.py); run this file to print
the page: `python docs/gen_config_ref.py > /tmp/configuration.md`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

CONF = Path(__file__).resolve().parents[1] / "conf"
# Groups whose options are search spaces, not config values: shown as their files, since a space is read as a whole.
VERBATIM = {"search"}


@dataclass
class Key:
    name: str  # dotted, from the option's root
    default: str  # as written in the file
    about: str  # the key's comments


def _comment(line: str, start: int = 0) -> str:
    """The comment on `line` at or after column `start`: a '#' that opens the line or follows a space."""
    for i in range(start, len(line)):
        if line[i] == "#" and (i == 0 or line[i - 1] in " \t"):
            return line[i + 1:].strip()
    return ""


def _only_comment(line: str) -> str | None:
    stripped = line.strip()
    return stripped[1:].strip() if stripped.startswith("#") else None


def _keys(text: str) -> tuple[str, list[Key]]:
    """The file's description (its leading comment block) and its keys, leaves first-level flow mappings included."""
    lines = text.splitlines()
    root = yaml.compose(text)
    header, first = [], root.value[0][0].start_mark.line if root is not None and root.value else len(lines)
    for line in lines[:first]:
        comment = _only_comment(line)
        if comment is None:  # a blank line ends the file's header; what follows belongs to the first key
            header = []
        elif not comment.startswith("@package"):
            header.append(comment)
    leading = len(header)
    keys: list[Key] = []

    def walk(node: yaml.MappingNode, prefix: str, first_key: bool) -> None:
        for index, (key_node, value_node) in enumerate(node.value):
            name = f"{prefix}{key_node.value}"
            if isinstance(value_node, yaml.MappingNode) and not value_node.flow_style:
                walk(value_node, f"{name}.", first_key and index == 0)
                continue
            row = key_node.start_mark.line
            above = []
            for line in reversed(lines[:row]):  # the comment lines just above, at the key's own indentation
                comment = _only_comment(line)
                if comment is None or len(line) - len(line.lstrip()) != key_node.start_mark.column:
                    break
                above.insert(0, comment)
            if first_key and index == 0 and leading:  # the file's header is not this key's own comment
                above = above[leading:]
            end = value_node.end_mark  # the comment after the value, or after the key when the value spans lines
            own = [_comment(lines[row], end.column if end.line == row else key_node.end_mark.column)]
            after = row + 1  # comment-only lines indented past the key continue its own comment
            while after < len(lines) and _only_comment(lines[after]) is not None and \
                    len(lines[after]) - len(lines[after].lstrip()) > key_node.start_mark.column:
                own.append(_only_comment(lines[after]))
                after += 1
            default = lines[row][value_node.start_mark.column:end.column].strip() if end.line == row else \
                yaml.safe_dump(yaml.safe_load(yaml.serialize(value_node)), default_flow_style=True).strip()
            keys.append(Key(name, default or "null", " ".join(c for c in [*above, *own] if c)))

    if root is not None and isinstance(root, yaml.MappingNode):
        walk(root, "", True)
    return " ".join(header), keys


def _cell(text: str, code: bool = False) -> str:
    """Text for a table cell: a pipe is escaped outside code spans (Python-Markdown's tables skip those)."""
    if code:
        return text
    parts = text.split("`")
    return "`".join(part if i % 2 else part.replace("|", "\\|") for i, part in enumerate(parts))


def _defaults() -> tuple[list[tuple[str, str]], list[Key]]:
    """conf/config.yaml: the groups' default options, in composition order, and its own top-level keys."""
    text = (CONF / "config.yaml").read_text()
    chosen = []
    for entry in yaml.safe_load(text)["defaults"]:
        if isinstance(entry, dict):
            chosen.extend(entry.items())
    _, keys = _keys(text)
    return chosen, [k for k in keys if not k.name.startswith("defaults")]


def render() -> str:
    chosen, top = _defaults()
    default_of = dict(chosen)
    groups = sorted(p.name for p in CONF.iterdir() if p.is_dir())
    out = ["# Configuration reference", "",
           "Generated from `conf/` by `docs/gen_config_ref.py` when the site is built: every group, option and key "
           "searchlab composes, with its default and the comments of its YAML file. Every run is `conf/config.yaml` "
           "with one option of each group, then the command line's overrides (`group=option`, `group.key=value`); a "
           "folder of yours given with `--config-dir` adds options to these groups (same name: yours wins).", "",
           "| group | options (default in bold) | keys |", "|---|---|---|"]
    for group in groups:
        options = sorted(p.stem for p in (CONF / group).glob("*.yaml"))
        names = ", ".join(f"**`{o}`**" if o == default_of.get(group) else f"`{o}`" for o in options)
        keys = set()
        if group not in VERBATIM:
            for option in options:
                keys.update(k.name.split(".")[0] for k in _keys((CONF / group / f"{option}.yaml").read_text())[1])
        shown = ", ".join(f"`{k}`" for k in sorted(keys) if k != "defaults") or "the search space"
        out.append(f"| [`{group}`](#{group}) | {names} | {_cell(shown)} |")
    out += ["", "## Top-level keys (`conf/config.yaml`)", "", "| key | default | about |", "|---|---|---|"]
    out += [f"| `{k.name}` | `{_cell(k.default, code=True)}` | {_cell(k.about)} |" for k in top]
    for group in groups:
        out += ["", f"## {group}", ""]
        if group in default_of:
            out += [f"Default: `{group}={default_of[group]}`.", ""]
        for path in sorted((CONF / group).glob("*.yaml")):
            text = path.read_text()
            about, keys = _keys(text)
            out += [f"### `{group}={path.stem}`", "", f"`conf/{group}/{path.name}`" + (f": {about}" if about else ""),
                    ""]
            if group in VERBATIM:
                out += ["```yaml", text.rstrip(), "```", ""]
                continue
            keys = [k for k in keys if not k.name.startswith("defaults")]
            if not keys:
                out += ["No keys.", ""]
                continue
            out += ["| key | default | about |", "|---|---|---|"]
            out += [f"| `{group}.{k.name}` | `{_cell(k.default, code=True)}` | {_cell(k.about)} |" for k in keys]
            out.append("")
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
