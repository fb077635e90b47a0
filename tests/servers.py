"""Real servers for the tests: PostgreSQL (Debian's binaries, the newest installed version), an MLflow tracking
server on it and `searchlab storage-proxy` in front of it.

Each is started once per test session on a free 127.0.0.1 port, in a temporary directory, and stopped after.
conftest.py makes the fixtures available to every test module.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import free_port, stop, wait_until

PG_USER, PG_PASSWORD = "searchlab", "s3cret-pw"  # a password, so tests can check it is never printed or logged


def postgres_bin(root: Path = Path("/usr/lib/postgresql")) -> Path | None:
    """The bin/ folder of the newest PostgreSQL Debian installed (/usr/lib/postgresql/<version>/bin), or None."""
    versions = [p for p in root.glob("*/bin") if re.fullmatch(r"\d+(\.\d+)?", p.parent.name)]
    return max(versions, key=lambda p: tuple(int(n) for n in p.parent.name.split(".")), default=None)


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
    """A PostgreSQL server on 127.0.0.1 (the newest version installed), password auth, data in a temp dir (pytest's
    tmp_path sits below folders the postgres user cannot enter); stopped and removed after."""
    pg_bin = postgres_bin()
    missing = [name for name in ("initdb", "pg_ctl") if pg_bin is None or not (pg_bin / name).is_file()]
    if missing:
        pytest.fail(f"PostgreSQL binaries not found (/usr/lib/postgresql/*/bin/{', '.join(missing)}): "
                    "run `make system` (installs Debian's postgresql)")
    root = Path(tempfile.mkdtemp(prefix="searchlab-pg-"))
    data, log, pwfile = root / "data", root / "server.log", root / "pw"
    pwfile.write_text(PG_PASSWORD + "\n")
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        shutil.chown(pwfile, "postgres")
    port = free_port()
    try:
        subprocess.run([*_as_postgres_user(), str(pg_bin / "initdb"), "-D", str(data), "-U", PG_USER,
                        f"--pwfile={pwfile}", "--auth=scram-sha-256", "--no-sync", "-E", "UTF8"],
                       check=True, capture_output=True, text=True)
        # No durability needed for a test server: fsync off makes each commit ~10x cheaper.
        options = (f"-h 127.0.0.1 -p {port} -k {root} -c fsync=off -c synchronous_commit=off "
                   "-c full_page_writes=off -c max_connections=300")
        subprocess.run([*_as_postgres_user(), str(pg_bin / "pg_ctl"), "-D", str(data), "-l", str(log),
                        "-o", options, "-w", "-t", "60", "start"], check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as err:
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"PostgreSQL did not start: {err.stderr or err.stdout}")
    try:
        yield Postgres("127.0.0.1", port, PG_USER, PG_PASSWORD)
    finally:
        subprocess.run([*_as_postgres_user(), str(pg_bin / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w",
                        "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@dataclass(frozen=True)
class MlflowServer:
    uri: str
    artifacts: Path


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
