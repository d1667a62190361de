"""Batches: which chunks a run embeds, how they are partitioned, and how the batch ends."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

from psycopg import sql
from psycopg.types.json import Jsonb

from reindex.config import MAX_PARTITIONS
from reindex.errors import ErrorCode
from reindex.retry import RetryAction, RetryPolicy, decide
from reindex.status import BatchStatus, BatchSummary, compute_batch_status
from reindex.store import Store
from reindex.store.vectors import EmbeddingStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Partition:
    batch_id: str
    index: int
    lo: int
    hi: int
    count: int

    def to_dict(self) -> dict:
        return {"batch_id": self.batch_id, "index": self.index, "lo": self.lo, "hi": self.hi, "count": self.count}


def create_batch(store: Store, batch_id: str, corpus: str, backend: str, model_checksum: str, *,
                 kind: str = "full", parent_batch_id: str | None = None, dag_run_id: str | None = None,
                 dag_id: str | None = None) -> None:
    """Insert the batch, or reset it to RUNNING when a task rerun reuses the same id."""
    store.execute(sql.SQL("""INSERT INTO {} (batch_id, corpus, backend, model_checksum, kind, parent_batch_id,
            dag_run_id, dag_id)
        VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
        ON CONFLICT (batch_id) DO UPDATE SET status = 'RUNNING', finished_at = NULL, started_at = now()""").format(
        store.t("batches")), (batch_id, corpus, backend, model_checksum, kind, parent_batch_id, dag_run_id, dag_id))


def claim_stale_chunks(store: Store, corpus: str, batch_id: str, emb: EmbeddingStore, *, force: bool = False,
                       keep_content_failures: bool = True, reuse_pool: str | None = None,
                       convert_from: EmbeddingStore | None = None) -> dict:
    """Assign to ``batch_id`` every chunk of ``corpus`` that needs a vector in ``emb``.

    A chunk has a current vector when its row in ``emb`` carries the chunk's content hash. Before
    claiming, a chunk without one gets a copy of any vector in ``emb`` computed from the same text
    (same content hash, any document of the corpus, or ``reuse_pool``: the vectors of chunks the
    scan just deleted): embedding reuse, no encode, no submission.
    Chunks that already failed for their text (``CONTENT_CODES``, retries exhausted) stay FAILED
    when ``keep_content_failures``. With ``force`` every chunk is re-embedded.

    ``convert_from``: a ``vector`` store of the same model as the ``halfvec`` store ``emb``; its current
    vectors are cast to half floats (the same rounding as storing a fresh vector there) instead of
    embedding again — switching a corpus to ``halfvec`` costs no encode and no batch job. Vectors
    with a value beyond the half range (norm over 65504) are left to be embedded and fail there.

    Returns ``{"pending", "reused", "reused_by_content", "converted", "kept_failed"}``. Runs in the caller's
    transaction (or in one of its own).
    """
    with store.conn.transaction():
        return _claim_stale(store, corpus, batch_id, emb, force, keep_content_failures, reuse_pool, convert_from)


def _claim_stale(store: Store, corpus: str, batch_id: str, emb: EmbeddingStore, force: bool,
                 keep_content_failures: bool, reuse_pool: str | None, convert_from: EmbeddingStore | None) -> dict:
    from reindex.retry import content_failures_kept

    t = store.t
    current = sql.SQL("EXISTS (SELECT 1 FROM {emb} e WHERE e.chunk_pk = c.id AND e.content_sha256 = c.content_sha256)").format(
        emb=t(emb.table_name))
    by_content = converted = 0
    if convert_from is not None and not force:
        if (convert_from.storage, emb.storage) != ("vector", "halfvec") or convert_from.dim != emb.dim:
            raise ValueError(f"cannot convert {convert_from.table_name} ({convert_from.storage}, {convert_from.dim}-d) "
                             f"into {emb.table_name} ({emb.storage}, {emb.dim}-d)")
        converted = store.execute(sql.SQL("""INSERT INTO {emb} (chunk_pk, content_sha256, embedding)
            SELECT o.chunk_pk, o.content_sha256, o.embedding::halfvec FROM {old} o
            JOIN {chunks} c ON c.id = o.chunk_pk AND c.content_sha256 = o.content_sha256
            WHERE c.corpus = %s AND vector_norm(o.embedding) <= 65504 AND NOT {current}
            ON CONFLICT (chunk_pk) DO UPDATE SET content_sha256 = EXCLUDED.content_sha256,
                embedding = EXCLUDED.embedding, updated_at = now()""").format(
            emb=t(emb.table_name), old=t(convert_from.table_name), chunks=t("chunks"), current=current),
            (corpus,)).rowcount
    # one anti-join finds the chunks without a current vector (a handful in a nightly run, the whole corpus in a
    # new one); everything below works on them alone instead of joining the corpus against its vectors again
    store.execute(sql.SQL("""CREATE TEMP TABLE claim_stale ON COMMIT DROP AS
        SELECT c.id, c.content_sha256 FROM {chunks} c WHERE c.corpus = %s AND NOT {current}""").format(
        chunks=t("chunks"), current=current), (corpus,))
    (stale,) = store.one("SELECT count(*) FROM claim_stale")
    if stale:
        store.execute("CREATE UNIQUE INDEX ON claim_stale (id)")
        store.execute("ANALYZE claim_stale")
    if not force and stale:
        sources = sql.SQL("SELECT content_sha256, embedding FROM {emb}").format(emb=t(emb.table_name))
        if reuse_pool:
            sources = sql.SQL("{} UNION ALL SELECT content_sha256, embedding FROM {}").format(
                sources, sql.Identifier(reuse_pool))
        by_content = store.execute(sql.SQL("""INSERT INTO {emb} (chunk_pk, content_sha256, embedding)
            SELECT DISTINCT ON (s.id) s.id, s.content_sha256, src.embedding
            FROM claim_stale s JOIN ({sources}) src ON src.content_sha256 = s.content_sha256
            ORDER BY s.id
            ON CONFLICT (chunk_pk) DO UPDATE SET content_sha256 = EXCLUDED.content_sha256,
                embedding = EXCLUDED.embedding, updated_at = now()""").format(
            emb=t(emb.table_name), sources=sources)).rowcount
    # the retry policy's own table (reindex.retry), turned into SQL: code → retry_count from which it stays FAILED
    limits = content_failures_kept()
    keep = sql.SQL("c.embedding_status = 'FAILED' AND c.error_code = ANY(%s) AND c.retry_count >= (CASE c.error_code "
                   "{} END)").format(sql.SQL(" ").join(sql.SQL("WHEN {} THEN {}").format(sql.Literal(code), sql.Literal(n))
                                                       for code, n in limits.items()))
    kept_codes = sorted(limits) if keep_content_failures and not force else []
    claim = sql.SQL("""UPDATE {chunks} c SET batch_id = %s, embedding_status = 'PENDING',
            retry_count = 0, error_code = NULL, error_message = NULL, updated_at = now()""").format(chunks=t("chunks"))
    if force:
        claimed = store.execute(claim + sql.SQL(" WHERE c.corpus = %s"), (batch_id, corpus)).rowcount
    else:
        if stale:
            # a chunk the scan's merge just wrote (new or changed) is claimed already: PENDING for this batch with
            # a clean slate; rewriting it would only add a dead row version per chunk (a whole new corpus's worth)
            store.execute(claim + sql.SQL(""" FROM claim_stale s WHERE c.id = s.id AND NOT {current} AND NOT ({keep})
                AND (c.batch_id IS DISTINCT FROM %s OR c.embedding_status <> 'PENDING' OR c.retry_count <> 0
                     OR c.error_code IS NOT NULL OR c.error_message IS NOT NULL)""").format(
                current=current, keep=keep), (batch_id, kept_codes, batch_id))
        # Chunks with a current vector are READY; the merge's provisional claim on new chunks that
        # got a reused vector is dropped (this batch did not embed them).
        store.execute(sql.SQL("""UPDATE {chunks} c SET embedding_status = 'READY', error_code = NULL,
                error_message = NULL, updated_at = now(),
                batch_id = CASE WHEN c.batch_id = %s THEN NULL ELSE c.batch_id END
            WHERE c.corpus = %s AND (c.embedding_status <> 'READY' OR c.batch_id = %s) AND {current}""").format(
            chunks=t("chunks"), current=current), (batch_id, corpus, batch_id))
        # what this batch embeds: the stale chunks left PENDING for it (those that got a reused vector are READY)
        (claimed,) = store.one(sql.SQL("""SELECT count(*) FROM claim_stale s JOIN {chunks} c ON c.id = s.id
            WHERE c.batch_id = %s AND c.embedding_status = 'PENDING'""").format(chunks=t("chunks")),
            (batch_id,)) if stale else (0,)
    # A vector whose chunk's text changed since it was computed is no longer the chunk's (reuse above took what
    # it could): drop it, so a chunk whose new text fails never keeps serving its old vector. Such a chunk had no
    # current vector, so it is one of the stale ones.
    if stale:
        store.execute(sql.SQL("""DELETE FROM {emb} e USING claim_stale s, {chunks} c
            WHERE e.chunk_pk = s.id AND c.id = s.id AND e.content_sha256 <> c.content_sha256""").format(
            emb=t(emb.table_name), chunks=t("chunks")))
    store.execute("DROP TABLE claim_stale")
    kept_failed = 0
    if kept_codes:
        (kept_failed,) = store.one(sql.SQL("SELECT count(*) FROM {chunks} c WHERE c.corpus = %s AND {keep}").format(
            chunks=t("chunks"), keep=keep), (corpus, kept_codes))
    (in_corpus,) = store.one(sql.SQL("SELECT count(*) FROM {} WHERE corpus = %s").format(t("chunks")), (corpus,))
    reused = in_corpus - claimed - kept_failed
    store.execute(sql.SQL("""UPDATE {} SET total = %s, reused = %s, details = details || %s
        WHERE batch_id = %s""").format(t("batches")),
        (claimed, reused, Jsonb({"reused_by_content": by_content, "converted": converted, "kept_failed": kept_failed}),
         batch_id))
    return {"pending": claimed, "reused": reused, "reused_by_content": by_content, "converted": converted,
            "kept_failed": kept_failed}


def split_text(text: str) -> tuple[str, str] | None:
    """Two halves of ``text`` cut at the whitespace nearest its middle; None if it cannot be split."""
    mid = len(text) // 2
    left, right = text.rfind(" ", 0, mid + 1), text.find(" ", mid)
    cuts = [c for c in (left, right) if c > 0]
    if not cuts:
        return None
    cut = min(cuts, key=lambda c: abs(c - mid))
    a, b = text[:cut].strip(), text[cut:].strip()
    return (a, b) if a and b else None


def _resplit(store: Store, batch_id: str, pks: list[int]) -> tuple[list[int], list[int]]:
    """Re-split too-long chunks in two: the chunk keeps the first half, ``<chunk_id>.1`` gets the second.

    Returns (resubmitted chunk pks, pks that cannot be split and stay FAILED).
    """
    from reindex.chunking import content_sha256

    t = store.t
    done, unsplittable = [], []
    rows = store.execute(sql.SQL("""SELECT id, corpus, chunk_id, doc_id, ordinal, text, token_count, retry_count
        FROM {} WHERE id = ANY(%s)""").format(t("chunks")), (pks,)).fetchall()
    for pk, corpus, chunk_id, doc_id, ordinal, text, ntok, retry_count in rows:
        halves = split_text(text)
        if halves is None:
            unsplittable.append(pk)
            continue
        a, b = halves
        store.execute(sql.SQL("""UPDATE {} SET text = %s, content_sha256 = %s, token_count = %s, batch_id = %s,
            embedding_status = 'PENDING', retry_count = retry_count + 1, updated_at = now() WHERE id = %s""").format(
            t("chunks")), (a, content_sha256(a), max(1, ntok // 2), batch_id, pk))
        new_pk = store.one(sql.SQL("""INSERT INTO {} (corpus, chunk_id, doc_id, ordinal, text, content_sha256,
                token_count, embedding_status, retry_count, batch_id)
            VALUES (%s, %s, %s, %s, %s, %s, %s, 'PENDING', %s, %s)
            ON CONFLICT (corpus, chunk_id) DO UPDATE SET text = EXCLUDED.text,
                content_sha256 = EXCLUDED.content_sha256, embedding_status = 'PENDING', batch_id = EXCLUDED.batch_id
            RETURNING id""").format(t("chunks")),
            (corpus, f"{chunk_id}.1", doc_id, ordinal, b, content_sha256(b), max(1, ntok - ntok // 2),
             retry_count + 1, batch_id))[0]
        done += [pk, new_pk]
    if unsplittable:
        store.execute(sql.SQL("""UPDATE {} SET error_message = error_message || ' (cannot be re-split: no word
            boundary)', retry_count = retry_count + 1 WHERE id = ANY(%s)""").format(t("chunks")), (unsplittable,))
    return done, unsplittable


