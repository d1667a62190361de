"""Metrics and structured events of the reindex pipeline, emitted the way Airflow emits its own.

Metrics go through the Task SDK's ``Stats`` (``airflow.sdk.observability.stats``), the client the
task runner initialises from Airflow's ``[metrics]`` configuration: ``statsd_on`` (+ ``statsd_host``,
``statsd_port``, ``statsd_prefix``, ``statsd_influxdb_enabled``), ``otel_on`` (+ ``otel_host`` …),
``statsd_datadog_enabled``, and ``metrics_allow_list`` / ``metrics_block_list``. Nothing here reads
those settings itself; with metrics off every call is a no-op. StatsD needs the ``statsd`` package
(Airflow's ``statsd`` extra); without it Airflow logs "Could not configure StatsClient" and sends nothing.

Names work in plain StatsD, which drops tags: the dimension an operator must see without tags
(failure reason, batch status, job state) is the last name component, e.g.
``reindex.chunks.failed.RATE_LIMITED``. Tags (``corpus``, ``backend``, ``kind`` …) are passed too:
OpenTelemetry turns them into attributes, DogStatsD sends them, and with
``statsd_influxdb_enabled`` they ride on the name (``…,corpus=kb``; statsd-exporter turns them into
labels). With the default ``statsd_prefix`` a line reads ``airflow.reindex.chunks.ready:42|c``.
Seconds are sent as timings (StatsD ``ms``, an OTel histogram). Money is an integer counter of
micro-USD (StatsD counters are integers).

``METRICS`` lists every name (``<REASON>``-style components are filled in at run time); the
statsd-exporter mapping and the Grafana dashboard under ``deploy/`` are tested against it.

Events: ``log_event`` writes ONE structlog line per batch / partition / wait. In a task its fields
are keys of the task log's JSON line (``{"event": "reindex.batch_closed", "batch_id": …}``); the
stdlib ``logging`` ``extra=`` route is not used because Airflow's ProcessorFormatter drops extras.

No function here raises: a metrics problem is logged as a warning and the task goes on.
"""

from __future__ import annotations

import functools
import logging
import re
import sys
from collections.abc import Iterable, Mapping
from datetime import timedelta
from typing import Any

log = logging.getLogger(__name__)

# --- names ------------------------------------------------------------------------------------------
# Every metric this module emits (before Airflow's statsd_prefix), with its StatsD type.
CHUNKS_READY = "reindex.chunks.ready"
CHUNKS_FAILED = "reindex.chunks.failed.<REASON>"  # ErrorCode value, e.g. RATE_LIMITED
CHUNKS_REUSED = "reindex.chunks.reused"
BATCHES = "reindex.batches.<STATUS>"  # COMPLETED | COMPLETED_WITH_ERRORS | FAILED
BATCH_SECONDS = "reindex.batch.seconds"
ENCODE_ROWS = "reindex.encode.rows"  # vectors loaded READY by encode_partition
ENCODE_FAILED = "reindex.encode.failed"
ENCODE_SECONDS = "reindex.encode.seconds"
INGEST_ROWS = "reindex.ingest.rows"  # vectors loaded READY by ingest_results
INGEST_FAILED = "reindex.ingest.failed"
INGEST_LINES = "reindex.ingest.lines"  # result lines read
INGEST_SECONDS = "reindex.ingest.seconds"
VERTEX_JOBS = "reindex.vertex.jobs.<STATE>"  # SUCCEEDED | PARTIALLY_SUCCEEDED | FAILED | CANCELLED | EXPIRED
VERTEX_WAIT_SECONDS = "reindex.vertex.wait.seconds"
TOKENS = "reindex.tokens"
CHARACTERS = "reindex.characters"
COST_USD_MICROS = "reindex.cost.usd_micros"  # estimated price of the work as it ran
COST_ONLINE_USD_MICROS = "reindex.cost.online_usd_micros"  # the same work sent online
LEASE_WAIT_SECONDS = "reindex.lease.wait.seconds"

