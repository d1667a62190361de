import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from reindex.corpus import CorpusReader, Document, FailedDocument
from reindex.errors import CorpusError, ErrorCode


def _read(root, **kw):
    reader = CorpusReader(root, **kw)
    items = list(reader)
    return {i.doc_id: i for i in items}, reader.stats


def test_reads_every_format_and_records_bad_documents(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("Первая заметка\r\nо Байкале\x07.\x00Конец", encoding="utf-8")
    (tmp_path / "b.md").write_text("# Title\n\nBody", encoding="utf-8")
    (tmp_path / "bad.txt").write_bytes(b"ok \xff\xfe broken")
    (tmp_path / ".hidden.txt").write_text("skip me")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    lines = [
        json.dumps({"id": "j1", "text": "json one", "metadata": {"lang": "en"}}),
        "{not json",
        json.dumps({"id": "j2"}),
        json.dumps({"text": "no id"}),
        "",
        json.dumps({"id": 7, "text": "numeric id", "topic": "x"}),
    ]
    (tmp_path / "docs.jsonl").write_text("\n".join(lines), encoding="utf-8")
    pq.write_table(pa.table({"id": ["p1", "p2"], "text": ["parquet one", "parquet two"], "lang": ["en", "ru"]}),
                   tmp_path / "rows.parquet")
    docs, stats = _read(tmp_path)

    assert docs["notes/a.txt"].text == "Первая заметка\nо Байкале . Конец"  # sanitized: controls → spaces
    assert docs["b.md"].text.startswith("# Title")
    assert isinstance(docs["bad.txt"], FailedDocument)
    assert docs["bad.txt"].error_code == ErrorCode.DECODE_ERROR
    assert "bad.txt: not valid UTF-8 at byte 3" in docs["bad.txt"].reason
    assert docs["j1"].metadata == {"lang": "en"}
    assert "docs.jsonl line 2: invalid JSON" in docs["docs.jsonl:2"].reason
    assert "line 3: missing or non-string 'text'" in docs["j2"].reason
    assert "line 4: missing or invalid 'id'" in docs["docs.jsonl:4"].reason
    assert docs["7"].metadata == {"topic": "x"}
    assert docs["p2"].text == "parquet two" and docs["p2"].metadata == {"lang": "ru"}
    assert ".hidden.txt" not in docs
    assert stats == {"files": 5, "skipped_files": 1, "skipped_links": 0, "alias_links": 0, "unreadable_dirs": 0}
    assert sum(isinstance(d, Document) for d in docs.values()) == 6


def test_parquet_without_required_columns_fails_with_reason(tmp_path):
    pq.write_table(pa.table({"id": ["a"], "body": ["x"]}), tmp_path / "x.parquet")
    docs, _ = _read(tmp_path)
    assert "lacks column(s) ['text']" in docs["x.parquet"].reason


def test_parquet_is_read_in_batches(tmp_path):
    n = 5000
    pq.write_table(pa.table({"id": [f"d{i}" for i in range(n)], "text": [f"text {i}" for i in range(n)]}),
                   tmp_path / "big.parquet", row_group_size=500)
    reader = CorpusReader(tmp_path / "big.parquet")
    it = iter(reader)
    first = next(it)
    assert first.doc_id == "d0"
    assert sum(1 for _ in it) == n - 1


def test_oversized_document_is_recorded_not_loaded(tmp_path):
    (tmp_path / "huge.txt").write_text("a" * 5000)
    docs, _ = _read(tmp_path, max_document_bytes=1024)
    assert docs["huge.txt"].error_code == ErrorCode.BAD_DOCUMENT
    assert "larger than max_document_bytes=1024" in docs["huge.txt"].reason


def test_missing_corpus_is_a_clear_error(tmp_path):
    with pytest.raises(CorpusError, match=r"corpus .*/nope does not exist"):
        list(CorpusReader(tmp_path / "nope"))
