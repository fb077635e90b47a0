"""Shared fixtures: every test writes its stores under its own tmp_path, never to the repo's mlruns/.

Plain helpers are in helpers.py; the real servers (PostgreSQL, an MLflow server, the gRPC storage proxy) in
servers.py, made available here to every module.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import (
    ERROR_PREFIX,
    FAST,
    REPO,
    bad_input_stores,
    from_folder,
    key_of,
    searchlab,
    stores,
    study_names,
)
from servers import mlflow_server, postgres, storage_proxy  # noqa: F401 (fixtures, registered by being here)

SERVERS = {"postgres", "mlflow_server", "storage_proxy"}
# Marks of the tests that take most of the suite's time (real worker processes, servers, DDP ranks, SLURM).
HEAVY = ("slow", "cluster", "ddp", "slurm")


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist two workers share the machine's cores: one torch thread each for the trainings run in the
    test process (a process a test starts keeps its own setting)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that uses a real server is marked `cluster` wherever it is written: the fast tier leaves it out.

    Under pytest-xdist (`make test` runs `-n 2 --dist loadfile --no-loadscope-reorder`) each test file is run by one
    worker, so a module's shared study (a module-scoped fixture) is trained once; the files are handed out in the
    order of the items, here the heaviest first (by their count of slow/cluster/ddp/slurm tests), so a long module
    does not start last and hold the run while the other worker idles. Without xdist nothing is reordered."""
    for item in items:
        if SERVERS & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.cluster)
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    weight: Counter[str] = Counter()
    for item in items:
        weight[item.nodeid.split("::")[0]] += any(item.get_closest_marker(mark) for mark in HEAVY)
    # A stable sort: the tests of one file stay together and in their order (module fixtures are set up once).
    items.sort(key=lambda item: -weight[item.nodeid.split("::")[0]])


@pytest.fixture
def store_overrides(tmp_path: Path) -> list[str]:
    """Overrides that put the Optuna storage, the MLflow store and the study report of a run under tmp_path."""
    return [
        f"study.storage={tmp_path}/optuna.journal",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        f"tracking.artifact_root={tmp_path}/artifacts",
        f"report.dir={tmp_path}/reports",
    ]


# --- the bad-input contract: the CLI in this process, nothing written -----------------------------------------

@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Default conf/, cwd in tmp_path, and no Hydra initialization carried in or out (it binds one config dir)."""
    from hydra.core.global_hydra import GlobalHydra

    monkeypatch.delenv("SEARCHLAB_CONFIG_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    GlobalHydra.instance().clear()
    yield
    GlobalHydra.instance().clear()


@pytest.fixture
def cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    """Runs `searchlab <command> args...` in-process with the stores in tmp_path; returns (code, stdout, stderr).

    The store, study-name and FAST overrides are added only for keys the case does not set itself.
    """
    from searchlab.cli import main

    def run(*args: str, command: str = "search") -> tuple[int, str, str]:
        given = {key_of(a) for a in args}
        extra = [o for o in (*bad_input_stores(tmp_path), *FAST) if key_of(o) not in given]
        code = main([command, *args, *extra])
        out, err = capsys.readouterr()
        return code, out, err

    return run


# --- the user's own project folder ------------------------------------------------------------------------------

@pytest.fixture
def in_process(capsys: pytest.CaptureFixture[str]):
    """in_process(*args, cwd=folder): `searchlab ARGS` from that folder, run by the CLI's main() in this process (a
    fresh process imports torch and Lightning again: seconds each on a shared 2-core machine); a CompletedProcess.
    A search with workers=N still starts its N workers as processes of their own."""
    from searchlab.cli import main

    def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
        capsys.readouterr()
        with from_folder(cwd):
            code = main(list(args))
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(["searchlab", *args], code, out, err)

    return run


PROJECT_TINY = ["trainer.max_epochs=2", "study.n_trials=4", "report.min_complete=2"]


def assert_bad_contract(tmp_path: Path, code: int, out: str, err: str) -> str:
    """Asserts the bad-input contract (exit 2, one `searchlab: error:` line, nothing written); returns that line."""
    assert code == 2, out + err
    assert out == "" and "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(ERROR_PREFIX), lines
    assert not (tmp_path / "optuna.journal").exists() or not study_names(tmp_path)
    assert not (tmp_path / "artifacts").exists()
    return lines[0]


@pytest.fixture
def bad(tmp_path: Path, in_process):
    """bad(files, *args): `searchlab search -cd conf ARGS` in a project folder with these files, in this process
    (in_process); asserts the bad-input contract and returns the error line. command=True runs the real command in
    its own process instead (once: test_target_that_does_not_import_is_named_with_a_near_name)."""

    def run(files: dict[str, str], *args: str, command: bool = False) -> str:
        project = tmp_path / "project"
        (project / "conf").mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (project / name).parent.mkdir(parents=True, exist_ok=True)
            (project / name).write_text(text)
        argv = ["search", "-cd", "conf", *args, *PROJECT_TINY, *stores(tmp_path, "bad")]
        result = (searchlab if command else in_process)(*argv, cwd=project)
        return assert_bad_contract(tmp_path, result.returncode, result.stdout, result.stderr)

    return run


@pytest.fixture(scope="module")
def lit_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/lightning_project (written with `import lightning`) copied to a folder outside the checkout, as a user's
    own project."""
    folder = tmp_path_factory.mktemp("user") / "lit"
    shutil.copytree(REPO / "tests" / "lightning_project", folder,
                    ignore=shutil.ignore_patterns("mlruns", "__pycache__"))
    return folder


# --- tiny trainings: a module's BASE overrides composed once, its data loaded once, one torch thread ---------------

@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny trainings: they gain nothing from two, and lose much on a loaded shared
    machine. Used with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def composer(request: pytest.FixtureRequest):
    """The test module's BASE overrides (a module-level list) composed once for the module."""
    from searchlab.config import Composer

    return Composer(request.module.BASE)


@pytest.fixture(scope="module")
def digits(composer):
    """The data the module's BASE config loads, once per module."""
    from searchlab.training.build import load_data

    return load_data(composer.base)
