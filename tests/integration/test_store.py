"""The store against a real embedded PostgreSQL 18 + pgvector: schema, merge, COPY load, index, search."""

from __future__ import annotations

import numpy as np
import pytest
from psycopg import sql

from reindex.chunking import Chunk, content_sha256
from reindex.config import IndexType
from reindex.corpus import Document
from reindex.errors import ErrorCode, StoreError
from reindex.models import ModelSpec
from reindex.store import batches
from reindex.store.documents import CorpusWriter
from reindex.store.schema import MIGRATIONS, ensure_schema, primary_key, schema_version
from reindex.store.search import corpus_status, search
from reindex.store.vectors import build_index, ensure_embedding_store, load_vectors, mark_failed

SPEC = ModelSpec("test/model", "r1", 8, True, "local")


def _unit(n, dim=8, seed=0):
    v = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _scan(store, corpus, batch_id, docs: dict[str, list[str]]):
    """Write one scan: ``docs`` maps doc id → chunk texts."""
    with store.conn.transaction():
        w = CorpusWriter(store, corpus, batch_id)
        w.start()
        for doc_id, texts in docs.items():
            chunks = [Chunk(f"{doc_id}#{i}", doc_id, i, t, content_sha256(t), len(t.split())) for i, t in enumerate(texts)]
            w.add_document(Document(doc_id, " ".join(texts), f"mem://{doc_id}"), content_sha256(" ".join(texts)), chunks)
        return w.merge()


def _chunks(store, corpus):
    return store.execute(sql.SQL("""SELECT chunk_id, embedding_status, error_code, content_sha256, id
        FROM {} WHERE corpus = %s ORDER BY chunk_id""").format(store.t("chunks")), (corpus,)).fetchall()


@pytest.fixture
def emb(store):
    with store.conn.transaction():
        return ensure_embedding_store(store, "kb", SPEC)


def test_schema_is_idempotent(store):
    assert ensure_schema(store) == []  # the fixture already migrated
    assert schema_version(store) == MIGRATIONS[-1][0]
    tables = {r[0] for r in store.execute("SELECT tablename FROM pg_tables WHERE schemaname = %s", (store.schema,))}
    assert {"documents", "chunks", "batches", "models", "corpora", "embedding_stores", "schema_migrations"} <= tables
    (ext,) = store.one("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
    assert ext.startswith("0.8")


def _claim_plan(store, table, corpus):
    """The plan of the claim's anti-join with sequential scans ruled out (the tables are tiny)."""
    with store.conn.transaction():
        store.execute("SET LOCAL enable_seqscan = off")
        store.execute("SET LOCAL enable_bitmapscan = off")
        return "\n".join(r[0] for r in store.execute(sql.SQL("""EXPLAIN SELECT c.id FROM {chunks} c
            WHERE c.corpus = %s AND NOT EXISTS (SELECT 1 FROM {emb} e WHERE e.chunk_pk = c.id
                AND e.content_sha256 = c.content_sha256)""").format(chunks=store.t("chunks"), emb=store.t(table)),
            (corpus,)).fetchall())


def test_claim_anti_join_reads_indexes_only_and_old_vector_tables_are_migrated(store, emb):
    """Migration 8: the vector table's primary key covers the content hash and chunks have (corpus, id)
    covering theirs, so "which chunks lack a current vector" is answered from two indexes; a vector table made
    before keeps its rows and upserts through the migrated key."""
    from reindex.store.schema import _v8

    _scan(store, "kb", "b1", {"d1": ["alpha", "beta"], "d2": ["gamma"]})
    rows = _chunks(store, "kb")
    pks, shas = [r[4] for r in rows], [r[3] for r in rows]
    assert load_vectors(store, emb, pks, shas, _unit(3)) == 3
    name, keys, atts = primary_key(store, emb.table_name)
    assert (keys, atts) == (1, 2)  # chunk_pk, INCLUDE content_sha256
    for table in (emb.table_name, "chunks"):
        store.execute(sql.SQL("VACUUM (ANALYZE) {}").format(store.t(table)))
    plan = _claim_plan(store, emb.table_name, "kb")
    assert plan.count("Index Only Scan") == 2 and "chunks_corpus_id_idx" in plan and name in plan, plan
    # a vector table from before migration 8: a plain primary key; the migration rebuilds it, rows kept
    with store.conn.transaction():
        store.execute(sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}, ADD CONSTRAINT {} PRIMARY KEY (chunk_pk)").format(
            store.t(emb.table_name), sql.Identifier(name), sql.Identifier(name)))
    assert primary_key(store, emb.table_name)[1:] == (1, 1)
    with store.conn.transaction():
        _v8(store)
        _v8(store)  # idempotent
    assert primary_key(store, emb.table_name) == (name, 1, 2)
    assert load_vectors(store, emb, pks, shas, _unit(3, seed=4)) == 3  # ON CONFLICT (chunk_pk) through the new key
    (count,) = store.one(sql.SQL("SELECT count(*) FROM {}").format(store.t(emb.table_name)))
    assert count == 3


