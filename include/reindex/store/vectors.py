"""Vector storage: one table per (corpus, model), bulk-loaded with COPY BINARY.

``load_vectors`` stages a block of rows with ``COPY … FROM STDIN (FORMAT BINARY)`` — the payload
is built with numpy for the whole block, not row by row — then upserts the vectors (replace
semantics) and flips the chunks to READY in the same transaction. A vector is accepted only if
its chunk still has the content hash it was computed from.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from psycopg import sql

from reindex.config import IndexType
from reindex.errors import ErrorCode, StoreError
from reindex.models import ModelSpec
from reindex.store import Store, embedding_table_name

log = logging.getLogger(__name__)

_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack("!ii", 0, 0)
_COPY_TRAILER = struct.pack("!h", -1)


@dataclass(frozen=True)
class EmbeddingStore:
    corpus: str
    model_checksum: str
    table_name: str
    dim: int


def register_model(store: Store, spec: ModelSpec, config: dict | None = None) -> None:
    """Record the model in the registry; ``config`` (model name/path, backend, options) is what a later
    run needs to load it again (a nightly run follows the corpus's active model)."""
    from psycopg.types.json import Jsonb

    details = {"precision": spec.precision, "max_seq_length": spec.max_seq_length}
    if config:
        details["config"] = config
    store.execute(
        sql.SQL("""INSERT INTO {} (model_checksum, model_id, revision, dim, normalized, backend, details)
            VALUES (%s, %s, %s, %s, %s, %s, %s)
            ON CONFLICT (model_checksum) DO UPDATE SET details = {}.details || EXCLUDED.details""").format(
            store.t("models"), store.t("models")),
        (spec.checksum, spec.model_id, spec.revision, spec.dim, spec.normalized, spec.backend, Jsonb(details)),
    )


def ensure_embedding_store(store: Store, corpus: str, spec: ModelSpec, *, activate: bool = True,
                           config: dict | None = None) -> EmbeddingStore:
    """Create (if missing) the vector table of ``corpus`` for ``spec`` and register it.

    With ``activate`` the store becomes the corpus's active one when the corpus has none yet;
    otherwise it stays BUILDING until ``switch_active_store``.
    """
    from reindex.store.documents import ensure_corpus

    table = embedding_table_name(corpus, spec.checksum)
    register_model(store, spec, config)
    ensure_corpus(store, corpus)
    store.execute(sql.SQL("""CREATE TABLE IF NOT EXISTS {emb} (
            chunk_pk bigint PRIMARY KEY REFERENCES {chunks} (id) ON DELETE CASCADE,
            content_sha256 char(64) NOT NULL,
            embedding vector({dim}) NOT NULL,
            updated_at timestamptz NOT NULL DEFAULT now())""").format(
        emb=store.t(table), chunks=store.t("chunks"), dim=sql.Literal(spec.dim)))
    store.execute(sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} (content_sha256)").format(
        sql.Identifier(f"{table[:50]}_sha"), store.t(table)))
    store.execute(
        sql.SQL("""INSERT INTO {} (corpus, model_checksum, table_name, dim)
            VALUES (%s, %s, %s, %s) ON CONFLICT (corpus, model_checksum) DO UPDATE
            SET status = 'BUILDING', retired_at = NULL, dropped_at = NULL
            WHERE {}.status IN ('RETIRED', 'DROPPED')""").format(store.t("embedding_stores"), store.t("embedding_stores")),
        (corpus, spec.checksum, table, spec.dim),
    )
    if activate:
        store.execute(
            sql.SQL("""UPDATE {corpora} SET active_model_checksum = %s, updated_at = now()
                WHERE corpus = %s AND active_model_checksum IS NULL""").format(corpora=store.t("corpora")),
            (spec.checksum, corpus))
        store.execute(
            sql.SQL("""UPDATE {stores} s SET status = 'ACTIVE', activated_at = now()
                FROM {corpora} c WHERE s.corpus = c.corpus AND s.model_checksum = c.active_model_checksum
                AND s.corpus = %s AND s.status = 'BUILDING'""").format(
                stores=store.t("embedding_stores"), corpora=store.t("corpora")), (corpus,))
    return EmbeddingStore(corpus, spec.checksum, table, spec.dim)


def active_model(store: Store, corpus: str) -> dict | None:
    """The corpus's active model: registry row plus the ``config`` it was run with (None for a new corpus)."""
    cur = store.execute(sql.SQL("""SELECT m.model_checksum, m.model_id, m.revision, m.dim, m.normalized, m.backend,
            m.details FROM {corpora} c JOIN {models} m ON m.model_checksum = c.active_model_checksum
        WHERE c.corpus = %s""").format(corpora=store.t("corpora"), models=store.t("models")), (corpus,))
    row = cur.fetchone()
    return None if row is None else dict(zip([c.name for c in cur.description], row, strict=True))


