"""`make dashboard`: optuna-dashboard over a study's own journal file, read through its JSON API."""

from __future__ import annotations

import json
import subprocess
import urllib.request

import optuna
import pytest
from helpers import free_port
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from ui_servers import ROOT, make_server, run_tiny_study


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.load(response)


@pytest.mark.slow
def test_dashboard_serves_the_study_and_its_trials_from_the_journal_file(tmp_path):
    run_tiny_study(tmp_path, "dashboard-study", "tracking.log_models=none")  # the dashboard shows no MLflow model
    journal = tmp_path / "optuna.journal"
    study = optuna.load_study(study_name="dashboard-study", storage=JournalStorage(JournalFileBackend(str(journal))))

    port = free_port()
    with make_server("dashboard", {"STUDY_STORAGE": str(journal), "DASHBOARD_PORT": str(port)},
                     f"http://127.0.0.1:{port}/api/studies", tmp_path / "dashboard.log") as url:
        summaries = get_json(url)["study_summaries"]
        assert [s["study_name"] for s in summaries] == ["dashboard-study"]
        assert summaries[0]["directions"] == ["maximize"]
        detail = get_json(f"{url}/{summaries[0]['study_id']}")

    assert len(detail["trials"]) == len(study.trials) >= 3
    assert [t["state"] for t in detail["trials"]] == [t.state.name.capitalize() for t in study.trials]
    assert detail["best_trials"][0]["number"] == study.best_trial.number
    assert detail["best_trials"][0]["values"] == [study.best_value]


def test_dashboard_without_a_study_storage_says_so(tmp_path):
    missing = tmp_path / "none.journal"
    done = subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), "-o", ".venv/.installed", "dashboard",
                           f"STUDY_STORAGE={missing}"], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert f"no study storage at {missing}: run make search first" in done.stderr
