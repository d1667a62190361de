"""Task callables of the reindex DAGs: thin adapters from Airflow context to ``reindex.pipeline``.

The DAG files wire these with ``task(fn)``. Each one turns Params into a validated
``ReindexConfig``, opens the store through ``PgVectorHook`` and returns a small manifest.
Terminal errors (``reindex.errors.TerminalError``: configuration, input, store state) fail a task for good
through ``failures.task_outcome``; anything else is left to the task's retries.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

from airflow.sdk.exceptions import AirflowFailException

from reindex_airflow.failures import task_outcome, terminal_errors
from reindex_airflow.hooks import PgVectorHook

log = logging.getLogger(__name__)



def config_from(params: dict[str, Any]):
    from reindex.config import ReindexConfig

    with terminal_errors():
        return ReindexConfig.from_mapping(dict(params))


def corpus_root(uri: str):
    """A path object for the corpus: ``ObjectStoragePath`` for URIs, ``pathlib.Path`` for paths."""
    from pathlib import Path

    if "://" in uri:
        from airflow.sdk import ObjectStoragePath

        from reindex.settings import gcp_conn_id

        conn_id = gcp_conn_id() if uri.startswith("gs://") else None
        return ObjectStoragePath(uri, conn_id=conn_id)
    path = Path(uri).expanduser()
    if not path.is_absolute():
        from reindex.settings import corpus_root as base

        path = base() / path
    return path


def _check_backend_settings(cfg) -> None:
    """The backend's own configuration (Vertex: project, bucket, endpoint; service: its connection) is part of
    the run's input."""
    from reindex.config import Backend

    if cfg.backend == Backend.VERTEX:
        from reindex.vertex.settings import VertexSettings

        VertexSettings.from_env()
    elif cfg.backend == Backend.SERVICE:
        from reindex.service.settings import settings_for

        settings = settings_for(cfg.service_conn_id)
        log.info("embedding service: %s", settings.describe())


@task_outcome
def prepare(params: dict | None = None) -> dict:
    """Validate the run's parameters, the backend's settings and the corpus (exists, readable, not empty),
    then migrate the store schema, register the model and its vector table.

    Every input error is found here, before anything is written, and fails the run with its own message
    (no task retry; the downstream tasks skip). Returns ``{"model": {...}, "model_checksum", "vector_table",
    "config"}``.
    """
    from reindex import pipeline
    from reindex.corpus import check_corpus_root

    cfg = config_from(params or {})
    with terminal_errors():
        _check_backend_settings(cfg)
        check_corpus_root(corpus_root(cfg.corpus_uri), cfg.corpus, cfg.corpus_uri)
    with PgVectorHook().store() as store, terminal_errors():
        return pipeline.prepare(store, cfg)


def _upstream_done(manifest: dict | None, task: str) -> dict:
    """The manifest of a task that must follow a successful upstream; skip quietly when the run already
    failed earlier (its first failure carries the reason — no second traceback)."""
    from airflow.sdk.exceptions import AirflowSkipException

    if not manifest:
        raise AirflowSkipException(f"{task}: skipped, an earlier task failed (its log has the reason)")
    return manifest


