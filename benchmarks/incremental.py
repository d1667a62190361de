"""Benchmark 3: incremental reindexing — a ~100k-chunk corpus indexed, then reindexed unchanged, then
reindexed with 1 % of its documents edited.

Each run is the local path of ``reindex_corpus`` as plain pipeline calls, the same functions its tasks
run: ``prepare`` → ``chunk_corpus`` → ``plan`` → ``encode_partition`` (every partition, in turn) →
``finish_batch`` (HNSW index after the load, ANALYZE, batch status). The encoder is counted (texts
passed to ``encode``).

Encoding 100k chunks with MiniLM on this 2-core CPU would take about an hour, so the **first, full
run uses a stub encoder** (random unit vectors, labelled as such in the table) — everything else in
that run is real. That makes the full run *shorter* than a real one, so "second run < 10 % of the
full run" is checked against a lower bound: the real full run is longer by the encode time, which
the table extrapolates from the real encoder's rate measured in the 1 %-edit run. The unchanged and
the 1 %-edit runs use the real bundled MiniLM encoder.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import numpy as np

from benchmarks.common import bench_dir, peak_rss_mib, store_uri

log = logging.getLogger("benchmarks.incremental")
CORPUS = "inc"


class CountingEncoder:
    """Wraps an encoder: counts the texts it is asked to encode; ``stub`` returns random unit vectors."""

    def __init__(self, real, *, stub: bool = False) -> None:
        self.real, self.stub = real, stub
        self.spec = real.spec
        self.texts = 0
        self.calls = 0
        self.seconds = 0.0
        self._rng = np.random.default_rng(0)

    def encode(self, texts: list[str]) -> np.ndarray:
        self.calls += 1
        self.texts += len(texts)
        t0 = time.perf_counter()
        if self.stub:
            v = self._rng.standard_normal((len(texts), self.spec.dim)).astype(np.float32)
            v /= np.linalg.norm(v, axis=1, keepdims=True)
        else:
            v = self.real.encode(texts)
        self.seconds += time.perf_counter() - t0
        return v


def _run(store, cfg, root: Path, batch_id: str, encoder: CountingEncoder) -> dict:
    from reindex import pipeline

    stages: dict[str, float] = {}
    t0 = time.perf_counter()
    prepared = pipeline.prepare(store, cfg)
    stages["prepare"] = time.perf_counter() - t0
    t = time.perf_counter()
    manifest = pipeline.chunk_corpus(store, cfg, root, batch_id=batch_id, model_checksum=prepared["model_checksum"])
    stages["chunk_corpus"] = time.perf_counter() - t
    t = time.perf_counter()
    parts = pipeline.plan(store, cfg, batch_id)
    stages["plan"] = time.perf_counter() - t
    t = time.perf_counter()
    for part in parts:
        pipeline.encode_partition(store, cfg, part, model_checksum=prepared["model_checksum"], encoder=encoder)
    stages["encode_partitions"] = time.perf_counter() - t
    t = time.perf_counter()
    summary = pipeline.finish_batch(store, cfg, batch_id, prepared["model_checksum"])
    stages["finish_batch"] = time.perf_counter() - t
    seconds = time.perf_counter() - t0
    return {"seconds": round(seconds, 2), "stages": {k: round(v, 2) for k, v in stages.items()},
            "documents": manifest["documents"], "unchanged_documents": manifest["unchanged_documents"],
            "read_files": manifest.get("read_files"), "unchanged_files": manifest.get("unchanged_files"),
            "chunks": manifest["chunks"], "pending": manifest.get("pending"), "reused": manifest.get("reused"),
            "partitions": len(parts), "encoded_texts": encoder.texts, "encode_calls": encoder.calls,
            "encode_seconds": round(encoder.seconds, 2), "status": summary.status.value, "ready": summary.ready}


def run(data_dir: Path, *, docs: int = 10_400, edit_fraction: float = 0.01, seed: int = 0,
        encode_rate: float | None = None) -> dict:
    """The three runs; ``encode_rate`` (texts/s of the real encoder, e.g. from the encode benchmark)
    extrapolates the real full run, else the rate of run 3 is used."""
    import psycopg
    from psycopg import sql

    from benchmarks.texts import edit_corpus, write_corpus
    from reindex.config import ReindexConfig
    from reindex.embeddings.local import LocalEncoder
    from reindex.store import Store

    work = bench_dir(data_dir) / f"incremental-{docs}"
    root = work / "corpus"
    if root.exists():
        for f in root.glob("*.jsonl"):
            f.unlink()
    size = write_corpus(root, docs, seed=seed)
    uri = store_uri(data_dir)
    schema = f"incremental_{docs}"
    conn = psycopg.connect(uri, autocommit=True)
    with contextlib.closing(conn):
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
        store = Store(conn, schema)
        cfg = ReindexConfig(corpus=CORPUS, corpus_uri=str(root), backend="local")
        real = LocalEncoder("default", batch_size=cfg.encode_batch_size)
        runs = {}
        log.info("incremental: full run over %d documents (%.0f MiB), stub encoder", docs, size / 2**20)
        runs["full"] = _run(store, cfg, root, "inc-1", CountingEncoder(real, stub=True))
        log.info("incremental full: %s", runs["full"])
        runs["unchanged"] = _run(store, cfg, root, "inc-2", CountingEncoder(real))
        log.info("incremental unchanged: %s", runs["unchanged"])
        edited = edit_corpus(root, edit_fraction, seed=seed + 1)
        runs["edited"] = _run(store, cfg, root, "inc-3", CountingEncoder(real))
        runs["edited"]["edited_documents"] = edited
        log.info("incremental edited: %s", runs["edited"])
    full, again, edit = runs["full"], runs["unchanged"], runs["edited"]
    rate, source = encode_rate, "the project encoder's CPU rate from the encode benchmark"
    if not rate:
        rate = edit["encoded_texts"] / edit["encode_seconds"] if edit["encode_seconds"] else None
        source = "the real encoder's rate in run 3"
    real_full = full["seconds"] - full["encode_seconds"] + (full["encoded_texts"] / rate if rate else 0)
    return {"docs": docs, "bytes": size, "runs": runs, "real_encode_rate": round(rate, 1) if rate else None,
            "rate_source": source,
            "full_real_estimate_s": round(real_full, 1),
            "unchanged_vs_full_stub": round(again["seconds"] / full["seconds"], 4),
            "unchanged_vs_full_real_estimate": round(again["seconds"] / real_full, 4),
            "rss_mib": round(peak_rss_mib(), 1)}
