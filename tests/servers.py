"""Real servers for the several-machines tests: PostgreSQL 15 (Debian's binaries) and an MLflow tracking server.

Each is started once per test session on a free 127.0.0.1 port, in a temporary directory, and stopped after.
Import the fixtures into a test module (`from tests.servers import postgres, mlflow_server`).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PG_BIN = Path("/usr/lib/postgresql/15/bin")
PG_USER, PG_PASSWORD = "searchlab", "s3cret-pw"  # a password, so tests can check it is never printed or logged


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(ready, what: str, timeout: float, process: subprocess.Popen | None = None, log: Path | None = None):
    """Polls ready() until it returns something truthy; fails with the log's tail if the process dies or time is up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = ready()
        if value:
            return value
        if process is not None and process.poll() is not None:
            break
        time.sleep(0.1)
    tail = log.read_text(errors="replace")[-2000:] if log is not None and log.exists() else ""
    pytest.fail(f"{what} did not come up within {timeout:.0f}s\n{tail}")


@dataclass(frozen=True)
class Postgres:
    host: str
    port: int
    user: str
    password: str

    def url(self, database: str, password: bool = True) -> str:
        secret = f":{self.password}" if password else ""
        return f"postgresql://{self.user}{secret}@{self.host}:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A new empty database; returns its URL (with the password)."""
        import psycopg2

        connection = psycopg2.connect(host=self.host, port=self.port, user=self.user, password=self.password,
                                      dbname="postgres")
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
        connection.close()
        return self.url(name)


def _as_postgres_user() -> list[str]:
    """initdb and the server refuse to run as root: as root, run them as the `postgres` system user."""
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """A PostgreSQL 15 server on 127.0.0.1, password auth, data in a temp dir; stopped and removed after."""
    missing = [name for name in ("initdb", "pg_ctl") if not (PG_BIN / name).is_file()]
    if missing:
        pytest.fail(f"PostgreSQL 15 binaries not found ({', '.join(str(PG_BIN / m) for m in missing)}): "
                    "run `make system` (installs Debian's postgresql)")
    root = Path(tempfile.mkdtemp(prefix="searchlab-pg-"))
    data, log, pwfile = root / "data", root / "server.log", root / "pw"
    pwfile.write_text(PG_PASSWORD + "\n")
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        shutil.chown(pwfile, "postgres")
    port = free_port()
    try:
        subprocess.run([*_as_postgres_user(), str(PG_BIN / "initdb"), "-D", str(data), "-U", PG_USER,
                        f"--pwfile={pwfile}", "--auth=scram-sha-256", "--no-sync", "-E", "UTF8"],
                       check=True, capture_output=True, text=True)
        # No durability needed for a test server: fsync off makes each commit ~10x cheaper.
        options = (f"-h 127.0.0.1 -p {port} -k {root} -c fsync=off -c synchronous_commit=off "
                   "-c full_page_writes=off -c max_connections=300")
        subprocess.run([*_as_postgres_user(), str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(log),
                        "-o", options, "-w", "-t", "60", "start"], check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as err:
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"PostgreSQL did not start: {err.stderr or err.stdout}")
    try:
        yield Postgres("127.0.0.1", port, PG_USER, PG_PASSWORD)
    finally:
        subprocess.run([*_as_postgres_user(), str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w",
                        "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@dataclass(frozen=True)
class MlflowServer:
    uri: str
    artifacts: Path


def stop(process: subprocess.Popen, timeout: float = 3) -> None:
    """SIGTERM to the process group the test started (the server and its own workers), SIGKILL if it lingers."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.fixture(scope="session")
def mlflow_server(postgres: Postgres) -> Iterator[MlflowServer]:
    """`mlflow server` from the venv, runs in PostgreSQL, artifacts served from a temp dir; stopped after."""
    root = Path(tempfile.mkdtemp(prefix="searchlab-mlflow-"))
    backend = postgres.create_database("mlflow")
    port = free_port()
    log = root / "server.log"
    command = [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", backend,
               "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1"]
    # Without its job runner (seven huey consumers for GenAI jobs, unused here) it starts in a fraction of the time.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    uri = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    try:
        wait_until(healthy, "mlflow server", 120, process, log)
        yield MlflowServer(uri, root / "artifacts")
    finally:
        stop(process)
        shutil.rmtree(root, ignore_errors=True)


@dataclass(frozen=True)
class StorageProxy:
    port: int
    backend: str  # the PostgreSQL URL behind it
    log: Path


@pytest.fixture(scope="session")
def storage_proxy(postgres: Postgres) -> Iterator[StorageProxy]:
    """`searchlab storage-proxy` in front of a PostgreSQL database, on a free 127.0.0.1 port; stopped after."""
    from optuna.storages import GrpcStorageProxy

    root = Path(tempfile.mkdtemp(prefix="searchlab-proxy-"))
    backend = postgres.create_database("proxied")
    port = free_port()
    log = root / "proxy.log"
    with log.open("wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "searchlab.cli", "storage-proxy", f"study.storage={backend}",
                                    f"study.proxy.port={port}"], stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    client = GrpcStorageProxy(host="127.0.0.1", port=port)

    def answers() -> bool:
        try:
            client.wait_server_ready(timeout=1)
            return True
        except ConnectionError:
            return False

    try:
        wait_until(answers, "searchlab storage-proxy", 60, process, log)
        client.close()
        yield StorageProxy(port, backend, log)
    finally:
        stop(process)
        shutil.rmtree(root, ignore_errors=True)
