"""Task callables of ``reindex_nightly``: which corpora to run, and what the night did."""

from __future__ import annotations

import logging
import os

from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from reindex_airflow.hooks import PgVectorHook
from reindex_airflow.tasks import _terminal_errors

log = logging.getLogger(__name__)


def child_run_id(nightly_run_id: str, corpus: str) -> str:
    """The ``reindex_corpus`` run of one corpus for one nightly run: deterministic, readable."""
    return f"nightly__{nightly_run_id}__{corpus}"


def nightly_corpora(params: dict | None = None, dag_run=None) -> list[dict]:
    """The configured corpora (YAML file + Airflow Variable ``reindex_corpora``), validated, as
    ``TriggerDagRunOperator`` kwargs (``trigger_run_id``, ``conf``) for ``reindex_corpus`` runs."""
    from airflow.sdk import Variable

    from reindex.corpora import VARIABLE, corpora_file, load_corpora

    path = corpora_file()
    file_text = path.read_text(encoding="utf-8") if path.exists() else None
    variable_text = Variable.get(VARIABLE, default=None)
    only = (params or {}).get("corpora") or None
    with _terminal_errors():
        confs = load_corpora(file_text, variable_text, file_source=str(path), only=only)
    if not confs:
        raise AirflowSkipException(f"no enabled corpus in {path} or the Variable {VARIABLE!r}")
    log.info("nightly run %s: %d corpora: %s", dag_run.run_id, len(confs), [c["corpus"] for c in confs])
    return [{"trigger_run_id": child_run_id(dag_run.run_id, c["corpus"]), "conf": c} for c in confs]


def nightly_report(runs: list[dict] | None) -> dict:
    """Per corpus: the batch its run closed (status, chunks embedded, reused, jobs, deletions).

    Fails (after reporting every corpus) if any corpus run did not finish its batch, or FAILED.
    """
    from psycopg import sql

    if not runs:
        raise AirflowSkipException("no corpus was run")
    report: dict[str, dict] = {}
    with PgVectorHook().store() as store:
        for run in runs:
            corpus, run_id = run["conf"]["corpus"], run["trigger_run_id"]
            cur = store.execute(sql.SQL("""SELECT batch_id, status, total, ready, failed, reused, encoded,
                    cardinality(job_names) AS jobs, details->>'message' AS message,
                    extract(epoch FROM finished_at - started_at)::float8 AS seconds
                FROM {} WHERE corpus = %s AND dag_run_id = %s AND kind = 'full'
                ORDER BY started_at DESC LIMIT 1""").format(store.t("batches")), (corpus, run_id))
            row = cur.fetchone()
            if row is None:
                report[corpus] = {"run_id": run_id, "status": "NOT_RUN",
                                  "message": "the run ended before its batch opened: see its ensure_schema/"
                                             "chunk_corpus logs"}
                continue
            report[corpus] = {"run_id": run_id, **dict(zip([c.name for c in cur.description], row, strict=True))}
    encoded = sum(r.get("encoded") or 0 for r in report.values())
    jobs = sum(r.get("jobs") or 0 for r in report.values())
    for corpus, r in report.items():
        log.info("corpus %s: %s — %s", corpus, r["status"], r.get("message"))
    summary = {"corpora": report, "encoded": encoded, "jobs_submitted": jobs,
               "message": (f"{len(report)} corpora: {encoded} chunk(s) encoded, {jobs} batch job(s) submitted"
                           + (" — nothing changed" if encoded == 0 and jobs == 0 else ""))}
    log.info("nightly: %s", summary["message"])
    bad = {c: r["status"] for c, r in report.items() if r["status"] not in ("COMPLETED", "COMPLETED_WITH_ERRORS")}
    if bad:
        raise AirflowFailException(f"nightly run incomplete: {bad}; {summary['message']}")
    return summary


def drop_retired_stores() -> list[str]:
    """Drop vector tables of models replaced more than ``REINDEX_STORE_RETENTION_HOURS`` ago (default 168)."""
    from reindex.store.vectors import drop_retired_stores as _drop

    hours = float(os.environ.get("REINDEX_STORE_RETENTION_HOURS", "168"))
    with PgVectorHook().store() as store:
        return _drop(store, retention_seconds=hours * 3600)
