"""The architecture contracts in pyproject.toml ([tool.importlinter]), checked by import-linter's `lint-imports` as
`make lint` runs it: they hold on this checkout, and each kind of break fails naming the import that breaks it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
# The root packages the contracts name: each one is copied for a broken variant.
PACKAGES = ("searchlab", "bench", "hydra_plugins")


def lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    """`lint-imports` on the checkout at `cwd` (its pyproject.toml, its packages first on the path), uncached."""
    env = {**os.environ, "PYTHONPATH": str(cwd), "COLUMNS": "300"}  # COLUMNS: one line per import in the output
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def test_the_contracts_hold_on_this_checkout():
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Contracts: {len(contracts)} kept, 0 broken." in result.stdout
    for contract in contracts:
        assert f"{contract['name']} KEPT" in result.stdout


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A copy of this checkout's packages and pyproject.toml, to break."""
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.png", "*.jsonl", "*.md", "out"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    return tmp_path


def append(path: Path, text: str) -> int:
    """Adds `text` at the end of the file; the line number of its first line."""
    lines = path.read_text().splitlines()
    path.write_text("\n".join([*lines, text]) + "\n")
    return len(lines) + 1


def test_a_network_that_imports_the_study_breaks_the_layers_naming_the_import(checkout):
    line = append(checkout / "searchlab" / "networks.py", "from searchlab.study import Budget  # noqa: E402")
    result = lint_imports(checkout)
    assert result.returncode != 0
    assert "searchlab.networks is not allowed to import searchlab.study" in result.stdout
    assert f"searchlab.networks -> searchlab.study (l.{line})" in result.stdout
    # the forbidden contract names the way it reaches Optuna and MLflow too
    assert "searchlab.networks is not allowed to import optuna" in result.stdout
    assert "searchlab.networks is not allowed to import mlflow" in result.stdout


def test_an_import_inside_a_function_counts_and_a_circle_is_named(checkout):
    """The circle this checkout removed (report <-> the ablation view), put back as a lazy import."""
    lazy = "\n\ndef _lead():\n    from searchlab.ablate.view import ablation_lead\n\n    return ablation_lead"
    line = append(checkout / "searchlab" / "report" / "report.py", lazy) + 3  # the import's line
    result = lint_imports(checkout)
    assert result.returncode != 0
    assert f"searchlab.report.report -> searchlab.ablate.view (l.{line})" in result.stdout
    assert "No cycles are allowed in searchlab." in result.stdout


def test_a_circle_in_the_benchmarks_is_named(checkout):
    append(checkout / "bench" / "results.py", "from bench import methods  # noqa: E402")
    result = lint_imports(checkout)
    assert result.returncode != 0
    assert "No cycles are allowed in bench." in result.stdout
    assert ".methods -> .results" in result.stdout or ".results -> .methods" in result.stdout


def test_a_new_module_must_name_its_layer(checkout):
    (checkout / "searchlab" / "helpers.py").write_text('"""A module no layer names."""\n')
    result = lint_imports(checkout)
    assert result.returncode != 0
    assert "The following modules are not listed as layers:\n\n- searchlab.helpers" in result.stdout
