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


def test_sample_corpus_end_to_end(corpus_dag, store_conn, encoder, monkeypatch):
    dag = corpus_dag
    dr = dag.test(run_conf={"corpus": "sample_e2e", "corpus_uri": str(SAMPLE_CORPUS)})
    assert dr.state == "success", _ti_states(dr)
    states = _ti_states(dr)
    assert states["done"] == "success" and states["trigger_retry"] == "skipped" and states["fail_batch"] == "skipped"
    # the Vertex branch is skipped as a whole on the local backend
    for vertex_task in ("submit_vertex_batch", "plan_result_ranges", "ingest_results", "close_results"):
        assert states[vertex_task] == "skipped", (vertex_task, states[vertex_task])

    st = corpus_status(store_conn, "sample_e2e")
    # the bundled corpus: 274 .jsonl records + 16 .md + 15 .txt files; 779 chunks at max_tokens=200, overlap 32
    assert st["documents"]["OK"] == 305 and st["documents"]["FAILED"] == 0
    assert st["chunks_total"] == 779  # long documents were split
    assert st["chunks"]["READY"] == st["chunks_total"]  # every chunk has its vector
    assert st["last_batch"]["status"] == "COMPLETED"
    (vectors,) = store_conn.one(sql.SQL("SELECT count(*) FROM {}").format(store_conn.t(st["vector_table"])))
    assert vectors == st["chunks_total"]
    assert st["index"].endswith("_hnsw")

    (photo_doc,) = store_conn.one(sql.SQL("""SELECT doc_id FROM {} WHERE corpus = 'sample_e2e'
        AND metadata->>'topic' = 'photosynthesis'""").format(store_conn.t("documents")))
    hits = search(store_conn, "sample_e2e", encoder.encode(["How do plants turn sunlight into sugar?"])[0], k=3)
    assert photo_doc in [h.doc_id for h in hits]

    # The same corpus again, unchanged: nothing is chunked or encoded, and the batch says so.
    from reindex.embeddings.local import LocalEncoder

    calls = []
    real = LocalEncoder.encode
    monkeypatch.setattr(LocalEncoder, "encode", lambda self, texts: (calls.append(len(texts)), real(self, texts))[1])
    again = dag.test(run_conf={"corpus": "sample_e2e", "corpus_uri": str(SAMPLE_CORPUS)})
    assert again.state == "success" and calls == []
    encoded, reused, message = store_conn.one(sql.SQL("""SELECT encoded, reused, details->>'message' FROM {}
        WHERE dag_run_id = %s""").format(store_conn.t("batches")), (again.run_id,))
    assert (encoded, reused) == (0, st["chunks_total"])
    assert message == f"nothing to embed: 0 chunks encoded, 0 batch jobs submitted; {reused} chunk vector(s) reused"


def test_halfvec_storage_end_to_end(corpus_dag, store_conn, encoder):
    """storage=halfvec: half-float vector table with a halfvec_cosine_ops HNSW index, every chunk READY, searchable."""
    conf = {"corpus": "sample_half", "corpus_uri": str(SAMPLE_CORPUS), "backend": "local", "model": "",
            "output_dimensionality": None, "max_tokens": 200, "overlap_tokens": 32, "partition_size": 2000,
            "encode_batch_size": 64, "index_type": "hnsw", "storage": "halfvec", "ivfflat_lists": None,
            "force": False, "on_busy": "wait", "busy_wait_seconds": 3600, "max_failed_ratio": 0.01,
            "service_conn_id": None, "encoder": "torch"}
    assert set(conf) == set(corpus_dag.params), "pass every param: values carry over between dag.test() runs"
    dr = corpus_dag.test(run_conf=conf)
    assert dr.state == "success", _ti_states(dr)
    st = corpus_status(store_conn, "sample_half")
    assert st["model"]["storage"] == "halfvec" and st["last_batch"]["status"] == "COMPLETED"
    assert st["chunks"]["READY"] == st["chunks_total"] > 250
    assert st["model"]["checksum"] == encoder.spec.stored_as("halfvec").checksum
    (column,) = store_conn.one("""SELECT format_type(atttypid, atttypmod) FROM pg_attribute
        WHERE attrelid = %s::regclass AND attname = 'embedding'""", (f"reindex.{st['vector_table']}",))
    assert column == "halfvec(384)"
    (indexdef,) = store_conn.one("SELECT indexdef FROM pg_indexes WHERE indexname = %s", (st["index"],))
    assert "USING hnsw (embedding halfvec_cosine_ops)" in indexdef
    (photo_doc,) = store_conn.one(sql.SQL("""SELECT doc_id FROM {} WHERE corpus = 'sample_half'
        AND metadata->>'topic' = 'photosynthesis'""").format(store_conn.t("documents")))
    hits = search(store_conn, "sample_half", encoder.encode(["How do plants turn sunlight into sugar?"])[0], k=3)
    assert photo_doc in [h.doc_id for h in hits]


