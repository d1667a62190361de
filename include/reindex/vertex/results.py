"""Reading Vertex batch output: partition files into byte ranges, stream their lines, parse them in blocks.

Output files (classic: ``prediction-<model>-<time>/predictions_0001.jsonl…`` and ``errors_0001.jsonl…``;
gemini: ``predictions*.jsonl``) are partitioned by ``plan_ranges`` into byte ranges grouped into at
most ``max_partitions`` partitions (one mapped task each). ``iter_range_lines`` streams the lines that
*start* inside a range — adjacent ranges together yield every line exactly once — reading in bounded
blocks. ``parse_lines`` / ``stream_results`` turn lines into ``ParsedBlock``s: the keys and float32
vectors of successes, and one ``LineFailure`` per failed or unreadable line.

Join keys: gemini lines carry the request ``key``; classic lines echo the instance, and the key is
the hex sha256 of ``instance.content`` (UTF-8) — the same as ``chunks.content_sha256``. Results are
never joined by line order.

Per-line outcomes (a bad line fails only itself, never the block):

* success → ``keys[i]``, ``vectors[i]`` (shape ``(dim,)``); ``token_count`` summed when reported;
* ``status`` non-empty or an ``error`` object → the Google error mapped by ``classify_error``
  (RATE_LIMITED, QUOTA_EXCEEDED, UNAVAILABLE, TOO_LONG, INVALID_CHARACTERS, else INVALID_INPUT);
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

import io
import math
import queue
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO, NamedTuple

import numpy as np
import orjson

from reindex import native
from reindex.errors import ErrorCode
from reindex.vertex.formats import CLASSIC, GEMINI, Family, content_key

try:  # optional: ~2x faster vector parsing than orjson, no Python float objects
    import simdjson as _simdjson
except ImportError:  # pragma: no cover - exercised when pysimdjson is not installed
    _simdjson = None

DEFAULT_BLOCK_LINES = 2000
DEFAULT_READ_BLOCK = 1 << 20
GCS_READ_BLOCK = 4 << 20  # bytes per ranged GET when reading results from GCS (fewer round trips)
DEFAULT_PREFETCH = 1  # blocks parsed ahead of the consumer by stream_results (0: no background thread)
YIELD_EVERY = 16  # background parser: lines between GIL hand-offs to the consumer (0: never)
FAST_VALUES = _simdjson is not None or native.vecparse is not None  # cut out "values" arrays
NATIVE_VALUES = native.vecparse is not None  # parse them with reindex.native (else simdjson)
MAX_MESSAGE_CHARS = 500

# ---------------------------------------------------------------------------------------------
# partitioning


class ByteRange(NamedTuple):
    """Bytes ``[start, end)`` of the file ``uri``, processed by partition ``index``.

    Several ranges (small files) may share one partition index; see ``group_by_partition``.
    """

    uri: str
    start: int
    end: int
    index: int

    def to_dict(self) -> dict:
        return self._asdict()

    @classmethod
    def from_dict(cls, d: dict) -> ByteRange:
        return cls(d["uri"], int(d["start"]), int(d["end"]), int(d["index"]))


_RESULT_NAME = re.compile(r"(?:^|/)(?:predictions|errors)[^/]*\.jsonl$")


def is_result_file(name: str) -> bool:
    """Whether an object name in a job's output directory is a result file (predictions/errors JSONL)."""
    return bool(_RESULT_NAME.search(name))


def plan_ranges(files: Iterable[tuple[str, int]], *, target_bytes: int,
                max_partitions: int = 256) -> list[ByteRange]:
    """Partition result files ``(uri, size)`` into byte ranges, at most ``max_partitions`` partitions.

    Contract: the ranges of a file are contiguous and cover ``[0, size)`` exactly; empty files are
    left out. A file of at least ``target_bytes`` is cut into ``size // target`` ranges of at least
    ``target`` bytes; smaller files are whole ranges packed together into shared partitions of at
    least ``target`` bytes (only a lone leftover pack may be smaller). ``target`` starts at
    ``max(target_bytes, ceil(total / max_partitions))`` and grows until the partition count fits.
    The result is sorted by (index, uri, start), deterministic for the same input (files by uri).
    """
    if target_bytes < 1:
        raise ValueError(f"target_bytes must be >= 1, got {target_bytes}")
    if max_partitions < 1:
        raise ValueError(f"max_partitions must be >= 1, got {max_partitions}")
    items = sorted((uri, int(size)) for uri, size in files if size > 0)
    if not items:
        return []
    total = sum(size for _, size in items)
    target = max(target_bytes, math.ceil(total / max_partitions))
    while True:
        ranges = _split(items, target)
        if ranges[-1].index + 1 <= max_partitions:
            return ranges
        target = math.ceil(target * 1.25)


