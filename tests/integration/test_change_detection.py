"""Change detection before reading: a file whose source fingerprint (size, mtime, inode, ctime) is as when it was
last read in full is not opened at all; additions, edits, deletions, moves, a touch, a new chunking, ``force`` and
files with a failed document are read. Reads are counted independently of the reader's own counters."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from psycopg import sql

from reindex import pipeline
from reindex.config import ReindexConfig
from reindex.corpus import CorpusReader
from reindex.store import leases


class Opened:
    """Counts the files the reader opens (text files, .jsonl and .parquet), whatever its own counters say."""

    def __init__(self, monkeypatch) -> None:
        self.paths: list[str] = []
        for name in ("_read_text_file", "_read_jsonl", "_read_parquet"):
            original = getattr(CorpusReader, name)

            def wrapped(reader, path, *args, _original=original, **kwargs):
                self.paths.append(os.path.basename(str(path)))
                return _original(reader, path, *args, **kwargs)

            monkeypatch.setattr(CorpusReader, name, wrapped)


def _corpus(root) -> None:
    root.mkdir(exist_ok=True)
    for i in range(6):
        (root / f"note{i}.txt").write_text(f"Note {i}: glaciers, bees and lighthouses, part {i}.", encoding="utf-8")
    (root / "sub").mkdir(exist_ok=True)
    (root / "sub" / "guide.md").write_text("# Guide\n\nHow the sub-folder guide reads.", encoding="utf-8")
    (root / "lines.jsonl").write_text("\n".join(json.dumps({"id": f"j{i}", "text": f"JSON line {i} about otters."})
                                                for i in range(4)) + "\n", encoding="utf-8")
    pq.write_table(pa.table({"id": ["p0", "p1"], "text": ["Parquet row about owls.", "Parquet row about seals."]}),
                   root / "rows.parquet")


def _scan(store, cfg, root, batch: str) -> dict:
    prepared = pipeline.prepare(store, cfg)
    manifest = pipeline.chunk_corpus(store, cfg, root, batch_id=batch, model_checksum=prepared["model_checksum"])
    leases.release(store, cfg.corpus, batch)  # no encode here: give the corpus back for the next scan
    return manifest


def _docs(store, corpus: str) -> dict[str, tuple[str, str]]:
    return {r[0]: (r[1], r[2]) for r in store.execute(sql.SQL(
        "SELECT doc_id, content_sha256, status FROM {} WHERE corpus = %s").format(store.t("documents")), (corpus,))}


@pytest.fixture
def cfg(tmp_path):
    return ReindexConfig(corpus="cd", corpus_uri=str(tmp_path / "kb"))


def test_an_unchanged_scan_opens_no_file(store, cfg, tmp_path, monkeypatch):
    root = tmp_path / "kb"
    _corpus(root)
    opened = Opened(monkeypatch)
    first = _scan(store, cfg, root, "b1")
    assert (first["documents"], first["read_files"], first["unchanged_files"]) == (13, 9, 0)
    assert len(opened.paths) == 9
    before = _docs(store, "cd")

    opened.paths.clear()
    second = _scan(store, cfg, root, "b2")
    assert opened.paths == []  # not one file opened: listings and the store only
    assert (second["read_files"], second["unchanged_files"], second["unchanged_documents"]) == (0, 9, 13)
    assert (second["documents"], second["deleted_documents"], second["rechunked_chunks"]) == (13, 0, 0)
    assert _docs(store, "cd") == before


def test_edits_additions_deletions_moves_and_touches_are_read(store, cfg, tmp_path, monkeypatch):
    root = tmp_path / "kb"
    _corpus(root)
    _scan(store, cfg, root, "b1")
    opened = Opened(monkeypatch)
    (root / "note0.txt").write_text("Note 0 rewritten: a new text about comets.", encoding="utf-8")  # edit
    (root / "note1.txt").unlink()  # deletion
    (root / "note2.txt").rename(root / "moved2.txt")  # a move: new path, same content
    (root / "new.txt").write_text("A new note about volcanoes.", encoding="utf-8")  # addition
    os.utime(root / "note3.txt", ns=(1, 1))  # a touch: metadata changed, content not
    m = _scan(store, cfg, root, "b2")
    assert sorted(opened.paths) == ["moved2.txt", "new.txt", "note0.txt", "note3.txt"]
    assert (m["read_files"], m["unchanged_files"], m["deleted_documents"]) == (4, 5, 2)
    docs = _docs(store, "cd")
    assert "note1.txt" not in docs and "note2.txt" not in docs and {"moved2.txt", "new.txt"} <= set(docs)
    assert len(docs) == 13

    # the touched file was read once; with its new fingerprint remembered, the next scan leaves it alone
    opened.paths.clear()
    m = _scan(store, cfg, root, "b3")
    assert opened.paths == [] and m["unchanged_files"] == 9


def test_force_a_new_chunking_and_failed_documents_read_again(store, cfg, tmp_path, monkeypatch):
    root = tmp_path / "kb"
    _corpus(root)
    with (root / "lines.jsonl").open("a", encoding="utf-8") as f:
        f.write("{not json\n")  # a failed document: its file is read by every scan until it is fixed
    _scan(store, cfg, root, "b1")
    opened = Opened(monkeypatch)
    m = _scan(store, cfg, root, "b2")
    assert opened.paths == ["lines.jsonl"] and m["failed_documents"] == 1

    opened.paths.clear()
    forced = ReindexConfig(corpus="cd", corpus_uri=str(root), force=True)
    m = _scan(store, forced, root, "b3")
    assert len(opened.paths) == 9 and m["unchanged_files"] == 0

    opened.paths.clear()
    rechunked = ReindexConfig(corpus="cd", corpus_uri=str(root), max_tokens=64, overlap_tokens=8)
    m = _scan(store, rechunked, root, "b4")
    assert len(opened.paths) == 9 and m["read_files"] == 9
    opened.paths.clear()
    m = _scan(store, rechunked, root, "b5")
    assert opened.paths == ["lines.jsonl"]
