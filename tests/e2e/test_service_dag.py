"""``backend=service`` end to end through Airflow (``dag.test()``) against the reference embedding service
(``reindex.emulators.embedding_service``) with injected faults: exact final counts for each."""

from __future__ import annotations

import json

import numpy as np
import pytest
from psycopg import sql

from reindex.store.search import corpus_status

pytestmark = pytest.mark.e2e

API_KEY = "test-key-7f3a"
MARKER = "REFUSE-ME"


@pytest.fixture(scope="module")
def service():
    from reindex.emulators.embedding_service import EmbeddingService, ServiceConfig

    svc = EmbeddingService(ServiceConfig(embedder="hash", api_key=API_KEY)).start()
    yield svc
    svc.stop()


def _connect(monkeypatch, url: str, *, key: str | None = API_KEY, **extra) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_REINDEX_EMBEDDING_SERVICE", json.dumps(
        {"conn_type": "http", "host": url, "password": key, "extra": {"protocol": "seed004", **extra}}))


@pytest.fixture
def service_env(service, monkeypatch):
    """The reference service with no faults, zeroed counters, an empty cache; fast retry timings."""
    service.set_faults()
    service.reset()
    monkeypatch.setenv("REINDEX_RETRY_BACKOFF", "0.05,0.1,0.2")
    monkeypatch.setenv("REINDEX_RETRY_UNAVAILABLE_SECONDS", "0.2")
    _connect(monkeypatch, service.url)
    return service


def _states(dr) -> dict:
    return {ti.task_id: ti.state for ti in dr.get_task_instances()}


def _write(root, n: int, *, marked: tuple[int, ...] = (), prefix: str = "doc") -> list[str]:
    """``n`` one-chunk documents; the ``marked`` ones carry the text the service refuses."""
    root.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        name = f"{prefix}{i:03d}.txt"
        text = f"Document {i} of the {prefix} corpus: notes number {i * 7919 % 1000}."
        if i in marked:
            text += f" {MARKER}"
        (root / name).write_text(text, encoding="utf-8")
        names.append(name)
    return names


def _chunks(store, corpus: str) -> dict[str, tuple[str, str | None, str | None]]:
    rows = store.execute(sql.SQL("""SELECT doc_id, embedding_status, error_code, error_message FROM {}
        WHERE corpus = %s""").format(store.t("chunks")), (corpus,)).fetchall()
    return {r[0]: (r[1], r[2], r[3]) for r in rows}


def _vector_rows(store, corpus: str) -> int:
    table = corpus_status(store, corpus)["vector_table"]
    return store.one(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(store.schema, table)))[0]


def _batch(store, run_id: str) -> dict:
    cur = store.execute(sql.SQL("SELECT status, ready, failed, details FROM {} WHERE dag_run_id = %s").format(
        store.t("batches")), (run_id,))
    status, ready, failed, details = cur.fetchone()
    return {"status": status, "ready": ready, "failed": failed, "details": details}


def _retry_runs(parent: str) -> list[dict]:
    from airflow import settings
    from airflow.models.dagrun import DagRun

    with settings.Session() as session:
        runs = session.query(DagRun).filter(DagRun.dag_id == "reindex_retry").all()
        return [r.conf for r in runs if (r.conf or {}).get("batch_id") == parent]


