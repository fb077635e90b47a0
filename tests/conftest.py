"""Shared fixtures: every test writes its stores under its own tmp_path, never to the repo's mlruns/."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def store_overrides(tmp_path: Path) -> list[str]:
    """Overrides that put the Optuna storage, the MLflow store and the study report of a run under tmp_path."""
    return [
        f"study.storage={tmp_path}/optuna.journal",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        f"tracking.artifact_root={tmp_path}/artifacts",
        f"report.dir={tmp_path}/reports",
    ]
