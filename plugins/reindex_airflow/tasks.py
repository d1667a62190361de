"""Task callables of the reindex DAGs: thin adapters from Airflow context to ``reindex.pipeline``.

The DAG files wire these with ``task(fn)``. Each one turns Params into a validated
``ReindexConfig``, opens the store through ``PgVectorHook`` and returns a small manifest.
Configuration and input errors become ``AirflowFailException`` (no task retry can fix them).
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from airflow.sdk.exceptions import AirflowFailException

from reindex_airflow.hooks import PgVectorHook

log = logging.getLogger(__name__)

GCP_CONN_ID = os.environ.get("REINDEX_GCP_CONN_ID", "google_cloud_default")


@contextmanager
def _terminal_errors():
    """Input/config errors fail the task for good, with the message that names the input."""
    from reindex.errors import ConfigError, CorpusError

    try:
        yield
    except (ConfigError, CorpusError) as e:
        raise AirflowFailException(str(e)) from e


def config_from(params: dict[str, Any]):
    from reindex.config import ReindexConfig

    with _terminal_errors():
        return ReindexConfig.from_mapping(dict(params))


def corpus_root(uri: str):
    """A path object for the corpus: ``ObjectStoragePath`` for URIs, ``pathlib.Path`` for paths."""
    from pathlib import Path

    if "://" in uri:
        from airflow.sdk import ObjectStoragePath

        conn_id = GCP_CONN_ID if uri.startswith("gs://") else None
        return ObjectStoragePath(uri, conn_id=conn_id)
    path = Path(uri).expanduser()
    if not path.is_absolute():
        path = Path(os.environ.get("REINDEX_CORPUS_ROOT", os.getcwd())) / path
    return path


def ensure_schema(params: dict | None = None) -> dict:
    """Validate the run's parameters, migrate the store schema, register the model and its vector table.

    Returns ``{"model": {...}, "model_checksum": str, "vector_table": str}``.
    """
    from reindex import pipeline

    cfg = config_from(params or {})
    with PgVectorHook().store() as store, _terminal_errors():
        return pipeline.prepare(store, cfg)


def chunk_corpus(prepared: dict, params: dict | None = None, dag_run=None) -> dict:
    """Read, sanitize and chunk the corpus into chunk rows; claim the chunks that need vectors.

    Returns the batch manifest (ids and counts only).
    """
    from reindex import pipeline

    cfg = config_from(params or {})
    batch_id = pipeline.batch_id_for(dag_run.dag_id, dag_run.run_id, cfg.corpus)
    with PgVectorHook().store() as store, _terminal_errors():
        manifest = pipeline.chunk_corpus(store, cfg, corpus_root(cfg.corpus_uri), batch_id=batch_id,
                                         model_checksum=prepared["model_checksum"], dag_run_id=dag_run.run_id)
        _remember_config(store, batch_id, cfg)
    return {**manifest, "config": cfg.to_dict()}


def _remember_config(store, batch_id: str, cfg) -> None:
    """Keep the run's configuration on the batch, so a retry sub-run encodes the same way."""
    from reindex.store.batches import update_details

    update_details(store, batch_id, {"config": cfg.to_dict()})


def plan_partitions(manifest: dict) -> list[dict]:
    """Split the batch's pending chunks into id ranges (a few hundred mapped tasks at most)."""
    from reindex import pipeline

    cfg = config_from(manifest["config"])
    with PgVectorHook().store() as store:
        return pipeline.plan(store, cfg, manifest["batch_id"])


def encode_partition(partition: dict, manifest: dict) -> dict:
    """Encode one partition locally and bulk-load its vectors; failures are recorded per chunk."""
    from reindex import pipeline

    cfg = config_from(manifest["config"])
    with PgVectorHook().store() as store:
        return pipeline.encode_partition(store, cfg, partition, model_checksum=manifest["model_checksum"])


def build_index(manifest: dict, params: dict | None = None) -> str | None:
    """Build the cosine index on the vector table after the load (if missing), then ANALYZE."""
    from reindex.store.vectors import build_index as _build
    from reindex.store.vectors import get_embedding_store

    cfg = config_from(manifest.get("config") or params or {})
    with PgVectorHook().store() as store:
        return _build(store, get_embedding_store(store, cfg.corpus, manifest["model_checksum"]), cfg.index_type)


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


