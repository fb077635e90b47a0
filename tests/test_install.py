"""A user who pip-installs the package (not editable) runs it from any folder: the wheel carries conf/."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run(*args: str | Path, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""})
    assert result.returncode == 0, f"{args}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.mark.slow
def test_wheel_installed_in_a_fresh_venv_runs_a_search_from_an_empty_folder(tmp_path):
    dist, venv, empty = tmp_path / "dist", tmp_path / "venv", tmp_path / "somewhere"
    empty.mkdir()
    run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", REPO, "-w", dist,
        cwd=tmp_path)
    (wheel,) = dist.glob("searchlab-*.whl")
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    # The dependencies (torch, Lightning, ...) come from this test's environment through a .pth line; searchlab
    # itself only from the wheel (the editable checkout's finder is not loaded from there).
    purelib = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                       cwd=tmp_path).stdout.strip())
    (purelib / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run(sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-deps", "--no-index", wheel,
        cwd=tmp_path)
    where = run(python, "-c", "import searchlab.config as c; print(c.config_dir())", cwd=empty).stdout.strip()
    assert where == str(purelib / "searchlab" / "conf")
    result = run(venv / "bin" / "searchlab", "search", "study.n_trials=2", "trainer.max_epochs=1",
                 "report.min_complete=1", "tracking.log_models=none", cwd=empty)
    assert "2/2 trials" in result.stdout
    assert (empty / "mlruns" / "optuna.journal").is_file() and (empty / "mlruns" / "mlflow.db").is_file()
