"""Real servers for the UI tests: a tiny study in tmp stores, and `make ui` / `make dashboard` on a free port.

The servers are started through the Makefile targets a user runs, so the tests check those targets too. Each runs in
its own process group (make, the server and its workers), which the test ends as a whole.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from searchlab.cli import main

ROOT = Path(__file__).resolve().parent.parent
TINY_STUDY = ["trainer.max_epochs=2", "model.width=32", "study.n_trials=3"]


def run_tiny_study(store: Path, name: str, *extra: str) -> None:
    """`searchlab search` of a 3-trial study into the stores under `store` (its report too, not the checkout's
    mlruns/); in-process, sharing the suite's imports. `extra`: more overrides."""
    code = main(["search", f"study.name={name}", *TINY_STUDY, f"study.storage={store}/optuna.journal",
                 f"tracking.uri=sqlite:///{store}/mlflow.db", f"tracking.artifact_root={store}/artifacts",
                 f"report.dir={store}/reports", *extra])
    assert code == 0, f"searchlab search exited with {code}"


@contextlib.contextmanager
def make_server(target: str, variables: dict[str, str], url: str, log: Path, timeout: float = 60) -> Iterator[str]:
    """`make <target> VAR=value ...` until `url` answers 200; stopped (its whole process group) on exit.

    `-o .venv/.installed` keeps make from reinstalling the venv inside a test when the Makefile is newer than it.
    """
    command = ["make", "--no-print-directory", "-C", str(ROOT), "-o", ".venv/.installed", target,
               *(f"{key}={value}" for key, value in variables.items())]
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"make {target} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"make {target}: {url} did not answer in {timeout:.0f}s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        _stop_group(proc)


def _stop_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(wait)
            # make may exit before its children: wait until no process of the group is left
            for _ in range(int(wait * 10)):
                os.killpg(proc.pid, 0)
                time.sleep(0.1)
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue
