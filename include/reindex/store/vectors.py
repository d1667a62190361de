"""Vector storage: one table per (corpus, model), bulk-loaded with COPY BINARY.

``load_vectors`` / ``load_vectors_by_hash`` flip a block's chunks to READY (one UPDATE … RETURNING,
which also locks them), delete the vectors they replace and COPY the block straight into the vector
table (``COPY … FROM STDIN (FORMAT BINARY)``, the payload built in place with numpy for the whole
block, each vector written once), in one transaction. A vector is accepted only if its chunk still
has the content hash it was computed from. A store keeps float32 (``vector``) or IEEE half floats
(``halfvec``): its ``storage``, recorded in ``embedding_stores`` and part of the model checksum.
"""

from __future__ import annotations

import logging
import math
import struct
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from psycopg import sql
from psycopg.errors import DeadlockDetected

from reindex.config import IndexType, Storage
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
    storage: str = Storage.VECTOR.value


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
            chunk_pk bigint REFERENCES {chunks} (id) ON DELETE CASCADE,
            content_sha256 char(64) NOT NULL,
            embedding {type}({dim}) NOT NULL,
            updated_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (chunk_pk) INCLUDE (content_sha256))""").format(
        emb=store.t(table), chunks=store.t("chunks"), type=sql.Identifier(Storage(spec.storage).value),
        dim=sql.Literal(spec.dim)))
    store.execute(sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} (content_sha256)").format(
        sql.Identifier(f"{table[:50]}_sha"), store.t(table)))
    store.execute(
        sql.SQL("""INSERT INTO {} (corpus, model_checksum, table_name, dim, storage)
            VALUES (%s, %s, %s, %s, %s) ON CONFLICT (corpus, model_checksum) DO UPDATE
            SET status = 'BUILDING', retired_at = NULL, dropped_at = NULL
            WHERE {}.status IN ('RETIRED', 'DROPPED')""").format(store.t("embedding_stores"), store.t("embedding_stores")),
        (corpus, spec.checksum, table, spec.dim, spec.storage),
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
    return EmbeddingStore(corpus, spec.checksum, table, spec.dim, spec.storage)


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
    row = store.one(sql.SQL("""SELECT table_name, dim, storage FROM {} WHERE corpus = %s AND model_checksum = %s
        AND status <> 'DROPPED'""").format(store.t("embedding_stores")), (corpus, model_checksum))
    if row is None:
        raise StoreError(f"corpus {corpus!r} has no embedding store for model {model_checksum}")
    return EmbeddingStore(corpus, model_checksum, *row)


# pgvector's binary format: int16 dim, int16 unused, then big-endian float32 (vector) or IEEE half (halfvec).
_ELEMENT_TYPES = {Storage.VECTOR: ">f4", Storage.HALFVEC: ">f2"}


def _copy_row_dtype(dim: int, storage: str) -> np.dtype:
    return np.dtype([
        ("nfields", ">i2"), ("len_pk", ">i4"), ("pk", ">i8"),
        ("len_sha", ">i4"), ("sha", "S64"),
        ("len_vec", ">i4"), ("dim", ">i2"), ("unused", ">i2"), ("vec", _ELEMENT_TYPES[Storage(storage)], (dim,)),
    ])


def _sha_array(shas: Sequence[str]) -> np.ndarray:
    joined = "".join(shas).encode("ascii")
    if len(joined) != 64 * len(shas):
        bad = next(s for s in shas if len(s) != 64)
        raise ValueError(f"content hash {bad!r} is not 64 hex characters")
    return np.frombuffer(joined, dtype="S64")


def copy_binary_payload(chunk_pks: np.ndarray, shas: Sequence[str], vectors: np.ndarray, *,
                        out: bytearray | None = None, storage: str = Storage.VECTOR) -> bytes | memoryview:
    """COPY BINARY bytes for rows ``(chunk_pk bigint, content_sha256 char(64), embedding vector|halfvec)``.

    Every row has the same width, so the whole block is one numpy structured array written in place
    (header, rows, trailer). With ``out`` the rows are written into that buffer (grown when needed)
    and a view of it is returned: a load reuses one buffer instead of faulting in fresh pages per block.
    For ``halfvec`` numpy rounds each float32 to the nearest half; a value beyond ±65504 would become
    infinite, which pgvector refuses (the whole block fails): ``validate_vectors`` fails such rows per
    chunk before they get here.
    """
    n, dim = vectors.shape
    if len(chunk_pks) != n or len(shas) != n:
        raise ValueError(f"row count mismatch: {len(chunk_pks)} ids, {len(shas)} hashes, {n} vectors")
    row = _copy_row_dtype(dim, storage)
    size = len(_COPY_HEADER) + n * row.itemsize + len(_COPY_TRAILER)
    buf = out if out is not None else bytearray(size)
    if len(buf) < size:
        buf.extend(bytes(size - len(buf)))
    buf[:len(_COPY_HEADER)] = _COPY_HEADER
    rows = np.frombuffer(buf, dtype=row, count=n, offset=len(_COPY_HEADER))
    rows["nfields"] = 3
    rows["len_pk"] = 8
    rows["pk"] = chunk_pks
    rows["len_sha"] = 64
    rows["sha"] = _sha_array(shas)
    rows["len_vec"] = 4 + row["vec"].itemsize
    rows["dim"] = dim
    rows["unused"] = 0
    rows["vec"] = vectors
    del rows  # release the export before the caller may grow the buffer again
    buf[size - len(_COPY_TRAILER):size] = _COPY_TRAILER
    return bytes(buf) if out is None else memoryview(buf)[:size]


_copy_buffers = threading.local()


def _copy_buffer() -> bytearray:
    """This thread's COPY buffer, reused across blocks (one block's payload: ~6 MB for 2,000 768-d rows)."""
    buf = getattr(_copy_buffers, "buf", None)
    if buf is None:
        buf = _copy_buffers.buf = bytearray()
    return buf


def _check_shape(emb: EmbeddingStore, vectors: np.ndarray) -> None:
    if vectors.ndim != 2 or vectors.shape[1] != emb.dim:
        raise StoreError(f"vectors of shape {vectors.shape} do not fit {emb.table_name} (dimension {emb.dim})")


def _csv(values) -> str:
    """Ids or hashes as one comma-separated text parameter (``string_to_array`` on the server): psycopg's
    list dumper costs ~3 µs per element in Python, this ~0.1 µs."""
    return ",".join(map(str, values))


_READY = "embedding_status = 'READY', error_code = NULL, error_message = NULL, updated_at = now()"
DEADLOCK_RETRIES = 3


def _load_block(store: Store, emb: EmbeddingStore, claim: sql.Composable, params: tuple, row_of: Callable[[tuple], int],
                vectors: np.ndarray) -> int:
    """One block, one transaction: ``claim`` flips the block's chunks to READY and returns their
    ``(id, content_sha256)``; the vectors they had are deleted and the block is COPYed straight into the
    vector table (each vector written once, in chunk id order). ``row_of`` maps a returned row to its
    vector's row. A deadlock (two tasks sharing a content hash) rolls the block back and runs it again."""
    t = store.t
    for attempt in range(DEADLOCK_RETRIES + 1):
        try:
            with store.conn.transaction():
                found = store.execute(claim, params).fetchall()
                if not found:
                    return 0
                found.sort()
                pks = np.fromiter((r[0] for r in found), dtype=np.int64, count=len(found))
                rows = np.fromiter((row_of(r) for r in found), dtype=np.int64, count=len(found))
                store.execute(sql.SQL("DELETE FROM {} WHERE chunk_pk = ANY(string_to_array(%s, ',')::bigint[])")
                              .format(t(emb.table_name)), (_csv(pks),))
                block = vectors if len(rows) == len(vectors) and (rows == np.arange(len(rows))).all() else vectors[rows]
                payload = copy_binary_payload(pks, [r[1] for r in found], block, out=_copy_buffer(),
                                              storage=emb.storage)
                with store.conn.cursor().copy(sql.SQL(
                        "COPY {} (chunk_pk, content_sha256, embedding) FROM STDIN (FORMAT BINARY)").format(
                        t(emb.table_name))) as copy:
                    copy.write(payload)
                del payload
                return len(found)
        except DeadlockDetected:
            if attempt == DEADLOCK_RETRIES:
                raise
            log.warning("vector load into %s deadlocked with another task; retrying the block", emb.table_name)
    raise AssertionError("unreachable")