def _hold_lease(store, corpus: str, batch_id: str = "someone-else") -> None:
    from reindex.store import leases
    from reindex.store.batches import create_batch
    from reindex.store.documents import ensure_corpus

    with store.conn.transaction():
        ensure_corpus(store, corpus)
        create_batch(store, batch_id, corpus, "local", None, dag_run_id="manual__other")
    assert leases.try_acquire(store, corpus, batch_id, "manual__other") is None


def test_a_busy_corpus_fails_clearly_or_waits(corpus_dag, store_conn, tmp_path, monkeypatch):
    """on_busy=fail: the task fails naming the holder, writing nothing. on_busy=wait: the task is
    rescheduled (no worker slot held) until the holder is done, then the run completes."""
    from types import SimpleNamespace

    from airflow.sdk.exceptions import AirflowFailException

    from reindex.config import ReindexConfig
    from reindex.store import leases
    from reindex.store.schema import ensure_schema
    from reindex_airflow.tasks import _take_corpus

    (tmp_path / "a.txt").write_text("Otters hold hands while they sleep so they do not drift apart.", encoding="utf-8")
    ensure_schema(store_conn)
    _hold_lease(store_conn, "busy_e2e")
    run = SimpleNamespace(run_id="manual__me", start_date=None)
    cfg = ReindexConfig(corpus="busy_e2e", corpus_uri=str(tmp_path), on_busy="fail")
    with pytest.raises(AirflowFailException, match=r"corpus 'busy_e2e' is busy: run manual__other \(batch someone-else\)"):
        _take_corpus(store_conn, cfg, "mine", run)

    dag = corpus_dag
    dr = dag.test(run_conf={"corpus": "busy_e2e", "corpus_uri": str(tmp_path), "on_busy": "fail"})
    assert dr.state == "failed" and _ti_states(dr)["list_corpus"] == "failed"
    (nbatches,) = store_conn.one(sql.SQL("SELECT count(*) FROM {} WHERE corpus = 'busy_e2e'").format(
        store_conn.t("batches")))
    assert nbatches == 1 and leases.get_lease(store_conn, "busy_e2e").batch_id == "someone-else"

    monkeypatch.setenv("REINDEX_LEASE_POLL_SECONDS", "1")
    from airflow.sdk.exceptions import AirflowRescheduleException

    from reindex_airflow import tasks

    take = tasks._take_corpus

    def holder_finishes_while_we_wait(*args, **kwargs):
        # the holder ends right after this run's first look (whenever that is): one reschedule, then the lease
        try:
            return take(*args, **kwargs)
        except AirflowRescheduleException:
            leases.release(store_conn, "busy_e2e", "someone-else")
            raise

    monkeypatch.setattr(tasks, "_take_corpus", holder_finishes_while_we_wait)
    dr = dag.test(run_conf={"corpus": "busy_e2e", "corpus_uri": str(tmp_path), "on_busy": "wait"})
    assert dr.state == "success", _ti_states(dr)
    from airflow import settings
    from airflow.models.taskreschedule import TaskReschedule

    with settings.Session() as session:
        reschedules = session.query(TaskReschedule).filter(TaskReschedule.ti_id == next(
            ti.id for ti in dr.get_task_instances() if ti.task_id == "list_corpus")).count()
    assert reschedules >= 1
    st = corpus_status(store_conn, "busy_e2e")
    assert st["chunks"]["READY"] == 1 and st["lease"] is None


def test_partial_failure_triggers_a_retry_run_that_heals_it(dagbag, corpus_dag, store_conn, tmp_path, monkeypatch):
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
    dr = corpus_dag.test(run_conf={"corpus": "retry_e2e", "corpus_uri": str(tmp_path)})
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


