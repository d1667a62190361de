"""The nightly report against a real store: it reports only the batch a corpus run opened in its
current attempt, and fails a night whose corpus run did not run, did not succeed, or left only an
older batch of the same run id (a cleared run keeps its batch id)."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from psycopg import sql

from reindex.models import ModelSpec
from reindex.store.batches import create_batch
from reindex.store.vectors import register_model
from reindex_airflow.nightly import ChildOutcome, build_report, child_run_id

SPEC = ModelSpec("acme/m", "r1", 8, True, "local")


def _batch(store, batch_id: str, corpus: str, run_id: str, *, status: str = "COMPLETED", encoded: int = 2,
           started: datetime | None = None, message: str = "2 chunk(s) encoded") -> None:
    register_model(store, SPEC)
    store.execute(sql.SQL("INSERT INTO {} (corpus) VALUES (%s) ON CONFLICT DO NOTHING").format(store.t("corpora")),
                  (corpus,))
    create_batch(store, batch_id, corpus, "local", SPEC.checksum, dag_run_id=run_id)
    store.execute(sql.SQL("""UPDATE {} SET status = %s, total = %s, ready = %s, encoded = %s, reused = 1,
        finished_at = coalesce(%s::timestamptz, now()) + interval '1 second',
        started_at = coalesce(%s::timestamptz, started_at), details = details || jsonb_build_object('message', %s::text)
        WHERE batch_id = %s""").format(store.t("batches")), (status, encoded, encoded, encoded, started, started,
                                                             message, batch_id))


def _runs(*corpora: str, night: str = "n1", attempt: int = 0) -> list[dict]:
    return [{"trigger_run_id": child_run_id(night, c, attempt), "conf": {"corpus": c}} for c in corpora]


def _now(store) -> datetime:
    (now,) = store.one("SELECT now()")
    return now


def test_child_run_ids_per_attempt():
    assert child_run_id("scheduled__2026-11-01T02:00:00+00:00", "kb") == "nightly__scheduled__2026-11-01T02:00:00+00:00__kb"
    assert child_run_id("n1", "kb", 2) == "nightly__n1__kb__rerun2"


def test_a_batch_of_the_current_attempt_is_reported(store):
    (run,) = _runs("kb")
    started = _now(store) - timedelta(seconds=1)
    _batch(store, "kb-1", "kb", run["trigger_run_id"])
    report = build_report(store, [run], [ChildOutcome("success", "success", started)])
    kb = report["corpora"]["kb"]
    assert (kb["batch_id"], kb["status"], kb["encoded"], kb["reused"], kb["ok"]) == ("kb-1", "COMPLETED", 2, 1, True)
    assert kb["message"] == "2 chunk(s) encoded" and kb["run_id"] == "nightly__n1__kb"
    assert (report["failed"], report["encoded"], report["message"]) == ({}, 2, "1 corpora: 2 chunk(s) encoded, "
                                                                              "0 batch job(s) submitted")


def test_an_older_batch_of_the_same_run_id_is_not_this_nights(store):
    """A cleared corpus run keeps its run id and batch id; if its new attempt opened no batch, the
    row left by the earlier attempt (COMPLETED) must not make the night green."""
    (run,) = _runs("kb")
    old = _now(store) - timedelta(hours=1)
    _batch(store, "kb-1", "kb", run["trigger_run_id"], started=old)
    restarted = _now(store)
    report = build_report(store, [run], [ChildOutcome("success", "success", restarted)])
    kb = report["corpora"]["kb"]
    assert (kb["status"], kb["ok"], report["failed"]) == ("NOT_RUN", False, {"kb": "NOT_RUN"})
    assert "batch_id" not in kb and report["encoded"] == 0
    assert kb["message"] == (
        f"reindex_corpus run nightly__n1__kb succeeded without opening a batch since it started at "
        f"{restarted.isoformat()} (see its prepare/list_corpus logs); the batch kb-1 (COMPLETED) of that run "
        f"id started at {old.isoformat()}, before, and is not this night's")


def test_a_failed_or_missing_corpus_run_fails_the_night(store):
    runs = _runs("a", "b", "c", "d")
    now = _now(store)
    _batch(store, "a-1", "a", runs[0]["trigger_run_id"], status="FAILED", encoded=0, message="0 of 2 ready")
    _batch(store, "c-1", "c", runs[2]["trigger_run_id"], started=now - timedelta(days=1))  # yesterday's attempt
    _batch(store, "d-1", "d", runs[3]["trigger_run_id"])
    report = build_report(store, runs, [
        ChildOutcome("failed", "failed", now - timedelta(seconds=2)),  # ran, closed its batch FAILED
        ChildOutcome("failed", None, None),  # never triggered
        ChildOutcome("failed", "failed", now - timedelta(seconds=2)),  # failed before opening a batch
        ChildOutcome("failed", "success", now - timedelta(seconds=2)),  # the run is fine, its task is not
    ])
    r = report["corpora"]
    assert report["failed"] == {"a": "FAILED (run failed)", "b": "NOT_RUN", "c": "NOT_RUN (run failed)",
                                "d": "COMPLETED"}
    assert r["a"]["message"] == "reindex_corpus run nightly__n1__a ended failed: 0 of 2 ready"
    assert r["b"]["message"] == ("no reindex_corpus run nightly__n1__b: the reindex task ended failed before "
                                 "triggering it (see its log)")
    assert r["c"]["message"].startswith("reindex_corpus run nightly__n1__c ended failed without opening a batch since ")
    assert "the batch c-1 (COMPLETED) of that run id started at " in r["c"]["message"]
    assert r["d"]["message"] == "the reindex task ended failed: 2 chunk(s) encoded"
    assert [c for c, e in r.items() if e["ok"]] == []


@pytest.mark.parametrize("skew", [timedelta(seconds=-3), timedelta(seconds=0)])
def test_clocks_a_little_apart_still_match(store, skew):
    """The run's start (Airflow's host) may be a little ahead of the store's clock."""
    (run,) = _runs("kb")
    _batch(store, "kb-1", "kb", run["trigger_run_id"])
    (started,) = store.one(sql.SQL("SELECT started_at FROM {} WHERE batch_id = 'kb-1'").format(store.t("batches")))
    report = build_report(store, [run], [ChildOutcome("success", "success", started - skew)])
    assert report["corpora"]["kb"]["ok"] and report["corpora"]["kb"]["batch_id"] == "kb-1"

