"""
### reindex_nightly — incremental reindex of every configured corpus

Scheduled (cron `REINDEX_NIGHTLY_CRON`, default `0 2 * * *` UTC). **Paused when it first appears**,
so a fresh deployment does not start a night on first boot: unpause it once (UI toggle or
`airflow dags unpause reindex_nightly`) — or set `REINDEX_NIGHTLY_ACTIVE=true` before the DAG is
first parsed. Catchup is off: unpausing runs at most the most recent night at once, then one a night.

Corpora: `config/corpora.yaml` (or `$REINDEX_CORPORA_FILE`) **merged** with the Variable
`reindex_corpora` (an entry of the same name wins). The Variable adds to the file, it does not
replace it: the bundled `sample` corpus keeps running unless the file or the Variable says
`{"name": "sample", "uri": "include/sample_corpus", "enabled": false}`.

| task | what it does |
|---|---|
| `corpora` | reads the file and the Variable, validates every entry |
| `reindex` | mapped: one `reindex_corpus` run per corpus (run id `nightly__<this run>__<corpus>`, `…__rerun<N>` when this night runs again), waited for without a worker slot (deferred) |
| `report` | per corpus: the batch its run opened this time (status, chunks encoded, vectors reused, batch jobs submitted, deletions); fails if a corpus run did not succeed or opened no batch |
| `drop_retired_stores` | drops vector tables of replaced models after the retention (`REINDEX_STORE_RETENTION_HOURS`, default 168) |

Running a night again really runs it: clearing a nightly run, or
`airflow backfill create --dag-id reindex_nightly --from-date 2026-11-01 --to-date 2026-11-08 --reprocess-behavior completed`
(the nights of Nov 1–7: `--to-date` is midnight of that day, so a night at 02:00 on it is outside the range),
gives each corpus a new `reindex_corpus` run and batch with the configuration of now, and the report
names that batch. Without `--reprocess-behavior` a backfill skips nights that already ran (the CLI
still prints "Created backfill Dag run" — check the backfill's runs in the UI). Clearing only the
`reindex` task re-runs the same corpus runs (their conf from the first attempt).

Each corpus run is incremental: only new and changed documents are chunked and embedded, deleted
documents lose their chunks and vectors, and a chunk whose text already has a vector reuses it.
A corpus that did not change costs no encode and no batch job. The corpus's active model is
used (the configured `model` only seeds a new corpus); `reindex_model_upgrade` changes models.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import Param, dag, task

from reindex import settings
from reindex_airflow import nightly as n


@dag(
    dag_id="reindex_nightly",
    schedule=settings.nightly_cron(),
    start_date=datetime(2026, 1, 1, tzinfo=UTC),
    catchup=False,
    # Not on first boot: a new deployment (whose Airflow may create DAGs unpaused) does not start a
    # night of every configured corpus at once; unpausing it, or this variable, is the operator's ask.
    is_paused_upon_creation=not settings.nightly_active(),
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
        poke_interval=settings.nightly_poke_seconds(),
        allowed_states=["success"],
        failed_states=["failed"],
        # Clearing this task (not the whole night) finds its corpus run already there: clear and
        # re-run it instead of failing "Dag Run already exists".
        reset_dag_run=True,
        retries=0,  # a failed corpus run is not re-run by itself; the report says what happened
    ).expand_kwargs(runs)
    # The report reads the corpus list itself (not as an argument): a skipped `corpora` has no XCom.
    report = task(n.nightly_report, task_id="report", trigger_rule="all_done", retries=0)()
    # Both are leaves: Airflow decides a run's state by its leaves, so a failed report (a corpus that
    # did not run) fails the night; had it an `all_done` task downstream, the night would end green.
    reindexed >> [report, task(n.drop_retired_stores, trigger_rule="all_done")()]


reindex_nightly()
