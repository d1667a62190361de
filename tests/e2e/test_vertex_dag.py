"""The Google batch path end to end through Airflow (``dag.test()``) against the offline emulators:
gcp-storage-emulator for GCS and the project's Vertex batch-prediction emulator."""

from __future__ import annotations

import json

import numpy as np
import pytest
from psycopg import sql

from reindex.store.search import corpus_status, search

pytestmark = pytest.mark.e2e


def _states(dr):
    return {ti.task_id: ti.state for ti in dr.get_task_instances()}


def _triggered_retry_conf(parent: str) -> dict:
    from airflow import settings
    from airflow.models.dagrun import DagRun

    with settings.Session() as session:
        runs = session.query(DagRun).filter(DagRun.dag_id == "reindex_retry").all()
        confs = [r.conf for r in runs if r.conf.get("batch_id") == parent]
    assert len(confs) == 1, f"expected one reindex_retry run for {parent}, got {confs}"
    return confs[0]


def test_real_model_vectors_from_the_emulator_into_pgvector(dagbag, vertex_env, store_conn, tmp_path, encoder):
    """The emulator embeds with the bundled MiniLM; the vectors land in pgvector and answer a search."""
    vertex_env.configure(embedder="model")
    docs = {"photo": "Green plants use chlorophyll to turn sunlight, water and carbon dioxide into sugar.",
            "train": "The Trans-Siberian Railway links Moscow with Vladivostok across Siberia.",
            "baikal": "Байкал — самое глубокое озеро в мире."}
    for name, text in docs.items():
        (tmp_path / f"{name}.txt").write_text(text, encoding="utf-8")
    dr = dagbag.get_dag("reindex_corpus").test(run_conf={
        "corpus": "vertex_real", "corpus_uri": str(tmp_path), "backend": "vertex",
        "model": "text-embedding-005", "output_dimensionality": 384})
    assert dr.state == "success", _states(dr)
    states = _states(dr)
    assert states["submit_vertex_batch"] == "success" and states["encode_partition"] == "skipped"
    st = corpus_status(store_conn, "vertex_real")
    assert st["chunks"] == {"READY": 3, "PENDING": 0, "FAILED": 0}
    assert (st["model"]["model_id"], st["model"]["dim"]) == ("text-embedding-005", 384)
    assert vertex_env.stats()["create_calls"] == 1
    hits = search(store_conn, "vertex_real", encoder.encode(["how do plants make food from light"])[0], k=1)
    assert hits[0].doc_id == "photo.txt" and hits[0].score > 0.5

    # Unchanged corpus again (model left empty: the corpus's active Vertex model): no job at all.
    dr = dagbag.get_dag("reindex_corpus").test(run_conf={"corpus": "vertex_real", "corpus_uri": str(tmp_path)})
    assert dr.state == "success", _states(dr)
    assert vertex_env.stats()["create_calls"] == 1
    (jobs, encoded) = store_conn.one(sql.SQL("""SELECT cardinality(job_names), encoded FROM {}
        WHERE dag_run_id = %s""").format(store_conn.t("batches")), (dr.run_id,))
    assert (jobs, encoded) == (0, 0)


def test_model_upgrade_from_local_to_vertex(dagbag, vertex_env, store_conn, tmp_path):
    """reindex_model_upgrade on the Vertex backend: MiniLM 384-d → text-embedding-005 at 768-d, one job."""
    for i, text in enumerate(["Otters hold hands while sleeping.", "Сова поворачивает голову на 270 градусов."]):
        (tmp_path / f"n{i}.txt").write_text(text, encoding="utf-8")
    dr = dagbag.get_dag("reindex_corpus").test(run_conf={"corpus": "vertex_upgrade", "corpus_uri": str(tmp_path),
                                                          "backend": "local", "model": "all-MiniLM-L6-v2",
                                                          "output_dimensionality": None})
    assert dr.state == "success"
    dr = dagbag.get_dag("reindex_model_upgrade").test(run_conf={
        "corpus": "vertex_upgrade", "model": "text-embedding-005", "backend": "vertex", "dimension": 768})
    assert dr.state == "success", _states(dr)
    assert _states(dr)["switch_model"] == "success" and vertex_env.stats()["create_calls"] == 1
    st = corpus_status(store_conn, "vertex_upgrade")
    assert (st["model"]["model_id"], st["model"]["dim"]) == ("text-embedding-005", 768)
    assert st["chunks"] == {"READY": 2, "PENDING": 0, "FAILED": 0}
    assert sorted(s["status"] for s in st["stores"]) == ["ACTIVE", "RETIRED"]


