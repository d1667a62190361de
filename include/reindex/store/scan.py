"""A sharded corpus scan in the store: the batch's listing, its shards, and which shard owns each document.

The listing task writes the corpus listing (``scan_files``: one row per file, or per part of a large file, in
scan order) and assigns contiguous runs of it to at most ``MAX_SCAN_SHARDS`` shards (``scan_shards``). Each
shard reads its rows, stages its documents and chunks like a single-task scan (``CorpusWriter``) and merges
them in its own transaction (``merge_shard``):

- it records the documents it met in ``scan_seen`` with their position in scan order. A document id met by two
  shards belongs to the first occurrence in scan order, as in a single-task scan: the later one is dropped from
  the later shard's stage (whichever shard commits first), and a shard that finds its own earlier occurrence
  already written by a later shard rewrites it;
- it upserts its new, changed and failed documents and their chunks (a changed chunk goes back to PENDING).
  It deletes nothing: chunks a re-chunked document no longer has (ordinals past its new ``chunk_count``) and
  documents gone from the corpus are deleted once, by ``finish``, after every shard has reported.

A shard rerun rewrites the same rows (the same positions win, the upserts find nothing to change). ``finish``
decides deletions, remembers file fingerprints, counts, and clears the listing and ownership rows.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import orjson
from psycopg import sql
from psycopg.types.json import Jsonb

from reindex.corpus import ListedFile
from reindex.errors import ErrorCode, StoreError
from reindex.store import Store
from reindex.store.documents import upsert_staged_chunks, upsert_staged_documents

log = logging.getLogger(__name__)

# At most this many mapped scan tasks per run (Airflow's max_map_length is 1,024; the grid stays readable).
MAX_SCAN_SHARDS = 256
# A document's position in scan order: its listing entry's position in the high bits, its order in the entry low.
POSITION_SHIFT = 32


class ScanConflict(RuntimeError):
    """A document this shard staged as unchanged was rewritten meanwhile by another shard (a duplicate id in a
    later file): the shard's transaction is rolled back and the task's retry reads it again. Not terminal."""


def doc_position(entry_position: int, seq: int) -> int:
    return (entry_position << POSITION_SHIFT) | seq


def reset(store: Store, corpus: str, batch_id: str) -> None:
    """Start this batch's scan afresh: forget its earlier listing, shards and ownership (a rerun of the listing
    task), and the leftovers of this corpus's scans that never finished (their runs died; the lease says no
    other scan of the corpus is running)."""
    t = store.t
    for table in ("scan_files", "scan_seen"):
        store.execute(sql.SQL("""DELETE FROM {x} x USING {batches} b WHERE b.batch_id = x.batch_id
            AND b.corpus = %s""").format(x=t(table), batches=t("batches")), (corpus,))
    store.execute(sql.SQL("DELETE FROM {} WHERE batch_id = %s").format(t("scan_shards")), (batch_id,))


def begin_listing(store: Store) -> None:
    """Open the transaction's listing stage (``scan_listing``), which ``write_listing`` fills and
    ``close_listing`` turns into the batch's listing."""
    store.execute(sql.SQL("""CREATE TEMP TABLE scan_listing ON COMMIT DROP AS
        SELECT position, rel, source_uri, fingerprint, size, problem, part, unchanged FROM {} WITH NO DATA""").format(
        store.t("scan_files")))


def write_listing(store: Store, rows: Iterable[tuple[int, ListedFile, bool]]) -> None:
    """Stage ``(position, entry, unchanged)`` rows of the listing (``unchanged``: already known unchanged)."""
    cur = store.conn.cursor()
    with cur.copy("""COPY scan_listing (position, rel, source_uri, fingerprint, size, problem, part, unchanged)
            FROM STDIN""") as copy:
        for position, e, unchanged in rows:
            copy.write_row((position, e.rel, e.uri, e.fingerprint, e.size, e.problem,
                            orjson.dumps(e.part).decode() if e.part is not None else None, unchanged))


