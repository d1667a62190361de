"""Parsing Vertex batch output lines into blocks of keys, float32 vectors and per-line failures.

``parse_lines`` / ``stream_results`` turn lines into ``ParsedBlock``s: the keys and float32 vectors of
successes, and one ``LineFailure`` per failed or unreadable line. ``stream_results`` reads byte ranges
(``reindex.vertex.ranges``) line by line (``reindex.vertex.lines``) in bounded blocks.

Join keys: gemini lines carry the request ``key``; classic lines echo the instance, and the key is
the hex sha256 of ``instance.content`` (UTF-8) — the same as ``chunks.content_sha256``. Results are
never joined by line order.

Per-line outcomes (a bad line fails only itself, never the block):

* success → ``keys[i]``, ``vectors[i]`` (shape ``(dim,)``); ``token_count`` summed when reported;
* ``status`` non-empty or an ``error`` object → the Google error mapped by ``classify_error`` in
  ``reindex.classify`` (RATE_LIMITED, QUOTA_EXCEEDED, UNAVAILABLE, TOO_LONG,
  INVALID_CHARACTERS, else INVALID_INPUT);
* ``statistics.truncated: true`` → TOO_LONG (the vector covers only part of the text);
* wrong number of values → DIMENSION_MISMATCH for that key;
* malformed or truncated JSON, missing fields → MALFORMED_OUTPUT, the key recovered from the raw
  text when possible (gemini ``"key":"…"``; classic a complete ``"content":"…"`` string, hashed),
  else ``None``. Every failure message names the source URI and the line's byte offset.

Speed: vector values are never turned into Python floats. The ``"values": [...]`` array of a line is
cut out and parsed straight into float32 by ``reindex.native`` (a one-pass C parser, built by
``make``), else by simdjson into a float64 buffer then cast — the same values either way, exactly
``float32(float(text))`` — and orjson parses only the small rest of the line. Any line this fast path
does not fully recognise is parsed whole by orjson, so results and failure messages are the same
either way. ``stream_results`` parses in a background thread, a block or two ahead of the consumer, so
parsing overlaps the database load of the previous block.

Within one block a key is reported once: the first success wins, and failures of a key that
succeeded in the same block are dropped. Across blocks a key may repeat (duplicate requests, a
line in both predictions and errors files): the store should never turn a READY chunk back to
FAILED. A chunk whose key appears in no output line at all is FAILED with MISSING_FROM_OUTPUT —
computed by the caller, which marks every chunk of the batch still PENDING after all ranges were
processed (failures with key ``None`` cannot be attributed, so such chunks end up there too).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO, NamedTuple

import numpy as np
import orjson

from reindex import native
from reindex.classify import line_error
from reindex.errors import ErrorCode
from reindex.prefetch import prefetched
from reindex.vertex.formats import CLASSIC, GEMINI, Family, content_key
from reindex.vertex.lines import DEFAULT_READ_BLOCK, iter_range_lines
from reindex.vertex.ranges import ByteRange

try:  # optional: ~2x faster vector parsing than orjson, no Python float objects
    import simdjson as _simdjson
except ImportError:  # pragma: no cover - exercised when pysimdjson is not installed
    _simdjson = None

DEFAULT_BLOCK_LINES = 2000
DEFAULT_PREFETCH = 1  # blocks parsed ahead of the consumer by stream_results (0: no background thread)
YIELD_EVERY = 16  # background parser: lines between GIL hand-offs to the consumer (0: never)
FAST_VALUES = _simdjson is not None or native.vecparse is not None  # cut out "values" arrays
NATIVE_VALUES = native.vecparse is not None  # parse them with reindex.native (else simdjson)
MAX_MESSAGE_CHARS = 500


class LineFailure(NamedTuple):
    """One failed output line: the chunk key (None when not recoverable), the code, and why."""

    key: str | None
    code: ErrorCode
    message: str


@dataclass
class ParsedBlock:
    """The outcome of a block of lines. ``vectors[i]`` belongs to ``keys[i]``; float32, ``(n, dim)``."""

    keys: list[str]
    vectors: np.ndarray
    failures: list[LineFailure] = field(default_factory=list)
    lines: int = 0  # non-blank lines parsed
    token_count: int = 0  # sum of reported token counts of the successes
    duplicates: int = 0  # repeated keys dropped within the block

    def __len__(self) -> int:
        return len(self.keys)


_GEMINI_KEY = re.compile(rb'"key"\s*:\s*"((?:[^"\\]|\\.)*)"')
_CLASSIC_CONTENT = re.compile(rb'"content"\s*:\s*("(?:[^"\\]|\\.)*")')


def _recover_key(raw: bytes, family: Family) -> str | None:
    """Best-effort key of an unparsable line: gemini ``"key":"…"``, classic sha256 of a complete content."""
    pattern = _GEMINI_KEY if family == GEMINI else _CLASSIC_CONTENT
    m = pattern.search(raw)
    if not m:
        return None
    try:
        if family == GEMINI:
            return orjson.loads(b'"' + m.group(1) + b'"')
        return content_key(orjson.loads(m.group(1)))
    except (orjson.JSONDecodeError, UnicodeEncodeError):
        return None


_VALUES = re.compile(rb'"values"\s*:\s*\[')


class _ValuesSplitter:
    """Cut the one ``"values": [...]`` array out of a raw line and parse it (native parser, else simdjson).

    ``split(raw)`` returns ``(rest, values)``: the line with that array replaced by ``[]`` and the
    array's numbers (float32 of ``dim`` values from the native parser, in a buffer reused by the next
    call; else float64 from simdjson), or ``None`` whenever the line is not that simple (no or several
    ``"values"`` keys, an array holding anything but numbers, nested arrays, invalid JSON numbers
    such as ``NaN``) — the caller then parses the whole line with orjson. The array ends at its
    first ``]``, so a nested or string-holding array never parses here.
    """

    def __init__(self, dim: int = 0) -> None:
        self._parser = _simdjson.Parser() if _simdjson is not None else None
        self._scratch = np.empty(dim, dtype=np.float32)
        self._native = native.vecparse.bind(self._scratch) if NATIVE_VALUES and dim > 0 else None

    def split(self, raw: bytes) -> tuple[bytes, np.ndarray] | None:
        if self._parser is None and self._native is None:
            return None
        m = _VALUES.search(raw)
        if m is None:
            return None
        start = m.end() - 1
        end = raw.find(b"]", start)
        if end < 0:
            return None
        rest = raw[:start] + b"[]" + raw[end + 1:]
        if rest.count(b'"values"') != 1:
            return None
        if self._native is not None and self._native(raw, start, end) == len(self._scratch):
            return rest, self._scratch  # float32, reused: the caller copies it before the next split
        if self._parser is None:
            return None
        doc = None
        try:
            doc = self._parser.parse(raw[start:end + 1])
            values = np.frombuffer(doc.as_buffer(of_type="d"), dtype=np.float64)
        except RuntimeError:  # the parser is still referenced: never reuse it
            self._parser = _simdjson.Parser()
            return None
        except (ValueError, TypeError, AttributeError):
            return None
        finally:
            del doc
        return rest, values


def _get(obj, *path):
    """``obj[p0][p1]…`` or None when any step is missing or of the wrong type."""
    for p in path:
        if isinstance(p, int):
            if not isinstance(obj, list) or len(obj) <= p:
                return None
        elif not isinstance(obj, dict):
            return None
        obj = obj[p] if isinstance(p, int) else obj.get(p)
    return obj


class BlockParser:
    """Incremental parser: ``feed`` lines, ``flush`` a ``ParsedBlock``; vectors go straight into one
    preallocated float32 array (grown by doubling), no per-line vector objects are kept."""

    def __init__(self, family: Family, dim: int, *, capacity: int = 256) -> None:
        if family not in (CLASSIC, GEMINI):
            raise ValueError(f"unknown model family {family!r}")
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.family, self.dim, self._capacity = family, dim, max(1, capacity)
        self._splitter = _ValuesSplitter(dim)
        self._reset()

    def _reset(self) -> None:
        self._vectors: np.ndarray | None = None  # allocated on the first success
        self._keys: list[str] = []
        self._rows: dict[str, int] = {}
        self._failures: list[LineFailure] = []
        self.lines = 0
        self._tokens = 0
        self._dups = 0

    @property
    def pending(self) -> int:
        """Non-blank lines fed since the last flush."""
        return self.lines

    def feed(self, offset: int, raw: bytes, source: str = "", line_no: int | None = None) -> None:
        """Parse one output line found at byte ``offset`` of ``source`` (line number when known)."""
        raw = raw.strip()
        if not raw:
            return
        self.lines += 1
        split = self._splitter.split(raw) if FAST_VALUES else None
        if split is not None:
            try:
                obj = orjson.loads(split[0])
            except orjson.JSONDecodeError:
                obj = None  # the whole line is parsed below, for the same message as without the fast path
            if obj is not None and self.family == CLASSIC and self._take_clean_classic(obj, split[1]):
                return
            where = f"{source or 'output'} byte {offset}" + (f" line {line_no}" if line_no is not None else "")
            if obj is not None and self._take(obj, where, split[1]):
                return
        else:
            where = f"{source or 'output'} byte {offset}" + (f" line {line_no}" if line_no is not None else "")
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            self._fail(_recover_key(raw, self.family), ErrorCode.MALFORMED_OUTPUT,
                       f"{where}: malformed or truncated JSON ({e})")
            return
        self._take(obj, where)

    def _take_clean_classic(self, obj, array: np.ndarray) -> bool:
        """The common line, checked without building messages: a classic success with no error or
        status, not truncated, of the right dimension, a new key. Anything else returns False and
        goes through ``_take`` (same outcome as if this did not exist)."""
        try:
            content = obj["instance"]["content"]
            emb = obj["predictions"][0]["embeddings"]
            values = emb["values"]
        except (KeyError, IndexError, TypeError):
            return False
        if (type(content) is not str or type(values) is not list or values or obj.get("error")
                or obj.get("status") or len(array) != self.dim):
            return False
        stats = emb.get("statistics")
        if type(stats) is dict and stats.get("truncated") is True:
            return False
        key = content_key(content)
        if key in self._rows:
            return False
        n = len(self._keys)
        if self._vectors is None or n == len(self._vectors):
            return False  # allocation and growth stay in _take
        self._vectors[n] = array
        self._keys.append(key)
        self._rows[key] = n
        if type(stats) is dict and isinstance(stats.get("token_count"), int | float):
            self._tokens += int(stats["token_count"])
        return True

    def _take(self, obj, where: str, array: np.ndarray | None = None) -> bool:
        """Record the outcome of a parsed line. With ``array`` (the fast path's values, cut out of the
        line) nothing is recorded and False is returned unless the line's values field is that ``[]``."""
        if not isinstance(obj, dict):
            if array is not None:
                return False
            self._fail(None, ErrorCode.MALFORMED_OUTPUT, f"{where}: not a JSON object")
            return True
        if self.family == CLASSIC:
            content = _get(obj, "instance", "content")
            key = content_key(content) if isinstance(content, str) else None
            emb = _get(obj, "predictions", 0, "embeddings")
            missing = "no instance.content" if key is None else "no predictions[0].embeddings.values"
        else:
            k = obj.get("key")
            key = k if isinstance(k, str) else (str(k) if isinstance(k, int) and not isinstance(k, bool) else None)
            emb = _get(obj, "response", "embedding") or _get(obj, "response", "embeddings", 0)
            missing = "no key" if key is None else "no response.embedding.values"
        values = emb.get("values") if isinstance(emb, dict) else None
        if array is not None:
            if not isinstance(values, list) or values:
                return False  # the cut-out array was not this line's values: parse the whole line
            values = array
        elif not isinstance(values, list):
            values = None
        error = line_error(obj)
        if error is not None:
            code, message = error
            self._fail(key, code, f"{where}: {message}")
            return True
        if key is None or values is None:
            self._fail(key, ErrorCode.MALFORMED_OUTPUT, f"{where}: {missing}")
            return True
        stats = emb.get("statistics")
        if isinstance(stats, dict) and stats.get("truncated") is True:
            self._fail(key, ErrorCode.TOO_LONG,
                       f"{where}: input was truncated by the service (over {stats.get('token_count')} tokens)")
            return True
        if len(values) != self.dim:
            self._fail(key, ErrorCode.DIMENSION_MISMATCH,
                       f"{where}: vector has {len(values)} values, expected {self.dim}")
            return True
        if key in self._rows:
            self._dups += 1
            return True
        n = len(self._keys)
        if self._vectors is None:
            self._vectors = np.empty((self._capacity, self.dim), dtype=np.float32)
        elif n == len(self._vectors):
            grown = np.empty((2 * n, self.dim), dtype=np.float32)
            grown[:n] = self._vectors
            self._vectors = grown
        try:
            self._vectors[n] = values
        except (TypeError, ValueError) as e:
            self._fail(key, ErrorCode.MALFORMED_OUTPUT, f"{where}: non-numeric vector values ({e})")
            return True
        self._keys.append(key)
        self._rows[key] = n
        if isinstance(stats, dict) and isinstance(stats.get("token_count"), int | float):
            self._tokens += int(stats["token_count"])
        return True

    def _fail(self, key: str | None, code: ErrorCode, message: str) -> None:
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[:MAX_MESSAGE_CHARS - 1] + "…"
        self._failures.append(LineFailure(key, code, message))

    def flush(self) -> ParsedBlock:
        """The block parsed so far (then start a new one)."""
        seen: set[str] = set()
        failures = []
        for fail in self._failures:
            if fail.key is not None:
                if fail.key in self._rows or fail.key in seen:
                    continue
                seen.add(fail.key)
            failures.append(fail)
        n = len(self._keys)
        if self._vectors is None:
            vectors = np.empty((0, self.dim), dtype=np.float32)
        else:  # a view when it uses most of the buffer, else a compact copy
            vectors = self._vectors[:n] if n * 2 > len(self._vectors) else self._vectors[:n].copy()
        block = ParsedBlock(self._keys, vectors, failures, self.lines, self._tokens, self._dups)
        self._reset()
        return block