def test_ten_thousand_chunks_with_partial_failures_and_a_healing_retry(dagbag, vertex_env, store_conn, tmp_path):
    """~2 % injected per-line failures of mixed kinds → COMPLETED_WITH_ERRORS → reindex_retry heals the
    retriable ones; texts the service always refuses for invalid characters (sanitized once, refused
    again) stay FAILED with the reason."""
    n = 10_000
    refused = {i for i in range(0, n, 199)}  # 51 documents the service always refuses
    rows = [json.dumps({"id": f"d{i:05d}", "text": f"note {i}: topic {i % 97} with detail {i * 7919 % 10007}"
                        + (" zz-refuse" if i in refused else "")}) for i in range(n)]
    (tmp_path / "notes.jsonl").write_text("\n".join(rows), encoding="utf-8")
    vertex_env.configure(embedder="hash", hash_dim=768, seed=7, transient_max_failures=1, lines_per_file=3000,
                         force_errors={"zz-refuse": "invalid_characters"},
                         error_rates={"rate_limited": 0.006, "unavailable": 0.004, "too_long": 0.005})
    conf = {"corpus": "vertex_10k", "corpus_uri": str(tmp_path), "backend": "vertex",
            "model": "text-embedding-005", "output_dimensionality": 768, "partition_size": 2000}
    dr = dagbag.get_dag("reindex_corpus").test(run_conf=conf)
    assert dr.state == "success", _states(dr)
    assert _states(dr)["trigger_retry"] == "success"
    st = corpus_status(store_conn, "vertex_10k")
    first = st["last_batch"]
    assert first["status"] == "COMPLETED_WITH_ERRORS" and first["total"] == n
    reasons = first["counts_by_reason"]
    assert set(reasons) == {"RATE_LIMITED", "UNAVAILABLE", "TOO_LONG", "INVALID_CHARACTERS"}
    failed_first = sum(reasons.values())
    assert 100 <= failed_first <= 300 and first["ready"] == n - failed_first
    assert reasons["INVALID_CHARACTERS"] == len(refused)
    assert vertex_env.stats()["create_calls"] == 1

    vertex_env.configure(error_rates={})  # the transient trouble is over; the refused texts stay refused
    retry = dagbag.get_dag("reindex_retry").test(run_conf=_triggered_retry_conf(first["batch_id"]))
    assert retry.state == "success", _states(retry)
    st = corpus_status(store_conn, "vertex_10k")
    second = st["last_batch"]
    assert (second["kind"], second["status"]) == ("retry", "COMPLETED_WITH_ERRORS")
    assert _states(retry)["done"] == "success"  # nothing retriable is left: no further retry run
    # every re-split chunk became two pieces; 429/503 (transient) and re-split pieces are now READY
    total = st["chunks_total"]
    assert total == n + reasons["TOO_LONG"]
    assert st["failed_by_reason"] == {"INVALID_CHARACTERS": reasons["INVALID_CHARACTERS"]}
    assert st["chunks"] == {"READY": total - reasons["INVALID_CHARACTERS"], "PENDING": 0,
                            "FAILED": reasons["INVALID_CHARACTERS"]}
    (vectors, distinct) = store_conn.one(sql.SQL("SELECT count(*), count(DISTINCT chunk_pk) FROM {}").format(
        store_conn.t(st["vector_table"])))
    assert vectors == distinct == st["chunks"]["READY"]  # no duplicate rows
    (msg,) = store_conn.one(sql.SQL("""SELECT error_message FROM {} WHERE corpus = 'vertex_10k'
        AND embedding_status = 'FAILED' LIMIT 1""").format(store_conn.t("chunks")))
    assert "nvalid characters" in msg
    (vec,) = store_conn.one(sql.SQL("SELECT embedding::text FROM {} LIMIT 1").format(store_conn.t(st["vector_table"])))
    v = np.array(json.loads(vec), dtype=np.float32)
    assert v.shape == (768,) and abs(np.linalg.norm(v) - 1) < 1e-3
    assert vertex_env.stats()["create_calls"] == 2  # one job for the batch, one for its retry


