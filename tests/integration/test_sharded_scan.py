"""The sharded scan against the single-task scan: the same corpus, through the same sequence of changes (additions,
edits that grow and shrink documents, deletions, a moved file, duplicate ids across files and shards, a bad
line inside a split .jsonl, a .parquet split by row groups), scanned by ``pipeline.chunk_corpus`` into one store
and by ``reindex.scan`` with tiny shards into another, then encoded with the real model: documents, chunks,
vectors, remembered file fingerprints and the manifests must be identical. Also: an unchanged second run opens no
file, a shard rerun changes nothing, deletions wait for every shard, a run that lost the corpus cannot write."""

from __future__ import annotations

import json
import os
import shutil
import threading

import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from psycopg import sql

from reindex import pipeline, scan
from reindex.config import ReindexConfig
from reindex.corpus import CorpusReader, split_large_file
from reindex.errors import StoreError
from reindex.store import Store, leases
from tests.conftest import fresh_store

from .test_change_detection import Opened

TEXT = ("Glaciers carve valleys as they grind down mountain slopes. Honey bees pollinate apple blossoms and dance. "
        "The Baltic Sea is brackish because rivers bring fresh water. Lighthouses rotate their lenses at night. ")


@pytest.fixture
def store2(store_uri):
    with fresh_store(store_uri) as s:
        yield s


def _jsonl(path, records: list, bad_at: int | None = None) -> None:
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    if bad_at is not None:
        lines.insert(bad_at, "{not json")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _initial(root) -> None:
    root.mkdir()
    for i in range(8):
        (root / f"note{i}.txt").write_text(f"Note {i}. " + TEXT * (1 + i % 3), encoding="utf-8")
    (root / "sub").mkdir()
    (root / "sub" / "guide.md").write_text("# Guide\n\n" + TEXT, encoding="utf-8")
    # listed first: its line with id "note1.txt" is the first occurrence of that id (the .txt file's is a duplicate)
    _jsonl(root / "a_lines.jsonl",
           [{"id": f"j{i}", "text": f"Line {i} about otters and rivers. " * (1 + i % 4)} for i in range(40)]
           + [{"id": "note1.txt", "text": "A JSON line that claims the id of a text file."},
              {"id": "j3", "text": "The same id again inside the file: the first is kept."}], bad_at=25)
    table = pa.table({"id": [f"p{i}" for i in range(24)], "text": [f"Parquet row {i} about owls. " * 3 for i in range(24)]})
    pq.write_table(table, root / "rows.parquet", row_group_size=6)
    # the last file repeats an id of the first .jsonl: the earlier occurrence wins, whatever shard commits first
    _jsonl(root / "z_late.jsonl", [{"id": "j7", "text": "A later duplicate of j7."}, {"id": "z1", "text": "Zed."}])


def _change(root) -> None:
    (root / "note0.txt").write_text("Note 0 grew. " + TEXT * 6, encoding="utf-8")  # more chunks
    (root / "note2.txt").write_text("Note 2 shrank.", encoding="utf-8")  # fewer chunks: orphans go
    (root / "note4.txt").unlink()
    (root / "moved").mkdir()
    shutil.move(root / "note5.txt", root / "moved" / "note5.txt")  # a new id, the same text: its vectors reused
    (root / "note8.txt").write_text("A new note about sourdough and starters.", encoding="utf-8")
    _jsonl(root / "a_lines.jsonl",
           [{"id": f"j{i}", "text": f"Line {i} about otters and rivers. " * (1 + i % 4)} for i in range(5, 46)],
           bad_at=3)  # j0-j4 and note1.txt's line are gone: the .txt file's note1 is the only one now
    os.utime(root / "sub" / "guide.md")  # touched, the same content: read again, nothing re-chunked


def _rows(store: Store, corpus: str) -> dict:
    t = store.t
    docs = store.execute(sql.SQL("""SELECT doc_id, source_uri, content_sha256, status, error_code, error_message,
        chunk_count, chunking, metadata FROM {} WHERE corpus = %s ORDER BY doc_id""").format(t("documents")),
        (corpus,)).fetchall()
    chunks = store.execute(sql.SQL("""SELECT chunk_id, doc_id, ordinal, content_sha256, token_count, embedding_status,
        error_code FROM {} WHERE corpus = %s ORDER BY chunk_id""").format(t("chunks")), (corpus,)).fetchall()
    (table,) = store.one(sql.SQL("SELECT table_name FROM {} WHERE corpus = %s").format(t("embedding_stores")),
                         (corpus,))
    vectors = store.execute(sql.SQL("""SELECT c.chunk_id, e.content_sha256, e.embedding::text FROM {emb} e
        JOIN {chunks} c ON c.id = e.chunk_pk ORDER BY c.chunk_id""").format(emb=t(table), chunks=t("chunks"))).fetchall()
    files = store.execute(sql.SQL("SELECT source_uri, fingerprint, chunking FROM {} WHERE corpus = %s ORDER BY 1")
                          .format(t("corpus_files")), (corpus,)).fetchall()
    return {"documents": docs, "chunks": chunks, "vectors": vectors, "files": files}