def test_copy_load_is_an_idempotent_upsert(store, emb):
    _scan(store, "kb", "b1", {"d1": ["alpha", "beta", "gamma"], "d2": ["delta"]})
    rows = _chunks(store, "kb")
    pks, shas = [r[4] for r in rows], [r[3] for r in rows]
    vecs = _unit(4)
    assert load_vectors(store, emb, pks, shas, vecs) == 4
    assert load_vectors(store, emb, pks, shas, vecs) == 4  # same batch again
    stored = store.execute(sql.SQL("SELECT chunk_pk, embedding FROM {} ORDER BY chunk_pk").format(
        store.t(emb.table_name))).fetchall()
    assert len(stored) == 4  # no duplicates
    got = np.array([np.array(str(v).strip("[]").split(","), dtype=np.float32) for _, v in stored])
    np.testing.assert_allclose(got, vecs, rtol=1e-6)
    assert {r[1] for r in _chunks(store, "kb")} == {"READY"}
    # replace semantics: a new vector for the same chunk replaces the old one
    load_vectors(store, emb, pks[:1], shas[:1], _unit(1, seed=9))
    (count,) = store.one(sql.SQL("SELECT count(*) FROM {}").format(store.t(emb.table_name)))
    assert count == 4


def test_vector_for_a_changed_chunk_is_refused(store, emb):
    _scan(store, "kb", "b1", {"d1": ["alpha"]})
    (_, _, _, sha, pk), = _chunks(store, "kb")
    assert load_vectors(store, emb, [pk], ["0" * 64], _unit(1)) == 0
    assert _chunks(store, "kb")[0][1] == "PENDING"


def test_wrong_dimension_is_a_clear_error(store, emb):
    _scan(store, "kb", "b1", {"d1": ["alpha"]})
    (_, _, _, sha, pk), = _chunks(store, "kb")
    with pytest.raises(StoreError, match=r"do not fit .* \(dimension 8\)"):
        load_vectors(store, emb, [pk], [sha], _unit(1, dim=4))


def test_failures_are_recorded_per_chunk(store, emb):
    _scan(store, "kb", "b1", {"d1": ["alpha", "beta"]})
    rows = _chunks(store, "kb")
    mark_failed(store, [(rows[0][4], ErrorCode.TOO_LONG, "too long: 3000 tokens > 2048")])
    got = {r[0]: (r[1], r[2]) for r in _chunks(store, "kb")}
    assert got == {"d1#0": ("FAILED", "TOO_LONG"), "d1#1": ("PENDING", None)}


def test_merge_marks_changed_and_removes_deleted(store, emb):
    first = _scan(store, "kb", "b1", {"d1": ["alpha", "beta"], "d2": ["gamma"], "d3": ["delta"]})
    assert (first.documents, first.chunks, first.changed_chunks) == (3, 4, 4)
    rows = _chunks(store, "kb")
    load_vectors(store, emb, [r[4] for r in rows], [r[3] for r in rows], _unit(4))
    # d1's second chunk changes, d2 is deleted, d3 unchanged, d4 new
    second = _scan(store, "kb", "b2", {"d1": ["alpha", "BETA"], "d3": ["delta"], "d4": ["eps"]})
    assert (second.changed_chunks, second.deleted_documents) == (2, 1)
    got = {r[0]: r[1] for r in _chunks(store, "kb")}
    assert got == {"d1#0": "READY", "d1#1": "PENDING", "d3#0": "READY", "d4#0": "PENDING"}
    (nvec,) = store.one(sql.SQL("SELECT count(*) FROM {}").format(store.t(emb.table_name)))
    assert nvec == 3  # d2's vector went with its chunk (ON DELETE CASCADE)
    with store.conn.transaction():
        batches.create_batch(store, "b2", "kb", "local", SPEC.checksum)
        claim = batches.claim_stale_chunks(store, "kb", "b2", emb)
    assert claim == {"pending": 2, "reused": 2, "reused_by_content": 0, "converted": 0, "kept_failed": 0}  # d1#1 stale, d4#0 none


