"""The native float32 array parser gives exactly float32(float(text)) for every number, on both of its
digit paths, and turns down everything that is not a plain array of valid JSON numbers."""

from __future__ import annotations

import json
from decimal import Decimal, localcontext

import numpy as np
import orjson
import pytest

from reindex import native

PATHS = ["simd", "portable"]


def built():
    """The loaded parser; a skip only where no C compiler exists at all (then simdjson is the path)."""
    if native.vecparse is None and native.compiler() is None:
        pytest.skip("no C compiler on this machine: the native parser cannot be built")
    assert native.vecparse is not None, "native parser not built: run `python -m reindex.native` (make does)"
    return native.vecparse


@pytest.fixture(params=PATHS)
def parser(request):
    vp = built()
    if request.param == "simd" and not vp.use_simd(True):
        pytest.skip("this processor has no SSE4.1")
    if request.param == "portable":
        vp.use_simd(False)
    yield vp
    vp.use_simd(True)


def reference(text: bytes) -> np.ndarray:
    """What every other path gives: Python's correctly rounded float, then float32."""
    with np.errstate(over="ignore"):
        return np.array(json.loads(text), dtype=np.float64).astype(np.float32)


def parse(vp, text: bytes, cap: int | None = None) -> tuple[int, np.ndarray]:
    out = np.full(len(json.loads(text)) if cap is None else cap, np.nan, dtype=np.float32)
    line = b'{"values": ' + text + b', "after": "some bytes"}'
    n = vp.parse_f32_array(line, 11, 11 + len(text) - 1, out)
    return n, out


def assert_exact(vp, text: bytes) -> None:
    n, out = parse(vp, text)
    ref = reference(text)
    assert n == len(ref)
    bad = np.flatnonzero(out.view(np.uint32) != ref.view(np.uint32))
    assert not len(bad), [(json.loads(text)[i], float(out[i]), float(ref[i])) for i in bad[:5]]


def test_realistic_embeddings_are_bit_exact(parser):
    rng = np.random.default_rng(0)
    for _ in range(50):
        v = rng.normal(size=768)
        assert_exact(parser, orjson.dumps(v / np.linalg.norm(v), option=orjson.OPT_SERIALIZE_NUMPY))


@pytest.mark.parametrize("kind", ["wide exponents", "float32 values", "integers", "tiny", "large", "short"])
def test_other_distributions_are_bit_exact(parser, kind):
    rng = np.random.default_rng(len(kind))
    for _ in range(20):
        if kind == "wide exponents":
            v = rng.normal(size=512) * 10.0 ** rng.integers(-44, 38, 512)
        elif kind == "float32 values":
            v = rng.normal(size=512).astype(np.float32).astype(np.float64)
        elif kind == "integers":
            v = rng.integers(-10**6, 10**6, 512)
        elif kind == "tiny":
            v = rng.normal(size=512) * 1e-30
        elif kind == "large":
            v = rng.normal(size=512) * 1e30
        else:
            v = np.round(rng.normal(size=512), int(rng.integers(1, 8)))
        assert_exact(parser, orjson.dumps(v, option=orjson.OPT_SERIALIZE_NUMPY))


def _near_midpoints(scale: float, seed: int) -> list[str]:
    """Texts at float32 midpoints and 1e-17 (relative) off them, rounded to 16-19 significant digits:
    in plain notation (the common path) and in exponent notation (the general one)."""
    rng = np.random.default_rng(seed)
    a = (rng.normal(size=300) * scale).astype(np.float32)
    b = np.nextafter(a, np.float32(np.inf))
    texts = []
    with localcontext() as ctx:
        ctx.prec = 200
        for x, y in zip(a, b, strict=True):
            mid = (Decimal(float(x)) + Decimal(float(y))) / 2  # exact
            step = abs(mid) * Decimal("1e-17")
            texts.append(format(mid, "f"))  # exactly the midpoint, dozens of digits
            for value in (mid, mid + step, mid - step):
                for sig in (16, 17, 18, 19):
                    rounded = Decimal(format(value, f".{sig - 1}e"))
                    texts += [format(rounded, "f"), format(rounded, f".{sig - 1}e")]
    return texts


