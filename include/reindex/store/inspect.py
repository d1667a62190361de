"""Read-only queries behind the operator's view (the ``reindex`` Airflow UI plugin) and its JSON API.

Every function takes a ``Store`` and only reads; none knows Airflow. Callers that serve people
(the UI plugin) first call ``read_only`` so the session refuses writes and gives up on a query
after a short statement timeout.

Two pictures of a batch are kept apart on purpose:

* **recorded** — what the batch row says (``total``, ``ready``, ``failed``, ``counts_by_reason``…),
  written by ``summarize_batch`` when the batch closed;
* **now** — the chunks that still carry the batch id. A retry batch takes the retriable failed
  chunks over (their ``batch_id`` changes), so the parent then holds fewer FAILED chunks than it
  recorded; the lineage (``lineage``) shows where they went and how the corpus stands after them.

Columns that later migrations add (``batches.dag_id``, ``corpora.lease_dag_id``) are read through
``to_jsonb(row)->>'…'`` so the queries also work on a store migrated before they existed (NULL then).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import datetime
from typing import Any
from urllib.parse import quote

from psycopg import sql

from reindex.quality import recorded_gate
from reindex.retry import RetryPolicy, decide
from reindex.store import Store

DEFAULT_STATEMENT_TIMEOUT_MS = 5000
MAX_PAGE_ROWS = 1000
CHUNK_STATUSES = ("READY", "PENDING", "FAILED")
_REASON = re.compile(r"[A-Z][A-Z0-9_]{0,63}")
# Result-line failures name their source first: "<uri> byte <offset>[ line <n>]: <what>" (the Vertex result parser).
_SOURCE = re.compile(r"^(?P<uri>\S+) byte (?P<byte>\d+)(?: line (?P<line>\d+))?: ")
_JOB_NAME = re.compile(r"^projects/(?P<project>[^/]+)/locations/(?P<location>[^/]+)/batchPredictionJobs/(?P<id>[^/]+)$")


def read_only(store: Store, *, statement_timeout_ms: int = DEFAULT_STATEMENT_TIMEOUT_MS) -> None:
    """Make the store's session read-only (every later transaction refuses writes) with a statement timeout.

    The connection must not be inside a transaction block (autocommit, as ``PgVectorHook`` opens it).
    """
    if not 1 <= statement_timeout_ms <= 600_000:
        raise ValueError(f"statement_timeout_ms={statement_timeout_ms} is out of range 1–600000")
    store.execute("SET default_transaction_read_only = on")
    store.execute(sql.SQL("SET statement_timeout = {}").format(sql.Literal(int(statement_timeout_ms))))


def check_reason(reason: str | None) -> str | None:
    """``reason`` as an error-code filter (``RATE_LIMITED``…), None for no filter; raises ``ValueError``."""
    if reason is None or reason == "":
        return None
    if not _REASON.fullmatch(reason):
        raise ValueError(f"reason {reason[:80]!r} is not an error code: upper-case letters, digits and _, "
                         "at most 64 characters (e.g. RATE_LIMITED)")
    return reason


def _check_limit(limit: int) -> int:
    if not 1 <= limit <= MAX_PAGE_ROWS:
        raise ValueError(f"limit={limit} is out of range 1–{MAX_PAGE_ROWS}")
    return limit


def _iso(value: datetime | None) -> str | None:
    return value.isoformat(timespec="seconds") if value is not None else None


def _seconds(value: Any) -> float | None:
    return None if value is None else round(float(value), 3)


def _dicts(cur) -> list[dict]:
    names = [c.name for c in cur.description]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def error_source(message: str | None) -> dict | None:
    """Where a result-line failure came from: ``{"uri", "byte", "line"}`` parsed from its message, else None."""
    m = _SOURCE.match(message or "")
    if m is None:
        return None
    return {"uri": m["uri"], "byte": int(m["byte"]), "line": int(m["line"]) if m["line"] else None}


def vertex_console_url(job_name: str | None) -> str | None:
    """The Google Cloud console page of a Vertex batch prediction job, from its resource name."""
    m = _JOB_NAME.match(job_name or "")
    if m is None:
        return None
    return (f"https://console.cloud.google.com/vertex-ai/locations/{quote(m['location'], safe='')}"
            f"/batch-predictions/{quote(m['id'], safe='')}?project={quote(m['project'], safe='')}")


# --- corpora ----------------------------------------------------------------------------------------

def corpora_overview(store: Store, *, recent_batches: int = 5) -> list[dict]:
    """One entry per corpus (sorted by name): active model, chunk and document counts, last batches,
    lease, vector table.

    Each entry: ``corpus``; ``model`` (``checksum``, ``model_id``, ``revision``, ``dim``, ``backend``,
    ``storage``; None before a first run); ``chunks`` (READY / PENDING / FAILED), ``chunks_total``,
    ``failed_by_reason``; ``documents`` (OK / FAILED), ``failed_documents_by_reason``;
    ``last_batch`` and ``recent_batches`` (newest first, at most ``recent_batches``: ``batch_id``,
    ``kind``, ``status``, ``dag_id`` (None when the store does not record it), ``dag_run_id``,
    ``started_at``, ``finished_at``, ``seconds`` — so far, while RUNNING); ``lease`` (None when free,
    else ``batch_id``, ``run_id``, ``dag_id``, ``acquired_at``, ``heartbeat_at``, ``held_seconds``,
    ``heartbeat_age_seconds``); ``vector_table`` (``name``, ``index``, ``bytes`` =
    ``pg_total_relation_size``, table plus indexes and TOAST; None without an active store).
    """
    if not 1 <= recent_batches <= 100:
        raise ValueError(f"recent_batches={recent_batches} is out of range 1–100")
    t = store.t
    corpora = _dicts(store.execute(sql.SQL("""SELECT c.corpus, c.active_model_checksum AS checksum,
            m.model_id, m.revision, m.dim, m.backend, s.storage, s.table_name, s.index_name,
            CASE WHEN s.table_name IS NOT NULL
                 THEN pg_total_relation_size(to_regclass(format('%%I.%%I', %(schema)s::text, s.table_name))) END
                AS table_bytes,
            c.lease_batch_id, c.lease_run_id, to_jsonb(c)->>'lease_dag_id' AS lease_dag_id,
            c.lease_acquired_at, c.lease_heartbeat_at,
            extract(epoch FROM now() - c.lease_acquired_at)::float8 AS held_seconds,
            extract(epoch FROM now() - c.lease_heartbeat_at)::float8 AS heartbeat_age_seconds
        FROM {corpora} c
        LEFT JOIN {models} m ON m.model_checksum = c.active_model_checksum
        LEFT JOIN {stores} s ON s.corpus = c.corpus AND s.model_checksum = c.active_model_checksum
        ORDER BY c.corpus""").format(corpora=t("corpora"), models=t("models"), stores=t("embedding_stores")),
        {"schema": store.schema}))
    chunks: dict[str, dict[str, int]] = {}
    for corpus, status, n in store.execute(sql.SQL(
            "SELECT corpus, embedding_status, count(*) FROM {} GROUP BY 1, 2").format(t("chunks"))):
        chunks.setdefault(corpus, {})[status] = n
    failed_by_reason: dict[str, dict[str, int]] = {}
    for corpus, code, n in store.execute(sql.SQL("""SELECT corpus, coalesce(error_code, 'UNKNOWN'), count(*) FROM {}
            WHERE embedding_status = 'FAILED' GROUP BY 1, 2 ORDER BY 1, 3 DESC, 2""").format(t("chunks"))):
        failed_by_reason.setdefault(corpus, {})[code] = n
    documents: dict[str, dict[str, int]] = {}
    docs_by_reason: dict[str, dict[str, int]] = {}
    for corpus, status, code, n in store.execute(sql.SQL("""SELECT corpus, status,
            CASE WHEN status = 'FAILED' THEN coalesce(error_code, 'UNKNOWN') END, count(*) FROM {}
            GROUP BY 1, 2, 3 ORDER BY 1, 4 DESC, 3""").format(t("documents"))):
        documents.setdefault(corpus, {}).setdefault(status, 0)
        documents[corpus][status] += n
        if status == "FAILED":
            docs_by_reason.setdefault(corpus, {})[code] = n
    recent: dict[str, list[dict]] = {}
    for row in _dicts(store.execute(sql.SQL("""SELECT corpus, batch_id, kind, status, to_jsonb(b)->>'dag_id' AS dag_id,
                dag_run_id, started_at, finished_at,
                extract(epoch FROM coalesce(finished_at, now()) - started_at)::float8 AS seconds
            FROM (SELECT b.*, row_number() OVER (PARTITION BY corpus ORDER BY started_at DESC, batch_id) AS n
                  FROM {batches} b) b
            WHERE n <= %s ORDER BY corpus, started_at DESC, batch_id""").format(batches=t("batches")),
            (recent_batches,))):
        corpus = row.pop("corpus")
        row.update(started_at=_iso(row["started_at"]), finished_at=_iso(row["finished_at"]),
                   seconds=_seconds(row["seconds"]))
        recent.setdefault(corpus, []).append(row)
    out = []
    for c in corpora:
        name = c["corpus"]
        counts = {s: chunks.get(name, {}).get(s, 0) for s in CHUNK_STATUSES}
        out.append({
            "corpus": name,
            "model": None if c["checksum"] is None else {
                "checksum": c["checksum"], "model_id": c["model_id"], "revision": c["revision"], "dim": c["dim"],
                "backend": c["backend"], "storage": c["storage"]},
            "chunks": counts,
            "chunks_total": sum(counts.values()),
            "failed_by_reason": failed_by_reason.get(name, {}),
            "documents": {"OK": documents.get(name, {}).get("OK", 0),
                          "FAILED": documents.get(name, {}).get("FAILED", 0)},
            "failed_documents_by_reason": docs_by_reason.get(name, {}),
            "last_batch": (recent.get(name) or [None])[0],
            "recent_batches": recent.get(name, []),
            "lease": None if c["lease_batch_id"] is None else {
                "batch_id": c["lease_batch_id"], "run_id": c["lease_run_id"], "dag_id": c["lease_dag_id"],
                "acquired_at": _iso(c["lease_acquired_at"]), "heartbeat_at": _iso(c["lease_heartbeat_at"]),
                "held_seconds": _seconds(c["held_seconds"]),
                "heartbeat_age_seconds": _seconds(c["heartbeat_age_seconds"])},
            "vector_table": None if c["table_name"] is None else {
                "name": c["table_name"], "index": c["index_name"], "bytes": c["table_bytes"]},
        })
    return out


def corpus_lease(store: Store, corpus: str) -> dict | None:
    """The corpus's lease now: None when free (or no such corpus), else ``batch_id``, ``run_id``,
    ``dag_id`` (None when the store does not record it), ``acquired_at``, ``heartbeat_at``."""
    row = store.one(sql.SQL("""SELECT lease_batch_id, lease_run_id, to_jsonb(c)->>'lease_dag_id', lease_acquired_at,
            lease_heartbeat_at FROM {} c WHERE corpus = %s""").format(store.t("corpora")), (corpus,))
    if row is None or row[0] is None:
        return None
    return {"batch_id": row[0], "run_id": row[1], "dag_id": row[2], "acquired_at": _iso(row[3]),
            "heartbeat_at": _iso(row[4])}


def corpus_totals(store: Store, corpus: str) -> dict[str, int]:
    """The corpus's chunks by status now (READY / PENDING / FAILED) and ``total``."""
    counts = dict(store.execute(sql.SQL("SELECT embedding_status, count(*) FROM {} WHERE corpus = %s GROUP BY 1").format(
        store.t("chunks")), (corpus,)).fetchall())
    out = {s: counts.get(s, 0) for s in CHUNK_STATUSES}
    out["total"] = sum(out.values())
    return out


