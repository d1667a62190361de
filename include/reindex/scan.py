"""The sharded corpus scan: list once, read and chunk in parallel shards, decide deletions once.

``list_corpus`` (one task) takes the corpus's lease, opens the batch, lists the corpus with each file's
metadata (nothing is opened: change detection leaves unchanged files unread), splits large .jsonl/.parquet
files into parts and the files to read into at most ``MAX_SCAN_SHARDS`` shards. ``scan_shard`` (one mapped
task per shard) reads, sanitizes and chunks its files and merges its own documents and chunks in its own
transaction. ``finish_scan`` (one task, after every shard) deletes documents gone from the corpus and chunks
re-chunked documents no longer have, remembers file fingerprints and claims the chunks that need vectors; it
returns the same batch manifest as the single-task ``pipeline.chunk_corpus``, and the same documents, chunks
and vectors result (the tests hold the two against each other).

Every step is idempotent: a shard rerun rewrites the same rows; a listing rerun starts the scan over; a
``finish_scan`` rerun after it committed returns the manifest it recorded on the batch.
"""

from __future__ import annotations

import logging
import time

from psycopg import sql

from reindex import pipeline
from reindex.backends import backend_for
from reindex.config import ReindexConfig
from reindex.corpus import CorpusPath, CorpusReader, FailedDocument, ListedFile, split_large_file
from reindex.errors import EmptyCorpusError, ErrorCode, StoreError, TerminalError
from reindex.store import Store, leases
from reindex.store import batches as batches_store
from reindex.store import scan as scan_store
from reindex.store.documents import CorpusWriter, unchanged_files
from reindex.store.vectors import get_embedding_store

log = logging.getLogger(__name__)

_LISTING_BLOCK = 1000  # files looked up (change detection) and written to the listing at a time


def _check_lease(store: Store, corpus: str, batch_id: str) -> None:
    """A shard or the close of a scan writes only while its batch holds the corpus (a run that lost it — taken
    over as dead, or freed by hand — must not write over the new holder's scan). Checks the holder and renews
    its heartbeat in a transaction of its own: the heartbeat's row lock is not held through the caller's work
    (held through a shard's transaction, it would make concurrent shards run one at a time)."""
    with store.conn.transaction():
        _holding(store, corpus, batch_id, lock=False)
        leases.heartbeat(store, corpus, batch_id)


def _hold_lease(store: Store, corpus: str, batch_id: str) -> None:
    """Just before a shard's transaction commits: the batch still holds the corpus, and keeps it until the
    commit (``FOR SHARE``: other shards may hold it too; a takeover or a hand-freed lease waits for the commit,
    then finds this shard's rows whole)."""
    _holding(store, corpus, batch_id, lock=True)


def _holding(store: Store, corpus: str, batch_id: str, *, lock: bool) -> None:
    row = store.one(sql.SQL("SELECT lease_batch_id FROM {} WHERE corpus = %s{}").format(
        store.t("corpora"), sql.SQL(" FOR SHARE" if lock else "")), (corpus,))
    holder = row[0] if row else None
    if holder != batch_id:
        raise StoreError(f"batch {batch_id} no longer holds corpus {corpus!r} (now: {holder or 'nobody'}); its "
                         "scan stops here without writing")


def list_corpus(store: Store, cfg: ReindexConfig, root: CorpusPath, *, batch_id: str, model_checksum: str,
                shard_bytes: int, shard_files: int, dag_run_id: str | None = None, dag_id: str | None = None) -> dict:
    """Take the lease, open the batch, write the listing and plan the shards.

    Returns ``{"batch_id", "corpus", "model_checksum", "files", "skipped_files", "unchanged_files", "read_files",
    "entries", "split_files", "shards": [{"shard", "entries", "bytes"}, ...], "seconds"}``."""
    started = time.monotonic()
    pipeline.take_corpus(store, cfg, batch_id, dag_run_id, dag_id)
    try:
        out = _list(store, cfg, root, batch_id, model_checksum, shard_bytes, shard_files, dag_run_id, dag_id)
    except BaseException:
        leases.release(store, cfg.corpus, batch_id)
        raise
    out["seconds"] = round(time.monotonic() - started, 3)
    log.info("listed corpus %s: %d files (%d unchanged, left unread; %d split into parts), %d to read in %d "
             "shard(s)", cfg.corpus, out["files"], out["unchanged_files"], out["split_files"], out["read_files"],
             len(out["shards"]))
    return out


