"""reindex_model_upgrade end to end: MiniLM (384-d) → a real 768-d model built offline, through
Airflow, with the upgrade killed mid-way and resumed, and searches answering throughout."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from psycopg import sql

from reindex.embeddings.local import LocalEncoder
from reindex.store import Store, connect
from reindex.store.search import corpus_status, search
from reindex.store.vectors import active_model, drop_retired_stores
from tests.conftest import ROOT, SAMPLE_CORPUS

pytestmark = pytest.mark.e2e

QUERY = "How do plants turn sunlight into chemical energy?"


# `airflow dags test reindex_model_upgrade` in this process, with the encoder stopping for good once a first
# partition (of up to 100 chunks) is through and at least 100 texts are encoded: it writes that count to argv[2]
# and waits to be killed.
_KILLABLE_UPGRADE = """
import pathlib, sys, threading
from reindex.embeddings.local import LocalEncoder

real, done, marker = LocalEncoder.encode, [0], pathlib.Path(sys.argv[2])

def encode(self, texts):
    if done[0] >= 100:
        marker.write_text(str(done[0]))  # how many texts went through: mapped tasks may run in any order
        threading.Event().wait()
    done[0] += len(texts)
    return real(self, texts)

LocalEncoder.encode = encode
from airflow.__main__ import main
conf = sys.argv[1]
sys.argv = ["airflow", "dags", "test", "reindex_model_upgrade", "--conf", conf]
main()
"""


def _building_table(store, corpus):
    row = store.one(sql.SQL("SELECT table_name FROM {} WHERE corpus = %s AND status = 'BUILDING'").format(
        store.t("embedding_stores")), (corpus,))
    return row and row[0]


def _count(store, table) -> int:
    return store.one(sql.SQL("SELECT count(*) FROM {}").format(store.t(table)))[0]


def test_upgrade_killed_resumed_and_switched_atomically(dagbag, store_conn, store_uri, tmp_path, encoder,
                                                       model_768, monkeypatch):
    corpus = "upgrade_e2e"
    lines = (SAMPLE_CORPUS / "articles_en.jsonl").read_text(encoding="utf-8").splitlines()[:80]
    (tmp_path / "articles.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    dr = dagbag.get_dag("reindex_corpus").test(run_conf={"corpus": corpus, "corpus_uri": str(tmp_path),
                                                          "max_tokens": 64, "overlap_tokens": 8})
    assert dr.state == "success"
    before = corpus_status(store_conn, corpus)
    total = before["chunks_total"]
    old_checksum, old_table = before["model"]["checksum"], before["vector_table"]
    assert before["model"]["dim"] == 384 and total > 200

    conf = {"corpus": corpus, "model": str(model_768), "dimension": 768, "partition_size": 100}
    # 1. an upgrade killed mid-way (SIGKILL of the whole Airflow process) once its first partition is loaded:
    # the process stops inside its second partition's encode (whatever the machine's speed) and says so.
    blocked, log_file = tmp_path / "blocked", (tmp_path / "upgrade.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-c", _KILLABLE_UPGRADE, json.dumps(conf), str(blocked)],
                            env=os.environ, cwd=ROOT, start_new_session=True, stdout=log_file, stderr=log_file)
    deadline = time.monotonic() + 240
    while not blocked.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)  # polling a condition: the child's marker file
    assert blocked.exists(), (f"the upgrade never reached its second partition (exit code {proc.poll()}): "
                              + (tmp_path / "upgrade.log").read_text(errors="replace")[-3000:])
    table = _building_table(store_conn, corpus)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    assert table, "the upgrade never created its vector table"
    done = _count(store_conn, table)
    assert done == int(blocked.read_text()) and 100 <= done < total  # exactly what was encoded before the stop
    # the corpus still serves the old model, searches answer; the dead run's lease is freed by hand
    st = corpus_status(store_conn, corpus)
    assert st["model"]["checksum"] == old_checksum and st["lease"] is not None
    hits = search(store_conn, corpus, encoder.encode([QUERY])[0], k=3)
    assert hits[0].doc_id == "en-0001"
    out = subprocess.run([sys.executable, "-m", "reindex", "--dsn", store_uri, "unlock", "--corpus", corpus],
                         capture_output=True, text=True, check=True)
    assert f"released corpus '{corpus}'" in out.stdout

    # 2. run again: resumes (only the rest is encoded) while a reader keeps searching
    new_encoder = LocalEncoder(str(model_768))
    encoders = {old_checksum: encoder, new_encoder.spec.checksum: new_encoder}
    for e in encoders.values():
        e.encode([QUERY])  # load both before timing-sensitive work
    encoded = []
    real = LocalEncoder.encode
    monkeypatch.setattr(LocalEncoder, "encode",
                        lambda self, texts: (encoded.extend(texts) if self is not encoder and self is not
                                             new_encoder else None, real(self, texts))[1])
    answers, errors, stop = [], [], threading.Event()

    def reader():
        with connect(store_uri, autocommit=True) as conn:
            s = Store(conn)
            while not stop.is_set():
                try:
                    checksum = active_model(s, corpus)["model_checksum"]
                    q = encoders[checksum].encode([QUERY])[0]
                    top = search(s, corpus, q, k=1, model_checksum=checksum)[0]
                    answers.append((len(q), top.doc_id))
                except Exception as e:  # noqa: BLE001 - any failure is the test's finding
                    errors.append(repr(e))
                time.sleep(0.05)

    t = threading.Thread(target=reader)
    t.start()
    dr = dagbag.get_dag("reindex_model_upgrade").test(run_conf=conf)
    seen = len(answers)
    deadline = time.monotonic() + 60
    while len(answers) < seen + 2 and not errors and time.monotonic() < deadline:
        time.sleep(0.05)  # wait for the reader to answer at least once more after the switch
    stop.set()
    t.join(30)
    assert dr.state == "success", {ti.task_id: ti.state for ti in dr.get_task_instances()}
    # nothing already in the new table was embedded again; the quality gate encodes its 100 sampled queries
    # with the old and the new model
    assert len(encoded) == total - done + 2 * 100
    assert errors == []
    dims = [d for d, _ in answers]
    assert dims[0] == 384 and dims[-1] == 768 and dims == sorted(dims)  # one switch, never back
    assert {doc for _, doc in answers} == {"en-0001"}

    after = corpus_status(store_conn, corpus)
    assert after["model"]["dim"] == 768 and after["vector_table"] == table
    assert after["chunks"] == {"READY": total, "PENDING": 0, "FAILED": 0} and after["lease"] is None
    assert after["index"] == f"{table}_hnsw" and _count(store_conn, table) == total
    stores = {s["table"]: s["status"] for s in after["stores"]}
    assert stores == {table: "ACTIVE", old_table: "RETIRED"}  # kept for the retention period
    assert drop_retired_stores(store_conn, corpus, retention_seconds=3600) == []
    assert drop_retired_stores(store_conn, corpus, retention_seconds=0) == [old_table]
    assert {s["table"] for s in corpus_status(store_conn, corpus)["stores"]} == {table}

    # 3. a nightly-style run afterwards follows the new active model: nothing to do
    dr = dagbag.get_dag("reindex_corpus").test(run_conf={"corpus": corpus, "corpus_uri": str(tmp_path),
                                                          "max_tokens": 64, "overlap_tokens": 8})
    assert dr.state == "success"
    (n_enc,) = store_conn.one(sql.SQL("SELECT encoded FROM {} WHERE dag_run_id = %s").format(
        store_conn.t("batches")), (dr.run_id,))
    assert n_enc == 0
    # and a run that names the old model explicitly is refused with the way forward
    dr = dagbag.get_dag("reindex_corpus").test(run_conf={"corpus": corpus, "corpus_uri": str(tmp_path),
                                                          "model": "all-MiniLM-L6-v2"})
    assert dr.state == "failed"
