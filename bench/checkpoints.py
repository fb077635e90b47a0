"""`make bench` part "checkpoints" (issue 10): what checkpointing a running trial costs, per epoch, for the digits
MLP and for a network of ~10M parameters.

Three ways of training the same configuration, interleaved, medians of `repeats`:
- none: no checkpoint plan at all (a `searchlab train`);
- auto: the default `trainer.checkpoint_every_n_epochs=auto` (these trials end before checkpoint_auto_seconds: the
  cost of the default study, which must be nil);
- every epoch: `trainer.checkpoint_every_n_epochs=1`: the in-memory snapshot of the epoch's state (Lightning's
  checkpoint dict, copied to the CPU) and its atomic write, each timed on its own.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import torch

from searchlab.config import compose_config
from searchlab.training import lightning as lightning_fit
from searchlab.training.build import load_data
from searchlab.training.checkpoints import CHECKPOINT_FILE, CheckpointPlan, TrialCheckpoints

NETWORKS = {
    "digits MLP 2x256": ["model.width=256", "model.depth=2"],
    "MLP 3x2240 (~10M params)": ["model.width=2240", "model.depth=3"],
}
FIXED = ["optimizer=adam", "scheduler=constant", "data.batch_size=64", "model.batch_norm=false", "model.dropout=0.0",
         "trainer.max_epochs=4"]


@dataclass
class Row:
    network: str
    params: int
    device: str
    epoch_seconds: dict[str, list[float]] = field(default_factory=dict)
    snapshot_ms: list[float] = field(default_factory=list)
    write_ms: list[float] = field(default_factory=list)
    megabytes: float = 0.0


class _TimedCheckpoints(TrialCheckpoints):
    """TrialCheckpoints that records what its snapshots and writes take."""

    row: Row

    def _snapshot(self, trainer, epoch):  # noqa: ANN001, ANN202
        start = time.perf_counter()
        super()._snapshot(trainer, epoch)
        self.row.snapshot_ms.append(1000 * (time.perf_counter() - start))

    def _write(self, trainer):  # noqa: ANN001, ANN202
        start = time.perf_counter()
        super()._write(trainer)
        self.row.write_ms.append(1000 * (time.perf_counter() - start))
        self.row.megabytes = self.plan.path.stat().st_size / 1e6


def run_checkpoints(out: Path, repeats: int, device: str, extra: list[str]) -> list[Row]:
    rows = []
    for name, overrides in NETWORKS.items():
        cfg = compose_config([*FIXED, *overrides, f"trainer.accelerator={device}", *extra])
        splits = load_data(cfg).to(torch.device("cuda" if device == "cuda" else "cpu"))
        epochs = cfg.trainer.max_epochs
        ways = {
            "none": None,
            "auto": CheckpointPlan(out / name / "auto" / CHECKPOINT_FILE, None,
                                   float(cfg.trainer.checkpoint_auto_seconds)),
            "every epoch": CheckpointPlan(out / name / "every" / CHECKPOINT_FILE, 1, 0.0),
        }
        row = Row(name, 0, device, {way: [] for way in ways})
        _TimedCheckpoints.row = row
        lightning_fit.fit_rank(cfg, splits)  # warm-up
        for _ in range(repeats):
            for way, plan in ways.items():
                with mock.patch.object(lightning_fit, "TrialCheckpoints", _TimedCheckpoints):
                    result = lightning_fit.fit_rank(cfg, splits, checkpoint=plan)
                row.epoch_seconds[way].append(result.seconds / epochs)
                row.params = sum(p.numel() for p in result.module.parameters())
        rows.append(row)
        print(f"  {name}: " + ", ".join(f"{w} {statistics.median(s) * 1000:.1f} ms/epoch"
                                         for w, s in row.epoch_seconds.items()), flush=True)
    return rows


def checkpoints_markdown(rows: list[Row]) -> str:
    lines = ["### Checkpoints: cost per epoch (issue 10)", "",
             "Seconds per epoch of one training (4 epochs, Adam, batch 64, digits), medians of interleaved repeats; "
             "snapshot = Lightning's checkpoint dict copied to the CPU at an epoch's end, write = its atomic "
             "`torch.save` + rename.", "",
             "| network | params | device | epoch, no plan | epoch, auto | epoch, every epoch | snapshot | write "
             "| file | every epoch costs | auto costs |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        med = {w: statistics.median(s) * 1000 for w, s in r.epoch_seconds.items()}
        snap = statistics.median(r.snapshot_ms) if r.snapshot_ms else float("nan")
        write = statistics.median(r.write_ms) if r.write_ms else float("nan")
        # From the timed parts (the whole-epoch columns carry the shared machine's noise): every epoch pays a
        # snapshot and a write; auto, once on, a snapshot each epoch and a write every 30 s.
        every = (snap + write) / med["none"] * 100
        auto = (snap / med["none"] + write / 30_000) * 100
        lines.append(f"| {r.network} | {r.params / 1e6:.2f}M | {r.device} | {med['none']:.1f} ms | "
                     f"{med['auto']:.1f} ms | {med['every epoch']:.1f} ms | {snap:.1f} ms | {write:.1f} ms | "
                     f"{r.megabytes:.1f} MB | {every:.1f}% | {auto:.1f}% once on (0 before 30 s) |")
    lines += ["", "auto writes only once a trial has trained `trainer.checkpoint_auto_seconds` (30 s), then at most "
              "every 30 s and never more often than 20x a write's own cost: at most 5% of the training time, and "
              "the default digits study (trials of ~1-3 s) writes nothing.", ""]
    return "\n".join(lines)
