"""The stages of one batch as plain functions: the Airflow tasks in ``plugins/`` call these.

prepare → chunk_corpus → plan → encode_partition (one per partition) → finish_batch.
Each takes a ``Store`` and returns a small JSON-able manifest (ids, counts), never texts or
vectors, so manifests can travel through XCom.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import time
from collections.abc import Callable

import numpy as np
from psycopg import sql

from reindex.backends import backend_for
from reindex.chunking import TokenChunker, chunking_signature, load_tokenizer
from reindex.config import INDEX_MAX_DIMS, Backend, IndexType, OnBusy, ReindexConfig, Storage
from reindex.corpus import CorpusPath, CorpusReader, Document, FailedDocument, SourceFile
from reindex.embeddings.validation import validate_vectors
from reindex.errors import ConfigError, EmptyCorpusError, ErrorCode, StoreError
from reindex.models import ModelSpec
from reindex.status import BatchSummary
from reindex.store import Store, leases
from reindex.store import batches as batches_store
from reindex.store.documents import CorpusWriter
from reindex.store.schema import ensure_schema
from reindex.store.vectors import (
    EmbeddingStore,
    active_model,
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


def check_index_dim(cfg: ReindexConfig, spec: ModelSpec) -> None:
    """pgvector indexes at most 2,000 dimensions of ``vector`` and 4,000 of ``halfvec``: refuse before any
    embedding is paid for rather than when the index is built."""
    limit = INDEX_MAX_DIMS[cfg.storage]
    if cfg.index_type == IndexType.NONE or spec.dim <= limit:
        return
    ways = [f"storage={s.value}" for s, most in INDEX_MAX_DIMS.items() if spec.dim <= most]
    raise ConfigError(
        f"model {cfg.model!r} makes {spec.dim}-d vectors, but pgvector's {cfg.index_type.value} index on "
        f"{cfg.storage.value} takes at most {limit} dimensions: choose "
        + ", ".join([*ways, "a smaller output_dimensionality", "index_type=none"])
    )


def model_config(cfg: ReindexConfig) -> dict:
    """What the model registry keeps so a later run (nightly, search) can load the same model again."""
    return {"model": cfg.model, "backend": cfg.backend.value, "output_dimensionality": cfg.output_dimensionality,
            "normalize": cfg.normalize, "storage": cfg.storage.value, "service_conn_id": cfg.service_conn_id,
            "encoder": cfg.encoder.value}


def resolve_model(store: Store, cfg: ReindexConfig) -> ReindexConfig:
    """The run's model: the corpus's active one when the run follows it, else the one asked for.

    A run may not silently write vectors of another model into a corpus: a corpus changes model
    only through ``reindex_model_upgrade`` (new store, atomic switch).
    """
    active = active_model(store, cfg.corpus)
    if active is None:
        return cfg
    if cfg.follow_active_model:
        conf = (active["details"] or {}).get("config") or {"model": active["model_id"], "backend": active["backend"]}
        resolved = dataclasses.replace(
            cfg, model=conf["model"], backend=Backend(conf["backend"]),
            output_dimensionality=conf.get("output_dimensionality"), normalize=conf.get("normalize", True),
            storage=Storage(conf.get("storage", Storage.VECTOR)),
            service_conn_id=cfg.service_conn_id or conf.get("service_conn_id"),
            encoder=conf.get("encoder", "torch"))
        if (resolved.model, resolved.backend, resolved.storage) != (cfg.model, cfg.backend, cfg.storage):
            log.info("corpus %s follows its active model %s (%s, %s) rather than %s (%s, %s)", cfg.corpus,
                     resolved.model, resolved.backend.value, resolved.storage.value, cfg.model, cfg.backend.value,
                     cfg.storage.value)
        return resolved
    spec = backend_for(cfg).model_spec()
    if spec.checksum != active["model_checksum"]:
        storage = get_embedding_store(store, cfg.corpus, active["model_checksum"]).storage
        raise ConfigError(
            f"corpus {cfg.corpus!r} is indexed with model {active['model_id']} ({active['dim']}-d {storage}, "
            f"checksum {active['model_checksum']}), but this run asks for {cfg.model!r} ({spec.dim}-d "
            f"{spec.storage}, checksum {spec.checksum}). Leave `model` empty to use the active model; change a "
            "corpus's model or storage with the reindex_model_upgrade DAG (it re-embeds into a new store and "
            "switches atomically)."
        )
    return cfg


def prepare(store: Store, cfg: ReindexConfig) -> dict:
    """Migrate the schema, resolve and register the model and its vector table.

    Returns the model manifest with the run's resolved ``config``.
    """
    ensure_schema(store)
    cfg = resolve_model(store, cfg)
    backend = backend_for(cfg)
    check_token_limit(cfg, backend.token_limit())
    spec = backend.model_spec()
    check_index_dim(cfg, spec)
    active = active_model(store, cfg.corpus)
    if active is not None and spec.checksum != active["model_checksum"]:
        # Only a followed model gets here (resolve_model refuses a named one): its backend now gives another
        # model than the corpus's store holds, e.g. an embedding service that deployed a new model.
        raise ConfigError(
            f"corpus {cfg.corpus!r} is indexed with model {active['model_id']} ({active['dim']}-d, checksum "
            f"{active['model_checksum']}), but backend {cfg.backend.value!r} now gives {spec.model_id} ({spec.dim}-d, "
            f"checksum {spec.checksum}). Nothing was written. Move the corpus to the new model with the "
            "reindex_model_upgrade DAG (new store, atomic switch), or restore the previous model.")
    with store.conn.transaction():
        emb = ensure_embedding_store(store, cfg.corpus, spec, config=model_config(cfg))
    return {"model": spec.to_dict(), "model_checksum": spec.checksum, "vector_table": emb.table_name,
            "config": cfg.to_dict()}


def take_corpus(store: Store, cfg: ReindexConfig, batch_id: str, run_id: str | None = None,
                dag_id: str | None = None) -> None:
    """Take the corpus's lease for ``batch_id``: wait (``on_busy=wait``) or fail at once (``fail``)."""
    wait = cfg.busy_wait_seconds if cfg.on_busy == OnBusy.WAIT else 0
    leases.acquire(store, cfg.corpus, batch_id, run_id, wait_seconds=wait, dag_id=dag_id)


