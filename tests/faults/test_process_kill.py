"""Fault 1: a task process killed with SIGKILL in the middle of its transaction — loading a vector block,
merging a corpus scan — then the stage run again, as Airflow's task retry runs it (same batch id, same
partition). The real stage code runs in a child process (``tests/faults/killable.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from psycopg import sql

from reindex import pipeline
from reindex.config import ReindexConfig
from reindex.store.vectors import ensure_embedding_store
from tests.faults.conftest import batch_row, check_invariants
from tests.faults.killable import HASH_SPEC, HashEncoder

pytestmark = pytest.mark.faults


def _jsonl(path: Path, n: int) -> list[str]:
    ids = [f"n{i:04d}" for i in range(n)]
    path.write_text("".join(json.dumps({"id": d, "text": f"note {d}: the tide tables for harbour {i % 37}"}) + "\n"
                            for i, d in enumerate(ids)), encoding="utf-8")
    return ids


def _register(store, corpus: str) -> None:
    with store.conn.transaction():
        ensure_embedding_store(store, corpus, HASH_SPEC)


def _complete(store, cfg: ReindexConfig, batch_id: str) -> list[dict]:
    """Encode every pending partition of the batch with the hash encoder (in this process); the outputs."""
    return [pipeline.encode_partition(store, cfg, part, model_checksum=HASH_SPEC.checksum, encoder=HashEncoder())
            for part in pipeline.plan(store, cfg, batch_id)]


def test_a_task_killed_mid_load_is_retried_into_a_complete_batch(store, store_uri, tmp_path, spawn):
    """600 chunks, one partition, blocks of 512: the task is killed inside block 2's transaction (its 88
    chunks flipped READY, their COPY not sent). Block 1 stays loaded, block 2 is rolled back — no chunk
    READY without its vector — and the retry loads exactly the 88 that are left."""
    corpus = "fault_kill_load"
    root = tmp_path / "kb"
    root.mkdir()
    ids = _jsonl(root / "notes.jsonl", 600)
    cfg = ReindexConfig(corpus=corpus, corpus_uri=str(root))
    _register(store, corpus)
    manifest = pipeline.chunk_corpus(store, cfg, root, batch_id="load-b1", model_checksum=HASH_SPEC.checksum)
    assert (manifest["documents"], manifest["chunks"], manifest["pending"]) == (600, 600, 600)
    (part,) = pipeline.plan(store, cfg, "load-b1")

    child = spawn(dsn=store_uri, schema=store.schema, app="fault-kill-load", config=cfg.to_dict(),
                  spec=HASH_SPEC.to_dict(), batch_id="load-b1", steps=["encode"], hang="load_block", block=2)
    child.wait_reached()
    at_kill = {"documents": {"OK": 600, "FAILED": 0}, "failed_documents": {},
               "chunks": {"READY": 512, "PENDING": 88, "FAILED": 0}, "failed_chunks": {}, "vectors": 512}
    assert check_invariants(store, corpus, final=False) == at_kill  # block 2's flips are not visible
    child.kill(store)
    assert check_invariants(store, corpus, final=False) == at_kill  # ... and were rolled back
    assert batch_row(store, "load-b1")["status"] == "RUNNING"

    # Airflow retries the task instance: the same partition, the same batch.
    out = pipeline.encode_partition(store, cfg, part, model_checksum=HASH_SPEC.checksum, encoder=HashEncoder())
    assert (out["chunks"], out["ready"], out["failed"]) == (88, 88, 0)
    summary = pipeline.finish_batch(store, cfg, "load-b1", HASH_SPEC.checksum)
    assert (summary.status.value, summary.total, summary.ready, summary.failed) == ("COMPLETED", 600, 600, 0)
    assert check_invariants(store, corpus, good_docs=ids) == {
        "documents": {"OK": 600, "FAILED": 0}, "failed_documents": {},
        "chunks": {"READY": 600, "PENDING": 0, "FAILED": 0}, "failed_chunks": {}, "vectors": 600}


def _lighthouses(root: Path) -> Path:
    """20 one-chunk documents ``d00.txt`` … ``d19.txt``."""
    root.mkdir()
    for i in range(20):
        (root / f"d{i:02d}.txt").write_text(
            f"Lighthouse {i} stands on a rock and warns ships with a light of period {i + 3} seconds.", encoding="utf-8")
    return root


def _edit_lighthouses(root: Path) -> None:
    """3 documents changed, 2 deleted, 4 added: 22 documents, 7 new texts."""
    for i in range(3):
        (root / f"d{i:02d}.txt").write_text(f"Lighthouse {i} was automated; its keeper left in {1950 + i}.",
                                           encoding="utf-8")
    for i in (18, 19):
        (root / f"d{i:02d}.txt").unlink()
    for i in range(20, 24):
        (root / f"d{i:02d}.txt").write_text(
            f"Lighthouse {i} is new: a steel tower with a solar-powered lantern number {i}.", encoding="utf-8")


def _check_edited_manifest(manifest: dict) -> None:
    assert {k: manifest[k] for k in ("documents", "unchanged_documents", "deleted_documents", "chunks", "pending",
                                     "reused")} == {"documents": 22, "unchanged_documents": 15,
                                                    "deleted_documents": 2, "chunks": 22, "pending": 7, "reused": 15}


def _check_edited_lighthouses(store, corpus: str) -> None:
    assert check_invariants(store, corpus, good_docs=[f"d{i:02d}.txt" for i in range(18)] + [
        f"d{i:02d}.txt" for i in range(20, 24)]) == {
        "documents": {"OK": 22, "FAILED": 0}, "failed_documents": {},
        "chunks": {"READY": 22, "PENDING": 0, "FAILED": 0}, "failed_chunks": {}, "vectors": 22}


def _snapshot(store, corpus: str) -> dict:
    """Every row the scan's merge may touch: documents, chunks, vectors, batches."""
    from reindex.store.vectors import get_embedding_store

    t = store.t
    emb = get_embedding_store(store, corpus)
    q = {
        "documents": sql.SQL("""SELECT doc_id, status, content_sha256, chunk_count, chunking, last_batch_id
            FROM {} WHERE corpus = %s ORDER BY doc_id""").format(t("documents")),
        "chunks": sql.SQL("""SELECT id, chunk_id, ordinal, content_sha256, embedding_status, retry_count, error_code,
            batch_id FROM {} WHERE corpus = %s ORDER BY id""").format(t("chunks")),
        "vectors": sql.SQL("""SELECT v.chunk_pk, v.content_sha256, v.embedding::text FROM {} v
            JOIN {} c ON c.id = v.chunk_pk WHERE c.corpus = %s ORDER BY 1""").format(t(emb.table_name), t("chunks")),
        "batches": sql.SQL("""SELECT batch_id, status, total, ready, failed FROM {} WHERE corpus = %s
            ORDER BY batch_id""").format(t("batches")),
    }
    return {name: store.execute(query, (corpus,)).fetchall() for name, query in q.items()}


