"""Fault 8: every bad path of a real-world corpus in one folder next to good documents, through a
``dag.test()`` run of reindex_corpus: each bad path is one failed document with its reason, links that
would loop or leave the root are not followed, and every good document is READY exactly once."""

from __future__ import annotations

import errno
import json
import os
import pathlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from psycopg import sql

from tests.faults.conftest import check_invariants, last_batch, ti_states

pytestmark = [pytest.mark.faults, pytest.mark.e2e]

GOOD = ["a/one.txt", "b.md", "deep/c/d.txt", "j1", "j3", "p1", "p2", "p3"]


@pytest.fixture
def hostile(tmp_path):
    """The corpus folder ``kb`` (next to it, outside the root: ``secret.txt``)."""
    root = tmp_path / "kb"
    (root / "a").mkdir(parents=True)
    (root / "deep" / "c").mkdir(parents=True)
    (root / "private").mkdir()
    (root / "a" / "one.txt").write_text("Gannets dive into the sea at sixty miles an hour.", encoding="utf-8")
    (root / "b.md").write_text("# Terns\n\nArctic terns fly from pole to pole every year.", encoding="utf-8")
    (root / "deep" / "c" / "d.txt").write_text("Kittiwakes nest on narrow cliff ledges.", encoding="utf-8")
    (root / "private" / "p.txt").write_text("behind a folder nobody may list", encoding="utf-8")
    (root / "locked.txt").write_text("a file nobody may read", encoding="utf-8")
    (root / "notes.jsonl").write_bytes(b"\n".join([
        json.dumps({"id": "j1", "text": "Shearwaters glide low over the waves."}).encode(),
        b'{"id": "j2", "text": ',  # cut off mid-record
        json.dumps({"id": "j3", "text": "Fulmars spit oil at intruders."}).encode(),
        b'{"id": "j4", "text": "caf\xe9"}',  # Latin-1, not UTF-8
        json.dumps({"id": "j5"}).encode(),  # no text
    ]) + b"\n")
    pq.write_table(pa.table({"id": ["p1", "p2", "p3"], "text": ["Skuas chase other birds for their catch.",
                                                                "Razorbills raise one chick a year.",
                                                                "Shags have green eyes."]}), root / "table.parquet")
    (root / "corrupt.parquet").write_bytes(b"PAR1 this is not a parquet file")
    (root / "latin1.txt").write_bytes("Café des oiseaux".encode("latin-1"))
    (root / "binary.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00")
    (root / "empty.txt").write_bytes(b"")
    (root / "image.png").write_bytes(b"\x89PNG\r\n")  # not a supported type: skipped, not a document
    (root / "loop.txt").symlink_to("loop.txt")  # a symlink loop
    (root / "a" / "up").symlink_to("..")  # a folder loop
    (root / "dangling.md").symlink_to("gone.md")  # a broken link
    (tmp_path / "secret.txt").write_text("outside the corpus", encoding="utf-8")
    (root / "outside.txt").symlink_to(tmp_path / "secret.txt")  # a link out of the root: skipped
    return root


@pytest.fixture
def denied(hostile, monkeypatch):
    """``locked.txt`` cannot be opened and ``private/`` cannot be listed, as for a user without the permission.

    The tests run as root, whom the kernel lets read any file whatever its mode, so the refusal is made here:
    the corpus reader's ``os.scandir`` and ``Path.open`` raise the ``PermissionError`` the kernel would. (The
    reader against real permission bits, as an unprivileged user: tests/unit/test_corpus_failures.py.)
    """
    import reindex.corpus

    locked, private = os.fspath(hostile / "locked.txt"), os.fspath(hostile / "private")

    class DeniedOs:
        def __getattr__(self, name):
            return getattr(os, name)

        @staticmethod
        def scandir(path):
            if os.fspath(path) == private:
                raise PermissionError(errno.EACCES, "Permission denied", private)
            return os.scandir(path)

    real_open = pathlib.Path.open

    def open_or_deny(self, *args, **kwargs):
        if os.fspath(self) == locked:
            raise PermissionError(errno.EACCES, "Permission denied", locked)
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(reindex.corpus, "os", DeniedOs())
    monkeypatch.setattr(pathlib.Path, "open", open_or_deny)
    return hostile


def test_every_bad_path_fails_alone_next_to_good_documents(corpus_dag, store_conn, denied):
    corpus = "fault_hostile"
    dr = corpus_dag.test(corpus=corpus, corpus_uri=str(denied))
    assert dr.state == "success", ti_states(dr)
    assert ti_states(dr)["done"] == "success"  # failed documents are recorded, chunks all READY: within the ratio

    failed = {r[0]: (r[1], r[2]) for r in store_conn.execute(sql.SQL("""SELECT doc_id, error_code, error_message
        FROM {} WHERE corpus = %s AND status = 'FAILED'""").format(store_conn.t("documents")), (corpus,)).fetchall()}
    assert set(failed) == {"loop.txt", "dangling.md", "locked.txt", "private/", "corrupt.parquet", "latin1.txt",
                           "binary.txt", "empty.txt", "notes.jsonl:2", "notes.jsonl:4", "j5"}
    exact = {
        "loop.txt": ("UNREADABLE", "loop.txt: symlink loop (too many levels of symbolic links)"),
        "dangling.md": ("UNREADABLE", "dangling.md: does not exist (a broken symlink, or removed during the scan)"),
        "locked.txt": ("UNREADABLE", "locked.txt: not readable: permission denied"),
        "private/": ("UNREADABLE", "private/: folder not readable (permission denied); nothing under it was read"),
        "binary.txt": ("DECODE_ERROR", "binary.txt: not valid UTF-8 at byte 0 (invalid start byte)"),
        "empty.txt": ("BAD_DOCUMENT", "empty.txt: no text to index"),
        "j5": ("BAD_DOCUMENT", "notes.jsonl line 5: missing or non-string 'text'"),
    }
    assert {k: failed[k] for k in exact} == exact
    prefixes = {
        "corrupt.parquet": ("UNREADABLE", "corrupt.parquet: not a readable parquet file (ArrowInvalid: "),
        "latin1.txt": ("DECODE_ERROR", "latin1.txt: not valid UTF-8 at byte 3 "),
        "notes.jsonl:2": ("BAD_DOCUMENT", "notes.jsonl line 2: invalid JSON ("),
        "notes.jsonl:4": ("DECODE_ERROR", "notes.jsonl line 4: invalid JSON (str is not valid UTF-8"),
    }
    for doc_id, (code, start) in prefixes.items():
        assert failed[doc_id][0] == code and failed[doc_id][1].startswith(start), (doc_id, failed[doc_id])

    counts = check_invariants(store_conn, corpus, good_docs=GOOD)
    assert counts == {"documents": {"OK": 8, "FAILED": 11},
                      "failed_documents": {"BAD_DOCUMENT": 3, "DECODE_ERROR": 3, "UNREADABLE": 5},
                      "chunks": {"READY": 8, "PENDING": 0, "FAILED": 0}, "failed_chunks": {}, "vectors": 8}
    docs = {r[0] for r in store_conn.execute(sql.SQL("SELECT doc_id FROM {} WHERE corpus = %s").format(
        store_conn.t("documents")), (corpus,)).fetchall()}
    assert docs == set(GOOD) | set(failed)  # nothing through a/up, outside.txt, image.png, private/p.txt
    batch = last_batch(store_conn, corpus)
    assert (batch["status"], batch["total"], batch["ready"], batch["failed"]) == ("COMPLETED_WITH_ERRORS", 8, 8, 0)