def _list(store: Store, cfg: ReindexConfig, root: CorpusPath, batch_id: str, model_checksum: str, shard_bytes: int,
          shard_files: int, dag_run_id: str | None, dag_id: str | None) -> dict:
    _, signature = pipeline.chunking_for(cfg)
    reader = CorpusReader(root, max_document_bytes=cfg.max_document_bytes)
    split = 0
    with store.conn.transaction():
        get_embedding_store(store, cfg.corpus, model_checksum)  # the model is registered (prepare ran)
        batches_store.create_batch(store, batch_id, cfg.corpus, backend_for(cfg).name, model_checksum,
                                   dag_run_id=dag_run_id, dag_id=dag_id)
        scan_store.reset(store, cfg.corpus, batch_id)
        scan_store.begin_listing(store)
        position = 0
        block: list[ListedFile] = []

        def flush() -> None:
            nonlocal position, split
            rows = []
            for e in block:
                parts = None
                if e.problem is None and e.size > shard_bytes:
                    # a large .jsonl/.parquet file is split only when it is to be read: ask about it alone (the rest
                    # of the listing is matched against the remembered files at once, in close_listing)
                    known = not cfg.force and e.fingerprint is not None and e.uri in unchanged_files(
                        store, cfg.corpus, [(e.uri, e.fingerprint)], signature)
                    if known:
                        rows.append((position, e, True))
                        position += 1
                        continue
                    parts = split_large_file(reader.path_of(e), e.rel, e.size, shard_bytes)
                if parts:
                    split += 1
                    for part in parts:
                        size = part["stop"] - part["start"] if "start" in part else e.size // len(parts)
                        rows.append((position, ListedFile(e.rel, e.uri, e.fingerprint, size, None, part), False))
                        position += 1
                    continue
                rows.append((position, e, False))
                position += 1
            scan_store.write_listing(store, rows)
            block.clear()

        for entry in reader.listing():
            block.append(entry)
            if len(block) >= _LISTING_BLOCK:
                flush()
        flush()
        if position == 0:
            raise EmptyCorpusError(
                f"corpus {cfg.corpus!r} at {cfg.corpus_uri} is empty: no .txt, .md, .jsonl or .parquet document "
                f"found ({reader.stats['skipped_files']} file(s) of other types skipped)")
        scan_store.close_listing(store, cfg.corpus, batch_id, None if cfg.force else signature)
        shards = scan_store.assign_shards(store, batch_id, shard_bytes, shard_files)
        stats = scan_store.listing_stats(store, batch_id)
        batches_store.update_details(store, batch_id, {"scan": None, "scan_listing": {
            **stats, "skipped_files": reader.stats["skipped_files"], "split_files": split, "shards": len(shards),
            "chunk_mark": scan_store.chunk_mark(store)}})
    return {"batch_id": batch_id, "corpus": cfg.corpus, "model_checksum": model_checksum, **stats,
            "skipped_files": reader.stats["skipped_files"], "split_files": split, "shards": shards}


def scan_shard(store: Store, cfg: ReindexConfig, root: CorpusPath, *, batch_id: str, shard: int,
               block_docs: int = 500, block_bytes: int = 32 << 20) -> dict:
    """Read, sanitize and chunk one shard's files; merge its documents and chunks in one transaction.

    Returns ``{"shard", "entries", "read_files", "documents", "failed_documents", "unchanged_documents",
    "chunks", "changed_chunks", "duplicates", "seconds"}``."""
    started = time.monotonic()
    chunker, signature = pipeline.chunking_for(cfg)
    reader = CorpusReader(root, max_document_bytes=cfg.max_document_bytes)
    _check_lease(store, cfg.corpus, batch_id)
    with store.conn.transaction():
        if (batches_store.get_batch(store, batch_id) or {}).get("details", {}).get("scan"):
            raise StoreError(f"batch {batch_id}: its scan is already closed; shard {shard} has nothing left to do")
        entries = scan_store.shard_entries(store, batch_id, shard)
        writer = CorpusWriter(store, cfg.corpus, batch_id)
        writer.start()
        stager = pipeline.DocumentStager(writer, chunker, signature, force=cfg.force, block_docs=block_docs,
                                         block_bytes=block_bytes)
        unreadable: list[int] = []
        for position, entry in entries:
            readable = entry.problem is None
            for seq, item in enumerate(reader.read_listed(entry)):
                if isinstance(item, FailedDocument) and item.error_code == ErrorCode.UNREADABLE:
                    readable = False
                stager.add(item, scan_store.doc_position(position, seq))
            if not readable:
                unreadable.append(position)
        stager.flush()
        writer.flush()
        merged = scan_store.merge_shard(store, cfg.corpus, batch_id)
        counts = {"entries": len(entries), "read_files": reader.reads["read_files"], "items": stager.items,
                  "documents": writer.counts["documents"], "failed_documents": writer.counts["failed_documents"],
                  "unchanged_documents": writer.counts["unchanged_documents"], "chunks": writer.counts["chunks"],
                  "changed_chunks": merged["changed_chunks"],
                  "duplicates": stager.duplicates + merged["cross_shard_duplicates"],
                  "seconds": round(time.monotonic() - started, 3)}
        _hold_lease(store, cfg.corpus, batch_id)
        scan_store.mark_shard_done(store, batch_id, shard, counts, unreadable)
    log.info("scan shard %d of batch %s: %d entries, %d documents (%d unchanged, %d failed), %d chunks written, "
             "%.1f s", shard, batch_id, counts["entries"], counts["documents"], counts["unchanged_documents"],
             counts["failed_documents"], counts["changed_chunks"], counts["seconds"])
    return {"shard": shard, **counts}