def close_listing(store: Store, corpus: str, batch_id: str, chunking: str | None) -> None:
    """Write the staged listing as the batch's, with change detection for the whole listing at once (``chunking``;
    None reads everything): a whole file is left unread when ``unchanged_files`` would say so — its fingerprint
    and chunking are as remembered, it has documents and none of them FAILED. Set-based (hash joins over the
    listing, ``corpus_files`` and ``documents``) instead of three index probes per file: 26 s of a 1M-file
    nightly listing went into those probes."""
    t = store.t
    store.execute("ANALYZE scan_listing")
    # Hash joins, whatever the statistics say: right after a full scan wrote corpus_files and documents, before
    # autovacuum has analysed them, the planner takes them for a few rows and nests a loop over the grouped
    # documents per listed file (over 10 minutes at 200,000 files, measured). Reset right after the statement.
    nestloop = store.one("SELECT current_setting('enable_nestloop')")[0]
    store.execute("SET LOCAL enable_nestloop = off")
    if chunking is None:
        settled = sql.SQL("SELECT NULL::text AS source_uri, NULL::text AS fingerprint WHERE false")
        params: tuple = (batch_id,)
    else:
        settled = sql.SQL("""SELECT f.source_uri, f.fingerprint FROM {files} f JOIN (
                SELECT source_uri FROM {documents} WHERE corpus = %s AND source_uri IS NOT NULL GROUP BY source_uri
                HAVING count(*) FILTER (WHERE status <> 'OK') = 0) d ON d.source_uri = f.source_uri
            WHERE f.corpus = %s AND f.chunking = %s""").format(files=t("corpus_files"), documents=t("documents"))
        params = (batch_id, corpus, corpus, chunking)
    store.execute(sql.SQL("""INSERT INTO {files} (batch_id, position, rel, source_uri, fingerprint, size, problem,
            part, unchanged)
        SELECT %s, l.position, l.rel, l.source_uri, l.fingerprint, l.size, l.problem, l.part,
               l.unchanged OR k.source_uri IS NOT NULL
        FROM scan_listing l LEFT JOIN ({settled}) k ON k.source_uri = l.source_uri AND k.fingerprint = l.fingerprint
            AND l.part IS NULL AND l.problem IS NULL""").format(files=t("scan_files"), settled=settled), params)
    store.execute(sql.SQL("SET LOCAL enable_nestloop = {}").format(sql.Literal(nestloop)))
    store.execute("DROP TABLE scan_listing")


def assign_shards(store: Store, batch_id: str, shard_bytes: int, shard_files: int) -> list[dict]:
    """Split the listing's entries to read into contiguous shards of about ``shard_bytes`` and at most
    ``shard_files`` entries, both grown so there are at most ``MAX_SCAN_SHARDS``. Returns the shards in order:
    ``{"shard", "entries", "bytes"}`` (an entry counts at least one byte)."""
    t = store.t
    # the listing was just written in this transaction: without fresh statistics the planner takes the UPDATE
    # below for a tiny table (the benchmark measured 279 s in it for 200,000 files of which 2,000 were read)
    store.execute(sql.SQL("ANALYZE {}").format(t("scan_files")))
    n, total = store.one(sql.SQL("""SELECT count(*), coalesce(sum(greatest(size, 1)), 0) FROM {}
        WHERE batch_id = %s AND NOT unchanged""").format(t("scan_files")), (batch_id,))
    if not n:
        return []
    per_bytes = max(shard_bytes, math.ceil(total / MAX_SCAN_SHARDS))
    per_files = max(shard_files, math.ceil(n / MAX_SCAN_SHARDS))
    # both cumulative measures grow along the listing, so the greater of the two shard numbers does too; each
    # stays below MAX_SCAN_SHARDS by the choice of the sizes above. dense_rank closes the gaps.
    store.execute(sql.SQL("""UPDATE {files} f SET shard = r.shard FROM (
            SELECT position, dense_rank() OVER (ORDER BY raw) - 1 AS shard FROM (
                SELECT position, greatest(floor((cum - w) / %s::numeric), floor((rn - 1) / %s::numeric)) AS raw
                FROM (SELECT position, greatest(size, 1) AS w,
                             sum(greatest(size, 1)) OVER (ORDER BY position) AS cum,
                             row_number() OVER (ORDER BY position) AS rn
                      FROM {files} WHERE batch_id = %s AND NOT unchanged) a) b) r
        WHERE f.batch_id = %s AND f.position = r.position""").format(files=t("scan_files")),
        (per_bytes, per_files, batch_id, batch_id))
    rows = store.execute(sql.SQL("""INSERT INTO {shards} (batch_id, shard, entries, bytes)
            SELECT %s, shard, count(*), sum(size) FROM {files} WHERE batch_id = %s AND shard IS NOT NULL
            GROUP BY shard
        RETURNING shard, entries, bytes""").format(shards=t("scan_shards"), files=t("scan_files")),
        (batch_id, batch_id)).fetchall()
    return [{"shard": r[0], "entries": r[1], "bytes": r[2]} for r in sorted(rows)]


