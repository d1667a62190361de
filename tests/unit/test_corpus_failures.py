"""One bad path never sinks a corpus: loops, links, unreadable paths and corrupt files next to good
documents. Every test asserts the exact documents and the exact failures the reader yields."""

import hashlib
import io
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from reindex.corpus import UNREADABLE_CODE, CorpusReader, Document, FailedDocument, check_corpus_root
from reindex.errors import CorpusError, EmptyCorpusError, ErrorCode

CAP = 10_000  # a reader that follows a loop yields more than this; the tests stop it there instead of hanging


def _read(root, **kw):
    reader = CorpusReader(root, **kw)
    items = list(itertools.islice(reader, CAP))
    assert len(items) < CAP, "the walk did not terminate"
    docs = {i.doc_id: i for i in items if isinstance(i, Document)}
    failed = {i.doc_id: i for i in items if isinstance(i, FailedDocument)}
    assert len(docs) + len(failed) == len(items), "a doc_id was yielded twice"
    return docs, failed, reader.stats


def _parquet(path: Path, n: int, row_group_size: int) -> None:
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(1, n + 1)], "text": [f"row {i}" for i in range(1, n + 1)]}),
                   path, row_group_size=row_group_size)


def _corrupt_row_group(path: Path, group: int) -> None:
    """Overwrite the first page header of the 'text' column chunk of ``group`` (the footer stays valid)."""
    col = pq.ParquetFile(path).metadata.row_group(group).column(1)
    offset = col.dictionary_page_offset or col.data_page_offset
    data = bytearray(path.read_bytes())
    data[offset:offset + 40] = b"\xff" * 40
    path.write_bytes(bytes(data))


@pytest.fixture
def hostile(tmp_path):
    """The corpus a hostile-but-realistic user hands over (next to it: ``secret.txt``, ``elsewhere/``)."""
    root = tmp_path / "kb"
    (root / "a").mkdir(parents=True)
    (root / "c" / "d").mkdir(parents=True)
    (root / "a" / "one.txt").write_text("first good document", encoding="utf-8")
    (root / "b.md").write_text("# second\n\ngood\x00document", encoding="utf-8")
    (root / "c" / "d" / "deep.txt").write_text("deep good document", encoding="utf-8")
    (root / "docs.jsonl").write_text(json.dumps({"id": "j1", "text": "json one"}) + "\n"
                                     + json.dumps({"id": "j2", "text": "json two"}) + "\n", encoding="utf-8")
    (root / "loop.txt").symlink_to("loop.txt")  # a file symlink loop
    (root / "a" / "up").symlink_to("..")  # a directory loop
    (root / "c" / "up").symlink_to("..")  # a second one: the naive walk grows exponentially
    (root / "c" / "d" / "top").symlink_to("../..")
    (root / "c" / "one.txt").symlink_to("../a/one.txt")  # the same file reached again through a link
    (tmp_path / "secret.txt").write_text("not part of the corpus", encoding="utf-8")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "x.txt").write_text("not part of the corpus either", encoding="utf-8")
    (root / "secret.txt").symlink_to(tmp_path / "secret.txt")  # links to outside the root
    (root / "elsewhere").symlink_to("../elsewhere")
    (root / "dangling.md").symlink_to("gone.md")
    (root / "empty.txt").write_bytes(b"")
    (root / "binary.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00")
    (root / "corrupt.parquet").write_bytes(b"PAR1 this is not a parquet file")
    _parquet(root / "broken.parquet", 3000, 1000)
    _corrupt_row_group(root / "broken.parquet", 1)
    (root / "image.png").write_bytes(b"\x89PNG\r\n")
    return root


