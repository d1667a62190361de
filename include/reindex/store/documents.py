"""Writing a corpus scan: documents and chunks are staged with COPY and merged in one transaction.

Merge semantics (idempotent, identity-keyed): documents are upserted by ``(corpus, doc_id)``;
documents of the corpus that the scan did not see are deleted with their chunks and vectors;
chunks are upserted by ``(corpus, chunk_id)`` and a chunk whose text changed goes back to
PENDING; chunks a document no longer has are deleted. Unchanged rows are not rewritten.

Incremental scans: a document whose content hash and chunking signature match the stored ones
is not chunked again; it is staged as *unchanged* and its chunks (and vectors) are left alone.
A file whose source fingerprint (``corpus_files``) matches, read last time with the same chunking and
without a failed document, is not even read: its stored documents are staged as unchanged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import orjson
from psycopg import sql

from reindex.chunking import Chunk
from reindex.corpus import Document, FailedDocument, SourceFile
from reindex.errors import ErrorCode
from reindex.store import Store

log = logging.getLogger(__name__)


@dataclass
class MergeResult:
    documents: int
    failed_documents: int
    chunks: int
    changed_chunks: int
    deleted_documents: int
    deleted_chunks: int
    unchanged_documents: int = 0


def ensure_corpus(store: Store, corpus: str) -> None:
    store.execute(
        sql.SQL("INSERT INTO {} (corpus) VALUES (%s) ON CONFLICT (corpus) DO NOTHING").format(store.t("corpora")),
        (corpus,),
    )


class CorpusWriter:
    """Collects one scan of a corpus and merges it. Use inside ``store.conn.transaction()``."""

    def __init__(self, store: Store, corpus: str, batch_id: str, block_rows: int = 2000) -> None:
        self.store = store
        self.corpus = corpus
        self.batch_id = batch_id
        self.block_rows = block_rows
        self._docs: list[tuple] = []
        self._chunks: list[tuple] = []
        self._files: list[tuple] = []
        self._unread: list[str] = []  # unchanged files: their stored documents are staged as unchanged
        self.counts = {"documents": 0, "failed_documents": 0, "chunks": 0, "unchanged_documents": 0}

    def start(self) -> None:
        ensure_corpus(self.store, self.corpus)
        self.store.execute("""CREATE TEMP TABLE stage_docs (
            doc_id text, source_uri text, content_sha256 text, metadata jsonb, status text,
            error_code text, error_message text, chunk_count integer, chunking text,
            unchanged boolean, pos bigint) ON COMMIT DROP""")
        self.store.execute("""CREATE TEMP TABLE stage_chunks (
            chunk_id text, doc_id text, ordinal integer, text text, content_sha256 text,
            token_count integer) ON COMMIT DROP""")
        self.store.execute("""CREATE TEMP TABLE stage_files (
            source_uri text, fingerprint text, unchanged boolean) ON COMMIT DROP""")

    def unchanged_files(self, files: list[SourceFile], chunking: str) -> set[str]:
        """See ``unchanged_files``."""
        return unchanged_files(self.store, self.corpus, [(f.uri, f.fingerprint) for f in files], chunking)

    def add_source_file(self, f: SourceFile) -> None:
        """A listed file: left unread (its documents stand as stored) or just read (remember its fingerprint)."""
        self._files.append((f.uri, f.fingerprint, f.unchanged))
        if f.unchanged:
            self._unread.append(f.uri)
            if len(self._unread) >= self.block_rows:
                self.flush()

    def stored(self, doc_ids: list[str]) -> dict[str, tuple[str | None, str | None, str]]:
        """``doc_id -> (content_sha256, chunking, status)`` of the documents already in the store."""
        rows = self.store.execute(sql.SQL("""SELECT doc_id, content_sha256, chunking, status FROM {}
            WHERE corpus = %s AND doc_id = ANY(%s)""").format(self.store.t("documents")),
            (self.corpus, doc_ids)).fetchall()
        return {r[0]: (r[1], r[2], r[3]) for r in rows}

    def add_document(self, doc: Document, doc_sha256: str, chunks: list[Chunk], chunking: str | None = None,
                     pos: int | None = None) -> None:
        self._docs.append((doc.doc_id, doc.source_uri, doc_sha256, orjson.dumps(doc.metadata).decode(),
                           "OK", None, None, len(chunks), chunking, False, pos))
        self._chunks.extend((c.chunk_id, c.doc_id, c.ordinal, c.text, c.content_sha256, c.token_count)
                            for c in chunks)
        self.counts["documents"] += 1
        self.counts["chunks"] += len(chunks)
        if len(self._chunks) >= self.block_rows or len(self._docs) >= self.block_rows:
            self.flush()

    def add_unchanged(self, doc: Document, doc_sha256: str, chunking: str, pos: int | None = None) -> None:
        """A document the store already holds with this content and chunking: keep its rows as they are."""
        self._docs.append((doc.doc_id, doc.source_uri, doc_sha256, orjson.dumps(doc.metadata).decode(),
                           "OK", None, None, 0, chunking, True, pos))
        self.counts["documents"] += 1
        self.counts["unchanged_documents"] += 1
        if len(self._docs) >= self.block_rows:
            self.flush()

    def add_failed(self, doc: FailedDocument, pos: int | None = None) -> None:
        self._docs.append((doc.doc_id, doc.source_uri, None, "{}", "FAILED", str(doc.error_code), doc.reason, 0,
                           None, False, pos))
        self.counts["failed_documents"] += 1

    def flush(self) -> None:
        cur = self.store.conn.cursor()
        if self._unread:
            n = self.store.execute(sql.SQL("""INSERT INTO stage_docs (doc_id, source_uri, content_sha256, metadata,
                    status, error_code, error_message, chunk_count, chunking, unchanged)
                SELECT doc_id, source_uri, content_sha256, metadata, status, error_code, error_message, chunk_count,
                    chunking, true FROM {} WHERE corpus = %s AND source_uri = ANY(%s)""").format(
                self.store.t("documents")), (self.corpus, self._unread)).rowcount
            self.counts["documents"] += n
            self.counts["unchanged_documents"] += n
            self._unread.clear()
        for table, rows in (("stage_files", self._files), ("stage_docs", self._docs), ("stage_chunks", self._chunks)):
            if rows:
                with cur.copy(sql.SQL("COPY {} FROM STDIN").format(sql.Identifier(table))) as copy:
                    for row in rows:
                        copy.write_row(row)
                rows.clear()

    def remember_files(self, chunking: str) -> None:
        """After the merge: the fingerprints of the files read in full this scan; files gone from the listing
        (or read with a failure, or without a fingerprint) are forgotten, so the next scan reads them."""
        s, t = self.store, self.store.t
        s.execute(sql.SQL("""DELETE FROM {files} f WHERE f.corpus = %s AND NOT EXISTS (
                SELECT 1 FROM stage_files s WHERE s.source_uri = f.source_uri
                AND (s.unchanged OR s.fingerprint IS NOT NULL))""").format(files=t("corpus_files")), (self.corpus,))
        s.execute(sql.SQL("""INSERT INTO {files} AS f (corpus, source_uri, fingerprint, chunking, batch_id)
                SELECT DISTINCT ON (source_uri) %s, source_uri, fingerprint, %s, %s FROM stage_files
                WHERE NOT unchanged AND fingerprint IS NOT NULL
            ON CONFLICT (corpus, source_uri) DO UPDATE SET fingerprint = EXCLUDED.fingerprint,
                chunking = EXCLUDED.chunking, batch_id = EXCLUDED.batch_id, updated_at = now()""").format(
            files=t("corpus_files")), (self.corpus, chunking, self.batch_id))

    def merge(self, vector_table: str | None = None) -> MergeResult:
        """Merge the staged scan. With ``vector_table``, the vectors of chunks about to be deleted are
        kept in the transaction's ``reuse_pool`` temp table (content hash → vector) first, so a
        moved or renamed document's text is not embedded again."""
        self.flush()
        s, t, corpus, batch = self.store, self.store.t, self.corpus, self.batch_id
        s.execute("CREATE INDEX ON stage_chunks (chunk_id)")
        s.execute("CREATE INDEX ON stage_docs (doc_id)")
        s.execute("ANALYZE stage_docs")
        s.execute("ANALYZE stage_chunks")
        if vector_table is not None:
            s.execute(sql.SQL("""CREATE TEMP TABLE reuse_pool ON COMMIT DROP AS
                SELECT DISTINCT ON (e.content_sha256) e.content_sha256, e.embedding
                FROM {chunks} c JOIN {emb} e ON e.chunk_pk = c.id
                LEFT JOIN stage_docs d ON d.doc_id = c.doc_id
                WHERE c.corpus = %s AND (d.doc_id IS NULL OR (NOT d.unchanged
                    AND NOT EXISTS (SELECT 1 FROM stage_chunks sc WHERE sc.chunk_id = c.chunk_id)))""").format(
                chunks=t("chunks"), emb=t(vector_table)), (corpus,))
            s.execute("CREATE INDEX ON reuse_pool (content_sha256)")
        # Documents this scan did not see because a folder, file or row group above them could not be read
        # are not gone: they keep their chunks and vectors until a scan reads that path again.
        kept = s.execute(sql.SQL("""CREATE TEMP TABLE unseen_kept ON COMMIT DROP AS
            SELECT d.doc_id FROM {documents} d WHERE d.corpus = %s
                AND NOT EXISTS (SELECT 1 FROM stage_docs s WHERE s.doc_id = d.doc_id)
                AND EXISTS (SELECT 1 FROM stage_docs f WHERE f.status = 'FAILED' AND f.error_code = %s
                    AND ((right(f.doc_id, 1) = '/' AND starts_with(d.doc_id, f.doc_id))
                         OR d.source_uri = f.source_uri))""").format(documents=t("documents")),
            (corpus, ErrorCode.UNREADABLE.value)).rowcount
        if kept:
            log.warning("corpus %s: %d document(s) under unreadable paths kept as they were", corpus, kept)
        gone_chunks = s.execute(
            sql.SQL("""DELETE FROM {chunks} c WHERE c.corpus = %s
                AND NOT EXISTS (SELECT 1 FROM stage_docs s WHERE s.doc_id = c.doc_id)
                AND NOT EXISTS (SELECT 1 FROM unseen_kept k WHERE k.doc_id = c.doc_id)""").format(
                chunks=t("chunks")), (corpus,)).rowcount
        deleted_docs = s.execute(
            sql.SQL("""DELETE FROM {documents} d WHERE d.corpus = %s
                AND NOT EXISTS (SELECT 1 FROM stage_docs s WHERE s.doc_id = d.doc_id)
                AND NOT EXISTS (SELECT 1 FROM unseen_kept k WHERE k.doc_id = d.doc_id)""").format(
                documents=t("documents")), (corpus,)).rowcount
        upsert_staged_documents(s, corpus, batch)
        # Chunks of re-chunked (changed or failed) documents that the new chunking no longer has.
        deleted_chunks = s.execute(
            sql.SQL("""DELETE FROM {chunks} c USING stage_docs d WHERE c.corpus = %s
                AND c.doc_id = d.doc_id AND NOT d.unchanged
                AND NOT EXISTS (SELECT 1 FROM stage_chunks s WHERE s.chunk_id = c.chunk_id)""").format(
                chunks=t("chunks")), (corpus,)).rowcount
        changed = upsert_staged_chunks(s, corpus, batch)
        return MergeResult(
            documents=self.counts["documents"],
            failed_documents=self.counts["failed_documents"],
            chunks=self.counts["chunks"],
            changed_chunks=changed,
            deleted_documents=deleted_docs,
            deleted_chunks=deleted_chunks + gone_chunks,
            unchanged_documents=self.counts["unchanged_documents"],
        )