def shard_entries(store: Store, batch_id: str, shard: int) -> list[tuple[int, ListedFile]]:
    """The listing entries of one shard, in scan order."""
    rows = store.execute(sql.SQL("""SELECT position, rel, source_uri, fingerprint, size, problem, part FROM {}
        WHERE batch_id = %s AND shard = %s ORDER BY position""").format(store.t("scan_files")),
        (batch_id, shard)).fetchall()
    return [(r[0], ListedFile(r[1], r[2], r[3], r[4], r[5], r[6])) for r in rows]


def listing_stats(store: Store, batch_id: str) -> dict:
    """The listing in figures: ``files`` (supported files met), ``unchanged_files`` (left unread), ``read_files``
    (to open: a split file counts once), ``entries`` (files, parts and unreadable paths the shards handle)."""
    files, unchanged, read, entries = store.one(sql.SQL("""SELECT
            count(DISTINCT source_uri) FILTER (WHERE rel NOT LIKE '%%/'), count(*) FILTER (WHERE unchanged),
            count(DISTINCT source_uri) FILTER (WHERE NOT unchanged AND problem IS NULL),
            count(*) FILTER (WHERE NOT unchanged)
        FROM {} WHERE batch_id = %s""").format(store.t("scan_files")), (batch_id,))
    return {"files": files, "unchanged_files": unchanged, "read_files": read, "entries": entries}


def merge_shard(store: Store, corpus: str, batch_id: str) -> dict:
    """Merge a shard's staged documents and chunks (``CorpusWriter`` stage tables, already flushed) in the
    caller's transaction; see the module docstring. Returns ``{"cross_shard_duplicates", "changed_chunks"}``."""
    t = store.t
    store.execute("CREATE INDEX ON stage_docs (doc_id)")
    store.execute("ANALYZE stage_docs")
    # ownership in doc_id order: two shards meeting the same ids lock them in the same order (no deadlock)
    store.execute(sql.SQL("""INSERT INTO {seen} AS s (batch_id, doc_id, pos, unchanged)
            SELECT %s, doc_id, pos, unchanged FROM stage_docs ORDER BY doc_id
        ON CONFLICT (batch_id, doc_id) DO UPDATE SET pos = EXCLUDED.pos, unchanged = EXCLUDED.unchanged
        WHERE s.pos >= EXCLUDED.pos""").format(seen=t("scan_seen")), (batch_id,))
    lost = store.execute(sql.SQL("""DELETE FROM stage_docs d USING {seen} s
        WHERE s.batch_id = %s AND s.doc_id = d.doc_id AND s.pos < d.pos""").format(seen=t("scan_seen")),
        (batch_id,)).rowcount
    if lost:
        store.execute("DELETE FROM stage_chunks c WHERE NOT EXISTS (SELECT 1 FROM stage_docs d WHERE d.doc_id = c.doc_id)")
    (conflicts,) = store.one(sql.SQL("""SELECT count(*) FROM stage_docs s JOIN {documents} d
            ON d.corpus = %s AND d.doc_id = s.doc_id
        WHERE s.unchanged AND (d.content_sha256 IS DISTINCT FROM s.content_sha256
            OR d.chunking IS DISTINCT FROM s.chunking OR d.status <> 'OK')""").format(documents=t("documents")),
        (corpus,))
    if conflicts:
        raise ScanConflict(f"batch {batch_id}: {conflicts} document(s) this shard found unchanged were rewritten by "
                           "another shard meanwhile (a document id that also appears later in the corpus); the "
                           "shard is read again")
    upsert_staged_documents(store, corpus, batch_id)
    changed = upsert_staged_chunks(store, corpus, batch_id)
    return {"cross_shard_duplicates": lost, "changed_chunks": changed}


