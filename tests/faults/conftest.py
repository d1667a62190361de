"""The fault suite's invariant checker, its child-process harness and DAG helpers.

``check_invariants`` is asserted after every fault (and, with ``final=False``, at the moment of the
fault): whatever happened, the store must say the truth about every document and chunk.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from psycopg import sql

from tests.conftest import ROOT


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "faults: the fault suite (tests/faults): one injected failure per test, exact counts and invariants")


# --- waiting on conditions ------------------------------------------------------------------------------


def wait_until(condition: Callable[[], Any], *, what: str, timeout: float = 60.0, interval: float = 0.05) -> Any:
    """Poll ``condition`` until it returns something truthy (returned); ``AssertionError`` naming ``what``
    after ``timeout`` seconds. The timeout only bounds a broken run: no test relies on timing."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


# --- the invariants ---------------------------------------------------------------------------------------


def _rows(store, query: sql.Composable, params: tuple = ()) -> list[tuple]:
    return store.execute(query, params).fetchall()


def check_invariants(store, corpus: str, *, good_docs: Iterable[str] = (), final: bool = True) -> dict:
    """Assert the store's invariants for ``corpus`` and return its counts.

    Always (also at the moment of a fault, ``final=False``):

    - each document has one row; each of ``good_docs`` is OK with all its chunks READY (at least
      ``chunk_count`` of them);
    - every READY chunk has its vector — a row in the corpus's active vector table carrying the chunk's
      current content hash — and the table has no duplicate ``chunk_pk``;
    - every FAILED document and chunk has an ``error_code`` and an ``error_message``; READY chunks and OK
      documents have none.

    ``final=True`` (after the run, its retries and its retry runs): the vector table holds exactly one
    row per READY chunk (``count(*)`` = READY: no vector of a chunk that is not READY, none stale), no
    chunk is PENDING, no batch of the corpus is RUNNING, and the corpus's lease is free.

    Returns ``{"documents": {"OK", "FAILED"}, "failed_documents": {reason: n}, "chunks": {"READY",
    "PENDING", "FAILED"}, "failed_chunks": {reason: n}, "vectors": n}``.
    """
    from reindex.store.leases import get_lease
    from reindex.store.vectors import get_embedding_store

    t = store.t
    problems: list[str] = []

    docs = _rows(store, sql.SQL("""SELECT d.doc_id, d.status, d.error_code, d.error_message, d.chunk_count,
            count(c.id), count(c.id) FILTER (WHERE c.embedding_status = 'READY')
        FROM {documents} d LEFT JOIN {chunks} c ON c.corpus = d.corpus AND c.doc_id = d.doc_id
        WHERE d.corpus = %s GROUP BY 1, 2, 3, 4, 5""").format(documents=t("documents"), chunks=t("chunks")), (corpus,))
    by_id = {r[0]: r for r in docs}
    if len(by_id) != len(docs):
        problems.append("a document has more than one row")
    for doc_id in good_docs:
        row = by_id.get(doc_id)
        if row is None:
            problems.append(f"good document {doc_id!r} has no row")
            continue
        _, status, _, _, chunk_count, n_chunks, n_ready = row
        if status != "OK" or chunk_count < 1 or n_chunks < chunk_count or n_ready != n_chunks:
            problems.append(f"good document {doc_id!r}: status {status}, chunk_count {chunk_count}, "
                            f"{n_chunks} chunk rows, {n_ready} READY")
    for doc_id, status, code, message, *_ in docs:
        if status == "FAILED" and not (code and message):
            problems.append(f"FAILED document {doc_id!r} without a reason: {code!r} {message!r}")
        if status == "OK" and (code or message):
            problems.append(f"OK document {doc_id!r} carries an error: {code!r} {message!r}")

    chunks = dict(_rows(store, sql.SQL("""SELECT embedding_status, count(*) FROM {} WHERE corpus = %s
        GROUP BY 1""").format(t("chunks")), (corpus,)))
    counts = {s: chunks.get(s, 0) for s in ("READY", "PENDING", "FAILED")}
    for chunk_id, status, code, message in _rows(store, sql.SQL("""SELECT chunk_id, embedding_status, error_code,
            error_message FROM {} WHERE corpus = %s AND ((embedding_status = 'FAILED'
                AND (error_code IS NULL OR error_message IS NULL))
            OR (embedding_status = 'READY' AND (error_code IS NOT NULL OR error_message IS NOT NULL)))
        ORDER BY id LIMIT 5""").format(t("chunks")), (corpus,)):
        problems.append(f"{status} chunk {chunk_id!r} with error {code!r} {message!r}")

    vectors = 0
    (active,) = store.one(sql.SQL("SELECT active_model_checksum FROM {} WHERE corpus = %s").format(t("corpora")),
                          (corpus,)) or (None,)
    if active is None and counts["READY"]:
        problems.append(f"{counts['READY']} READY chunk(s) but the corpus has no active vector store")
    if active is not None:
        emb = get_embedding_store(store, corpus)
        e = t(emb.table_name)
        vectors, distinct = store.one(sql.SQL("SELECT count(*), count(DISTINCT chunk_pk) FROM {}").format(e))
        if vectors != distinct:
            problems.append(f"{emb.table_name}: {vectors} rows for {distinct} chunks (duplicates)")
        no_vector = [r[0] for r in _rows(store, sql.SQL("""SELECT c.chunk_id FROM {chunks} c WHERE c.corpus = %s
            AND c.embedding_status = 'READY' AND NOT EXISTS (SELECT 1 FROM {e} v WHERE v.chunk_pk = c.id
                AND v.content_sha256 = c.content_sha256) ORDER BY c.id LIMIT 5""").format(chunks=t("chunks"), e=e),
            (corpus,))]
        if no_vector:
            problems.append(f"READY chunk(s) without their current vector: {no_vector}")
        if final and vectors != counts["READY"]:
            stray = _rows(store, sql.SQL("""SELECT c.chunk_id, c.embedding_status, c.error_code,
                    v.content_sha256 = c.content_sha256 FROM {e} v JOIN {chunks} c ON c.id = v.chunk_pk
                WHERE c.embedding_status <> 'READY' OR v.content_sha256 <> c.content_sha256
                ORDER BY c.id LIMIT 5""").format(chunks=t("chunks"), e=e))
            problems.append(f"{emb.table_name} has {vectors} rows for {counts['READY']} READY chunks; rows of chunks "
                            f"that are not READY or stale (chunk, status, code, current hash?): {stray}")

    if final:
        if counts["PENDING"]:
            problems.append(f"{counts['PENDING']} chunk(s) still PENDING after the run")
        running = [r[0] for r in _rows(store, sql.SQL("""SELECT batch_id FROM {} WHERE corpus = %s
            AND status = 'RUNNING'""").format(t("batches")), (corpus,))]
        if running:
            problems.append(f"batch(es) still RUNNING: {running}")
        lease = get_lease(store, corpus)
        if not lease.free:
            problems.append(f"the lease is still held by batch {lease.batch_id} (run {lease.run_id})")

    assert not problems, f"invariants of corpus {corpus!r} broken:\n- " + "\n- ".join(problems)
    ok_docs = sum(1 for r in docs if r[1] == "OK")
    return {
        "documents": {"OK": ok_docs, "FAILED": len(docs) - ok_docs},
        "failed_documents": dict(_rows(store, sql.SQL("""SELECT error_code, count(*) FROM {} WHERE corpus = %s
            AND status = 'FAILED' GROUP BY 1 ORDER BY 1""").format(t("documents")), (corpus,))),
        "chunks": counts,
        "failed_chunks": dict(_rows(store, sql.SQL("""SELECT error_code, count(*) FROM {} WHERE corpus = %s
            AND embedding_status = 'FAILED' GROUP BY 1 ORDER BY 1""").format(t("chunks")), (corpus,))),
        "vectors": vectors,
    }