def test_total_failure_fails_the_run_loudly(corpus_dag, store_conn, tmp_path, monkeypatch):
    from reindex.embeddings.local import LocalEncoder

    (tmp_path / "a.txt").write_text("anything at all", encoding="utf-8")

    def broken(self, texts):
        raise ValueError("model weights are corrupt")

    monkeypatch.setattr(LocalEncoder, "encode", broken)
    dr = corpus_dag.test(run_conf={"corpus": "fail_e2e", "corpus_uri": str(tmp_path)})
    assert dr.state == "failed"
    states = _ti_states(dr)
    assert states["fail_batch"] == "failed" and states["done"] == "skipped"
    st = corpus_status(store_conn, "fail_e2e")
    assert st["last_batch"]["status"] == "FAILED"
    assert st["failed_by_reason"] == {"ENCODER_ERROR": 1}


def _failed(dr) -> list[str]:
    return sorted(t for t, s in _ti_states(dr).items() if s == "failed")


def test_a_bad_parameter_combination_fails_once_with_its_message(corpus_dag, store_conn, tmp_path):
    """max_tokens=100 and overlap_tokens=90 are each valid alone: the first task refuses the pair with the
    message, no task retries, nothing downstream fails with a second traceback, and nothing is written."""
    from airflow.sdk.exceptions import AirflowFailException

    from reindex_airflow.tasks import prepare

    (tmp_path / "a.txt").write_text("some text", encoding="utf-8")
    conf = {"corpus": "bad_combo", "corpus_uri": str(tmp_path), "max_tokens": 100, "overlap_tokens": 90}
    with pytest.raises(AirflowFailException, match=r"^overlap_tokens=90 is out of range: must be between 0 and 50$"):
        prepare(conf)
    dr = corpus_dag.test(run_conf=conf)
    states = _ti_states(dr)
    assert dr.state == "failed" and _failed(dr) == ["prepare"], states
    assert states["build_index"] == states["summarize"] == "skipped"
    assert states["done"] == "upstream_failed"
    from airflow import settings
    from airflow.models.taskinstance import TaskInstance

    with settings.Session() as session:
        tries = session.query(TaskInstance.try_number).filter(
            TaskInstance.run_id == dr.run_id, TaskInstance.task_id == "prepare").scalar()
    assert tries == 1  # a terminal input error is not retried
    (rows,) = store_conn.one(sql.SQL("SELECT count(*) FROM {} WHERE corpus = 'bad_combo'").format(
        store_conn.t("corpora")))
    assert rows == 0


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_a_missing_or_empty_corpus_is_refused_before_any_write(corpus_dag, store_conn, tmp_path, make):
    root = tmp_path / "corpus"
    if make == "empty":
        root.mkdir()
        (root / "notes.csv").write_text("a,b", encoding="utf-8")
    dr = corpus_dag.test(run_conf={"corpus": f"refused_{make}", "corpus_uri": str(root)})
    assert dr.state == "failed" and _failed(dr) == ["prepare"], _ti_states(dr)
    for table in ("corpora", "embedding_stores", "batches"):
        (rows,) = store_conn.one(sql.SQL("SELECT count(*) FROM {} WHERE corpus = %s").format(store_conn.t(table)),
                                 (f"refused_{make}",))
        assert rows == 0, table
    from reindex_airflow.tasks import prepare

    expected = "does not exist" if make == "missing" else r"is empty: no \.txt, \.md, \.jsonl or \.parquet document"
    from airflow.sdk.exceptions import AirflowFailException

    with pytest.raises(AirflowFailException, match=rf"corpus 'refused_{make}' at .* {expected}"):
        prepare({"corpus": f"refused_{make}", "corpus_uri": str(root)})


def test_a_refused_model_upgrade_leaves_the_corpus_free(dagbag, corpus_dag, store_conn, tmp_path):
    """An unknown target model fails the upgrade's first task (0 chunks touched); the corpus is not held, so
    the next run takes it at once (on_busy=fail)."""
    (tmp_path / "a.txt").write_text("Lighthouses warn ships of rocks at night.", encoding="utf-8")
    dr = corpus_dag.test(run_conf={"corpus": "upgrade_refused", "corpus_uri": str(tmp_path)})
    assert dr.state == "success", _ti_states(dr)
    up = dagbag.get_dag("reindex_model_upgrade").test(run_conf={"corpus": "upgrade_refused",
                                                                 "model": "no-such-org/no-such-model"})
    assert up.state == "failed" and _failed(up) == ["prepare_upgrade"], _ti_states(up)
    assert corpus_status(store_conn, "upgrade_refused")["lease"] is None
    again = corpus_dag.test(run_conf={"corpus": "upgrade_refused", "corpus_uri": str(tmp_path), "on_busy": "fail"})
    assert again.state == "success", _ti_states(again)


