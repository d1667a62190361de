"""
### reindex_corpus — (re)index one corpus into PostgreSQL + pgvector

Chunk a corpus with the model's own tokenizer, compute embeddings, bulk-load them (COPY BINARY)
into the corpus's vector table, build the cosine index, and close the batch as
**COMPLETED**, **COMPLETED_WITH_ERRORS** or **FAILED**.

| task | what it does |
|---|---|
| `prepare` | validates Params (and their combinations), the backend's settings and the corpus (exists, readable, not empty) before any write; migrates the store schema, registers the model and its vector table. A refusal fails this task alone, with its message |
| `list_corpus` | takes the corpus's lease (waits or fails if another run writes it), lists the corpus (.txt/.md/.jsonl/.parquet) with each file's size and fingerprint — a file unchanged since it was last read is not opened — and splits the files to read (large .jsonl/.parquet by byte range or row groups) into ≤ 256 shards |
| `scan_shard` | mapped, one per shard: reads, sanitizes and chunks its files (new and changed documents only) and merges its documents and chunks in its own transaction |
| `finish_scan` | after every shard: deletes documents gone from the corpus and chunks re-chunked documents no longer have; a chunk whose text already has a vector reuses it, only the rest are claimed |
| `plan_partitions` | splits the claimed chunks into id ranges (≤ 256 mapped tasks) |
| `encode_partition` | mapped: encodes a range and loads its vectors; failures are recorded per chunk |
| `build_index` | HNSW (or IVFFlat) cosine index after the load, then ANALYZE |
| `summarize` | batch status with counts by reason, failed documents, tokens and estimated cost (the task's XCom and log; the Reindex tab of the run) |
| `branch` | chunks the retry policy still retries → `trigger_retry` (a `reindex_retry` run for them); else COMPLETED, or a FAILED share within `max_failed_ratio` → `done`; else `fail_batch` fails the run with the reasons |

XCom carries manifests (ids, counts), never texts or vectors. Inspect a corpus from a shell with
`python -m reindex status --corpus NAME`.
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import dag, task

from reindex_airflow import tasks as t
from reindex_airflow.params import corpus_params
from reindex_airflow.wiring import embed_and_close, scan_corpus


@dag(
    dag_id="reindex_corpus",
    schedule=None,
    catchup=False,
    doc_md=__doc__,
    tags=["reindex", "pgvector", "embeddings"],
    max_active_runs=4,
    default_args={"owner": "reindex", "retries": 2, "retry_delay": timedelta(seconds=30)},
    params=corpus_params(),
)
def reindex_corpus():
    prepared = task(t.prepare)()
    embed_and_close(scan_corpus(prepared))


reindex_corpus()