def _take_corpus(store, cfg, batch_id: str, dag_run) -> None:
    """Take the corpus's lease for this run, or wait for it without holding a worker slot.

    ``on_busy=wait``: the task is rescheduled (``UP_FOR_RESCHEDULE``) every
    ``REINDEX_LEASE_POLL_SECONDS`` until the lease is free, failing after ``busy_wait_seconds``
    from the run's start. ``on_busy=fail``: the task fails at once, naming the run that holds it.
    """
    from airflow.sdk.exceptions import AirflowRescheduleException

    from reindex.config import OnBusy
    from reindex.store import leases

    holder = leases.try_acquire(store, cfg.corpus, batch_id, getattr(dag_run, "run_id", None),
                                dag_id=getattr(dag_run, "dag_id", None), holder_alive=_holder_alive)
    waited = (datetime.now(UTC) - dag_run.start_date).total_seconds() if dag_run and dag_run.start_date else 0.0
    if holder is None:
        _metrics().lease_waited(cfg.corpus, waited, batch_id=batch_id, run_id=getattr(dag_run, "run_id", None))
        return
    if cfg.on_busy == OnBusy.FAIL:
        raise AirflowFailException(leases.busy_message(cfg.corpus, holder))
    if waited >= cfg.busy_wait_seconds:
        raise AirflowFailException(leases.busy_message(cfg.corpus, holder, waited))
    from reindex.settings import lease_poll_seconds

    poll = lease_poll_seconds()
    log.info("%s Checking again in %.0f s (waited %.0f of busy_wait_seconds=%d).",
             leases.busy_message(cfg.corpus, holder), poll, waited, cfg.busy_wait_seconds)
    raise AirflowRescheduleException(datetime.now(UTC) + timedelta(seconds=poll))


_LIVE_RUN_STATES = {"queued", "running"}


def _http_status(e: Exception) -> int | None:
    """The API server's HTTP status behind an Execution API error: in-process (``dag.test()``) the client's
    ``ServerResponseError``; under a supervisor an ``AirflowRuntimeError`` carrying it in ``error.detail``."""
    response = getattr(e, "response", None)
    if response is not None and isinstance(getattr(response, "status_code", None), int):
        return response.status_code
    detail = getattr(getattr(e, "error", None), "detail", None)
    if isinstance(detail, dict) and isinstance(detail.get("status_code"), int):
        return detail["status_code"]
    return None


def _holder_alive(holder) -> bool | None:
    """Whether the lease holder's DAG run is still queued or running, asked of Airflow (the Execution API
    from a task). None when it cannot be known (no DAG id recorded, or no Airflow to ask)."""
    if not holder.dag_id or not holder.run_id:
        return None
    try:
        from airflow.sdk.execution_time.task_runner import RuntimeTaskInstance

        state = RuntimeTaskInstance.get_dagrun_state(holder.dag_id, holder.run_id)
    except Exception as e:  # noqa: BLE001 - e.g. the run was deleted (404), or no supervisor (plain Python)
        if _http_status(e) == 404:  # no such DAG run (deleted, or it never got its batch): not alive
            return False
        log.info("could not ask Airflow for the state of run %s/%s (%s); using the lease heartbeat",
                 holder.dag_id, holder.run_id, e)
        return None
    return str(getattr(state, "value", state)).lower() in _LIVE_RUN_STATES  # a DagRunState enum or its text


@task_outcome
def list_corpus(prepared: dict, dag_run=None) -> list[dict]:
    """Take the corpus's lease (or wait for it without holding a worker slot), open the batch, list the corpus
    with each file's metadata — unchanged files are left unread — and split the files to read into shards
    (``REINDEX_SCAN_SHARD_BYTES`` / ``REINDEX_SCAN_SHARD_FILES``, at most 256 shards). Returns one small
    descriptor per shard, ``{"batch_id", "shard", "entries", "bytes"}``: the mapped ``scan_shard`` expands over it
    (none when nothing changed)."""
    from reindex import scan, settings
    from reindex.store.batches import add_stage_seconds

    cfg = config_from(prepared["config"])
    batch_id = _batch_id(cfg, dag_run)
    with PgVectorHook().store() as store, terminal_errors():
        _take_corpus(store, cfg, batch_id, dag_run)
        listed = scan.list_corpus(store, cfg, corpus_root(cfg.corpus_uri), batch_id=batch_id,
                                  model_checksum=prepared["model_checksum"], shard_bytes=settings.scan_shard_bytes(),
                                  shard_files=settings.scan_shard_files(), dag_run_id=dag_run.run_id,
                                  dag_id=dag_run.dag_id)
        _remember_config(store, batch_id, cfg)
        add_stage_seconds(store, batch_id, "list", listed["seconds"])
    _metrics().log_event("reindex.listed", **{k: listed.get(k) for k in (
        "batch_id", "corpus", "files", "unchanged_files", "read_files", "split_files", "seconds")},
        shards=len(listed["shards"]))
    return [{"batch_id": batch_id, **s} for s in listed["shards"]]


