"""``python -m reindex`` through a subprocess against the session's embedded PostgreSQL: answers in
words with exit status 2 (never a traceback) on a fresh store, an unknown corpus, an unreachable
store or a model not available offline; failed documents by reason and path in ``status``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest
from psycopg import sql

from reindex import pipeline
from reindex.config import ReindexConfig


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "reindex", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env or {})})


def _words(p: subprocess.CompletedProcess, code: int = 2) -> str:
    """The one-line answer on stderr; never a traceback."""
    assert p.returncode == code, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr + p.stdout
    return p.stderr.strip()


@pytest.fixture
def fresh_schema(store_uri):
    """A schema name nothing was ever created in (the store of a brand-new deployment)."""
    return f"fresh_{uuid.uuid4().hex[:10]}"


@pytest.mark.parametrize("command", [["status", "--corpus", "kb"], ["status", "--corpus", "kb", "--json"],
                                     ["search", "--corpus", "kb", "plants"], ["unlock", "--corpus", "kb"]])
def test_every_command_on_a_fresh_store_answers_in_words(fresh_schema, command):
    err = _words(_cli("--schema", fresh_schema, *command))
    assert err == (f"error: store schema {fresh_schema!r} has no reindex tables: nothing has been indexed there yet "
                   "(the first reindex_corpus run creates them; another schema: --schema)")


@pytest.mark.parametrize("command", [["status", "--corpus", "nope"], ["search", "--corpus", "nope", "plants"],
                                     ["unlock", "--corpus", "nope"]])
def test_an_unknown_corpus_in_an_empty_migrated_store(store, command):
    err = _words(_cli("--schema", store.schema, *command))
    assert err == f"error: corpus 'nope' is not in store schema {store.schema!r}: no corpus has been indexed there yet"


def test_an_unreachable_store_is_named_without_its_password():
    p = _cli("--dsn", "postgresql://reader:s3cret@127.0.0.1:1/reindex", "status", "--corpus", "kb")
    err = _words(p)
    assert err.startswith("error: cannot connect to the store ") and "port=1" in err and "127.0.0.1" in err
    assert "s3cret" not in err


@pytest.fixture
def indexed(store, tmp_path):
    """Corpus ``kb``: 2 good documents, a file that is not UTF-8, a JSONL with a line without text;
    chunked (vectors pending), its model registered."""
    root = tmp_path / "kb"
    root.mkdir()
    (root / "a.txt").write_text("Glaciers carve U-shaped valleys.", encoding="utf-8")
    (root / "b.md").write_text("# Bees\n\nBees pollinate apple blossoms.", encoding="utf-8")
    (root / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (root / "more.jsonl").write_text('{"id": "ok1", "text": "Лёд на Байкале прозрачный."}\n{"id": "notext"}\n',
                                     encoding="utf-8")
    cfg = ReindexConfig(corpus="kb", corpus_uri=str(root))
    prepared = pipeline.prepare(store, cfg)
    manifest = pipeline.chunk_corpus(store, cfg, root, batch_id="kb-b1", model_checksum=prepared["model_checksum"])
    return root, manifest


def test_status_lists_failed_documents_by_reason_and_path(store, indexed):
    root, manifest = indexed
    assert (manifest["documents"], manifest["failed_documents"]) == (3, 2)
    p = _cli("--schema", store.schema, "status", "--corpus", "kb", "--json")
    assert _words(p, 0) == ""
    st = json.loads(p.stdout)
    assert st["documents"] == {"OK": 3, "FAILED": 2}
    assert st["failed_documents_by_reason"] == {"BAD_DOCUMENT": 1, "DECODE_ERROR": 1}
    latin1, bad = st["failed_documents"]  # by doc_id
    assert (latin1["doc_id"], latin1["error_code"]) == ("latin1.txt", "DECODE_ERROR")
    assert latin1["source_uri"].endswith("/kb/latin1.txt")
    assert latin1["message"] == "latin1.txt: not valid UTF-8 at byte 3 (invalid continuation byte)"
    assert (bad["doc_id"], bad["error_code"]) == ("notext", "BAD_DOCUMENT")
    assert "more.jsonl" in bad["source_uri"] and bad["message"] == "more.jsonl line 2: missing or non-string 'text'"

    p = _cli("--schema", store.schema, "status", "--corpus", "kb")
    assert _words(p, 0) == ""
    out = p.stdout
    assert "  documents  3 ok, 2 failed\n    FAILED BAD_DOCUMENT: 1\n    FAILED DECODE_ERROR: 1\n" in out
    assert (f"      latin1.txt ({latin1['source_uri']}): DECODE_ERROR latin1.txt: not valid UTF-8 at byte 3 "
            "(invalid continuation byte)\n") in out
    assert f"      notext ({bad['source_uri']}): BAD_DOCUMENT more.jsonl line 2: missing or non-string 'text'\n" in out

    # only the first N, and the rest counted
    p = _cli("--schema", store.schema, "status", "--corpus", "kb", "--failed-documents", "1")
    assert _words(p, 0) == "" and "      … 1 more (--failed-documents N)\n" in p.stdout
    assert len(json.loads(_cli("--schema", store.schema, "status", "--corpus", "kb", "--json",
                               "--failed-documents", "0").stdout)["failed_documents"]) == 0


def test_unlock_of_a_known_corpus(store, indexed):
    from reindex.store import leases

    leases.release(store, "kb")  # whatever the chunking left: this test takes the lease itself
    p = _cli("--schema", store.schema, "unlock", "--corpus", "kb")
    assert _words(p, 0) == "" and p.stdout == "corpus 'kb' is not leased\n"
    assert leases.try_acquire(store, "kb", "kb-b1", "run-1") is None
    p = _cli("--schema", store.schema, "unlock", "--corpus", "kb")
    # the fixture's batch is still RUNNING with its 3 chunks unembedded: freed by hand, it is ABANDONED
    assert _words(p, 0) == "" and p.stdout == ("released corpus 'kb' from run run-1 (batch kb-b1, ABANDONED with 3 "
                                               "unfinished chunk(s) left for the next run)\n")
    assert leases.get_lease(store, "kb").free


def test_search_with_a_model_not_available_offline(store, indexed):
    err = _words(_cli("--schema", store.schema, "search", "--corpus", "kb", "--model", "acme/not-here", "plants"))
    assert err.startswith("error: model 'acme/not-here' is not available offline: no directory ")
    assert "models--acme--not-here does not exist" in err and "hf download acme/not-here" in err
    assert "local_files_only" not in err


def test_a_corpus_without_vectors_and_a_bad_k(store, indexed):
    store.execute(sql.SQL("UPDATE {} SET active_model_checksum = NULL").format(store.t("corpora")))
    err = _words(_cli("--schema", store.schema, "search", "--corpus", "kb", "plants"))
    assert err == "error: corpus 'kb' has no active model yet: no run has embedded it"
    p = _cli("--schema", store.schema, "status", "--corpus", "kb")
    assert _words(p, 0) == "" and "  model      none active yet (no run has registered one)\n" in p.stdout
    err = _words(_cli("--schema", store.schema, "search", "--corpus", "kb", "-k", "0", "plants"))
    assert "-k 0 is out of range: must be between 1 and 1000" in err