def plan_result_ranges(submitted: dict, manifest: dict) -> list[list[dict]]:
    """Partition the jobs' result files by file and byte range (≤ 256 mapped tasks, none tiny)."""
    from reindex.vertex.batch import plan_result_ranges as _plan

    _, _, hook = _vertex_context(manifest)
    if not submitted["output_dirs"]:
        return []
    return _plan(hook.storage_client(), submitted["output_dirs"])


def ingest_results(ranges: list[dict], manifest: dict) -> dict:
    """Stream one partition of result lines from GCS: COPY-load vectors, record failures per chunk."""
    from reindex.store.vectors import get_embedding_store
    from reindex.vertex.batch import ingest_ranges

    cfg, backend, hook = _vertex_context(manifest)
    spec = backend.model_spec()
    with PgVectorHook().store() as store:
        emb = get_embedding_store(store, cfg.corpus, manifest["model_checksum"])
        return ingest_ranges(store, emb, spec, manifest["batch_id"], ranges, backend.family,
                             storage_client=hook.storage_client())


def close_results(manifest: dict, submitted: dict) -> int:
    """Every result line is in: chunks no line carried become FAILED (MISSING_FROM_OUTPUT, or
    JOB_FAILED with the job's state and error when the job failed as a whole)."""
    from airflow.sdk.exceptions import AirflowSkipException

    from reindex.vertex.batch import close_results as _close

    if not submitted:  # the Vertex branch was not taken (its trigger rule lets it run past skips)
        raise AirflowSkipException("no Vertex submission in this run")
    with PgVectorHook().store() as store:
        return _close(store, manifest["batch_id"], submitted["jobs"])


def summarize(manifest: dict) -> dict:
    """Close the batch: COMPLETED / COMPLETED_WITH_ERRORS / FAILED with counts by reason."""
    from reindex.store.batches import summarize_batch

    with PgVectorHook().store() as store, store.conn.transaction():
        summary = summarize_batch(store, manifest["batch_id"])
    out = summary.to_dict()
    out.update({k: manifest[k] for k in ("documents", "failed_documents", "chunks") if k in manifest})
    log.info("batch %s: %s — %d/%d READY, %d FAILED, %d retriable, reasons %s", summary.batch_id,
             summary.status.value, summary.ready, summary.total, summary.failed, summary.retriable,
             summary.counts_by_reason)
    return out


def choose_branch(summary: dict) -> str:
    """COMPLETED → done; COMPLETED_WITH_ERRORS with retriable chunks → trigger_retry; else fail_batch."""
    status = summary["status"]
    if status == "COMPLETED":
        return "done"
    if status == "COMPLETED_WITH_ERRORS":
        return "trigger_retry" if summary.get("retriable", 0) > 0 else "done"
    return "fail_batch"


def fail_batch(summary: dict) -> None:
    """Fail the run loudly, with the batch's counts and the first error reasons."""
    reasons = "; ".join(f"{e['chunk_id']}: [{e['error_code']}] {e['error_message']}"
                        for e in summary.get("sample_errors", [])[:5])
    raise AirflowFailException(
        f"batch {summary['batch_id']} FAILED: {summary['ready']}/{summary['total']} chunks READY, "
        f"{summary['failed']} FAILED by reason {summary.get('counts_by_reason')}. First errors: {reasons or 'none'}"
    )


# --- reindex_retry -------------------------------------------------------------------------------

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
        with store.conn.transaction():
            create_batch(store, batch_id, parent["corpus"], parent["backend"], parent["model_checksum"],
                         kind="retry", parent_batch_id=parent_id, dag_run_id=dag_run.run_id)
            claim = claim_retriable(store, parent_id, batch_id)
            _remember_config(store, batch_id, config_from(config))
    retry_at = datetime.now(UTC) + timedelta(seconds=claim["delay_seconds"])
    log.info("retry batch %s for %s: %d chunks to resubmit %s, %d stay FAILED; resubmitting at %s", batch_id,
             parent_id, claim["pending"], claim["actions"], claim["terminal"], retry_at.isoformat())
    return {"batch_id": batch_id, "parent_batch_id": parent_id, "corpus": parent["corpus"],
            "model_checksum": parent["model_checksum"], "config": config, "retry_at": retry_at.isoformat(), **claim}