def _sanitize(store: Store, pks: list[int]) -> int:
    """Sanitize the texts of chunks refused for invalid characters (those that change get a new hash)."""
    from reindex.chunking import content_sha256
    from reindex.sanitize import sanitize_text

    changed = 0
    for pk, text in store.execute(sql.SQL("SELECT id, text FROM {} WHERE id = ANY(%s)").format(store.t("chunks")),
                                  (pks,)).fetchall():
        clean = sanitize_text(text)
        if clean != text:
            store.execute(sql.SQL("UPDATE {} SET text = %s, content_sha256 = %s WHERE id = %s").format(
                store.t("chunks")), (clean, content_sha256(clean), pk))
            changed += 1
    return changed


def claim_retriable(store: Store, parent_batch_id: str, batch_id: str, policy: RetryPolicy | None = None) -> dict:
    """Move the retriable FAILED chunks of ``parent_batch_id`` into the retry batch ``batch_id``.

    Only failed chunks whose error code the policy still retries (given their ``retry_count``)
    are claimed; their ``retry_count`` goes up by one. Too-long chunks are re-split in two.
    Returns counts and the longest delay the policy asks for before resubmitting.
    """
    policy = policy or RetryPolicy.from_env()
    t = store.t
    rows = store.execute(sql.SQL("""SELECT error_code, retry_count, array_agg(id ORDER BY id) FROM {chunks}
        WHERE batch_id = %s AND embedding_status = 'FAILED' GROUP BY error_code, retry_count""").format(
        chunks=t("chunks")), (parent_batch_id,)).fetchall()
    ids: list[int] = []
    resplit: list[int] = []
    sanitize: list[int] = []
    actions: dict[str, int] = {}
    delay = 0.0
    terminal = 0
    for code, retry_count, pks in rows:
        d = decide(code, retry_count, policy)
        if not d.retriable:
            terminal += len(pks)
            continue
        (resplit if d.action == RetryAction.RESPLIT else ids).extend(pks)
        if d.action == RetryAction.SANITIZE:
            sanitize.extend(pks)
        actions[d.action.value] = actions.get(d.action.value, 0) + len(pks)
        delay = max(delay, d.delay_seconds)
    if ids:
        store.execute(sql.SQL("""UPDATE {chunks} SET batch_id = %s, embedding_status = 'PENDING',
            retry_count = retry_count + 1, updated_at = now() WHERE id = ANY(%s)""").format(chunks=t("chunks")),
            (batch_id, ids))
    if sanitize:
        _sanitize(store, sanitize)
    if resplit:
        pieces, unsplittable = _resplit(store, batch_id, resplit)
        ids += pieces
        terminal += len(unsplittable)
    store.execute(sql.SQL("UPDATE {} SET total = %s, details = details || %s WHERE batch_id = %s").format(
        t("batches")), (len(ids), Jsonb({"retry_actions": actions, "left_failed": terminal}), batch_id))
    return {"pending": len(ids), "terminal": terminal, "actions": actions, "delay_seconds": delay}


