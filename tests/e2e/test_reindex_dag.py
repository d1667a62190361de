"""End to end through Airflow: ``dag.test()`` runs of reindex_corpus and reindex_retry on the
embedded PostgreSQL, with the real bundled model."""

from __future__ import annotations

import pytest
from psycopg import sql

from reindex.store.search import corpus_status, search
from tests.conftest import SAMPLE_CORPUS

pytestmark = pytest.mark.e2e


def _ti_states(dr):
    return {ti.task_id: ti.state for ti in dr.get_task_instances()}


def test_sample_corpus_end_to_end(dagbag, store_conn, encoder):
    dag = dagbag.get_dag("reindex_corpus")
    dr = dag.test(run_conf={"corpus": "sample_e2e", "corpus_uri": str(SAMPLE_CORPUS)})
    assert dr.state == "success", _ti_states(dr)
    states = _ti_states(dr)
    assert states["done"] == "success" and states["trigger_retry"] == "skipped" and states["fail_batch"] == "skipped"
    # the Vertex branch is skipped as a whole on the local backend
    for vertex_task in ("submit_vertex_batch", "plan_result_ranges", "ingest_results", "close_results"):
        assert states[vertex_task] == "skipped", (vertex_task, states[vertex_task])

    st = corpus_status(store_conn, "sample_e2e")
    assert st["documents"]["OK"] >= 250 and st["documents"]["FAILED"] == 0
    assert st["chunks_total"] > st["documents"]["OK"]  # long documents were split
    assert st["chunks"]["READY"] == st["chunks_total"]  # every chunk has its vector
    assert st["last_batch"]["status"] == "COMPLETED"
    (vectors,) = store_conn.one(sql.SQL("SELECT count(*) FROM {}").format(store_conn.t(st["vector_table"])))
    assert vectors == st["chunks_total"]
    assert st["index"].endswith("_hnsw")

    (photo_doc,) = store_conn.one(sql.SQL("""SELECT doc_id FROM {} WHERE corpus = 'sample_e2e'
        AND metadata->>'topic' = 'photosynthesis'""").format(store_conn.t("documents")))
    hits = search(store_conn, "sample_e2e", encoder.encode(["How do plants turn sunlight into sugar?"])[0], k=3)
    assert photo_doc in [h.doc_id for h in hits]


def test_partial_failure_triggers_a_retry_run_that_heals_it(dagbag, store_conn, tmp_path, monkeypatch):
    """A transient encoder error on one chunk → COMPLETED_WITH_ERRORS → reindex_retry → all READY."""
    from airflow.models.dagrun import DagRun

    from reindex.embeddings.local import LocalEncoder

    for i, topic in enumerate(["volcanoes erupt magma", "glaciers carve valleys", "bees pollinate flowers"]):
        (tmp_path / f"doc{i}.txt").write_text(f"Document {i}: {topic}.", encoding="utf-8")
    real_encode = LocalEncoder.encode

    def flaky(self, texts):
        if any("magma" in t for t in texts):
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_encode(self, texts)

    monkeypatch.setattr(LocalEncoder, "encode", flaky)
    dr = dagbag.get_dag("reindex_corpus").test(run_conf={"corpus": "retry_e2e", "corpus_uri": str(tmp_path)})
    assert dr.state == "success"
    assert _ti_states(dr)["trigger_retry"] == "success"
    st = corpus_status(store_conn, "retry_e2e")
    assert st["chunks"] == {"READY": 2, "PENDING": 0, "FAILED": 1}
    assert st["last_batch"]["status"] == "COMPLETED_WITH_ERRORS"
    assert st["failed_by_reason"] == {"TRANSIENT_ENCODER_ERROR": 1}
    parent = st["last_batch"]["batch_id"]

    from airflow import settings

    with settings.Session() as session:
        triggered = session.query(DagRun).filter(DagRun.dag_id == "reindex_retry").all()
        conf = [r.conf for r in triggered if r.conf.get("batch_id") == parent]
    assert conf == [{"batch_id": parent}], "trigger_retry created exactly one reindex_retry run for the batch"

    monkeypatch.setattr(LocalEncoder, "encode", real_encode)  # the device recovered
    retry = dagbag.get_dag("reindex_retry").test(run_conf=conf[0])
    assert retry.state == "success", _ti_states(retry)
    assert _ti_states(retry)["done"] == "success"
    st = corpus_status(store_conn, "retry_e2e")
    assert st["chunks"] == {"READY": 3, "PENDING": 0, "FAILED": 0}
    rb = st["last_batch"]
    assert (rb["kind"], rb["status"], rb["total"], rb["ready"]) == ("retry", "COMPLETED", 1, 1)
    (retry_count,) = store_conn.one(sql.SQL("""SELECT retry_count FROM {} WHERE corpus = 'retry_e2e'
        AND text LIKE '%%magma%%'""").format(store_conn.t("chunks")))
    assert retry_count == 1


def test_total_failure_fails_the_run_loudly(dagbag, store_conn, tmp_path, monkeypatch):
    from reindex.embeddings.local import LocalEncoder

    (tmp_path / "a.txt").write_text("anything at all", encoding="utf-8")

    def broken(self, texts):
        raise ValueError("model weights are corrupt")

    monkeypatch.setattr(LocalEncoder, "encode", broken)
    dr = dagbag.get_dag("reindex_corpus").test(run_conf={"corpus": "fail_e2e", "corpus_uri": str(tmp_path)})
    assert dr.state == "failed"
    states = _ti_states(dr)
    assert states["fail_batch"] == "failed" and states["done"] == "skipped"
    st = corpus_status(store_conn, "fail_e2e")
    assert st["last_batch"]["status"] == "FAILED"
    assert st["failed_by_reason"] == {"ENCODER_ERROR": 1}