def _split(items: list[tuple[str, int]], target: int) -> list[ByteRange]:
    out: list[ByteRange] = []
    nparts = 0
    pack: list[tuple[str, int]] = []
    pack_bytes = 0
    last_pack: int | None = None
    for uri, size in items:
        if size >= target:
            n = size // target
            out.extend(ByteRange(uri, size * k // n, size * (k + 1) // n, nparts + k) for k in range(n))
            nparts += n
            continue
        pack.append((uri, size))
        pack_bytes += size
        if pack_bytes >= target:
            out.extend(ByteRange(u, 0, s, nparts) for u, s in pack)
            last_pack, nparts = nparts, nparts + 1
            pack, pack_bytes = [], 0
    if pack:
        index = last_pack if last_pack is not None else nparts
        out.extend(ByteRange(u, 0, s, index) for u, s in pack)
    return sorted(out, key=lambda r: (r.index, r.uri, r.start))


def group_by_partition(ranges: Iterable[ByteRange]) -> list[list[ByteRange]]:
    """The ranges of each partition, by partition index (what one mapped task processes)."""
    groups: dict[int, list[ByteRange]] = {}
    for r in ranges:
        groups.setdefault(r.index, []).append(r)
    return [groups[i] for i in sorted(groups)]


# ---------------------------------------------------------------------------------------------
# reading lines


def iter_range_lines(f: BinaryIO, start: int, end: int, *,
                     block_size: int = DEFAULT_READ_BLOCK) -> Iterator[tuple[int, bytes]]:
    """Yield ``(offset, line)`` for every line whose first byte lies in ``[start, end)``.

    ``f`` must be seekable and binary. A line starts at 0 and after every ``\\n``; ``line`` is its
    bytes without the ``\\n`` (empty lines are yielded as ``b""``; a final line without newline is
    yielded as is — it may be truncated). A line starting in the range is read to its end even past
    ``end``; a range starting mid-line skips to the next line start. Reads at most ``block_size`` bytes
    at a time into one reused buffer (``readinto``): memory is bounded by two blocks plus the longest
    line, never the file, and no block is allocated per read.
    """
    if start < 0 or end < start:
        raise ValueError(f"invalid byte range [{start}, {end})")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if start == end:
        return
    readinto = getattr(f, "readinto", None)
    buf = bytearray(2 * block_size)
    view = memoryview(buf)
    fill = 0  # bytes of buf holding file data; buf[0] is the file's byte ``base``

    def read_more() -> int:
        """Append up to ``block_size`` bytes at ``fill`` (growing buf when full); the count read."""
        nonlocal buf, view
        if fill + block_size > len(buf):
            view.release()
            buf.extend(bytes(max(len(buf), fill + block_size - len(buf))))
            view = memoryview(buf)
        if readinto is not None:
            return readinto(view[fill:fill + block_size]) or 0
        chunk = f.read(block_size)
        view[fill:fill + len(chunk)] = chunk
        return len(chunk)

    if start == 0:
        base = i = 0
        f.seek(0)
    else:  # the first line start >= start follows the first newline at or after start - 1
        base = start - 1
        f.seek(base)
        while True:
            n = read_more()
            if not n:
                return
            j = buf.find(b"\n", 0, n)
            if j >= 0:
                fill, i = n, j + 1
                break
            base += n
    scan = i
    try:
        while base + i < end:
            j = buf.find(b"\n", scan, fill)
            if j < 0:
                if i:  # keep the partial line only: move it to the front
                    view[:fill - i] = view[i:fill]
                    base, fill, i = base + i, fill - i, 0
                scan = fill
                n = read_more()
                if not n:
                    if i < fill:
                        yield base + i, bytes(view[i:fill])
                    return
                fill += n
                continue
            yield base + i, bytes(view[i:j])
            i = scan = j + 1
    finally:
        view.release()


# ---------------------------------------------------------------------------------------------
# error mapping

_GRPC_NAMES = {
    1: "CANCELLED", 2: "UNKNOWN", 3: "INVALID_ARGUMENT", 4: "DEADLINE_EXCEEDED", 5: "NOT_FOUND",
    7: "PERMISSION_DENIED", 8: "RESOURCE_EXHAUSTED", 9: "FAILED_PRECONDITION", 10: "ABORTED",
    11: "OUT_OF_RANGE", 13: "INTERNAL", 14: "UNAVAILABLE", 16: "UNAUTHENTICATED",
}
_STATUS_NAME = re.compile(r"\b(RESOURCE_EXHAUSTED|UNAVAILABLE|INTERNAL|DEADLINE_EXCEEDED|INVALID_ARGUMENT)\b")
_SERVER_STATUSES = {"UNAVAILABLE", "INTERNAL", "DEADLINE_EXCEEDED"}
_SERVER_HTTP = {500, 502, 503, 504}
_HTTP_IN_TEXT = re.compile(r"\b(429|500|502|503|504)\b")
# Only a daily window is a quota to wait out; Google's generic "Resource has been exhausted (e.g. check
# quota)" on 429 is a rate limit, retried with backoff.
_QUOTA = re.compile(r"per day|daily|per-day|\bday\b")
_SHORT_WINDOW = re.compile(r"per minute|per second|per-minute|per-second")
_RATE = re.compile(r"rate limit|rate-limit|too many requests|resource exhausted|resource_exhausted|quota")
_TOO_LONG = re.compile(
    r"too long|token limit|exceeds? (?:the )?(?:max\w*|limit)|\bexceed\w*\b[^.]{0,60}\btokens?\b"
    r"|\btokens?\b[^.]{0,60}\bexceed|max(?:imum)? (?:input )?(?:number of )?tokens|longer than"
    r"|input is too large|context length")
_BAD_CHARS = re.compile(
    r"invalid (?:unicode|utf-?8|characters?|bytes?|encoding)|control characters?|non-?printable"
    r"|surrogate|malformed utf|not valid utf|utf-?8 (?:decod|encod)\w* error|(?:decode|encode|encoding) error")
_UNAVAILABLE_TEXT = re.compile(r"service unavailable|temporarily unavailable|backend error|try again later")


def classify_error(code: int | str | None = None, status: str | None = None,
                   message: str | None = None) -> ErrorCode:
    """Map a Google error (HTTP or gRPC ``code``, status name, message) to an ``ErrorCode``.

    Explicit signals first: 429 / RESOURCE_EXHAUSTED → RATE_LIMITED, or QUOTA_EXCEEDED when the
    message speaks of a quota or a daily limit (unless it says per minute/second); 500/502/503/504,
    UNAVAILABLE, INTERNAL, DEADLINE_EXCEEDED → UNAVAILABLE. Then the message: quota exceeded →
    QUOTA_EXCEEDED; rate limit → RATE_LIMITED; too long / token limit → TOO_LONG; invalid or control
    characters, invalid UTF-8 → INVALID_CHARACTERS; a 429/5xx number in the text as above.
    Everything else (400, INVALID_ARGUMENT, unknown) → INVALID_INPUT.
    """
    text = " ".join(str(x) for x in (status, message) if x)
    low = text.lower()
    names = set(_STATUS_NAME.findall(text))
    http: int | None = None
    if isinstance(code, str):
        code = code.strip()
        if code.isdigit():
            code = int(code)
        else:
            names.add(code.upper())
    if isinstance(code, int) and not isinstance(code, bool):
        if code >= 100:
            http = code
        elif code in _GRPC_NAMES:
            names.add(_GRPC_NAMES[code])

    def exhausted() -> ErrorCode:
        if _QUOTA.search(low) and not _SHORT_WINDOW.search(low):
            return ErrorCode.QUOTA_EXCEEDED
        return ErrorCode.RATE_LIMITED

    if http == 429 or "RESOURCE_EXHAUSTED" in names:
        return exhausted()
    if http in _SERVER_HTTP or names & _SERVER_STATUSES:
        return ErrorCode.UNAVAILABLE
    if _QUOTA.search(low) and not _SHORT_WINDOW.search(low):
        return ErrorCode.QUOTA_EXCEEDED
    if _RATE.search(low):
        return exhausted()
    if _TOO_LONG.search(low):
        return ErrorCode.TOO_LONG
    if _BAD_CHARS.search(low):
        return ErrorCode.INVALID_CHARACTERS
    m = _HTTP_IN_TEXT.search(low)
    if m:
        return exhausted() if m.group(1) == "429" else ErrorCode.UNAVAILABLE
    if _UNAVAILABLE_TEXT.search(low):
        return ErrorCode.UNAVAILABLE
    return ErrorCode.INVALID_INPUT


def _error_of(obj: dict) -> tuple[ErrorCode, str] | None:
    """The failure reported by an output line (``status`` non-empty or an ``error``), or None."""
    codes: list = []
    statuses: list[str] = []
    messages: list[str] = []
    for field_name in ("error", "status"):
        value = obj.get(field_name)
        if not value:
            continue
        if isinstance(value, dict):
            if value.get("code") in (0, "0", "OK") and not value.get("message"):
                continue
            codes.append(value.get("code"))
            if isinstance(value.get("status"), str):
                statuses.append(value["status"])
            messages.append(str(value.get("message") or value.get("details") or value))
        elif isinstance(value, str):
            if value.strip():
                messages.append(value.strip())
        else:
            messages.append(str(value))
    if not messages and not codes:
        return None
    code = next((c for c in codes if c not in (None, "")), None)
    message = " | ".join(messages) or " ".join(statuses) or f"error code {code}"
    err = classify_error(code, " ".join(statuses) or None, message)
    label = f"{code} " if code not in (None, "") else ""
    return err, f"{label}{' '.join(statuses) + ': ' if statuses else ''}{message}"


# ---------------------------------------------------------------------------------------------
# parsing


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
        error = _error_of(obj)
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
        yield from _prefetched(blocks, depth)


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


_END = object()


def _prefetched(items: Iterator, depth: int) -> Iterator:
    """Run ``items`` in a background thread, ``depth`` items ahead; re-raise its error in order."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                q.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((_END, None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            put((_END, e))
        finally:
            items.close()

    thread = threading.Thread(target=produce, name="reindex-result-parser", daemon=True)
    thread.start()
    try:
        while True:
            item, error = q.get()
            if error is not None:
                raise error
            if item is _END:
                return
            yield item
    finally:
        stop.set()
        thread.join()


# ---------------------------------------------------------------------------------------------
# optional GCS adapters (take a google.cloud.storage client; imported lazily)


def list_result_files(client, output_directory: str) -> list[tuple[str, int]]:
    """``(uri, size)`` of the result files under a job's ``gcs_output_directory`` (gs://bucket/prefix)."""
    if not output_directory.startswith("gs://"):
        raise ValueError(f"not a gs:// URI: {output_directory!r}")
    bucket, _, prefix = output_directory[5:].partition("/")
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    return [(f"gs://{bucket}/{b.name}", int(b.size or 0))
            for b in client.list_blobs(bucket, prefix=prefix) if is_result_file(b.name)]


class GcsRangeOpener:
    """``open_range`` for ``stream_results`` over GCS: a seekable reader of the blob whose every
    ``readinto`` is one ranged GET of exactly the bytes asked for (``iter_range_lines`` asks its
    ``block_size``; ``ingest_ranges`` reads ``read_block`` = 4 MiB at a time through this opener),
    the response read in one piece (``single_shot_download``).

    ``BlobReader`` (``blob.open("rb")``) streams each response through Python in 8 KiB pieces and copies
    every block through its own buffer: reading 1.6 GB of results through the emulator took 4.5–5.1
    client CPU-seconds that way (1 MiB requests), 1.5–1.7 with this reader and 4 MiB requests — and a
    quarter of the round trips. A range read has no whole-object checksum to check (GCS has none for a
    range), as with ``BlobReader``; requests are retried with the storage library's default policy.
    """

    read_block = GCS_READ_BLOCK  # what ``ingest_ranges`` reads at a time through this opener

    def __init__(self, client) -> None:
        self.client = client

    def __call__(self, r: ByteRange) -> BinaryIO:
        from google.cloud.storage import Blob

        return _BlobRangeReader(Blob.from_uri(r.uri, client=self.client))


class _BlobRangeReader(io.RawIOBase):
    def __init__(self, blob) -> None:
        from google.api_core.exceptions import RequestRangeNotSatisfiable

        super().__init__()
        self._blob, self._pos, self._past_end = blob, 0, RequestRangeNotSatisfiable

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        if whence != io.SEEK_SET or pos < 0:
            raise io.UnsupportedOperation("only absolute, non-negative seeks")
        self._pos = pos
        return pos

    def readinto(self, b) -> int:
        self._checkClosed()
        n = len(b)
        if n == 0:
            return 0
        try:
            data = self._blob.download_as_bytes(start=self._pos, end=self._pos + n - 1, checksum=None,
                                                single_shot_download=True)
        except self._past_end:  # at or past the end of the object
            return 0
        k = min(len(data), n)
        memoryview(b).cast("B")[:k] = memoryview(data)[:k]
        self._pos += k
        return k
