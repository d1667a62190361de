"""The fast parse paths (values parsed by reindex.native or simdjson, background parsing) give exactly what
the plain orjson path gives."""

from __future__ import annotations

import io
import threading

import numpy as np
import orjson
import pytest

from reindex.vertex import parse
from reindex.vertex.formats import CLASSIC, GEMINI
from reindex.vertex.parse import parse_lines, stream_results
from reindex.vertex.ranges import ByteRange

DIM = 8

import simdjson  # noqa: E402,F401 - pinned in requirements.txt: its absence fails here, it is never skipped


@pytest.fixture(params=["native", "simdjson"])
def values_parser(request, monkeypatch):
    """Which parser the fast path hands the cut-out values to (native: built by make)."""
    if request.param == "native" and parse.native.vecparse is None:
        if parse.native.compiler() is None:
            pytest.skip("no C compiler on this machine: the native parser cannot be built")
        raise AssertionError("native parser not built: run `python -m reindex.native` (make does)")
    monkeypatch.setattr(parse, "NATIVE_VALUES", request.param == "native")
    return request.param


def vec(seed, dim=DIM):
    return np.random.default_rng(seed).standard_normal(dim)


def dumps(obj):
    return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)


def ok(text, v, **stats):
    return dumps({"instance": {"content": text},
                  "predictions": [{"embeddings": {"values": v, "statistics": {"token_count": 3, **stats}}}],
                  "status": ""})


TRICKY = [
    ok("plain", vec(1)),
    ok("ints and exponents", np.array([0, 1, -1, 1e-7, -2.5e-3, 3, 0, 1])),
    b'{"instance": {"content": "spaces"}, "predictions": [{"embeddings": {"values" : [ 1.5 , 2, 3,4,5,6,7, 8 ]}}],'
    b' "status": ""}',
    ok('quote "values": [1,2] inside the text', vec(2)),
    ok("values]] brackets [in text", vec(3)),
    ok("short", vec(4, DIM - 1)),
    ok("long", vec(5, DIM + 2)),
    ok("truncated", vec(6), truncated=True),
    b'{"instance": {"content": "nan"}, "predictions": [{"embeddings": {"values": [NaN,1,2,3,4,5,6,7]}}]}',
    b'{"instance": {"content": "plus"}, "predictions": [{"embeddings": {"values": [+1,1,2,3,4,5,6,7]}}]}',
    b'{"instance": {"content": "huge"}, "predictions": [{"embeddings": {"values": [1e400,1,2,3,4,5,6,7]}}]}',
    b'{"instance": {"content": "strings"}, "predictions": [{"embeddings": {"values": ["1",1,2,3,4,5,6,7]}}]}',
    b'{"instance": {"content": "nested"}, "predictions": [{"embeddings": {"values": [[1,1,2,3,4,5,6,7]]}}]}',
    b'{"instance": {"content": "two"}, "predictions": [{"embeddings": {"values": [1,1,2,3,4,5,6,7],'
    b' "values": []}}]}',
    b'{"instance": {"content": "other"}, "values": [1,2,3,4,5,6,7,8], "predictions": [{"embeddings": {}}]}',
    b'{"instance": {"content": "err"}, "predictions": [{"embeddings": {"values": []}}], "status": "429 rate limit"}',
    b'{"instance": {"content": "cut"}, "predictions": [{"embeddings": {"values": [1,2,3,4,5,6,7,8]}}], "sta',
    b'{"instance": {"content": "cut2"}, "predictions": [{"embeddings": {"values": [1,2,3,4,5,6,7,8',
    b'[1,2,3]',
    ok("plain", vec(7)),  # duplicate key
    dumps({"key": "g1", "response": {"embedding": {"values": vec(8)}}}),
    dumps({"key": "g2", "response": {"embeddings": [{"values": vec(9)}]}}),
]


def _numbered(lines):
    out, off = [], 0
    for line in lines:
        out.append((off, line))
        off += len(line) + 1
    return out


@pytest.mark.parametrize("family", [CLASSIC, GEMINI])
def test_fast_path_matches_the_orjson_path(monkeypatch, family, values_parser):
    fast = parse_lines(_numbered(TRICKY), family, dim=DIM, source="f", first_line=1)
    monkeypatch.setattr(parse, "FAST_VALUES", False)
    slow = parse_lines(_numbered(TRICKY), family, dim=DIM, source="f", first_line=1)
    assert fast.keys == slow.keys and fast.failures == slow.failures
    assert (fast.lines, fast.token_count, fast.duplicates) == (slow.lines, slow.token_count, slow.duplicates)
    np.testing.assert_array_equal(fast.vectors, slow.vectors)
    assert fast.vectors.dtype == np.float32


def test_fast_path_is_bit_identical_on_realistic_floats(monkeypatch, values_parser):
    rng = np.random.default_rng(0)
    lines = []
    for i in range(200):
        v = rng.normal(size=768)
        lines.append(ok(f"text {i}", v / np.linalg.norm(v)))
    splitter = parse._ValuesSplitter(768)
    assert (splitter._native is not None) == (values_parser == "native")
    assert all(splitter.split(line) is not None for line in lines)  # the fast path is taken
    fast = parse_lines(_numbered(lines), CLASSIC, dim=768)
    monkeypatch.setattr(parse, "FAST_VALUES", False)
    slow = parse_lines(_numbered(lines), CLASSIC, dim=768)
    assert len(fast) == 200 and fast.keys == slow.keys
    assert fast.vectors.tobytes() == slow.vectors.tobytes()


def _ranges(data: bytes, n: int):
    cuts = [len(data) * k // n for k in range(n + 1)]
    return [ByteRange("mem", cuts[k], cuts[k + 1], k) for k in range(n)]


def test_prefetch_yields_the_same_blocks_and_raises_in_order():
    data = b"\n".join(ok(f"t{i}", vec(i)) for i in range(50)) + b"\n"
    plain = list(stream_results(lambda r: io.BytesIO(data), _ranges(data, 3), CLASSIC, DIM, block_lines=7,
                                prefetch=0))
    ahead = list(stream_results(lambda r: io.BytesIO(data), _ranges(data, 3), CLASSIC, DIM, block_lines=7,
                                prefetch=2))
    assert [b.keys for b in plain] == [b.keys for b in ahead] and len(plain) == 8
    for a, b in zip(plain, ahead, strict=True):
        np.testing.assert_array_equal(a.vectors, b.vectors)

    calls = []

    def failing_open(r):
        calls.append(r.index)
        if r.index == 1:
            raise OSError("range 1 unreadable")
        return io.BytesIO(data)

    got = []
    with pytest.raises(OSError, match="range 1 unreadable"):
        for block in stream_results(failing_open, _ranges(data, 2), CLASSIC, DIM, block_lines=10, prefetch=1):
            got.append(block)
    assert sum(b.lines for b in got) >= 20  # the blocks of range 0 came first


def test_closing_the_stream_stops_the_parser_thread():
    data = b"\n".join(ok(f"t{i}", vec(i)) for i in range(500)) + b"\n"
    closed = []

    class Tracked(io.BytesIO):
        def close(self):
            closed.append(True)
            super().close()

    def parser_threads():
        return [t for t in threading.enumerate() if t.name == "reindex-result-parser" and t.is_alive()]

    assert parser_threads() == []
    gen = stream_results(lambda r: Tracked(data), _ranges(data, 1), CLASSIC, DIM, block_lines=5, prefetch=1)
    next(gen)
    assert len(parser_threads()) == 1
    gen.close()
    assert closed == [True]
    assert parser_threads() == []