def test_every_bad_path_fails_alone_and_the_scan_goes_on(hostile):
    docs, failed, stats = _read(hostile)

    assert set(docs) == {"a/one.txt", "b.md", "c/d/deep.txt", "j1", "j2", "empty.txt",
                         *(f"r{i}" for i in range(1, 1001)), *(f"r{i}" for i in range(2001, 3001))}
    assert len(docs) == 2006
    assert docs["b.md"].text == "# second\n\ngood document"
    assert docs["empty.txt"].text == ""  # the pipeline records it as "no text to index"
    assert docs["r3000"].source_uri == str(hostile / "broken.parquet")

    reasons = {doc_id: (f.error_code, f.reason) for doc_id, f in failed.items()}
    assert set(reasons) == {"loop.txt", "dangling.md", "binary.txt", "corrupt.parquet",
                            "broken.parquet:row-group-2"}
    assert reasons["loop.txt"] == (UNREADABLE_CODE, "loop.txt: symlink loop (too many levels of symbolic links)")
    assert reasons["dangling.md"] == (
        UNREADABLE_CODE, "dangling.md: does not exist (a broken symlink, or removed during the scan)")
    assert reasons["binary.txt"] == (ErrorCode.DECODE_ERROR,
                                     "binary.txt: not valid UTF-8 at byte 0 (invalid start byte)")
    code, reason = reasons["corrupt.parquet"]
    assert code == UNREADABLE_CODE
    assert reason.startswith("corrupt.parquet: not a readable parquet file (ArrowInvalid: Parquet magic bytes not found")
    code, reason = reasons["broken.parquet:row-group-2"]
    assert code == UNREADABLE_CODE
    assert reason.startswith("broken.parquet: row group 2 of 3 is corrupt, rows 1001-2000 not indexed (")
    assert "deserialize thrift" in reason  # pyarrow's own words

    # a/up, c/up, c/d/top and c/one.txt are aliases of paths the walk reads anyway
    assert stats == {"files": 10, "skipped_files": 1, "skipped_links": 2, "alias_links": 4, "unreadable_dirs": 0}


def test_walk_order_and_ids_do_not_depend_on_links(hostile):
    """The same documents, in the same order, as the tree without any link."""
    ids = [i.doc_id for i in CorpusReader(hostile) if isinstance(i, Document)]
    links = [Path(d, n) for d, dirs, files in os.walk(hostile) for n in dirs + files if Path(d, n).is_symlink()]
    assert len(links) == 8
    for link in links:
        link.unlink()
    assert [i.doc_id for i in CorpusReader(hostile) if isinstance(i, Document)] == ids


def test_links_into_hidden_folders_are_followed_once(tmp_path):
    """Kubernetes ConfigMap / Secret volume layout: visible names link into a hidden timestamped folder."""
    root = tmp_path / "cm"
    (root / "..2026_11_29").mkdir(parents=True)
    (root / "..2026_11_29" / "kb.md").write_text("config map doc", encoding="utf-8")
    (root / "..2026_11_29" / "sub").mkdir()
    (root / "..2026_11_29" / "sub" / "x.txt").write_text("nested", encoding="utf-8")
    (root / "..2026_11_29" / "self").symlink_to(".")  # a loop inside the followed folder
    (root / "..data").symlink_to("..2026_11_29")
    (root / "kb.md").symlink_to("..data/kb.md")
    (root / "sub").symlink_to("..data/sub")
    (root / "all").symlink_to("..data")  # reaches kb.md and sub/ a second time
    docs, failed, stats = _read(root)
    assert {d: docs[d].text for d in docs} == {"all/kb.md": "config map doc", "all/sub/x.txt": "nested"}
    assert failed == {}
    assert stats["alias_links"] == 3 and stats["skipped_links"] == 0  # self, kb.md, sub


def test_corpus_root_may_itself_be_a_link(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "a.txt").write_text("alpha", encoding="utf-8")
    (tmp_path / "real" / "again.txt").symlink_to(tmp_path / "real" / "a.txt")  # absolute, inside the root
    (tmp_path / "link").symlink_to("real")
    docs, failed, stats = _read(tmp_path / "link")
    assert list(docs) == ["a.txt"] and failed == {} and stats["alias_links"] == 1


# --- unreadable paths, simulated: a CorpusPath whose listing / open raise like a denied filesystem ---


class FakePath:
    """A non-local ``CorpusPath`` over a real tree (the generic walk, as for ``gs://``) that raises
    ``PermissionError`` for the relative paths in ``denied`` and counts every listing and open."""

    def __init__(self, path: Path, root: Path, denied: set[str], calls: list[str], broken_reads: dict | None = None):
        self._p, self._root, self._denied, self._calls = path, root, denied, calls
        self._broken = broken_reads or {}
        self.name = path.name

    def _rel(self) -> str:
        return self._p.relative_to(self._root).as_posix()

    def _check(self, what: str) -> None:
        self._calls.append(f"{what} {self._rel()}")
        if self._rel() in self._denied:
            raise PermissionError(13, "Permission denied", f"fake://{self._p}")

    def iterdir(self):
        self._check("list")
        return [FakePath(c, self._root, self._denied, self._calls, self._broken) for c in self._p.iterdir()]

    def is_dir(self) -> bool:
        return self._p.is_dir()

    def is_file(self) -> bool:
        return self._p.is_file()

    def exists(self) -> bool:
        return self._p.exists()

    def open(self, mode: str = "r"):
        self._check("open")
        if self._rel() in self._broken:
            return BreakingFile(self._p.read_bytes(), self._broken[self._rel()])
        return self._p.open(mode)

    def __truediv__(self, name: str) -> "FakePath":
        return FakePath(self._p / name, self._root, self._denied, self._calls, self._broken)

    def __str__(self) -> str:
        return f"fake://{self._p}"


