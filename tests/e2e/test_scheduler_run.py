"""One run through real Airflow processes: scheduler (LocalExecutor), dag-processor and api-server
(the Execution API the task processes talk to), triggered from the CLI like an operator would."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reindex.store import Store, connect
from reindex.store.search import corpus_status

pytestmark = pytest.mark.e2e

AIRFLOW = [sys.executable, "-m", "airflow"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def airflow_services(airflow_db, tmp_path):
    port = _free_port()
    env = dict(os.environ)
    env.update({
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__API_AUTH__JWT_SECRET": "test-secret-for-this-session-only",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        "AIRFLOW__CORE__PARALLELISM": "4",
    })
    procs = []
    logs = {}
    for name, args in {"api-server": ["api-server", "--port", str(port), "--host", "127.0.0.1"],
                       "dag-processor": ["dag-processor"], "scheduler": ["scheduler"]}.items():
        logs[name] = tmp_path / f"{name}.log"
        procs.append(subprocess.Popen([*AIRFLOW, *args], env=env, stdout=logs[name].open("w"),
                                      stderr=subprocess.STDOUT, start_new_session=True))
    yield env, logs
    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)


def _run_state(env, run_id: str) -> str | None:
    from airflow import settings
    from airflow.models.dagrun import DagRun

    with settings.Session() as session:
        dr = session.query(DagRun).filter(DagRun.dag_id == "reindex_corpus", DagRun.run_id == run_id).one_or_none()
        return None if dr is None else str(dr.state)


def test_reindex_corpus_through_the_scheduler(airflow_services, tmp_path, store_uri):
    env, logs = airflow_services
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, text in enumerate(["Glaciers carve U-shaped valleys.", "Bees pollinate apple blossoms.",
                              "Лёд на Байкале прозрачный."]):
        (corpus / f"n{i}.txt").write_text(text, encoding="utf-8")
    subprocess.run([*AIRFLOW, "dags", "reserialize"], env=env, check=True, capture_output=True)
    subprocess.run([*AIRFLOW, "dags", "unpause", "reindex_corpus"], env=env, check=True, capture_output=True)
    run_id = f"scheduler_test_{int(time.time())}"
    subprocess.run([*AIRFLOW, "dags", "trigger", "reindex_corpus", "--run-id", run_id,
                    "--conf", f'{{"corpus": "scheduled", "corpus_uri": "{corpus}"}}'],
                   env=env, check=True, capture_output=True)
    deadline = time.monotonic() + 420
    state = None
    while time.monotonic() < deadline:
        state = _run_state(env, run_id)
        if state in ("success", "failed"):
            break
        time.sleep(3)
    tails = {n: Path(p).read_text()[-3000:] for n, p in logs.items()}
    assert state == "success", f"run ended {state}; logs: {tails}"
    with connect(store_uri, autocommit=True) as conn:
        st = corpus_status(Store(conn), "scheduled")
    assert st["chunks"] == {"READY": 3, "PENDING": 0, "FAILED": 0}
    assert st["last_batch"]["status"] == "COMPLETED"
