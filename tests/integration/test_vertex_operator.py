"""The Vertex operator and trigger against the emulators, outside a DAG run: re-attach without a
second submission, the daily-quota wait, on_kill, the trigger's terminal states and round trip."""

from __future__ import annotations

import asyncio

import pytest
from psycopg import sql

from reindex import pipeline
from reindex.config import ReindexConfig
from reindex.store import Store, connect
from reindex.store.batches import summarize_batch
from reindex.vertex.batch import close_results


@pytest.fixture
def env(vertex_env, monkeypatch):
    monkeypatch.setenv("REINDEX_VERTEX_POLL_SECONDS", "0.1")
    return vertex_env


class StateStore:
    """The task state store's interface (get/set), surviving 'restarts' like the real one."""

    def __init__(self):
        self.data = {}

    def get(self, key):
        return self.data.get(key)

    def set(self, key, value):
        self.data[key] = value


@pytest.fixture
def manifest(env, store_uri, tmp_path, request):
    corpus = f"op_{request.node.name[-20:].lower().strip('_]').replace('[', '_').replace('-', '_')}"[:40]
    for i in range(5):
        (tmp_path / f"d{i}.txt").write_text(f"document number {i} about rivers and lakes", encoding="utf-8")
    cfg = ReindexConfig(corpus=corpus, corpus_uri=str(tmp_path), backend="vertex", model="text-embedding-005",
                        output_dimensionality=768)
    with connect(store_uri, autocommit=True) as conn:
        store = Store(conn)
        prepared = pipeline.prepare(store, cfg)
        m = pipeline.chunk_corpus(store, cfg, tmp_path, batch_id=f"{corpus}-b1",
                                  model_checksum=prepared["model_checksum"])
    return {**m, "config": cfg.to_dict()}


def _operator(manifest):
    from reindex_airflow.operators import SubmitVertexBatchOperator

    return SubmitVertexBatchOperator(task_id="submit_vertex_batch", manifest=manifest)


def _defer(op, context):
    from airflow.sdk.exceptions import TaskDeferred

    with pytest.raises(TaskDeferred) as info:
        op.execute(context)
    return info.value


def test_reattach_after_restart_never_submits_twice(env, manifest, store_uri):
    state = StateStore()
    first = _defer(_operator(manifest), {"task_state_store": state})
    names = first.trigger.job_names
    assert len(names) == 1 and state.get("vertex_job_names") == names
    # the worker dies; a retry runs a fresh operator with the same task state
    second = _defer(_operator(manifest), {"task_state_store": state})
    assert second.trigger.job_names == names
    # the task state is lost too (e.g. crash between create and record): the batch row remembers
    third = _defer(_operator(manifest), {"task_state_store": StateStore()})
    assert third.trigger.job_names == names
    assert env.stats()["create_calls"] == 1
    with connect(store_uri, autocommit=True) as conn:
        (job_names,) = Store(conn).one(sql.SQL("SELECT job_names FROM {} WHERE batch_id = %s").format(
            Store(conn).t("batches")), (manifest["batch_id"],))
    assert job_names == names


def test_job_created_but_not_recorded_is_found_by_name(env, manifest, store_uri):
    from reindex.vertex import jobs
    from reindex_airflow.hooks import VertexBatchHook

    op = _operator(manifest)
    _defer(op, {"task_state_store": StateStore()})
    # forget every record: only the job's deterministic display name can lead back to it
    with connect(store_uri, autocommit=True) as conn:
        s = Store(conn)
        s.execute(sql.SQL("UPDATE {} SET details = details - 'vertex_jobs' WHERE batch_id = %s").format(
            s.t("batches")), (manifest["batch_id"],))
    again = _defer(_operator(manifest), {"task_state_store": StateStore()})
    assert env.stats()["create_calls"] == 1
    client = VertexBatchHook("google_cloud_default", env.endpoint).job_client()
    assert jobs.job_info(client, again.trigger.job_names[0])["display_name"].startswith("reindex-")


def test_daily_quota_defers_until_the_window_reopens(env, manifest, monkeypatch):
    from airflow.providers.standard.triggers.temporal import TimeDeltaTrigger

    monkeypatch.setenv("REINDEX_QUOTA_RESET_SECONDS", "120")
    env.configure(create_quota=0)
    deferred = _defer(_operator(manifest), {"task_state_store": StateStore()})
    assert isinstance(deferred.trigger, TimeDeltaTrigger)
    assert deferred.method_name == "execute"  # resumes by submitting again
    assert env.stats()["creates_accepted"] == 0


