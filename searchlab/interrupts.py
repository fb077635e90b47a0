"""SIGTERM handled like Ctrl-C: a preempted or `kill`ed search checkpoints its running trial, marks it resumable,
ends its runs cleanly and exits with 143 (128 + SIGTERM), as schedulers such as SLURM expect.

The handler raises KeyboardInterrupt, so every path that already ends cleanly on Ctrl-C (the trial, the worker pool,
the study's MLflow run) does the same on SIGTERM; `terminated()` tells the two apart for the reason and exit code.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

EXIT_TERMINATED = 143
_state = {"terminated": False}


def terminated() -> bool:
    """Whether this process received SIGTERM (and is stopping because of it)."""
    return _state["terminated"]


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    _state["terminated"] = True
    raise KeyboardInterrupt


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While the block runs (in the main thread), SIGTERM stops it as Ctrl-C would."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
