"""MkDocs hooks (mkdocs.yml `hooks:`): the pages that come from elsewhere in the repository, and their links.

The README is the site's front page and the examples' READMEs and bench/results.md are pages of it, so each text has
one home. Links are written as they work on GitHub, relative to the file's place in the repository
(`docs/own-code.md` from the README, `../bench/results.md` from a page of docs/); `on_page_markdown` points them at
the site's own pages, so `mkdocs build --strict` checks every one of them.
"""

from __future__ import annotations

import ast
import importlib.util
import posixpath
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # MkDocs is imported by the build that calls these hooks, not by the tests of the links
    from mkdocs.structure.files import Files

REPO = Path(__file__).resolve().parents[1]
# Repository file -> its place in the site.
PUBLISHED = {
    "README.md": "index.md",
    "bench/results.md": "measurements.md",
    "bench/efficiency.png": "img/efficiency.png",
    "bench/methods.png": "img/methods.png",
    "examples/signals/README.md": "examples/signals.md",
    "examples/regression/README.md": "examples/regression.md",
    "examples/lightning_hydra/README.md": "examples/lightning_hydra.md",
}
GENERATED = "reference/configuration.md"  # written by docs/gen_config_ref.py at each build
MODULES = "<!-- modules -->"  # docs/layout.md: replaced by the map of the packages' modules
PACKAGES = ("searchlab", "hydra_plugins/searchlab_sweeper")
LINK = re.compile(r"(!?\[[^\]]*\]\()([^)\s]+)(\))")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)


def _gen_config_ref():
    spec = importlib.util.spec_from_file_location("gen_config_ref", Path(__file__).with_name("gen_config_ref.py"))
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def on_files(files: Files, config) -> Files:
    from mkdocs.structure.files import File

    for source, uri in PUBLISHED.items():
        path = REPO / source
        content = path.read_text() if path.suffix == ".md" else path.read_bytes()
        files.append(File.generated(config, uri, content=content))
    files.append(File.generated(config, GENERATED, content=_gen_config_ref().render()))
    return files


def _first_sentence(path: Path) -> str:
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    paragraph = " ".join(doc.split("\n\n")[0].split())
    return re.split(r"(?<=[a-z0-9)`'])\. ", paragraph, maxsplit=1)[0].rstrip(".")


def module_map() -> str:
    """One row per module of the packages, from the first sentence of its docstring: the map follows the code."""
    rows = ["| module | what it holds |", "|---|---|"]
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            name = path.relative_to(REPO).as_posix()
            rows.append(f"| `{name}` | {_first_sentence(path).replace('|', chr(92) + '|')} |")
    return "\n".join(rows) + "\n"


def _site_uri(repo_path: str) -> str | None:
    if repo_path in PUBLISHED:
        return PUBLISHED[repo_path]
    if repo_path.startswith("docs/"):
        return repo_path[len("docs/"):]
    return None


def relink(markdown: str, uri: str) -> str:
    """The page at `uri` in the site with its links, written relative to its file in the repository, pointed at the
    site's pages; a link to nothing the site has is left as written, for MkDocs to report."""
    repo_path = {v: k for k, v in PUBLISHED.items()}.get(uri, f"docs/{uri}")

    def one(match: re.Match) -> str:
        target = match.group(2)
        if "://" in target or target.startswith(("#", "mailto:")):
            return match.group(0)
        path, _, anchor = target.partition("#")
        site = _site_uri(posixpath.normpath(posixpath.join(posixpath.dirname(repo_path), path)))
        if site is None:
            return match.group(0)
        new = posixpath.relpath(site, posixpath.dirname(uri) or ".") + (f"#{anchor}" if anchor else "")
        return f"{match.group(1)}{new}{match.group(3)}"

    out, last = [], 0
    for fence in FENCE.finditer(markdown):  # links inside code blocks are code, not links
        out += [LINK.sub(one, markdown[last:fence.start()]), fence.group(0)]
        last = fence.end()
    return "".join([*out, LINK.sub(one, markdown[last:])])


def on_page_markdown(markdown: str, page, config, files: Files) -> str:
    if MODULES in markdown:
        markdown = markdown.replace(MODULES, module_map())
    return relink(markdown, page.file.src_uri)