_RUN_ONLY = {"batch_id", "seconds", "vector_table", "shards", "split_files", "config"}


def single_task_run(store, cfg, root, batch: str, encoder) -> dict:
    """The reference: today's single-task scan, then every partition encoded in this process."""
    return _run(store, cfg, root, batch, encoder, sharded=False)


def compare_stores(got: Store, want: Store, corpus: str, got_manifest: dict, want_manifest: dict) -> None:
    """Documents, chunks (with their statuses), remembered fingerprints and manifests equal; vectors of the same
    chunks and texts, equal within float rounding (encoded in other processes, in other batches)."""
    assert {k: v for k, v in got_manifest.items() if k not in _RUN_ONLY} == \
        {k: v for k, v in want_manifest.items() if k not in _RUN_ONLY}
    same_rows(got, want, corpus)


def same_rows(got: Store, want: Store, corpus: str) -> None:
    """Documents, chunks, fingerprints equal; vectors of the same chunks and texts, equal within float rounding
    (the same texts batched differently)."""
    import numpy as np

    a, b = _rows(got, corpus), _rows(want, corpus)
    for key in ("documents", "chunks", "files"):
        assert a[key] == b[key], key
    assert [r[:2] for r in a["vectors"]] == [r[:2] for r in b["vectors"]]
    va = np.array([json.loads(r[2]) for r in a["vectors"]])
    vb = np.array([json.loads(r[2]) for r in b["vectors"]])
    assert va.shape == vb.shape and float(np.abs(va - vb).max()) < 1e-5


def _run(store, cfg, root, batch: str, encoder, *, sharded: bool, shard_bytes: int = 300,
         reverse: bool = False) -> dict:
    prepared = pipeline.prepare(store, cfg)
    if sharded:
        checksum = prepared["model_checksum"]
        listed = scan.list_corpus(store, cfg, root, batch_id=batch, model_checksum=checksum,
                                  shard_bytes=shard_bytes, shard_files=3)
        # in reverse, every later occurrence of a duplicate id is written first and then taken over
        for s in sorted(listed["shards"], key=lambda s: s["shard"], reverse=reverse):
            scan.scan_shard(store, cfg, root, batch_id=batch, shard=s["shard"])
        manifest = scan.finish_scan(store, cfg, batch_id=batch, model_checksum=checksum)
    else:
        manifest = pipeline.chunk_corpus(store, cfg, root, batch_id=batch, model_checksum=prepared["model_checksum"])
    for p in pipeline.plan(store, cfg, batch):
        pipeline.encode_partition(store, cfg, p, model_checksum=prepared["model_checksum"], encoder=encoder)
    pipeline.finish_batch(store, cfg, batch, prepared["model_checksum"])
    leases.release(store, cfg.corpus, batch)
    return manifest