def unchanged_files(store: Store, corpus: str, files: list[tuple[str, str]], chunking: str) -> set[str]:
    """Of ``files`` (``(uri, fingerprint)`` as listed), the URIs whose stored documents are current: same
    fingerprint and chunking as when last read, at least one document, none of them FAILED."""
    rows = store.execute(sql.SQL("""SELECT l.uri FROM unnest(%s::text[], %s::text[]) AS l(uri, fp)
        JOIN {files} f ON f.corpus = %s AND f.source_uri = l.uri AND f.fingerprint = l.fp AND f.chunking = %s
        WHERE EXISTS (SELECT 1 FROM {documents} d WHERE d.corpus = %s AND d.source_uri = l.uri)
          AND NOT EXISTS (SELECT 1 FROM {documents} d WHERE d.corpus = %s AND d.source_uri = l.uri
                          AND d.status <> 'OK')""").format(
        files=store.t("corpus_files"), documents=store.t("documents")),
        ([u for u, _ in files], [fp for _, fp in files], corpus, chunking, corpus, corpus)).fetchall()
    return {r[0] for r in rows}


def upsert_staged_documents(s: Store, corpus: str, batch: str) -> None:
    """Write the staged documents that are not unchanged (new, changed, failed) into ``documents``."""
    s.execute(
        sql.SQL("""INSERT INTO {documents} AS d (corpus, doc_id, source_uri, content_sha256, metadata,
                status, error_code, error_message, chunk_count, chunking, last_batch_id)
            SELECT %s, doc_id, source_uri, content_sha256, metadata, status, error_code, error_message,
                chunk_count, chunking, %s FROM stage_docs WHERE NOT unchanged
            ON CONFLICT (corpus, doc_id) DO UPDATE SET
                source_uri = EXCLUDED.source_uri, content_sha256 = EXCLUDED.content_sha256,
                metadata = EXCLUDED.metadata, status = EXCLUDED.status,
                error_code = EXCLUDED.error_code, error_message = EXCLUDED.error_message,
                chunk_count = EXCLUDED.chunk_count, chunking = EXCLUDED.chunking,
                last_batch_id = EXCLUDED.last_batch_id, updated_at = now()""").format(documents=s.t("documents")),
        (corpus, batch))