# --- batches ----------------------------------------------------------------------------------------

_BATCH_COLUMNS = sql.SQL("""b.batch_id, b.corpus, b.kind, b.backend, b.status, b.dag_run_id,
    to_jsonb(b)->>'dag_id' AS dag_id, b.parent_batch_id, b.model_checksum, b.total, b.ready, b.failed, b.reused,
    b.encoded, b.counts_by_reason, b.job_names, b.tokens, b.cost_usd, b.details, b.started_at, b.finished_at,
    extract(epoch FROM coalesce(b.finished_at, now()) - b.started_at)::float8 AS seconds""")


def batches_of_run(store: Store, *, kinds: list[str], run_id: str | None = None, run_id_prefix: str | None = None,
                   dag_id: str | None = None) -> list[str]:
    """Ids of the batches a DAG run opened, oldest first.

    A batch belongs to the run when its ``dag_run_id`` is ``run_id`` (or starts with
    ``run_id_prefix``: the child runs a nightly run triggers), its ``kind`` is one of ``kinds``
    (run ids are unique per DAG only; each DAG opens batches of its own kind), and — where the store
    records the batch's DAG — that DAG is ``dag_id``.
    """
    if run_id is None and run_id_prefix is None:
        raise ValueError("batches_of_run needs run_id or run_id_prefix")
    if run_id_prefix == "":
        raise ValueError("run_id_prefix must not be empty (it would match every batch)")
    rows = store.execute(sql.SQL("""SELECT batch_id FROM {} b
        WHERE (b.dag_run_id = %(run)s OR left(b.dag_run_id, length(%(prefix)s)) = %(prefix)s)
          AND b.kind = ANY(%(kinds)s)
          AND (%(dag)s::text IS NULL OR to_jsonb(b)->>'dag_id' IS NULL OR to_jsonb(b)->>'dag_id' = %(dag)s)
        ORDER BY b.started_at, b.batch_id""").format(store.t("batches")),
        {"run": run_id, "prefix": run_id_prefix, "kinds": list(kinds), "dag": dag_id}).fetchall()
    return [r[0] for r in rows]


