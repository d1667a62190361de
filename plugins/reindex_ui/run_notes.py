"""The run tells its outcome: when a reindex DAG run ends, its note (the "Add a note…" field of the run page,
shown in the runs list too) gets the one-line outcome of its batch(es) — e.g. "kb_errors: COMPLETED_WITH_ERRORS —
4 chunk(s) embedded: 4 READY, 0 FAILED …" — so a green run that kept failures says so where users look.

An Airflow listener (``on_dag_run_success`` / ``on_dag_run_failed``), called by the scheduler (and by
``dag.test()``) in the process that changes the run's state; a running task has no way to write its own run's
note. A note someone already wrote is never replaced. Any error is logged and swallowed: a note must never
disturb the scheduler.
"""

from __future__ import annotations

import logging

from airflow.listeners import hookimpl

log = logging.getLogger(__name__)

REINDEX_DAGS = ("reindex_corpus", "reindex_retry", "reindex_model_upgrade")
NOTE_LIMIT = 1000  # Airflow's dag_run_note.content


def note_for(outcomes: list[dict]) -> str | None:
    """The note for a run's batches (``reindex.store.batches.run_outcomes``), at most ``NOTE_LIMIT`` characters."""
    if not outcomes:
        return None
    lines = [f"{o['corpus']}: {o['status']} — {o['message'] or ''}".rstrip(" —") for o in outcomes]
    text = "\n".join(lines)
    return text if len(text) <= NOTE_LIMIT else text[: NOTE_LIMIT - 1] + "…"


def _write_note(dag_run) -> None:
    if dag_run.dag_id not in REINDEX_DAGS:
        return
    try:
        from airflow.models.dagrun import DagRunNote
        from sqlalchemy.orm import object_session

        from reindex.store.batches import run_outcomes
        from reindex_airflow.hooks import PgVectorHook

        with PgVectorHook().store() as store:
            note = note_for(run_outcomes(store, dag_run.run_id))
        if not note:
            return
        # The caller's own session when the run is attached to one (the scheduler's: it holds the run's row, the
        # note is committed with the state change). Otherwise (dag.test) a short session of our own that gives up
        # after 2 s rather than wait on a lock. The relationship is not lazy-loadable here: ask by key.
        session = object_session(dag_run)
        if session is not None:
            _add_note(session, DagRunNote, dag_run.id, note)
            return
        from airflow.utils.session import create_session
        from sqlalchemy import text

        with create_session() as own:
            if own.bind.dialect.name == "postgresql":
                own.execute(text("SET LOCAL lock_timeout = '2s'"))
            _add_note(own, DagRunNote, dag_run.id, note)
    except Exception as e:  # noqa: BLE001 - a note is a courtesy: never fail the scheduler's loop for it
        log.warning("reindex: no outcome note for run %s/%s: %s", dag_run.dag_id, dag_run.run_id, type(e).__name__)


def _add_note(session, note_model, dag_run_pk: int, note: str) -> None:
    if session.get(note_model, dag_run_pk) is not None:  # someone's note: never replaced
        return
    row = note_model(content=note)
    row.dag_run_id = dag_run_pk
    session.add(row)


@hookimpl
def on_dag_run_success(dag_run, msg: str) -> None:
    _write_note(dag_run)


@hookimpl
def on_dag_run_failed(dag_run, msg: str) -> None:
    _write_note(dag_run)
