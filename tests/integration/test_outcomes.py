"""Batch outcomes on a real PostgreSQL: lease liveness (a dead holder is taken over and its batch
ABANDONED), the retry chain's lineage and FAILED share, failed documents in the summary, and the
branch the DAG takes from a summary."""

from __future__ import annotations

import pytest
from psycopg import sql

from reindex.corpus import FailedDocument
from reindex.errors import ErrorCode
from reindex.store import batches, leases
from reindex.store.documents import CorpusWriter, ensure_corpus
from reindex.store.vectors import ensure_embedding_store, load_vectors, mark_failed
from tests.integration.test_store import SPEC, _chunks, _scan, _unit


@pytest.fixture
def emb(store):
    with store.conn.transaction():
        return ensure_embedding_store(store, "kb", SPEC)


def _open_batch(store, corpus: str, batch_id: str, emb, docs: dict[str, list[str]], **kw) -> None:
    _scan(store, corpus, batch_id, docs)
    with store.conn.transaction():
        batches.create_batch(store, batch_id, corpus, "local", SPEC.checksum, **kw)
        batches.claim_stale_chunks(store, corpus, batch_id, emb)


def _status(store, batch_id: str) -> str:
    return store.one(sql.SQL("SELECT status FROM {} WHERE batch_id = %s").format(store.t("batches")), (batch_id,))[0]


def test_a_dead_holder_run_is_taken_over_and_its_batch_abandoned(store, emb):
    _open_batch(store, "kb", "dead", emb, {"d1": ["one", "two", "three"]}, dag_run_id="manual__1", dag_id="reindex_corpus")
    assert leases.try_acquire(store, "kb", "dead", "manual__1", dag_id="reindex_corpus") is None
    pks = [r[4] for r in _chunks(store, "kb")]
    load_vectors(store, emb, pks[:1], [r[3] for r in _chunks(store, "kb")][:1], _unit(1))  # one chunk made it

    asked = []

    def alive(holder):
        asked.append((holder.dag_id, holder.run_id))
        return True

    holder = leases.try_acquire(store, "kb", "next", "manual__2", dag_id="reindex_corpus", holder_alive=alive)
    assert holder is not None and holder.batch_id == "dead" and asked == [("reindex_corpus", "manual__1")]
    assert _status(store, "dead") == "RUNNING"

    assert leases.try_acquire(store, "kb", "next", "manual__2", dag_id="reindex_corpus",
                              holder_alive=lambda h: False) is None
    lease = leases.get_lease(store, "kb")
    assert (lease.batch_id, lease.run_id, lease.dag_id) == ("next", "manual__2", "reindex_corpus")
    assert _status(store, "dead") == "ABANDONED"
    states = sorted((r[1], r[2]) for r in _chunks(store, "kb"))
    assert states == [("FAILED", "ABANDONED"), ("FAILED", "ABANDONED"), ("READY", None)]
    (message,) = store.one(sql.SQL("SELECT details->>'message' FROM {} WHERE batch_id = 'dead'").format(
        store.t("batches")))
    assert message == "abandoned (its DAG run is no longer running); 2 unfinished chunk(s) left for the next run"

    # the next run claims the abandoned chunks again: ABANDONED is retriable, not a content failure
    with store.conn.transaction():
        batches.create_batch(store, "next", "kb", "local", SPEC.checksum)
        claim = batches.claim_stale_chunks(store, "kb", "next", emb)
    assert (claim["pending"], claim["reused"]) == (2, 1)


def test_an_unknown_holder_state_falls_back_to_the_heartbeat(store):
    ensure_corpus(store, "kb")
    assert leases.try_acquire(store, "kb", "old", "cli-run") is None  # no DAG id: its state cannot be asked
    assert leases.try_acquire(store, "kb", "new", "r2", holder_alive=lambda h: None, ttl_seconds=3600) is not None
    store.execute(sql.SQL("UPDATE {} SET lease_heartbeat_at = now() - interval '2 hours'").format(store.t("corpora")))
    assert leases.try_acquire(store, "kb", "new", "r2", holder_alive=lambda h: None, ttl_seconds=3600) is None
    assert leases.get_lease(store, "kb").batch_id == "new"