def batch_kind(store: Store, batch_id: str) -> tuple[str, str | None] | None:
    """``(kind, dag_id)`` of a batch (``dag_id`` None when the store does not record it); None if unknown."""
    row = store.one(sql.SQL("SELECT kind, to_jsonb(b)->>'dag_id' FROM {} b WHERE batch_id = %s").format(
        store.t("batches")), (batch_id,))
    return None if row is None else (row[0], row[1])


def _now_counts(store: Store, batch_id: str) -> dict:
    counts: dict[str, int] = dict.fromkeys(CHUNK_STATUSES, 0)
    by_reason: dict[str, int] = {}
    for status, code, n in store.execute(sql.SQL("""SELECT embedding_status,
            CASE WHEN embedding_status = 'FAILED' THEN coalesce(error_code, 'UNKNOWN') END, count(*)
        FROM {} WHERE batch_id = %s GROUP BY 1, 2 ORDER BY 3 DESC, 2""").format(store.t("chunks")), (batch_id,)):
        counts[status] += n
        if status == "FAILED":
            by_reason[code] = n
    return {**counts, "failed_by_reason": by_reason}


def retriable_count(store: Store, batch_id: str, policy: RetryPolicy | None = None) -> int:
    """How many FAILED chunks of the batch a ``reindex_retry`` run would claim now (``reindex.retry.decide``)."""
    policy = policy or RetryPolicy.from_env()
    rows = store.execute(sql.SQL("""SELECT error_code, retry_count, count(*) FROM {}
        WHERE batch_id = %s AND embedding_status = 'FAILED' GROUP BY 1, 2""").format(store.t("chunks")),
        (batch_id,)).fetchall()
    return sum(n for code, retry_count, n in rows if decide(code, retry_count, policy).retriable)