def plan_partitions(store: Store, batch_id: str, partition_size: int,
                    max_partitions: int = MAX_PARTITIONS) -> list[Partition]:
    """Split the batch's PENDING chunks into contiguous id ranges of ~``partition_size`` rows.

    The size grows when needed so there are never more than ``max_partitions`` ranges.
    """
    (pending,) = store.one(sql.SQL("SELECT count(*) FROM {} WHERE batch_id = %s AND embedding_status = 'PENDING'").format(
        store.t("chunks")), (batch_id,))
    if pending == 0:
        return []
    size = max(partition_size, math.ceil(pending / max_partitions))
    rows = store.execute(sql.SQL("""SELECT p, min(id), max(id), count(*) FROM (
            SELECT id, (row_number() OVER (ORDER BY id) - 1) / %s AS p FROM {chunks}
            WHERE batch_id = %s AND embedding_status = 'PENDING') q
        GROUP BY p ORDER BY p""").format(chunks=store.t("chunks")), (size, batch_id)).fetchall()
    return [Partition(batch_id, int(p), lo, hi, n) for p, lo, hi, n in rows]


def iter_partition_chunks(store: Store, partition: Partition, block_rows: int = 1024
                          ) -> Iterator[list[tuple[int, str, str]]]:
    """Blocks of ``(chunk_pk, text, content_sha256)`` of the partition's PENDING chunks.

    Keyset pagination over the id range: a partition never sits in memory whole and no
    transaction stays open between blocks.
    """
    last = partition.lo - 1
    query = sql.SQL("""SELECT id, text, content_sha256 FROM {chunks}
        WHERE batch_id = %s AND embedding_status = 'PENDING' AND id > %s AND id <= %s
        ORDER BY id LIMIT %s""").format(chunks=store.t("chunks"))
    while True:
        rows = store.execute(query, (partition.batch_id, last, partition.hi, block_rows)).fetchall()
        if not rows:
            return
        yield rows
        last = rows[-1][0]


