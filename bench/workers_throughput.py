"""Trials per minute of `searchlab search workers=K` on the CPU, K = 1 and 2 run interleaved on the same machine.

A short fixed trial (digits MLP 2x256, Adam, batch 64, 3 epochs, random sampler, no pruning), fresh stores per run.
Two figures per run: the whole command (process and worker start-up included) and the steady state (finished
trials over the span from the first trial's start to the last one's end, read from the journal).

    .venv/bin/python bench/workers_throughput.py [--pairs 3] [--trials 24] [--workers 1 2]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

FIXED = ["study.sampler=random", "study.pruner=none", "trainer.max_epochs=3", "data.batch_size=64",
         "model.width=256", "model.depth=2", "optimizer=adam", "scheduler=constant", "model.batch_norm=false"]


def one_run(workers: int, trials: int) -> tuple[float, float]:
    """(whole-command trials/min, steady-state trials/min) of one fresh study."""
    out = Path(tempfile.mkdtemp())
    stores = [f"study.storage={out}/optuna.journal", f"tracking.uri=sqlite:///{out}/mlflow.db",
              f"tracking.artifact_root={out}/artifacts"]
    command = [str(Path(sys.executable).parent / "searchlab"), "search", f"workers={workers}", "study.name=bench",
               f"study.n_trials={trials}", *FIXED, *stores]
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    study = optuna.load_study(study_name="bench", storage=JournalStorage(JournalFileBackend(f"{out}/optuna.journal")))
    done = [t for t in study.trials if t.state.is_finished()]
    span = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
    return 60 * len(done) / wall, 60 * len(done) / span


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    results: dict[int, list[tuple[float, float]]] = {k: [] for k in args.workers}
    for _ in range(args.pairs):
        for k in args.workers:
            results[k].append(one_run(k, args.trials))
            print(f"workers={k}: whole {results[k][-1][0]:.1f} trials/min, steady {results[k][-1][1]:.1f}", flush=True)
    for k, runs in results.items():
        print(f"workers={k}: median whole command {statistics.median(r[0] for r in runs):.1f} trials/min, "
              f"steady state {statistics.median(r[1] for r in runs):.1f} trials/min ({args.pairs} runs)")


if __name__ == "__main__":
    main()
