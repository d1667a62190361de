"""Reading a corpus: a directory tree (or one file) of .txt, .md, .jsonl and .parquet documents.

The root is any path-like object with ``iterdir``/``is_dir``/``open`` (``pathlib.Path`` here,
Airflow's ``ObjectStoragePath`` for ``file://`` and ``gs://`` URIs in the DAG). Documents are
yielded one at a time; .jsonl is read line by line and .parquet in record batches, so a corpus
never sits in memory. A document that cannot be read becomes a ``FailedDocument`` with its
reason and the rest of the corpus proceeds.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from reindex.errors import CorpusError, ErrorCode
from reindex.sanitize import decode_utf8, sanitize_text

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md")
SUPPORTED_SUFFIXES = (*TEXT_SUFFIXES, ".jsonl", ".parquet")
PARQUET_BATCH_ROWS = 1024


class CorpusPath(Protocol):
    name: str

    def iterdir(self) -> Iterator[CorpusPath]: ...
    def is_dir(self) -> bool: ...
    def is_file(self) -> bool: ...
    def exists(self) -> bool: ...
    def open(self, mode: str = "r"): ...


@dataclass(frozen=True, slots=True)
class Document:
    doc_id: str
    text: str
    source_uri: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class FailedDocument:
    doc_id: str
    source_uri: str
    error_code: ErrorCode
    reason: str


def _suffix(path: CorpusPath) -> str:
    name = path.name.lower()
    dot = name.rfind(".")
    return name[dot:] if dot > 0 else ""


def _walk(root: CorpusPath) -> Iterator[CorpusPath]:
    """Files under ``root`` in a stable (sorted) order; hidden files and folders are skipped."""
    for child in sorted(root.iterdir(), key=lambda p: p.name):
        if child.name.startswith("."):
            continue
        if child.is_dir():
            yield from _walk(child)
        else:
            yield child


def _relative_id(path: CorpusPath, root: CorpusPath) -> str:
    p, r = str(path), str(root)
    if p.startswith(r.rstrip("/") + "/"):
        return p[len(r.rstrip("/")) + 1 :]
    return path.name


class CorpusReader:
    """Iterates the documents of a corpus. ``stats`` counts files read and skipped afterwards."""

    def __init__(self, root: CorpusPath, *, max_document_bytes: int = 64 * 1024 * 1024) -> None:
        self.root = root
        self.max_document_bytes = max_document_bytes
        self.stats: dict[str, int] = {"files": 0, "skipped_files": 0}

    def __iter__(self) -> Iterator[Document | FailedDocument]:
        root = self.root
        if not root.exists():
            raise CorpusError(f"corpus {root} does not exist")
        files = _walk(root) if root.is_dir() else iter([root])
        for path in files:
            suffix = _suffix(path)
            if suffix not in SUPPORTED_SUFFIXES:
                self.stats["skipped_files"] += 1
                log.info("skipping %s: unsupported type (supported: %s)", path, ", ".join(SUPPORTED_SUFFIXES))
                continue
            self.stats["files"] += 1
            rel = _relative_id(path, root) if root.is_dir() else path.name
            if suffix in TEXT_SUFFIXES:
                yield self._read_text_file(path, rel)
            elif suffix == ".jsonl":
                yield from self._read_jsonl(path, rel)
            else:
                yield from self._read_parquet(path, rel)

    def _read_text_file(self, path: CorpusPath, doc_id: str) -> Document | FailedDocument:
        uri = str(path)
        with path.open("rb") as f:
            data = f.read(self.max_document_bytes + 1)
        if len(data) > self.max_document_bytes:
            return FailedDocument(
                doc_id, uri, ErrorCode.BAD_DOCUMENT,
                f"{doc_id}: larger than max_document_bytes={self.max_document_bytes}",
            )
        try:
            text = decode_utf8(data, doc_id)
        except UnicodeDecodeError as e:
            return FailedDocument(doc_id, uri, ErrorCode.DECODE_ERROR, e.reason)
        return Document(doc_id, sanitize_text(text), uri, {"format": _suffix(path)[1:]})

    def _read_jsonl(self, path: CorpusPath, rel: str) -> Iterator[Document | FailedDocument]:
        uri = str(path)
        with path.open("rb") as f:
            for lineno, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                where = f"{rel} line {lineno}"
                if len(raw) > self.max_document_bytes:
                    yield FailedDocument(
                        f"{rel}:{lineno}", uri, ErrorCode.BAD_DOCUMENT,
                        f"{where}: larger than max_document_bytes={self.max_document_bytes}",
                    )
                    continue
                try:
                    obj = orjson.loads(raw)
                except orjson.JSONDecodeError as e:
                    code = ErrorCode.DECODE_ERROR if "utf-8" in str(e).lower() else ErrorCode.BAD_DOCUMENT
                    yield FailedDocument(f"{rel}:{lineno}", uri, code, f"{where}: invalid JSON ({e})")
                    continue
                yield self._from_record(obj, f"{rel}:{lineno}", where, uri)

    def _read_parquet(self, path: CorpusPath, rel: str) -> Iterator[Document | FailedDocument]:
        import pyarrow.parquet as pq

        uri = str(path)
        with path.open("rb") as f:
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
            missing = {"id", "text"} - set(names)
            if missing:
                yield FailedDocument(
                    rel, uri, ErrorCode.BAD_DOCUMENT,
                    f"{rel}: parquet file lacks column(s) {sorted(missing)} (needs 'id' and 'text')",
                )
                return
            row = 0
            for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS):
                for rec in batch.to_pylist():
                    row += 1
                    yield self._from_record(rec, f"{rel}:{row}", f"{rel} row {row}", uri)

    def _from_record(self, obj: Any, fallback_id: str, where: str, uri: str) -> Document | FailedDocument:
        if not isinstance(obj, dict):
            return FailedDocument(fallback_id, uri, ErrorCode.BAD_DOCUMENT, f"{where}: not a JSON object")
        doc_id, text = obj.get("id"), obj.get("text")
        if isinstance(doc_id, bool) or not isinstance(doc_id, str | int) or str(doc_id) == "":
            return FailedDocument(fallback_id, uri, ErrorCode.BAD_DOCUMENT, f"{where}: missing or invalid 'id'")
        doc_id = str(doc_id)
        if isinstance(text, bytes):
            try:
                text = decode_utf8(text, where)
            except UnicodeDecodeError as e:
                return FailedDocument(doc_id, uri, ErrorCode.DECODE_ERROR, e.reason)
        if not isinstance(text, str):
            return FailedDocument(doc_id, uri, ErrorCode.BAD_DOCUMENT, f"{where}: missing or non-string 'text'")
        if len(text) > self.max_document_bytes:
            return FailedDocument(
                doc_id, uri, ErrorCode.BAD_DOCUMENT,
                f"{where}: text larger than max_document_bytes={self.max_document_bytes}",
            )
        metadata = obj.get("metadata")
        if not isinstance(metadata, dict):
            metadata = {k: v for k, v in obj.items() if k not in ("id", "text") and _jsonable(v)}
        return Document(doc_id, sanitize_text(text), uri, metadata)


def _jsonable(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool | list | dict)
