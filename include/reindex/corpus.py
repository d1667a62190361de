"""Reading a corpus: a directory tree (or one file) of .txt, .md, .jsonl and .parquet documents.

The root is any path-like object with ``iterdir``/``is_dir``/``open`` (``pathlib.Path`` here,
Airflow's ``ObjectStoragePath`` for ``file://`` and ``gs://`` URIs in the DAG). Documents are
yielded one at a time; .jsonl is read line by line and .parquet one row group at a time in record
batches, so a corpus never sits in memory.

One bad path never sinks a corpus: whatever cannot be read becomes a ``FailedDocument`` with its
reason and the scan goes on —

- a file that cannot be opened or read (permission denied, symlink loop, broken symlink, I/O
  error): one failure with the file's relative path as ``doc_id``;
- a folder that cannot be listed: one failure with ``doc_id`` = its relative path + ``/``
  (``private/``); nothing under it is read this run;
- a file that is not UTF-8 (``DECODE_ERROR``), a .jsonl line that is not a JSON object with
  ``id`` and ``text``, a document over ``max_document_bytes`` (``BAD_DOCUMENT``);
- a .parquet file whose footer or schema cannot be read (not parquet, truncated, no ``id`` /
  ``text`` column): one failure for the file, with pyarrow's message;
- a parquet row group that cannot be decoded: the rows read before the error stay, the rest of
  that row group is one failure (``<file>:row-group-<n>``, 1-based, naming the rows lost) and the
  next row group is read;
- a .jsonl/.txt read that breaks in the middle: the lines read stay, the rest of the file is one
  failure (``doc_id`` = the file's relative path).

Only a root that cannot be listed at all raises ``CorpusError`` (a whole corpus of failures would
look like "every document was deleted" to the store). ``check_corpus_root`` is the cheap check to
run before anything is written.

Symbolic links (local corpora: ``pathlib.Path`` and ``file://``; object stores have none):

- the corpus root itself may be a link: it is what the caller named;
- a link whose real target (``os.path.realpath``) lies outside the corpus root's real path is
  skipped, logged and counted in ``stats['skipped_links']`` — a corpus never reads beyond its root;
- a link whose target lies inside the root under visible names is an alias: the scan reaches the
  target by its own path anyway, so the link is not followed (``stats['alias_links']``). Every
  file is therefore read once, under one stable ``doc_id`` that does not depend on links or on
  the walk order, and a link to a parent (``a/up -> ..``) cannot make the walk loop;
- a link whose target lies inside the root under a hidden name (``.`` prefix: the scan skips
  those) is followed and read under the link's path — the layout of Kubernetes ConfigMap and
  Secret volumes (``kb.md -> ..data/kb.md``). Directories reached that way are recorded by real
  path and never visited twice, files reached that way are read once;
- a link that loops (``loop.txt -> loop.txt``) or dangles is a failure of that path.

Hidden files and folders (``.`` prefix) are skipped. Files and folders are visited in sorted
name order; a local walk lists each folder once with ``os.scandir`` and needs no ``stat`` per
file (only links are resolved).

Change detection (``CorpusReader(..., unchanged=…)``): each file's source fingerprint is taken from
metadata only — local: size, mtime, inode and ctime (one ``stat``); object stores: size with the
generation / md5 / crc32c of the listing — and offered to the ``unchanged`` callback in blocks; a file
it names is not opened at all (a ``SourceFile(unchanged=True)`` marker stands for its documents), the
others are read and followed by a ``SourceFile`` marker carrying the fingerprint to remember.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from operator import attrgetter
from pathlib import PurePath
from typing import Any, Protocol

import orjson

from reindex.errors import CorpusError, EmptyCorpusError, ErrorCode
from reindex.sanitize import decode_utf8, sanitize_text

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md")
SUPPORTED_SUFFIXES = (*TEXT_SUFFIXES, ".jsonl", ".parquet")
PARQUET_BATCH_ROWS = 1024
# The code of a path that could not be read at all (permission, symlink loop, unreadable folder,
# I/O error, corrupt container). ``ErrorCode`` has no dedicated member yet; the reason text says
# which of these it was.
UNREADABLE_CODE: ErrorCode = ErrorCode.UNREADABLE
_LOGGED_LINKS = 20  # skipped links logged one by one; the rest only counted (a summary line at the end)


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


@dataclass(frozen=True, slots=True)
class SourceFile:
    """A file of the corpus as listed: ``unchanged`` — not read, its stored documents stand; else it was just
    read (its documents came before this marker) and ``fingerprint`` is what to remember for the next scan
    (None: the file could not be read, or its metadata gives no fingerprint — it is read every time)."""

    rel: str
    uri: str
    fingerprint: str | None
    unchanged: bool = False


def source_fingerprint(path: CorpusPath) -> str | None:
    """What identifies a file's content version without reading it, or None when nothing does.

    Local: ``size:mtime_ns:inode:ctime_ns`` (ctime also moves on chmod and on edits that restore the mtime).
    Object stores (fsspec info from the listing, no extra request where the listing is cached): the size
    with the object generation, md5 or crc32c (any of them changes with the content)."""
    return source_meta(path)[0]


def source_meta(path: CorpusPath) -> tuple[str | None, int]:
    """``(fingerprint, size in bytes)`` of a file from its metadata (see ``source_fingerprint``); the size is 0
    when the metadata cannot be had (the file is then read, and its own error reported there)."""
    local = _local_path(path)
    try:
        if local is not None:
            st = os.stat(local)
            return f"file:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}:{st.st_ctime_ns}", st.st_size
        fs = getattr(path, "fs", None)
        info = fs.info(path.path) if fs is not None else None
    except Exception:  # noqa: BLE001 - no fingerprint: the file is read (and its own error reported there)
        return None, 0
    if not isinstance(info, dict):
        return None, 0
    size = int(info.get("size") or 0)
    marks = [str(info.get(k)) for k in ("generation", "md5Hash", "crc32c", "ETag", "etag") if info.get(k)]
    if not marks:
        return None, size
    return f"object:{info.get('size')}:" + ":".join(marks), size


@dataclass(frozen=True, slots=True)
class ListedFile:
    """One entry of a corpus listing (``CorpusReader.listing``), in the scan's order.

    A supported file with its metadata (``fingerprint``, ``size``), or a path that cannot be read
    (``problem``: a file's reason, or — ``rel`` ending in ``/`` — the whole reason of a folder that cannot be
    listed). ``part`` names one share of a large file read by a shard of its own (``split_large_file``): a
    .jsonl byte range ``{"start", "stop", "line"}`` (the 1-based number of its first line) or .parquet row
    groups ``{"groups": [first, stop], "row"}`` (rows before the first group)."""

    rel: str
    uri: str
    fingerprint: str | None = None
    size: int = 0
    problem: str | None = None
    part: dict | None = None


def _suffix(name: str) -> str:
    name = name.lower()
    dot = name.rfind(".")
    return name[dot:] if dot > 0 else ""


def _error_text(e: BaseException) -> str:
    """A one-line reason for an exception raised while reading a path."""
    if isinstance(e, PermissionError):
        return "permission denied"
    if isinstance(e, OSError) and str(e).startswith("Forbidden:"):
        # gcsfs's 403: "Forbidden: <request URL>\n<the service's message>"
        detail = " ".join(str(e).split("\n", 1)[1].split()) if "\n" in str(e) else ""
        return f"permission denied ({detail})" if detail else "permission denied"
    code = getattr(e, "errno", None)
    if code == errno.ELOOP:
        return "symlink loop (too many levels of symbolic links)"
    if isinstance(e, FileNotFoundError):
        return "does not exist (a broken symlink, or removed during the scan)"
    text = " ".join(str(e).split())  # pyarrow messages span lines
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _local_path(path: CorpusPath) -> str | None:
    """The OS path of a local corpus path (``pathlib`` or a ``file://`` ObjectStoragePath), else None."""
    if isinstance(path, PurePath):
        return os.fspath(path)
    if getattr(path, "protocol", None) in ("file", "local"):
        local = getattr(path, "path", None)
        return local if isinstance(local, str) else None
    return None


def _root_is_dir(root: CorpusPath, where: str) -> bool:
    """Whether the root is a folder (else a single file); ``CorpusError`` naming what is wrong."""
    local = _local_path(root)
    if local is not None:
        try:
            return stat.S_ISDIR(os.stat(local).st_mode)
        except (FileNotFoundError, NotADirectoryError):
            raise CorpusError(f"{where} does not exist") from None
        except OSError as e:
            raise CorpusError(f"{where} is not readable: {_error_text(e)}") from None
    try:
        if not root.exists():
            raise CorpusError(f"{where} does not exist")
        return root.is_dir()
    except CorpusError:
        raise
    except Exception as e:
        raise CorpusError(f"{where} is not readable: {_error_text(e)}") from None


@dataclass(slots=True)
class _Dir:
    path: CorpusPath
    local: str | None  # the OS path it is listed by (through links, as reached), local corpora only
    rel: str  # relative to the root, "" for the root
    real: str | None  # its real path, when reached through a followed link (else not needed)
    linked: bool  # reached through a followed link: its folders and files are recorded by real path


# What the walk yields for a file: its path, its relative path, and why it cannot be read (or None).
_FileEntry = tuple[CorpusPath, str, str | None]


class _Walker:
    """Files under a root folder in sorted order, with the symlink policy of the module docstring.

    Yields ``(path, rel, problem)`` per file (any type; ``problem`` is set for a link that loops,
    dangles or cannot be resolved) and a ``FailedDocument`` per folder that cannot be listed.
    Raises ``CorpusError`` when the root itself cannot be listed.
    """

    def __init__(self, root: CorpusPath, stats: dict[str, int], where: str, *, log_links: bool = True) -> None:
        self.root = root
        self.stats = stats
        self.where = where
        self.log_links = log_links
        self.local = _local_path(root)
        self.root_real = os.path.realpath(self.local) if self.local is not None else None
        if self.root_real is not None:
            self.root_prefix = self.root_real.rstrip("/") + "/"
        # real paths of the folders and files reached through followed links (hidden targets only:
        # everything else is reached once by the plain walk, which is a tree)
        self.linked_dirs: set[str] = set()
        self.linked_files: set[str] = set()

    def __iter__(self) -> Iterator[_FileEntry | FailedDocument]:
        stack = [self._entries(_Dir(self.root, self.local, "", None, False))]
        while stack:
            item = next(stack[-1], None)
            if item is None:
                stack.pop()
            elif isinstance(item, _Dir):
                stack.append(self._entries(item))  # depth first, in place: the old sorted order
            else:
                yield item

    def _list_failed(self, d: _Dir, e: Exception) -> FailedDocument:
        if not d.rel:
            raise CorpusError(f"{self.where} is not readable: cannot list its root folder ({_error_text(e)})") from None
        self.stats["unreadable_dirs"] += 1
        return FailedDocument(d.rel + "/", str(d.path), UNREADABLE_CODE,
                              f"{d.rel}/: folder not readable ({_error_text(e)}); nothing under it was read")

    def _entries(self, d: _Dir) -> Iterator[_Dir | _FileEntry | FailedDocument]:
        if d.local is None:
            yield from self._remote_entries(d)
            return
        try:
            with os.scandir(d.local) as it:
                entries = sorted(it, key=attrgetter("name"))
        except OSError as e:
            yield self._list_failed(d, e)
            return
        for entry in entries:
            name = entry.name
            if name.startswith("."):
                continue
            rel = f"{d.rel}/{name}" if d.rel else name
            child = d.path / name
            try:
                # both answered from the directory entry's d_type: no stat for a plain file
                if entry.is_symlink():
                    yield from self._link(child, entry.path, rel)
                    continue
                is_dir = entry.is_dir(follow_symlinks=False)
            except OSError as e:
                yield child, rel, _error_text(e)
                continue
            if not d.linked:  # the plain walk is a tree: nothing to record
                yield _Dir(child, entry.path, rel, None, False) if is_dir else (child, rel, None)
                continue
            real = f"{d.real.rstrip('/')}/{name}"  # below a resolved link: no syscall needed
            seen = self.linked_dirs if is_dir else self.linked_files
            if real in seen:
                self.stats["alias_links"] += 1
                continue
            seen.add(real)
            yield _Dir(child, entry.path, rel, real, True) if is_dir else (child, rel, None)

    def _link(self, child: CorpusPath, local: str, rel: str) -> Iterator[_Dir | _FileEntry]:
        try:
            real = os.path.realpath(local, strict=True)
        except OSError as e:  # ELOOP, a dangling target, a target folder we may not traverse
            yield child, rel, _error_text(e)
            return
        if real != self.root_real and not real.startswith(self.root_prefix):
            self.stats["skipped_links"] += 1
            if self.log_links:
                level = logging.WARNING if self.stats["skipped_links"] <= _LOGGED_LINKS else logging.DEBUG
                log.log(level, "skipping %s: symlink to %s, outside the corpus root %s", local, real, self.root_real)
            return
        inner = real[len(self.root_prefix):] if real != self.root_real else ""
        if not any(part.startswith(".") for part in inner.split("/")):
            # the plain walk reaches (or reached) the target by its own path: read it there, once
            self.stats["alias_links"] += 1
            return
        try:
            is_dir = os.path.isdir(real)
        except OSError as e:  # pragma: no cover - isdir swallows OSError; kept for exotic filesystems
            yield child, rel, _error_text(e)
            return
        seen = self.linked_dirs if is_dir else self.linked_files
        if real in seen:
            self.stats["alias_links"] += 1
            return
        seen.add(real)
        if is_dir:
            yield _Dir(child, local, rel, real, True)
        else:
            yield child, rel, None

    def _remote_entries(self, d: _Dir) -> Iterator[_Dir | _FileEntry | FailedDocument]:
        """An object store (or any non-local ``CorpusPath``): no symlinks, one listing per folder."""
        try:
            children = sorted(d.path.iterdir(), key=attrgetter("name"))
        except Exception as e:
            yield self._list_failed(d, e)
            return
        for child in children:
            name = child.name
            if name.startswith("."):
                continue
            rel = f"{d.rel}/{name}" if d.rel else name
            try:
                is_dir = child.is_dir()  # object stores answer from the cached listing
            except Exception as e:
                yield child, rel, _error_text(e)
                continue
            yield _Dir(child, None, rel, None, False) if is_dir else (child, rel, None)


def check_corpus_root(root: CorpusPath, corpus_name: str, uri: str) -> None:
    """Refuse a corpus that cannot give a single document, before anything is written.

    Raises ``CorpusError`` when ``root`` does not exist, cannot be read (permission denied,
    symlink loop, its root folder cannot be listed), or holds supported files none of which can
    be opened; ``EmptyCorpusError`` (a ``CorpusError``) when it holds no .txt/.md/.jsonl/.parquet
    document at all — the message names the corpus, the URI, and what was skipped. Cheap: the
    walk stops at the first supported file that opens (one ``open``, nothing read); only a corpus
    without one is walked to the end. Contents are not validated: a corrupt or non-UTF-8 document
    still becomes a failed document of the run.
    """
    where = f"corpus {corpus_name!r} at {uri}"
    if not _root_is_dir(root, where):
        if _suffix(root.name) not in SUPPORTED_SUFFIXES:
            raise EmptyCorpusError(f"{where} is empty: it is a single file of an unsupported type, not a "
                                   ".txt, .md, .jsonl or .parquet document")
        try:
            with root.open("rb"):
                pass
        except Exception as e:
            raise CorpusError(f"{where} is not readable: {_error_text(e)}") from None
        return
    stats = _new_stats()
    unreadable: list[str] = []
    for item in _Walker(root, stats, where, log_links=False):
        if isinstance(item, FailedDocument):
            unreadable.append(item.reason)
            continue
        path, rel, problem = item
        if _suffix(path.name) not in SUPPORTED_SUFFIXES:
            stats["skipped_files"] += 1
            continue
        if problem is None:
            try:
                with path.open("rb"):
                    return
            except Exception as e:
                problem = _error_text(e)
        unreadable.append(f"{rel}: {problem}")
    skipped = f"{stats['skipped_files']} file(s) of other types skipped"
    if stats["skipped_links"]:
        skipped += f", {stats['skipped_links']} symlink(s) to outside the corpus root skipped"
    if unreadable:
        raise CorpusError(f"{where} is not readable: no document could be opened ({len(unreadable)} unreadable "
                          f"path(s), first: {unreadable[0]}; {skipped})")
    raise EmptyCorpusError(f"{where} is empty: no .txt, .md, .jsonl or .parquet document found ({skipped})")


def _new_stats() -> dict[str, int]:
    return {"files": 0, "skipped_files": 0, "skipped_links": 0, "alias_links": 0, "unreadable_dirs": 0}


class CorpusReader:
    """Iterates the documents of a corpus, streaming, each unreadable path a ``FailedDocument``.

    ``stats`` after (or during) the iteration: ``files`` (supported files met), ``skipped_files``
    (other types), ``skipped_links`` (symlinks to outside the root), ``alias_links`` (links not
    followed because their target is read by its own path), ``unreadable_dirs``.
    """

    def __init__(self, root: CorpusPath, *, max_document_bytes: int = 64 * 1024 * 1024,
                 unchanged: Callable[[list[SourceFile]], set[str]] | None = None, block_files: int = 1000) -> None:
        """``unchanged``: change detection (see the module docstring) — given listed files with fingerprints, the
        URIs whose stored documents are current; with it the reader also yields ``SourceFile`` markers."""
        self.root = root
        self.max_document_bytes = max_document_bytes
        self.unchanged = unchanged
        self.block_files = block_files
        self.stats: dict[str, int] = _new_stats()
        # change detection: files opened and read, files left unread because their documents are current
        self.reads: dict[str, int] = {"read_files": 0, "unchanged_files": 0}

    def _files(self) -> Iterator[_FileEntry | FailedDocument]:
        """The supported files of the corpus in scan order (and the folders that cannot be listed)."""
        root = self.root
        where = f"corpus {root}"
        if _local_path(root) is None:
            # an object store's listing cache (fsspec keeps filesystems per process) must not hide new versions
            invalidate = getattr(getattr(root, "fs", None), "invalidate_cache", None)
            if invalidate is not None:
                invalidate()
        self._root_dir = _root_is_dir(root, where)
        if self._root_dir:
            files: Iterator[_FileEntry | FailedDocument] = iter(_Walker(root, self.stats, where))
        else:
            files = iter([(root, root.name, None)])
        for item in files:
            if not isinstance(item, FailedDocument):
                suffix = _suffix(item[0].name)
                if suffix not in SUPPORTED_SUFFIXES:
                    self.stats["skipped_files"] += 1
                    log.info("skipping %s: unsupported type (supported: %s)", item[0], ", ".join(SUPPORTED_SUFFIXES))
                    continue
                self.stats["files"] += 1
            yield item
        if self.stats["skipped_links"] > _LOGGED_LINKS:
            log.warning("%s: %d symlinks to outside the corpus root skipped", where, self.stats["skipped_links"])

    def __iter__(self) -> Iterator[Document | FailedDocument | SourceFile]:
        block: list[_FileEntry | FailedDocument] = []
        for item in self._files():
            block.append(item)
            if len(block) >= self.block_files:
                yield from self._block(block)
                block = []
        yield from self._block(block)

    def listing(self) -> Iterator[ListedFile]:
        """The corpus's files in scan order with their metadata, nothing opened: what a sharded scan plans from.

        A folder that cannot be listed is an entry whose ``rel`` ends in ``/`` (``problem`` is its reason); a
        file that cannot be reached (a looping or dangling link) carries its ``problem``."""
        for item in self._files():
            if isinstance(item, FailedDocument):
                yield ListedFile(item.doc_id, item.source_uri, problem=item.reason)
                continue
            path, rel, problem = item
            if problem is not None:
                yield ListedFile(rel, str(path), problem=problem)
                continue
            fingerprint, size = source_meta(path)
            yield ListedFile(rel, str(path), fingerprint, size)

    def path_of(self, entry: ListedFile) -> CorpusPath:
        """The path of a listed file: the root itself for a one-file corpus, else the root joined with ``rel``."""
        if getattr(self, "_root_dir", None) is None:
            self._root_dir = _root_is_dir(self.root, f"corpus {self.root}")
        return self.root / entry.rel if self._root_dir else self.root

    def read_listed(self, entry: ListedFile) -> Iterator[Document | FailedDocument]:
        """The documents of one listing entry (or of its ``part``), each unreadable piece a ``FailedDocument``."""
        if entry.rel.endswith("/"):  # a folder that could not be listed
            yield FailedDocument(entry.rel, entry.uri, UNREADABLE_CODE, entry.problem or f"{entry.rel}: not readable")
            return
        if entry.problem is not None:
            yield FailedDocument(entry.rel, entry.uri, UNREADABLE_CODE, f"{entry.rel}: {entry.problem}")
            return
        self.reads["read_files"] += 1
        yield from self._read_file(self.path_of(entry), entry.rel, entry.part)

    def _read_file(self, path: CorpusPath, rel: str, part: dict | None = None
                   ) -> Iterator[Document | FailedDocument]:
        suffix = _suffix(path.name)
        if suffix in TEXT_SUFFIXES:
            yield self._read_text_file(path, rel, suffix)
        elif suffix == ".jsonl":
            yield from self._read_jsonl(path, rel, part)
        else:
            yield from self._read_parquet(path, rel, part)

    def _block(self, block: list[_FileEntry | FailedDocument]) -> Iterator[Document | FailedDocument | SourceFile]:
        """Read a block of listed files, skipping those the ``unchanged`` callback names."""
        prints: dict[str, str | None] = {}
        skip: set[str] = set()
        if self.unchanged is not None:
            listed = []
            for item in block:
                if not isinstance(item, FailedDocument) and item[2] is None:
                    uri = str(item[0])
                    prints[uri] = source_fingerprint(item[0])
                    if prints[uri] is not None:
                        listed.append(SourceFile(item[1], uri, prints[uri]))
            skip = self.unchanged(listed) if listed else set()
        for item in block:
            if isinstance(item, FailedDocument):  # an unreadable folder
                yield item
                continue
            path, rel, problem = item
            uri = str(path)
            if uri in skip:
                self.reads["unchanged_files"] += 1
                yield SourceFile(rel, uri, prints[uri], unchanged=True)
                continue
            if problem is not None:
                yield FailedDocument(rel, uri, UNREADABLE_CODE, f"{rel}: {problem}")
                continue
            self.reads["read_files"] += 1
            readable = True
            for doc in self._read_file(path, rel):
                # a file that could not be read (wholly or partly) is read again next time, whatever its metadata
                readable = readable and not (isinstance(doc, FailedDocument) and doc.error_code == UNREADABLE_CODE)
                yield doc
            if self.unchanged is not None:
                yield SourceFile(rel, uri, prints.get(uri) if readable else None)

    def _read_text_file(self, path: CorpusPath, doc_id: str, suffix: str) -> Document | FailedDocument:
        uri = str(path)
        try:
            with path.open("rb") as f:
                data = f.read(self.max_document_bytes + 1)
        except MemoryError:
            raise
        except Exception as e:
            return FailedDocument(doc_id, uri, UNREADABLE_CODE, f"{doc_id}: not readable: {_error_text(e)}")
        if len(data) > self.max_document_bytes:
            return FailedDocument(
                doc_id, uri, ErrorCode.BAD_DOCUMENT,
                f"{doc_id}: larger than max_document_bytes={self.max_document_bytes}",
            )
        try:
            text = decode_utf8(data, doc_id)
        except UnicodeDecodeError as e:
            return FailedDocument(doc_id, uri, ErrorCode.DECODE_ERROR, e.reason)
        return Document(doc_id, sanitize_text(text), uri, {"format": suffix[1:]})

    def _read_jsonl(self, path: CorpusPath, rel: str, part: dict | None = None
                    ) -> Iterator[Document | FailedDocument]:
        uri = str(path)
        # a part (byte range starting at a line start) fails under its own id: the file's other parts stand
        fail_id = rel if part is None else f"{rel}:bytes-{part['start']}-{part['stop']}"
        start, stop = (0, None) if part is None else (part["start"], part["stop"])
        try:
            f = path.open("rb")
            if start:
                f.seek(start)
        except Exception as e:
            yield FailedDocument(fail_id, uri, UNREADABLE_CODE, f"{rel}: not readable: {_error_text(e)}")
            return
        with f:
            lines = iter(f)
            lineno = 0 if part is None else part["line"] - 1
            pos = start
            while True:
                if stop is not None and pos >= stop:
                    return
                # only the read is guarded: an exception thrown into a yield must not become a failure
                try:
                    raw = next(lines)
                except StopIteration:
                    return
                except Exception as e:
                    rest = "the rest of the file" if stop is None else f"the rest of bytes {start}-{stop}"
                    yield FailedDocument(fail_id, uri, UNREADABLE_CODE,
                                         f"{rel}: read failed after line {lineno}, {rest} is not "
                                         f"indexed: {_error_text(e)}")
                    return
                pos += len(raw)
                lineno += 1
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

    def _read_parquet(self, path: CorpusPath, rel: str, part: dict | None = None
                      ) -> Iterator[Document | FailedDocument]:
        import pyarrow.parquet as pq

        uri = str(path)
        lo, hi = (0, None) if part is None else part["groups"]
        # a later part fails under its own id (the file's other parts stand); what is wrong with the whole file
        # (not parquet, no id/text column) is reported once, by the part that starts the file
        fail_id = rel if not lo else f"{rel}:row-groups-{lo + 1}-{hi}"
        try:
            f = path.open("rb")
        except Exception as e:
            yield FailedDocument(fail_id, uri, UNREADABLE_CODE, f"{rel}: not readable: {_error_text(e)}")
            return
        with f:
            try:
                pf = pq.ParquetFile(f)
                names = pf.schema_arrow.names
                groups = [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)]
            except MemoryError:
                raise
            except Exception as e:
                yield FailedDocument(fail_id, uri, UNREADABLE_CODE,
                                     f"{rel}: not a readable parquet file ({_error_text(e)})")
                return
            missing = {"id", "text"} - set(names)
            if missing:
                if not lo:
                    yield FailedDocument(
                        rel, uri, ErrorCode.BAD_DOCUMENT,
                        f"{rel}: parquet file lacks column(s) {sorted(missing)} (needs 'id' and 'text')",
                    )
                return
            first = sum(groups[:lo])  # rows before this row group: fallback ids stay stable when a group fails
            for group in range(lo, len(groups) if hi is None else hi):
                size = groups[group]
                batches = pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=[group])
                row = first
                while True:
                    try:
                        batch = next(batches, None)
                        recs = batch.to_pylist() if batch is not None else None
                    except MemoryError:
                        raise
                    except Exception as e:
                        yield FailedDocument(
                            f"{rel}:row-group-{group + 1}", uri, UNREADABLE_CODE,
                            f"{rel}: row group {group + 1} of {len(groups)} is corrupt, rows {row + 1}-{first + size} "
                            f"not indexed ({_error_text(e)})",
                        )
                        break
                    if recs is None:
                        break
                    for rec in recs:
                        row += 1
                        yield self._from_record(rec, f"{rel}:{row}", f"{rel} row {row}", uri)
                first += size

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