def _batch_id(cfg, dag_run) -> str:
    from reindex import pipeline

    return pipeline.batch_id_for(dag_run.dag_id, dag_run.run_id, cfg.corpus)


def _shard_label(shard: dict) -> str:
    mib = shard["bytes"] / (1 << 20)
    size = f"{mib:.1f} MiB" if mib >= 0.1 else f"{shard['bytes']:,} bytes"
    return f"shard {shard['shard']}: {shard['entries']:,} file(s) or part(s), {size}"


@task_outcome
def scan_shard(shard: dict, prepared: dict) -> dict:
    """Read, sanitize and chunk one shard of the listing; merge its documents and chunks in its own transaction
    (nothing is deleted here: that waits for every shard). A rerun rewrites the same rows."""
    from reindex import scan
    from reindex.store.batches import add_stage_seconds

    _label_map_index(_shard_label(shard))
    cfg = config_from(prepared["config"])
    with PgVectorHook().store() as store:
        out = scan.scan_shard(store, cfg, corpus_root(cfg.corpus_uri), batch_id=shard["batch_id"],
                              shard=shard["shard"])
        add_stage_seconds(store, shard["batch_id"], "chunk", out["seconds"])
    return out


@task_outcome
def finish_scan(prepared: dict, dag_run=None) -> dict:
    """After every shard: delete the documents gone from the corpus (and chunks re-chunked documents no longer
    have), remember file fingerprints, claim the chunks that need vectors. Returns the batch manifest (ids and
    counts only) the embedding tasks work from."""
    from reindex import scan
    from reindex.store.batches import add_stage_seconds

    cfg = config_from(prepared["config"])
    batch_id = _batch_id(cfg, dag_run)
    with PgVectorHook().store() as store:
        manifest = scan.finish_scan(store, cfg, batch_id=batch_id, model_checksum=prepared["model_checksum"])
        add_stage_seconds(store, batch_id, "chunk", manifest["seconds"])
    _metrics().log_event("reindex.chunked", **{k: manifest.get(k) for k in (
        "batch_id", "corpus", "documents", "unchanged_documents", "failed_documents", "deleted_documents",
        "chunks", "pending", "reused", "shards", "seconds")})
    return {**manifest, "config": cfg.to_dict()}


def _remember_config(store, batch_id: str, cfg) -> None:
    """Keep the run's configuration on the batch, so a retry sub-run encodes the same way."""
    from reindex.store.batches import update_details

    update_details(store, batch_id, {"config": cfg.to_dict()})


@task_outcome
def plan_partitions(manifest: dict) -> list[dict]:
    """Split the batch's pending chunks into id ranges (a few hundred mapped tasks at most)."""
    from reindex import pipeline

    cfg = config_from(manifest["config"])
    with PgVectorHook().store() as store:
        return pipeline.plan(store, cfg, manifest["batch_id"])


def _label_map_index(label: str) -> None:
    """What this mapped task instance handles, shown instead of its bare index (``map_index_template``)."""
    try:
        from airflow.sdk import get_current_context

        get_current_context()["reindex_label"] = label
    except Exception:  # noqa: BLE001 - outside a task (unit tests) there is no context to label
        pass


# Mapped tasks render this after they run: the grid shows "ids 1–2000 (2000 chunks)" or the result files.
MAP_INDEX_TEMPLATE = "{{ reindex_label | default('') }}"


