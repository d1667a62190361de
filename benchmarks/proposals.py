"""Proposed changes to ``reindex.store.vectors``, measured by the suite before they are applied there.

``apply("P1")`` swaps ``reindex.vertex.batch.load_vectors_by_hash`` for ``load_vectors_by_hash_direct``
in the measuring process only. The exact diff for ``include/reindex/store/vectors.py`` is in
``benchmarks/PROPOSALS.md``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from psycopg import sql

from reindex.store import Store
from reindex.store.vectors import EmbeddingStore, copy_binary_payload


def load_vectors_by_hash_direct(store: Store, emb: EmbeddingStore, batch_id: str, shas: Sequence[str],
                                vectors: np.ndarray) -> int:
    """P1: look the batch's chunks up by (corpus, content hash) — index scan, rows locked — then COPY the
    block straight into the vector table (after deleting rows being replaced) and flip the chunks to
    READY; one transaction. Same result as the staged upsert, without a temp table, its index, the
    INSERT … SELECT and a second TOAST pass over every vector."""
    if len(shas) == 0:
        return 0
    if vectors.ndim != 2 or vectors.shape[1] != emb.dim:
        from reindex.errors import StoreError

        raise StoreError(f"vectors of shape {vectors.shape} do not fit {emb.table_name} (dimension {emb.dim})")
    t = store.t
    row_of = {sha: i for i, sha in enumerate(shas)}
    with store.conn.transaction():
        found = store.execute(sql.SQL("""SELECT id, content_sha256 FROM {chunks}
            WHERE corpus = %s AND content_sha256 = ANY(%s::char(64)[]) AND batch_id = %s ORDER BY id FOR UPDATE""").format(
            chunks=t("chunks")), (emb.corpus, list(shas), batch_id)).fetchall()
        if not found:
            return 0
        pks = np.fromiter((r[0] for r in found), dtype=np.int64, count=len(found))
        rows = np.fromiter((row_of[r[1]] for r in found), dtype=np.int64, count=len(found))
        store.execute(sql.SQL("DELETE FROM {} WHERE chunk_pk = ANY(%s)").format(t(emb.table_name)), (pks.tolist(),))
        payload = copy_binary_payload(pks, [r[1] for r in found], vectors[rows].astype(np.float32, copy=False))
        with store.conn.cursor().copy(sql.SQL("COPY {} (chunk_pk, content_sha256, embedding) FROM STDIN (FORMAT BINARY)")
                                      .format(t(emb.table_name))) as copy:
            copy.write(payload)
        store.execute(sql.SQL("""UPDATE {chunks} SET embedding_status = 'READY', error_code = NULL,
                error_message = NULL, updated_at = now() WHERE id = ANY(%s)""").format(chunks=t("chunks")),
                      (pks.tolist(),))
    return len(found)


def apply(name: str) -> None:
    from reindex.vertex import batch

    if name == "P1":
        batch.load_vectors_by_hash = load_vectors_by_hash_direct
    else:
        raise ValueError(f"unknown proposal {name!r}")