class BreakingFile(io.BytesIO):
    """A file whose connection drops once ``limit`` bytes were read (line iteration and reads alike)."""

    def __init__(self, data: bytes, limit: int):
        super().__init__(data)
        self._limit = limit

    def _fail_past(self, n: int) -> None:
        if self.tell() + max(n, 0) > self._limit:
            raise ConnectionResetError(104, "Connection reset by peer")

    def read(self, n: int = -1) -> bytes:
        self._fail_past(len(self.getbuffer()) if n is None or n < 0 else n)
        return super().read(n)

    def readline(self, n: int = -1) -> bytes:
        line = super().readline(n)
        if self.tell() > self._limit:
            raise ConnectionResetError(104, "Connection reset by peer")
        return line

    def __iter__(self):
        return self

    def __next__(self) -> bytes:
        line = self.readline()
        if not line:
            raise StopIteration
        return line


def _fake(root: Path, denied=(), broken_reads=None):
    calls: list[str] = []
    return FakePath(root, root, set(denied), calls, broken_reads), calls


def test_unreadable_file_and_folder_fail_alone(tmp_path):
    (tmp_path / "private").mkdir()
    (tmp_path / "private" / "p.txt").write_text("hidden by permissions", encoding="utf-8")
    (tmp_path / "locked.md").write_text("no read permission", encoding="utf-8")
    (tmp_path / "locked.jsonl").write_text(json.dumps({"id": "x", "text": "y"}), encoding="utf-8")
    (tmp_path / "ok.txt").write_text("readable", encoding="utf-8")
    root, _ = _fake(tmp_path, denied={"private", "locked.md", "locked.jsonl"})
    docs, failed, stats = _read(root)
    assert list(docs) == ["ok.txt"]
    assert docs["ok.txt"].source_uri == f"fake://{tmp_path / 'ok.txt'}"
    assert {k: (v.error_code, v.reason) for k, v in failed.items()} == {
        "locked.jsonl": (UNREADABLE_CODE, "locked.jsonl: not readable: permission denied"),
        "locked.md": (UNREADABLE_CODE, "locked.md: not readable: permission denied"),
        "private/": (UNREADABLE_CODE, "private/: folder not readable (permission denied); nothing under it was read"),
    }
    assert failed["private/"].source_uri == f"fake://{tmp_path / 'private'}"
    assert stats["unreadable_dirs"] == 1 and stats["files"] == 3


def test_unreadable_root_folder_is_a_corpus_error(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    root, _ = _fake(tmp_path, denied={"."})
    with pytest.raises(CorpusError, match=r"^corpus fake://.* is not readable: cannot list its root folder "
                                          r"\(permission denied\)$"):
        list(CorpusReader(root))


def test_a_read_that_breaks_mid_file_keeps_what_was_read(tmp_path):
    lines = [json.dumps({"id": f"j{i}", "text": f"line {i}"}) + "\n" for i in range(1, 6)]
    (tmp_path / "stream.jsonl").write_text("".join(lines), encoding="utf-8")
    (tmp_path / "cut.txt").write_text("a text whose read breaks", encoding="utf-8")
    (tmp_path / "z.txt").write_text("after the broken ones", encoding="utf-8")
    limit = len("".join(lines[:2]).encode()) + 3  # the connection drops inside line 3
    root, _ = _fake(tmp_path, broken_reads={"stream.jsonl": limit, "cut.txt": 5})
    docs, failed, _ = _read(root)
    assert list(docs) == ["j1", "j2", "z.txt"]
    assert {k: (v.error_code, v.reason) for k, v in failed.items()} == {
        "cut.txt": (UNREADABLE_CODE, "cut.txt: not readable: ConnectionResetError: [Errno 104] Connection reset by peer"),
        "stream.jsonl": (UNREADABLE_CODE, "stream.jsonl: read failed after line 2, the rest of the file is not indexed: "
                                          "ConnectionResetError: [Errno 104] Connection reset by peer"),
    }


def test_a_parquet_read_that_breaks_in_a_later_row_group(tmp_path):
    """The object store drops the connection inside row group 3: rows 1-2000 stay, row group 3 is one
    failure, row group 4 is read again (each row group is read on its own)."""
    # unique 128-character texts: the file (~540 KB) is larger than the footer read (64 KiB), which
    # would otherwise fetch the whole file, bad range included, before the first row group
    texts = [hashlib.sha256(str(i).encode()).hexdigest() * 2 for i in range(1, 4001)]
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(1, 4001)], "text": texts}), tmp_path / "rows.parquet",
                   row_group_size=1000)
    meta = pq.ParquetFile(tmp_path / "rows.parquet").metadata
    start = min(c.dictionary_page_offset or c.data_page_offset for c in
                (meta.row_group(2).column(i) for i in range(meta.num_columns)))

    class RangeBroken(BreakingFile):
        def read(self, n: int = -1) -> bytes:  # a bad range, not a cut-off: the footer is still readable
            n = len(self.getbuffer()) - self.tell() if n is None or n < 0 else n
            if self.tell() < start + 10 and self.tell() + n > start:
                raise ConnectionResetError(104, "Connection reset by peer")
            return io.BytesIO.read(self, n)

    class Root(FakePath):
        def open(self, mode="r"):
            return RangeBroken((tmp_path / "rows.parquet").read_bytes(), 0)

    root = Root(tmp_path / "rows.parquet", tmp_path, set(), [])
    docs, failed, _ = _read(root)
    assert set(docs) == {f"r{i}" for i in [*range(1, 2001), *range(3001, 4001)]}
    assert list(failed) == ["rows.parquet:row-group-3"]
    assert failed["rows.parquet:row-group-3"].reason.startswith(
        "rows.parquet: row group 3 of 4 is corrupt, rows 2001-3000 not indexed (")
    assert "Connection reset by peer" in failed["rows.parquet:row-group-3"].reason


