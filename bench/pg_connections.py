"""Peak PostgreSQL connections of one study's database: N workers straight on PostgreSQL vs through the gRPC proxy.

Run (starts its own PostgreSQL, MLflow server and proxy, stops them after):
    PYTHONPATH=tests OMP_NUM_THREADS=1 .venv/bin/python -m pytest bench/pg_connections.py -q -s
"""

from __future__ import annotations

import threading
import time

import psycopg2
from test_cluster import TINY, start_worker, study_overrides, wait_all

pytest_plugins = ("servers",)
WORKERS, TRIALS = 3, 9


def peak_connections(postgres, database: str, run) -> int:
    """The most connections to the database seen (every 0.1 s) while run() runs."""
    done, seen = threading.Event(), [0]

    def poll() -> None:
        connection = psycopg2.connect(host=postgres.host, port=postgres.port, user=postgres.user,
                                      password=postgres.password, dbname="postgres")
        connection.autocommit = True
        while not done.is_set():
            with connection.cursor() as cursor:
                cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (database,))
                seen[0] = max(seen[0], cursor.fetchone()[0])
            time.sleep(0.1)
        connection.close()

    thread = threading.Thread(target=poll)
    thread.start()
    try:
        run()
    finally:
        done.set()
        thread.join()
    return seen[0]


def test_peak_connections(postgres, mlflow_server, storage_proxy, tmp_path):
    def workers(name: str, storage: str) -> None:
        logs = [tmp_path / f"{name}{i}.log" for i in range(WORKERS)]
        overrides = [*study_overrides(name, storage, mlflow_server, TRIALS), *TINY]
        wait_all([start_worker(log, overrides) for log in logs], logs)

    direct_url = postgres.create_database("direct")
    direct = peak_connections(postgres, "direct", lambda: workers("direct", direct_url))
    proxied = peak_connections(postgres, "proxied",
                               lambda: workers("proxied", f"grpc://127.0.0.1:{storage_proxy.port}"))
    print(f"\n{WORKERS} workers, {TRIALS} trials: peak connections to the study database: "
          f"direct {direct}, through the gRPC proxy {proxied}")