@task_outcome
def encode_partition(partition: dict, manifest: dict) -> dict:
    """Encode one partition locally and bulk-load its vectors; failures are recorded per chunk."""
    from airflow.sdk.exceptions import AirflowSkipException

    from reindex import pipeline
    from reindex.cost import record_partition_usage
    from reindex.errors import TerminalError
    from reindex.store.batches import add_stage_seconds, halt_batch, halted_reason
    from reindex.store.leases import heartbeat

    _label_map_index(f"chunk ids {partition['lo']}–{partition['hi']} ({partition['count']} chunks)")
    cfg = config_from(manifest["config"])
    with PgVectorHook().store() as store:
        halted = halted_reason(store, manifest["batch_id"])
        if halted:  # another partition met an error no chunk is to blame for: one red task, the rest skip
            raise AirflowSkipException(f"batch {manifest['batch_id']} is halted: {halted}")
        heartbeat(store, cfg.corpus, manifest["batch_id"])
        try:
            out = pipeline.encode_partition(store, cfg, partition, model_checksum=manifest["model_checksum"])
        except TerminalError as e:  # e.g. the service refused the API key: stop the batch, blame no chunk
            halt_batch(store, manifest["batch_id"], str(e))
            raise
        add_stage_seconds(store, manifest["batch_id"], "encode", out["seconds"])
        record_partition_usage(store, manifest["batch_id"], f"encode_partition/{partition['index']}",
                               seconds=out["seconds"], service=out.get("service"))
    _metrics().partition_done("encode", out, corpus=cfg.corpus, backend=cfg.backend.value,
                              batch_id=manifest["batch_id"])
    return out


@task_outcome
def build_index(manifest: dict | None = None, params: dict | None = None) -> str | None:
    """Build the cosine index on the vector table after the load (if missing), then ANALYZE."""
    import time

    from reindex.store import vectors
    from reindex.store.batches import add_stage_seconds

    manifest = _upstream_done(manifest, "build_index")
    cfg = config_from(manifest.get("config") or params or {})
    started = time.monotonic()
    with PgVectorHook().store() as store:
        index = vectors.build_index(store, vectors.get_embedding_store(store, cfg.corpus, manifest["model_checksum"]),
                                    cfg.index_type, ivfflat_lists=cfg.ivfflat_lists)
        add_stage_seconds(store, manifest["batch_id"], "index", time.monotonic() - started)
    return index


def choose_backend(manifest: dict) -> str:
    """Route the batch to its backend's tasks: local encoding or Vertex batch jobs."""
    return "submit_vertex_batch" if manifest["config"]["backend"] == "vertex" else "plan_partitions"


def _vertex_context(manifest: dict):
    from reindex.backends import backend_for
    from reindex.vertex.settings import VertexSettings
    from reindex_airflow.hooks import VertexBatchHook

    cfg = config_from(manifest["config"])
    s = VertexSettings.from_env()
    return cfg, backend_for(cfg), VertexBatchHook(s.gcp_conn_id, s.endpoint, s.project)


@task_outcome
def plan_result_ranges(submitted: dict, manifest: dict) -> list[list[dict]]:
    """Partition the jobs' result files by file and byte range (≤ 256 mapped tasks, none tiny)."""
    from reindex.vertex import batch

    _, _, hook = _vertex_context(manifest)
    if not submitted["output_dirs"]:
        return []
    return batch.plan_result_ranges(hook.storage_client(), submitted["output_dirs"])


def _ranges_label(ranges: list[dict]) -> str:
    names = sorted({r["uri"].rsplit("/", 1)[-1] for r in ranges if r.get("uri")})
    mib = sum(max(0, (r.get("end") or 0) - (r.get("start") or 0)) for r in ranges) / (1 << 20)
    shown = ", ".join(names[:3]) + (f" +{len(names) - 3} more" if len(names) > 3 else "")
    return f"{shown} ({mib:.1f} MiB)" if mib else shown


def _ranges_key(ranges: list[dict]) -> str:
    """A stable name for one mapped ingest task's share (a rerun of the task overwrites its own usage)."""
    import hashlib

    text = "|".join(f"{r.get('uri')}:{r.get('start')}-{r.get('end')}" for r in ranges)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@task_outcome
