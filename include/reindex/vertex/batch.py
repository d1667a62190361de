"""The Vertex batch path of one batch, as plain functions over a ``Store`` and a GCS client.

write_requests → (jobs run on Vertex) → plan_result_ranges → ingest_range (one per partition) →
close_results. Results are joined to chunks by content hash (the classic echoed instance's
content, the gemini ``key``), never by line order; a text shared by chunks is sent once.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from reindex.embeddings.validation import validate_vectors
from reindex.errors import ErrorCode
from reindex.models import ModelSpec
from reindex.store import Store
from reindex.store.batches import iter_pending_texts, mark_missing
from reindex.store.vectors import EmbeddingStore, load_vectors_by_hash, mark_failed_by_hash
from reindex.vertex.formats import Family
from reindex.vertex.gcs import GcsRangeOpener, list_result_files
from reindex.vertex.lines import DEFAULT_READ_BLOCK
from reindex.vertex.parse import stream_results
from reindex.vertex.ranges import ByteRange, group_by_partition, plan_ranges
from reindex.vertex.requests import GcsShardOpener, write_request_shards

log = logging.getLogger(__name__)

DEFAULT_RANGE_BYTES = 64 * 1024 * 1024


def batch_prefix(prefix: str, corpus: str, batch_id: str) -> str:
    return f"{prefix.strip('/')}/{corpus}/{batch_id}"


def write_requests(store: Store, storage_client, bucket: str, prefix: str, batch_id: str, family: Family, *,
                   output_dimensionality: int | None = None, limits=None) -> list[dict]:
    """Write the batch's PENDING texts as request shards ``gs://bucket/prefix/input-<job>-<shard>.jsonl``.

    Rows the service would refuse (empty, over the text limit) fail here with their reason.
    Returns one ``{"index", "input_uris", "lines", "bytes"}`` per job (several when a job limit is hit).
    """
    opener = GcsShardOpener(storage_client.bucket(bucket), prefix)
    rejected: list[tuple[str, ErrorCode, str]] = []

    def rows():
        for block in iter_pending_texts(store, batch_id):
            yield from block

    plan = write_request_shards(rows(), family, opener, output_dimensionality=output_dimensionality,
                                limits=limits, on_reject=lambda r: rejected.append((r.key, r.code, r.message)))
    if rejected:
        mark_failed_by_hash(store, batch_id, rejected)
    jobs = [{"index": j.index, "input_uris": opener.job_uris(j), "lines": j.lines, "bytes": j.bytes}
            for j in plan.jobs]
    log.info("batch %s: wrote %d request lines in %d job(s), %d rejected", batch_id,
             sum(j["lines"] for j in jobs), len(jobs), len(rejected))
    return jobs


def plan_result_ranges(storage_client, output_dirs: list[str], *, target_bytes: int = DEFAULT_RANGE_BYTES,
                       max_partitions: int = 256) -> list[list[dict]]:
    """Partitions of the jobs' result files (predictions_*/errors_*): lists of byte ranges as dicts."""
    files = [f for d in output_dirs for f in list_result_files(storage_client, d)]
    ranges = plan_ranges(files, target_bytes=target_bytes, max_partitions=max_partitions)
    groups = [[r.to_dict() for r in group] for group in group_by_partition(ranges)]
    log.info("%d result file(s), %d bytes, in %d partition(s)", len(files), sum(s for _, s in files), len(groups))
    return groups


def ingest_ranges(store: Store, emb: EmbeddingStore, spec: ModelSpec, batch_id: str, ranges: list[dict],
                  family: Family, *, storage_client=None, open_range=None, block_lines: int = 2000) -> dict:
    """Stream result byte ranges, validate vectors, COPY-load successes and record failures per chunk.

    Memory is bounded by one block (``block_lines`` vectors). A malformed line fails only itself;
    a failure whose key cannot be recovered is counted as ``unattributed`` (its chunk ends
    MISSING_FROM_OUTPUT when the batch closes).
    """
    started = time.monotonic()
    opener = open_range or GcsRangeOpener(storage_client)
    counts = {"lines": 0, "ready": 0, "failed": 0, "unattributed": 0, "tokens": 0}
    by_reason: dict[str, int] = {}
    read_block = getattr(opener, "read_block", DEFAULT_READ_BLOCK)
    for block in stream_results(opener, [ByteRange.from_dict(r) for r in ranges], family, spec.dim,
                                block_lines=block_lines, block_size=read_block):
        counts["lines"] += block.lines
        counts["tokens"] += block.token_count
        failures = [(f.key, f.code, f.message) for f in block.failures]
        vectors = block.vectors
        keys = block.keys
        if len(keys):
            checks = validate_vectors(vectors, spec)
            bad = [c for c in checks if c is not None]
            if bad:
                failures += [(keys[i], code, msg) for i, code, msg in bad]
                keep = [i for i, c in enumerate(checks) if c is None]
                keys, vectors = [keys[i] for i in keep], vectors[keep]
            counts["ready"] += load_vectors_by_hash(store, emb, batch_id, keys, np.ascontiguousarray(vectors))
        counts["unattributed"] += sum(1 for k, _, _ in failures if not k)
        counts["failed"] += mark_failed_by_hash(store, batch_id, failures)
        for _, code, _ in failures:
            by_reason[str(code)] = by_reason.get(str(code), 0) + 1
        log.info("batch %s: %s result lines read, %s chunks READY", batch_id, f"{counts['lines']:,}",
                 f"{counts['ready']:,}")
    counts["by_reason"] = by_reason
    counts["seconds"] = round(time.monotonic() - started, 3)
    return counts


def close_results(store: Store, batch_id: str, jobs: list[dict] | None = None) -> int:
    """After every range was read: chunks with no result line become FAILED — ``JOB_FAILED`` with the
    failed jobs' states and errors when a job ended FAILED/CANCELLED/EXPIRED (retriable: the retry run
    submits them in a new job), else ``MISSING_FROM_OUTPUT``."""
    from reindex.vertex.jobs import FAILED_STATES

    failed_jobs = [j for j in jobs or [] if j["state"] in FAILED_STATES]
    if failed_jobs:  # a chunk without a result line when a job failed: its job's (retriable, a new job)
        reason = "; ".join(f"job {j['name']} ended {j['state']}"
                           + (f": {j['error']['message']}" if j.get("error") else "") for j in failed_jobs)
        return mark_missing(store, batch_id, code=ErrorCode.JOB_FAILED, message=reason)
    n = mark_missing(store, batch_id)
    if n:
        log.warning("batch %s: %d chunk(s) missing from the output", batch_id, n)
    return n