def iter_pending_texts(store: Store, batch_id: str, block_rows: int = 5000) -> Iterator[list[tuple[str, str]]]:
    """Blocks of distinct ``(content_sha256, text)`` of the batch's PENDING chunks (keyset by hash).

    A text shared by several chunks appears once: batch requests are keyed by content hash.
    """
    last = ""
    query = sql.SQL("""SELECT DISTINCT ON (content_sha256) content_sha256, text FROM {chunks}
        WHERE batch_id = %s AND embedding_status = 'PENDING' AND content_sha256 > %s
        ORDER BY content_sha256 LIMIT %s""").format(chunks=store.t("chunks"))
    while True:
        rows = store.execute(query, (batch_id, last, block_rows)).fetchall()
        if not rows:
            return
        yield [(r[0].strip(), r[1]) for r in rows]
        last = rows[-1][0]


def mark_missing(store: Store, batch_id: str, *, code: ErrorCode = ErrorCode.MISSING_FROM_OUTPUT,
                 message: str = "missing from output: no result line carried this chunk's content") -> int:
    """Chunks still PENDING after every result line was read: FAILED ``MISSING_FROM_OUTPUT`` (or ``code``)."""
    return store.execute(sql.SQL("""UPDATE {chunks} SET embedding_status = 'FAILED', error_code = %s,
            error_message = %s, updated_at = now()
        WHERE batch_id = %s AND embedding_status = 'PENDING'""").format(chunks=store.t("chunks")),
        (code.value, message[:2000], batch_id)).rowcount


