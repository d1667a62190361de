"""The benchmark suite's own pieces: the report renders the committed results, payloads are well formed."""

from __future__ import annotations

import json

from tests.conftest import ROOT


def test_report_renders_the_committed_results():
    from benchmarks.report import render

    results = json.loads((ROOT / "benchmarks" / "results" / "latest.json").read_text())
    text = render(results)
    for heading in ("**Result ingest**", "**Local encoding**", "**Incremental**", "**Airflow overhead**",
                    "**Corpus scan**", "**Remote embedding service**"):
        assert heading in text
    assert "| limit |" in text and "| project (local disk), 1 task at a time |" in text
    assert "| 2. same corpus, unchanged |" in text and "**Extrapolation**" in text
    assert "| service, concurrency 6 |" in text and "| noop service, concurrency 6 (client overhead) |" in text


def test_texts_are_mixed_russian_and_english():
    from benchmarks.texts import make_texts

    texts = make_texts(20, seed=0, min_chars=40, max_chars=400)
    assert len(set(texts)) == 20
    assert any(any("а" <= ch <= "я" for ch in t) for t in texts[1::2])
    assert all(20 <= len(t) <= 400 for t in texts)


def test_padded_tokens_counts_each_request_sorted_apart():
    import numpy as np

    from benchmarks.service import padded_tokens

    lengths = np.array([10, 2, 9, 3, 8, 1])
    # One call over all six: sorted 10 9 8 | 3 2 1 → 3·10 + 3·3.
    assert padded_tokens(lengths, 3, 6) == 39
    # Requests of two, each sorted apart into one batch: 2·10 + 2·9 + 2·8.
    assert padded_tokens(lengths, 3, 2) == 54
    # A last request shorter than the batch is padded only to its own texts.
    assert padded_tokens(lengths, 4, 4) == 4 * 10 + 2 * 8


def test_scan_corpus_is_one_small_file_per_document_and_edits_are_undone(tmp_path):
    from benchmarks import scan

    root = tmp_path / "corpus"
    size = scan.write_txt_corpus(root, 1_500, seed=3)
    files = sorted(root.rglob("*.txt"))
    assert [p.parent.name for p in (files[0], files[999], files[1000], files[-1])] == ["f00000", "f00000", "f00001",
                                                                                     "f00001"]
    assert len(files) == 1_500 and sum(p.stat().st_size for p in files) == size
    texts = [p.read_text() for p in files]
    assert len(set(texts)) == 1_500 and texts[1_234].startswith("#1234.")
    assert all(scan.MIN_CHARS <= len(t) <= scan.MAX_CHARS for t in texts)

    chosen = scan.choose_edits(1_500, 0.01, seed=1)
    assert len(chosen) == 15 and chosen == sorted(set(chosen))
    before = {i: scan.doc_path(root, i).read_bytes() for i in chosen}
    scan.edit_documents(root, chosen, night=1)
    assert all(scan.doc_path(root, i).read_bytes().endswith(b"the text changed here.") for i in chosen)
    scan.restore_documents(root, 1_500, chosen, seed=3)
    assert {i: scan.doc_path(root, i).read_bytes() for i in chosen} == before

    # the store-free floors: the walk names every file unchanged and opens none; the read opens all
    walk = scan.worker({"task": "walk", "corpus_uri": str(root)})
    read = scan.worker({"task": "read", "corpus_uri": str(root)})
    assert (walk["files"], walk["read_files"], walk["unchanged_files"], walk["documents"]) == (1_500, 0, 1_500, 0)
    assert (read["files"], read["read_files"], read["documents"], read["chars"]) == (1_500, 1_500, 1_500,
                                                                                    sum(map(len, texts)))


def test_scan_sharded_mode_at_a_tiny_size_matches_the_single_task_scan(tmp_path, store_uri):
    """The sharded runs' processes (list, concurrent scan tasks taking the shards round-robin, finish) against the
    store: the same documents, chunks and claim as ``chunk_corpus``; unchanged, no shard and no file read."""
    import math
    import uuid

    from benchmarks import scan

    root = tmp_path / "corpus"
    size = scan.write_txt_corpus(root, 40, seed=5)
    tag = uuid.uuid4().hex[:8]
    schemas = [f"bench_scan_{tag}_{k}" for k in ("single", "sharded")]
    base = {"uri": store_uri, "corpus": scan.CORPUS, "corpus_uri": str(root)}
    shard_bytes = math.ceil(size / 4)
    try:
        single = scan._scan("single", {**base, "schema": schemas[0]}, "b-single")
        sharded = scan._sharded_scan("sharded", {**base, "schema": schemas[1]}, "b-1", 3, shard_bytes, 20_000)
        assert (sharded["shards"], sharded["processes"], sharded["task_shards"]) == (4, 3, [2, 1, 1])
        keys = ("documents", "chunks", "rechunked_chunks", "pending", "read_files")
        assert {k: sharded[k] for k in keys} == {k: single[k] for k in keys}
        assert (sharded["documents"], sharded["read_files"], sharded["shard_read_files"]) == (40, 40, 40)
        assert sharded["seconds"] == round(sharded["list_s"] + sharded["shards_s"] + sharded["finish_s"], 3)
        assert sharded["shard_rss_mib"] > 0 and sharded["rss_mib"] >= sharded["shard_rss_mib"]

        # unchanged: the listing leaves every file unread, so there is no shard and no scan-task process
        unchanged = scan._sharded_scan("unchanged", {**base, "schema": schemas[1]}, "b-2", 3, shard_bytes, 20_000)
        assert (unchanged["shards"], unchanged["processes"], unchanged["read_files"], unchanged["unchanged_files"],
                unchanged["documents"], unchanged["shards_s"]) == (0, 0, 0, 40, 40, 0.0)
        assert unchanged["pending"] == single["chunks"]  # no vectors were loaded: every chunk is claimed again

    finally:
        for schema in schemas:
            scan._drop_schema(store_uri, schema)
