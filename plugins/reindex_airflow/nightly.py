"""Task callables of ``reindex_nightly``: which corpora to run, and what the night did.

A night can be run again — a backfill with ``--reprocess-behavior completed|failed`` or clearing
the nightly run both clear the same nightly run and bump its clear number. The re-run's ``corpora``
task then names new child runs (``…__rerun<N>``, a new batch each, the current configuration);
clearing only ``reindex`` re-runs the same child runs (``reset_dag_run``). Either way ``report``
describes only what the child runs did in their current attempt, and fails the night when a child
did not run or did not succeed: a re-run night is never green on an older batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from reindex_airflow.failures import terminal_errors
from reindex_airflow.hooks import PgVectorHook

log = logging.getLogger(__name__)

CHILD_DAG_ID = "reindex_corpus"
OK_STATUSES = ("COMPLETED", "COMPLETED_WITH_ERRORS")
# The child run's start comes from the Airflow database's host, a batch's start from the store's
# now(): allow this much clock difference between the two when matching a batch to its run.
CLOCK_SKEW = timedelta(seconds=5)


def child_run_id(nightly_run_id: str, corpus: str, attempt: int = 0) -> str:
    """The ``reindex_corpus`` run of one corpus for one nightly run: deterministic, readable.

    ``attempt`` is the nightly run's clear number: each re-run of a night (cleared, or backfilled
    with reprocessing) gets runs of its own, ``…__rerun<N>``, so it re-reads the corpus with the
    configuration of now and opens a new batch instead of finding the old run already there.
    """
    base = f"nightly__{nightly_run_id}__{corpus}"
    return f"{base}__rerun{attempt}" if attempt else base


def nightly_corpora(params: dict | None = None, dag_run=None) -> list[dict]:
    """The configured corpora (YAML file + Airflow Variable ``reindex_corpora``), validated, as
    ``TriggerDagRunOperator`` kwargs (``trigger_run_id``, ``conf``) for ``reindex_corpus`` runs."""
    from airflow.sdk import Variable

    from reindex.corpus_list import VARIABLE, corpora_file, load_corpora

    path = corpora_file()
    file_text = path.read_text(encoding="utf-8") if path.exists() else None
    variable_text = Variable.get(VARIABLE, default=None)
    only = (params or {}).get("corpora") or None
    with terminal_errors():
        confs = load_corpora(file_text, variable_text, file_source=str(path), only=only)
    if not confs:
        raise AirflowSkipException(f"no enabled corpus in {path} or the Variable {VARIABLE!r}")
    attempt = int(getattr(dag_run, "clear_number", 0) or 0)
    log.info("nightly run %s%s: %d corpora: %s", dag_run.run_id, f" (re-run {attempt})" if attempt else "",
             len(confs), [c["corpus"] for c in confs])
    return [{"trigger_run_id": child_run_id(dag_run.run_id, c["corpus"], attempt), "conf": c} for c in confs]


@dataclass(frozen=True)
class ChildOutcome:
    """How one corpus's part of the night ended, as Airflow saw it."""

    task_state: str | None  # the mapped ``reindex`` task instance (None: not found)
    run_state: str | None  # the triggered ``reindex_corpus`` run (None: it does not exist)
    run_started: datetime | None  # that run's start in its current attempt (reset by a clear)


def _state(value) -> str | None:
    return None if value is None else str(getattr(value, "value", value))


def _child_run(ti, run_id: str) -> tuple[str | None, datetime | None]:
    """State and start of the ``reindex_corpus`` run ``run_id``, or ``(None, None)`` when it does not exist.

    The task SDK offers a run's state (``get_dagrun_state``) but not its start, so this asks the
    supervisor for the whole run (the same request the SDK's asset events use). Existence is
    checked first: asking for a missing run logs an API error.
    """
    from airflow.sdk.execution_time.comms import GetDagRun
    from airflow.sdk.execution_time.task_runner import SUPERVISOR_COMMS

    if ti.get_dr_count(dag_id=CHILD_DAG_ID, run_ids=[run_id]) == 0:
        return None, None
    dr = SUPERVISOR_COMMS.send(GetDagRun(dag_id=CHILD_DAG_ID, run_id=run_id))
    return _state(dr.state), dr.start_date


