"""`make airflow-celery` for real: scripts/celery_stack.py starts the api-server, scheduler, dag-processor,
triggerer and two Celery workers (SQLAlchemy broker on the session's PostgreSQL — no Redis, no Docker); a
reindex_corpus run of 500 one-chunk documents — one .jsonl file split into byte-range scan shards, 5 encode
partitions — lands on both workers and equals the single-task scan; an unchanged second run plans no scan shard;
SIGTERM stops every component."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from reindex.store import Store, connect
from reindex.store.search import corpus_status
from tests.conftest import ROOT
from tests.e2e.services import AIRFLOW, free_port
from tests.e2e.test_scheduler_run import _run_state

pytestmark = pytest.mark.e2e

DOCS = 500
PARTITION_SIZE = 100  # the Param's minimum: 5 encode partitions
STACK = ROOT / "scripts" / "celery_stack.py"


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "celery_corpus"
    root.mkdir()
    rows = [json.dumps({"id": f"c{i:03d}", "text": f"Document {i} of the two-worker run: short enough for one chunk."})
            for i in range(DOCS)]
    (root / "docs.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return root


def _pids(ready_line: str) -> dict[str, int]:
    """``name=pid`` pairs at the end of the stack's ready line."""
    return {k: int(v) for k, v in (p.split("=") for p in ready_line.rsplit("pids ", 1)[1].split())}


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture
def celery_stack(airflow_db, tmp_path):
    """The stack as `make airflow-celery` runs it, on the session's database; yields (env, logs, ready line)."""
    api_port, trigger_port = free_port(), free_port()
    log_port = free_port()  # worker 1's; worker 2 takes the next port that is not the triggerer's
    while _port_busy(log_port + 1) or {log_port, log_port + 1} & {api_port, trigger_port}:
        log_port = free_port()
    env = dict(os.environ)
    env.pop("AIRFLOW__CELERY__BROKER_URL", None)
    env.pop("REINDEX_CELERY_BROKER", None)
    env.update({
        "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(tmp_path / "logs"),
        "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(trigger_port),
        "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        "AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC": "1",
        # Feb 29 at 02:00: a schedule whose last fire time lies before the nightly DAG's start date
        "REINDEX_NIGHTLY_CRON": "0 2 29 2 *",
        "REINDEX_CORPORA_FILE": str(tmp_path / "no-corpora.yaml"),
        "REINDEX_LEASE_POLL_SECONDS": "2",
        # two encodes at once per run, one task slot per worker: while one worker encodes, the other must
        "REINDEX_ENCODE_CONCURRENCY": "2",
        # the 500-line .jsonl (~47 KB) is read as six byte ranges by six scan_shard tasks, two at a time
        "REINDEX_SCAN_SHARD_BYTES": "8000",
        "REINDEX_SCAN_CONCURRENCY": "2",
    })
    (tmp_path / "no-corpora.yaml").write_text("corpora: []\n", encoding="utf-8")
    # The DAGs as this environment parses them, before the scheduler sees an older serialization.
    subprocess.run([*AIRFLOW, "dags", "reserialize"], env=env, check=True, capture_output=True)
    proc = subprocess.Popen([sys.executable, str(STACK), "--skip-migrate", "--workers", "2", "--concurrency", "1",
                             "--api-port", str(api_port), "--log-port", str(log_port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("celery stack ready:"):
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    logs = {name: tmp_path / "logs" / "celery-stack" / f"{name}.log"
            for name in ("api-server", "scheduler", "dag-processor", "triggerer", "worker1", "worker2")}
    try:
        while not ready.wait(1.0):
            assert proc.poll() is None, f"the stack exited with {proc.returncode}: {''.join(lines)[-4000:]}"
        ready_line = next(ln for ln in lines if ln.startswith("celery stack ready:"))
        yield env, logs, ready_line, proc, lines
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _tails(logs: dict[str, Path]) -> dict[str, str]:
    return {n: p.read_text(errors="replace")[-3000:] for n, p in logs.items() if p.exists()}


def _wait_run(run_id: str, logs: dict[str, Path], proc: subprocess.Popen, lines: list[str], timeout: float) -> str:
    """The run's final state; fails at once if the stack stopped (a component died) before the run ended."""
    deadline = time.monotonic() + timeout
    state = None
    while time.monotonic() < deadline:
        state = _run_state("reindex_corpus", run_id)
        if state in ("success", "failed"):
            return state
        assert proc.poll() is None, f"the stack exited ({proc.returncode}) during the run: {''.join(lines)[-2000:]}; " \
                                    f"logs: {_tails(logs)}"
        time.sleep(3)
    raise AssertionError(f"run {run_id} still {state} after {timeout:.0f} s; logs: {_tails(logs)}")


def _port_busy(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_a_run_spreads_over_two_celery_workers(celery_stack, corpus, store_uri, store, encoder):
    env, logs, ready_line, proc, lines = celery_stack
    host = socket.gethostname()
    workers = {f"worker1@{host}", f"worker2@{host}"}
    assert f"workers worker1@{host} worker2@{host} on queue(s) default" in ready_line
    assert "broker sqla+postgresql" in ready_line
    for args in (["dags", "unpause", "reindex_corpus"], ["dags", "pause", "reindex_nightly"]):
        subprocess.run([*AIRFLOW, *args], env=env, check=True, capture_output=True)
    run_id = f"celery_{int(time.time())}"
    subprocess.run([*AIRFLOW, "dags", "trigger", "reindex_corpus", "--run-id", run_id, "--conf",
                    json.dumps({"corpus": "celery_two", "corpus_uri": str(corpus),
                                "partition_size": PARTITION_SIZE})], env=env, check=True, capture_output=True)
    state = _wait_run(run_id, logs, proc, lines, timeout=300)
    assert state == "success", f"run ended {state}; logs: {_tails(logs)}"

    with connect(store_uri, autocommit=True) as conn:
        dag_store = Store(conn)
        st = corpus_status(dag_store, "celery_two")
        assert st["documents"]["OK"] == DOCS and st["chunks_total"] == DOCS
        assert st["chunks"] == {"READY": DOCS, "PENDING": 0, "FAILED": 0} and st["lease"] is None
        assert (st["last_batch"]["status"], st["last_batch"]["ready"]) == ("COMPLETED", DOCS)

    from airflow import settings
    from airflow.models.taskinstance import TaskInstance

    with settings.Session() as session:
        tis = session.query(TaskInstance).filter(TaskInstance.dag_id == "reindex_corpus",
                                                 TaskInstance.run_id == run_id).all()
    shards = [ti for ti in tis if ti.task_id == "scan_shard"]
    assert len(shards) == 6 and {str(ti.state) for ti in shards} == {"success"}
    assert {ti.hostname for ti in shards} == workers, [(ti.map_index, ti.hostname) for ti in shards]
    from reindex.config import ReindexConfig
    from tests.integration.test_sharded_scan import compare_stores, single_task_run

    reference = single_task_run(store, ReindexConfig(corpus="celery_two", corpus_uri=str(corpus),
                                                     partition_size=PARTITION_SIZE), corpus, "ref", encoder)
    finished = next(ti for ti in tis if ti.task_id == "finish_scan").xcom_pull(task_ids="finish_scan")
    with connect(store_uri, autocommit=True) as conn:
        compare_stores(Store(conn), store, "celery_two", finished, reference)
    encodes = [ti for ti in tis if ti.task_id == "encode_partition"]
    assert len(encodes) == DOCS // PARTITION_SIZE
    assert {str(ti.state) for ti in encodes} == {"success"}
    assert {ti.hostname for ti in encodes} == workers, [(ti.map_index, ti.hostname) for ti in encodes]
    # every task that ran, ran on a Celery worker, on the default queue; only `done` (an EmptyOperator, which the
    # scheduler marks successful itself) has no host
    ran = [ti for ti in tis if str(ti.state) == "success"]
    assert {ti.task_id for ti in ran if not ti.hostname} == {"done"}
    assert {ti.hostname for ti in ran if ti.hostname} == workers and {ti.queue for ti in ran} == {"default"}

    # nothing changed: listings only, no scan task, nothing encoded
    again = f"{run_id}_again"
    subprocess.run([*AIRFLOW, "dags", "trigger", "reindex_corpus", "--run-id", again, "--conf",
                    json.dumps({"corpus": "celery_two", "corpus_uri": str(corpus),
                                "partition_size": PARTITION_SIZE})], env=env, check=True, capture_output=True)
    assert _wait_run(again, logs, proc, lines, timeout=300) == "success", _tails(logs)
    with settings.Session() as session:
        tis = session.query(TaskInstance).filter(TaskInstance.dag_id == "reindex_corpus",
                                                 TaskInstance.run_id == again).all()
    finished = next(ti for ti in tis if ti.task_id == "finish_scan").xcom_pull(task_ids="finish_scan")
    assert (finished["read_files"], finished["unchanged_files"], finished["shards"], finished["pending"]) == \
        (0, 1, 0, 0)
    assert not [ti for ti in tis if ti.task_id == "scan_shard" and str(ti.state) == "success"]

    # SIGTERM: the stack stops its components (scheduling first, then the workers, the api-server last), exits 0
    pids = _pids(ready_line)
    assert set(pids) == {"api-server", "scheduler", "dag-processor", "triggerer", "worker1", "worker2"}
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=90) == 0, "".join(lines)[-3000:]
    assert [name for name, pid in pids.items() if _alive(pid)] == []
    assert not any("SIGKILL" in ln for ln in lines), "".join(lines)[-3000:]