def ingest_results(ranges: list[dict], manifest: dict) -> dict:
    """Stream one partition of result lines from GCS: COPY-load vectors, record failures per chunk."""
    from reindex.cost import record_partition_usage
    from reindex.store.batches import add_stage_seconds
    from reindex.store.leases import heartbeat
    from reindex.store.vectors import get_embedding_store
    from reindex.vertex.batch import ingest_ranges

    _label_map_index(_ranges_label(ranges))
    cfg, backend, hook = _vertex_context(manifest)
    spec = backend.model_spec()
    with PgVectorHook().store() as store:
        heartbeat(store, cfg.corpus, manifest["batch_id"])
        emb = get_embedding_store(store, cfg.corpus, manifest["model_checksum"])
        out = ingest_ranges(store, emb, spec, manifest["batch_id"], ranges, backend.family,
                            storage_client=hook.storage_client())
        add_stage_seconds(store, manifest["batch_id"], "ingest", out.get("seconds") or 0.0)
        record_partition_usage(store, manifest["batch_id"], f"ingest_results/{_ranges_key(ranges)}",
                               reported_tokens=int(out.get("tokens") or 0), seconds=out.get("seconds") or 0.0)
    _metrics().partition_done("ingest", out, corpus=cfg.corpus, backend="vertex", batch_id=manifest["batch_id"])
    return out


@task_outcome
def close_results(submitted: dict) -> int:
    """Every result line is in: chunks no line carried become FAILED (MISSING_FROM_OUTPUT, or
    JOB_FAILED with the job's state and error when the job failed as a whole).

    ``submitted`` is ``submit_vertex_batch``'s return value (it names the batch). The task's only upstreams
    are the Vertex branch's, so on the local path it is skipped by the scheduler and never pulls a missing
    XCom (which the task SDK would log as an error)."""
    from reindex.vertex import batch

    with PgVectorHook().store() as store:
        return batch.close_results(store, submitted["batch_id"], submitted["jobs"])


def _metrics():
    from reindex_airflow import metrics

    return metrics


@task_outcome
def summarize(manifest: dict | None = None) -> dict:
    """Close the batch: COMPLETED / COMPLETED_WITH_ERRORS / FAILED with counts by reason, failed documents,
    tokens and estimated cost, and what is left FAILED of the whole retry chain."""
    from reindex.cost import batch_cost
    from reindex.status import outcome_line
    from reindex.store.batches import summarize_batch

    manifest = _upstream_done(manifest, "summarize")
    cfg = config_from(manifest["config"])
    with PgVectorHook().store() as store, store.conn.transaction():
        # An upgrade keeps the corpus's lease until its switch (or its failure) is done.
        summary = summarize_batch(store, manifest["batch_id"], release_lease=manifest.get("kind") != "upgrade")
        usage = batch_cost(store, manifest["batch_id"])
    summary.tokens, summary.characters, summary.cost = usage["tokens"], usage["characters"], usage["cost"]
    summary.service = usage.get("service") or {}
    out = summary.to_dict()
    out.update({k: manifest[k] for k in ("documents", "unchanged_documents", "deleted_documents", "chunks")
                if k in manifest})
    out["max_failed_ratio"] = cfg.max_failed_ratio
    out["outcome"] = outcome_line(out)
    log.info("%s — %s", out["outcome"], summary.message)
    _metrics().batch_closed(out, backend=cfg.backend.value, cost=usage)
    return out


def choose_branch(summary: dict) -> str:
    """Retriable chunks left → trigger_retry (whatever the status: the policy decides, not "zero READY").
    Nothing left to retry: COMPLETED → done; otherwise the chain's final share of FAILED chunks decides —
    at most ``max_failed_ratio`` → done (the failures stay recorded), above it → fail_batch."""
    if summary.get("halted"):
        return "fail_batch"  # stopped as a whole (e.g. refused credentials): retrying the same cannot help
    if summary.get("retriable", 0) > 0:
        return "trigger_retry"
    if (summary.get("counts_by_reason") or {}).get("MODEL_CHANGED"):
        return "fail_batch"  # the service switched models mid-run: never "done", whatever the share
    if summary["status"] == "COMPLETED":
        return "done"
    if summary["status"] == "FAILED":  # nothing READY (or no readable document), nothing left to retry
        return "fail_batch"
    if summary.get("lineage_failed_ratio", 1.0) <= summary.get("max_failed_ratio", 0.0):
        return "done"  # COMPLETED_WITH_ERRORS within the allowed share: the failures stay recorded and shown
    return "fail_batch"