def switch_active_store(store: Store, corpus: str, model_checksum: str) -> str | None:
    """Make ``model_checksum``'s store the corpus's active one, atomically (one transaction).

    Searches read the active store per query, so they see the old vectors up to the commit and the
    new ones (with their index already built) after it. The previous store is RETIRED, kept until
    ``drop_retired_stores``. Returns the previous active checksum.
    """
    t = store.t
    with store.conn.transaction():
        row = store.one(sql.SQL("SELECT active_model_checksum FROM {} WHERE corpus = %s FOR UPDATE").format(
            t("corpora")), (corpus,))
        if row is None:
            raise StoreError(f"corpus {corpus!r} is not in the store")
        previous = row[0]
        target = store.one(sql.SQL("SELECT status FROM {} WHERE corpus = %s AND model_checksum = %s").format(
            t("embedding_stores")), (corpus, model_checksum))
        if target is None or target[0] == "DROPPED":
            raise StoreError(f"corpus {corpus!r} has no embedding store for model {model_checksum} to switch to")
        if previous == model_checksum:
            return previous
        store.execute(sql.SQL("""UPDATE {} SET status = 'RETIRED', retired_at = now()
            WHERE corpus = %s AND model_checksum = %s""").format(t("embedding_stores")), (corpus, previous))
        store.execute(sql.SQL("""UPDATE {} SET status = 'ACTIVE', activated_at = now(), retired_at = NULL
            WHERE corpus = %s AND model_checksum = %s""").format(t("embedding_stores")), (corpus, model_checksum))
        store.execute(sql.SQL("UPDATE {} SET active_model_checksum = %s, updated_at = now() WHERE corpus = %s").format(
            t("corpora")), (model_checksum, corpus))
    log.info("corpus %s: active model %s -> %s", corpus, previous, model_checksum)
    return previous


def drop_retired_stores(store: Store, corpus: str | None = None, *, retention_seconds: float) -> list[str]:
    """DROP the vector tables RETIRED for longer than ``retention_seconds``. Returns the tables dropped."""
    t = store.t
    rows = store.execute(sql.SQL("""SELECT corpus, model_checksum, table_name FROM {}
        WHERE status = 'RETIRED' AND retired_at <= now() - make_interval(secs => %s)
        AND (%s::text IS NULL OR corpus = %s)""").format(t("embedding_stores")),
        (retention_seconds, corpus, corpus)).fetchall()
    dropped = []
    for c, checksum, table in rows:
        with store.conn.transaction():
            store.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(t(table)))
            store.execute(sql.SQL("""UPDATE {} SET status = 'DROPPED', dropped_at = now(), index_name = NULL
                WHERE corpus = %s AND model_checksum = %s""").format(t("embedding_stores")), (c, checksum))
        log.info("dropped retired vector table %s (corpus %s, model %s)", table, c, checksum)
        dropped.append(table)
    return dropped


def get_embedding_store(store: Store, corpus: str, model_checksum: str | None = None) -> EmbeddingStore:
    """The store of ``model_checksum`` for ``corpus``, or the corpus's active one."""
    if model_checksum is None:
        row = store.one(sql.SQL("SELECT active_model_checksum FROM {} WHERE corpus = %s").format(
            store.t("corpora")), (corpus,))
        if row is None or row[0] is None:
            raise StoreError(f"corpus {corpus!r} has no active embedding model yet: run reindex_corpus first")
        model_checksum = row[0]
    row = store.one(sql.SQL("""SELECT table_name, dim FROM {} WHERE corpus = %s AND model_checksum = %s
        AND status <> 'DROPPED'""").format(store.t("embedding_stores")), (corpus, model_checksum))
    if row is None:
        raise StoreError(f"corpus {corpus!r} has no embedding store for model {model_checksum}")
    return EmbeddingStore(corpus, model_checksum, row[0], row[1])