# --- real permissions: as a user the filesystem refuses (tests run as root, so under setpriv) ---

_PROBE = r"""
import json, sys
from pathlib import Path
from reindex.corpus import CorpusReader, Document, check_corpus_root
from reindex.errors import CorpusError
root = Path(sys.argv[1])
try:
    open(root / "locked.txt", "rb")
    print(json.dumps({"denied": False}))
    raise SystemExit(0)
except PermissionError:
    pass
out = {"denied": True, "items": [], "errors": {}}
reader = CorpusReader(root)
for item in reader:
    out["items"].append([item.doc_id, None if isinstance(item, Document) else item.reason])
out["stats"] = reader.stats
for name in ("locked_root", "private", "locked.txt"):
    try:
        check_corpus_root(root / name if name != "locked_root" else Path(sys.argv[2]), "kb", name)
        out["errors"][name] = None
    except CorpusError as e:
        out["errors"][name] = f"{type(e).__name__}: {e}"
print(json.dumps(out))
"""


def test_real_permission_errors_as_an_unprivileged_user():
    cmd = [sys.executable, "-c", _PROBE]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root and setpriv is not available: cannot drop to an unprivileged user")
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
    base = Path(tempfile.mkdtemp(prefix="rx-perm-"))
    try:
        base.chmod(0o755)  # mkdtemp is 0700: the unprivileged user must reach the corpus
        root = base / "kb"
        (root / "private").mkdir(parents=True)
        (root / "private" / "p.txt").write_text("behind a folder without permissions")
        (root / "locked.txt").write_text("no read permission")
        (root / "ok.txt").write_text("readable")
        (base / "closed").mkdir()
        (base / "closed" / "a.txt").write_text("x")
        for p in (root / "private", root / "locked.txt", base / "closed"):
            p.chmod(0)
        res = subprocess.run([*cmd, str(root), str(base / "closed")], capture_output=True, text=True, timeout=120)
    finally:
        for p in (base / "kb" / "private", base / "kb" / "locked.txt", base / "closed"):
            if p.exists():
                p.chmod(0o755)
        shutil.rmtree(base)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    if not out["denied"]:
        pytest.skip("the filesystem does not enforce permissions for this user")
    assert out["items"] == [
        ["locked.txt", "locked.txt: not readable: permission denied"],
        ["ok.txt", None],
        ["private/", "private/: folder not readable (permission denied); nothing under it was read"],
    ]
    assert out["stats"]["unreadable_dirs"] == 1
    assert out["errors"] == {
        "locked_root": "CorpusError: corpus 'kb' at locked_root is not readable: cannot list its root folder "
                       "(permission denied)",
        "private": "CorpusError: corpus 'kb' at private is not readable: cannot list its root folder "
                   "(permission denied)",
        "locked.txt": "CorpusError: corpus 'kb' at locked.txt is not readable: permission denied",
    }


# --- check_corpus_root: refused before anything is written, cheaply ---