def run_batch(store: Store, corpus: str, dag_run_id: str, *, started_after=None) -> dict | None:
    """The latest full batch a DAG run opened on ``corpus`` (optionally only one started after a time: a
    cleared run reuses its batch id), with its counts, job count, message and duration; None if none."""
    after = sql.SQL("AND started_at >= %s") if started_after is not None else sql.SQL("")
    cur = store.execute(sql.SQL("""SELECT batch_id, status, total, ready, failed, reused, encoded,
            cardinality(job_names) AS jobs, details->>'message' AS message,
            extract(epoch FROM finished_at - started_at)::float8 AS seconds, started_at
        FROM {} WHERE corpus = %s AND dag_run_id = %s AND kind = 'full' {}
        ORDER BY started_at DESC LIMIT 1""").format(store.t("batches"), after),
        (corpus, dag_run_id, *([started_after] if started_after is not None else [])))
    row = cur.fetchone()
    return None if row is None else dict(zip([c.name for c in cur.description], row, strict=True))


def run_outcomes(store: Store, dag_run_id: str) -> list[dict]:
    """The batches a DAG run opened (one per corpus), oldest first: corpus, status and the one-line message."""
    cur = store.execute(sql.SQL("""SELECT corpus, batch_id, status, details->>'message' AS message FROM {}
        WHERE dag_run_id = %s ORDER BY started_at""").format(store.t("batches")), (dag_run_id,))
    return [dict(zip([c.name for c in cur.description], row, strict=True)) for row in cur.fetchall()]