def first_errors(store: Store, batch_id: str, *, per_reason: int = 3) -> dict[str, list[dict]]:
    """The first ``per_reason`` FAILED chunks (by chunk id) of each reason the batch holds now."""
    if not 1 <= per_reason <= 100:
        raise ValueError(f"per_reason={per_reason} is out of range 1–100")
    rows = _dicts(store.execute(sql.SQL("""SELECT id AS chunk_pk, chunk_id, doc_id, reason, error_message,
            retry_count FROM (
                SELECT c.*, coalesce(c.error_code, 'UNKNOWN') AS reason,
                       row_number() OVER (PARTITION BY coalesce(c.error_code, 'UNKNOWN') ORDER BY c.id) AS n
                FROM {} c WHERE c.batch_id = %s AND c.embedding_status = 'FAILED') f
        WHERE n <= %s ORDER BY reason, id""").format(store.t("chunks")), (batch_id, per_reason)))
    out: dict[str, list[dict]] = {}
    for r in rows:
        r["source"] = error_source(r["error_message"])
        out.setdefault(r.pop("reason"), []).append(r)
    return out


def _recorded_errors(details: dict, per_reason: int) -> dict[str, list[dict]]:
    """The failures ``summarize_batch`` sampled when the batch closed (``details.sample_errors``), by reason:
    what the first errors were even after a retry batch took those chunks over."""
    out: dict[str, list[dict]] = {}
    for e in details.get("sample_errors") or []:
        if not isinstance(e, dict):
            continue
        rows = out.setdefault(e.get("error_code") or "UNKNOWN", [])
        if len(rows) < per_reason:
            rows.append({"chunk_id": e.get("chunk_id"), "doc_id": e.get("doc_id"),
                         "error_message": e.get("error_message"), "source": error_source(e.get("error_message"))})
    return out


