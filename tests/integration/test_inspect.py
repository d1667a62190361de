"""The operator's-view queries (``reindex.store.inspect``) against a real PostgreSQL + pgvector store.

``build_scenario`` writes a small, fully known history with the core's own functions (scan, claim,
COPY load, failures, summarize, retry claim, lease); the UI plugin's end-to-end test reuses it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import psycopg
import pytest
from psycopg import sql

from reindex.chunking import Chunk, content_sha256
from reindex.corpus import Document, FailedDocument
from reindex.errors import ErrorCode
from reindex.models import ModelSpec
from reindex.retry import RetryPolicy
from reindex.store import Store, batches, inspect, leases
from reindex.store.documents import CorpusWriter
from reindex.store.vectors import ensure_embedding_store, load_vectors, mark_failed

SPEC = ModelSpec("publishers/google/models/text-embedding-005", "r1", 8, True, "vertex")
POLICY = RetryPolicy()  # the defaults, whatever the environment says
JOB = "projects/acme-prod/locations/europe-west4/batchPredictionJobs/123456789"
RESULT_FILE = "gs://reindex-batches/reindex/kb/out/prediction-model-x/predictions_00001.jsonl"


@dataclass(frozen=True)
class Scenario:
    """Ids of what ``build_scenario`` wrote, and the numbers every view must show."""

    full: str = "kb-full0000001"
    retry: str = "kb-retry000001"
    running: str = "news-run000001"
    full_run: str = "manual__2026-11-29T10:00:00+00:00"
    retry_run: str = "manual__2026-11-29T10:05:00+00:00"
    nightly_run: str = "scheduled__2026-11-29T02:00:00+00:00"
    many: str = "kb-many0000001"
    many_failed: int = 250  # RATE_LIMITED 150 (every 5th of them with retry_count 3 = terminal), TRANSIENT 100


def _unit(n: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, SPEC.dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _scan(store: Store, corpus: str, batch_id: str, docs: dict[str, list[str]], failed: list[FailedDocument] = ()):
    with store.conn.transaction():
        w = CorpusWriter(store, corpus, batch_id)
        w.start()
        for doc_id, texts in docs.items():
            chunks = [Chunk(f"{doc_id}#{i}", doc_id, i, t, content_sha256(t), len(t.split()))
                      for i, t in enumerate(texts)]
            w.add_document(Document(doc_id, " ".join(texts), f"file:///corpora/{corpus}/{doc_id}.txt"),
                           content_sha256(" ".join(texts)), chunks)
        for f in failed:
            w.add_failed(f)
        return w.merge()


def _pending(store: Store, batch_id: str) -> list[tuple[int, str, str]]:
    return store.execute(sql.SQL("""SELECT id, chunk_id, content_sha256 FROM {} WHERE batch_id = %s
        AND embedding_status = 'PENDING' ORDER BY id""").format(store.t("chunks")), (batch_id,)).fetchall()


def _load(store: Store, emb, rows) -> None:
    load_vectors(store, emb, [r[0] for r in rows], [r[2] for r in rows], _unit(len(rows), seed=len(rows)))


def _set_started(store: Store, batch_id: str, started: str, finished: str | None) -> None:
    """Fixed times, so durations and the newest-first order are known exactly."""
    store.execute(sql.SQL("UPDATE {} SET started_at = %s, finished_at = %s WHERE batch_id = %s").format(
        store.t("batches")), (started, finished, batch_id))


def build_scenario(store: Store) -> Scenario:
    """Corpus ``kb`` (vertex backend): a full batch of 10 chunks, 6 READY and 4 FAILED (RATE_LIMITED 2 —
    result-line failures that name their file and byte —, TOO_LONG 1, INVALID_INPUT 1), 2 documents
    that failed to read (BAD_DOCUMENT, DECODE_ERROR); then its retry batch, which re-split the
    TOO_LONG chunk in two and loaded all 4 of its chunks: the corpus ends with 11 chunks, 10 READY,
    1 FAILED. Corpus ``news``: a RUNNING full batch of a nightly child run holding the lease.
    A third corpus-``kb`` batch, ``many``, holds 250 FAILED chunks for the paging tests."""
    s = Scenario()
    emb = ensure_embedding_store(store, "kb", SPEC)
    assert leases.try_acquire(store, "kb", s.full, s.full_run) is None
    batches.create_batch(store, s.full, "kb", "vertex", SPEC.checksum, dag_run_id=s.full_run)
    _scan(store, "kb", s.full, {
        "alpha": ["Glaciers carve valleys.", "Ice flows slowly downhill.", "Moraines mark old ice."],
        "beta": ["Bees pollinate apple blossoms.", "Honey stores summer.", "Hives keep warm in winter."],
        "gamma": ["Lighthouses rotate lenses.", "Fog horns warn ships."],
        "delta": ["Sourdough rises with wild yeast.", "A very long chunk that the service refused as too long"],
    }, [FailedDocument("broken", "file:///corpora/kb/broken.jsonl", ErrorCode.BAD_DOCUMENT, "line 3: invalid JSON"),
        FailedDocument("latin1", "file:///corpora/kb/latin1.txt", ErrorCode.DECODE_ERROR, "not UTF-8 at byte 17")])
    claimed = batches.claim_stale_chunks(store, "kb", s.full, emb)
    assert claimed["pending"] == 10
    rows = {r[1]: r for r in _pending(store, s.full)}
    _load(store, emb, [rows[c] for c in ("alpha#0", "alpha#1", "alpha#2", "beta#0", "gamma#0", "delta#0")])
    mark_failed(store, [
        (rows["beta#1"][0], ErrorCode.RATE_LIMITED,
         f"{RESULT_FILE} byte 2048 line 7: 429 Resource exhausted, retry later"),
        (rows["beta#2"][0], ErrorCode.RATE_LIMITED, f"{RESULT_FILE} byte 4096: 429 Quota exceeded for requests"),
        (rows["delta#1"][0], ErrorCode.TOO_LONG, "400 Text too long: 2300 tokens > 2048"),
        (rows["gamma#1"][0], ErrorCode.INVALID_INPUT, "400 invalid input: <script>alert(1)</script>"),
    ])
    batches.update_details(store, s.full, {
        "jobs": [{"name": JOB, "display_name": f"reindex-{s.full}-job0000", "state": "SUCCEEDED",
                  "output_dir": "gs://reindex-batches/reindex/kb/out/prediction-model-x",
                  "completion_stats": {"successful": 8, "failed": 2, "incomplete": 0}, "error": None}],
        "stages": {"ingest": 4.75, "chunk": 1.25, "vertex_wait": 310.5, "zz_custom": 2},
        "usage": {"tokens": 1234, "characters": 5678, "token_source": "service"},
        "cost": {"usd": 0.0125, "unit": "1M_tokens", "priced": True, "saving_usd": 0.0125,
                 "price_source": "test price"},
    })
    summary = batches.summarize_batch(store, s.full, policy=POLICY)
    assert (summary.status.value, summary.total, summary.ready, summary.failed) == ("COMPLETED_WITH_ERRORS", 10, 6, 4)
    _set_started(store, s.full, "2026-11-29 10:00:00+00", "2026-11-29 10:05:30+00")

    assert leases.try_acquire(store, "kb", s.retry, s.retry_run) is None
    batches.create_batch(store, s.retry, "kb", "vertex", SPEC.checksum, kind="retry", parent_batch_id=s.full,
                         dag_run_id=s.retry_run)
    claim = batches.claim_retriable(store, s.full, s.retry, POLICY)
    assert (claim["pending"], claim["terminal"]) == (4, 1)  # 2 rate-limited + the too-long one in 2 pieces
    _load(store, emb, _pending(store, s.retry))
    assert batches.summarize_batch(store, s.retry, policy=POLICY).status.value == "COMPLETED"
    _set_started(store, s.retry, "2026-11-29 10:06:00+00", "2026-11-29 10:07:00+00")

    # A batch with many failures, for keyset paging and the CSV export (chunks inserted directly).
    batches.create_batch(store, s.many, "kb", "vertex", SPEC.checksum, dag_run_id="manual__many")
    store.execute(sql.SQL("""INSERT INTO {chunks} (corpus, chunk_id, doc_id, ordinal, text, content_sha256,
            token_count, embedding_status, retry_count, error_code, error_message, batch_id)
        SELECT 'kb', 'alpha#m' || g, 'alpha', 100 + g, 'text ' || g, encode(sha256(('m' || g)::bytea), 'hex'), 2,
            'FAILED', CASE WHEN g <= 150 AND g %% 5 = 0 THEN 3 ELSE 0 END,
            CASE WHEN g <= 150 THEN 'RATE_LIMITED' ELSE 'TRANSIENT_ENCODER_ERROR' END,
            'failure number ' || g, %s
        FROM generate_series(1, 250) g""").format(chunks=store.t("chunks")), (s.many,))
    batches.mark_batch(store, s.many, batches.BatchStatus.FAILED)
    _set_started(store, s.many, "2026-11-28 09:00:00+00", "2026-11-28 09:00:10+00")

    ensure_embedding_store(store, "news", SPEC)
    nightly_child = f"nightly__{s.nightly_run}__news"
    assert leases.try_acquire(store, "news", s.running, nightly_child) is None
    batches.create_batch(store, s.running, "news", "vertex", SPEC.checksum, dag_run_id=nightly_child)
    _scan(store, "news", s.running, {"n1": ["Markets opened higher.", "Rain is expected."]})
    batches.claim_stale_chunks(store, "news", s.running, ensure_embedding_store(store, "news", SPEC))
    store.execute(sql.SQL("""UPDATE {} SET lease_acquired_at = now() - interval '2 hours',
        lease_heartbeat_at = now() - interval '90 seconds' WHERE corpus = 'news'""").format(store.t("corpora")))
    return s


@pytest.fixture
def scenario(store) -> Scenario:
    return build_scenario(store)


def test_read_only_session_refuses_writes_and_times_out(store_uri, store):
    with psycopg.connect(store_uri, autocommit=True) as conn:
        ro = Store(conn, store.schema)
        inspect.read_only(ro, statement_timeout_ms=200)
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            batches.create_batch(ro, "x", "kb", "local", "c")
        with pytest.raises(psycopg.errors.QueryCanceled):
            ro.execute("SELECT pg_sleep(2)")
    with pytest.raises(ValueError, match="statement_timeout_ms=0 is out of range"):
        inspect.read_only(store, statement_timeout_ms=0)


def test_corpora_overview(store, scenario):
    kb, news = inspect.corpora_overview(store, recent_batches=2)
    assert kb["corpus"] == "kb" and news["corpus"] == "news"
    assert kb["model"] == {"checksum": SPEC.checksum, "model_id": SPEC.model_id, "revision": "r1", "dim": 8,
                           "backend": "vertex", "storage": "vector"}
    # 11 chunks after the retry + 250 of the paging batch
    assert kb["chunks"] == {"READY": 10, "PENDING": 0, "FAILED": 251}
    assert kb["chunks_total"] == 261
    assert kb["failed_by_reason"] == {"RATE_LIMITED": 150, "TRANSIENT_ENCODER_ERROR": 100, "INVALID_INPUT": 1}
    assert list(kb["failed_by_reason"]) == ["RATE_LIMITED", "TRANSIENT_ENCODER_ERROR", "INVALID_INPUT"]
    assert kb["documents"] == {"OK": 4, "FAILED": 2}
    assert kb["failed_documents_by_reason"] == {"BAD_DOCUMENT": 1, "DECODE_ERROR": 1}
    assert [b["batch_id"] for b in kb["recent_batches"]] == [scenario.retry, scenario.full]  # newest first, 2
    last = kb["last_batch"]
    assert (last["batch_id"], last["kind"], last["status"], last["dag_run_id"], last["seconds"]) == (
        scenario.retry, "retry", "COMPLETED", scenario.retry_run, 60.0)
    assert last["started_at"] == "2026-11-29T10:06:00+00:00"
    assert kb["lease"] is None  # released by summarize
    table = kb["vector_table"]
    assert table["name"].startswith("emb_kb_") and table["index"] is None
    (size,) = store.one("SELECT pg_total_relation_size(to_regclass(%s))", (f"{store.schema}.{table['name']}",))
    assert table["bytes"] == size > 0

    assert news["chunks"] == {"READY": 0, "PENDING": 2, "FAILED": 0}
    lease = news["lease"]
    assert (lease["batch_id"], lease["run_id"]) == (scenario.running, f"nightly__{scenario.nightly_run}__news")
    assert 7195 <= lease["held_seconds"] <= 7300 and 85 <= lease["heartbeat_age_seconds"] <= 200
    assert news["last_batch"]["status"] == "RUNNING" and news["last_batch"]["finished_at"] is None


def test_corpus_lease_and_totals(store, scenario):
    assert inspect.corpus_lease(store, "kb") is None
    assert inspect.corpus_lease(store, "nope") is None
    lease = inspect.corpus_lease(store, "news")
    assert (lease["batch_id"], lease["run_id"]) == (scenario.running, f"nightly__{scenario.nightly_run}__news")
    assert inspect.corpus_totals(store, "news") == {"READY": 0, "PENDING": 2, "FAILED": 0, "total": 2}


def test_batches_of_a_run(store, scenario):
    assert inspect.batches_of_run(store, kinds=["full"], run_id=scenario.full_run) == [scenario.full]
    # run ids are unique per DAG only: the retry DAG's run of the same id opens kind 'retry' batches
    assert inspect.batches_of_run(store, kinds=["retry"], run_id=scenario.full_run) == []
    assert inspect.batches_of_run(store, kinds=["retry"], run_id=scenario.retry_run) == [scenario.retry]
    # a nightly run: its children are reindex_corpus runs nightly__<run>__<corpus>
    assert inspect.batches_of_run(store, kinds=["full"], run_id_prefix=f"nightly__{scenario.nightly_run}__") == [
        scenario.running]
    assert inspect.batches_of_run(store, kinds=["full"], run_id_prefix="nightly__scheduled__2026-11-29__") == []
    # LIKE wildcards in a run id are plain characters
    assert inspect.batches_of_run(store, kinds=["full"], run_id_prefix="nightly__%") == []
    with pytest.raises(ValueError, match="run_id_prefix must not be empty"):
        inspect.batches_of_run(store, kinds=["full"], run_id_prefix="")
    assert inspect.batch_kind(store, scenario.retry)[0] == "retry"
    assert inspect.batch_kind(store, "nope") is None


def test_batch_detail(store, scenario):
    d = inspect.batch_detail(store, scenario.full, policy=POLICY)
    assert (d["status"], d["kind"], d["corpus"], d["dag_run_id"], d["parent_batch_id"]) == (
        "COMPLETED_WITH_ERRORS", "full", "kb", scenario.full_run, None)
    assert d["recorded"] == {"total": 10, "ready": 6, "failed": 4, "reused": 0, "encoded": 10,
                             "counts_by_reason": {"RATE_LIMITED": 2, "INVALID_INPUT": 1, "TOO_LONG": 1}}
    # the retry took 3 of the 4 failed chunks over; INVALID_INPUT stays here
    assert d["now"] == {"READY": 6, "PENDING": 0, "FAILED": 1, "failed_by_reason": {"INVALID_INPUT": 1}}
    assert d["retriable"] == 0
    assert d["seconds"] == 330.0 and d["started_at"] == "2026-11-29T10:00:00+00:00"
    (err,) = d["first_errors"]["INVALID_INPUT"]
    assert (err["chunk_id"], err["doc_id"], err["error_message"], err["source"]) == (
        "gamma#1", "gamma", "400 invalid input: <script>alert(1)</script>", None)
    # the RATE_LIMITED chunks now belong to the retry batch; the sample taken at close still names them
    assert "RATE_LIMITED" not in d["first_errors"]
    first = d["recorded_errors"]["RATE_LIMITED"][0]
    assert (first["chunk_id"], first["source"]) == ("beta#1", {"uri": RESULT_FILE, "byte": 2048, "line": 7})
    (job,) = d["jobs"]
    assert (job["state"], job["project"], job["location"], job["job_id"]) == (
        "SUCCEEDED", "acme-prod", "europe-west4", "123456789")
    assert job["console_url"] == ("https://console.cloud.google.com/vertex-ai/locations/europe-west4/"
                                  "batch-predictions/123456789?project=acme-prod")
    assert job["completion_stats"] == {"successful": 8, "failed": 2, "incomplete": 0}
    assert d["usage"]["tokens"] == 1234 and d["usage"]["characters"] == 5678
    assert d["usage"]["cost"]["usd"] == 0.0125
    assert d["stages"] == {"chunk": 1.25, "vertex_wait": 310.5, "ingest": 4.75, "zz_custom": 2.0}
    assert list(d["stages"]) == ["chunk", "vertex_wait", "ingest", "zz_custom"]  # pipeline order, then by name
    assert d["failed_documents"] == {"count": 2, "by_reason": {"BAD_DOCUMENT": 1, "DECODE_ERROR": 1}}
    assert d["model"]["model_id"] == SPEC.model_id

    r = inspect.batch_detail(store, scenario.retry, policy=POLICY)
    assert (r["status"], r["parent_batch_id"]) == ("COMPLETED", scenario.full)
    assert r["recorded"]["total"] == 4 and r["now"]["READY"] == 4 and r["first_errors"] == {}
    assert r["jobs"] == [] and r["stages"] is None  # nothing recorded: the view shows "—"
    assert inspect.batch_detail(store, "nope") is None


def test_first_errors_before_the_retry_name_their_source(store, scenario):
    many = inspect.first_errors(store, scenario.many, per_reason=2)
    assert {k: [e["chunk_id"] for e in v] for k, v in many.items()} == {
        "RATE_LIMITED": ["alpha#m1", "alpha#m2"], "TRANSIENT_ENCODER_ERROR": ["alpha#m151", "alpha#m152"]}
    assert inspect.error_source(f"{RESULT_FILE} byte 2048 line 7: 429 Resource exhausted") == {
        "uri": RESULT_FILE, "byte": 2048, "line": 7}
    assert inspect.error_source(f"{RESULT_FILE} byte 4096: 429 Quota") == {"uri": RESULT_FILE, "byte": 4096,
                                                                            "line": None}
    assert inspect.error_source("400 Text too long") is None
    assert inspect.vertex_console_url("not/a/job") is None


def test_retriable_count_follows_the_policy(store, scenario):
    # 150 RATE_LIMITED: 30 of them at retry_count 3 (exhausted); 100 TRANSIENT_ENCODER_ERROR at 0
    assert inspect.retriable_count(store, scenario.many, POLICY) == 120 + 100
    assert inspect.retriable_count(store, scenario.full, POLICY) == 0


def test_lineage(store, scenario):
    for start in (scenario.full, scenario.retry):
        tree = inspect.lineage(store, start)
        assert [(b["depth"], b["batch_id"], b["status"]) for b in tree] == [
            (0, scenario.full, "COMPLETED_WITH_ERRORS"), (1, scenario.retry, "COMPLETED")]
    root, retry = inspect.lineage(store, scenario.retry)
    assert root["recorded"] == {"total": 10, "ready": 6, "failed": 4}
    assert root["now"] == {"READY": 6, "FAILED": 1, "PENDING": 0}
    assert retry["recorded"] == {"total": 4, "ready": 4, "failed": 0} and retry["parent_batch_id"] == scenario.full
    # the corpus after them: 11 chunks (one re-split piece more), the paging batch's 250 aside
    totals = inspect.corpus_totals(store, "kb")
    assert totals == {"READY": 10, "PENDING": 0, "FAILED": 251, "total": 261}
    assert inspect.lineage(store, "nope") == []


def test_failed_chunks_keyset_pages(store, scenario):
    seen, after, pages = [], 0, 0
    while True:
        page = inspect.failed_chunks(store, scenario.many, after=after, limit=100)
        seen += [r["chunk_id"] for r in page["rows"]]
        pages += 1
        if page["next_after"] is None:
            break
        after = page["next_after"]
    assert pages == 3 and len(seen) == 250 == len(set(seen))
    assert seen[:2] == ["alpha#m1", "alpha#m2"] and seen[-1] == "alpha#m250"

    page = inspect.failed_chunks(store, scenario.many, reason="TRANSIENT_ENCODER_ERROR", limit=60)
    assert len(page["rows"]) == 60 and page["rows"][0]["chunk_id"] == "alpha#m151"
    rest = inspect.failed_chunks(store, scenario.many, reason="TRANSIENT_ENCODER_ERROR", after=page["next_after"],
                                 limit=60)
    assert len(rest["rows"]) == 40 and rest["next_after"] is None
    # exactly a page full: no empty next page
    exact = inspect.failed_chunks(store, scenario.many, reason="RATE_LIMITED", limit=150)
    assert len(exact["rows"]) == 150 and exact["next_after"] is None

    assert sum(len(b) for b in inspect.iter_failed_chunks(store, scenario.many, block_rows=64)) == 250
    assert [len(b) for b in inspect.iter_failed_chunks(store, scenario.many, reason="RATE_LIMITED",
                                                        block_rows=100)] == [100, 50]
    for bad, message in [({"reason": "rate limited"}, "is not an error code"),
                         ({"limit": 0}, "limit=0 is out of range 1–1000"),
                         ({"limit": 1001}, "limit=1001 is out of range"),
                         ({"after": -1}, "after=-1 must be a chunk id")]:
        with pytest.raises(ValueError, match=message):
            inspect.failed_chunks(store, scenario.many, **bad)


def test_failed_documents(store, scenario):
    docs = inspect.failed_documents(store, scenario.full)
    assert docs["count"] == 2 and docs["by_reason"] == {"BAD_DOCUMENT": 1, "DECODE_ERROR": 1}
    assert [(d["doc_id"], d["source_uri"], d["error_code"], d["error_message"]) for d in docs["rows"]] == [
        ("broken", "file:///corpora/kb/broken.jsonl", "BAD_DOCUMENT", "line 3: invalid JSON"),
        ("latin1", "file:///corpora/kb/latin1.txt", "DECODE_ERROR", "not UTF-8 at byte 17")]
    assert inspect.failed_documents(store, scenario.retry)["count"] == 0