def test_a_holder_whose_batch_never_existed_is_freed_when_its_run_ended(store):
    """A run that died between taking the corpus and opening its batch (e.g. a refused model) leaves no trap."""
    ensure_corpus(store, "kb")
    assert leases.try_acquire(store, "kb", "never-opened", "manual__up", dag_id="reindex_model_upgrade") is None
    assert leases.try_acquire(store, "kb", "mine", "manual__3", dag_id="reindex_corpus",
                              holder_alive=lambda h: h.run_id != "manual__up") is None
    assert leases.get_lease(store, "kb").batch_id == "mine"


def test_the_busy_message_says_who_holds_it_and_how_to_free_it(store):
    ensure_corpus(store, "kb")
    leases.try_acquire(store, "kb", "b1", "manual__x", dag_id="reindex_corpus")
    holder = leases.get_lease(store, "kb")
    msg = leases.busy_message("kb", holder, 61)
    assert msg.startswith("corpus 'kb' is busy after waiting 61 s: run reindex_corpus/manual__x (batch b1) has held "
                          "it since ")
    assert "last heartbeat" in msg and "`python -m reindex unlock --corpus kb`" in msg


def test_lineage_counts_what_is_left_failed_of_the_chain(store, emb):
    _open_batch(store, "kb", "b1", emb, {"d1": [f"text {i}" for i in range(10)]})
    rows = _chunks(store, "kb")
    pks, shas = [r[4] for r in rows], [r[3] for r in rows]
    load_vectors(store, emb, pks[:6], shas[:6], _unit(6))
    mark_failed(store, [(pk, ErrorCode.RATE_LIMITED, "429") for pk in pks[6:9]]
                + [(pks[9], ErrorCode.INVALID_INPUT, "bad request")])
    with store.conn.transaction():
        first = batches.summarize_batch(store, "b1")
    assert (first.status.value, first.ready, first.failed, first.retriable) == ("COMPLETED_WITH_ERRORS", 6, 4, 3)
    assert (first.root_batch_id, first.lineage_total, first.lineage_failed) == ("b1", 10, 4)

    with store.conn.transaction():
        batches.create_batch(store, "r1", "kb", "local", SPEC.checksum, kind="retry", parent_batch_id="b1")
        assert batches.claim_retriable(store, "b1", "r1")["pending"] == 3
    load_vectors(store, emb, pks[6:8], shas[6:8], _unit(2, seed=1))
    mark_failed(store, [(pks[8], ErrorCode.RATE_LIMITED, "429 again")])
    with store.conn.transaction():
        retry = batches.summarize_batch(store, "r1")
    assert (retry.status.value, retry.ready, retry.failed, retry.retriable) == ("COMPLETED_WITH_ERRORS", 2, 1, 1)
    assert (retry.root_batch_id, retry.lineage_total, retry.lineage_failed) == ("b1", 10, 2)
    assert retry.lineage_failed_ratio == pytest.approx(0.2)
    assert batches.lineage(store, "r1") == batches.lineage(store, "b1") == ["b1", "r1"]


def test_a_batch_where_everything_failed_retriably_is_retried(store, emb):
    """100 % retriable failures: FAILED, but the policy still retries them — the branch is trigger_retry."""
    from reindex_airflow.tasks import choose_branch

    _open_batch(store, "kb", "b1", emb, {"d1": ["a", "b", "c"]})
    mark_failed(store, [(r[4], ErrorCode.RATE_LIMITED, "429") for r in _chunks(store, "kb")])
    with store.conn.transaction():
        s = batches.summarize_batch(store, "b1")
    assert (s.status.value, s.retriable) == ("FAILED", 3)
    assert choose_branch({**s.to_dict(), "max_failed_ratio": 0.01}) == "trigger_retry"


def test_failed_documents_are_in_the_summary(store, emb):
    _scan(store, "kb", "b1", {"d1": ["good text"]})
    with store.conn.transaction():
        w = CorpusWriter(store, "kb", "b2")
        w.start()
        w.add_document(*_doc("d1"))
        w.add_failed(FailedDocument("bad.bin", "/corpus/bad.bin", ErrorCode.DECODE_ERROR, "bad.bin: not valid UTF-8"))
        w.add_failed(FailedDocument("loop.txt", "/corpus/loop.txt", ErrorCode.UNREADABLE, "loop.txt: symlink loop"))
        w.merge()
        batches.create_batch(store, "b2", "kb", "local", SPEC.checksum)
        batches.claim_stale_chunks(store, "kb", "b2", emb)
    rows = _chunks(store, "kb")
    load_vectors(store, emb, [r[4] for r in rows], [r[3] for r in rows], _unit(len(rows)))
    with store.conn.transaction():
        s = batches.summarize_batch(store, "b2")
    # every chunk READY, but two documents could not be read: not plain success
    assert (s.status.value, s.ready, s.failed_documents) == ("COMPLETED_WITH_ERRORS", 1, 2)
    assert s.documents_by_reason == {"DECODE_ERROR": 1, "UNREADABLE": 1}
    assert [d["doc_id"] for d in s.document_samples] == ["bad.bin", "loop.txt"]
    assert s.message.endswith("; 2 document(s) failed {'DECODE_ERROR': 1, 'UNREADABLE': 1}")


