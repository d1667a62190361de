"""A corpus on GCS (``gs://``) read through Airflow's ObjectStoragePath and gcsfs, against the GCS emulator."""

from __future__ import annotations

import pytest

from reindex.store.search import corpus_status

pytestmark = pytest.mark.e2e

BUCKET = "reindex-batches"  # the emulators fixture's bucket


def _bucket():
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    return storage.Client(project="emulator", credentials=AnonymousCredentials()).bucket(BUCKET)


def _states(dr) -> dict:
    return {ti.task_id: ti.state for ti in dr.get_task_instances()}


def test_a_gs_corpus_is_read_chunked_and_embedded(dagbag, corpus_dag, vertex_env, store_conn):
    bucket = _bucket()
    for i in range(13):
        bucket.blob(f"kb/doc{i:02d}.txt").upload_from_string(f"Client document {i}: the {i}th note.")
    bucket.blob("kb/sub/notes.md").upload_from_string("# Notes\n\nA markdown document in a sub-folder.")
    bucket.blob("kb/skip.csv").upload_from_string("a,b")
    conf = {"corpus": "gs_kb", "corpus_uri": f"gs://{BUCKET}/kb/", "backend": "local"}
    dr = corpus_dag.test(run_conf=conf)
    assert dr.state == "success", _states(dr)
    st = corpus_status(store_conn, "gs_kb")
    assert st["documents"] == {"OK": 14, "FAILED": 0} and st["chunks"] == {"READY": 14, "PENDING": 0, "FAILED": 0}

    # Unchanged objects (same generation and md5 in the listing) are not read again.
    dr = corpus_dag.test(run_conf=conf)
    assert dr.state == "success", _states(dr)
    manifest = dr.get_task_instance("finish_scan").xcom_pull(task_ids="finish_scan")
    assert (manifest["read_files"], manifest["unchanged_files"], manifest["documents"]) == (0, 14, 14)
    assert manifest["shards"] == 0  # nothing to read: no scan task at all

    # An object rewritten with the same bytes has a new generation: read again, its document unchanged by content.
    bucket.blob("kb/doc03.txt").upload_from_string("Client document 3: the 3th note.")
    bucket.blob("kb/doc04.txt").upload_from_string("Client document 4, edited.")
    dr = corpus_dag.test(run_conf=conf)
    assert dr.state == "success", _states(dr)
    manifest = dr.get_task_instance("finish_scan").xcom_pull(task_ids="finish_scan")
    assert (manifest["read_files"], manifest["unchanged_files"], manifest["unchanged_documents"]) == (2, 12, 13)
    assert manifest["pending"] == 1


def test_an_object_that_vanishes_mid_scan_fails_alone(vertex_env, monkeypatch):
    """Listed, then deleted before it is read: that document fails UNREADABLE with the reason; the rest is read."""
    from reindex.corpus import CorpusReader, Document, FailedDocument
    from reindex_airflow.tasks import corpus_root

    bucket = _bucket()
    for i in range(3):
        bucket.blob(f"vanish/d{i}.txt").upload_from_string(f"document {i}")
    original = CorpusReader._read_text_file

    def read(reader, path, doc_id, suffix):
        if doc_id == "d1.txt":
            bucket.blob("vanish/d1.txt").delete()  # gone between the listing and the read
        return original(reader, path, doc_id, suffix)

    monkeypatch.setattr(CorpusReader, "_read_text_file", read)
    items = list(CorpusReader(corpus_root(f"gs://{BUCKET}/vanish/")))
    assert [d.doc_id for d in items if isinstance(d, Document)] == ["d0.txt", "d2.txt"]
    (failed,) = [d for d in items if isinstance(d, FailedDocument)]
    assert failed.doc_id == "d1.txt" and failed.error_code == "UNREADABLE" and "not readable" in failed.reason


def test_a_denied_object_fails_alone_and_keeps_its_document(dagbag, corpus_dag, vertex_env, store_conn):
    """An object the reader may list but not read (403, as with a listing-only role): its document fails
    UNREADABLE with the reason, every other document is READY, and once it can be read again the next run
    heals it."""
    from psycopg import sql

    from reindex.emulators.gcs import denied_downloads

    bucket = _bucket()
    for i in range(4):
        bucket.blob(f"denied/d{i}.txt").upload_from_string(f"Shared document {i} about tide tables.")
    conf = {"corpus": "gs_denied", "corpus_uri": f"gs://{BUCKET}/denied/", "backend": "local"}
    assert corpus_dag.test(run_conf=conf).state == "success"
    bucket.blob("denied/d2.txt").upload_from_string("Shared document 2, edited, now restricted.")
    with denied_downloads([f"{BUCKET}/denied/d2.txt"]):
        dr = corpus_dag.test(run_conf=conf)
    assert dr.state == "success", _states(dr)
    rows = dict(store_conn.execute(sql.SQL("""SELECT doc_id, status || ':' || coalesce(error_code, '') || ':' ||
        coalesce(error_message, '') FROM {} WHERE corpus = 'gs_denied'""").format(store_conn.t("documents"))).fetchall())
    assert set(rows) == {"d0.txt", "d1.txt", "d2.txt", "d3.txt"}
    assert rows["d2.txt"] == ("FAILED:UNREADABLE:d2.txt: not readable: permission denied (caller does not have "
                              "storage.objects.get access to the Google Cloud Storage object "
                              f"{BUCKET}/denied/d2.txt)")
    st = corpus_status(store_conn, "gs_denied")
    assert st["chunks"] == {"READY": 3, "PENDING": 0, "FAILED": 0}  # a failed document has no chunk
    # readable again: the next run reads it (a file with a failed document is always read) and heals it
    dr = corpus_dag.test(run_conf=conf)
    assert dr.state == "success"
    st = corpus_status(store_conn, "gs_denied")
    assert st["documents"] == {"OK": 4, "FAILED": 0} and st["chunks"] == {"READY": 4, "PENDING": 0, "FAILED": 0}
