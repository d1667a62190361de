"""Real Airflow for the end-to-end tests: api-server, dag-processor, scheduler (LocalExecutor) and triggerer
started as processes on the test session's embedded PostgreSQL, stopped afterwards."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

AIRFLOW = [sys.executable, "-m", "airflow"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def airflow_processes(tmp_path: Path, corpora_file: Path, nightly_cron: str) -> Iterator[tuple[dict, dict]]:
    """Yields ``(env, logs)``: the environment the processes run with (the api-server's port in
    ``AIRFLOW__API__PORT``) and each process's log file. ``nightly_cron`` should be a schedule whose last fire
    time lies before the nightly DAG's start date, so that unpausing it starts no night of its own."""
    port = free_port()
    env = dict(os.environ)
    env.update({
        "REINDEX_CORPORA_FILE": str(corpora_file),
        "REINDEX_NIGHTLY_POKE_SECONDS": "2",
        "REINDEX_NIGHTLY_CRON": nightly_cron,
        "REINDEX_LEASE_POLL_SECONDS": "2",
        "AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC": "1",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__API_AUTH__JWT_SECRET": "test-secret-for-this-session-only",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        "AIRFLOW__CORE__PARALLELISM": "4",
    })
    # Serialize the DAGs with this environment before the scheduler starts: an earlier dag.test()
    # may have stored reindex_nightly with its default cron, which would start a scheduled night.
    subprocess.run([*AIRFLOW, "dags", "reserialize"], env=env, check=True, capture_output=True)
    procs, logs = [], {}
    for name, args in {"api-server": ["api-server", "--port", str(port), "--host", "127.0.0.1"],
                       "dag-processor": ["dag-processor"], "scheduler": ["scheduler"],
                       "triggerer": ["triggerer"]}.items():
        logs[name] = tmp_path / f"{name}.log"
        procs.append(subprocess.Popen([*AIRFLOW, *args], env=env, stdout=logs[name].open("w"),
                                      stderr=subprocess.STDOUT, start_new_session=True))
    try:
        yield env, logs
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