def test_on_kill_cancels_the_job(env, manifest):
    env.configure(running_delay_s=30)
    op = _operator(manifest)
    deferred = _defer(op, {"task_state_store": StateStore()})
    op.on_kill()
    from reindex.vertex import jobs
    from reindex_airflow.hooks import VertexBatchHook

    client = VertexBatchHook("google_cloud_default", env.endpoint).job_client()
    env.wait_idle(10)
    assert jobs.job_info(client, deferred.trigger.job_names[0])["state"] == "CANCELLED"


def test_trigger_serialize_round_trip():
    from reindex_airflow.triggers import VertexBatchJobsTrigger

    t = VertexBatchJobsTrigger(["projects/p/locations/l/batchPredictionJobs/1"], "http://127.0.0.1:1",
                               "gcp", poll_interval=2.5)
    path, kwargs = t.serialize()
    assert path == "reindex_airflow.triggers.VertexBatchJobsTrigger"
    module, name = path.rsplit(".", 1)
    rebuilt = getattr(__import__(module, fromlist=[name]), name)(**kwargs)
    assert rebuilt.serialize() == (path, kwargs)


@pytest.mark.parametrize(
    "outcome,expected_state,batch_status",
    [
        ({}, "SUCCEEDED", "COMPLETED"),
        ({"error_rates": {"rate_limited": 0.5}, "seed": 3, "partial_state": "JOB_STATE_PARTIALLY_SUCCEEDED"},
         "PARTIALLY_SUCCEEDED", "COMPLETED_WITH_ERRORS"),
        ({"outcome": "FAILED"}, "FAILED", "FAILED"),
        ({"outcome": "EXPIRED"}, "EXPIRED", "FAILED"),
        ({"pending_delay_s": 30, "cancel": True}, "CANCELLED", "FAILED"),  # cancelled before any output
    ],
)
def test_job_state_matrix(env, manifest, store_uri, outcome, expected_state, batch_status):
    """Every terminal job state ends the trigger (the stock one polls forever on EXPIRED), and maps
    to the batch status after the results are processed."""
    from reindex.backends import backend_for
    from reindex.store.vectors import get_embedding_store
    from reindex.vertex.batch import ingest_ranges, plan_result_ranges
    from reindex_airflow.hooks import VertexBatchHook

    cancel = outcome.pop("cancel", False)
    env.configure(**outcome)
    op = _operator(manifest)
    deferred = _defer(op, {"task_state_store": StateStore()})
    if cancel:
        op.on_kill()

    async def first_event():
        async for event in deferred.trigger.run():
            return event.payload

    event = asyncio.run(asyncio.wait_for(first_event(), 30))
    assert event["status"] == "done"
    (info,) = event["jobs"]
    assert info["state"] == expected_state
    assert set(info["completion_stats"]) == {"successful", "failed", "incomplete"}
    result = op.execute_complete({}, event)
    cfg = ReindexConfig.from_mapping(manifest["config"])
    backend = backend_for(cfg)
    with connect(store_uri, autocommit=True) as conn:
        store = Store(conn)
        if result["output_dirs"]:
            storage = VertexBatchHook("google_cloud_default", env.endpoint).storage_client()
            emb = get_embedding_store(store, cfg.corpus, manifest["model_checksum"])
            for ranges in plan_result_ranges(storage, result["output_dirs"]):
                ingest_ranges(store, emb, backend.model_spec(), manifest["batch_id"], ranges, backend.family,
                              storage_client=storage)
        close_results(store, manifest["batch_id"], result["jobs"])
        summary = summarize_batch(store, manifest["batch_id"])
    assert summary.status.value == batch_status
    assert summary.total == 5


def test_missing_project_fails_for_good_with_a_clear_message(manifest, monkeypatch):
    from airflow.sdk.exceptions import AirflowFailException

    monkeypatch.delenv("REINDEX_VERTEX_PROJECT")
    monkeypatch.delenv("GOOGLE_CLOUD_PROJECT", raising=False)
    with pytest.raises(AirflowFailException, match="needs a project: set REINDEX_VERTEX_PROJECT"):
        _operator(manifest).execute({"task_state_store": StateStore()})