COUNTER, TIMER = "counter", "timer"
METRICS: dict[str, str] = {
    CHUNKS_READY: COUNTER, CHUNKS_FAILED: COUNTER, CHUNKS_REUSED: COUNTER, BATCHES: COUNTER,
    BATCH_SECONDS: TIMER,
    ENCODE_ROWS: COUNTER, ENCODE_FAILED: COUNTER, ENCODE_SECONDS: TIMER,
    INGEST_ROWS: COUNTER, INGEST_FAILED: COUNTER, INGEST_LINES: COUNTER, INGEST_SECONDS: TIMER,
    VERTEX_JOBS: COUNTER, VERTEX_WAIT_SECONDS: TIMER,
    TOKENS: COUNTER, CHARACTERS: COUNTER, COST_USD_MICROS: COUNTER, COST_ONLINE_USD_MICROS: COUNTER,
    LEASE_WAIT_SECONDS: TIMER,
}
PARTITION_KINDS = {"encode": (ENCODE_ROWS, ENCODE_FAILED, ENCODE_SECONDS),
                   "ingest": (INGEST_ROWS, INGEST_FAILED, INGEST_SECONDS)}

EVENT_LOGGER = "reindex.events"
_RESERVED = {"event", "level", "timestamp", "logger", "logger_name"}  # keys the log line itself uses
_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-/]")  # outside Airflow's allowed stat characters
_TAG_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]")  # tags also ride on names (influx) and become labels


def name(template: str, part: str) -> str:
    """``template`` with its ``<…>`` component replaced by ``part`` (unsafe characters → ``_``)."""
    return re.sub(r"<[A-Z]+>", _UNSAFE.sub("_", str(part)) or "UNKNOWN", template)


# --- the Stats client ---------------------------------------------------------------------------------

def _stats():
    """The Task SDK's Stats module, initialised from Airflow's configuration if no one did yet.

    The task runner (``task_runner.main``) and ``airflow.sdk.serde`` initialise it in every task
    process; a plain process (a script, a test subprocess) gets the same initialisation here.
    """
    from airflow.sdk.observability import stats

    shared = sys.modules[stats.incr.__module__]
    if getattr(shared, "_factory", None) is None:
        reset()
    return stats


def reset() -> None:
    """(Re)initialise the Task SDK's Stats from the current Airflow configuration (and environment).

    For tests that change ``AIRFLOW__METRICS__*`` after Airflow was imported; tasks never need it.
    """
    from airflow.sdk.configuration import conf
    from airflow.sdk.observability import stats
    from airflow.sdk.observability.metrics.stats_utils import get_stats_factory

    stats.initialize(factory=get_stats_factory(),
                     export_legacy_names=conf.getboolean("metrics", "legacy_names_on", fallback=False))


def _tags(fields: Mapping[str, Any]) -> dict[str, str]:
    return {k: _TAG_UNSAFE.sub("_", str(v)) for k, v in fields.items() if v is not None and v != ""}


def _incr(stats, stat: str, count: int, tags: dict[str, str]) -> None:
    if count > 0:  # OTel counters refuse negatives; a zero adds nothing but a packet
        stats.incr(stat, int(count), tags=tags)


def _timing(stats, stat: str, seconds: float | None, tags: dict[str, str]) -> None:
    if seconds is not None and seconds >= 0:
        stats.timing(stat, timedelta(seconds=float(seconds)), tags=tags)


def _guard(what: str):
    """Run the function and log (not raise) any failure: metrics never fail a task."""
    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - observability must not change the task's outcome
                log.warning("reindex metrics: %s not emitted: %s: %s", what, type(e).__name__, e)
                return None
        return inner
    return wrap


# --- events ---------------------------------------------------------------------------------------------

