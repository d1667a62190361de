"""Reading the store: semantic search over a corpus's active vectors and status reports."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from psycopg import sql

from reindex.quality import recorded_gate
from reindex.store import Store
from reindex.store.vectors import get_embedding_store


@dataclass(frozen=True)
class Hit:
    chunk_id: str
    doc_id: str
    score: float
    text: str


def search(store: Store, corpus: str, query_vector: np.ndarray, k: int = 5, *, ef_search: int = 100,
           model_checksum: str | None = None) -> list[Hit]:
    """Top-``k`` chunks of ``corpus`` by cosine similarity to ``query_vector``.

    Reads the active model's store, or ``model_checksum``'s: a caller that encoded the query with
    the model it found active passes that checksum, so a model switch between its lookup and
    its query cannot mix dimensions (the replaced store is kept for its retention period). The query is
    cast to the store's column type (``halfvec``: rounded to half floats), so its cosine index serves it.
    """
    from pgvector.psycopg import register_vector

    emb = get_embedding_store(store, corpus, model_checksum)
    vec = np.asarray(query_vector, dtype=np.float32).reshape(-1)
    if vec.shape[0] != emb.dim:
        raise ValueError(f"query vector has dimension {vec.shape[0]}; corpus {corpus!r} stores {emb.dim}")
    register_vector(store.conn)
    with store.conn.transaction():
        store.execute(sql.SQL("SET LOCAL hnsw.ef_search = {}").format(sql.Literal(max(ef_search, k))))
        rows = store.execute(sql.SQL("""SELECT c.chunk_id, c.doc_id, 1 - (e.embedding <=> %s::{type}) AS score, c.text
            FROM {emb} e JOIN {chunks} c ON c.id = e.chunk_pk AND c.content_sha256 = e.content_sha256
            ORDER BY e.embedding <=> %s::{type} LIMIT %s""").format(
            emb=store.t(emb.table_name), chunks=store.t("chunks"), type=sql.Identifier(emb.storage)),
            (vec, vec, k)).fetchall()
    return [Hit(r[0], r[1], float(r[2]), r[3]) for r in rows]


def require_schema(store: Store) -> int:
    """The store schema's migration version; ``LookupError`` (in words) when the schema holds no
    reindex tables yet, e.g. a fresh database nothing has been indexed into.

    Readers (status, search, unlock) do not migrate: the pipeline's first task does.
    """
    name = store.t("schema_migrations").as_string(store.conn)  # quoted as the server parses it
    (migrations,) = store.one("SELECT to_regclass(%s)", (name,))
    if migrations is None:
        raise LookupError(f"store schema {store.schema!r} has no reindex tables: nothing has been indexed there yet "
                          "(the first reindex_corpus run creates them; another schema: --schema)")
    (version,) = store.one(sql.SQL("SELECT coalesce(max(version), 0) FROM {}").format(store.t("schema_migrations")))
    return version


def unknown_corpus(store: Store, corpus: str) -> str:
    """Why ``corpus`` cannot be found, naming the corpora the schema does hold."""
    rows = store.execute(sql.SQL("SELECT corpus, count(*) OVER () FROM {} ORDER BY corpus LIMIT 20").format(
        store.t("corpora"))).fetchall()
    if not rows:
        return f"corpus {corpus!r} is not in store schema {store.schema!r}: no corpus has been indexed there yet"
    more = f" and {rows[0][1] - len(rows)} more" if rows[0][1] > len(rows) else ""
    return f"corpus {corpus!r} is not in store schema {store.schema!r}; corpora there: {[r[0] for r in rows]}{more}"


def corpus_status(store: Store, corpus: str, *, failed_documents: int = 5) -> dict:
    """Counts by chunk status and error code, documents (failed ones by reason, and the first
    ``failed_documents`` of them by ``doc_id``), the active model and the last batch (with ``quality``: the
    figures of its quality gate when it is an upgrade batch that went through one, else None).

    Raises ``LookupError`` when the schema is not initialised or the corpus is not in it.
    """
    t = store.t
    require_schema(store)
    row = store.one(sql.SQL("""SELECT c.active_model_checksum, m.model_id, m.dim, m.normalized, s.table_name, s.index_name,
            s.storage
        FROM {corpora} c LEFT JOIN {models} m ON m.model_checksum = c.active_model_checksum
        LEFT JOIN {stores} s ON s.corpus = c.corpus AND s.model_checksum = c.active_model_checksum
        WHERE c.corpus = %s""").format(corpora=t("corpora"), models=t("models"), stores=t("embedding_stores")), (corpus,))
    if row is None:
        raise LookupError(unknown_corpus(store, corpus))
    chunks = dict(store.execute(sql.SQL("SELECT embedding_status, count(*) FROM {} WHERE corpus = %s GROUP BY 1").format(
        t("chunks")), (corpus,)).fetchall())
    errors = dict(store.execute(sql.SQL("""SELECT error_code, count(*) FROM {} WHERE corpus = %s
        AND embedding_status = 'FAILED' GROUP BY 1 ORDER BY 2 DESC""").format(t("chunks")), (corpus,)).fetchall())
    docs = dict(store.execute(sql.SQL("SELECT status, count(*) FROM {} WHERE corpus = %s GROUP BY 1").format(
        t("documents")), (corpus,)).fetchall())
    doc_errors = dict(store.execute(sql.SQL("""SELECT coalesce(error_code, 'UNKNOWN'), count(*) FROM {}
        WHERE corpus = %s AND status = 'FAILED' GROUP BY 1 ORDER BY 2 DESC, 1""").format(t("documents")),
        (corpus,)).fetchall())
    failed_docs = [
        {"doc_id": r[0], "source_uri": r[1], "error_code": r[2], "message": r[3]}
        for r in store.execute(sql.SQL("""SELECT doc_id, source_uri, error_code, error_message FROM {}
            WHERE corpus = %s AND status = 'FAILED' ORDER BY doc_id LIMIT %s""").format(t("documents")),
            (corpus, failed_documents)).fetchall()
    ]
    cur = store.execute(sql.SQL("""SELECT batch_id, kind, backend, status, total, ready, failed, reused,
            counts_by_reason, started_at, finished_at, details FROM {} WHERE corpus = %s
        ORDER BY started_at DESC LIMIT 1""").format(t("batches")), (corpus,))
    last = cur.fetchone()
    last_batch = None
    if last is not None:
        last_batch = dict(zip([c.name for c in cur.description], last, strict=True))
        last_batch["quality"] = recorded_gate(last_batch.pop("details"))
        for key in ("started_at", "finished_at"):
            last_batch[key] = last_batch[key].isoformat() if last_batch[key] else None
    stores = [
        {"model_checksum": r[0], "table": r[1], "dim": r[2], "storage": r[3], "status": r[4], "index": r[5]}
        for r in store.execute(sql.SQL("""SELECT model_checksum, table_name, dim, storage, status, index_name FROM {}
            WHERE corpus = %s AND status <> 'DROPPED' ORDER BY created_at""").format(t("embedding_stores")),
            (corpus,))
    ]
    from reindex.store.leases import get_lease

    lease = get_lease(store, corpus)
    return {
        "corpus": corpus,
        "lease": None if lease.free else {"batch_id": lease.batch_id, "run_id": lease.run_id,
                                          "since": lease.acquired_at.isoformat() if lease.acquired_at else None},
        "stores": stores,
        "documents": {"OK": docs.get("OK", 0), "FAILED": docs.get("FAILED", 0)},
        "failed_documents_by_reason": doc_errors,
        "failed_documents": failed_docs,
        "chunks": {s: chunks.get(s, 0) for s in ("READY", "PENDING", "FAILED")},
        "chunks_total": sum(chunks.values()),
        "failed_by_reason": errors,
        "model": {"checksum": row[0], "model_id": row[1], "dim": row[2], "normalized": row[3], "storage": row[6]},
        "vector_table": row[4],
        "index": row[5],
        "last_batch": last_batch,
    }
