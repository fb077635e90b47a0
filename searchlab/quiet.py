"""Library warnings once per study, one line each, so a search's output stays its first lines, one line per trial and
its summary.

Why they repeat today: Python's warnings registry shows a "default" warning once per code location, but any
`warnings.catch_warnings()` block (Optuna, MLflow, torch and searchlab enter them per trial) resets every registry on
exit, and Lightning's rank_zero_warn goes through warnings.warn; so each trial printed Lightning's and torch's
warnings again, in several lines with a file path. Optuna's own warnings (`[W date] ...`) come through its logger.

While a command runs (searchlab.cli), every warning that the filters let through is printed once, as one line
`searchlab: warning: <message> (<category>)`, and never again in the study: the keys of those shown are kept in an
environment variable, which the study's workers and DDP ranks inherit, so a process it starts does not show them
again. A warning about the user's setup (Lightning's "Attribute 'net' is an instance of nn.Module ...") is one of them:
shown, once. The warnings filters themselves are left as they are (-W and PYTHONWARNINGS still apply).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from typing import Any, TextIO

SHOWN_ENV = "SEARCHLAB_WARNINGS_SHOWN"
_MAX_CHARS = 400  # a longer message is cut: one readable line


def _key(category: str, text: str) -> str:
    return hashlib.sha1(f"{category}:{text}".encode()).hexdigest()[:12]


class _Once:
    """The shown keys and the one-line printer shared by warnings.showwarning and the Optuna log handler."""

    def __init__(self, stream: TextIO | None) -> None:
        self.stream = stream
        self.shown = {k for k in os.environ.get(SHOWN_ENV, "").split(",") if k}

    def show(self, text: str, category: str) -> None:
        text = " ".join(str(text).split())
        key = _key(category, text)
        if key in self.shown:
            return
        self.shown.add(key)
        os.environ[SHOWN_ENV] = ",".join(sorted(self.shown))
        if len(text) > _MAX_CHARS:
            text = text[:_MAX_CHARS - 3] + "..."
        print(f"searchlab: warning: {text} ({category})", file=self.stream or sys.stderr, flush=True)

    def showwarning(self, message: Any, category: type[Warning], filename: str, lineno: int,
                    file: TextIO | None = None, line: str | None = None) -> None:
        self.show(str(message), category.__name__)


class _OptunaHandler(logging.Handler):
    """Optuna's warnings (its logger's `[W date] ...` lines), printed as the others."""

    def __init__(self, once: _Once) -> None:
        super().__init__(logging.WARNING)
        self.once = once

    def emit(self, record: logging.LogRecord) -> None:
        self.once.show(record.getMessage(), f"optuna {record.levelname.lower()}")


def quiet_empty_plots() -> None:
    """Optuna's plot functions log a warning for a study with no complete trial ("There are no complete trials.",
    "Your study does not have any completed trials.", one per plot: `[W date] ...` lines after the summary, outside
    any command's warnings_once); the summary says it already and the report shows the empty plots. Their logger
    (optuna.visualization, parent of every plot module's) goes to ERROR; Optuna's other warnings are untouched."""
    logging.getLogger("optuna.visualization").setLevel(logging.ERROR)


@contextlib.contextmanager
def warnings_once(stream: TextIO | None = None) -> Iterator[None]:
    """While the block runs, each warning is printed once in the study, in one line (see the module's docstring);
    afterwards Python's and Optuna's printing and the environment are as they were."""
    once = _Once(stream)
    before = os.environ.get(SHOWN_ENV)
    previous = warnings.showwarning
    warnings.showwarning = once.showwarning
    optuna = sys.modules.get("optuna")  # imported by then in a command; not imported here (help stays light)
    handler = _OptunaHandler(once)
    if optuna is not None:
        optuna.logging.disable_default_handler()
        logging.getLogger("optuna").addHandler(handler)
    try:
        yield
    finally:
        warnings.showwarning = previous
        if optuna is not None:
            logging.getLogger("optuna").removeHandler(handler)
            optuna.logging.enable_default_handler()
        if before is None:
            os.environ.pop(SHOWN_ENV, None)
        else:
            os.environ[SHOWN_ENV] = before
