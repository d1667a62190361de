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