def record_jobs(store: Store, batch_id: str, names: list[str]) -> None:
    """The batch's submitted job names, before the submitting task waits for them (re-attach, never resubmit)."""
    store.execute(sql.SQL("""UPDATE {} SET job_names = %s, details = details || jsonb_build_object('vertex_jobs', %s::text[])
        WHERE batch_id = %s""").format(store.t("batches")), (names, names, batch_id))


def update_details(store: Store, batch_id: str, details: dict) -> None:
    store.execute(sql.SQL("UPDATE {} SET details = details || %s WHERE batch_id = %s").format(store.t("batches")),
                  (Jsonb(details), batch_id))


def lineage(store: Store, batch_id: str) -> list[str]:
    """The first batch of ``batch_id``'s retry chain, then every retry batch under it (oldest first)."""
    t = store.t
    rows = store.execute(sql.SQL("""WITH RECURSIVE up AS (
            SELECT batch_id, parent_batch_id, 0 AS depth FROM {b} WHERE batch_id = %s
            UNION ALL SELECT b.batch_id, b.parent_batch_id, up.depth + 1 FROM {b} b
                JOIN up ON b.batch_id = up.parent_batch_id WHERE up.depth < 1000),
        root AS (SELECT batch_id FROM up ORDER BY depth DESC LIMIT 1),
        down AS (SELECT batch_id, started_at FROM {b} WHERE batch_id = (SELECT batch_id FROM root)
            UNION ALL SELECT b.batch_id, b.started_at FROM {b} b JOIN down ON b.parent_batch_id = down.batch_id)
        SELECT batch_id FROM down ORDER BY started_at, batch_id""").format(b=t("batches")), (batch_id,)).fetchall()
    return [r[0] for r in rows]


def _lineage_counts(store: Store, ids: list[str]) -> tuple[int, int]:
    """(chunks, FAILED chunks) that the batches ``ids`` hold now: what is left of the chain's work."""
    return store.one(sql.SQL("""SELECT count(*), count(*) FILTER (WHERE embedding_status = 'FAILED') FROM {}
        WHERE batch_id = ANY(%s)""").format(store.t("chunks")), (ids,))


def _document_failures(store: Store, batch_id: str) -> tuple[int, dict[str, int], list[dict]]:
    """Documents this batch's scan could not read or chunk: count, by reason, the first few."""
    t = store.t
    by_reason = dict(store.execute(sql.SQL("""SELECT coalesce(error_code, 'UNKNOWN'), count(*) FROM {}
        WHERE last_batch_id = %s AND status = 'FAILED' GROUP BY 1 ORDER BY 1""").format(t("documents")),
        (batch_id,)).fetchall())
    samples = [{"doc_id": r[0], "source_uri": r[1], "error_code": r[2], "error_message": r[3]}
               for r in store.execute(sql.SQL("""SELECT doc_id, source_uri, error_code, error_message FROM {}
                   WHERE last_batch_id = %s AND status = 'FAILED' ORDER BY doc_id LIMIT 10""").format(
                   t("documents")), (batch_id,))]
    return sum(by_reason.values()), by_reason, samples