def finish_scan(store: Store, cfg: ReindexConfig, *, batch_id: str, model_checksum: str) -> dict:
    """After every shard: deletions, file fingerprints, the claim; the batch manifest (the keys of
    ``pipeline.chunk_corpus``'s, plus ``shards``). The manifest is recorded on the batch (``details.scan``): a
    rerun after this committed returns it unchanged."""
    started = time.monotonic()
    batch = batches_store.get_batch(store, batch_id) or {}
    done = (batch.get("details") or {}).get("scan")
    if done:
        log.info("scan of batch %s already closed; its manifest stands", batch_id)
        return done
    _, signature = pipeline.chunking_for(cfg)
    try:
        manifest = _finish(store, cfg, batch, batch_id, model_checksum, signature, started)
    except TerminalError:
        leases.release(store, cfg.corpus, batch_id)  # the run ends here: the corpus is free for the next one
        raise
    log.info("scan of corpus %s closed: %d documents (%d unchanged, %d failed, %d deleted), %d chunks, %d to "
             "embed, %d reused (%d by content), %d shard(s)", cfg.corpus, manifest["documents"],
             manifest["unchanged_documents"], manifest["failed_documents"], manifest["deleted_documents"],
             manifest["chunks"], manifest["pending"], manifest["reused"], manifest["reused_by_content"],
             manifest["shards"])
    return manifest


def _finish(store: Store, cfg: ReindexConfig, batch: dict, batch_id: str, model_checksum: str, signature: str,
            started: float) -> dict:
    with store.conn.transaction():
        _check_lease(store, cfg.corpus, batch_id)
        emb = get_embedding_store(store, cfg.corpus, model_checksum)
        listing = (batch.get("details") or {}).get("scan_listing") or {}
        totals = scan_store.shard_totals(store, batch_id)
        counts = scan_store.finish(store, cfg.corpus, batch_id, signature, None if cfg.force else emb.table_name,
                                   chunk_mark=listing.get("chunk_mark"))
        if not counts["seen_documents"] and not listing.get("unchanged_files"):
            raise EmptyCorpusError(
                f"corpus {cfg.corpus!r} at {cfg.corpus_uri} is empty: no document found in "
                f"{listing.get('files', 0)} file(s) ({listing.get('skipped_files', 0)} file(s) of other types skipped)")
        claim = batches_store.claim_stale_chunks(store, cfg.corpus, batch_id, emb, force=cfg.force,
                                                 reuse_pool=None if cfg.force else "reuse_pool")
        (total_chunks,) = store.one(sql.SQL("SELECT count(*) FROM {} WHERE corpus = %s").format(store.t("chunks")),
                                    (cfg.corpus,))
        manifest = {
            "batch_id": batch_id, "corpus": cfg.corpus, "model_checksum": model_checksum,
            "vector_table": emb.table_name,
            "files": listing.get("files", 0), "read_files": listing.get("read_files", 0),
            "unchanged_files": listing.get("unchanged_files", 0), "skipped_files": listing.get("skipped_files", 0),
            "documents": counts["documents"], "unchanged_documents": counts["unchanged_documents"],
            "failed_documents": counts["failed_documents"],
            "duplicate_documents": int(totals.get("items", 0)) - counts["seen_documents"],
            "document_failures": counts["document_failures"],
            "chunks": total_chunks, "rechunked_chunks": counts["rechunked_chunks"],
            "changed_chunks": counts["changed_chunks"], "deleted_documents": counts["deleted_documents"],
            "deleted_chunks": counts["deleted_chunks"], **claim,
            "shards": int(totals["shards"]), "split_files": listing.get("split_files", 0),
        }
        manifest["seconds"] = round(time.monotonic() - started, 3)
        batches_store.update_details(store, batch_id, {"scan": manifest})
        scan_store.clear(store, batch_id)
    return manifest


def sharded_scan(store: Store, cfg: ReindexConfig, root: CorpusPath, *, batch_id: str, model_checksum: str,
                 shard_bytes: int, shard_files: int = 20_000, dag_run_id: str | None = None) -> dict:
    """The whole sharded scan in this process, shard after shard (plain-Python callers, tests, benchmarks):
    the DAG runs the same three steps as tasks."""
    listed = list_corpus(store, cfg, root, batch_id=batch_id, model_checksum=model_checksum, shard_bytes=shard_bytes,
                         shard_files=shard_files, dag_run_id=dag_run_id)
    for s in listed["shards"]:
        scan_shard(store, cfg, root, batch_id=batch_id, shard=s["shard"])
    return finish_scan(store, cfg, batch_id=batch_id, model_checksum=model_checksum)

