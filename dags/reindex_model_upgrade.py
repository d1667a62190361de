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
from airflow.sdk import dag, task

from reindex_airflow import tasks as t
from reindex_airflow.params import upgrade_params
from reindex_airflow.wiring import embed_and_close


@dag(
    dag_id="reindex_model_upgrade",
    schedule=None,
    catchup=False,
    doc_md=__doc__,
    tags=["reindex", "pgvector", "upgrade"],
    max_active_runs=1,
    default_args={"owner": "reindex", "retries": 2, "retry_delay": timedelta(seconds=30)},
    params=upgrade_params(),
)
def reindex_model_upgrade():
    manifest = task(t.prepare_upgrade)()
    summary = embed_and_close(manifest, branch_on_status=False)
    step = task.branch(t.choose_upgrade_step, task_id="branch")(summary)
    switched = task(t.switch_model, retries=0)(manifest)
    failed = task(t.fail_upgrade, retries=0)(summary, manifest)
    step >> [switched, failed]
    done = EmptyOperator(task_id="done")
    switched >> done
    manifest >> done  # a refused upgrade (first task) ends the run failed, not skipped-green


reindex_model_upgrade()
