"""Progress of a search as trials finish: a live view on a terminal, one plain line per trial anywhere else.

The search loop (or a parent process watching several workers) calls `trial_finished` once per finished trial;
Progress knows nothing of where outcomes come from. On a terminal the trial lines scroll above a status line that is
redrawn every second (finished / budget, best so far, elapsed, estimate of what remains) with plain ANSI codes.
Elsewhere (CI, logs, pipes) each trial is one line in the format logs have always had, and nothing is redrawn.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, TextIO

from searchlab.config import format_value

if TYPE_CHECKING:
    from searchlab.study import Best
    from searchlab.study.trial import TrialOutcome

_BUDGET_STATES = ("COMPLETE", "PRUNED")  # as the study's budget counts: failed trials use none
_COLOURS = {"COMPLETE": "\x1b[32m", "PRUNED": "\x1b[33m", "FAIL": "\x1b[31m"}
_RESET, _CLEAR_LINE = "\x1b[0m", "\r\x1b[K"
_BAR_WIDTH = 16


def trial_line(metric: str, outcome: TrialOutcome, best: Best | None, others: Sequence[str] = ()) -> str:
    """The plain per-trial line (the format of `searchlab search` logs). `others`: the names of a multi-objective
    study's other metrics, whose values follow the first's (`best` is by the first)."""
    value = "-" if outcome.value is None else f"{outcome.value:.4f}"
    if others and outcome.values:
        value += "".join(f"  {n}={format_value(v)}" for n, v in zip(others, outcome.values[1:], strict=True))
    best_text = "-" if best is None else f"{best.value:.4f} (#{best.number})"
    reason = f"  [{outcome.reason}]" if outcome.reason and outcome.state != "COMPLETE" else ""
    resumed = f"  (resumed from epoch {outcome.resumed_from})" if outcome.resumed_from else ""
    return (f"trial {outcome.number:4d}  {outcome.state:8s}  {metric}={value:7s}  {outcome.seconds:6.2f}s  "
            f"best {best_text}{reason}{resumed}")


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress:
    """Reports finished trials to `stream`: live when it is a terminal (isatty), plain lines otherwise."""

    def __init__(self, metric: str, n_trials: int, timeout: float | None, done_before: int,
                 stream: TextIO | None = None, refresh_s: float = 1.0, others: Sequence[str] = ()) -> None:
        self.metric, self.n_trials, self.timeout, self.others = metric, n_trials, timeout, tuple(others)
        self.done_before, self.done = done_before, done_before
        self.stream = stream if stream is not None else sys.stdout
        self.live = bool(getattr(self.stream, "isatty", lambda: False)())
        self.best: Best | None = None
        self.start = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        if self.live:
            self._ticker = threading.Thread(target=self._tick, args=(refresh_s,), name="searchlab-progress",
                                            daemon=True)
            self._ticker.start()

    def trial_finished(self, outcome: TrialOutcome, best: Best | None) -> None:
        """One finished trial (any state) and the study's best complete trial after it."""
        with self._lock:
            self.best = best
            if outcome.state in _BUDGET_STATES:
                self.done += 1
            line = trial_line(self.metric, outcome, best, self.others)
            if self.live:
                colour = _COLOURS.get(outcome.state, "")
                line = line.replace(f"  {outcome.state}", f"  {colour}{outcome.state}{_RESET}", 1)
                self._write(f"{_CLEAR_LINE}{line}\n{self.status()}")
            else:
                self._write(line + "\n")

    def close(self) -> None:
        """Stops the redraws; on a terminal the status line stays, as the last line of the view."""
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
            self._ticker = None
            with self._lock:
                self._write(f"{_CLEAR_LINE}{self.status()}\n")

    def remaining(self) -> float | None:
        """Seconds left: by the budget at this run's pace, or by study.timeout, whichever ends first."""
        elapsed = time.monotonic() - self.start
        estimates = []
        finished_here = self.done - self.done_before
        if finished_here > 0:
            estimates.append(max(self.n_trials - self.done, 0) * elapsed / finished_here)
        if self.timeout is not None:
            estimates.append(max(self.timeout - elapsed, 0.0))
        return min(estimates) if estimates else None

    def status(self) -> str:
        """The live status line, cut to the terminal's width so that redrawing it in place never wraps."""
        shown = min(self.done, self.n_trials)
        filled = _BAR_WIDTH * shown // max(self.n_trials, 1)
        bar = "#" * filled + "." * (_BAR_WIDTH - filled)
        best = "-" if self.best is None else f"{self.best.value:.4f} (#{self.best.number})"
        left = self.remaining()
        text = (f"[{bar}] {self.done}/{self.n_trials} trials  best {self.metric}={best}  "
                f"elapsed {_clock(time.monotonic() - self.start)}  "
                f"{'left ?' if left is None else 'left ~' + _clock(left)}")
        return text[: self._width() - 1]

    def _width(self) -> int:
        try:
            columns = os.get_terminal_size(self.stream.fileno()).columns
        except (AttributeError, OSError, ValueError):  # a fake or redirected stream has no terminal size
            columns = 0
        return columns if columns >= 20 else 120  # a pty nobody sized says 0

    def _tick(self, refresh_s: float) -> None:
        while not self._stop.wait(refresh_s):
            with self._lock:
                self._write(f"{_CLEAR_LINE}{self.status()}")

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()