def mark_shard_done(store: Store, batch_id: str, shard: int, counts: dict, unreadable: list[int]) -> None:
    """Record a shard's counts and which of its entries could not be read in full (their fingerprints are not
    remembered, so the next scan reads them again)."""
    t = store.t
    store.execute(sql.SQL("""UPDATE {} SET read_ok = NOT (position = ANY(%s))
        WHERE batch_id = %s AND shard = %s""").format(t("scan_files")), (unreadable, batch_id, shard))
    store.execute(sql.SQL("""UPDATE {} SET status = 'DONE', counts = %s, attempts = attempts + 1,
            finished_at = now() WHERE batch_id = %s AND shard = %s""").format(t("scan_shards")),
        (Jsonb(counts), batch_id, shard))


def unfinished_shards(store: Store, batch_id: str) -> list[int]:
    rows = store.execute(sql.SQL("SELECT shard FROM {} WHERE batch_id = %s AND status <> 'DONE' ORDER BY shard")
                         .format(store.t("scan_shards")), (batch_id,)).fetchall()
    return [r[0] for r in rows]


def shard_totals(store: Store, batch_id: str) -> dict:
    """The shards' counts added up (``items``: documents and failures met, repeats included, …)."""
    rows = store.execute(sql.SQL("SELECT counts FROM {} WHERE batch_id = %s ORDER BY shard").format(
        store.t("scan_shards")), (batch_id,)).fetchall()
    out: dict[str, float] = {}
    for (counts,) in rows:
        for k, v in counts.items():
            if isinstance(v, int | float):
                out[k] = out.get(k, 0) + v
    out["shards"] = len(rows)
    return out


def chunk_mark(store: Store) -> int:
    """The highest chunk row id so far: a chunk of the corpus with a greater id was written by the scan that took
    the mark (the lease keeps a corpus to one scan at a time)."""
    return store.one(sql.SQL("SELECT coalesce(max(id), 0) FROM {}").format(store.t("chunks")))[0]