@_guard("event")
def log_event(event: str, **fields: Any) -> None:
    """Write one structured log line ``event`` with ``fields`` as its keys (None values dropped).

    In a task the line is JSON in the task log: ``{"timestamp", "level": "info", "event": event,
    "logger": "reindex.events", **fields}``. A field named like a key of the line itself
    (``event``, ``level``, ``timestamp``, ``logger``) is written as ``field_<name>``.
    """
    import structlog

    clean = {(f"field_{k}" if k in _RESERVED else k): v for k, v in fields.items() if v is not None}
    structlog.get_logger(logger_name=EVENT_LOGGER).info(event, **clean)


# --- what the tasks call --------------------------------------------------------------------------------

@_guard("batch_closed")
def batch_closed(summary: Mapping[str, Any], *, backend: str | None = None,
                 cost: Mapping[str, Any] | None = None) -> None:
    """A batch closed: counts, status, duration, usage and cost; one ``reindex.batch_closed`` event.

    ``summary``: ``summarize``'s dict (``BatchSummary.to_dict()``: ``batch_id``, ``corpus``, ``kind``,
    ``status``, ``ready``, ``failed``, ``reused``, ``counts_by_reason``, ``seconds`` …).
    ``cost``: ``reindex.cost.batch_cost(...)``'s dict (``tokens``, ``characters``, ``token_source``,
    ``compute_seconds`` and ``cost`` = the estimate), or None.

    Emits ``reindex.chunks.ready`` (+ready), ``reindex.chunks.failed.<REASON>`` (+n per reason),
    ``reindex.chunks.reused``, ``reindex.batches.<STATUS>`` (+1), ``reindex.batch.seconds``, and with
    ``cost``: ``reindex.tokens``, ``reindex.characters``, ``reindex.cost.usd_micros``,
    ``reindex.cost.online_usd_micros`` (the last two only when the model is priced).
    """
    stats = _stats()
    tags = _tags({"corpus": summary.get("corpus"), "backend": backend, "kind": summary.get("kind")})
    _incr(stats, CHUNKS_READY, int(summary.get("ready") or 0), tags)
    for reason, n in sorted((summary.get("counts_by_reason") or {}).items()):
        _incr(stats, name(CHUNKS_FAILED, reason), int(n), {**tags, **_tags({"reason": reason})})
    _incr(stats, CHUNKS_REUSED, int(summary.get("reused") or 0), tags)
    status = str(summary.get("status") or "UNKNOWN")
    stats.incr(name(BATCHES, status), 1, tags={**tags, **_tags({"status": status})})
    _timing(stats, BATCH_SECONDS, summary.get("seconds"), tags)
    est: Mapping[str, Any] = {}
    if cost is not None:
        est = cost.get("cost") or {}
        _incr(stats, TOKENS, int(cost.get("tokens") or 0), tags)
        _incr(stats, CHARACTERS, int(cost.get("characters") or 0), tags)
        if est.get("usd") is not None:
            _incr(stats, COST_USD_MICROS, round(float(est["usd"]) * 1_000_000), tags)
        if est.get("online_usd") is not None:
            _incr(stats, COST_ONLINE_USD_MICROS, round(float(est["online_usd"]) * 1_000_000), tags)
    log_event("reindex.batch_closed", batch_id=summary.get("batch_id"), corpus=summary.get("corpus"),
              kind=summary.get("kind"), backend=backend, status=status, total=summary.get("total"),
              ready=summary.get("ready"), failed=summary.get("failed"), reused=summary.get("reused"),
              retriable=summary.get("retriable"), counts_by_reason=summary.get("counts_by_reason") or {},
              jobs_submitted=summary.get("jobs_submitted"), seconds=summary.get("seconds"),
              tokens=cost.get("tokens") if cost else None, token_source=cost.get("token_source") if cost else None,
              characters=cost.get("characters") if cost else None,
              compute_seconds=cost.get("compute_seconds") if cost else None,
              cost_usd=est.get("usd"), online_usd=est.get("online_usd"), saving_usd=est.get("saving_usd"),
              cost_unit=est.get("unit"), price_date=est.get("price_date"), price_note=est.get("note") or None)