def load_vectors(store: Store, emb: EmbeddingStore, chunk_pks: Sequence[int], shas: Sequence[str],
                 vectors: np.ndarray) -> int:
    """Store one block of vectors keyed by chunk id and mark those chunks READY, in one transaction.

    A vector is kept only if its chunk still has the content hash it was computed from. Returns rows loaded.
    """
    if len(chunk_pks) == 0:
        return 0
    _check_shape(emb, vectors)
    index = {int(pk): i for i, pk in enumerate(chunk_pks)}
    claim = sql.SQL("""UPDATE {chunks} c SET """ + _READY + """
        FROM unnest(string_to_array(%s, ',')::bigint[], string_to_array(%s, ',')::char(64)[]) AS v(id, sha)
        WHERE c.id = v.id AND c.content_sha256 = v.sha RETURNING c.id, c.content_sha256""").format(
        chunks=store.t("chunks"))
    return _load_block(store, emb, claim, (_csv(index), _csv(shas[i] for i in index.values())),
                       lambda r: index[r[0]], vectors)


def load_vectors_by_hash(store: Store, emb: EmbeddingStore, batch_id: str, shas: Sequence[str],
                         vectors: np.ndarray) -> int:
    """Load vectors keyed by content hash: each goes to every chunk of ``batch_id`` with that hash.

    This is how batch results are joined (by the echoed content / key, never by line order); a
    text shared by several chunks is embedded once (its vector is copied to each). The chunks are
    found through ``(corpus, content_sha256)`` and flipped to READY by the same statement. Returns
    the number of chunk vectors loaded.
    """
    if len(shas) == 0:
        return 0
    _check_shape(emb, vectors)
    index = {sha: i for i, sha in enumerate(shas)}
    claim = sql.SQL("""UPDATE {chunks} SET """ + _READY + """ WHERE corpus = %s
        AND content_sha256 = ANY(string_to_array(%s, ',')::char(64)[]) AND batch_id = %s
        RETURNING id, content_sha256""").format(chunks=store.t("chunks"))
    return _load_block(store, emb, claim, (emb.corpus, _csv(index), batch_id), lambda r: index[r[1]], vectors)


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