def test_a_dead_runs_lease_is_taken_over_and_its_batch_abandoned(corpus_dag, store_conn, tmp_path):
    """A run killed while holding the corpus (its DAG run no longer running) does not block the next run:
    the lease is taken over at once, the dead batch is ABANDONED, its chunks are embedded by the new run."""
    from reindex.store.batches import create_batch
    from reindex.store.documents import ensure_corpus
    from reindex.store.schema import ensure_schema

    (tmp_path / "a.txt").write_text("Penguins huddle together to keep warm in winter storms.", encoding="utf-8")
    ensure_schema(store_conn)
    with store_conn.conn.transaction():
        ensure_corpus(store_conn, "dead_holder")
        create_batch(store_conn, "dead-batch", "dead_holder", "local", None, dag_run_id="manual__killed",
                     dag_id="reindex_corpus")
    from reindex.store import leases

    assert leases.try_acquire(store_conn, "dead_holder", "dead-batch", "manual__killed",
                              dag_id="reindex_corpus") is None
    dr = corpus_dag.test(run_conf={"corpus": "dead_holder", "corpus_uri": str(tmp_path), "on_busy": "fail"})
    assert dr.state == "success", _ti_states(dr)  # no such DAG run is running: taken over, not "busy"
    (status,) = store_conn.one(sql.SQL("SELECT status FROM {} WHERE batch_id = 'dead-batch'").format(
        store_conn.t("batches")))
    st = corpus_status(store_conn, "dead_holder")
    assert status == "ABANDONED" and st["chunks"]["READY"] == 1 and st["lease"] is None


def test_a_run_emits_its_metrics_and_cost(corpus_dag, store_conn, tmp_path):
    """During a dag.test() run the named reindex metrics arrive at a real StatsD (UDP) listener, through Airflow's
    own [metrics] configuration; the batch row keeps tokens, the (zero) local cost and seconds per stage."""
    from tests.udp_listener import statsd_listener

    for i, text in enumerate(["Owls hunt at night.", "Salmon swim upstream to spawn.", "Moss grows on stones."]):
        (tmp_path / f"m{i}.txt").write_text(text, encoding="utf-8")
    (tmp_path / "broken.txt").write_bytes(b"\xff\xfe not text")
    with statsd_listener() as statsd:
        dr = corpus_dag.test(run_conf={"corpus": "metrics_e2e", "corpus_uri": str(tmp_path)})
        statsd.sync()
    assert dr.state == "success", _ti_states(dr)
    counters = statsd.counters("airflow.reindex.")
    assert counters["airflow.reindex.chunks.ready"] == 3
    assert counters["airflow.reindex.batches.COMPLETED_WITH_ERRORS"] == 1  # a document could not be read
    assert counters["airflow.reindex.tokens"] > 0
    timings = statsd.timings("airflow.reindex.")
    assert {"airflow.reindex.encode.seconds", "airflow.reindex.batch.seconds"} <= set(timings)
    tokens, cost_usd, details = store_conn.one(sql.SQL("""SELECT tokens, cost_usd, details FROM {}
        WHERE dag_run_id = %s""").format(store_conn.t("batches")), (dr.run_id,))
    assert tokens == counters["airflow.reindex.tokens"] and float(cost_usd) == 0.0
    assert details["cost"]["unit"] and details["failed_documents"] == 1
    assert details["documents_by_reason"] == {"DECODE_ERROR": 1}
    assert {"chunk", "encode", "index"} <= set(details["stages"])
    # the run tells its outcome where users look: its note (written by the reindex_ui listener)
    from airflow import settings
    from airflow.models.dagrun import DagRun

    with settings.Session() as session:
        note = session.query(DagRun).filter(DagRun.run_id == dr.run_id).one().note
    assert note == ("metrics_e2e: COMPLETED_WITH_ERRORS — 3 chunk(s) embedded: 3 READY, 0 FAILED; 0 batch job(s) "
                    "submitted; 0 chunk vector(s) reused; 1 document(s) failed {'DECODE_ERROR': 1}")
