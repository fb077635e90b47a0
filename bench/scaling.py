"""Part 3 — scaling: trials per minute of `searchlab search workers=K` for K local workers, fresh stores per run.

A short fixed trial (digits MLP 2x256, Adam, batch 64, 3 epochs, random sampler, no pruning). The K values run
interleaved, repeat after repeat, so the machine's load drifts over all of them alike. Two figures per run: the whole
command (process and worker start-up included) and the steady state (finished trials over the span from the first
trial's start to the last one's end, read from the journal). Needs `workers=` in the config (the workers branch).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from bench.devices import UtilizationSampler, device_overrides, gpu_utilization_reader
from searchlab.config import Composer

FIXED = ["study.sampler=random", "study.pruner=none", "trainer.max_epochs=3", "data.batch_size=64",
         "model.width=256", "model.depth=2", "optimizer=adam", "scheduler=constant", "model.batch_norm=false"]


def available() -> bool:
    """Whether this checkout's config has `workers` (several local worker processes)."""
    return "workers" in Composer([]).base


@dataclass
class ScalingResult:
    device: str
    trials: int
    repeats: int
    runs: dict[int, list[tuple[float, float]]]  # K -> (whole-command, steady-state) trials/min per repeat
    gpu_util: dict[int, float | None] = field(default_factory=dict)

    def median(self, workers: int, which: int) -> float:
        return statistics.median(r[which] for r in self.runs[workers])


def one_run(out: Path, workers: int, trials: int, device: str, extra: list[str]) -> tuple[float, float]:
    """(whole-command, steady-state) trials per minute of one fresh study."""
    out.mkdir(parents=True)
    stores = [f"study.storage={out}/optuna.journal", f"tracking.uri=sqlite:///{out}/mlflow.db",
              f"tracking.artifact_root={out}/artifacts"]
    command = [sys.executable, "-m", "searchlab.cli", "search", f"workers={workers}", "study.name=scaling",
               f"study.n_trials={trials}", *FIXED, *device_overrides(device), *extra, *stores]
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    study = optuna.load_study(study_name="scaling",
                              storage=JournalStorage(JournalFileBackend(f"{out}/optuna.journal")))
    done = [t for t in study.trials if t.state.is_finished()]
    span = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
    return 60 * len(done) / wall, 60 * len(done) / span


def run_scaling(out: Path, workers: list[int], trials: int = 24, repeats: int = 2, device: str = "cpu",
                extra: list[str] | None = None) -> ScalingResult:
    sampler = UtilizationSampler(gpu_utilization_reader() if device == "cuda" else None)
    runs: dict[int, list[tuple[float, float]]] = {k: [] for k in workers}
    for repeat in range(repeats):
        for k in workers:
            sampler.start(str(k))
            try:
                runs[k].append(one_run(out / f"{device}-w{k}-r{repeat}", k, trials, device, list(extra or [])))
            finally:
                sampler.stop()
    util = {k: sampler.mean(str(k)) for k in workers} if device == "cuda" else {}
    return ScalingResult(device, trials, repeats, runs, util)


def scaling_markdown(r: ScalingResult) -> str:
    """The part-3 section of bench/results.md."""
    base = min(r.runs)
    lines = [
        f"### Scaling ({r.device}: `searchlab search workers=K`, {r.trials} trials of `{' '.join(FIXED)}`; "
        f"{r.repeats} interleaved repeats, medians)",
        "",
        "| workers | whole command trials/min | steady state trials/min | steady speed-up vs "
        f"{base} |" + (" GPU util % |" if r.gpu_util else ""),
        "|---|---|---|---|" + ("---|" if r.gpu_util else ""),
    ]
    for k in r.runs:
        util = ""
        if r.gpu_util:
            mean = r.gpu_util.get(k)
            util = f" {'n/a' if mean is None else f'{mean:.0f}'} |"
        lines.append(f"| {k} | {r.median(k, 0):.1f} | {r.median(k, 1):.1f} | "
                     f"{r.median(k, 1) / r.median(base, 1):.2f} |{util}")
    return "\n".join(lines) + "\n"
