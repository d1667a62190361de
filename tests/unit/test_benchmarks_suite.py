"""The benchmark suite's own pieces: the report renders the committed results, payloads are well formed."""

from __future__ import annotations

import json
import struct

import numpy as np

from tests.conftest import ROOT


def test_report_renders_the_committed_results():
    from benchmarks.report import render

    results = json.loads((ROOT / "benchmarks" / "results" / "latest.json").read_text())
    text = render(results)
    for heading in ("**Result ingest**", "**Local encoding**", "**Incremental**", "**Airflow overhead**"):
        assert heading in text
    assert "| limit |" in text and "| project (local disk) |" in text


def test_halfvec_payload_rows_are_pgvector_binary():
    from benchmarks.ingest import halfvec_payload

    vec = np.array([[0.5, -1.0, 2.0]], dtype=np.float16)
    row = halfvec_payload(np.array([7], np.int64), ["a" * 64], vec)
    nfields, len_pk, pk, len_sha = struct.unpack("!hiqi", row[:18])
    assert (nfields, len_pk, pk, len_sha) == (3, 8, 7, 64)
    len_vec, dim, unused = struct.unpack("!ihh", row[82:90])
    assert (len_vec, dim, unused) == (4 + 2 * 3, 3, 0)
    assert np.frombuffer(row[90:], dtype=">f2").tolist() == [0.5, -1.0, 2.0]


def test_texts_are_mixed_russian_and_english():
    from benchmarks.texts import make_texts

    texts = make_texts(20, seed=0, min_chars=40, max_chars=400)
    assert len(set(texts)) == 20
    assert any(any("а" <= ch <= "я" for ch in t) for t in texts[1::2])
    assert all(20 <= len(t) <= 400 for t in texts)