def chunk_corpus(store: Store, cfg: ReindexConfig, root: CorpusPath, *, batch_id: str, model_checksum: str,
                 dag_run_id: str | None = None, dag_id: str | None = None, block_docs: int = 500,
                 block_bytes: int = 32 << 20) -> dict:
    """Read, sanitize and chunk the corpus; merge documents and chunks; claim stale chunks for the batch.

    Takes the corpus's lease first (see ``take_corpus``). Documents are looked up in blocks: one
    whose content hash and chunking signature are unchanged is not chunked again and keeps its
    chunks and vectors. The merge and claim run in one transaction: a crash leaves the store as it
    was. Raises ``EmptyCorpusError`` when the corpus has no document at all.
    """
    started = time.monotonic()
    take_corpus(store, cfg, batch_id, dag_run_id, dag_id)
    try:
        manifest = _chunk_and_claim(store, cfg, root, batch_id, model_checksum, dag_run_id, dag_id, block_docs,
                                    block_bytes)
    except BaseException:
        leases.release(store, cfg.corpus, batch_id)
        raise
    manifest["seconds"] = round(time.monotonic() - started, 3)
    log.info("chunked corpus %s: %d documents (%d unchanged, %d failed, %d deleted), %d chunks, %d to embed, "
             "%d reused (%d by content)", cfg.corpus, manifest["documents"], manifest["unchanged_documents"],
             manifest["failed_documents"], manifest["deleted_documents"], manifest["chunks"], manifest["pending"],
             manifest["reused"], manifest["reused_by_content"])
    return manifest


