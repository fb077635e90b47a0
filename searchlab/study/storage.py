"""Optuna storages from `study.storage`: the journal file (default), RDB URLs, and the gRPC storage proxy that
serves an RDB to workers on other machines (`searchlab storage-proxy`)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import optuna
import sqlalchemy.exc
from optuna.storages import BaseStorage, GrpcStorageProxy, JournalStorage, RDBStorage, run_grpc_proxy_server
from optuna.storages.journal import JournalFileBackend
from optuna.storages.journal._file import get_lock_file

from searchlab.config import ConfigError, redact
from searchlab.study.faults import GrpcProxyWithHeartbeat


def open_storage(url: str, heartbeat: Mapping[str, Any] | None = None) -> BaseStorage:
    """study.storage -> an Optuna storage: an RDB URL (sqlite:///, postgresql://, mysql://), grpc://HOST:PORT (the
    storage proxy of `searchlab storage-proxy`) or a journal file path.

    The journal file is the default: safe for several local processes, and ~10x cheaper per trial than SQLite.
    `heartbeat` holds RDBStorage's heartbeat arguments (faults.heartbeat_settings), used by RDB and grpc:// storages.
    """
    try:
        if url.startswith("grpc://"):
            return _grpc_proxy(url, heartbeat or {})
        if "://" in url:
            return _rdb_storage(url, heartbeat or {})
        Path(url).parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFile(url))
    except ConfigError:
        raise
    except Exception as err:  # any failure to open is the user's URL, file or server
        reason = redact(str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__)
        raise ConfigError(f"study.storage: cannot open {redact(url)}: {reason[:200]}") from None


class JournalFile(JournalFileBackend):
    """Optuna's journal file, which fsyncs every write (~20 per trial: params, user attrs, one report per epoch, tell;
    1-4 ms each here, the largest part of a trial's fixed cost), with `one_sync()`: the writes of a block go to the
    file at once, as always (other processes read them at once: fsync is only about power loss), and are fsynced
    together when the block ends. searchlab wraps one trial (or one pack of trials) in it: what a power loss could
    then lose is the running trial's progress, which the loss of its worker loses anyway (it is failed and retried).
    """

    def __init__(self, file_path: str) -> None:
        super().__init__(file_path)
        self._deferred = 0
        self._unsynced = False

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        with interrupts_held():
            if not self._deferred:
                super().append_logs(logs)
                return
            with get_lock_file(self._lock):  # as JournalFileBackend.append_logs, less its fsync
                text = "\n".join(json.dumps(log, separators=(",", ":")) for log in logs) + "\n"
                with open(self._file_path, "ab") as f:
                    f.write(text.encode("utf-8"))
            self._unsynced = True

    @contextlib.contextmanager
    def one_sync(self) -> Iterator[None]:
        self._deferred += 1
        try:
            yield
        finally:
            self._deferred -= 1
            if not self._deferred and self._unsynced:
                fd = os.open(self._file_path, os.O_RDONLY)
                try:
                    os.fsync(fd)  # the file's data, whichever descriptor wrote it
                finally:
                    os.close(fd)
                self._unsynced = False


@contextlib.contextmanager
def interrupts_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM taken only once the block ends. Why: Optuna's journal lock is not interrupt-safe. An
    interrupt landing between its acquire and get_lock_file's try leaves the lock file behind, so every other worker
    of the study waits the lock's 30 s grace period (and a worker stopped by Ctrl-C is killed meanwhile, its trial
    re-queued); one landing while acquire waits removes the lock another process holds. Outside the main thread
    (where Python runs signal handlers) the block runs as it is."""
    held = (signal.SIGINT, signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread() or any(signal.getsignal(s) is None for s in held):
        yield  # None: a handler Python did not install, which it could not put back
        return
    caught: list[int] = []
    before = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in held}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(caught):
            signal.raise_signal(s)  # to the handler the block held it from


def one_sync(storage: BaseStorage) -> contextlib.AbstractContextManager[None]:
    """The block's journal writes fsynced once at its end (JournalFile); other storages write as they always do."""
    backend = getattr(storage, "_backend", None)
    return backend.one_sync() if isinstance(backend, JournalFile) else contextlib.nullcontext()


def _rdb_storage(url: str, heartbeat: Mapping[str, Any], attempts: int = 3) -> RDBStorage:
    """RDBStorage, retried when workers started together race to create Optuna's tables in a fresh database
    (PostgreSQL: a duplicate key in pg_type); the retry finds the tables made and uses them."""
    for attempt in range(attempts):
        try:
            return RDBStorage(url, **heartbeat)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
            if attempt == attempts - 1:
                raise
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


# Seconds to wait for a gRPC storage proxy to answer: a wrong host or port should fail in seconds, as in tracking.
_PROXY_TIMEOUT = 10


def _grpc_proxy(url: str, heartbeat: Mapping[str, Any]) -> GrpcStorageProxy:
    """A client of Optuna's gRPC storage proxy, checked to answer (GrpcStorageProxy itself connects lazily)."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    if not parts.hostname or port is None or parts.path not in ("", "/") or parts.query:
        raise ConfigError(f"study.storage: expected grpc://HOST:PORT (a `searchlab storage-proxy`), got {url!r}")
    proxy = GrpcProxyWithHeartbeat(host=parts.hostname, port=port, **heartbeat)
    try:
        proxy.wait_server_ready(timeout=_PROXY_TIMEOUT)
    except ConnectionError:
        proxy.close()
        raise ConfigError(f"study.storage: no gRPC storage proxy answers at {parts.hostname}:{port} within "
                          f"{_PROXY_TIMEOUT}s; start one with `searchlab storage-proxy study.storage=postgresql://...`"
                          ) from None
    return proxy


def serve_storage_proxy(url: str, host: str, port: int) -> None:
    """Serves the RDB storage at url to workers on grpc://host:port until interrupted.

    Hundreds of workers then hold one gRPC channel each instead of a pool of database connections each.
    """
    if "://" not in url or url.startswith("grpc://"):
        raise ConfigError(f"study.storage: the gRPC storage proxy serves an RDB storage (postgresql://...), "
                          f"got {redact(url)!r}")
    storage = optuna.storages.get_storage(open_storage(url))  # Optuna's cache in front of the RDB, as it advises
    print(f"gRPC storage proxy for {redact(url)} on {host}:{port}; workers use study.storage=grpc://{host}:{port}",
          flush=True)
    try:
        run_grpc_proxy_server(storage, host=host, port=port)
    except RuntimeError as err:  # cannot bind: not this machine's host (gRPC shares a taken port: SO_REUSEPORT)
        raise ConfigError(f"study.proxy: cannot listen on {host}:{port}: {err}") from None


def load_study(storage_url: str, name: str) -> optuna.Study:
    """The existing study `name`; a missing store or study is bad input, and nothing is created for it."""
    path = storage_url.removeprefix("sqlite:///") if storage_url.startswith("sqlite:///") else storage_url
    if ("://" not in storage_url or storage_url.startswith("sqlite:///")) and not Path(path).is_file():
        raise ConfigError(f"study.storage: no study storage at {redact(storage_url)}; "
                          f"give the study.storage the search used")
    storage = open_storage(storage_url)
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        names = optuna.get_all_study_names(storage)
        raise ConfigError(f"study.name: no study '{name}' in {redact(storage_url)} "
                          f"(studies there: {', '.join(names) or 'none'})") from None
