"""The environment the project reads, in one place: each variable, its default and its meaning.

Vertex's own settings (project, location, endpoint, bucket…) are ``reindex.vertex.settings.VertexSettings``
(built from the same environment, validated together); the emulators read their own flags. Everything
else that depends on the environment asks here, so a default is written once (README, "Configuration").
"""

from __future__ import annotations

import os
from pathlib import Path

from reindex.errors import ConfigError


def _number(name: str, default: float, *, minimum: float = 0.0) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None
    if value < minimum:
        raise ConfigError(f"{name}={raw!r} is out of range: must be at least {minimum:g}")
    return value


def store_retention_hours() -> float:
    """``REINDEX_STORE_RETENTION_HOURS``: how long a replaced model's vector table is kept (default 168)."""
    return _number("REINDEX_STORE_RETENTION_HOURS", 168.0)


def lease_ttl_seconds() -> int:
    """``REINDEX_LEASE_TTL_SECONDS``: a lease whose holder's run state cannot be asked, silent this long, is
    taken over (default 6 h)."""
    return int(_number("REINDEX_LEASE_TTL_SECONDS", 6 * 3600.0))


def lease_poll_seconds() -> float:
    """``REINDEX_LEASE_POLL_SECONDS``: how often a run waiting for a busy corpus asks again (default 30)."""
    return _number("REINDEX_LEASE_POLL_SECONDS", 30.0, minimum=0.1)


def gcp_conn_id() -> str:
    """``REINDEX_GCP_CONN_ID``: the Airflow Google connection for credentials (default ``google_cloud_default``)."""
    return os.environ.get("REINDEX_GCP_CONN_ID") or "google_cloud_default"


def corpus_root() -> Path:
    """``REINDEX_CORPUS_ROOT``: the base of relative ``corpus_uri`` paths (default: the working directory)."""
    return Path(os.environ.get("REINDEX_CORPUS_ROOT") or os.getcwd())


def corpora_file(default: Path) -> Path:
    """``REINDEX_CORPORA_FILE``: the nightly corpus list (default ``config/corpora.yaml``)."""
    return Path(os.environ.get("REINDEX_CORPORA_FILE") or default)


def prices_file() -> str | None:
    """``REINDEX_PRICES_FILE``: a YAML price table that overrides the built-in one."""
    return os.environ.get("REINDEX_PRICES_FILE") or None


def nightly_cron() -> str:
    """``REINDEX_NIGHTLY_CRON``: the schedule of ``reindex_nightly`` (default ``0 2 * * *``, UTC)."""
    return os.environ.get("REINDEX_NIGHTLY_CRON") or "0 2 * * *"


def nightly_active() -> bool:
    """``REINDEX_NIGHTLY_ACTIVE``: ``true`` creates ``reindex_nightly`` unpaused (default: paused)."""
    return os.environ.get("REINDEX_NIGHTLY_ACTIVE", "false").strip().lower() in ("1", "true", "yes", "on")


def nightly_poke_seconds() -> int:
    """``REINDEX_NIGHTLY_POKE_SECONDS``: how often the deferred nightly wait checks its corpus runs (default 30)."""
    return int(_number("REINDEX_NIGHTLY_POKE_SECONDS", 30.0, minimum=1.0))


def retry_policy_values() -> dict:
    """``REINDEX_RETRY_BACKOFF`` (``5,10,20``), ``REINDEX_RETRY_UNAVAILABLE_SECONDS`` (30),
    ``REINDEX_RETRY_MAX_ATTEMPTS`` (3), ``REINDEX_QUOTA_RESET_SECONDS`` (3600): the retry policy's knobs."""
    raw = os.environ.get("REINDEX_RETRY_BACKOFF", "5,10,20")
    try:
        backoff = tuple(float(x) for x in raw.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"REINDEX_RETRY_BACKOFF={raw!r} must be comma-separated seconds, e.g. 5,10,20") from None
    return {"backoff_seconds": backoff,
            "unavailable_seconds": _number("REINDEX_RETRY_UNAVAILABLE_SECONDS", 30.0),
            "max_attempts": int(_number("REINDEX_RETRY_MAX_ATTEMPTS", 3.0)),
            "quota_wait_seconds": _number("REINDEX_QUOTA_RESET_SECONDS", 3600.0)}


def service_conn_id() -> str:
    """``REINDEX_SERVICE_CONN_ID``: the Airflow ``http`` connection of the embedding service (default
    ``reindex_embedding_service``); a run's ``service_conn_id`` Param overrides it."""
    return os.environ.get("REINDEX_SERVICE_CONN_ID") or "reindex_embedding_service"


def service_env() -> dict:
    """The embedding service outside Airflow (CLI, scripts, the core's tests): ``REINDEX_SERVICE_URL`` (base
    URL), ``REINDEX_SERVICE_API_KEY``, ``REINDEX_SERVICE_PROTOCOL`` (``seed004`` | ``openai``) and
    ``REINDEX_SERVICE_EXTRA`` (JSON, the connection extra's keys). Inside Airflow the connection is used."""
    import json

    raw = os.environ.get("REINDEX_SERVICE_EXTRA", "").strip()
    try:
        extra = json.loads(raw) if raw else {}
    except ValueError as e:
        raise ConfigError(f"REINDEX_SERVICE_EXTRA is not valid JSON: {e}") from None
    if not isinstance(extra, dict):
        raise ConfigError("REINDEX_SERVICE_EXTRA must be a JSON object, e.g. {\"protocol\": \"openai\"}")
    if os.environ.get("REINDEX_SERVICE_PROTOCOL"):
        extra.setdefault("protocol", os.environ["REINDEX_SERVICE_PROTOCOL"])
    return {"url": os.environ.get("REINDEX_SERVICE_URL", "").strip(),
            "api_key": os.environ.get("REINDEX_SERVICE_API_KEY") or None, "extra": extra}


