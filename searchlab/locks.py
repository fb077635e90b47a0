"""Cross-process locks that make "count the budget, then ask for a trial" one atomic step, per storage kind.

Optuna has no such lock: two workers that both see 39 of 40 trials used would both ask and overshoot the budget.

| study.storage                   | lock                                                   | scope                    |
|---------------------------------|--------------------------------------------------------|--------------------------|
| journal file (default)          | fcntl.flock on `<journal>.budget.lock`                 | processes sharing the fs |
| sqlite:///path                  | fcntl.flock on `<path>.budget.lock`                    | processes sharing the fs |
| postgresql://...                | pg_advisory_xact_lock keyed by the study name          | every client of the db   |
| anything else (mysql, grpc ...) | none: the budget may overshoot by up to workers - 1    | -                        |
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

# Called with no argument, gives a context manager that holds the lock.
BudgetLock = Callable[[], AbstractContextManager[None]]


class FileLock:
    """An exclusive flock on a file; the kernel frees it when the holder dies, even by SIGKILL."""

    def __init__(self, path: str) -> None:
        self.path = path

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the last descriptor releases the flock


class PostgresAdvisoryLock:
    """A transaction-scoped advisory lock on the study's database; PostgreSQL frees it when the holder's
    connection drops, so a killed worker never keeps it."""

    def __init__(self, url: str, name: str) -> None:
        import sqlalchemy
        from sqlalchemy.pool import NullPool

        self._text = sqlalchemy.text
        self.engine = sqlalchemy.create_engine(url, poolclass=NullPool)
        digest = hashlib.sha256(f"searchlab.budget:{name}".encode()).digest()
        self.key = int.from_bytes(digest[:8], "big", signed=True)  # advisory lock keys are signed 64-bit

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        with self.engine.begin() as connection:
            connection.execute(self._text("SELECT pg_advisory_xact_lock(:key)"), {"key": self.key})
            yield


class NoLock:
    """Storages without a lock of ours: the budget is checked, but two workers may both take the last trial."""

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        yield


def budget_lock(storage_url: str, study_name: str) -> BudgetLock:
    """The lock for study.storage: call it to get a context manager, e.g. `with lock(): ...`."""
    if storage_url.startswith(("postgresql://", "postgresql+", "postgres://")):
        return PostgresAdvisoryLock(storage_url, study_name)
    if storage_url.startswith("sqlite:///") and storage_url != "sqlite:///:memory:":
        return FileLock(storage_url.removeprefix("sqlite:///") + ".budget.lock")
    if "://" not in storage_url:
        return FileLock(storage_url + ".budget.lock")
    return NoLock()
