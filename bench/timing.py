"""Bench-only instrumentation: exclusive wall time per named part of a call tree, by wrapping methods with
perf_counter. Nothing here is imported by searchlab; production code paths stay untouched.

A wrapped call's time goes to its own part, minus the time of wrapped calls nested inside it, so the parts of one
trial add up to the trial's wall time. A part's name is its path of wrapped callers ("run/start_trial/create_run").
"""

from __future__ import annotations

import functools
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


class PartTimer:
    """Accumulates exclusive seconds per part for the current trial; `take()` ends the trial and returns them."""

    def __init__(self) -> None:
        self._stack: list[list[Any]] = []  # [path, start, nested seconds]
        self._current: dict[str, float] = defaultdict(float)
        self._undo: list[Callable[[], None]] = []
        self.active = False  # wrapped calls outside an active stretch (another way's trial) pass straight through

    @contextmanager
    def part(self, name: str) -> Iterator[None]:
        path = f"{self._stack[-1][0]}/{name}" if self._stack else name
        frame = [path, time.perf_counter(), 0.0]
        self._stack.append(frame)
        try:
            yield
        finally:
            self._stack.pop()
            elapsed = time.perf_counter() - frame[1]
            self._current[path] += elapsed - frame[2]
            if self._stack:
                self._stack[-1][2] += elapsed

    def wrap(self, fn: Callable[..., Any], name: str) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if not self.active:
                return fn(*args, **kwargs)
            with self.part(name):
                return fn(*args, **kwargs)

        return timed

    def patch(self, owner: Any, attribute: str, name: str | None = None) -> None:
        """Wraps owner.attribute (an instance's or a class's) in place, frozen dataclasses included; `restore`
        undoes it."""
        setter = setattr if isinstance(owner, type) else object.__setattr__
        had_own = attribute in vars(owner)
        original = vars(owner).get(attribute)
        setter(owner, attribute, self.wrap(getattr(owner, attribute), name or attribute))
        if had_own:
            self._undo.append(lambda: setter(owner, attribute, original))
        else:
            self._undo.append(lambda: delattr(owner, attribute) if isinstance(owner, type)
                              else object.__delattr__(owner, attribute))

    def restore(self) -> None:
        while self._undo:
            self._undo.pop()()

    def take(self) -> dict[str, float]:
        parts, self._current = dict(self._current), defaultdict(float)
        return parts