def test_a_task_killed_mid_merge_leaves_the_store_as_it_was(store, store_uri, tmp_path, spawn):
    """An indexed corpus of 20 documents is edited (3 changed, 2 deleted, 4 added). The chunk task is killed
    after every statement of its merge ran, before the commit: documents, chunks, vectors and batches are
    exactly as before. The retry (same batch) merges and claims exactly the 7 new texts."""
    corpus = "fault_kill_merge"
    root = _lighthouses(tmp_path / "kb")
    cfg = ReindexConfig(corpus=corpus, corpus_uri=str(root))
    _register(store, corpus)
    pipeline.chunk_corpus(store, cfg, root, batch_id="merge-b1", model_checksum=HASH_SPEC.checksum)
    _complete(store, cfg, "merge-b1")
    assert pipeline.finish_batch(store, cfg, "merge-b1", HASH_SPEC.checksum).status.value == "COMPLETED"
    before = _snapshot(store, corpus)
    assert (len(before["documents"]), len(before["chunks"]), len(before["vectors"])) == (20, 20, 20)

    _edit_lighthouses(root)

    child = spawn(dsn=store_uri, schema=store.schema, app="fault-kill-merge", config=cfg.to_dict(),
                  spec=HASH_SPEC.to_dict(), batch_id="merge-b2", steps=["chunk"], hang="merge")
    child.wait_reached()
    assert _snapshot(store, corpus) == before  # the merge ran, uncommitted: nothing is visible
    child.kill(store)
    assert _snapshot(store, corpus) == before  # rolled back: the store is as it was
    check_invariants(store, corpus, final=False)
    # The lease was taken in its own transaction before the merge: the dead task's batch holds it, and only
    # that batch's retry (or a run that finds its DAG run over) takes the corpus.
    from reindex.store.leases import get_lease

    assert get_lease(store, corpus).batch_id == "merge-b2"

    manifest = pipeline.chunk_corpus(store, cfg, root, batch_id="merge-b2", model_checksum=HASH_SPEC.checksum)
    _check_edited_manifest(manifest)
    outs = _complete(store, cfg, "merge-b2")
    assert sum(o["ready"] for o in outs) == 7
    summary = pipeline.finish_batch(store, cfg, "merge-b2", HASH_SPEC.checksum)
    assert (summary.status.value, summary.total, summary.ready, summary.reused) == ("COMPLETED", 7, 7, 15)
    _check_edited_lighthouses(store, corpus)


