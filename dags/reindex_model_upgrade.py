"""
### reindex_model_upgrade — re-embed a corpus with a new model, check it, switch atomically

Triggered by hand (Params form) after an embedding-model upgrade, e.g. 384-d MiniLM → 768-d
ru-en-RoSBERTa, locally or on Vertex — or to move a corpus between `vector` and `halfvec` storage, or
between local encoders (`encoder`: torch, ONNX Runtime, OpenVINO): the same model, another store.

| task | what it does |
|---|---|
| `prepare_upgrade` | registers the target model (id, revision, dimension, normalisation, storage, encoder → checksum) and a new versioned vector table (BUILDING), takes the corpus's lease, claims the chunks without a current vector in it |
| embed tasks | as in `reindex_corpus`: local mapped encode, or Vertex batch jobs; vectors go to the new table only |
| `build_index` | the cosine index of the new table, built after the load — before anyone searches it |
| `summarize` | the upgrade batch's status and counts |
| `quality_gate` | the new store against the old one on sampled known-item queries (a span of a chunk: does it find its own document?) or `quality_queries`: own-document hit rate in the top 10 of each, top-10 agreement, index recall@10, cosine; recorded on the batch and in its message (run note) |
| `after_gate` | passed → `quality_passed`; below the bar by `quality_below`: `switch` (anyway, recorded), `wait` (`approve_switch`), `fail` (`below_bar`) |
| `approve_switch` | human in the loop (Required Actions): Approve → `switch_model`, Reject (or no answer in `REINDEX_QUALITY_WAIT_HOURS`, default 72) → `quality_failed` |
| `switch_model` | one transaction makes the new table the corpus's active one (searches move over at its commit); the old one is RETIRED and dropped after `retention_hours` |
| `fail_upgrade` / `quality_failed` | chunks without a new vector, or a store below the quality bar: the old model keeps serving, the corpus is given back, the run fails with the reasons |

Searches keep reading the old table until the switch and never see a half-built index. A failed
or killed upgrade resumes when run again: rows already in the new table are not re-embedded.
"""

from __future__ import annotations

import os
from datetime import timedelta

from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.sdk import dag, task

from reindex_airflow import quality as q
from reindex_airflow import tasks as t
from reindex_airflow.params import upgrade_params
from reindex_airflow.wiring import embed_and_close

# How long a switch below the quality bar waits for a human before it is rejected (the corpus stays leased).
WAIT_HOURS = float(os.environ.get("REINDEX_QUALITY_WAIT_HOURS") or 72)


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
    manifest = task(q.prepare_upgrade, task_id="prepare_upgrade")()
    summary = embed_and_close(manifest, branch_on_status=False)
    step = task.branch(q.choose_upgrade_step, task_id="branch")(summary)
    gate = task(q.quality_gate, retries=1)(manifest, summary)
    route = task.branch(q.after_gate, task_id="after_gate")(gate)
    passed = task(q.record_switch_anyway, task_id="quality_passed")(gate)
    approval = q.QualityApprovalOperator(task_id="approve_switch", response_timeout=timedelta(hours=WAIT_HOURS))
    below_bar = EmptyOperator(task_id="below_bar")
    # Each runs after one of its two ways (the other is skipped); both skipped → skipped. They pull their inputs
    # (an XCom argument would make an earlier, successful task one more upstream that alone lets them run).
    switched = task(q.switch_model, task_id="switch_model", retries=0, trigger_rule="none_failed_min_one_success")()
    below = task(q.quality_failed, trigger_rule="none_failed_min_one_success")()
    failed = task(t.fail_upgrade, retries=0)(summary, manifest)
    step >> [gate, failed]
    route >> [passed, approval, below_bar]
    passed >> switched
    below_bar >> below
    approval >> [switched, below]
    done = EmptyOperator(task_id="done")
    switched >> done
    manifest >> done  # a refused upgrade (first task) ends the run failed, not skipped-green


reindex_model_upgrade()
