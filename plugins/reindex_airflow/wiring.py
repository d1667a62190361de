"""Task groups shared by the reindex DAGs: how a batch ends."""

from __future__ import annotations

from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import task

from reindex import settings
from reindex_airflow import tasks as t
from reindex_airflow.operators import SubmitVertexBatchOperator


class TriggerRetryOperator(TriggerDagRunOperator):
    """``TriggerDagRunOperator`` whose run note is templated too: the retry run says why it exists."""

    template_fields = (*TriggerDagRunOperator.template_fields, "note")


_BATCH_ID = "{{ ti.xcom_pull(task_ids='summarize')['batch_id'] }}"
_OUTCOME = "{{ ti.xcom_pull(task_ids='summarize')['outcome'] }}"
_NOW = "{{ macros.datetime.now().strftime('%Y%m%dT%H%M%S') }}"


def encode_task_args() -> dict:
    """The operator arguments of the mapped ``encode_partition`` task, from the environment (``reindex.settings``):
    ``max_active_tis_per_dagrun`` (``REINDEX_ENCODE_CONCURRENCY``), and ``queue`` / ``pool``
    (``REINDEX_ENCODE_QUEUE`` / ``REINDEX_ENCODE_POOL``) only when set, so that unset means Airflow's own
    defaults. Read at parse time: a mapped task's queue, pool and concurrency are fixed before any run's Params
    exist."""
    args: dict = {"max_active_tis_per_dagrun": settings.encode_concurrency()}
    if queue := settings.encode_queue():
        args["queue"] = queue
    if pool := settings.encode_pool():
        args["pool"] = pool
    return args


def scan_corpus(prepared):
    """list_corpus → scan_shard (mapped, ``REINDEX_SCAN_CONCURRENCY`` at a time) → finish_scan. Returns the batch
    manifest XComArg. ``finish_scan`` also runs when no shard was planned (nothing changed: the mapped task has
    no instance and is skipped), never after a failed one."""
    shards = task(t.list_corpus)(prepared)
    scanned = task(t.scan_shard, max_active_tis_per_dagrun=settings.scan_concurrency(),
                   map_index_template=t.MAP_INDEX_TEMPLATE).partial(prepared=prepared).expand(shard=shards)
    manifest = task(t.finish_scan, trigger_rule="none_failed")(prepared)
    scanned >> manifest
    return manifest


def embed_and_close(manifest, after=None, *, branch_on_status: bool = True):
    """Route by backend, embed, then build_index → summarize → branch on the batch status.

    local: plan_partitions → encode_partition (mapped; its concurrency, Celery queue and pool from
    ``encode_task_args``). vertex: submit_vertex_batch (deferred) → plan_result_ranges → ingest_results (mapped,
    ``REINDEX_INGEST_CONCURRENCY`` at a time) → close_results.

    Retriable chunks left (any status) → ``trigger_retry`` (a ``reindex_retry`` run for that batch);
    nothing left to retry: COMPLETED, or a FAILED share within ``max_failed_ratio`` → ``done``; above it
    → ``fail_batch`` fails the run with the reasons.
    With ``branch_on_status=False`` the caller branches itself (the model upgrade). Returns the
    summary XComArg.
    """
    route = task.branch(t.choose_backend, task_id="choose_backend")(manifest)
    if after is not None:
        after >> route
    partitions = task(t.plan_partitions)(manifest)
    loaded = task(t.encode_partition, **encode_task_args(), map_index_template=t.MAP_INDEX_TEMPLATE).partial(
        manifest=manifest).expand(partition=partitions)
    submitted = SubmitVertexBatchOperator(task_id="submit_vertex_batch", manifest=manifest)
    ranges = task(t.plan_result_ranges)(submitted.output, manifest)
    ingested = task(t.ingest_results, max_active_tis_per_dagrun=settings.ingest_concurrency(),
                    map_index_template=t.MAP_INDEX_TEMPLATE).partial(
        manifest=manifest).expand(ranges=ranges)
    # Only the Vertex branch's tasks are upstream (the batch id comes with the submission): on the local path
    # they are all skipped, so close_results is skipped too instead of pulling a return value that was never
    # pushed; on the Vertex path it still runs when there were no result ranges (ingest_results skipped).
    closed = task(t.close_results, trigger_rule="none_failed_min_one_success")(submitted.output)
    route >> [partitions, submitted]
    ingested >> closed
    index = task(t.build_index, trigger_rule="all_done")(manifest)
    summary = task(t.summarize, trigger_rule="all_done", retries=0)(manifest)
    [loaded, closed] >> index >> summary
    if not branch_on_status:
        return summary
    branch = task.branch(t.choose_branch, task_id="branch")(summary)
    done = EmptyOperator(task_id="done")
    retry = TriggerRetryOperator(
        task_id="trigger_retry",
        trigger_dag_id="reindex_retry",
        # names the corpus's batch; the time keeps a cleared-and-rerun parent from colliding with its first retry
        trigger_run_id=f"retry__{_BATCH_ID}__{_NOW}",
        conf={"batch_id": _BATCH_ID},
        note=f"retry of {_OUTCOME}",
        wait_for_completion=False,
    )
    failed = task(t.fail_batch, retries=0)(summary)
    branch >> [done, retry, failed]
    # A run whose first task refused its input must end failed: `done` also waits for the manifest, so it is
    # upstream_failed then (while build_index/summarize skip quietly) — one red task, the one with the reason.
    manifest >> done
    return summary