def test_documents_under_an_unreadable_folder_keep_their_vectors(store, emb):
    """A folder unreadable for one scan is not a deletion: its documents keep their chunks and vectors."""
    _scan(store, "kb", "b1", {"sub/a.txt": ["alpha"], "sub/b.txt": ["beta"], "top.txt": ["top"]})
    with store.conn.transaction():
        w = CorpusWriter(store, "kb", "b2")
        w.start()
        w.add_document(*_doc("top.txt"))
        w.add_failed(FailedDocument("sub/", "/corpus/sub", ErrorCode.UNREADABLE,
                                    "sub/: folder not readable (permission denied); nothing under it was read"))
        merged = w.merge()
    assert merged.deleted_documents == 0
    docs = dict(store.execute(sql.SQL("SELECT doc_id, status FROM {} WHERE corpus = 'kb'").format(
        store.t("documents"))).fetchall())
    assert docs == {"sub/a.txt": "OK", "sub/b.txt": "OK", "top.txt": "OK", "sub/": "FAILED"}
    assert sorted(r[0] for r in _chunks(store, "kb")) == ["sub/a.txt#0", "sub/b.txt#0", "top.txt#0"]


def _doc(doc_id: str):
    from reindex.chunking import Chunk, content_sha256
    from reindex.corpus import Document

    text = "good text"
    return (Document(doc_id, text, f"mem://{doc_id}"), content_sha256(text),
            [Chunk(f"{doc_id}#0", doc_id, 0, text, content_sha256(text), 2)])


@pytest.mark.parametrize(("summary", "branch"), [
    ({"status": "COMPLETED", "retriable": 0}, "done"),
    ({"status": "COMPLETED_WITH_ERRORS", "retriable": 2}, "trigger_retry"),
    ({"status": "FAILED", "retriable": 5}, "trigger_retry"),
    ({"status": "COMPLETED_WITH_ERRORS", "retriable": 0, "lineage_failed_ratio": 0.005}, "done"),
    ({"status": "COMPLETED_WITH_ERRORS", "retriable": 0, "lineage_failed_ratio": 0.02}, "fail_batch"),
    ({"status": "FAILED", "retriable": 0, "lineage_failed_ratio": 1.0}, "fail_batch"),
])
def test_the_branch_follows_the_retry_policy_then_max_failed_ratio(summary, branch):
    from reindex_airflow.tasks import choose_branch

    assert choose_branch({**summary, "max_failed_ratio": 0.01}) == branch


def test_the_sql_that_keeps_content_failures_agrees_with_the_retry_policy(store, emb):
    """claim_stale_chunks keeps a chunk FAILED across runs exactly when the policy (Python) says its content
    failure is spent: every code × retry_count 0..4, checked against ``decide``."""
    from reindex.retry import CONTENT_CODES, decide

    cases = [(code, n) for code in ErrorCode for n in range(5)]
    _scan(store, "kb", "b0", {"d": [f"text {i}" for i in range(len(cases))]})
    rows = sorted(_chunks(store, "kb"), key=lambda r: int(r[0].split("#")[1]))
    for (code, n), row in zip(cases, rows, strict=True):
        store.execute(sql.SQL("""UPDATE {} SET embedding_status = 'FAILED', error_code = %s, retry_count = %s
            WHERE id = %s""").format(store.t("chunks")), (code.value, n, row[4]))
    with store.conn.transaction():
        batches.create_batch(store, "b1", "kb", "local", SPEC.checksum)
        batches.claim_stale_chunks(store, "kb", "b1", emb)
    kept = {r[0] for r in _chunks(store, "kb") if r[1] == "FAILED"}
    expected = {row[0] for (code, n), row in zip(cases, rows, strict=True)
                if code in CONTENT_CODES and not decide(code.value, n).retriable}
    assert kept == expected and len(expected) == 4 * 5 - 2  # TOO_LONG and INVALID_CHARACTERS get one more try