def test_seed004_vectors_equal_local_minilm_and_the_cache_hits_show(dagbag, corpus_dag, store_conn, tmp_path, monkeypatch,
                                                                     encoder):
    """The service embeds with the bundled MiniLM: the stored vectors are the local model's; a forced rerun is
    answered from the service's cache, and the batch's summary counts the hits."""
    from reindex.emulators.embedding_service import EmbeddingService, ServiceConfig

    docs = {"photo": "Green plants use chlorophyll to turn sunlight, water and carbon dioxide into sugar.",
            "train": "The Trans-Siberian Railway links Moscow with Vladivostok across Siberia.",
            "baikal": "Байкал — самое глубокое озеро в мире."}
    for name, text in docs.items():
        (tmp_path / f"{name}.txt").write_text(text, encoding="utf-8")
    with EmbeddingService(ServiceConfig(embedder="model", api_key=API_KEY)).start() as svc:
        _connect(monkeypatch, svc.url)
        conf = {"corpus": "svc_model", "corpus_uri": str(tmp_path), "backend": "service"}
        dr = corpus_dag.test(run_conf=conf)
        assert dr.state == "success", _states(dr)
        st = corpus_status(store_conn, "svc_model")
        assert st["chunks"] == {"READY": 3, "PENDING": 0, "FAILED": 0}
        assert (st["model"]["model_id"], st["model"]["dim"], st["last_batch"]["backend"]) == (
            "sentence-transformers/all-MiniLM-L6-v2", 384, "service")
        rows = store_conn.execute(sql.SQL("SELECT c.text, e.embedding::float4[] FROM {c} c JOIN {e} e ON e.chunk_pk = c.id "
                                          "WHERE c.corpus = 'svc_model' ORDER BY c.doc_id").format(
            c=store_conn.t("chunks"), e=sql.Identifier(store_conn.schema, st["vector_table"]))).fetchall()
        local = encoder.encode([r[0] for r in rows])
        stored = np.asarray([np.asarray(r[1], dtype=np.float32) for r in rows])
        assert np.min(np.sum(local * stored, axis=1)) > 0.99999
        first = _batch(store_conn, dr.run_id)["details"]["usage_parts"]
        assert sum(p["service"]["texts"] for p in first.values()) == 3
        assert sum(p["service"]["cached"] for p in first.values()) == 0

        dr = corpus_dag.test(run_conf={**conf, "force": True})
        assert dr.state == "success", _states(dr)
        summary = dr.get_task_instance("summarize").xcom_pull(task_ids="summarize")
        assert summary["service"]["texts"] == 3 and summary["service"]["cached"] == 3
        assert "service cache hits 3/3" in summary["outcome"]
        assert svc.stats()["cache_hits"] == 3

        # `python -m reindex search` sends the query to the service that made the corpus's vectors
        import os
        import subprocess
        import sys

        p = subprocess.run([sys.executable, "-m", "reindex", "search", "--corpus", "svc_model", "--json", "-k", "1",
                            "how do plants make food from light"], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "REINDEX_SERVICE_URL": svc.url, "REINDEX_SERVICE_API_KEY": API_KEY})
        assert p.returncode == 0, p.stderr
        assert json.loads(p.stdout)[0]["doc_id"] == "photo.txt"


def test_429s_and_503s_within_the_attempts_heal_inside_the_task(dagbag, corpus_dag, service_env, store_conn, tmp_path,
                                                                 monkeypatch):
    """Two 429s (one with Retry-After) and two 503s among four requests: each request is retried once and the run
    is COMPLETED, with the retries counted on the batch."""
    _connect(monkeypatch, service_env.url, max_batch_size=10)
    service_env.set_faults(status_429=2, retry_after=1, status_503=2)
    _write(tmp_path, 40)
    dr = corpus_dag.test(run_conf={"corpus": "svc_heal", "corpus_uri": str(tmp_path),
                                                          "backend": "service"})
    assert dr.state == "success", _states(dr)
    assert _states(dr)["trigger_retry"] == "skipped"
    assert corpus_status(store_conn, "svc_heal")["chunks"] == {"READY": 40, "PENDING": 0, "FAILED": 0}
    batch = _batch(store_conn, dr.run_id)
    assert (batch["status"], batch["ready"], batch["failed"]) == ("COMPLETED", 40, 0)
    counters = [p["service"] for p in batch["details"]["usage_parts"].values()]
    assert sum(c["retries"] for c in counters) == 4 and sum(c["requests"] for c in counters) == 8
    assert service_env.stats()["faults"]["status_429"] == 2 and service_env.stats()["faults"]["status_503"] == 2


@pytest.mark.parametrize(("fault", "code"), [("status_429", "RATE_LIMITED"), ("status_503", "UNAVAILABLE"),
                                             ("drop_connections", "UNAVAILABLE")])
def test_a_storm_past_the_attempts_leaves_chunks_to_reindex_retry_which_heals_them(dagbag, corpus_dag, service_env, store_conn,
                                                                                    tmp_path, fault, code):
    """Three failures in a row spend the request's attempts: its 12 chunks fail retriable, the run triggers
    reindex_retry, and the retry run (the storm over) makes them READY."""
    service_env.set_faults(**{fault: 3})
    corpus = f"svc_{fault}"
    _write(tmp_path, 12)
    dr = corpus_dag.test(run_conf={"corpus": corpus, "corpus_uri": str(tmp_path),
                                                          "backend": "service"})
    states = _states(dr)
    assert states["trigger_retry"] == "success" and states["fail_batch"] == "skipped", states
    chunks = _chunks(store_conn, corpus)
    assert {v[:2] for v in chunks.values()} == {("FAILED", code)} and len(chunks) == 12
    assert all("after 3 attempt(s)" in v[2] for v in chunks.values())
    parent = _batch(store_conn, dr.run_id)
    assert (parent["status"], parent["ready"], parent["failed"]) == ("FAILED", 0, 12)

    (conf,) = _retry_runs(dr.get_task_instance("summarize").xcom_pull(task_ids="summarize")["batch_id"])
    retry = dagbag.get_dag("reindex_retry").test(run_conf=conf)
    assert retry.state == "success", _states(retry)
    assert corpus_status(store_conn, corpus)["chunks"] == {"READY": 12, "PENDING": 0, "FAILED": 0}
    assert _vector_rows(store_conn, corpus) == 12
    assert service_env.stats()["faults"][fault] == 3