def build_report(store, runs: list[dict], outcomes: list[ChildOutcome]) -> dict:
    """Per corpus: the batch its child run opened in its current attempt (status, chunks encoded,
    reused, jobs, deletions), with the child run's and ``reindex`` task's end states.

    A batch counts only if it belongs to the child run id and started after that run's current
    start (a cleared child run keeps its batch id: the row of the earlier attempt is not this
    night's). ``failed`` names every corpus whose task or run did not succeed or has no such batch.
    """
    from reindex.store.batches import run_batch

    report: dict[str, dict] = {}
    for run, o in zip(runs, outcomes, strict=True):
        corpus, run_id = run["conf"]["corpus"], run["trigger_run_id"]
        entry: dict = {"run_id": run_id, "reindex_task": o.task_state, "run_state": o.run_state,
                       "run_started": o.run_started.isoformat() if o.run_started else None}
        row = None
        if o.run_started is not None:
            row = run_batch(store, corpus, run_id, started_after=o.run_started - CLOCK_SKEW)
            if row is not None:
                row["started_at"] = row["started_at"].isoformat()
        if row is not None:
            entry.update(row)
        else:
            entry["status"] = "NOT_RUN"
        entry["message"] = _explain(store, corpus, run_id, o, row)
        entry["ok"] = (o.task_state == "success" and o.run_state == "success" and row is not None
                       and row["status"] in OK_STATUSES)
        report[corpus] = entry
    encoded = sum(r.get("encoded") or 0 for r in report.values())
    jobs = sum(r.get("jobs") or 0 for r in report.values())
    failed = {c: r["status"] if r["run_state"] in (None, "success") else f"{r['status']} (run {r['run_state']})"
              for c, r in report.items() if not r["ok"]}
    message = (f"{len(report)} corpora: {encoded} chunk(s) encoded, {jobs} batch job(s) submitted"
               + (" — nothing changed" if encoded == 0 and jobs == 0 and not failed else ""))
    return {"corpora": report, "encoded": encoded, "jobs_submitted": jobs, "failed": failed, "message": message}


def _explain(store, corpus: str, run_id: str, o: ChildOutcome, row: dict | None) -> str:
    """One sentence on a corpus's night: the batch's own message, or why there is no batch to report."""
    from reindex.store.batches import run_batch

    if o.run_state is None:
        return (f"no {CHILD_DAG_ID} run {run_id}: the reindex task ended {o.task_state or 'without running'} "
                "before triggering it (see its log)")
    if row is None:
        older = run_batch(store, corpus, run_id)
        why = (f"{CHILD_DAG_ID} run {run_id} ended {o.run_state}" if o.run_state != "success"
               else f"{CHILD_DAG_ID} run {run_id} succeeded")
        since = f" since it started at {o.run_started.isoformat()}" if o.run_started else " (it never started)"
        stale = (f"; the batch {older['batch_id']} ({older['status']}) of that run id started at "
                 f"{older['started_at'].isoformat()}, before, and is not this night's" if older else "")
        return f"{why} without opening a batch{since} (see its prepare/list_corpus logs){stale}"
    msg = row.get("message") or row["status"]
    if o.run_state != "success":
        return f"{CHILD_DAG_ID} run {run_id} ended {o.run_state}: {msg}"
    if o.task_state != "success":
        return f"the reindex task ended {o.task_state}: {msg}"
    return msg


def nightly_report(ti=None, dag_run=None) -> dict:
    """Per corpus: what its run did this night (see ``build_report``); fails, after reporting every
    corpus, if any corpus's run did not succeed, opened no batch of its own, or closed it FAILED.

    Reads the corpus list itself once ``corpora`` succeeded (instead of taking it as an argument):
    resolving the XCom of a skipped ``corpora`` logs an "XCom not found" error.
    """
    states = ti.get_task_states(dag_id=dag_run.dag_id, task_ids=["corpora", "reindex"],
                                run_ids=[dag_run.run_id]).get(dag_run.run_id, {})
    corpora_state = _state(states.get("corpora"))
    if corpora_state != "success":
        raise AirflowSkipException(f"no corpus was run: the corpora task ended {corpora_state}")
    runs = ti.xcom_pull(task_ids="corpora") or []
    if not runs:
        raise AirflowSkipException("no corpus was run")
    outcomes = [ChildOutcome(_state(states.get(f"reindex_{i}")), *_child_run(ti, r["trigger_run_id"]))
                for i, r in enumerate(runs)]  # map index i is the i-th entry of the corpus list
    with PgVectorHook().store() as store:
        _migrate(store)
        summary = build_report(store, runs, outcomes)
    for corpus, r in summary["corpora"].items():
        log.info("corpus %s: %s — %s", corpus, r["status"], r["message"])
    log.info("nightly: %s", summary["message"])
    if summary["failed"]:
        reasons = "; ".join(f"{c}: {r['status']} — {r['message']}" for c, r in summary["corpora"].items()
                            if not r["ok"])
        raise AirflowFailException(f"nightly run incomplete: {summary['failed']}; {summary['message']}. {reasons}")
    return summary


def _migrate(store) -> None:
    """Bring the store schema up to date before reading it: on a brand-new store the first night's
    tasks may run before any ``reindex_corpus`` task has created it."""
    from reindex.store.schema import ensure_schema

    ensure_schema(store)


def drop_retired_stores() -> list[str]:
    """Drop vector tables of models replaced more than ``REINDEX_STORE_RETENTION_HOURS`` ago (default 168)."""
    from reindex.settings import store_retention_hours
    from reindex.store import vectors

    hours = store_retention_hours()
    with PgVectorHook().store() as store:
        _migrate(store)
        return vectors.drop_retired_stores(store, retention_seconds=hours * 3600)