def test_partitions_cover_the_batch_and_are_capped(store, emb):
    _scan(store, "kb", "b1", {f"d{i}": [f"text {i}"] for i in range(1000)})
    with store.conn.transaction():
        batches.create_batch(store, "b1", "kb", "local", SPEC.checksum)
        batches.claim_stale_chunks(store, "kb", "b1", emb)
    parts = batches.plan_partitions(store, "b1", partition_size=100)
    assert [p.count for p in parts] == [100] * 10
    assert parts[0].lo < parts[0].hi < parts[1].lo
    capped = batches.plan_partitions(store, "b1", partition_size=100, max_partitions=4)
    assert len(capped) == 4 and sum(p.count for p in capped) == 1000
    seen = [pk for p in parts for block in batches.iter_partition_chunks(store, p, 33) for pk, _, _ in block]
    assert len(seen) == len(set(seen)) == 1000


def test_summary_index_status_and_search(store, emb):
    _scan(store, "kb", "b1", {"d1": ["alpha", "beta", "gamma"], "d2": ["delta"]})
    with store.conn.transaction():
        batches.create_batch(store, "b1", "kb", "local", SPEC.checksum)
        batches.claim_stale_chunks(store, "kb", "b1", emb)
    rows = _chunks(store, "kb")
    vecs = _unit(4)
    load_vectors(store, emb, [r[4] for r in rows[:2]], [r[3] for r in rows[:2]], vecs[:2])
    mark_failed(store, [(rows[2][4], ErrorCode.RATE_LIMITED, "429 Too Many Requests")])
    index = build_index(store, emb, IndexType.HNSW)
    (indexdef,) = store.one("SELECT indexdef FROM pg_indexes WHERE schemaname = %s AND indexname = %s",
                            (store.schema, index))
    assert "hnsw" in indexdef and "vector_cosine_ops" in indexdef
    with store.conn.transaction():
        s = batches.summarize_batch(store, "b1")  # d2#0 was never processed
    assert (s.status.value, s.total, s.ready, s.failed, s.retriable) == ("COMPLETED_WITH_ERRORS", 4, 2, 2, 2)
    assert s.counts_by_reason == {"RATE_LIMITED": 1, "NOT_PROCESSED": 1}
    st = corpus_status(store, "kb")
    assert st["chunks"] == {"READY": 2, "PENDING": 0, "FAILED": 2}
    assert st["last_batch"]["status"] == "COMPLETED_WITH_ERRORS"
    hits = search(store, "kb", vecs[1], k=2)
    assert hits[0].chunk_id == rows[1][0] and hits[0].score == pytest.approx(1.0, abs=1e-5)


def test_ivfflat_index(store, emb):
    _scan(store, "kb", "b1", {f"d{i}": [f"t{i}"] for i in range(50)})
    rows = _chunks(store, "kb")
    load_vectors(store, emb, [r[4] for r in rows], [r[3] for r in rows], _unit(50))
    index = build_index(store, emb, IndexType.IVFFLAT)
    (indexdef,) = store.one("SELECT indexdef FROM pg_indexes WHERE indexname = %s", (index,))
    assert "ivfflat" in indexdef