class DocumentStager:
    """Stages what a corpus reader yields into a ``CorpusWriter``: a document whose content hash and chunking
    are as stored is staged unchanged (not chunked again), any other is chunked; a repeated document id keeps
    its first occurrence; documents are looked up in blocks. ``pos`` orders documents across shards."""

    def __init__(self, writer: CorpusWriter, chunker: TokenChunker, signature: str, *, force: bool,
                 block_docs: int = 500, block_bytes: int = 32 << 20) -> None:
        self.writer, self.chunker, self.signature, self.force = writer, chunker, signature, force
        self.block_docs, self.block_bytes = block_docs, block_bytes
        self.seen: set[str] = set()
        self.items = 0  # documents and failures met, repeats included
        self.duplicates = 0
        self.failures: list[dict] = []
        self._block: list[tuple[Document, int | None]] = []
        self._block_size = 0

    def add(self, item: Document | FailedDocument | SourceFile, pos: int | None = None) -> None:
        writer = self.writer
        if isinstance(item, SourceFile):
            writer.add_source_file(item)
            return
        self.items += 1
        if item.doc_id in self.seen:
            self.duplicates += 1
            log.warning("document id %r appears again in %s; the first occurrence is kept", item.doc_id,
                        item.source_uri)
            return
        self.seen.add(item.doc_id)
        if isinstance(item, FailedDocument):
            writer.add_failed(item, pos)
            if len(self.failures) < 20:
                self.failures.append({"doc_id": item.doc_id, "error_code": str(item.error_code),
                                      "reason": item.reason})
            log.warning("document %s failed: %s", item.doc_id, item.reason)
            return
        self._block.append((item, pos))
        self._block_size += len(item.text)
        if len(self._block) >= self.block_docs or self._block_size >= self.block_bytes:
            self.flush()
        if len(self.seen) % 10_000 == 0:
            log.info("read %d documents: %d chunks so far, %d unchanged", len(self.seen), writer.counts["chunks"],
                     writer.counts["unchanged_documents"])

    def flush(self) -> None:
        writer, signature = self.writer, self.signature
        stored = {} if self.force else writer.stored([d.doc_id for d, _ in self._block])
        for doc, pos in self._block:
            sha = hashlib.sha256(doc.text.encode()).hexdigest()
            if stored.get(doc.doc_id) == (sha, signature, "OK"):
                writer.add_unchanged(doc, sha, signature, pos)
                continue
            chunks = list(self.chunker.chunk(doc.doc_id, doc.text))
            if not chunks:
                writer.add_failed(FailedDocument(doc.doc_id, doc.source_uri, ErrorCode.BAD_DOCUMENT,
                                                 f"{doc.doc_id}: no text to index"), pos)
                continue
            writer.add_document(doc, sha, chunks, signature, pos)
        self._block.clear()
        self._block_size = 0


def chunking_for(cfg: ReindexConfig) -> tuple[TokenChunker, str]:
    """The run's chunker (the model's own tokenizer) and its chunking signature."""
    backend = backend_for(cfg)
    chunker = TokenChunker(load_tokenizer(backend.tokenizer_path()), cfg.max_tokens, cfg.overlap_tokens)
    return chunker, chunking_signature(backend.tokenizer_path(), cfg.max_tokens, cfg.overlap_tokens)


def _chunk_and_claim(store: Store, cfg: ReindexConfig, root: CorpusPath, batch_id: str, model_checksum: str,
                     dag_run_id: str | None, dag_id: str | None, block_docs: int, block_bytes: int) -> dict:
    backend = backend_for(cfg)
    chunker, signature = chunking_for(cfg)
    with store.conn.transaction():
        emb = get_embedding_store(store, cfg.corpus, model_checksum)
        batches_store.create_batch(store, batch_id, cfg.corpus, backend.name, model_checksum, dag_run_id=dag_run_id,
                                   dag_id=dag_id)
        writer = CorpusWriter(store, cfg.corpus, batch_id)
        writer.start()
        # change detection: a file whose fingerprint, chunking and documents are as last read is not read
        # (``force`` reads everything)
        reader = CorpusReader(root, max_document_bytes=cfg.max_document_bytes,
                              unchanged=(lambda files: set()) if cfg.force else
                              (lambda files: writer.unchanged_files(files, signature)))
        stager = DocumentStager(writer, chunker, signature, force=cfg.force, block_docs=block_docs,
                                block_bytes=block_bytes)
        for item in reader:
            stager.add(item)
        stager.flush()
        if not stager.seen and not reader.reads["unchanged_files"]:
            raise EmptyCorpusError(
                f"corpus {cfg.corpus!r} at {cfg.corpus_uri} is empty: no .txt, .md, .jsonl or .parquet document "
                f"found ({reader.stats['skipped_files']} file(s) of other types skipped)"
            )
        merged = writer.merge(vector_table=None if cfg.force else emb.table_name)
        writer.remember_files(signature)
        claim = batches_store.claim_stale_chunks(store, cfg.corpus, batch_id, emb, force=cfg.force,
                                                 reuse_pool=None if cfg.force else "reuse_pool")
    (total_chunks,) = store.one(sql.SQL("SELECT count(*) FROM {} WHERE corpus = %s").format(store.t("chunks")),
                                (cfg.corpus,))
    return {
        "batch_id": batch_id,
        "corpus": cfg.corpus,
        "model_checksum": model_checksum,
        "vector_table": emb.table_name,
        "files": reader.stats["files"],
        "read_files": reader.reads["read_files"],
        "unchanged_files": reader.reads["unchanged_files"],
        "skipped_files": reader.stats["skipped_files"],
        "documents": merged.documents,
        "unchanged_documents": merged.unchanged_documents,
        "failed_documents": merged.failed_documents,
        "duplicate_documents": stager.duplicates,
        "document_failures": stager.failures,
        "chunks": total_chunks,
        "rechunked_chunks": merged.chunks,
        "changed_chunks": merged.changed_chunks,
        "deleted_documents": merged.deleted_documents,
        "deleted_chunks": merged.deleted_chunks,
        **claim,
    }


