"""Cross-process locks that make "count the budget, then ask for a trial" one atomic step, per storage kind.

Optuna has no such lock: two workers that both see 39 of 40 trials used would both ask and overshoot the budget.

| study.storage                   | lock                                                   | scope                    |
|---------------------------------|--------------------------------------------------------|--------------------------|
| journal file (default)          | fcntl.flock on `<journal>.budget.lock`                 | processes sharing the fs |
| sqlite:///path                  | fcntl.flock on `<path>.budget.lock`                    | processes sharing the fs |
| postgresql://...                | pg_advisory_xact_lock keyed by the study name          | every client of the db   |
| anything else (mysql, grpc ...) | none: a trial asked past the budget is failed unrun    | (budget.Budget)          |
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import sqlalchemy
from optuna.storages import BaseStorage, JournalStorage, RDBStorage

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
    """A transaction-scoped advisory lock in the study's database; PostgreSQL frees it when the holder's
    connection drops, so a killed worker never keeps it."""

    def __init__(self, engine: Any, name: str) -> None:
        self.engine = engine  # the RDB storage's own SQLAlchemy engine: same driver, same pool
        digest = hashlib.sha256(f"searchlab.budget:{name}".encode()).digest()
        self.key = int.from_bytes(digest[:8], "big", signed=True)  # advisory lock keys are signed 64-bit

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        with self.engine.begin() as connection:
            connection.execute(sqlalchemy.text("SELECT pg_advisory_xact_lock(:key)"), {"key": self.key})
            yield


class NoLock:
    """Storages without a lock of ours: the budget is checked, but two workers may both take the last trial."""

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        yield


def budget_lock(storage: BaseStorage, url: str, study_name: str) -> BudgetLock:
    """The lock for the study's storage (opened from study.storage = url): `with lock(): ...`."""
    if isinstance(storage, RDBStorage):
        if storage.engine.dialect.name == "postgresql":
            return PostgresAdvisoryLock(storage.engine, study_name)
        if storage.engine.dialect.name == "sqlite" and storage.engine.url.database not in (None, "", ":memory:"):
            return FileLock(storage.engine.url.database + ".budget.lock")
        return NoLock()
    if isinstance(storage, JournalStorage) and "://" not in url:
        return FileLock(url + ".budget.lock")
    return NoLock()
