"""
### reindex_model_upgrade — re-embed a corpus with a new model, switch atomically

Triggered by hand (Params form) after an embedding-model upgrade, e.g. 384-d MiniLM → 768-d
ru-en-RoSBERTa, locally or on Vertex — or to move a corpus between `vector` and `halfvec` storage
(the same model, another store).

| task | what it does |
|---|---|
| `prepare_upgrade` | registers the target model (id, revision, dimension, normalisation, storage → checksum) and a new versioned vector table (BUILDING), takes the corpus's lease, claims the chunks without a current vector in it |
| embed tasks | as in `reindex_corpus`: local mapped encode, or Vertex batch jobs; vectors go to the new table only |
| `build_index` | the cosine index of the new table, built after the load — before anyone searches it |
| `summarize` | the upgrade batch's status and counts |
| `switch_model` | one transaction makes the new table the corpus's active one (searches move over at its commit); the old one is RETIRED and dropped after `retention_hours` |
| `fail_upgrade` | chunks without a new vector: the old model keeps serving, the run fails with the reasons |

Searches keep reading the old table until the switch and never see a half-built index. A failed
or killed upgrade resumes when run again: rows already in the new table are not re-embedded.
"""

from __future__ import annotations

from datetime import timedelta

from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.sdk import Param, dag, task

from reindex.config import (
    BUSY_WAIT_RANGE,
    CORPUS_NAME_PATTERN,
    ENCODE_BATCH_RANGE,
    IVFFLAT_LISTS_RANGE,
    PARTITION_SIZE_RANGE,
    Backend,
    IndexType,
    OnBusy,
    Storage,
)
from reindex_airflow import tasks as t
from reindex_airflow.wiring import embed_and_close


@dag(
    dag_id="reindex_model_upgrade",
    schedule=None,
    catchup=False,
    doc_md=__doc__,
    tags=["reindex", "pgvector", "upgrade"],
    max_active_runs=1,
    default_args={"owner": "reindex", "retries": 2, "retry_delay": timedelta(seconds=30)},
    params={
        "corpus": Param(type="string", pattern=CORPUS_NAME_PATTERN, description="The corpus to re-embed."),
        "model": Param(type="string", minLength=1,
                       description="Target model: local sentence-transformers name (local cache) or path; "
                                   "vertex: text-embedding-005, text-multilingual-embedding-002, gemini-embedding-001."),
        "backend": Param(Backend.LOCAL.value, type="string", enum=[b.value for b in Backend]),
        "dimension": Param(None, type=["null", "integer"], minimum=1, maximum=4096,
                           description="local: the dimension the model must produce (checked); vertex: "
                                       "output_dimensionality asked of the model. Empty: the model's own."),
        "normalize": Param(True, type="boolean", description="L2-normalise the vectors (local)."),
        "index_type": Param(IndexType.HNSW.value, type="string", enum=[i.value for i in IndexType],
                            description="Cosine index of the new table, built before the switch."),
        "storage": Param(Storage.VECTOR.value, type="string", enum=[s.value for s in Storage],
                         description="Vector column type of the new table: vector (float32) or halfvec (half "
                                     "floats: half the table, indexable up to 4,000 dimensions). The same model "
                                     "with another storage is an upgrade too."),
        "ivfflat_lists": Param(None, type=["null", "integer"], minimum=IVFFLAT_LISTS_RANGE[0],
                               maximum=IVFFLAT_LISTS_RANGE[1],
                               description="IVFFlat only: lists (empty: rows/1000, sqrt(rows) above 1M rows)."),
        "partition_size": Param(2000, type="integer", minimum=PARTITION_SIZE_RANGE[0],
                                maximum=PARTITION_SIZE_RANGE[1]),
        "encode_batch_size": Param(64, type="integer", minimum=ENCODE_BATCH_RANGE[0], maximum=ENCODE_BATCH_RANGE[1]),
        "retention_hours": Param(None, type=["null", "number"], minimum=0,
                                 description="Keep the replaced table this long (empty: REINDEX_STORE_RETENTION_HOURS, "
                                             "default 168)."),
        "max_failed": Param(0, type="integer", minimum=0,
                            description="Switch even if up to this many chunks got no new vector."),
        "on_busy": Param(OnBusy.WAIT.value, type="string", enum=[o.value for o in OnBusy]),
        "busy_wait_seconds": Param(3600, type="integer", minimum=BUSY_WAIT_RANGE[0], maximum=BUSY_WAIT_RANGE[1]),
    },
)
def reindex_model_upgrade():
    manifest = task(t.prepare_upgrade)()
    summary = embed_and_close(manifest, branch_on_status=False)
    step = task.branch(t.choose_upgrade_step, task_id="branch")(summary)
    switched = task(t.switch_model, retries=0)(manifest)
    failed = task(t.fail_upgrade, retries=0)(summary, manifest)
    step >> [switched, failed]
    switched >> EmptyOperator(task_id="done")


reindex_model_upgrade()