def _jobs(details: dict) -> list[dict]:
    jobs = []
    for j in details.get("jobs") or []:
        if not isinstance(j, dict):
            continue
        m = _JOB_NAME.match(j.get("name") or "")
        jobs.append({"name": j.get("name"), "display_name": j.get("display_name"), "state": j.get("state"),
                     "completion_stats": j.get("completion_stats"), "error": j.get("error"),
                     "output_dir": j.get("output_dir"),
                     "project": m["project"] if m else None, "location": m["location"] if m else None,
                     "job_id": m["id"] if m else None, "console_url": vertex_console_url(j.get("name"))})
    return jobs


def _usage(row: dict) -> dict:
    """Tokens / characters / cost: from ``details.usage`` and ``details.cost`` when recorded, else None."""
    details = row["details"] or {}
    usage = details.get("usage") if isinstance(details.get("usage"), dict) else {}
    tokens = usage.get("tokens", details.get("tokens"))
    if tokens is None and row["tokens"]:
        tokens = int(row["tokens"])
    cost = details.get("cost") if isinstance(details.get("cost"), dict) else None
    if cost is None and row["cost_usd"] is not None:
        cost = {"usd": float(row["cost_usd"]), "priced": True}
    return {"tokens": tokens, "characters": usage.get("characters", details.get("characters")),
            "token_source": usage.get("token_source") or (cost or {}).get("token_source"), "cost": cost}


# The order a batch goes through its stages (``details.stages`` keys); others follow by name.
STAGE_ORDER = ("chunk", "claim", "encode", "submit", "vertex_wait", "ingest", "close", "index", "summarize", "switch")


def _stages(details: dict) -> dict[str, float] | None:
    """Seconds per stage in pipeline order (jsonb keeps object keys in its own order)."""
    stages = details.get("stages")
    if not isinstance(stages, dict) or not stages:
        return None
    rank = {name: i for i, name in enumerate(STAGE_ORDER)}
    keys = sorted((str(k) for k, v in stages.items() if isinstance(v, int | float)),
                  key=lambda k: (rank.get(k, len(rank)), k))
    return {k: float(stages[k]) for k in keys}


def batch_detail(store: Store, batch_id: str, *, per_reason: int = 3, policy: RetryPolicy | None = None
                 ) -> dict | None:
    """Everything the run tab shows of one batch; None when there is no such batch.

    Keys: ``batch_id``, ``corpus``, ``kind``, ``backend``, ``status``, ``dag_id`` (None when not
    recorded), ``dag_run_id``, ``parent_batch_id``, ``model`` (``checksum``, ``model_id``, ``dim``),
    ``started_at``, ``finished_at``, ``seconds``; ``recorded`` (the batch row: ``total``, ``ready``,
    ``failed``, ``reused``, ``encoded``, ``counts_by_reason``); ``now`` (chunks carrying the batch id
    now: READY / PENDING / FAILED, ``failed_by_reason``); ``retriable`` (what a retry would claim now);
    ``first_errors`` (``first_errors``: chunks the batch holds now) and ``recorded_errors`` (the sample
    taken at close, by reason: ``chunk_id``, ``doc_id``, ``error_message``, ``source``); ``jobs`` (``details.jobs`` with ``console_url``), ``job_names``;
    ``usage`` (``tokens``, ``characters``, ``token_source``, ``cost`` — None where not recorded);
    ``stages`` (stage → seconds, None where not recorded); ``message``; ``quality`` (an upgrade's quality gate:
    ``reindex.quality.recorded_gate``, None for a batch without one); ``failed_documents``
    (``count``, ``by_reason``).
    """
    t = store.t
    cur = store.execute(sql.SQL("SELECT {cols}, m.model_id, m.dim FROM {batches} b "
                                "LEFT JOIN {models} m ON m.model_checksum = b.model_checksum "
                                "WHERE b.batch_id = %s").format(cols=_BATCH_COLUMNS, batches=t("batches"),
                                                                 models=t("models")), (batch_id,))
    rows = _dicts(cur)
    if not rows:
        return None
    row = rows[0]
    details = row["details"] or {}
    docs_by_reason = dict(store.execute(sql.SQL("""SELECT coalesce(error_code, 'UNKNOWN'), count(*) FROM {}
        WHERE last_batch_id = %s AND status = 'FAILED' GROUP BY 1 ORDER BY 2 DESC, 1""").format(t("documents")),
        (batch_id,)).fetchall())
    return {
        "batch_id": row["batch_id"], "corpus": row["corpus"], "kind": row["kind"], "backend": row["backend"],
        "status": row["status"], "dag_id": row["dag_id"], "dag_run_id": row["dag_run_id"],
        "parent_batch_id": row["parent_batch_id"],
        "model": {"checksum": row["model_checksum"], "model_id": row["model_id"], "dim": row["dim"]},
        "started_at": _iso(row["started_at"]), "finished_at": _iso(row["finished_at"]),
        "seconds": _seconds(row["seconds"]),
        "recorded": {k: row[k] for k in ("total", "ready", "failed", "reused", "encoded")}
                    | {"counts_by_reason": dict(sorted((row["counts_by_reason"] or {}).items(),
                                                       key=lambda kv: (-kv[1], kv[0])))},
        "now": _now_counts(store, batch_id),
        "retriable": retriable_count(store, batch_id, policy),
        "first_errors": first_errors(store, batch_id, per_reason=per_reason),
        "recorded_errors": _recorded_errors(details, per_reason),
        "jobs": _jobs(details),
        "job_names": list(row["job_names"] or []),
        "usage": _usage(row),
        "stages": _stages(details),
        "message": details.get("message"),
        "quality": recorded_gate(details),
        "failed_documents": {"count": sum(docs_by_reason.values()), "by_reason": docs_by_reason},
    }