def finish(store: Store, corpus: str, batch_id: str, chunking: str, vector_table: str | None, *,
           chunk_mark: int | None = None) -> dict:
    """After every shard: delete what the scan did not see and what re-chunked documents no longer have, remember
    the fingerprints of the files read in full, and count. Run in the caller's transaction; with
    ``vector_table`` the vectors of the chunks deleted are kept in the transaction's ``reuse_pool`` (content
    hash → vector) first, for the claim that follows. Raises ``StoreError`` when a shard has not finished.

    ``deleted_chunks`` counts the chunks that were in the store before the scan (ids up to ``chunk_mark``, the
    listing's ``chunk_mark``): when a later occurrence of a document id commits first, its extra chunks are
    written and then deleted here, which a single-task scan never writes, so they are not counted."""
    t = store.t
    pending = unfinished_shards(store, batch_id)
    if pending:
        raise StoreError(f"batch {batch_id}: scan shard(s) {pending[:10]} have not finished; the scan cannot be "
                         "closed (deletions are decided only once every shard has reported)")
    # documents of the corpus this scan did not see: not owned by a shard, not in a file left unread (NOT EXISTS,
    # an anti-join: a NOT IN over a listing too large to hash in work_mem is a nested scan, hours at 200k files)
    store.execute(sql.SQL("""CREATE TEMP TABLE scan_gone ON COMMIT DROP AS
        SELECT d.doc_id, d.source_uri FROM {documents} d WHERE d.corpus = %s
            AND NOT EXISTS (SELECT 1 FROM {seen} s WHERE s.batch_id = %s AND s.doc_id = d.doc_id)
            AND NOT EXISTS (SELECT 1 FROM {files} f WHERE f.batch_id = %s AND f.unchanged
                            AND f.source_uri = d.source_uri)""").format(
        documents=t("documents"), seen=t("scan_seen"), files=t("scan_files")), (corpus, batch_id, batch_id))
    # ... but those under a folder, file or part that could not be read are not gone: they keep their rows
    kept = store.execute(sql.SQL("""DELETE FROM scan_gone g WHERE EXISTS (
            SELECT 1 FROM {seen} s JOIN {documents} f ON f.corpus = %s AND f.doc_id = s.doc_id
            WHERE s.batch_id = %s AND f.status = 'FAILED' AND f.error_code = %s
              AND ((right(f.doc_id, 1) = '/' AND starts_with(g.doc_id, f.doc_id)) OR g.source_uri = f.source_uri))""")
        .format(seen=t("scan_seen"), documents=t("documents")),
        (corpus, batch_id, ErrorCode.UNREADABLE.value)).rowcount
    if kept:
        log.warning("corpus %s: %d document(s) under unreadable paths kept as they were", corpus, kept)
    store.execute("ANALYZE scan_gone")
    # the chunks to delete: those the documents read by this scan no longer have (ordinals past the document's
    # chunk count; a failed document has none), and those of the documents gone
    store.execute(sql.SQL("""CREATE TEMP TABLE scan_dead ON COMMIT DROP AS
        SELECT c.id, false AS gone FROM {seen} s JOIN {documents} d ON d.corpus = %s AND d.doc_id = s.doc_id
            JOIN {chunks} c ON c.corpus = %s AND c.doc_id = d.doc_id
        WHERE s.batch_id = %s AND c.ordinal >= d.chunk_count
        UNION ALL
        SELECT c.id, true FROM scan_gone g JOIN {chunks} c ON c.corpus = %s AND c.doc_id = g.doc_id""").format(
        seen=t("scan_seen"), documents=t("documents"), chunks=t("chunks")), (corpus, corpus, batch_id, corpus))
    store.execute("ANALYZE scan_dead")
    if vector_table is not None:
        store.execute(sql.SQL("""CREATE TEMP TABLE reuse_pool ON COMMIT DROP AS
            SELECT DISTINCT ON (e.content_sha256) e.content_sha256, e.embedding
            FROM scan_dead x JOIN {emb} e ON e.chunk_pk = x.id""").format(emb=t(vector_table)))
        store.execute("CREATE INDEX ON reuse_pool (content_sha256)")
    orphans, gone_chunks = store.one(
        "SELECT count(*) FILTER (WHERE NOT gone AND id <= %(m)s), count(*) FILTER (WHERE gone AND id <= %(m)s) "
        "FROM scan_dead", {"m": chunk_mark if chunk_mark is not None else 2 ** 62})
    store.execute(sql.SQL("DELETE FROM {} c USING scan_dead x WHERE c.id = x.id").format(t("chunks")))
    deleted_docs = store.execute(sql.SQL("""DELETE FROM {documents} d USING scan_gone g
        WHERE d.corpus = %s AND d.doc_id = g.doc_id""").format(documents=t("documents")), (corpus,)).rowcount
    _remember_files(store, corpus, batch_id, chunking)
    return {"deleted_documents": deleted_docs, "deleted_chunks": orphans + gone_chunks, **_counts(store, corpus,
                                                                                                   batch_id)}


