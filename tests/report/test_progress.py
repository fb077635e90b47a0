"""Progress of a search: plain lines off a terminal, a live view on one (a fake TTY stream and a real pty)."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import threading
import time
import types
from pathlib import Path

import pytest
from helpers import wait_until

from searchlab.report.progress import Progress
from searchlab.study import Best
from searchlab.study.trial import TrialOutcome

OUTCOMES = [
    TrialOutcome(0, "COMPLETE", 0.9, 1.5, None, {}),
    TrialOutcome(1, "PRUNED", None, 0.25, "pruned at epoch 2: val_acc=0.5", {}),
    TrialOutcome(2, "FAIL", None, 0.1, "RuntimeError: boom", {}),
    TrialOutcome(3, "COMPLETE", 0.95, 2.0, None, {}),
]
BESTS = [Best(0, 0.9, {}, []), Best(0, 0.9, {}, []), Best(0, 0.9, {}, []), Best(3, 0.95, {}, [])]


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def ticker_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "searchlab-progress"]


def test_plain_mode_prints_one_line_per_trial_in_the_log_format():
    stream = io.StringIO()
    progress = Progress("val_acc", 10, None, 0, stream)
    for outcome, best in zip(OUTCOMES, BESTS, strict=True):
        progress.trial_finished(outcome, best)
    progress.close()
    assert not ticker_threads()
    assert stream.getvalue().splitlines() == [
        "trial    0  COMPLETE  val_acc=0.9000     1.50s  best 0.9000 (#0)",
        "trial    1  PRUNED    val_acc=-          0.25s  best 0.9000 (#0)  [pruned at epoch 2: val_acc=0.5]",
        "trial    2  FAIL      val_acc=-          0.10s  best 0.9000 (#0)  [RuntimeError: boom]",
        "trial    3  COMPLETE  val_acc=0.9500     2.00s  best 0.9500 (#3)",
    ]
    assert progress.done == 3  # a failed trial uses no budget


def test_live_mode_redraws_a_status_line_below_the_trials():
    stream = FakeTerminal()
    progress = Progress("val_acc", 10, None, 2, stream, refresh_s=0.02)
    assert len(ticker_threads()) == 1
    for outcome, best in zip(OUTCOMES, BESTS, strict=True):
        progress.trial_finished(outcome, best)
    # the ticker redraws the status line (elapsed time) between trials: one per trial, then at least two ticks
    wait_until(lambda: stream.getvalue().count("\r\x1b[K") >= 4 + 2, "two ticks of the status line", 60)
    progress.close()
    assert not ticker_threads()
    text = stream.getvalue()
    assert text.count("\r\x1b[K") >= 4 + 2  # one per trial, at least two ticks, one at close
    assert "\x1b[32mCOMPLETE\x1b[0m" in text and "\x1b[33mPRUNED\x1b[0m" in text and "\x1b[31mFAIL\x1b[0m" in text
    assert "[pruned at epoch 2: val_acc=0.5]" in text
    final = text.rsplit("\r\x1b[K", 1)[1]
    assert final.endswith("\n") and "5/10 trials" in final and "best val_acc=0.9500 (#3)" in final
    assert "elapsed 0:00" in final and "left ~" in final
    closed = stream.getvalue()
    time.sleep(0.1)
    assert stream.getvalue() == closed  # nothing drawn after close


def test_remaining_time_follows_the_budget_or_the_timeout(monkeypatch):
    import searchlab.report.progress

    clock = [1000.0]  # an injected clock: exact on any machine load
    monkeypatch.setattr(searchlab.report.progress, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    progress = Progress("val_acc", 10, None, 2, io.StringIO())
    assert progress.remaining() is None  # no trial finished in this run yet
    progress.trial_finished(OUTCOMES[0], BESTS[0])
    progress.trial_finished(OUTCOMES[1], BESTS[1])
    clock[0] += 10  # two trials in 10 s, six left: 30 s
    assert progress.remaining() == pytest.approx(30)
    progress.timeout = 25  # the timeout ends this run first: 15 s
    assert progress.remaining() == pytest.approx(15)
    progress.timeout = 5
    assert progress.remaining() == 0


@pytest.mark.slow
def test_on_a_real_pty_the_status_line_fits_the_terminal(tmp_path: Path):
    """`searchlab search` in a pseudo-terminal of 70 columns: the live view, no status line wider than it."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 70, 0, 0))
    command = [sys.executable, "-m", "searchlab.cli", "search", "study.name=pty", "study.n_trials=2",
               "trainer.max_epochs=1", "model.width=16", "study.pruner=none", "model.batch_norm=false",
               f"study.storage={tmp_path}/optuna.journal", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
               f"tracking.artifact_root={tmp_path}/artifacts", f"report.dir={tmp_path}/reports"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, stdin=slave, stdout=slave, stderr=subprocess.DEVNULL, env=env, close_fds=True)
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 1.0)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(master)
    assert proc.wait(timeout=60) == 0
    text = b"".join(chunks).decode()
    assert "\r\x1b[K" in text and "\x1b[32mCOMPLETE\x1b[0m" in text
    statuses = [part.split("\r\n")[0] for part in text.split("\r\x1b[K") if part.startswith("[")]
    assert statuses and any("2/2 trials" in s for s in statuses)
    assert max(len(s) for s in statuses) < 70