def test_a_scan_shard_killed_mid_merge_is_retried_into_the_same_result(store, store_uri, tmp_path, spawn):
    """The sharded scan of an edited corpus (3 changed, 2 deleted, 4 added; one file per shard): a scan_shard task
    is killed after its merge ran, before its commit. Nothing of it is visible; the other shards' writes stand;
    nothing was deleted. Its retry, the other shards and finish_scan give exactly the single-task scan's counts,
    and the batch completes."""
    from reindex import scan

    corpus = "fault_kill_shard"
    root = _lighthouses(tmp_path / "kb")
    cfg = ReindexConfig(corpus=corpus, corpus_uri=str(root))
    _register(store, corpus)
    scan.sharded_scan(store, cfg, root, batch_id="shard-b1", model_checksum=HASH_SPEC.checksum, shard_bytes=1,
                      shard_files=1)
    _complete(store, cfg, "shard-b1")
    assert pipeline.finish_batch(store, cfg, "shard-b1", HASH_SPEC.checksum).status.value == "COMPLETED"

    _edit_lighthouses(root)
    listed = scan.list_corpus(store, cfg, root, batch_id="shard-b2", model_checksum=HASH_SPEC.checksum,
                              shard_bytes=1, shard_files=1)
    # the 15 untouched files are left unread; the 3 changed and 4 new ones are read, one per shard
    assert (listed["unchanged_files"], [s["entries"] for s in listed["shards"]]) == (15, [1] * 7)
    scan.scan_shard(store, cfg, root, batch_id="shard-b2", shard=1)  # d01.txt, changed
    before = _snapshot(store, corpus)

    child = spawn(dsn=store_uri, schema=store.schema, app="fault-kill-shard", config=cfg.to_dict(),
                  spec=HASH_SPEC.to_dict(), batch_id="shard-b2", steps=["shard"], shard=0, hang="shard_merge")
    child.wait_reached()
    assert _snapshot(store, corpus) == before  # shard 0 merged, uncommitted: nothing visible
    child.kill(store)
    assert _snapshot(store, corpus) == before  # rolled back; the two deleted documents are still there
    assert {"d18.txt", "d19.txt"} <= {r[0] for r in before["documents"]}

    for s in listed["shards"]:  # the killed shard's retry, and the rest (shard 1 again: nothing changes)
        scan.scan_shard(store, cfg, root, batch_id="shard-b2", shard=s["shard"])
    manifest = scan.finish_scan(store, cfg, batch_id="shard-b2", model_checksum=HASH_SPEC.checksum)
    _check_edited_manifest(manifest)
    assert sum(o["ready"] for o in _complete(store, cfg, "shard-b2")) == 7
    summary = pipeline.finish_batch(store, cfg, "shard-b2", HASH_SPEC.checksum)
    assert (summary.status.value, summary.total, summary.ready, summary.reused) == ("COMPLETED", 7, 7, 15)
    _check_edited_lighthouses(store, corpus)