def test_hnsw_build_memory_is_sized_from_the_rows_and_capped(store, emb, monkeypatch, caplog):
    """maintenance_work_mem for the build: what the graph needs (measured per-vector bytes), never above
    REINDEX_INDEX_BUILD_MEMORY_MB — and a build over the cap says so; the index is built either way."""
    from reindex.store.vectors import hnsw_build_memory_mb

    # 1M 384-d vectors: measured 2,116 MiB of build memory (benchmarks/vectors_scale.py)
    assert 2116 < hnsw_build_memory_mb(1_000_000, 384, "vector") < 1.4 * 2116
    assert hnsw_build_memory_mb(1_000_000, 384, "halfvec") < hnsw_build_memory_mb(1_000_000, 384, "vector")
    assert hnsw_build_memory_mb(10, 384, "vector") == 64  # never below PostgreSQL's default
    _scan(store, "kb", "b1", {f"d{i}": [f"t{i}"] for i in range(300)})
    rows = _chunks(store, "kb")
    load_vectors(store, emb, [r[4] for r in rows], [r[3] for r in rows], _unit(300))
    monkeypatch.setenv("REINDEX_INDEX_BUILD_MEMORY_MB", "1")
    monkeypatch.setenv("REINDEX_INDEX_BUILD_WORKERS", "1")
    with caplog.at_level("INFO", logger="reindex.store.vectors"):
        index = build_index(store, emb, IndexType.HNSW)
    assert "needs about 64 MB of maintenance_work_mem; REINDEX_INDEX_BUILD_MEMORY_MB caps it at 1 MB" in caplog.text
    assert "(300 rows, maintenance_work_mem 1MB)" in caplog.text
    assert store.one("SELECT count(*) FROM pg_indexes WHERE indexname = %s", (index,)) == (1,)
    assert store.one("SHOW maintenance_work_mem") == ("64MB",)  # set for the build only


def test_retry_claims_only_retriable_failures_and_repairs_them(store, emb):
    _scan(store, "kb", "b1", {"d1": ["alpha beta gamma delta", "bad\x07text", "fine", "gone", "busy"]})
    with store.conn.transaction():
        batches.create_batch(store, "b1", "kb", "local", SPEC.checksum)
        batches.claim_stale_chunks(store, "kb", "b1", emb)
    pk = {r[0]: r[4] for r in _chunks(store, "kb")}
    mark_failed(store, [(pk["d1#0"], ErrorCode.TOO_LONG, "too long"),
                        (pk["d1#1"], ErrorCode.INVALID_CHARACTERS, "invalid characters"),
                        (pk["d1#3"], ErrorCode.INVALID_INPUT, "400 bad request"),
                        (pk["d1#4"], ErrorCode.RATE_LIMITED, "429")])
    with store.conn.transaction():
        batches.create_batch(store, "r1", "kb", "local", SPEC.checksum, kind="retry", parent_batch_id="b1")
        claim = batches.claim_retriable(store, "b1", "r1")
    assert claim["terminal"] == 1 and claim["delay_seconds"] == 5
    assert claim["actions"] == {"RESPLIT": 1, "SANITIZE": 1, "BACKOFF": 1}
    rows = {r[0]: r for r in _chunks(store, "kb")}
    texts = dict(store.execute(sql.SQL("SELECT chunk_id, text FROM {} WHERE batch_id = 'r1'").format(
        store.t("chunks"))).fetchall())
    assert texts == {"d1#0": "alpha beta", "d1#0.1": "gamma delta", "d1#1": "bad text", "d1#4": "busy"}
    assert rows["d1#1"][3] == content_sha256("bad text")  # sanitized text, new hash
    assert rows["d1#3"][1:3] == ("FAILED", "INVALID_INPUT")  # terminal: left as it was
    assert claim["pending"] == 4


def test_status_flip_is_a_hot_update(store, emb):
    """Migration 3: no index of ``chunks`` holds the status, and pages keep 30 % free, so the READY flip
    of a load is a heap-only-tuple update wherever the new row version fits on its page: on freshly
    written pages (all 200 rows updated in one transaction) that is ~30/70 of them; before migration 3
    (status in the batch index) it was none."""
    (options,) = store.one("SELECT reloptions FROM pg_class WHERE oid = %s::regclass", (f"{store.schema}.chunks",))
    assert "fillfactor=70" in options
    indexes = {r[0]: r[1] for r in store.execute(
        "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = %s AND tablename = 'chunks'", (store.schema,))}
    assert "chunks_batch_status_idx" not in indexes
    assert "(batch_id, id)" in indexes["chunks_batch_idx"]
    assert not any("embedding_status" in d for d in indexes.values())

    _scan(store, "kb", "b1", {f"d{i}": [f"text {i} {j}" for j in range(5)] for i in range(40)})
    rows = store.execute(sql.SQL("SELECT id, content_sha256 FROM {} ORDER BY id").format(store.t("chunks"))).fetchall()

    def hot_updates():
        store.execute("SELECT pg_stat_force_next_flush()")
        return store.one("SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relid = %s::regclass",
                         (f"{store.schema}.chunks",))

    upd0, hot0 = hot_updates()
    assert load_vectors(store, emb, [r[0] for r in rows], [r[1] for r in rows], _unit(len(rows))) == 200
    upd1, hot1 = hot_updates()
    assert upd1 - upd0 == 200
    assert hot1 - hot0 >= 0.4 * 200, f"{hot1 - hot0} of 200 status updates were HOT"