def test_check_missing_corpus(tmp_path):
    with pytest.raises(CorpusError, match=rf"^corpus 'kb' at {re.escape(f'file://{tmp_path}/nope')} does not exist$"):
        check_corpus_root(tmp_path / "nope", "kb", f"file://{tmp_path}/nope")


def test_check_empty_folder(tmp_path):
    with pytest.raises(EmptyCorpusError) as e:
        check_corpus_root(tmp_path, "kb", "/data/kb")
    assert str(e.value) == ("corpus 'kb' at /data/kb is empty: no .txt, .md, .jsonl or .parquet document found "
                            "(0 file(s) of other types skipped)")


def test_check_folder_with_only_unsupported_files(tmp_path):
    root = tmp_path / "kb"
    (root / "sub").mkdir(parents=True)
    (root / "a.pdf").write_bytes(b"%PDF")
    (root / "sub" / "b.docx").write_bytes(b"PK")
    (root / ".hidden.txt").write_text("hidden files are not documents")
    (tmp_path / "outside.txt").write_text("a document, but not in the corpus")
    (root / "out.txt").symlink_to(tmp_path / "outside.txt")
    with pytest.raises(EmptyCorpusError) as e:
        check_corpus_root(root, "kb", "/data/kb")
    assert str(e.value) == ("corpus 'kb' at /data/kb is empty: no .txt, .md, .jsonl or .parquet document found "
                            "(2 file(s) of other types skipped, 1 symlink(s) to outside the corpus root skipped)")


def test_check_single_file_roots(tmp_path):
    (tmp_path / "notes.pdf").write_bytes(b"%PDF")
    (tmp_path / "notes.md").write_text("fine")
    (tmp_path / "loop.md").symlink_to("loop.md")
    check_corpus_root(tmp_path / "notes.md", "kb", "notes.md")
    with pytest.raises(EmptyCorpusError, match=r"^corpus 'kb' at notes.pdf is empty: it is a single file of an "
                                               r"unsupported type"):
        check_corpus_root(tmp_path / "notes.pdf", "kb", "notes.pdf")
    with pytest.raises(CorpusError, match=r"^corpus 'kb' at loop.md is not readable: symlink loop"):
        check_corpus_root(tmp_path / "loop.md", "kb", "loop.md")


def test_check_stops_at_the_first_supported_file(tmp_path):
    deep = tmp_path / "a" / "b" / "c"
    deep.mkdir(parents=True)
    (deep / "doc.jsonl").write_text("{}")
    (tmp_path / "a" / "b" / "skip.bin").write_bytes(b"\x00")
    (tmp_path / "z").mkdir()
    for i in range(50):
        (tmp_path / "z" / f"{i}.txt").write_text("never listed")
    root, calls = _fake(tmp_path)
    check_corpus_root(root, "kb", "gs://bucket/kb")
    assert calls == ["list .", "list a", "list a/b", "list a/b/c", "open a/b/c/doc.jsonl"]


def test_check_corpus_whose_documents_cannot_be_opened(tmp_path):
    (tmp_path / "private").mkdir()
    (tmp_path / "a.txt").write_text("x")
    (tmp_path / "b.parquet").write_bytes(b"x")
    (tmp_path / "c.png").write_bytes(b"x")
    root, calls = _fake(tmp_path, denied={"a.txt", "b.parquet", "private"})
    with pytest.raises(CorpusError) as e:
        check_corpus_root(root, "kb", "gs://bucket/kb")
    assert not isinstance(e.value, EmptyCorpusError)
    assert str(e.value) == ("corpus 'kb' at gs://bucket/kb is not readable: no document could be opened "
                            "(3 unreadable path(s), first: a.txt: permission denied; 1 file(s) of other types skipped)")


def test_check_corpus_with_an_unreadable_root(tmp_path):
    root, _ = _fake(tmp_path, denied={"."})
    with pytest.raises(CorpusError, match=r"^corpus 'kb' at gs://b/kb is not readable: cannot list its root folder "
                                          r"\(permission denied\)$"):
        check_corpus_root(root, "kb", "gs://b/kb")


def test_object_storage_path_file_uri_uses_the_same_policy(hostile):
    sdk = pytest.importorskip("airflow.sdk")
    root = sdk.ObjectStoragePath(f"file://{hostile}")
    docs, failed, stats = _read(root)
    local_docs, local_failed, local_stats = _read(hostile)
    assert list(docs) == list(local_docs) and list(failed) == list(local_failed) and stats == local_stats
    assert docs["a/one.txt"].source_uri == f"file://{hostile}/a/one.txt"
    check_corpus_root(root, "kb", f"file://{hostile}")