SPLIT_READ_BYTES = 8 << 20  # what finding a large .jsonl file's line boundaries reads at a time


def split_large_file(path: CorpusPath, rel: str, size: int, part_bytes: int) -> list[dict] | None:
    """The parts of a .jsonl or .parquet file larger than ``part_bytes`` (see ``ListedFile.part``), or None when it
    stays whole (small, another type, one row group, or it cannot be read here — its reader reports that).

    .jsonl: byte ranges of about ``part_bytes`` that start at line starts, found in one streaming pass that
    counts lines (each part knows the number of its first line, so ids of lines without one stay those of a
    whole-file read). .parquet: runs of row groups of about ``part_bytes`` (uncompressed), from the footer only."""
    suffix = _suffix(rel.rsplit("/", 1)[-1])
    if size <= part_bytes or suffix not in (".jsonl", ".parquet"):
        return None
    try:
        parts = _split_jsonl(path, part_bytes) if suffix == ".jsonl" else _split_parquet(path, part_bytes)
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - read whole; the reader reports the file's own error
        log.warning("%s: not split (%s); read as one part", rel, _error_text(e))
        return None
    return parts if len(parts) > 1 else None


def _split_jsonl(path: CorpusPath, part_bytes: int) -> list[dict]:
    parts: list[dict] = []
    start, first_line = 0, 1  # the current part: its first byte and the number of its first line
    pos, lines = 0, 0  # bytes and newlines before the current block
    with path.open("rb") as f:
        while block := f.read(SPLIT_READ_BYTES):
            at = 0
            # cut at the first line start at or after start + part_bytes, as often as this block allows
            while (target := start + part_bytes) < pos + len(block):
                nl = block.find(b"\n", max(at, target - pos))
                if nl < 0:
                    break
                cut = pos + nl + 1
                line = lines + block.count(b"\n", 0, nl + 1) + 1
                parts.append({"start": start, "stop": cut, "line": first_line})
                start, first_line, at = cut, line, nl + 1
            lines += block.count(b"\n")
            pos += len(block)
    if pos > start:
        parts.append({"start": start, "stop": pos, "line": first_line})
    return parts


def _split_parquet(path: CorpusPath, part_bytes: int) -> list[dict]:
    import pyarrow.parquet as pq

    with path.open("rb") as f:
        meta = pq.ParquetFile(f).metadata
        groups = [(meta.row_group(i).num_rows, meta.row_group(i).total_byte_size) for i in range(meta.num_row_groups)]
    parts: list[dict] = []
    lo, rows, acc = 0, 0, 0
    for i, (_rows, nbytes) in enumerate(groups):
        acc += nbytes
        if acc >= part_bytes and i + 1 < len(groups):
            parts.append({"groups": [lo, i + 1], "row": rows})
            rows += sum(g[0] for g in groups[lo:i + 1])
            lo, acc = i + 1, 0
    parts.append({"groups": [lo, len(groups)], "row": rows})
    return parts