def test_concurrent_loads_of_one_hash_serialize(store, emb):
    """Two tasks loading the same content hash at once (a duplicated output line in two partitions):
    both commit, the chunk ends with one vector — the one committed last — and READY."""
    import threading

    import psycopg

    from reindex.store import Store
    from reindex.store.vectors import load_vectors_by_hash

    _scan(store, "kb", "b1", {"d1": ["same text", "other"], "d2": ["same text"]})
    (sha,) = store.one(sql.SQL("SELECT DISTINCT content_sha256 FROM {} WHERE text = 'same text'").format(
        store.t("chunks")))
    uri = store.conn.info.dsn
    vectors = {name: _unit(1, seed=seed) for name, seed in (("a", 1), ("b", 2))}
    holder = psycopg.connect(uri, autocommit=True)
    holder_store = Store(holder, store.schema)
    holder.execute("BEGIN")  # hold the chunks' row locks as a first task would, mid-block
    holder_store.execute(sql.SQL("UPDATE {} SET updated_at = now() WHERE content_sha256 = %s").format(
        holder_store.t("chunks")), (sha,))
    results = {}

    def task(name):
        with psycopg.connect(uri, autocommit=True) as conn:
            results[name] = load_vectors_by_hash(Store(conn, store.schema), emb, "b1", [sha], vectors[name])

    threads = [threading.Thread(target=task, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    threads[0].join(0.5)
    assert not results, "the loads must wait for the row locks"
    holder.execute("COMMIT")
    holder.close()
    for t in threads:
        t.join(30)
    assert results == {"a": 2, "b": 2}
    stored = store.execute(sql.SQL("SELECT chunk_pk, embedding::text FROM {} WHERE content_sha256 = %s").format(
        store.t(emb.table_name)), (sha,)).fetchall()
    assert len(stored) == 2 and len({v for _, v in stored}) == 1
    statuses = {r[1] for r in _chunks(store, "kb")}
    assert statuses == {"READY", "PENDING"}  # "other" got no vector


def test_copy_payload_reuses_one_buffer():
    from reindex.store.vectors import copy_binary_payload

    buf = bytearray()
    big = copy_binary_payload(np.arange(5, dtype=np.int64), ["a" * 64] * 5, _unit(5), out=buf)
    assert bytes(big) == copy_binary_payload(np.arange(5, dtype=np.int64), ["a" * 64] * 5, _unit(5))
    del big
    small = copy_binary_payload(np.arange(2, dtype=np.int64), ["b" * 64] * 2, _unit(2, seed=3), out=buf)
    assert bytes(small) == copy_binary_payload(np.arange(2, dtype=np.int64), ["b" * 64] * 2, _unit(2, seed=3))
    assert len(buf) >= len(small) and bytes(small).endswith(b"\xff\xff")
    with pytest.raises(ValueError, match="'short' is not 64 hex characters"):
        copy_binary_payload(np.arange(1, dtype=np.int64), ["short"], _unit(1))


# --- halfvec storage ----------------------------------------------------------------------------

HALF = SPEC.stored_as("halfvec")


@pytest.fixture
def half(store):
    with store.conn.transaction():
        return ensure_embedding_store(store, "kb", HALF)


def _stored(store, emb) -> np.ndarray:
    from pgvector.psycopg import register_vector

    register_vector(store.conn)
    rows = store.execute(sql.SQL("SELECT embedding FROM {} ORDER BY chunk_pk").format(store.t(emb.table_name)))
    return np.array([v.to_numpy() for (v,) in rows])


def test_halfvec_payload_is_pgvectors_binary_format():
    """Each row's vector field is what pgvector-python's ``HalfVector.to_binary`` writes (dim, unused, >f2)."""
    from pgvector import HalfVector

    from reindex.store.vectors import copy_binary_payload

    vecs = _unit(3, seed=5)
    payload = bytes(copy_binary_payload(np.arange(3, dtype=np.int64), ["c" * 64] * 3, vecs, storage="halfvec"))
    field = 4 + 4 + 2 * 8  # length word, then HalfVector.to_binary(): dim, unused, 8 halves
    row = 2 + 12 + 68 + field
    for i, v in enumerate(vecs):
        start = 19 + i * row + 2 + 12 + 68
        assert payload[start:start + 4] == (field - 4).to_bytes(4, "big")
        assert payload[start + 4:start + field] == HalfVector(v).to_binary()
    assert len(payload) == 19 + 3 * row + 2


def test_halfvec_store_keeps_the_half_float_rounding(store, half):
    from reindex.store.vectors import get_embedding_store, load_vectors_by_hash

    assert half.storage == "halfvec" and half.model_checksum == HALF.checksum != SPEC.checksum
    assert get_embedding_store(store, "kb") == half  # the registry row is the one source of the storage
    (column,) = store.one("""SELECT format_type(atttypid, atttypmod) FROM pg_attribute
        WHERE attrelid = %s::regclass AND attname = 'embedding'""", (f"{store.schema}.{half.table_name}",))
    assert column == "halfvec(8)"
    _scan(store, "kb", "b1", {"d1": ["alpha", "beta", "gamma"], "d2": ["delta"]})
    rows = _chunks(store, "kb")
    vecs = np.random.default_rng(7).normal(scale=3, size=(4, 8)).astype(np.float32)
    vecs[0, 0] = 65504  # the largest half float is still finite
    assert load_vectors(store, half, [r[4] for r in rows[:2]], [r[3] for r in rows[:2]], vecs[:2]) == 2
    assert load_vectors_by_hash(store, half, "b1", [r[3] for r in rows[2:]], vecs[2:]) == 2
    stored = _stored(store, half)
    assert stored.dtype == np.float16
    np.testing.assert_array_equal(stored, vecs.astype(np.float16))  # exactly numpy's round-to-nearest half
    assert not np.array_equal(stored.astype(np.float32), vecs)  # and not float32
    assert {r[1] for r in _chunks(store, "kb")} == {"READY"}


def test_halfvec_index_search_and_reuse(store, half):
    _scan(store, "kb", "b1", {f"d{i}": [f"text {i}"] for i in range(40)})
    rows = _chunks(store, "kb")
    vecs = _unit(40, seed=4)
    load_vectors(store, half, [r[4] for r in rows], [r[3] for r in rows], vecs)
    index = build_index(store, half, IndexType.HNSW)
    (indexdef,) = store.one("SELECT indexdef FROM pg_indexes WHERE schemaname = %s AND indexname = %s",
                            (store.schema, index))
    assert "USING hnsw (embedding halfvec_cosine_ops)" in indexdef
    for i in (3, 17, 39):
        hits = search(store, "kb", vecs[i], k=3)
        assert hits[0].chunk_id == rows[i][0] and hits[0].score == pytest.approx(1.0, abs=1e-3)
    with store.conn.transaction():
        store.execute("SET LOCAL enable_seqscan = off")
        plan = "\n".join(r[0] for r in store.execute(sql.SQL(
            "EXPLAIN SELECT chunk_pk FROM {} ORDER BY embedding <=> %s::halfvec LIMIT 3").format(
            store.t(half.table_name)), (str(vecs[0].tolist()),)))
    assert index in plan  # the query cast to halfvec is served by the index
    st = corpus_status(store, "kb")
    assert st["model"]["storage"] == "halfvec" and st["stores"][0]["storage"] == "halfvec"
    assert build_index(store, half, IndexType.IVFFLAT).endswith("_ivfflat")
    (ivf,) = store.one("SELECT indexdef FROM pg_indexes WHERE indexname = %s", (f"{half.table_name}_ivfflat",))
    assert "USING ivfflat (embedding halfvec_cosine_ops)" in ivf

    # a text already embedded in this store is reused in it, half floats and all
    _scan(store, "kb", "b2", {**{f"d{i}": [f"text {i}"] for i in range(40)}, "copy": ["text 5"]})
    with store.conn.transaction():
        batches.create_batch(store, "b2", "kb", "local", HALF.checksum)
        claim = batches.claim_stale_chunks(store, "kb", "b2", half)
    assert (claim["pending"], claim["reused_by_content"]) == (0, 1)
    (same,) = store.one(sql.SQL("""SELECT count(DISTINCT embedding::text) FROM {} e JOIN {} c ON c.id = e.chunk_pk
        WHERE c.text = 'text 5'""").format(store.t(half.table_name), store.t("chunks")))
    assert same == 1


def test_halfvec_table_is_half_the_size(store):
    wide = ModelSpec("test/wide", "r1", 384, True, "local")
    with store.conn.transaction():
        stores = {s: ensure_embedding_store(store, "kb", wide.stored_as(s), activate=False) for s in ("vector", "halfvec")}
    _scan(store, "kb", "b1", {f"d{i}": [f"text {i}"] for i in range(2000)})
    rows = _chunks(store, "kb")
    vecs = _unit(2000, dim=384)
    size = {}
    for s, emb in stores.items():
        assert load_vectors(store, emb, [r[4] for r in rows], [r[3] for r in rows], vecs) == 2000
        (size[s],) = store.one("SELECT pg_table_size(%s::regclass)", (f"{store.schema}.{emb.table_name}",))
    assert size["halfvec"] < 0.6 * size["vector"], size


def test_a_vector_beyond_half_precision_fails_alone(store, half):
    """Through the local load path: the overflowing vector fails with its reason, the rest of its block loads."""
    from reindex import pipeline
    from reindex.config import ReindexConfig

    class Encoder:
        spec = SPEC  # the model's own spec (float32): the run's storage makes it the halfvec store's

        def encode(self, texts):
            out = _unit(len(texts), seed=len(texts))
            out[[i for i, t in enumerate(texts) if t == "huge"], 0] = 1e5
            return out

    _scan(store, "kb", "b1", {"d1": ["alpha", "huge", "gamma"], "d2": ["delta"]})
    with store.conn.transaction():
        batches.create_batch(store, "b1", "kb", "local", HALF.checksum)
        batches.claim_stale_chunks(store, "kb", "b1", half)
    cfg = ReindexConfig(corpus="kb", corpus_uri="mem://", storage="halfvec")
    (part,) = pipeline.plan(store, cfg, "b1")
    out = pipeline.encode_partition(store, cfg, part, model_checksum=HALF.checksum, encoder=Encoder())
    assert (out["ready"], out["failed"]) == (3, 1)
    failed = store.one(sql.SQL("SELECT chunk_id, error_code, error_message FROM {} WHERE embedding_status = 'FAILED'")
                       .format(store.t("chunks")))
    assert failed[:2] == ("d1#1", "NON_FINITE")
    assert "beyond half precision (|x| <= 65504)" in failed[2]
    assert np.isfinite(_stored(store, half).astype(np.float32)).all() and len(_stored(store, half)) == 3


def test_a_deadlocked_block_is_rolled_back_and_loaded_again(store, emb):
    """Another transaction holds the second chunk and then asks for the first one, which the load (scanning
    the two-row table in physical order) has just locked: PostgreSQL aborts the load's transaction as the
    deadlock victim; the load runs the block again once the other transaction commits."""
    import threading
    import time

    import psycopg

    from reindex.store import Store
    from reindex.store.vectors import load_vectors_by_hash

    _scan(store, "kb", "b1", {"d1": ["first text", "second text"]})
    first, second = (r[1] for r in store.execute(sql.SQL("SELECT id, content_sha256 FROM {} ORDER BY ctid").format(
        store.t("chunks"))).fetchall())
    uri = store.conn.info.dsn
    other = psycopg.connect(uri, autocommit=True)
    chunks = sql.SQL("UPDATE {} SET updated_at = now() WHERE content_sha256 = %s").format(store.t("chunks"))
    other.execute("BEGIN")
    other.execute(chunks, (second,))
    result = {}

    def task():
        with psycopg.connect(uri, autocommit=True) as conn:
            conn.execute("SET deadlock_timeout = '100ms'")
            try:
                result["loaded"] = load_vectors_by_hash(Store(conn, store.schema), emb, "b1", [first, second], _unit(2))
            except Exception as e:  # noqa: BLE001 - asserted below
                result["error"] = e

    thread = threading.Thread(target=task)
    thread.start()
    deadline = time.monotonic() + 10
    while not other.execute("SELECT count(*) FROM pg_locks WHERE NOT granted").fetchone()[0]:
        assert time.monotonic() < deadline, "the load never waited for the held row"
        time.sleep(0.02)
    other.execute("SET deadlock_timeout = '5s'")  # the load detects the deadlock first and is the victim
    other.execute(chunks, (first,))
    other.execute("COMMIT")
    other.close()
    thread.join(30)
    assert result == {"loaded": 2}
    assert {r[1] for r in _chunks(store, "kb")} == {"READY"}