def hnsw_build_memory_mb(rows: int, dim: int, storage: str, m: int = 16) -> int:
    """What an HNSW build of ``rows`` vectors needs in ``maintenance_work_mem`` to keep its graph in memory, in MB:
    measured (benchmarks/vectors_scale.py, pgvector 0.8) at about the vector's own bytes + 48 bytes per ``m``
    per vector — 2.2 KB for 384-d ``vector``, 1.45 KB 384-d ``halfvec``, 3.75 KB 768-d ``vector`` — plus a
    quarter for headroom; at least PostgreSQL's default 64 MB."""
    per_vector = dim * (2 if storage == Storage.HALFVEC.value else 4) + 48 * m
    return max(64, math.ceil(rows * per_vector * 1.25 / (1 << 20)))


def build_index(store: Store, emb: EmbeddingStore, index_type: IndexType = IndexType.HNSW, *,
                hnsw_m: int = 16, hnsw_ef_construction: int = 64, ivfflat_lists: int | None = None,
                maintenance_work_mem: str | None = None) -> str | None:
    """Build the cosine index of ``emb`` if it is missing (``vector_cosine_ops`` or ``halfvec_cosine_ops``, by
    the store's column type), then ANALYZE. Returns the index name.

    ``maintenance_work_mem`` (default: sized by ``hnsw_build_memory_mb`` from the row count, capped by
    ``REINDEX_INDEX_BUILD_MEMORY_MB``) and ``max_parallel_maintenance_workers`` (``REINDEX_INDEX_BUILD_WORKERS``)
    are set for this build only."""
    from reindex.settings import index_build_memory_mb, index_build_workers

    t = store.t
    if index_type == IndexType.NONE:
        store.execute(sql.SQL("ANALYZE {}").format(t(emb.table_name)))
        return None
    index_name = f"{emb.table_name}_{index_type.value}"
    exists = store.one("SELECT 1 FROM pg_indexes WHERE schemaname = %s AND indexname = %s",
                       (store.schema, index_name))
    if not exists:
        (rows,) = store.one(sql.SQL("SELECT count(*) FROM {}").format(t(emb.table_name)))
        if maintenance_work_mem is None:
            need, cap = hnsw_build_memory_mb(rows, emb.dim, emb.storage, hnsw_m), index_build_memory_mb()
            if index_type == IndexType.HNSW and need > cap:
                log.warning("the HNSW graph of %s rows of %s needs about %d MB of maintenance_work_mem; "
                            "REINDEX_INDEX_BUILD_MEMORY_MB caps it at %d MB: the build spills to disk and runs "
                            "about 2x slower", f"{rows:,}", emb.table_name, need, cap)
            maintenance_work_mem = f"{min(need, cap)}MB"
        store.execute(sql.SQL("SET maintenance_work_mem = {}").format(sql.Literal(maintenance_work_mem)))
        store.execute(sql.SQL("SET max_parallel_maintenance_workers = {}").format(
            sql.Literal(index_build_workers())))
        if index_type == IndexType.HNSW:
            params = sql.SQL("WITH (m = {}, ef_construction = {})").format(
                sql.Literal(hnsw_m), sql.Literal(hnsw_ef_construction))
        else:
            lists = ivfflat_lists or max(1, int(rows / 1000) if rows <= 1_000_000 else int(rows**0.5))
            params = sql.SQL("WITH (lists = {})").format(sql.Literal(lists))
        log.info("building %s index %s on %s (%s rows, maintenance_work_mem %s)", index_type.value, index_name,
                 emb.table_name, f"{rows:,}", maintenance_work_mem)
        store.execute(sql.SQL("CREATE INDEX IF NOT EXISTS {idx} ON {emb} USING {method} (embedding {ops}) {params}").format(
            idx=sql.Identifier(index_name), emb=t(emb.table_name), method=sql.SQL(index_type.value),
            ops=sql.Identifier(f"{Storage(emb.storage).value}_cosine_ops"), params=params))
        store.execute("RESET maintenance_work_mem")
        store.execute("RESET max_parallel_maintenance_workers")
    store.execute(sql.SQL("UPDATE {} SET index_type = %s, index_name = %s WHERE table_name = %s").format(
        t("embedding_stores")), (index_type.value, index_name, emb.table_name))
    store.execute(sql.SQL("ANALYZE {}").format(t(emb.table_name)))
    return index_name
