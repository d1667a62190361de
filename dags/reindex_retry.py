"""
### reindex_retry — resubmit the retriable failed chunks of one batch

Triggered by `reindex_corpus` (or by hand) with `{"batch_id": ...}`. Applies the retry policy
(`include/reindex/retry.py`): rate limits and transient encoder errors back off 5/10/20 s up to
3 attempts per chunk, 503s wait 30 s, too-long chunks are re-split, invalid characters are
sanitized once, a daily quota waits for its window; everything else stays FAILED with its reason.
Only failed chunks are resubmitted, in a new batch with its own status, and the run branches the
same way as `reindex_corpus`: a further retry run while attempts remain; when none remain, the
chain's final FAILED share against the parent's `max_failed_ratio` decides success or failure.
"""

from __future__ import annotations

from datetime import timedelta

from airflow.providers.standard.sensors.date_time import DateTimeSensorAsync
from airflow.sdk import Param, dag, task

from reindex_airflow import tasks as t
from reindex_airflow.wiring import embed_and_close


@dag(
    dag_id="reindex_retry",
    schedule=None,
    catchup=False,
    doc_md=__doc__,
    tags=["reindex", "pgvector", "retry"],
    default_args={"owner": "reindex", "retries": 2, "retry_delay": timedelta(seconds=30)},
    params={"batch_id": Param(type="string", minLength=1, description="The batch whose failed chunks to retry.")},
)
def reindex_retry():
    manifest = task(t.claim_retry)()
    wait = DateTimeSensorAsync(task_id="wait_backoff",
                               target_time="{{ ti.xcom_pull(task_ids='claim_retry')['retry_at'] }}")
    manifest >> wait
    embed_and_close(manifest, after=wait)


reindex_retry()