def partition_done(kind: str, result: Mapping[str, Any], **context: Any) -> None:
    """One mapped task finished: ``kind`` ``"encode"`` (``encode_partition``'s result: ``ready``,
    ``failed``, ``seconds``, ``partition``, ``batch_id``) or ``"ingest"`` (``ingest_results``'s:
    ``lines``, ``ready``, ``failed``, ``tokens``, ``by_reason``, ``seconds``).

    ``context``: fields for the event and tags, e.g. ``batch_id=…, corpus=…, backend=…, map_index=…``
    (``corpus`` and ``backend`` become tags). Emits ``reindex.<kind>.rows`` (+ready),
    ``reindex.<kind>.failed``, ``reindex.<kind>.seconds`` and, for ingest, ``reindex.ingest.lines``;
    one ``reindex.partition_done`` event with the result and the context.
    """
    if kind not in PARTITION_KINDS:
        raise ValueError(f"partition kind {kind!r} is not one of {sorted(PARTITION_KINDS)}")  # a wiring bug
    _partition_done(kind, result, context)


@_guard("partition_done")
def _partition_done(kind: str, result: Mapping[str, Any], context: dict[str, Any]) -> None:
    stats = _stats()
    rows, failed, seconds = PARTITION_KINDS[kind]
    tags = _tags({"corpus": context.get("corpus"), "backend": context.get("backend")})
    _incr(stats, rows, int(result.get("ready") or 0), tags)
    _incr(stats, failed, int(result.get("failed") or 0), tags)
    if kind == "ingest":
        _incr(stats, INGEST_LINES, int(result.get("lines") or 0), tags)
    _timing(stats, seconds, result.get("seconds"), tags)
    log_event("reindex.partition_done", **{**context, "partition_kind": kind, **dict(result)})


@_guard("vertex_jobs_waited")
def vertex_jobs_waited(seconds: float, jobs: Iterable[Mapping[str, Any]], **context: Any) -> None:
    """The batch's Vertex jobs are all terminal after ``seconds`` of deferred waiting.

    ``jobs``: the trigger event's job infos (``name``, ``state``, ``completion_stats``, ``error``).
    Emits ``reindex.vertex.wait.seconds`` and ``reindex.vertex.jobs.<STATE>`` (+1 per job); one
    ``reindex.vertex_jobs_done`` event with each job's state and completion stats.
    """
    stats = _stats()
    jobs = list(jobs)
    tags = _tags({"corpus": context.get("corpus"), "model": context.get("model")})
    _timing(stats, VERTEX_WAIT_SECONDS, seconds, tags)
    for job in jobs:
        state = str(job.get("state") or "UNKNOWN")
        stats.incr(name(VERTEX_JOBS, state), 1, tags={**tags, **_tags({"state": state})})
    log_event("reindex.vertex_jobs_done", **context, wait_seconds=round(float(seconds), 3),
              jobs=[{"name": j.get("name"), "state": j.get("state"), "completion_stats": j.get("completion_stats"),
                     "error": j.get("error")} for j in jobs])


@_guard("lease_waited")
def lease_waited(corpus: str, seconds: float, **context: Any) -> None:
    """``corpus``'s lease was taken ``seconds`` after the run started (≈ 0 when it was free).

    Emits ``reindex.lease.wait.seconds``; one ``reindex.lease_taken`` event (``context``: e.g.
    ``batch_id=…, run_id=…``).
    """
    stats = _stats()
    _timing(stats, LEASE_WAIT_SECONDS, seconds, _tags({"corpus": corpus}))
    log_event("reindex.lease_taken", corpus=corpus, wait_seconds=round(float(seconds), 3), **context)