def _remember_files(store: Store, corpus: str, batch_id: str, chunking: str) -> None:
    """The fingerprints of the files read in full (every part of a split file); files gone from the listing, read
    with a failure, or without a fingerprint are forgotten, so the next scan reads them."""
    t = store.t
    store.execute(sql.SQL("""CREATE TEMP TABLE scan_read ON COMMIT DROP AS
        SELECT source_uri, min(fingerprint) AS fingerprint, bool_and(unchanged) AS unchanged FROM {files}
        WHERE batch_id = %s AND (unchanged OR (fingerprint IS NOT NULL AND problem IS NULL))
        GROUP BY source_uri HAVING bool_and(unchanged OR coalesce(read_ok, false))""").format(
        files=t("scan_files")), (batch_id,))
    store.execute(sql.SQL("""DELETE FROM {cf} f WHERE f.corpus = %s
        AND NOT EXISTS (SELECT 1 FROM scan_read s WHERE s.source_uri = f.source_uri)""").format(
        cf=t("corpus_files")), (corpus,))
    store.execute(sql.SQL("""INSERT INTO {cf} AS f (corpus, source_uri, fingerprint, chunking, batch_id)
            SELECT %s, source_uri, fingerprint, %s, %s FROM scan_read WHERE NOT unchanged
        ON CONFLICT (corpus, source_uri) DO UPDATE SET fingerprint = EXCLUDED.fingerprint,
            chunking = EXCLUDED.chunking, batch_id = EXCLUDED.batch_id, updated_at = now()""").format(
        cf=t("corpus_files")), (corpus, chunking, batch_id))


def _counts(store: Store, corpus: str, batch_id: str) -> dict:
    """What the scan found, counted from the store after the merge (the same figures as a single-task scan)."""
    t = store.t
    # written by this batch (new, changed, failed) or left as it was: by the document's last batch, not by how the
    # last attempt of a shard staged it — a shard rerun finds its own first attempt's documents unchanged
    ok, failed, unchanged, rechunked, seen = store.one(sql.SQL("""SELECT
            count(*) FILTER (WHERE d.status = 'OK'), count(*) FILTER (WHERE d.status = 'FAILED'),
            count(*) FILTER (WHERE d.status = 'OK' AND d.last_batch_id IS DISTINCT FROM %s),
            coalesce(sum(d.chunk_count) FILTER (WHERE d.status = 'OK' AND d.last_batch_id = %s), 0), count(*)
        FROM {seen} s JOIN {documents} d ON d.corpus = %s AND d.doc_id = s.doc_id
        WHERE s.batch_id = %s""").format(seen=t("scan_seen"), documents=t("documents")),
        (batch_id, batch_id, corpus, batch_id))
    (unread,) = store.one(sql.SQL("""SELECT count(*) FROM {documents} d WHERE d.corpus = %s AND d.source_uri IN (
            SELECT source_uri FROM {files} WHERE batch_id = %s AND unchanged)""").format(
        documents=t("documents"), files=t("scan_files")), (corpus, batch_id))
    (changed,) = store.one(sql.SQL("SELECT count(*) FROM {} WHERE corpus = %s AND batch_id = %s").format(
        t("chunks")), (corpus, batch_id))
    failures = store.execute(sql.SQL("""SELECT d.doc_id, d.error_code, d.error_message
        FROM {seen} s JOIN {documents} d ON d.corpus = %s AND d.doc_id = s.doc_id
        WHERE s.batch_id = %s AND d.status = 'FAILED' ORDER BY s.pos LIMIT 20""").format(
        seen=t("scan_seen"), documents=t("documents")), (corpus, batch_id)).fetchall()
    return {"documents": ok + unread, "unchanged_documents": unchanged + unread, "failed_documents": failed,
            "rechunked_chunks": int(rechunked), "changed_chunks": changed, "seen_documents": seen,
            "document_failures": [{"doc_id": r[0], "error_code": r[1], "reason": r[2]} for r in failures]}


def clear(store: Store, batch_id: str) -> None:
    """Drop the finished scan's listing and ownership rows (the shards' rows stay with the batch)."""
    for table in ("scan_files", "scan_seen"):
        store.execute(sql.SQL("DELETE FROM {} WHERE batch_id = %s").format(store.t(table)), (batch_id,))