def _first_errors(summary: dict, n: int = 5) -> str:
    return "; ".join(f"{e.get('doc_id', '?')}/{e['chunk_id']}: [{e['error_code']}] {e['error_message']}"
                     for e in summary.get("sample_errors", [])[:n])


def fail_batch(summary: dict) -> None:
    """Fail the run loudly, with the batch's counts, the chain's FAILED share and the first error reasons."""
    reasons = _first_errors(summary)
    share = summary.get("lineage_failed_ratio", 1.0)
    if summary.get("halted"):
        raise AirflowFailException(
            f"batch {summary['batch_id']} halted: {summary['halted']} ({summary['ready']}/{summary['total']} chunks "
            "READY; the others are NOT_PROCESSED, not blamed: the next run claims them once the cause is fixed)")
    changed = (summary.get("counts_by_reason") or {}).get("MODEL_CHANGED")
    if changed:
        raise AirflowFailException(
            f"batch {summary['batch_id']} {summary['status']}: the embedding service changed its model during the "
            f"run; {changed} chunk(s) failed MODEL_CHANGED and no vector of the other model was stored "
            f"({summary['ready']}/{summary['total']} READY with the batch's model). Run reindex_model_upgrade to move "
            f"corpus {summary['corpus']} to the service's new model. First errors: {reasons or 'none'}")
    raise AirflowFailException(
        f"batch {summary['batch_id']} {summary['status']}: {summary['ready']}/{summary['total']} chunks READY, "
        f"{summary['failed']} FAILED by reason {summary.get('counts_by_reason')}; nothing left to retry. "
        f"{summary.get('lineage_failed', summary['failed'])} of {summary.get('lineage_total', summary['total'])} "
        f"chunk(s) of the run's work are FAILED ({share:.2%}), above max_failed_ratio="
        f"{summary.get('max_failed_ratio', 0.0):.2%}. First errors: {reasons or 'none'}"
    )


# --- reindex_retry -------------------------------------------------------------------------------

@task_outcome
def claim_retry(params: dict | None = None, dag_run=None) -> dict:
    """Open a retry batch for the retriable failed chunks of ``params['batch_id']``.

    Returns the retry manifest with ``retry_at`` (when the retry policy allows resubmission).
    """
    from reindex import pipeline
    from reindex.store.batches import claim_retriable, create_batch, get_batch

    parent_id = (params or {}).get("batch_id")
    with PgVectorHook().store() as store:
        parent = get_batch(store, parent_id) if parent_id else None
        if parent is None:
            raise AirflowFailException(f"batch_id {parent_id!r} does not exist in the store")
        config = parent["details"].get("config") or {}
        batch_id = pipeline.batch_id_for(dag_run.dag_id, dag_run.run_id, parent["corpus"])
        cfg = config_from(config)
        with terminal_errors():
            _take_corpus(store, cfg, batch_id, dag_run)
        with store.conn.transaction():
            create_batch(store, batch_id, parent["corpus"], parent["backend"], parent["model_checksum"],
                         kind="retry", parent_batch_id=parent_id, dag_run_id=dag_run.run_id, dag_id=dag_run.dag_id)
            claim = claim_retriable(store, parent_id, batch_id)
            _remember_config(store, batch_id, cfg)
    retry_at = datetime.now(UTC) + timedelta(seconds=claim["delay_seconds"])
    log.info("retry batch %s for %s: %d chunks to resubmit %s, %d stay FAILED; resubmitting at %s", batch_id,
             parent_id, claim["pending"], claim["actions"], claim["terminal"], retry_at.isoformat())
    return {"batch_id": batch_id, "parent_batch_id": parent_id, "corpus": parent["corpus"],
            "model_checksum": parent["model_checksum"], "config": config, "retry_at": retry_at.isoformat(), **claim}