def lineage(store: Store, batch_id: str) -> list[dict]:
    """The retry tree ``batch_id`` is part of: its first batch, then every retry batch under it (parents
    before children, siblings by start time), each with ``depth`` (0 = first batch), ``batch_id``,
    ``parent_batch_id``, ``kind``, ``status``, ``dag_id``, ``dag_run_id``, ``started_at``,
    ``finished_at``, ``recorded`` (``total``, ``ready``, ``failed``) and ``now`` (READY / FAILED /
    PENDING the batch holds now). Empty for an unknown batch."""
    t = store.t
    rows = _dicts(store.execute(sql.SQL("""WITH RECURSIVE up AS (
            SELECT batch_id, parent_batch_id, 0 AS hops FROM {b} WHERE batch_id = %s
            UNION ALL SELECT b.batch_id, b.parent_batch_id, up.hops + 1 FROM {b} b
                JOIN up ON b.batch_id = up.parent_batch_id WHERE up.hops < 1000),
        root AS (SELECT batch_id FROM up ORDER BY hops DESC LIMIT 1),
        down AS (SELECT b.batch_id, 0 AS depth, ARRAY[{key}] AS path
                 FROM {b} b WHERE b.batch_id = (SELECT batch_id FROM root)
            UNION ALL SELECT b.batch_id, down.depth + 1, down.path || {key}
                 FROM {b} b JOIN down ON b.parent_batch_id = down.batch_id WHERE down.depth < 1000)
        SELECT d.depth, b.batch_id, b.parent_batch_id, b.kind, b.status, to_jsonb(b)->>'dag_id' AS dag_id,
            b.dag_run_id, b.started_at, b.finished_at, b.total, b.ready, b.failed,
            n.now_ready, n.now_failed, n.now_pending
        FROM down d JOIN {b} b ON b.batch_id = d.batch_id
        CROSS JOIN LATERAL (SELECT count(*) FILTER (WHERE c.embedding_status = 'READY') AS now_ready,
                count(*) FILTER (WHERE c.embedding_status = 'FAILED') AS now_failed,
                count(*) FILTER (WHERE c.embedding_status = 'PENDING') AS now_pending
            FROM {chunks} c WHERE c.batch_id = b.batch_id) n
        ORDER BY d.path""").format(
        b=t("batches"), chunks=t("chunks"),
        # siblings by start time: a sortable UTC text key per level, the batch id breaking ties
        key=sql.SQL("(to_char(b.started_at AT TIME ZONE 'UTC', 'YYYYMMDDHH24MISSUS') || b.batch_id)")),
        (batch_id,)))
    return [{"depth": r["depth"], "batch_id": r["batch_id"], "parent_batch_id": r["parent_batch_id"],
             "kind": r["kind"], "status": r["status"], "dag_id": r["dag_id"], "dag_run_id": r["dag_run_id"],
             "started_at": _iso(r["started_at"]), "finished_at": _iso(r["finished_at"]),
             "recorded": {"total": r["total"], "ready": r["ready"], "failed": r["failed"]},
             "now": {"READY": r["now_ready"], "FAILED": r["now_failed"], "PENDING": r["now_pending"]}}
            for r in rows]