# --- fan-out (issue 13) ------------------------------------------------------------------------------------
# These are read when the DAG files are parsed (they become the mapped tasks' operator arguments), by the
# dag-processor, so they are environment, not run Params: a Param is known only once a run exists, after the
# task's queue, pool and concurrency are fixed. Set them for the dag-processor (and the scheduler); a change
# takes effect at the next parse.

def _count(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a whole number") from None
    if value < 1:
        raise ConfigError(f"{name}={raw!r} is out of range: must be at least 1")
    return value


def _name(name: str) -> str | None:
    raw = os.environ.get(name, "").strip()
    return raw or None


def encode_concurrency() -> int:
    """``REINDEX_ENCODE_CONCURRENCY``: how many ``encode_partition`` instances of one run may run at once
    (``max_active_tis_per_dagrun``; default 2). Raise it with the number of encode workers."""
    return _count("REINDEX_ENCODE_CONCURRENCY", 2)


def ingest_concurrency() -> int:
    """``REINDEX_INGEST_CONCURRENCY``: how many ``ingest_results`` instances (Vertex result ranges) of one run
    may run at once (``max_active_tis_per_dagrun``; default 4)."""
    return _count("REINDEX_INGEST_CONCURRENCY", 4)


def encode_queue() -> str | None:
    """``REINDEX_ENCODE_QUEUE``: the Celery queue of the ``encode_partition`` tasks, e.g. ``reindex_gpu``
    (default unset: Airflow's ``[operators] default_queue``). Start a worker on it: ``airflow celery worker
    -q reindex_gpu``; every other task stays on the default queue."""
    return _name("REINDEX_ENCODE_QUEUE")


def encode_pool() -> str | None:
    """``REINDEX_ENCODE_POOL``: the Airflow pool of the ``encode_partition`` tasks (default unset:
    ``default_pool``). The pool must exist (``airflow pools set reindex_gpu 4 "GPU encode"``): a task in a
    missing pool is never scheduled. Its slots cap encodes across all runs; the concurrency above, per run."""
    return _name("REINDEX_ENCODE_POOL")


def worker_hostname() -> str:
    """``REINDEX_WORKER_HOSTNAME``: the host name a worker records on the task instances it runs (default: the
    machine's FQDN, Airflow's own). Used as ``AIRFLOW__CORE__HOSTNAME_CALLABLE=reindex.settings.worker_hostname``
    by ``make airflow-celery``, whose workers share one machine: each names itself after its Celery hostname, so
    ``task_instance.hostname`` says which worker ran a task."""
    import socket

    return os.environ.get("REINDEX_WORKER_HOSTNAME", "").strip() or socket.getfqdn()


def celery_broker() -> str | None:
    """``REINDEX_CELERY_BROKER``: the Celery broker of ``make airflow-celery``, e.g. ``redis://localhost:6379/0``
    (default unset: Celery's SQLAlchemy transport on Airflow's own metadata database, ``sqla+postgresql…`` — no
    extra service). An explicit ``AIRFLOW__CELERY__BROKER_URL`` wins over both."""
    return _name("REINDEX_CELERY_BROKER")


def scan_concurrency() -> int:
    """``REINDEX_SCAN_CONCURRENCY``: how many ``scan_shard`` instances (mapped scan tasks) of one run may run at
    once (``max_active_tis_per_dagrun``; default 4). Each reads, sanitizes and chunks its shard on one core."""
    return _count("REINDEX_SCAN_CONCURRENCY", 4)


def scan_shard_bytes() -> int:
    """``REINDEX_SCAN_SHARD_BYTES``: about how many bytes of source one scan shard reads (default 64 MiB); a
    .jsonl or .parquet file larger than this is split into parts of about this size (byte ranges at line
    starts, runs of row groups). Grown as needed so a scan has at most ``MAX_SCAN_SHARDS`` shards. Read by the
    listing task when it runs (not at parse time)."""
    return _count("REINDEX_SCAN_SHARD_BYTES", 64 << 20)


def scan_shard_files() -> int:
    """``REINDEX_SCAN_SHARD_FILES``: at most this many files in one scan shard (default 20,000): many small
    files cost per-file work (open, fingerprint) that bytes do not show. Grown like the bytes."""
    return _count("REINDEX_SCAN_SHARD_FILES", 20_000)


def index_build_memory_mb() -> int:
    """``REINDEX_INDEX_BUILD_MEMORY_MB``: the most ``maintenance_work_mem`` an HNSW build may ask for (default
    4096). The build asks for what its graph needs (measured: about the vector's bytes + 48 bytes per ``m`` per
    vector, e.g. 2.2 KB for a 384-d ``vector``) and no more; a graph larger than this cap spills to disk and the
    build runs about 2× slower (pgvector logs "no longer fits into maintenance_work_mem")."""
    return _count("REINDEX_INDEX_BUILD_MEMORY_MB", 4096)


def index_build_workers() -> int:
    """``REINDEX_INDEX_BUILD_WORKERS``: ``max_parallel_maintenance_workers`` of an index build (default 2; the
    server's ``max_parallel_workers`` and ``max_worker_processes`` cap it too)."""
    return _count("REINDEX_INDEX_BUILD_WORKERS", 2)