# --- reindex_model_upgrade -----------------------------------------------------------------------

def upgrade_config(params: dict):
    """The target model's run configuration from the upgrade's Params."""
    p = dict(params)
    dim = p.pop("dimension", None)
    p.pop("retention_hours", None)
    p.pop("max_failed", None)
    p.pop("max_failed_ratio", None)
    if p.get("backend") == "vertex" and dim is not None:
        p["output_dimensionality"] = dim
    p.setdefault("corpus_uri", "store")  # an upgrade re-embeds the stored chunks; it reads no corpus
    return config_from(p)


@task_outcome
def prepare_upgrade(params: dict | None = None, dag_run=None) -> dict:
    """Register the target model and its new store, take the corpus's lease, claim the stale chunks."""
    from reindex import pipeline
    from reindex.backends import backend_for
    from reindex.store import schema
    from reindex.store.leases import release

    params = dict(params or {})
    cfg = upgrade_config(params)
    batch_id = pipeline.batch_id_for(dag_run.dag_id, dag_run.run_id, cfg.corpus)
    with terminal_errors():
        _check_backend_settings(cfg)
        backend_for(cfg).model_spec()  # the target model resolves offline before the corpus is taken
    with PgVectorHook().store() as store, terminal_errors():
        schema.ensure_schema(store)
        _take_corpus(store, cfg, batch_id, dag_run)
        try:
            manifest = pipeline.prepare_upgrade(store, cfg, batch_id=batch_id, dim=params.get("dimension"),
                                                dag_run_id=dag_run.run_id, dag_id=dag_run.dag_id)
        except BaseException:  # a run that fails before its batch exists never leaves the lease behind
            release(store, cfg.corpus, batch_id)
            raise
    return {**manifest, "config": cfg.to_dict()}


def choose_upgrade_step(summary: dict, params: dict | None = None) -> str:
    """Switch when every stale chunk got its new vector (or at most ``max_failed`` did not)."""
    allowed = int((params or {}).get("max_failed") or 0)
    if summary["status"] != "FAILED" and summary["failed"] <= allowed:
        return "switch_model"
    return "fail_upgrade"


@task_outcome
def switch_model(manifest: dict, params: dict | None = None) -> dict:
    """Make the upgraded store the corpus's active one (atomic), then drop stores past retention."""
    from reindex import pipeline
    from reindex.settings import store_retention_hours

    hours = (params or {}).get("retention_hours")
    if hours is None:
        hours = store_retention_hours()
    with PgVectorHook().store() as store:
        out = pipeline.finish_upgrade(store, manifest["corpus"], manifest["batch_id"], manifest["model_checksum"],
                                      retention_seconds=float(hours) * 3600)
    log.info("corpus %s now served by %s (was %s); dropped %s", out["corpus"], out["active_model_checksum"],
             out["previous_model_checksum"], out["dropped_tables"] or "nothing")
    return out


@task_outcome
def fail_upgrade(summary: dict, manifest: dict) -> None:
    """Keep the old model active, give the corpus back, and fail with the reasons; a rerun resumes."""
    from reindex.store.leases import release

    with PgVectorHook().store() as store:
        release(store, manifest["corpus"], manifest["batch_id"])
    reasons = _first_errors(summary)
    raise AirflowFailException(
        f"upgrade batch {summary['batch_id']} not switched: {summary['failed']} of {summary['total']} chunks have no "
        f"vector for the target model, by reason {summary.get('counts_by_reason')}. The corpus still serves its "
        f"previous model. Run the upgrade again to resume (done rows are kept). First errors: {reasons or 'none'}"
    )
