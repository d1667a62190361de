"""Task groups shared by the reindex DAGs: how a batch ends."""

from __future__ import annotations

from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import task

from reindex_airflow import tasks as t
from reindex_airflow.operators import SubmitVertexBatchOperator


def embed_and_close(manifest, after=None, *, branch_on_status: bool = True):
    """Route by backend, embed, then build_index → summarize → branch on the batch status.

    local: plan_partitions → encode_partition (mapped). vertex: submit_vertex_batch (deferred) →
    plan_result_ranges → ingest_results (mapped) → close_results.

    COMPLETED → ``done``; COMPLETED_WITH_ERRORS with retriable chunks → ``trigger_retry`` (a
    ``reindex_retry`` run for that batch); FAILED → ``fail_batch`` fails the run with the reasons.
    With ``branch_on_status=False`` the caller branches itself (the model upgrade). Returns the
    summary XComArg.
    """
    route = task.branch(t.choose_backend, task_id="choose_backend")(manifest)
    if after is not None:
        after >> route
    partitions = task(t.plan_partitions)(manifest)
    loaded = task(t.encode_partition, max_active_tis_per_dagrun=2).partial(manifest=manifest).expand(
        partition=partitions)
    submitted = SubmitVertexBatchOperator(task_id="submit_vertex_batch", manifest=manifest)
    ranges = task(t.plan_result_ranges)(submitted.output, manifest)
    ingested = task(t.ingest_results, max_active_tis_per_dagrun=4).partial(manifest=manifest).expand(
        ranges=ranges)
    closed = task(t.close_results, trigger_rule="none_failed_min_one_success")(manifest, submitted.output)
    route >> [partitions, submitted]
    ingested >> closed
    index = task(t.build_index, trigger_rule="all_done")(manifest)
    summary = task(t.summarize, trigger_rule="all_done", retries=0)(manifest)
    [loaded, closed] >> index >> summary
    if not branch_on_status:
        return summary
    branch = task.branch(t.choose_branch, task_id="branch")(summary)
    done = EmptyOperator(task_id="done")
    retry = TriggerDagRunOperator(
        task_id="trigger_retry",
        trigger_dag_id="reindex_retry",
        conf={"batch_id": "{{ ti.xcom_pull(task_ids='summarize')['batch_id'] }}"},
        wait_for_completion=False,
    )
    failed = task(t.fail_batch, retries=0)(summary)
    branch >> [done, retry, failed]
    return summary