def batch_row(store, batch_id: str) -> dict:
    from reindex.store.batches import get_batch

    row = get_batch(store, batch_id)
    assert row is not None, f"no batch {batch_id}"
    return row


# --- a child process running stage code, killed with SIGKILL ---------------------------------------------


@dataclass
class Child:
    """A child process running ``tests.faults.killable``; ``marker`` appears when it reaches its hang point."""

    proc: subprocess.Popen
    marker: Path
    app: str
    log: Path

    def stderr(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")[-4000:]

    def wait_reached(self, timeout: float = 120.0) -> None:
        """Wait until the child hangs at its hang point (inside its open transaction)."""

        def reached() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"child {self.app} exited ({self.proc.returncode}) before its hang point:\n"
                                     f"{self.stderr()}")
            return self.marker.exists()

        wait_until(reached, what=f"child {self.app} to reach its hang point", timeout=timeout)

    def kill(self, store) -> None:
        """SIGKILL, then wait until the server has ended the child's session: its open transaction is rolled
        back before the test looks."""
        os.kill(self.proc.pid, signal.SIGKILL)
        assert self.proc.wait(timeout=30) == -signal.SIGKILL
        wait_until(lambda: store.one("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                                     (self.app,))[0] == 0,
                   what=f"the server to end the killed child's session ({self.app})", timeout=30)


def start_child(tmp_path: Path, *, dsn: str, schema: str, app: str, **args: Any) -> Child:
    """Run ``tests.faults.killable`` with ``args`` (see its docstring) in a child process; ``app`` is its
    connection's ``application_name``."""
    marker = tmp_path / f"{app}.reached"
    log = tmp_path / f"{app}.stderr"
    payload = {"dsn": dsn, "schema": schema, "app": app, "marker": str(marker), **args}
    with log.open("wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "tests.faults.killable", json.dumps(payload)], cwd=ROOT,
                                env=os.environ.copy(), stdout=subprocess.DEVNULL, stderr=err)
    return Child(proc, marker, app, log)


@pytest.fixture
def spawn(tmp_path):
    """``spawn(dsn=..., schema=..., app=..., **args)`` starts a child (``start_child``); any still alive at
    teardown (after a failed assertion) is killed."""
    started: list[Child] = []

    def start(**kwargs: Any) -> Child:
        child = start_child(tmp_path, **kwargs)
        started.append(child)
        return child

    yield start
    for child in started:
        if child.proc.poll() is None:
            child.proc.kill()
            child.proc.wait()


# --- DAG runs ---------------------------------------------------------------------------------------------


def ti_states(dr) -> dict[str, str]:
    """task id → state; a mapped task shows the sorted states of its instances joined by ','."""
    out: dict[str, list[str]] = {}
    for ti in dr.get_task_instances():
        out.setdefault(ti.task_id, []).append(str(ti.state))
    return {k: ",".join(sorted(v)) for k, v in out.items()}


CORPUS_DEFAULTS: dict[str, Any] = {
    "backend": "local", "model": "", "output_dimensionality": None, "max_tokens": 200, "overlap_tokens": 32,
    "partition_size": 2000, "encode_batch_size": 64, "index_type": "hnsw", "storage": "vector",
    "ivfflat_lists": None, "force": False, "on_busy": "fail", "busy_wait_seconds": 3600, "max_failed_ratio": 0.01,
    "service_conn_id": None, "encoder": "torch",
}

VERTEX = {"backend": "vertex", "model": "text-embedding-005", "output_dimensionality": 768}


@dataclass
class CorpusDag:
    """``reindex_corpus`` run with every Param given (``CORPUS_DEFAULTS`` plus the test's values)."""

    dag: Any

    def conf(self, **values: Any) -> dict:
        out = {**CORPUS_DEFAULTS, **values}
        assert set(out) == set(self.dag.params), f"pass every param: {sorted(set(self.dag.params) ^ set(out))}"
        return out

    def test(self, **values: Any):
        return self.dag.test(run_conf=self.conf(**values))


@pytest.fixture
def corpus_dag(dagbag):
    """reindex_corpus, its Params restored afterwards: dag.test() writes a run's conf into the Param objects of
    the session's DAG, so a value a test left out would carry over from an earlier test."""
    dag = dagbag.get_dag("reindex_corpus")
    holders = [dag.params, *(t.params for t in dag.tasks)]
    saved = [h.dump() for h in holders]
    yield CorpusDag(dag)
    for holder, values in zip(holders, saved, strict=True):
        for key, value in values.items():
            holder[key] = value


def triggered_retry_conf(parent: str) -> dict:
    """The conf of the one reindex_retry run that ``trigger_retry`` created for batch ``parent``."""
    from airflow import settings
    from airflow.models.dagrun import DagRun

    with settings.Session() as session:
        confs = [r.conf for r in session.query(DagRun).filter(DagRun.dag_id == "reindex_retry").all()
                 if (r.conf or {}).get("batch_id") == parent]
    assert len(confs) == 1, f"expected one reindex_retry run for {parent}, got {confs}"
    return confs[0]


def last_batch(store, corpus: str) -> dict:
    from reindex.store.search import corpus_status

    return corpus_status(store, corpus)["last_batch"]
