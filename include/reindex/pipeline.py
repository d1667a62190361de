"""The stages of one batch as plain functions: the Airflow tasks in ``plugins/`` call these.

prepare → chunk_corpus → plan → encode_partition (one per partition) → finish_batch.
Each takes a ``Store`` and returns a small JSON-able manifest (ids, counts), never texts or
vectors, so manifests can travel through XCom.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable

import numpy as np

from reindex.backends import backend_for
from reindex.chunking import TokenChunker, load_tokenizer
from reindex.config import ReindexConfig
from reindex.corpus import CorpusPath, CorpusReader, Document, FailedDocument
from reindex.embeddings.validation import validate_vectors
from reindex.errors import ConfigError, EmptyCorpusError, ErrorCode, StoreError
from reindex.status import BatchSummary
from reindex.store import Store
from reindex.store import batches as batches_store
from reindex.store.documents import CorpusWriter
from reindex.store.schema import ensure_schema
from reindex.store.vectors import (
    build_index,
    ensure_embedding_store,
    get_embedding_store,
    load_vectors,
    mark_failed,
)

log = logging.getLogger(__name__)


def batch_id_for(dag_id: str, run_id: str, corpus: str) -> str:
    """A stable batch id per (DAG run, corpus), so a rerun of any task reuses the same batch."""
    digest = hashlib.sha256(f"{dag_id}/{run_id}/{corpus}".encode()).hexdigest()[:12]
    return f"{corpus}-{digest}"


def check_token_limit(cfg: ReindexConfig, limit: int | None) -> None:
    if limit is not None and cfg.max_tokens > limit:
        raise ConfigError(
            f"max_tokens={cfg.max_tokens} exceeds the limit of model {cfg.model!r}: at most {limit} tokens "
            "per chunk (its max_seq_length minus special tokens)"
        )


def prepare(store: Store, cfg: ReindexConfig) -> dict:
    """Migrate the schema, register the model and its vector table. Returns the model manifest."""
    ensure_schema(store)
    backend = backend_for(cfg)
    check_token_limit(cfg, backend.token_limit())
    spec = backend.model_spec()
    with store.conn.transaction():
        emb = ensure_embedding_store(store, cfg.corpus, spec)
    return {"model": spec.to_dict(), "model_checksum": spec.checksum, "vector_table": emb.table_name}


def chunk_corpus(store: Store, cfg: ReindexConfig, root: CorpusPath, *, batch_id: str, model_checksum: str,
                 dag_run_id: str | None = None) -> dict:
    """Read, sanitize and chunk the corpus; merge documents and chunks; claim stale chunks for the batch.

    Runs in one transaction: a crash leaves the store as it was. Raises ``EmptyCorpusError`` when
    the corpus has no document at all.
    """
    started = time.monotonic()
    backend = backend_for(cfg)
    chunker = TokenChunker(load_tokenizer(backend.tokenizer_path()), cfg.max_tokens, cfg.overlap_tokens)
    reader = CorpusReader(root, max_document_bytes=cfg.max_document_bytes)
    seen: set[str] = set()
    duplicates = 0
    failures: list[dict] = []
    with store.conn.transaction():
        emb = get_embedding_store(store, cfg.corpus, model_checksum)
        batches_store.create_batch(store, batch_id, cfg.corpus, backend.name, model_checksum, dag_run_id=dag_run_id)
        writer = CorpusWriter(store, cfg.corpus, batch_id)
        writer.start()
        for item in reader:
            if item.doc_id in seen:
                duplicates += 1
                log.warning("document id %r appears again in %s; the first occurrence is kept",
                            item.doc_id, item.source_uri)
                continue
            seen.add(item.doc_id)
            if isinstance(item, FailedDocument):
                writer.add_failed(item)
                if len(failures) < 20:
                    failures.append({"doc_id": item.doc_id, "error_code": str(item.error_code), "reason": item.reason})
                log.warning("document %s failed: %s", item.doc_id, item.reason)
                continue
            assert isinstance(item, Document)
            chunks = list(chunker.chunk(item.doc_id, item.text))
            if not chunks:
                writer.add_failed(FailedDocument(item.doc_id, item.source_uri, ErrorCode.BAD_DOCUMENT,
                                                 f"{item.doc_id}: no text to index"))
                continue
            writer.add_document(item, hashlib.sha256(item.text.encode()).hexdigest(), chunks)
            if writer.counts["documents"] % 10_000 == 0:
                log.info("chunked %d documents, %d chunks", writer.counts["documents"], writer.counts["chunks"])
        if not seen:
            raise EmptyCorpusError(
                f"corpus {cfg.corpus!r} at {cfg.corpus_uri} is empty: no .txt, .md, .jsonl or .parquet document "
                f"found ({reader.stats['skipped_files']} file(s) of other types skipped)"
            )
        merged = writer.merge()
        claim = batches_store.claim_stale_chunks(store, cfg.corpus, batch_id, emb, force=cfg.force)
    manifest = {
        "batch_id": batch_id,
        "corpus": cfg.corpus,
        "model_checksum": model_checksum,
        "vector_table": emb.table_name,
        "files": reader.stats["files"],
        "skipped_files": reader.stats["skipped_files"],
        "documents": merged.documents,
        "failed_documents": merged.failed_documents,
        "duplicate_documents": duplicates,
        "document_failures": failures,
        "chunks": merged.chunks,
        "changed_chunks": merged.changed_chunks,
        "deleted_documents": merged.deleted_documents,
        "deleted_chunks": merged.deleted_chunks,
        "pending": claim["pending"],
        "reused": claim["reused"],
        "seconds": round(time.monotonic() - started, 3),
    }
    log.info("chunked corpus %s: %d documents (%d failed), %d chunks, %d to embed, %d reused",
             cfg.corpus, merged.documents, merged.failed_documents, merged.chunks, claim["pending"], claim["reused"])
    return manifest


def plan(store: Store, cfg: ReindexConfig, batch_id: str) -> list[dict]:
    parts = batches_store.plan_partitions(store, batch_id, cfg.partition_size)
    log.info("batch %s: %d pending chunks in %d partitions", batch_id, sum(p.count for p in parts), len(parts))
    return [p.to_dict() for p in parts]


def _encode_isolating(encode: Callable[[list[str]], np.ndarray], texts: list[str], offset: int = 0
                      ) -> tuple[list[int], list[np.ndarray], list[tuple[int, ErrorCode, str]]]:
    """Encode ``texts``; when the encoder raises, bisect so only the offending texts fail."""
    from reindex.embeddings.local import classify_encoder_error

    try:
        vectors = encode(texts)
        return list(range(offset, offset + len(texts))), [vectors], []
    except Exception as e:  # noqa: BLE001 - every encoder error becomes a per-chunk reason
        if len(texts) == 1:
            return [], [], [(offset, classify_encoder_error(e), f"encoder failed: {type(e).__name__}: {e}")]
        mid = len(texts) // 2
        a = _encode_isolating(encode, texts[:mid], offset)
        b = _encode_isolating(encode, texts[mid:], offset + mid)
        return a[0] + b[0], a[1] + b[1], a[2] + b[2]


def encode_partition(store: Store, cfg: ReindexConfig, partition: dict, *, model_checksum: str,
                     encoder=None) -> dict:
    """Encode one partition's PENDING chunks locally and load them (COPY); failures are recorded per chunk."""
    part = batches_store.Partition(**partition)
    encoder = encoder or backend_for(cfg).encoder
    spec = encoder.spec
    if spec.checksum != model_checksum:
        raise StoreError(f"model {cfg.model!r} now has checksum {spec.checksum}, but batch {part.batch_id} "
                         f"was planned for {model_checksum}: the model changed during the run")
    emb = get_embedding_store(store, cfg.corpus, model_checksum)
    started = time.monotonic()
    done = ready = failed = 0
    block_rows = max(cfg.encode_batch_size * 8, 512)
    for block in batches_store.iter_partition_chunks(store, part, block_rows):
        pks = [r[0] for r in block]
        texts = [r[1] for r in block]
        shas = [r[2] for r in block]
        ok_idx, parts, failures = _encode_isolating(encoder.encode, texts)
        vectors = np.concatenate(parts) if parts else np.empty((0, spec.dim), np.float32)
        checks = validate_vectors(vectors, spec) if len(ok_idx) else []
        keep = [j for j, c in enumerate(checks) if c is None]
        failures += [(ok_idx[c[0]], c[1], c[2]) for c in checks if c is not None]
        ready += load_vectors(store, emb, [pks[ok_idx[j]] for j in keep], [shas[ok_idx[j]] for j in keep],
                              vectors[keep])
        failed += mark_failed(store, [(pks[i], code, msg) for i, code, msg in failures])
        done += len(block)
        log.info("partition %d: loaded %s/%s (%d%%)", part.index, f"{done:,}", f"{part.count:,}",
                 100 * done // max(part.count, 1))
    seconds = time.monotonic() - started
    return {"batch_id": part.batch_id, "partition": part.index, "chunks": done, "ready": ready, "failed": failed,
            "seconds": round(seconds, 3), "vectors_per_second": round(ready / seconds, 1) if seconds else None}


def finish_batch(store: Store, cfg: ReindexConfig, batch_id: str, model_checksum: str) -> BatchSummary:
    """Build the cosine index (after the load) and ANALYZE, then close the batch with its status."""
    emb = get_embedding_store(store, cfg.corpus, model_checksum)
    build_index(store, emb, cfg.index_type)
    with store.conn.transaction():
        summary = batches_store.summarize_batch(store, batch_id)
    log.info("batch %s %s: %d/%d READY, %d FAILED %s", batch_id, summary.status.value, summary.ready,
             summary.total, summary.failed, summary.counts_by_reason or "")
    return summary