def parse_lines(lines: Iterable[tuple[int, bytes]], family: Family, *, dim: int, source: str = "",
                first_line: int | None = None) -> ParsedBlock:
    """Parse ``(offset, line)`` pairs of one ``source`` into one ``ParsedBlock`` (see module docs).

    With ``first_line`` (the line number of the first pair, blank lines counted) failure messages
    also name line numbers. Holds the whole block: use ``stream_results`` for bounded memory.
    """
    parser = BlockParser(family, dim)
    for i, (offset, raw) in enumerate(lines):
        parser.feed(offset, raw, source, None if first_line is None else first_line + i)
    return parser.flush()


def stream_results(open_range: Callable[[ByteRange], BinaryIO], ranges: Iterable[ByteRange], family: Family,
                   dim: int, *, block_lines: int = DEFAULT_BLOCK_LINES,
                   block_size: int = DEFAULT_READ_BLOCK, prefetch: int | None = None) -> Iterator[ParsedBlock]:
    """Parse ``ranges`` in order, yielding a ``ParsedBlock`` every ``block_lines`` non-blank lines.

    ``open_range(r)`` returns a seekable binary file for ``r.uri``; it is closed here. Memory stays
    flat: a few blocks of vectors (``block_lines × dim`` float32 each) plus a few read blocks. A block
    may hold lines of several ranges; the last block may be smaller (no empty block is yielded).

    With ``prefetch`` > 0 (default ``DEFAULT_PREFETCH``) the ranges are read and parsed in a
    background thread, at most ``prefetch`` blocks ahead, so parsing overlaps whatever the consumer
    does with the previous block (a COPY waits on the server with the GIL released). Blocks and
    errors arrive in the same order as without it; closing the generator stops the thread.
    """
    if block_lines < 1:
        raise ValueError(f"block_lines must be >= 1, got {block_lines}")
    depth = DEFAULT_PREFETCH if prefetch is None else prefetch
    blocks = _parse_ranges(open_range, list(ranges), family, dim, block_lines, block_size,
                           yield_every=YIELD_EVERY if depth > 0 else 0)
    if depth <= 0:
        yield from blocks
    else:
        yield from prefetched(blocks, depth, name="reindex-result-parser")


def _parse_ranges(open_range, ranges: list[ByteRange], family: Family, dim: int, block_lines: int,
                  block_size: int, *, yield_every: int = 0) -> Iterator[ParsedBlock]:
    """With ``yield_every`` (in the background thread) the GIL is handed over every so many lines: the
    consumer's database round trips then wait microseconds for it, not the 5 ms switch interval."""
    parser = BlockParser(family, dim, capacity=block_lines)
    for r in ranges:
        f = open_range(r)
        try:
            # line numbers are known when the range starts the file (files under the range size)
            for line_no, (offset, raw) in enumerate(iter_range_lines(f, r.start, r.end, block_size=block_size), 1):
                parser.feed(offset, raw, r.uri, line_no if r.start == 0 else None)
                if yield_every and line_no % yield_every == 0:
                    time.sleep(0)
                if parser.pending >= block_lines:
                    yield parser.flush()
        finally:
            f.close()
    if parser.pending:
        yield parser.flush()
