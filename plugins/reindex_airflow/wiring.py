"""Task groups shared by the reindex DAGs: how a batch ends."""

from __future__ import annotations

from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import task

from reindex_airflow import tasks as t


def encode_and_close(manifest, partitions):
    """encode_partition (mapped) → build_index → summarize → branch on the batch status.

    COMPLETED → ``done``; COMPLETED_WITH_ERRORS with retriable chunks → ``trigger_retry`` (a
    ``reindex_retry`` run for that batch); FAILED → ``fail_batch`` fails the run with the reasons.
    Returns the summary XComArg.
    """
    loaded = task(t.encode_partition, max_active_tis_per_dagrun=2).partial(manifest=manifest).expand(
        partition=partitions)
    index = task(t.build_index, trigger_rule="all_done")(manifest)
    summary = task(t.summarize, trigger_rule="all_done", retries=0)(manifest)
    branch = task.branch(t.choose_branch, task_id="branch")(summary)
    done = EmptyOperator(task_id="done")
    retry = TriggerDagRunOperator(
        task_id="trigger_retry",
        trigger_dag_id="reindex_retry",
        conf={"batch_id": "{{ ti.xcom_pull(task_ids='summarize')['batch_id'] }}"},
        wait_for_completion=False,
    )
    failed = task(t.fail_batch, retries=0)(summary)
    loaded >> index >> summary
    branch >> [done, retry, failed]
    return summary
