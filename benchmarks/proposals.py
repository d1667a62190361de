"""Earlier versions of store functions, swapped in by the suite in the measuring process only, so that a
change is measured against what it replaced in the same run (``--no-variants`` skips them).

``apply("staged")`` restores the vector load as it was before P1 (``benchmarks/PROPOSALS.md``): each block
COPYed into a temp table, then ``INSERT … SELECT … JOIN chunks … ON CONFLICT`` (every vector written a
second time) and a separate status ``UPDATE``. (P5, the HOT status updates, is a schema change and stays.)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from psycopg import sql

from reindex.store import Store
from reindex.store.vectors import EmbeddingStore, copy_binary_payload


def load_vectors_by_hash_staged(store: Store, emb: EmbeddingStore, batch_id: str, shas: Sequence[str],
                                vectors: np.ndarray) -> int:
    """The load before P1: stage, index the stage, upsert by join, flip the statuses."""
    if len(shas) == 0:
        return 0
    t = store.t
    with store.conn.transaction():
        payload = copy_binary_payload(np.zeros(len(shas), dtype=np.int64), shas, vectors.astype(np.float32, copy=False))
        store.execute(sql.SQL("""CREATE TEMP TABLE IF NOT EXISTS stage_vectors (
            chunk_pk bigint, content_sha256 char(64), embedding vector({dim})) ON COMMIT DROP""").format(
            dim=sql.Literal(emb.dim)))
        with store.conn.cursor().copy("COPY stage_vectors FROM STDIN (FORMAT BINARY)") as copy:
            copy.write(payload)
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


def apply(name: str) -> None:
    from reindex.vertex import batch

    if name == "staged":
        batch.load_vectors_by_hash = load_vectors_by_hash_staged
    else:
        raise ValueError(f"unknown variant {name!r}")