@pytest.mark.parametrize("reverse", [False, True], ids=["shards-in-order", "shards-in-reverse"])
def test_sharded_scan_equals_the_single_task_scan(store, store2, tmp_path, encoder, monkeypatch, reverse):
    """In reverse, the shard of z_late.jsonl commits before the one with j7's first occurrence, and note1.txt's
    (three chunks) before the .jsonl line that owns the id (one chunk): the chunks written by the later occurrence
    and deleted again are no deletion of the store's (``deleted_chunks`` as in the single-task scan)."""
    root = tmp_path / "kb"
    _initial(root)
    cfg = ReindexConfig(corpus="shard", corpus_uri=str(root), max_tokens=32, overlap_tokens=4)
    opened = Opened(monkeypatch)

    single = _run(store, cfg, root, "s1", encoder, sharded=False)
    opened.paths.clear()
    sharded = _run(store2, cfg, root, "m1", encoder, sharded=True, reverse=reverse)
    assert sharded["shards"] > 5 and sharded["split_files"] == 2  # the first .jsonl by bytes, the parquet by groups
    assert opened.paths.count("a_lines.jsonl") > 1 and opened.paths.count("rows.parquet") > 1
    assert {k: v for k, v in sharded.items() if k not in _RUN_ONLY} == \
        {k: v for k, v in single.items() if k not in _RUN_ONLY}
    assert single["duplicate_documents"] == 3  # note1.txt, the second j3, z_late's j7
    same_rows(store2, store, "shard")
    docs = {r[0]: r for r in _rows(store2, "shard")["documents"]}
    assert docs["note1.txt"][1].endswith("a_lines.jsonl") and docs["j7"][1].endswith("a_lines.jsonl")
    bad = [d for d in docs.values() if d[3] == "FAILED"]
    assert [(d[0], d[4]) for d in bad] == [("a_lines.jsonl:26", "BAD_DOCUMENT")]  # line numbers across parts

    _change(root)
    single = _run(store, cfg, root, "s2", encoder, sharded=False)
    sharded = _run(store2, cfg, root, "m2", encoder, sharded=True, reverse=reverse)
    assert {k: v for k, v in sharded.items() if k not in _RUN_ONLY} == \
        {k: v for k, v in single.items() if k not in _RUN_ONLY}
    # note4, note5 (moved), j0-j4 and the old bad line's failure (a_lines.jsonl:26; the bad line is now line 4)
    assert sharded["deleted_documents"] == 8 and sharded["reused_by_content"] >= 1
    assert sharded["deleted_chunks"] > sharded["deleted_documents"]  # note2's orphaned chunks too
    same_rows(store2, store, "shard")

    # the bad line fixed (a file with a failed document is read by every scan until it has none)
    _jsonl(root / "a_lines.jsonl",
           [{"id": f"j{i}", "text": f"Line {i} about otters and rivers. " * (1 + i % 4)} for i in range(5, 46)])
    single = _run(store, cfg, root, "s3", encoder, sharded=False)
    sharded = _run(store2, cfg, root, "m3", encoder, sharded=True, reverse=reverse)
    assert {k: v for k, v in sharded.items() if k not in _RUN_ONLY} == \
        {k: v for k, v in single.items() if k not in _RUN_ONLY}
    same_rows(store2, store, "shard")

    # nothing changed: no content read at all (not even to split a large file), nothing written but the batch
    opened.paths.clear()
    again = _run(store2, cfg, root, "m4", encoder, sharded=True, reverse=reverse)
    assert opened.paths == []
    assert (again["read_files"], again["shards"], again["pending"], again["deleted_documents"]) == (0, 0, 0, 0)
    assert again["unchanged_files"] == again["files"] == 12
    same_rows(store2, store, "shard")


def test_shard_rerun_is_idempotent_and_deletions_wait_for_every_shard(store, tmp_path):
    root = tmp_path / "kb"
    _initial(root)
    cfg = ReindexConfig(corpus="idem", corpus_uri=str(root), max_tokens=32, overlap_tokens=4)
    checksum = pipeline.prepare(store, cfg)["model_checksum"]
    scan.sharded_scan(store, cfg, root, batch_id="i1", model_checksum=checksum, shard_bytes=300, shard_files=3)
    leases.release(store, cfg.corpus, "i1")
    (root / "note3.txt").unlink()
    listed = scan.list_corpus(store, cfg, root, batch_id="i2", model_checksum=checksum, shard_bytes=300, shard_files=3)
    shards = [s["shard"] for s in listed["shards"]]
    scan.scan_shard(store, cfg, root, batch_id="i2", shard=shards[0])
    with pytest.raises(StoreError, match=r"scan shard\(s\) \[1, 2"):
        scan.finish_scan(store, cfg, batch_id="i2", model_checksum=checksum)
    assert "note3.txt" in _documents(store, "idem")  # not deleted by any shard
    assert leases.get_lease(store, "idem").batch_id is None  # a refused close ends the run: the corpus is free
    assert leases.try_acquire(store, "idem", "i2") is None
    for s in shards:
        scan.scan_shard(store, cfg, root, batch_id="i2", shard=s)
    rerun = scan.scan_shard(store, cfg, root, batch_id="i2", shard=shards[1])
    assert rerun["changed_chunks"] == 0 and rerun["documents"] > 0
    manifest = scan.finish_scan(store, cfg, batch_id="i2", model_checksum=checksum)
    assert manifest["deleted_documents"] == 1 and "note3.txt" not in _documents(store, "idem")
    assert scan.finish_scan(store, cfg, batch_id="i2", model_checksum=checksum) == manifest  # recorded, not redone
    with pytest.raises(StoreError, match="already closed"):
        scan.scan_shard(store, cfg, root, batch_id="i2", shard=shards[0])
    # a run that lost the corpus writes nothing
    leases.release(store, cfg.corpus, "i2")
    scan.list_corpus(store, cfg, root, batch_id="i3", model_checksum=checksum, shard_bytes=300, shard_files=3)
    leases.release(store, cfg.corpus, "i3")
    leases.try_acquire(store, cfg.corpus, "other")
    with pytest.raises(StoreError, match="no longer holds corpus 'idem'"):
        scan.scan_shard(store, cfg, root, batch_id="i3", shard=0)


