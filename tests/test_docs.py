"""The documentation's own rules, checked without building the site (`make docs-check` builds it with --strict): the
README stays a front page, the generated pages cover what they are generated from, and links written for GitHub
point at the site's pages."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, REPO / "docs" / f"{name}.py")
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


hooks, gen_config_ref = _load("hooks"), _load("gen_config_ref")


def test_readme_is_a_front_page_that_opens_with_the_two_commands():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    first_block = re.search(r"```\n(.*?)```", text, re.S).group(1).splitlines()
    assert [line.split()[:2] for line in first_block] == [["make", "search"], ["make", "test"]]
    assert text.index("```") < text.index("\n## ")  # before anything else


def test_every_docs_page_is_in_the_site_nav():
    nav = (REPO / "mkdocs.yml").read_text()
    pages = {p.relative_to(REPO / "docs").as_posix() for p in (REPO / "docs").rglob("*.md")}
    assert pages and all(f": {page}" in nav for page in pages), pages
    assert all(f": {uri}" in nav for uri in [*hooks.PUBLISHED.values(), hooks.GENERATED] if uri.endswith(".md"))


def _leaves(node: object, prefix: str = ""):
    if isinstance(node, dict) and node:
        for key, value in node.items():
            yield from _leaves(value, f"{prefix}{key}.")
    else:
        yield prefix[:-1]


def test_config_reference_lists_every_key_of_every_option():
    page = gen_config_ref.render()
    checked = 0
    for path in sorted((REPO / "conf").glob("*/*.yaml")):
        group = path.parent.name
        assert f"### `{group}={path.stem}`" in page, path
        if group in gen_config_ref.VERBATIM:
            assert path.read_text().rstrip() in page
            continue
        config = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
        config.pop("defaults", None)
        for key in _leaves(config) if config else []:  # scheduler=constant has no keys
            # a one-line mapping (study.samplers.tpe: {...}) is one row, its keys in that row's default
            parts = key.split(".")
            assert any(f"| `{group}.{'.'.join(parts[:n])}` |" in page for n in range(len(parts), 0, -1)), (path, key)
            checked += 1
    assert checked > 100
    assert "| `workers` | `auto` |" in page and "| `seed` | `0` |" in page  # conf/config.yaml's own keys


def test_config_reference_keeps_each_keys_comment():
    page = gen_config_ref.render()
    row = next(line for line in page.splitlines() if line.startswith("| `study.grace_period` |"))
    assert "seconds without a heartbeat before a running trial counts as lost" in row
    row = next(line for line in page.splitlines() if line.startswith("| `tracking.flush_seconds` |"))
    assert "0 writes every epoch" in row  # the comment's continuation line, under the first
    row = next(line for line in page.splitlines() if line.startswith("| `tracking.metrics` |"))
    assert "0 writes every epoch" not in row and row.count("|") == 4  # not the key above's; no stray pipes


def test_links_written_for_github_point_at_the_site_pages():
    readme = "[own](docs/own-code.md#data) [log](bench/results.md) [ex](examples/signals/README.md) [w](https://x.org/a.md)"
    assert hooks.relink(readme, "index.md") == (
        "[own](own-code.md#data) [log](measurements.md) [ex](examples/signals.md) [w](https://x.org/a.md)")
    page = "[log](../bench/results.md) ![plot](../bench/methods.png) [cfg](reference/configuration.md) [a](#top)"
    assert hooks.relink(page, "performance.md") == (
        "[log](measurements.md) ![plot](img/methods.png) [cfg](reference/configuration.md) [a](#top)")
    assert hooks.relink("[perf](../performance.md)", "reference/configuration.md") == "[perf](../performance.md)"
    fenced = "```\n[not a link](docs/own-code.md)\n```\n"
    assert hooks.relink(fenced, "index.md") == fenced
    assert hooks.relink("[x](../searchlab/nothing.py)", "own-code.md") == "[x](../searchlab/nothing.py)"  # for MkDocs


def test_module_map_has_a_row_for_every_module():
    rows = hooks.module_map().splitlines()[2:]
    modules = [p.relative_to(REPO).as_posix() for package in hooks.PACKAGES
               for p in sorted((REPO / package).rglob("*.py"))]
    assert [row.split("`")[1] for row in rows] == modules
    described = [row for row in rows if not row.endswith("|  |")]
    assert len(described) == len(rows), [row for row in rows if row not in described]


def test_files_the_docs_name_exist():
    """A page that names a module, test or bench file names one that is there (a move updates the docs with it)."""
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    named = {(page.name, match) for page in pages
             for match in re.findall(r"\b(?:searchlab|hydra_plugins|bench|tests)/[\w/.-]*\w\.(?:py|md|png|jsonl)",
                                     page.read_text())
             if not match.startswith("bench/out/")}  # what `make gpu-check` writes
    assert len(named) > 10
    assert not [(page, path) for page, path in sorted(named) if not (REPO / path).is_file()]
