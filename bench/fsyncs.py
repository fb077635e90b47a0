"""Journal fsyncs per trial: `python -m bench.fsyncs [K ...]` runs a 16-trial digits study (10 epochs, MLP 32 wide,
no pruning) per pack size K (default 1 and 8) on the embedded stores in a temporary folder, with os.fsync counted
and timed. Optuna's journal file fsyncs every write; searchlab's JournalFile fsyncs once per trial or pack."""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
import time

TRIALS = 16


def count_fsyncs(pack: int) -> tuple[int, float]:
    """(fsyncs, seconds spent in them) of one study with study.pack=pack."""
    from searchlab.cli import main

    calls, spent = 0, 0.0
    real = os.fsync

    def counted(fd: int) -> None:
        nonlocal calls, spent
        start = time.perf_counter()
        real(fd)
        calls, spent = calls + 1, spent + time.perf_counter() - start

    with tempfile.TemporaryDirectory() as folder:
        args = ["search", "trainer.max_epochs=10", f"study.n_trials={TRIALS}", "study.pruner=none",
                "tracking.log_models=none", "model.width=32", "data.batch_size=64", "optimizer=adam",
                "scheduler=constant", f"study.pack={pack}", "study.name=fsyncs", f"study.storage={folder}/j.journal",
                f"tracking.uri=sqlite:///{folder}/m.db", f"tracking.artifact_root={folder}/a", f"report.dir={folder}/r"]
        os.fsync = counted
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                code = main(args)
        finally:
            os.fsync = real
    if code != 0:
        raise SystemExit(f"bench.fsyncs: searchlab {' '.join(args)} exited {code}")
    return calls, spent


def main(argv: list[str]) -> None:
    for pack in [int(a) for a in argv] or [1, 8]:
        calls, spent = count_fsyncs(pack)
        print(f"study.pack={pack}: {calls} fsyncs for {TRIALS} trials ({calls / TRIALS:.1f} per trial), "
              f"{spent * 1000 / max(calls, 1):.2f} ms each; load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main(sys.argv[1:])
