"""The benchmark suite's own pieces: the report renders the committed results, payloads are well formed."""

from __future__ import annotations

import json

from tests.conftest import ROOT


def test_report_renders_the_committed_results():
    from benchmarks.report import render

    results = json.loads((ROOT / "benchmarks" / "results" / "latest.json").read_text())
    text = render(results)
    for heading in ("**Result ingest**", "**Local encoding**", "**Incremental**", "**Airflow overhead**"):
        assert heading in text
    assert "| limit |" in text and "| project (local disk), 1 task at a time |" in text


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