@pytest.mark.parametrize("outcome", ["FAILED", "EXPIRED"])
def test_a_failed_or_expired_job_is_retried_until_the_attempts_are_spent(dagbag, vertex_env, store_conn, tmp_path,
                                                                          outcome):
    """A job that ends FAILED/EXPIRED leaves its chunks JOB_FAILED — retriable, in a new job — until the policy's
    attempts are spent; only then does the chain fail loudly."""
    corpus = f"vertex_{outcome.lower()}"
    (tmp_path / "a.txt").write_text("one small document", encoding="utf-8")
    vertex_env.configure(outcome=outcome)
    dr = dagbag.get_dag("reindex_corpus").test(run_conf={
        "corpus": corpus, "corpus_uri": str(tmp_path), "backend": "vertex",
        "model": "text-embedding-005", "output_dimensionality": 768})
    states = _states(dr)
    assert dr.state == "success" and states["trigger_retry"] == "success" and states["fail_batch"] == "skipped"
    batch = corpus_status(store_conn, corpus)["last_batch"]
    assert (batch["status"], batch["counts_by_reason"]) == ("FAILED", {"JOB_FAILED": 1})
    for attempt in (1, 2, 3):
        retry = dagbag.get_dag("reindex_retry").test(run_conf=_triggered_retry_conf(batch["batch_id"]))
        batch = corpus_status(store_conn, corpus)["last_batch"]
        assert (batch["kind"], batch["status"], batch["counts_by_reason"]) == ("retry", "FAILED", {"JOB_FAILED": 1})
        if attempt < 3:
            assert retry.state == "success" and _states(retry)["trigger_retry"] == "success", attempt
    assert retry.state == "failed" and _states(retry)["fail_batch"] == "failed"
    assert vertex_env.stats()["create_calls"] == 4  # the batch's job and one new job per retry attempt
    (msg, retry_count) = store_conn.one(sql.SQL("SELECT error_message, retry_count FROM {} WHERE corpus = %s").format(
        store_conn.t("chunks")), (corpus,))
    assert f"ended {outcome}" in msg and retry_count == 3
    assert corpus_status(store_conn, corpus)["lease"] is None


def test_a_job_that_fails_after_partial_output_is_not_a_green_run(dagbag, vertex_env, store_conn, tmp_path):
    """20 lines answered, then the job FAILED: 20 READY, 30 JOB_FAILED, and the retry run submits exactly those 30."""
    rows = [json.dumps({"id": f"p{i:02d}", "text": f"partial output document number {i}"}) for i in range(50)]
    (tmp_path / "docs.jsonl").write_text("\n".join(rows), encoding="utf-8")
    vertex_env.configure(outcome="FAILED", fail_after_lines=20, lines_per_file=10)
    dr = dagbag.get_dag("reindex_corpus").test(run_conf={
        "corpus": "vertex_partial", "corpus_uri": str(tmp_path), "backend": "vertex",
        "model": "text-embedding-005", "output_dimensionality": 768})
    assert dr.state == "success" and _states(dr)["trigger_retry"] == "success", _states(dr)
    first = corpus_status(store_conn, "vertex_partial")["last_batch"]
    assert (first["status"], first["ready"], first["counts_by_reason"]) == (
        "COMPLETED_WITH_ERRORS", 20, {"JOB_FAILED": 30})
    vertex_env.configure(outcome="auto")
    retry = dagbag.get_dag("reindex_retry").test(run_conf=_triggered_retry_conf(first["batch_id"]))
    assert retry.state == "success" and _states(retry)["done"] == "success", _states(retry)
    st = corpus_status(store_conn, "vertex_partial")
    assert (st["last_batch"]["kind"], st["last_batch"]["total"], st["last_batch"]["status"]) == (
        "retry", 30, "COMPLETED")
    assert st["chunks"] == {"READY": 50, "PENDING": 0, "FAILED": 0}
    (vectors,) = store_conn.one(sql.SQL("SELECT count(*) FROM {}").format(store_conn.t(st["vector_table"])))
    assert vectors == 50


