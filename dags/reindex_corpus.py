"""
### reindex_corpus — (re)index one corpus into PostgreSQL + pgvector

Chunk a corpus with the model's own tokenizer, compute embeddings, bulk-load them (COPY BINARY)
into the corpus's vector table, build the cosine index, and close the batch as
**COMPLETED**, **COMPLETED_WITH_ERRORS** or **FAILED**.

| task | what it does |
|---|---|
| `ensure_schema` | validates Params, migrates the store schema, registers the model and its vector table |
| `chunk_corpus` | takes the corpus's lease (waits or fails if another run writes it), streams the corpus (.txt/.md/.jsonl/.parquet), sanitizes, chunks new and changed documents only, merges documents and chunks (deleted documents lose theirs); a chunk whose text already has a vector is reused, only the rest are claimed |
| `plan_partitions` | splits the claimed chunks into id ranges (≤ 256 mapped tasks) |
| `encode_partition` | mapped: encodes a range and loads its vectors; failures are recorded per chunk |
| `build_index` | HNSW (or IVFFlat) cosine index after the load, then ANALYZE |
| `summarize` | batch status with counts by reason (see the task's XCom and log) |
| `branch` | COMPLETED → `done`; COMPLETED_WITH_ERRORS → `trigger_retry` (a `reindex_retry` run for the retriable chunks); FAILED → `fail_batch` fails the run with the reasons |

XCom carries manifests (ids, counts), never texts or vectors. Inspect a corpus from a shell with
`python -m reindex status --corpus NAME`.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from airflow.sdk import Param, dag, task

from reindex.config import (
    BUSY_WAIT_RANGE,
    CORPUS_NAME_PATTERN,
    DEFAULT_MODEL,
    ENCODE_BATCH_RANGE,
    IVFFLAT_LISTS_RANGE,
    MAX_TOKENS_RANGE,
    PARTITION_SIZE_RANGE,
    Backend,
    IndexType,
    OnBusy,
    Storage,
)
from reindex_airflow import tasks as t
from reindex_airflow.wiring import embed_and_close

SAMPLE_CORPUS = str(Path(__file__).resolve().parents[1] / "include" / "sample_corpus")


@dag(
    dag_id="reindex_corpus",
    schedule=None,
    catchup=False,
    doc_md=__doc__,
    tags=["reindex", "pgvector", "embeddings"],
    max_active_runs=4,
    default_args={"owner": "reindex", "retries": 2, "retry_delay": timedelta(seconds=30)},
    params={
        "corpus_uri": Param(SAMPLE_CORPUS, type="string", minLength=1, title="Corpus URI",
                            description="Directory or file: a local path, file:// or gs:// URI."),
        "corpus": Param("sample", type="string", pattern=CORPUS_NAME_PATTERN, title="Corpus name",
                        description="Lower-case letter, then letters, digits or '_' (at most 63)."),
        "backend": Param(Backend.LOCAL.value, type="string", enum=[b.value for b in Backend],
                         description="Where embeddings are computed: local sentence-transformers or Vertex batch."),
        "model": Param("", type="string",
                       description="Empty: the corpus's active model (a new corpus gets the bundled "
                                   f"{DEFAULT_MODEL} locally, text-embedding-005 on Vertex). local: "
                                   "sentence-transformers name (local cache) or path; vertex: text-embedding-005, "
                                   "text-multilingual-embedding-002, gemini-embedding-001. A corpus changes model "
                                   "only through reindex_model_upgrade."),
        "output_dimensionality": Param(None, type=["null", "integer"], minimum=1, maximum=3072,
                                       description="Vertex only: vector size asked of the model (empty: its default)."),
        "max_tokens": Param(200, type="integer", minimum=MAX_TOKENS_RANGE[0], maximum=MAX_TOKENS_RANGE[1],
                            description="Most tokens per chunk (model tokenizer, special tokens excluded)."),
        "overlap_tokens": Param(32, type="integer", minimum=0, maximum=MAX_TOKENS_RANGE[1] // 2,
                                description="Tokens shared by consecutive chunks (at most max_tokens/2)."),
        "partition_size": Param(2000, type="integer", minimum=PARTITION_SIZE_RANGE[0],
                                maximum=PARTITION_SIZE_RANGE[1],
                                description="Chunks per mapped encode task (grown to keep ≤ 256 tasks)."),
        "encode_batch_size": Param(64, type="integer", minimum=ENCODE_BATCH_RANGE[0], maximum=ENCODE_BATCH_RANGE[1],
                                   description="Texts per forward pass of the local encoder."),
        "index_type": Param(IndexType.HNSW.value, type="string", enum=[i.value for i in IndexType],
                            description="Cosine index built after the load."),
        "storage": Param(Storage.VECTOR.value, type="string", enum=[s.value for s in Storage],
                         description="Vector column type of a new corpus: vector (float32) or halfvec (half "
                                     "floats: half the table, indexable up to 4,000 dimensions, top-10 recall "
                                     "~99.98 %). Part of the model checksum: with `model` empty a corpus keeps "
                                     "its storage; switch it with reindex_model_upgrade."),
        "ivfflat_lists": Param(None, type=["null", "integer"], minimum=IVFFLAT_LISTS_RANGE[0],
                               maximum=IVFFLAT_LISTS_RANGE[1],
                               description="IVFFlat only: lists (empty: rows/1000, sqrt(rows) above 1M rows)."),
        "force": Param(False, type="boolean",
                       description="Re-chunk every document and re-embed every chunk, even unchanged ones."),
        "on_busy": Param(OnBusy.WAIT.value, type="string", enum=[o.value for o in OnBusy],
                         description="When another run is writing this corpus: wait for it (no worker slot "
                                     "held) or fail at once."),
        "busy_wait_seconds": Param(3600, type="integer", minimum=BUSY_WAIT_RANGE[0], maximum=BUSY_WAIT_RANGE[1],
                                   description="on_busy=wait: give up after this long since the run started."),
    },
)
def reindex_corpus():
    prepared = task(t.ensure_schema)()
    manifest = task(t.chunk_corpus)(prepared)
    embed_and_close(manifest)


reindex_corpus()