def test_a_400_on_three_texts_of_a_batch_of_128_fails_exactly_those(dagbag, corpus_dag, service_env, store_conn, tmp_path):
    """The service refuses a whole request for three of its 128 texts: bisection finds them, they fail
    INVALID_INPUT with the service's message, the other 125 are READY (within max_failed_ratio: the run is green,
    the failures recorded), and nothing is retried."""
    marked = (5, 77, 100)
    service_env.set_faults(invalid_marker=MARKER)
    names = _write(tmp_path, 128, marked=marked)
    dr = corpus_dag.test(run_conf={"corpus": "svc_400", "corpus_uri": str(tmp_path),
                                                          "backend": "service", "max_failed_ratio": 0.05})
    assert dr.state == "success", _states(dr)
    assert _states(dr)["trigger_retry"] == "skipped"
    chunks = _chunks(store_conn, "svc_400")
    failed = {doc: v for doc, v in chunks.items() if v[0] == "FAILED"}
    assert sorted(failed) == [names[i] for i in marked]
    assert all(v[1] == "INVALID_INPUT" and f"contains {MARKER}" in v[2] and "HTTP 400" in v[2]
               for v in failed.values()), failed
    assert sum(v[0] == "READY" for v in chunks.values()) == 125 and _vector_rows(store_conn, "svc_400") == 125
    batch = _batch(store_conn, dr.run_id)
    assert (batch["status"], batch["ready"], batch["failed"]) == ("COMPLETED_WITH_ERRORS", 125, 3)


def test_a_model_change_mid_run_stores_no_vector_of_the_other_model(dagbag, corpus_dag, upgrade_dag, service_env, store_conn, tmp_path,
                                                                    monkeypatch):
    """After two answered requests the service deploys another model (new checksum): the later chunks fail
    MODEL_CHANGED, only the first model's 20 vectors are stored, the run fails naming reindex_model_upgrade; the
    next run is refused before any write; the upgrade moves the corpus to the new model atomically."""
    _connect(monkeypatch, service_env.url, max_batch_size=10, concurrency=1)
    _write(tmp_path, 50)
    old = service_env.model_info()["model_checksum"]
    service_env.set_faults(model_change_after=2)
    conf = {"corpus": "svc_changed", "corpus_uri": str(tmp_path), "backend": "service"}
    dr = corpus_dag.test(run_conf=conf)
    states = _states(dr)
    assert dr.state == "failed" and states["fail_batch"] == "failed" and states["trigger_retry"] == "skipped", states
    chunks = _chunks(store_conn, "svc_changed")
    assert sum(v[0] == "READY" for v in chunks.values()) == 20
    changed = [v for v in chunks.values() if v[0] == "FAILED"]
    assert len(changed) == 30 and {v[1] for v in changed} == {"MODEL_CHANGED"}
    assert "reindex_model_upgrade" in changed[0][2] and old in changed[0][2]
    assert _vector_rows(store_conn, "svc_changed") == 20
    new = service_env.model_info()["model_checksum"]
    assert new != old

    again = corpus_dag.test(run_conf=conf)
    assert again.state == "failed" and [t for t, s in _states(again).items() if s == "failed"] == ["prepare"]

    up = upgrade_dag.test(run_conf={"corpus": "svc_changed", "model": "served",
                                                                "backend": "service"})
    assert up.state == "success", _states(up)
    st = corpus_status(store_conn, "svc_changed")
    assert st["model"]["model_id"] == "reference-hash-384-v2" and st["chunks"] == {"READY": 50, "PENDING": 0,
                                                                                   "FAILED": 0}
    assert _vector_rows(store_conn, "svc_changed") == 50
    assert sorted(s["status"] for s in st["stores"]) == ["ACTIVE", "RETIRED"]