def test_a_refused_submit_is_its_own_reason(dagbag, vertex_env, store_conn, tmp_path):
    """The job create is refused (403): the batch says SUBMIT_FAILED with the service's message, not
    NOT_PROCESSED, and the run fails once, in fail_batch, with that reason."""
    (tmp_path / "a.txt").write_text("a document nobody may embed", encoding="utf-8")
    (tmp_path / "b.txt").write_text("another document nobody may embed", encoding="utf-8")
    vertex_env.configure(create_errors=[403])
    dr = dagbag.get_dag("reindex_corpus").test(run_conf={
        "corpus": "vertex_refused", "corpus_uri": str(tmp_path), "backend": "vertex",
        "model": "text-embedding-005", "output_dimensionality": 768})
    states = _states(dr)
    assert dr.state == "failed"
    assert [t for t, s in states.items() if s == "failed"] == ["fail_batch"], states
    st = corpus_status(store_conn, "vertex_refused")
    assert st["failed_by_reason"] == {"SUBMIT_FAILED": 2} and st["last_batch"]["status"] == "FAILED"
    (msg, submit_error) = store_conn.one(sql.SQL("""SELECT c.error_message, b.details->>'submit_error' FROM {} c
        JOIN {} b ON b.batch_id = c.batch_id WHERE c.corpus = 'vertex_refused' LIMIT 1""").format(
        store_conn.t("chunks"), store_conn.t("batches")))
    assert msg == submit_error and msg.startswith("batch job submit failed: ") and "403" in msg
    assert vertex_env.stats()["create_calls"] == 1 and st["lease"] is None


def test_a_vertex_run_without_a_project_is_refused_in_its_first_task(dagbag, vertex_env, store_conn, tmp_path,
                                                                       monkeypatch):
    (tmp_path / "a.txt").write_text("text", encoding="utf-8")
    monkeypatch.delenv("REINDEX_VERTEX_PROJECT")
    monkeypatch.delenv("GOOGLE_CLOUD_PROJECT", raising=False)
    from airflow.sdk.exceptions import AirflowFailException

    from reindex_airflow.tasks import prepare

    with pytest.raises(AirflowFailException, match=r"backend 'vertex' needs a project: set REINDEX_VERTEX_PROJECT"):
        prepare({"corpus": "vertex_noproject", "corpus_uri": str(tmp_path), "backend": "vertex"})
    dr = dagbag.get_dag("reindex_corpus").test(run_conf={
        "corpus": "vertex_noproject", "corpus_uri": str(tmp_path), "backend": "vertex",
        "model": "text-embedding-005", "output_dimensionality": 768})
    states = _states(dr)
    assert dr.state == "failed" and [t for t, s in states.items() if s == "failed"] == ["prepare"], states
    assert vertex_env.stats()["create_calls"] == 0
    (rows,) = store_conn.one(sql.SQL("SELECT count(*) FROM {} WHERE corpus = 'vertex_noproject'").format(
        store_conn.t("corpora")))
    assert rows == 0  # refused before anything was written


def test_gemini_embedding_batch_joined_by_key(dagbag, vertex_env, store_conn, tmp_path):
    """gemini-embedding-001: {"key", "request"} lines, results joined by key; 768-d is not unit-norm."""
    rows = [json.dumps({"id": f"g{i}", "text": f"gemini document {i} about tea and coffee"}) for i in range(300)]
    (tmp_path / "docs.jsonl").write_text("\n".join(rows), encoding="utf-8")
    vertex_env.configure(embedder="hash", hash_dim=768, seed=5, error_rates={"unavailable": 0.02},
                         transient_max_failures=1)
    dr = dagbag.get_dag("reindex_corpus").test(run_conf={
        "corpus": "vertex_gemini", "corpus_uri": str(tmp_path), "backend": "vertex",
        "model": "gemini-embedding-001", "output_dimensionality": 768})
    assert dr.state == "success", _states(dr)
    st = corpus_status(store_conn, "vertex_gemini")
    batch = st["last_batch"]
    assert (st["model"]["model_id"], st["model"]["dim"], st["model"]["normalized"]) == (
        "gemini-embedding-001", 768, False)
    failed = batch["counts_by_reason"].get("UNAVAILABLE", 0)
    assert batch["counts_by_reason"] == ({"UNAVAILABLE": failed} if failed else {})
    assert batch["ready"] == 300 - failed and st["chunks"]["READY"] == 300 - failed