def upsert_staged_chunks(s: Store, corpus: str, batch: str) -> int:
    """Upsert the staged chunks: a new chunk, or one whose text, ordinal or document changed, becomes PENDING for
    ``batch``; an unchanged one is not rewritten. Returns how many were written."""
    return s.execute(
        sql.SQL("""INSERT INTO {chunks} AS c (corpus, chunk_id, doc_id, ordinal, text, content_sha256,
                token_count, embedding_status, batch_id)
            SELECT %s, chunk_id, doc_id, ordinal, text, content_sha256, token_count, 'PENDING', %s
            FROM stage_chunks
            ON CONFLICT (corpus, chunk_id) DO UPDATE SET
                doc_id = EXCLUDED.doc_id, ordinal = EXCLUDED.ordinal, text = EXCLUDED.text,
                content_sha256 = EXCLUDED.content_sha256, token_count = EXCLUDED.token_count,
                embedding_status = 'PENDING', retry_count = 0, error_code = NULL,
                error_message = NULL, batch_id = EXCLUDED.batch_id, updated_at = now()
            WHERE c.content_sha256 IS DISTINCT FROM EXCLUDED.content_sha256
               OR c.ordinal IS DISTINCT FROM EXCLUDED.ordinal
               OR c.doc_id IS DISTINCT FROM EXCLUDED.doc_id""").format(chunks=s.t("chunks")),
        (corpus, batch)).rowcount