def _paused_shard(uri: str, store, cfg, root, batch: str, shard: int, monkeypatch):
    """Run ``scan_shard`` in a thread on a connection of its own; it stops after its merge, before its commit,
    until the returned event is set. Returns ``(thread, merged, resume, outcome)``."""
    merged, resume, outcome = threading.Event(), threading.Event(), {}
    merge = scan.scan_store.merge_shard

    def paused_merge(s, corpus, batch_id):
        out = merge(s, corpus, batch_id)
        if threading.current_thread().name == "paused-shard":
            merged.set()
            assert resume.wait(30), "the test never resumed the paused shard"
        return out

    monkeypatch.setattr(scan.scan_store, "merge_shard", paused_merge)

    def run():
        with psycopg.connect(uri, autocommit=True) as conn:
            try:
                outcome["result"] = scan.scan_shard(Store(conn, store.schema), cfg, root, batch_id=batch, shard=shard)
            except Exception as exc:  # noqa: BLE001 - handed to the test
                outcome["error"] = exc

    thread = threading.Thread(target=run, name="paused-shard", daemon=True)
    thread.start()
    assert merged.wait(30), outcome.get("error")
    return thread, resume, outcome


def test_shards_run_concurrently_and_a_lost_lease_stops_a_shard_in_flight(store, store_uri, tmp_path, monkeypatch):
    """A shard mid-transaction holds no lock another shard waits for (the lease heartbeat commits apart); a lease
    freed meanwhile stops the shard at its commit, with nothing of it written. (No id repeats across shards here:
    a shard meeting an id another shard has merged uncommitted does wait for it, by design.)"""
    root = tmp_path / "kb"
    root.mkdir()
    for i in range(9):
        (root / f"note{i}.txt").write_text(f"Note {i}. " + TEXT * (1 + i % 3), encoding="utf-8")
    cfg = ReindexConfig(corpus="conc", corpus_uri=str(root), max_tokens=32, overlap_tokens=4)
    checksum = pipeline.prepare(store, cfg)["model_checksum"]
    listed = scan.list_corpus(store, cfg, root, batch_id="c1", model_checksum=checksum, shard_bytes=300,
                              shard_files=3)
    first, *rest = [s["shard"] for s in listed["shards"]]
    thread, resume, outcome = _paused_shard(store_uri, store, cfg, root, "c1", first, monkeypatch)
    store.execute("SET lock_timeout = '5s'")  # a shard waiting on the paused one would fail here, not hang
    try:
        for s in rest:
            assert scan.scan_shard(store, cfg, root, batch_id="c1", shard=s)["documents"] > 0
    finally:
        resume.set()
        thread.join(30)
    assert "error" not in outcome and outcome["result"]["shard"] == first
    manifest = scan.finish_scan(store, cfg, batch_id="c1", model_checksum=checksum)
    assert manifest["shards"] == len(rest) + 1 and manifest["deleted_documents"] == 0
    leases.release(store, cfg.corpus, "c1")

    # the lease is freed by hand while a shard is in flight: the shard fails at its commit and writes nothing
    (root / "note2.txt").write_text("Note 2, rewritten while its shard was in flight. " + TEXT, encoding="utf-8")
    listed = scan.list_corpus(store, cfg, root, batch_id="c2", model_checksum=checksum, shard_bytes=300,
                              shard_files=3)
    before = _rows(store, "conc")
    thread, resume, outcome = _paused_shard(store_uri, store, cfg, root, "c2", listed["shards"][0]["shard"], monkeypatch)
    try:
        assert leases.free(store, cfg.corpus, "c2", "freed by the test") is not None  # not blocked by the shard
    finally:
        resume.set()
        thread.join(30)
    assert isinstance(outcome.get("error"), StoreError) and "no longer holds corpus 'conc'" in str(outcome["error"])
    assert _rows(store, "conc") == before
    store.execute("RESET lock_timeout")


def _documents(store, corpus) -> set[str]:
    return {r[0] for r in store.execute(sql.SQL("SELECT doc_id FROM {} WHERE corpus = %s").format(
        store.t("documents")), (corpus,))}


def test_large_jsonl_parts_cover_every_line_once(tmp_path):
    path = tmp_path / "big.jsonl"
    lines = [json.dumps({"id": f"d{i}", "text": "x" * (i % 50)}) for i in range(500)]
    path.write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    parts = split_large_file(path, "big.jsonl", path.stat().st_size, 1000)
    assert len(parts) > 10 and parts[0]["start"] == 0 and parts[-1]["stop"] == path.stat().st_size
    assert all(a["stop"] == b["start"] for a, b in zip(parts, parts[1:], strict=False))
    reader = CorpusReader(path)
    whole = [d.doc_id for d in reader]
    from reindex.corpus import ListedFile

    pieces = [d.doc_id for p in parts for d in reader.read_listed(ListedFile("big.jsonl", str(path), part=p))]
    assert pieces == whole and len(whole) == 500
    assert [p["line"] for p in parts] == [1 + path.read_bytes()[:p["start"]].count(b"\n") for p in parts]