def summarize_batch(store: Store, batch_id: str, *, job_failed: bool = False,
                    policy: RetryPolicy | None = None, release_lease: bool = True) -> BatchSummary:
    """Close the batch: chunks still PENDING become FAILED (NOT_PROCESSED), counts and status persist.

    The batch's writes are over, so its corpus lease is released (unless ``release_lease`` is False:
    an upgrade still has its switch to make). The summary also counts the documents the scan could not
    read, and what is left FAILED of the whole retry chain (``lineage_*``).
    """
    from reindex.store.leases import release

    policy = policy or RetryPolicy.from_env()
    t = store.t
    store.execute(sql.SQL("""UPDATE {chunks} SET embedding_status = 'FAILED', error_code = %s,
            error_message = 'not processed: its partition task did not finish', updated_at = now()
        WHERE batch_id = %s AND embedding_status = 'PENDING'""").format(chunks=t("chunks")),
        (ErrorCode.NOT_PROCESSED.value, batch_id))
    corpus, kind, reused, started, details, job_names = store.one(sql.SQL(
        "SELECT corpus, kind, reused, started_at, details, job_names FROM {} WHERE batch_id = %s").format(
        t("batches")), (batch_id,))
    job_failed = job_failed or bool(details.get("job_failed"))
    rows = store.execute(sql.SQL("""SELECT embedding_status, error_code, retry_count, count(*) FROM {chunks}
        WHERE batch_id = %s GROUP BY 1, 2, 3""").format(chunks=t("chunks")), (batch_id,)).fetchall()
    ready = failed = retriable = 0
    by_reason: dict[str, int] = {}
    for status, code, retry_count, n in rows:
        if status == "READY":
            ready += n
        elif status == "FAILED":
            failed += n
            by_reason[code or "UNKNOWN"] = by_reason.get(code or "UNKNOWN", 0) + n
            if decide(code, retry_count, policy).retriable:
                retriable += n
    total = ready + failed
    samples = [
        {"chunk_id": r[0], "doc_id": r[1], "error_code": r[2], "error_message": r[3]}
        for r in store.execute(sql.SQL("""SELECT DISTINCT ON (error_code) chunk_id, doc_id, error_code, error_message
            FROM {chunks} WHERE batch_id = %s AND embedding_status = 'FAILED' ORDER BY error_code, id""").format(
            chunks=t("chunks")), (batch_id,))
    ]
    samples += [
        {"chunk_id": r[0], "doc_id": r[1], "error_code": r[2], "error_message": r[3]}
        for r in store.execute(sql.SQL("""SELECT chunk_id, doc_id, error_code, error_message FROM {chunks}
            WHERE batch_id = %s AND embedding_status = 'FAILED' ORDER BY id LIMIT 10""").format(
            chunks=t("chunks")), (batch_id,)) if r[0] not in {s["chunk_id"] for s in samples}
    ][: max(0, 10 - len(samples))]
    (seconds,) = store.one("SELECT extract(epoch FROM now() - %s)::float8", (started,))
    by_content, kept = int(details.get("reused_by_content", 0)), int(details.get("kept_failed", 0))
    failed_docs, docs_by_reason, doc_samples = _document_failures(store, batch_id)
    (ok_docs,) = store.one(sql.SQL("SELECT count(*) FROM {} WHERE corpus = %s AND status = 'OK'").format(
        t("documents")), (corpus,))
    status = compute_batch_status(total, ready, failed, job_failed=job_failed, failed_documents=failed_docs,
                                  ok_documents=ok_docs)
    docs_txt = f"; {failed_docs} document(s) failed {docs_by_reason}" if failed_docs else ""
    if total == 0:
        message = (f"nothing to embed: 0 chunks encoded, 0 batch jobs submitted; {reused} chunk vector(s) reused"
                   + (f" ({by_content} by content)" if by_content else "")
                   + (f", {kept} chunk(s) left FAILED for their text" if kept else "") + docs_txt)
    else:
        message = (f"{total} chunk(s) embedded: {ready} READY, {failed} FAILED"
                   + (f" {by_reason}" if by_reason else "") + f"; {len(job_names)} batch job(s) submitted; "
                   f"{reused} chunk vector(s) reused" + (f" ({by_content} by content)" if by_content else "")
                   + docs_txt)
    chain = lineage(store, batch_id)
    lineage_total, lineage_failed = _lineage_counts(store, chain)
    store.execute(sql.SQL("""UPDATE {} SET status = %s, total = %s, ready = %s, failed = %s, encoded = %s,
            counts_by_reason = %s, finished_at = now(), details = details || %s
        WHERE batch_id = %s""").format(t("batches")),
        (status.value, total, ready, failed, total, Jsonb(by_reason),
         Jsonb({"retriable": retriable, "sample_errors": samples, "message": message,
                "failed_documents": failed_docs, "documents_by_reason": docs_by_reason,
                "document_samples": doc_samples, "root_batch_id": chain[0] if chain else batch_id,
                "lineage_total": lineage_total, "lineage_failed": lineage_failed}), batch_id))
    if release_lease:
        release(store, corpus, batch_id)
    return BatchSummary(batch_id, corpus, status, total, ready, failed, reused, retriable, by_reason, samples,
                        round(seconds, 3), kind=kind, encoded=total, jobs_submitted=len(job_names),
                        reused_by_content=by_content, kept_failed=kept, message=message,
                        failed_documents=failed_docs, documents_by_reason=docs_by_reason,
                        document_samples=doc_samples, root_batch_id=chain[0] if chain else batch_id,
                        lineage_total=lineage_total, lineage_failed=lineage_failed,
                        halted=details.get("halted") or "")