def plan(store: Store, cfg: ReindexConfig, batch_id: str) -> list[dict]:
    parts = batches_store.plan_partitions(store, batch_id, cfg.partition_size)
    log.info("batch %s: %d pending chunks in %d partitions", batch_id, sum(p.count for p in parts), len(parts))
    return [p.to_dict() for p in parts]


def _encode_isolating(encode: Callable[[list[str]], np.ndarray], texts: list[str], offset: int = 0
                      ) -> tuple[list[int], list[np.ndarray], list[tuple[int, ErrorCode, str]]]:
    """Encode ``texts``; when the encoder raises, bisect so only the offending texts fail."""
    from reindex.classify import classify_encoder_error

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
    """Encode one partition's PENDING chunks (in the worker, or through the embedding service) and load them
    (COPY); failures are recorded per chunk."""
    part = batches_store.Partition(**partition)
    owned = encoder is None
    encoder = encoder or backend_for(cfg).encoder
    try:
        return _encode_partition(store, cfg, part, model_checksum, encoder)
    finally:
        if owned and hasattr(encoder, "close"):
            encoder.close()


def _encode_partition(store: Store, cfg: ReindexConfig, part, model_checksum: str, encoder) -> dict:
    encode_block = getattr(encoder, "encode_block", None)
    if encode_block is None:
        # An in-process model cannot change under a task: a different checksum means the run is inconsistent.
        spec = encoder.spec.stored_as(cfg.storage)
        if spec.checksum != model_checksum:
            raise StoreError(f"model {cfg.model!r} now has checksum {spec.checksum}, but batch {part.batch_id} "
                             f"was planned for {model_checksum}: the model changed during the run")
        encode_block = functools.partial(_encode_isolating, encoder.encode)
    else:
        # A remote service can switch models at any moment: answers of another model fail MODEL_CHANGED per chunk.
        encoder.pin(model_checksum, cfg.storage)
        spec = encoder.spec.stored_as(cfg.storage)
    emb = get_embedding_store(store, cfg.corpus, model_checksum)
    started = time.monotonic()
    done = ready = failed = 0
    block_rows = getattr(encoder, "block_size", None) or max(cfg.encode_batch_size * 8, 512)
    for block in batches_store.iter_partition_chunks(store, part, block_rows):
        pks = [r[0] for r in block]
        texts = [r[1] for r in block]
        shas = [r[2] for r in block]
        ok_idx, parts, failures = encode_block(texts)
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
    out = {"batch_id": part.batch_id, "partition": part.index, "chunks": done, "ready": ready, "failed": failed,
           "seconds": round(seconds, 3), "vectors_per_second": round(ready / seconds, 1) if seconds else None}
    if getattr(encoder, "stats", None) is not None:  # the service's requests, retries and cache hits
        out["service"] = dict(encoder.stats)
    return out


def finish_batch(store: Store, cfg: ReindexConfig, batch_id: str, model_checksum: str) -> BatchSummary:
    """Build the cosine index (after the load) and ANALYZE, then close the batch with its status."""
    emb = get_embedding_store(store, cfg.corpus, model_checksum)
    build_index(store, emb, cfg.index_type, ivfflat_lists=cfg.ivfflat_lists)
    with store.conn.transaction():
        summary = batches_store.summarize_batch(store, batch_id)
    log.info("batch %s %s: %d/%d READY, %d FAILED %s", batch_id, summary.status.value, summary.ready,
             summary.total, summary.failed, summary.counts_by_reason or "")
    return summary