# --- failures ---------------------------------------------------------------------------------------

_FAILED_CHUNKS = sql.SQL("""SELECT id AS chunk_pk, chunk_id, doc_id, coalesce(error_code, 'UNKNOWN') AS error_code,
        error_message, retry_count, updated_at
    FROM {chunks} WHERE batch_id = %(batch)s AND embedding_status = 'FAILED' AND id > %(after)s
      AND (%(reason)s::text IS NULL OR coalesce(error_code, 'UNKNOWN') = %(reason)s)
    ORDER BY id LIMIT %(limit)s""")


def _failed_rows(store: Store, batch_id: str, reason: str | None, after: int, limit: int) -> list[dict]:
    rows = _dicts(store.execute(_FAILED_CHUNKS.format(chunks=store.t("chunks")),
                                {"batch": batch_id, "after": after, "reason": reason, "limit": limit}))
    for r in rows:
        r["updated_at"] = _iso(r["updated_at"])
        r["source"] = error_source(r["error_message"])
    return rows


def failed_chunks(store: Store, batch_id: str, *, reason: str | None = None, after: int = 0,
                  limit: int = 100) -> dict:
    """One page of the batch's FAILED chunks, by chunk id (keyset: pass ``next_after`` as ``after``).

    ``reason`` filters by error code. Returns ``{"rows", "next_after", "limit", "reason"}``; each row
    has ``chunk_pk``, ``chunk_id``, ``doc_id``, ``error_code``, ``error_message``, ``retry_count``,
    ``updated_at`` and ``source`` (result file / byte / line, when the message names them);
    ``next_after`` is None on the last page. Raises ``ValueError`` for a bad reason, limit or cursor.
    """
    reason = check_reason(reason)
    _check_limit(limit)
    if after < 0:
        raise ValueError(f"after={after} must be a chunk id >= 0")
    rows = _failed_rows(store, batch_id, reason, after, limit + 1)
    more = len(rows) > limit
    rows = rows[:limit]
    return {"rows": rows, "next_after": rows[-1]["chunk_pk"] if more else None, "limit": limit, "reason": reason}


def iter_failed_chunks(store: Store, batch_id: str, *, reason: str | None = None, block_rows: int = 5000
                       ) -> Iterator[list[dict]]:
    """Every FAILED chunk of the batch (rows as in ``failed_chunks``) in blocks, by keyset on the chunk
    id: no block is held longer than it takes to send it and no transaction stays open between blocks."""
    reason = check_reason(reason)
    if not 1 <= block_rows <= 100_000:
        raise ValueError(f"block_rows={block_rows} is out of range 1–100000")
    after = 0
    while True:
        rows = _failed_rows(store, batch_id, reason, after, block_rows)
        if not rows:
            return
        yield rows
        after = rows[-1]["chunk_pk"]


def failed_documents(store: Store, batch_id: str, *, limit: int = 100) -> dict:
    """Documents the batch's scan could not read or chunk (``documents`` FAILED with ``last_batch_id``):
    ``{"count", "by_reason", "rows"}``, rows (the first ``limit`` by doc id) with ``doc_id``,
    ``source_uri``, ``error_code``, ``error_message``."""
    _check_limit(limit)
    t = store.t
    by_reason = dict(store.execute(sql.SQL("""SELECT coalesce(error_code, 'UNKNOWN'), count(*) FROM {}
        WHERE last_batch_id = %s AND status = 'FAILED' GROUP BY 1 ORDER BY 2 DESC, 1""").format(t("documents")),
        (batch_id,)).fetchall())
    rows = _dicts(store.execute(sql.SQL("""SELECT doc_id, source_uri, coalesce(error_code, 'UNKNOWN') AS error_code,
            error_message FROM {} WHERE last_batch_id = %s AND status = 'FAILED' ORDER BY doc_id LIMIT %s""").format(
        t("documents")), (batch_id, limit)))
    return {"count": sum(by_reason.values()), "by_reason": by_reason, "rows": rows}