@pytest.mark.parametrize("scale", [0.05, 3.0, 1e-6, 1e6])
def test_numbers_at_and_next_to_float32_rounding_boundaries(parser, scale):
    """At a float32 midpoint (ties to even) or within 1e-17 of one, the double a fast path computes is
    not trusted and the number is parsed again exactly: the result is still float32(float(text))."""
    texts = _near_midpoints(scale, seed=int(scale * 1000) % 97)
    assert any(0 < len(t.split(".")[1]) < 24 and "e" not in t for t in texts)  # the plain path is exercised
    assert_exact(parser, ("[" + ",".join(texts) + "]").encode())


def test_spellings(parser):
    for text in [b"[-0]", b"[-0.0]", b"[0e5]", b"[-0e5]", b"[1E5]", b"[1e+5]", b"[1.5e-3]", b"[ 1 , 2 ]",
                 b"[\t1,\n2\r]", b"[0.5]", b"[9.999999999999999999]", b"[12345678901234567890123]",
                 b"[0.12345678901234567890123]", b"[0.000000000000000000000001234]",
                 b"[123456789012345678901234567890e-20]", b"[1e-39]", b"[3.4028236e38]", b"[1e-45]",
                 b"[0.0000000000000000000000000000000000000000001]", b"[5.0]", b"[9.5]", b"[-7.25]"]:
        assert_exact(parser, text)
    n, out = parse(parser, b"[-0]")
    assert n == 1 and not np.signbit(out[0])  # an integer zero, as json.loads gives
    n, out = parse(parser, b"[-0.0]")
    assert np.signbit(out[0])


def test_empty_arrays(parser):
    for text in (b"[]", b"[ ]", b"[\n]"):
        line = b"x" + text + b"y"
        assert parser.parse_f32_array(line, 1, len(text), np.empty(4, np.float32)) == 0


@pytest.mark.parametrize("text", [
    b"[01]", b"[1.]", b"[.5]", b"[+1]", b"[NaN]", b"[Infinity]", b"[-]", b"[1e]", b"[1e+]", b"[1,]", b"[,1]",
    b"[1 2]", b"[1,,2]", b'["1"]', b"[[1]]", b"[1]]", b"[true]", b"[null]", b"[0x10]", b"[1_0]",
    b"[1e400]", b"[-1e400]", b"[1e-400]", b"[4.9e-324]",  # beyond (or below) the double range
])
def test_anything_else_is_turned_down(parser, text):
    line = text + b" " * 40
    assert parser.parse_f32_array(line, 0, len(text) - 1, np.empty(4, np.float32)) == -1


def test_count_beyond_the_output_is_reported_without_writing_past_it(parser):
    out = np.zeros(4, np.float32)
    guard = np.zeros(8, np.float32)
    guard[:4] = -1
    view = guard[4:]
    text = b"[1.5,2.5,3.5,4.5,5.5,6.5]"
    assert parser.parse_f32_array(text, 0, len(text) - 1, view) == 6
    assert list(view) == [1.5, 2.5, 3.5, 4.5] and list(guard[:4]) == [-1] * 4
    assert parser.parse_f32_array(b"[1,2]", 0, 4, out) == 2 and list(out[:2]) == [1, 2]


def test_reads_only_inside_the_line():
    vp = built()
    out = np.empty(3, np.float32)
    # the array ends the line: the fast path needs bytes after each number and must not read past the end
    for text in (b"[0.1234567890123456,0.5,-0.25]", b"[1,2,3]"):
        assert vp.parse_f32_array(text, 0, len(text) - 1, out) == 3
        np.testing.assert_array_equal(out, reference(text))
    with pytest.raises(ValueError, match="outside a line"):
        vp.parse_f32_array(b"[1]", 0, 3, out)
    with pytest.raises(ValueError, match="float32"):
        vp.parse_f32_array(b"[1]", 0, 2, np.empty(3, np.float64))


def test_build_is_keyed_by_the_source():
    built()
    path = native.library_path()
    assert path.exists() and path.name.startswith("_vecparse-")
    assert native.build() == path  # already built: nothing to do