def copy_binary_payload(chunk_pks: np.ndarray, shas: Sequence[str], vectors: np.ndarray) -> bytes:
    """COPY BINARY bytes for rows ``(chunk_pk bigint, content_sha256 char(64), embedding vector)``.

    Every row has the same width, so the whole block is one numpy structured array.
    """
    n, dim = vectors.shape
    if len(chunk_pks) != n or len(shas) != n:
        raise ValueError(f"row count mismatch: {len(chunk_pks)} ids, {len(shas)} hashes, {n} vectors")
    row = np.dtype([
        ("nfields", ">i2"), ("len_pk", ">i4"), ("pk", ">i8"),
        ("len_sha", ">i4"), ("sha", "S64"),
        ("len_vec", ">i4"), ("dim", ">i2"), ("unused", ">i2"), ("vec", ">f4", (dim,)),
    ])
    buf = np.empty(n, dtype=row)
    buf["nfields"] = 3
    buf["len_pk"] = 8
    buf["pk"] = chunk_pks
    buf["len_sha"] = 64
    buf["sha"] = np.asarray(shas, dtype="S64")
    buf["len_vec"] = 4 + 4 * dim
    buf["dim"] = dim
    buf["unused"] = 0
    buf["vec"] = vectors
    return _COPY_HEADER + buf.tobytes() + _COPY_TRAILER


def _stage_vectors(store: Store, emb: EmbeddingStore, chunk_pks, shas: Sequence[str], vectors: np.ndarray) -> None:
    """COPY one block into the transaction's ``stage_vectors`` temp table (binary, numpy-built)."""
    if vectors.ndim != 2 or vectors.shape[1] != emb.dim:
        raise StoreError(f"vectors of shape {vectors.shape} do not fit {emb.table_name} (dimension {emb.dim})")
    payload = copy_binary_payload(np.asarray(chunk_pks, dtype=np.int64), shas, vectors.astype(np.float32, copy=False))
    store.execute(sql.SQL("""CREATE TEMP TABLE IF NOT EXISTS stage_vectors (
        chunk_pk bigint, content_sha256 char(64), embedding vector({dim})) ON COMMIT DROP""").format(
        dim=sql.Literal(emb.dim)))
    with store.conn.cursor().copy("COPY stage_vectors FROM STDIN (FORMAT BINARY)") as copy:
        copy.write(payload)


def load_vectors(store: Store, emb: EmbeddingStore, chunk_pks: Sequence[int], shas: Sequence[str],
                 vectors: np.ndarray) -> int:
    """Upsert one block of vectors and mark their chunks READY, in one transaction. Returns rows loaded."""
    if len(chunk_pks) == 0:
        return 0
    t = store.t
    with store.conn.transaction():
        _stage_vectors(store, emb, chunk_pks, shas, vectors)
        loaded = store.execute(sql.SQL("""INSERT INTO {emb} AS e (chunk_pk, content_sha256, embedding)
            SELECT s.chunk_pk, s.content_sha256, s.embedding FROM stage_vectors s
            JOIN {chunks} c ON c.id = s.chunk_pk AND c.content_sha256 = s.content_sha256
            ON CONFLICT (chunk_pk) DO UPDATE SET content_sha256 = EXCLUDED.content_sha256,
                embedding = EXCLUDED.embedding, updated_at = now()""").format(
            emb=t(emb.table_name), chunks=t("chunks"))).rowcount
        store.execute(sql.SQL("""UPDATE {chunks} c SET embedding_status = 'READY', error_code = NULL,
                error_message = NULL, updated_at = now()
            FROM stage_vectors s WHERE c.id = s.chunk_pk AND c.content_sha256 = s.content_sha256""").format(
            chunks=t("chunks")))
    return loaded


def load_vectors_by_hash(store: Store, emb: EmbeddingStore, batch_id: str, shas: Sequence[str],
                         vectors: np.ndarray) -> int:
    """Load vectors keyed by content hash: each goes to every chunk of ``batch_id`` with that hash.

    This is how batch results are joined (by the echoed content / key, never by line order); a
    text shared by several chunks is embedded once. Returns the number of chunk vectors loaded.
    """
    if len(shas) == 0:
        return 0
    t = store.t
    with store.conn.transaction():
        _stage_vectors(store, emb, np.zeros(len(shas), dtype=np.int64), shas, vectors)
        store.execute("CREATE INDEX ON stage_vectors (content_sha256)")
        loaded = store.execute(sql.SQL("""INSERT INTO {emb} AS e (chunk_pk, content_sha256, embedding)
            SELECT DISTINCT ON (c.id) c.id, c.content_sha256, s.embedding FROM stage_vectors s
            JOIN {chunks} c ON c.batch_id = %s AND c.content_sha256 = s.content_sha256
            ORDER BY c.id
            ON CONFLICT (chunk_pk) DO UPDATE SET content_sha256 = EXCLUDED.content_sha256,
                embedding = EXCLUDED.embedding, updated_at = now()""").format(
            emb=t(emb.table_name), chunks=t("chunks")), (batch_id,)).rowcount
        store.execute(sql.SQL("""UPDATE {chunks} c SET embedding_status = 'READY', error_code = NULL,
                error_message = NULL, updated_at = now()
            WHERE c.batch_id = %s AND c.content_sha256 IN (SELECT content_sha256 FROM stage_vectors)""").format(
            chunks=t("chunks")), (batch_id,))
    return loaded


