"""Fault 4: a worker lost while its task holds the corpus's lease. A real DAG run's task is killed with
SIGKILL in the middle of its load (512 of 600 chunks READY, 88 PENDING, its batch RUNNING, the lease its
own). Once Airflow has failed that run, the next run takes the corpus over, the dead batch is ABANDONED and
its unfinished chunks are embedded by the new run. While the holder's run is still running, the next run
must be refused instead."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from reindex import pipeline
from reindex.store.leases import get_lease
from tests.faults.conftest import batch_row, check_invariants, last_batch, ti_states

pytestmark = [pytest.mark.faults, pytest.mark.e2e]

LOST_RUN = "manual__fault_lost_worker"
LIVE_RUN = "manual__fault_live_holder"


def _serialized_dag(dag_id: str):
    """The DAG as the scheduler holds it in the metadata DB (written there as a dag-processor would)."""
    from airflow import settings
    from airflow.models.dagbag import DBDagBag

    with settings.Session() as session:
        dag = DBDagBag().get_latest_version_of_dag(dag_id, session=session)
    if dag is None:
        from airflow.dag_processing.bundles.manager import DagBundlesManager
        from airflow.dag_processing.dagbag import BundleDagBag, sync_bag_to_db

        manager = DagBundlesManager()
        manager.sync_bundles_to_db()
        for bundle in manager.get_all_dag_bundles():
            if not bundle.is_initialized:
                bundle.initialize()
            sync_bag_to_db(BundleDagBag(dag_folder=bundle.path, bundle_path=bundle.path, bundle_name=bundle.name),
                           bundle.name, bundle.version)
        with settings.Session() as session:
            dag = DBDagBag().get_latest_version_of_dag(dag_id, session=session)
    assert dag is not None, f"DAG {dag_id} is not in the metadata DB"
    return dag


@pytest.fixture
def airflow_run():
    """``airflow_run(run_id, conf)`` creates a reindex_corpus DAG run in state running, as the scheduler does for
    a manual trigger. Runs still running at teardown are failed: a scheduler sharing the metadata DB must never
    pick one up."""
    from airflow import settings
    from airflow.models.dagrun import DagRun
    from airflow.utils.state import DagRunState
    from airflow.utils.types import DagRunTriggeredByType, DagRunType

    created: list[str] = []

    def start(run_id: str, conf: dict) -> None:
        dag = _serialized_dag("reindex_corpus")
        now = datetime.now(UTC)
        with settings.Session() as session:
            old = session.query(DagRun).filter(DagRun.dag_id == "reindex_corpus", DagRun.run_id == run_id).one_or_none()
            if old is not None:  # the suite run again on the same metadata DB
                session.delete(old)
                session.commit()
            dag.create_dagrun(run_id=run_id, logical_date=None, data_interval=None, run_after=now, conf=conf,
                              run_type=DagRunType.MANUAL, triggered_by=DagRunTriggeredByType.TEST,
                              state=DagRunState.RUNNING, start_date=now, session=session)
            session.commit()
        created.append(run_id)

    yield start
    for run_id in created:
        fail_run(run_id)


def fail_run(run_id: str) -> None:
    """What Airflow does to a run whose worker was lost, once its retries are spent (or an operator marks it
    failed): the run is failed."""
    from airflow import settings
    from airflow.models.dagrun import DagRun
    from airflow.utils.state import DagRunState

    with settings.Session() as session:
        dr = session.query(DagRun).filter(DagRun.dag_id == "reindex_corpus", DagRun.run_id == run_id).one()
        if dr.state == DagRunState.RUNNING:
            dr.set_state(DagRunState.FAILED)
            session.commit()


def test_a_lost_workers_half_done_batch_is_abandoned_and_finished_by_the_next_run(
        corpus_dag, airflow_run, store_conn, store_uri, tmp_path, spawn):
    from reindex_airflow import tasks

    corpus = "fault_lost_worker"
    root = tmp_path / "kb"
    root.mkdir()
    ids = [f"w{i:04d}" for i in range(600)]
    (root / "logbook.jsonl").write_text("".join(json.dumps({"id": d, "text": f"logbook entry {d}: wind and swell"})
                                                + "\n" for d in ids), encoding="utf-8")
    conf = corpus_dag.conf(corpus=corpus, corpus_uri=str(root), on_busy="fail")

    # The lost run: its prepare ran, then its scan tasks and encode_partition ran in a worker that is
    # killed inside the transaction of its second vector block.
    airflow_run(LOST_RUN, conf)
    prepared = tasks.prepare(conf)
    dead_batch = pipeline.batch_id_for("reindex_corpus", LOST_RUN, corpus)
    child = spawn(dsn=store_uri, schema=store_conn.schema, app="fault-lost-worker", config=prepared["config"],
                  spec=prepared["model"], batch_id=dead_batch, run_id=LOST_RUN, dag_id="reindex_corpus",
                  steps=["chunk", "encode"], hang="load_block", block=2)
    child.wait_reached()
    child.kill(store_conn)
    assert check_invariants(store_conn, corpus, final=False) == {
        "documents": {"OK": 600, "FAILED": 0}, "failed_documents": {},
        "chunks": {"READY": 512, "PENDING": 88, "FAILED": 0}, "failed_chunks": {}, "vectors": 512}
    assert batch_row(store_conn, dead_batch)["status"] == "RUNNING"
    lease = get_lease(store_conn, corpus)
    assert (lease.batch_id, lease.run_id, lease.dag_id) == (dead_batch, LOST_RUN, "reindex_corpus")

    fail_run(LOST_RUN)
    dr = corpus_dag.test(**conf)  # on_busy=fail: a live holder would fail this run at once
    assert dr.state == "success", ti_states(dr)
    assert ti_states(dr)["done"] == "success"
    dead = batch_row(store_conn, dead_batch)
    assert (dead["status"], dead["details"]["message"]) == (
        "ABANDONED", "abandoned (its DAG run is no longer running); 88 unfinished chunk(s) left for the next run")
    new = last_batch(store_conn, corpus)
    assert new["batch_id"] != dead_batch
    assert (new["status"], new["total"], new["ready"], new["failed"], new["reused"]) == ("COMPLETED", 88, 88, 0, 512)
    assert check_invariants(store_conn, corpus, good_docs=ids) == {
        "documents": {"OK": 600, "FAILED": 0}, "failed_documents": {},
        "chunks": {"READY": 600, "PENDING": 0, "FAILED": 0}, "failed_chunks": {}, "vectors": 600}


def test_a_running_runs_lease_is_not_taken_over(corpus_dag, airflow_run, store_conn, tmp_path):
    """The holder's DAG run is running (its worker may be busy for hours): the next run with on_busy=fail is
    refused in list_corpus, and the holder keeps the corpus and its batch."""
    from reindex.store import leases
    from reindex.store.batches import create_batch
    from reindex.store.documents import ensure_corpus
    from reindex.store.schema import ensure_schema

    corpus = "fault_live_holder"
    (tmp_path / "a.txt").write_text("Puffins nest in burrows on grassy cliff tops.", encoding="utf-8")
    conf = corpus_dag.conf(corpus=corpus, corpus_uri=str(tmp_path), on_busy="fail")
    airflow_run(LIVE_RUN, conf)
    ensure_schema(store_conn)
    holder_batch = pipeline.batch_id_for("reindex_corpus", LIVE_RUN, corpus)
    with store_conn.conn.transaction():
        ensure_corpus(store_conn, corpus)
        create_batch(store_conn, holder_batch, corpus, "local", None, dag_run_id=LIVE_RUN, dag_id="reindex_corpus")
    assert leases.try_acquire(store_conn, corpus, holder_batch, LIVE_RUN, dag_id="reindex_corpus") is None

    dr = corpus_dag.test(**conf)
    assert batch_row(store_conn, holder_batch)["status"] == "RUNNING"
    assert get_lease(store_conn, corpus).batch_id == holder_batch
    assert dr.state == "failed" and [t for t, s in ti_states(dr).items() if s == "failed"] == ["list_corpus"]