def add_stage_seconds(store: Store, batch_id: str, stage: str, seconds: float) -> None:
    """Add ``seconds`` to the batch's time in ``stage`` (``details.stages``; mapped tasks add up)."""
    store.execute(sql.SQL("""UPDATE {} SET details = jsonb_set(details, '{{stages}}',
            coalesce(details->'stages', '{{}}'::jsonb) || jsonb_build_object(%s::text,
                round((coalesce((details->'stages'->>%s)::numeric, 0) + %s)::numeric, 3)))
        WHERE batch_id = %s""").format(store.t("batches")), (stage, stage, seconds, batch_id))


def halt_batch(store: Store, batch_id: str, reason: str) -> None:
    """Stop the batch for a reason no chunk is to blame for (the embedding service refused the credentials):
    its other tasks skip, its summary fails the run with ``reason`` and no retry run is triggered. Its
    unfinished chunks close NOT_PROCESSED, so the next run (once the cause is fixed) claims them again."""
    update_details(store, batch_id, {"halted": reason})


def halted_reason(store: Store, batch_id: str) -> str | None:
    row = store.one(sql.SQL("SELECT details->>'halted' FROM {} WHERE batch_id = %s").format(store.t("batches")),
                    (batch_id,))
    return row[0] if row else None


def get_batch(store: Store, batch_id: str) -> dict | None:
    cur = store.execute(sql.SQL("SELECT * FROM {} WHERE batch_id = %s").format(store.t("batches")), (batch_id,))
    row = cur.fetchone()
    if row is None:
        return None
    return dict(zip([c.name for c in cur.description], row, strict=True))


def mark_batch(store: Store, batch_id: str, status: BatchStatus) -> None:
    store.execute(sql.SQL("UPDATE {} SET status = %s, finished_at = now() WHERE batch_id = %s").format(
        store.t("batches")), (status.value, batch_id))
