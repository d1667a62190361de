"""
### reindex_nightly — incremental reindex of every configured corpus

Scheduled (cron `REINDEX_NIGHTLY_CRON`, default `0 2 * * *` UTC; catchup off, so a backfill is
how past nights are re-run: `airflow backfill create --dag-id reindex_nightly ...`).

| task | what it does |
|---|---|
| `corpora` | reads `config/corpora.yaml` (or `$REINDEX_CORPORA_FILE`) and the Variable `reindex_corpora`, validates every entry |
| `reindex` | mapped: one `reindex_corpus` run per corpus (run id `nightly__<this run>__<corpus>`), waited for without a worker slot (deferred) |
| `report` | per corpus: batch status, chunks encoded, vectors reused, batch jobs submitted, deletions; fails if a corpus did not complete |
| `drop_retired_stores` | drops vector tables of replaced models after the retention (`REINDEX_STORE_RETENTION_HOURS`, default 168) |

Each corpus run is incremental: only new and changed documents are chunked and embedded, deleted
documents lose their chunks and vectors, and a chunk whose text already has a vector reuses it.
A corpus that did not change costs no encode and no batch job. The corpus's active model is
used (the configured `model` only seeds a new corpus); `reindex_model_upgrade` changes models.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta

from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import Param, dag, task

from reindex_airflow import nightly as n


@dag(
    dag_id="reindex_nightly",
    schedule=os.environ.get("REINDEX_NIGHTLY_CRON", "0 2 * * *"),
    start_date=datetime(2026, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    tags=["reindex", "pgvector", "nightly"],
    default_args={"owner": "reindex", "retries": 1, "retry_delay": timedelta(minutes=2)},
    params={"corpora": Param([], type="array", items={"type": "string"},
                             description="Only these configured corpora (empty: every enabled one).")},
)
def reindex_nightly():
    runs = task(n.nightly_corpora, task_id="corpora")()
    reindexed = TriggerDagRunOperator.partial(
        task_id="reindex",
        trigger_dag_id="reindex_corpus",
        wait_for_completion=True,
        deferrable=True,
        poke_interval=int(os.environ.get("REINDEX_NIGHTLY_POKE_SECONDS", "30")),
        allowed_states=["success"],
        failed_states=["failed"],
        retries=0,  # a retry would trigger the same run id again; the report says what happened
    ).expand_kwargs(runs)
    report = task(n.nightly_report, task_id="report", trigger_rule="all_done", retries=0)(runs)
    reindexed >> report >> task(n.drop_retired_stores, trigger_rule="all_done")()


reindex_nightly()