# --- model upgrade ------------------------------------------------------------------------------

def prepare_upgrade(store: Store, cfg: ReindexConfig, *, batch_id: str, dim: int | None = None,
                    dag_run_id: str | None = None, dag_id: str | None = None) -> dict:
    """Open an upgrade batch: register the target model and its new (BUILDING) store, take the
    corpus's lease, and claim every chunk without a current vector in the target store.

    Resumable: rows an earlier (failed or killed) upgrade already loaded into the target store are
    current and are not claimed again. Returns a batch manifest for the embed tasks.
    """
    ensure_schema(store)
    t = store.t
    row = store.one(sql.SQL("SELECT count(*), max(token_count) FROM {} WHERE corpus = %s").format(t("chunks")),
                    (cfg.corpus,))
    if not row[0]:
        raise ConfigError(f"corpus {cfg.corpus!r} has no chunks to upgrade: index it with reindex_corpus first")
    active = active_model(store, cfg.corpus)
    backend = backend_for(cfg)
    spec = backend.model_spec()
    if dim is not None and spec.dim != dim:
        raise ConfigError(f"target model {cfg.model!r} makes {spec.dim}-d vectors, not the dimension={dim} asked for")
    check_index_dim(cfg, spec)
    limit = backend.token_limit()
    if limit is not None and row[1] > limit:
        raise ConfigError(f"corpus {cfg.corpus!r} has chunks of up to {row[1]} tokens; target model {cfg.model!r} "
                          f"takes at most {limit}: re-chunk first (reindex_corpus with a smaller max_tokens, force)")
    take_corpus(store, cfg, batch_id, dag_run_id, dag_id)
    try:
        with store.conn.transaction():
            emb = ensure_embedding_store(store, cfg.corpus, spec, activate=False, config=model_config(cfg))
            batches_store.create_batch(store, batch_id, cfg.corpus, backend.name, spec.checksum, kind="upgrade",
                                       dag_run_id=dag_run_id, dag_id=dag_id)
            claim = batches_store.claim_stale_chunks(store, cfg.corpus, batch_id, emb, keep_content_failures=False,
                                                     convert_from=_halfvec_source(store, cfg.corpus, active, spec))
            batches_store.update_details(store, batch_id, {
                "config": cfg.to_dict(), "previous_model_checksum": active and active["model_checksum"]})
    except BaseException:
        leases.release(store, cfg.corpus, batch_id)
        raise
    log.info("upgrade %s of corpus %s to %s (%d-d, %s, %s): %d chunks to embed, %d already done (%d converted "
             "from the vector store)", batch_id, cfg.corpus, spec.model_id, spec.dim, spec.storage, spec.checksum,
             claim["pending"], claim["reused"], claim["converted"])
    return {"batch_id": batch_id, "corpus": cfg.corpus, "kind": "upgrade", "model": spec.to_dict(),
            "model_checksum": spec.checksum, "vector_table": emb.table_name,
            "previous_model_checksum": active and active["model_checksum"], "chunks": row[0], **claim}


def _halfvec_source(store: Store, corpus: str, active: dict | None, spec: ModelSpec) -> EmbeddingStore | None:
    """The active store when the upgrade only moves the same model from ``vector`` to ``halfvec``: its
    vectors convert exactly (a cast rounds as storing a fresh vector does), nothing is embedded again."""
    if active is None or spec.storage != "halfvec" or active["model_checksum"] != spec.stored_as("vector").checksum:
        return None
    source = get_embedding_store(store, corpus, active["model_checksum"])
    return source if source.storage == "vector" else None


def finish_upgrade(store: Store, corpus: str, batch_id: str, model_checksum: str, *,
                   retention_seconds: float) -> dict:
    """Switch the corpus to the upgraded store atomically, give the lease back and drop stores
    retired for longer than ``retention_seconds``."""
    from reindex.store.vectors import drop_retired_stores, switch_active_store

    try:
        previous = switch_active_store(store, corpus, model_checksum)
    finally:
        leases.release(store, corpus, batch_id)
    dropped = drop_retired_stores(store, corpus, retention_seconds=retention_seconds)
    return {"corpus": corpus, "active_model_checksum": model_checksum, "previous_model_checksum": previous,
            "dropped_tables": dropped}