def _record_failures(store: Store, key_type: str, rows: list[tuple], match: sql.Composable, params=()) -> int:
    """COPY ``(key, code, message)`` rows into a temp table and flip the matching chunks to FAILED."""
    if not rows:
        return 0
    with store.conn.transaction():
        store.execute(sql.SQL("CREATE TEMP TABLE stage_failures (key {}, code text, message text) ON COMMIT DROP").format(
            sql.SQL(key_type)))
        with store.conn.cursor().copy("COPY stage_failures FROM STDIN") as copy:
            for r in rows:
                copy.write_row(r)
        return store.execute(sql.SQL("""UPDATE {chunks} c SET embedding_status = 'FAILED', error_code = f.code,
                error_message = f.message, updated_at = now()
            FROM stage_failures f WHERE {match}""").format(chunks=store.t("chunks"), match=match), params).rowcount


def mark_failed_by_hash(store: Store, batch_id: str, failures: Iterable[tuple[str, ErrorCode | str, str]]) -> int:
    """Record failures keyed by content hash on the batch's chunks that are not READY (a success elsewhere
    in the output wins). ``failures``: (content_sha256, code, message)."""
    rows = [(sha, str(code), msg[:2000]) for sha, code, msg in failures if sha]
    match = sql.SQL("c.batch_id = %s AND c.content_sha256 = f.key AND c.embedding_status <> 'READY'")
    return _record_failures(store, "text", rows, match, (batch_id,))


def mark_failed(store: Store, failures: Iterable[tuple[int, ErrorCode | str, str]]) -> int:
    """Set chunks FAILED with their error code and message. ``failures``: (chunk_pk, code, message)."""
    rows = [(pk, str(code), msg[:2000]) for pk, code, msg in failures]
    return _record_failures(store, "bigint", rows, sql.SQL("c.id = f.key"))


def build_index(store: Store, emb: EmbeddingStore, index_type: IndexType = IndexType.HNSW, *,
                hnsw_m: int = 16, hnsw_ef_construction: int = 64, ivfflat_lists: int | None = None,
                maintenance_work_mem: str = "512MB") -> str | None:
    """Build the cosine index of ``emb`` if it is missing, then ANALYZE. Returns the index name."""
    t = store.t
    if index_type == IndexType.NONE:
        store.execute(sql.SQL("ANALYZE {}").format(t(emb.table_name)))
        return None
    index_name = f"{emb.table_name}_{index_type.value}"
    exists = store.one("SELECT 1 FROM pg_indexes WHERE schemaname = %s AND indexname = %s",
                       (store.schema, index_name))
    if not exists:
        store.execute(sql.SQL("SET maintenance_work_mem = {}").format(sql.Literal(maintenance_work_mem)))
        store.execute("SET max_parallel_maintenance_workers = 2")
        if index_type == IndexType.HNSW:
            params = sql.SQL("WITH (m = {}, ef_construction = {})").format(
                sql.Literal(hnsw_m), sql.Literal(hnsw_ef_construction))
        else:
            (rows,) = store.one(sql.SQL("SELECT count(*) FROM {}").format(t(emb.table_name)))
            lists = ivfflat_lists or max(1, int(rows / 1000) if rows <= 1_000_000 else int(rows**0.5))
            params = sql.SQL("WITH (lists = {})").format(sql.Literal(lists))
        log.info("building %s index %s on %s", index_type.value, index_name, emb.table_name)
        store.execute(sql.SQL("CREATE INDEX IF NOT EXISTS {idx} ON {emb} USING {method} (embedding vector_cosine_ops) {params}").format(
            idx=sql.Identifier(index_name), emb=t(emb.table_name), method=sql.SQL(index_type.value), params=params))
        store.execute("RESET maintenance_work_mem")
        store.execute("RESET max_parallel_maintenance_workers")
    store.execute(sql.SQL("UPDATE {} SET index_type = %s, index_name = %s WHERE table_name = %s").format(
        t("embedding_stores")), (index_type.value, index_name, emb.table_name))
    store.execute(sql.SQL("ANALYZE {}").format(t(emb.table_name)))
    return index_name