@pytest.mark.parametrize("protocol", ["seed004", "openai"])
def test_a_wrong_api_key_fails_fast_and_blames_no_chunk(dagbag, corpus_dag, service_env, store_conn, tmp_path, monkeypatch,
                                                        protocol):
    """401: the run fails at once with a message naming the service and the connection (never the key); no task
    retry, no reindex_retry, no chunk FAILED for a reason of its own."""
    extra = {"protocol": protocol, "model": "reference-hash-384"} if protocol == "openai" else {}
    _connect(monkeypatch, service_env.url, key="wrong-key-123", **extra)
    corpus = f"svc_key_{protocol}"
    _write(tmp_path, 6)
    dr = corpus_dag.test(run_conf={"corpus": corpus, "corpus_uri": str(tmp_path),
                                                          "backend": "service"})
    states = _states(dr)
    assert dr.state == "failed" and states["trigger_retry"] != "success", states
    first = "prepare" if protocol == "openai" else "encode_partition"  # openai: the identity probe needs the key
    ti = next(t for t in dr.get_task_instances() if t.task_id == first)
    assert ti.state == "failed" and ti.try_number == 1
    codes = {v[1] for v in _chunks(store_conn, corpus).values()}
    assert codes <= {"NOT_PROCESSED"}  # unfinished, not blamed: the next run claims them again
    assert _retry_runs(corpus) == []
    assert sum(by.get("401", 0) for by in service_env.stats()["requests"].values()) >= 1


def test_the_openai_protocol_gives_the_same_vectors(dagbag, corpus_dag, service_env, store_conn, tmp_path, monkeypatch):
    """/v1/embeddings with base64 vectors: the same model, so the same vectors as seed004's /embed/batch."""
    _write(tmp_path / "a", 5)
    _write(tmp_path / "b", 5)
    dr = corpus_dag.test(run_conf={"corpus": "svc_seed", "corpus_uri": str(tmp_path / "a"),
                                                          "backend": "service"})
    assert dr.state == "success", _states(dr)
    _connect(monkeypatch, service_env.url, protocol="openai", model="reference-hash-384", encoding_format="base64")
    dr = corpus_dag.test(run_conf={"corpus": "svc_openai", "corpus_uri": str(tmp_path / "b"),
                                                          "backend": "service"})
    assert dr.state == "success", _states(dr)
    assert corpus_status(store_conn, "svc_openai")["chunks"] == {"READY": 5, "PENDING": 0, "FAILED": 0}
    assert service_env.stats()["requests"]["/v1/embeddings"].get("200", 0) >= 1

    def vectors(corpus):
        table = corpus_status(store_conn, corpus)["vector_table"]
        return [np.asarray(r[0], dtype=np.float32) for r in store_conn.execute(sql.SQL(
            "SELECT e.embedding::float4[] FROM {c} c JOIN {e} e ON e.chunk_pk = c.id WHERE c.corpus = %s ORDER BY c.doc_id").format(
            c=store_conn.t("chunks"), e=sql.Identifier(store_conn.schema, table)), (corpus,)).fetchall()]

    a, b = vectors("svc_seed"), vectors("svc_openai")
    assert len(a) == len(b) == 5 and all(np.allclose(x, y, atol=1e-6) for x, y in zip(a, b, strict=True))


def test_an_upgrade_from_local_minilm_to_the_service_switches_atomically(dagbag, corpus_dag, upgrade_dag, service_env, store_conn, tmp_path):
    _write(tmp_path, 4)
    dr = corpus_dag.test(run_conf={"corpus": "svc_upgrade", "corpus_uri": str(tmp_path),
                                                          "backend": "local", "model": "all-MiniLM-L6-v2"})
    assert dr.state == "success", _states(dr)
    before = corpus_status(store_conn, "svc_upgrade")["model"]["checksum"]
    up = upgrade_dag.test(run_conf={"corpus": "svc_upgrade", "model": "served",
                                                                "backend": "service"})
    assert up.state == "success", _states(up)
    st = corpus_status(store_conn, "svc_upgrade")
    assert (st["model"]["model_id"], st["last_batch"]["backend"]) == ("reference-hash-384", "service")
    assert st["model"]["checksum"] != before
    assert st["chunks"] == {"READY": 4, "PENDING": 0, "FAILED": 0} and _vector_rows(store_conn, "svc_upgrade") == 4

    # The corpus now follows the service's model: an unchanged nightly-style run embeds nothing.
    dr = corpus_dag.test(run_conf={"corpus": "svc_upgrade", "corpus_uri": str(tmp_path), "model": None,
                                   "backend": "local"})
    assert dr.state == "success", _states(dr)
    assert _batch(store_conn, dr.run_id)["ready"] == 0
