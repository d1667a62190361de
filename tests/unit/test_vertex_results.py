import io
import random
import time
import tracemalloc

import numpy as np
import orjson
import pytest

from reindex.classify import classify_error
from reindex.errors import ErrorCode
from reindex.vertex.formats import CLASSIC, GEMINI, content_key
from reindex.vertex.lines import iter_range_lines
from reindex.vertex.parse import parse_lines, stream_results
from reindex.vertex.ranges import ByteRange, group_by_partition, is_result_file, plan_ranges

DIM = 8


def vec(seed, dim=DIM):
    return np.random.default_rng(seed).standard_normal(dim).astype(np.float32)


def classic_ok(text, v, tokens=5, truncated=False):
    return orjson.dumps({
        "instance": {"content": text, "task_type": "RETRIEVAL_DOCUMENT"},
        "predictions": [{"embeddings": {"values": v, "statistics": {"token_count": tokens, "truncated": truncated}}}],
        "status": ""}, option=orjson.OPT_SERIALIZE_NUMPY)


def gemini_ok(key, v):
    return orjson.dumps({"key": key, "request": {"content": {"parts": [{"text": "t"}]}},
                         "response": {"embedding": {"values": v}}, "status": ""}, option=orjson.OPT_SERIALIZE_NUMPY)


def numbered(lines):
    out, off = [], 0
    for line in lines:
        out.append((off, line))
        off += len(line) + 1
    return out


# ---- plan_ranges -----------------------------------------------------------------------------

def check_cover(files, ranges):
    by_uri = {}
    for r in ranges:
        by_uri.setdefault(r.uri, []).append((r.start, r.end))
    assert set(by_uri) == {u for u, s in files if s > 0}
    for uri, size in files:
        if size > 0:
            spans = sorted(by_uri[uri])
            assert spans[0][0] == 0 and spans[-1][1] == size
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
            assert all(s < e for s, e in spans)


def test_plan_ranges_big_file_cut_into_target_sized_ranges():
    ranges = plan_ranges([("gs://b/p1.jsonl", 10_500)], target_bytes=1_000)
    assert len(ranges) == 10 and [r.index for r in ranges] == list(range(10))
    assert all(r.end - r.start >= 1_000 for r in ranges)
    check_cover([("gs://b/p1.jsonl", 10_500)], ranges)


def test_plan_ranges_small_files_packed_and_empty_files_skipped():
    files = [(f"gs://b/predictions_{i:04d}.jsonl", 10) for i in range(1_000)] + [("gs://b/errors_0001.jsonl", 0)]
    ranges = plan_ranges(files, target_bytes=100)
    check_cover(files, ranges)
    groups = group_by_partition(ranges)
    assert len(groups) == 100
    assert all(sum(r.end - r.start for r in g) >= 100 for g in groups)
    assert plan_ranges([], target_bytes=10) == [] and plan_ranges([("x", 0)], target_bytes=10) == []


def test_plan_ranges_never_exceeds_max_partitions():
    files = [(f"gs://b/f{i}.jsonl", 1_000_000) for i in range(10)]
    ranges = plan_ranges(files, target_bytes=1_000, max_partitions=7)
    assert len(group_by_partition(ranges)) <= 7
    check_cover(files, ranges)


def test_plan_ranges_random_property():
    rnd = random.Random(7)
    for _ in range(300):
        files = [(f"f{i}", rnd.choice([0, rnd.randint(1, 50), rnd.randint(1, 5_000)])) for i in range(rnd.randint(1, 30))]
        target, max_p = rnd.randint(1, 2_000), rnd.randint(1, 40)
        ranges = plan_ranges(files, target_bytes=target, max_partitions=max_p)
        if not any(s for _, s in files):
            assert ranges == []
            continue
        check_cover(files, ranges)
        groups = group_by_partition(ranges)
        assert 1 <= len(groups) <= max_p
        assert [g[0].index for g in groups] == list(range(len(groups)))
        for r in ranges:
            size = dict(files)[r.uri]
            assert r.end - r.start >= min(target, size)  # no tiny range unless the file is tiny
        small = [g for g in groups if sum(r.end - r.start for r in g) < target]
        assert len(small) <= 1


def test_plan_ranges_bad_arguments_and_manifest_roundtrip():
    with pytest.raises(ValueError):
        plan_ranges([("x", 1)], target_bytes=0)
    with pytest.raises(ValueError):
        plan_ranges([("x", 1)], target_bytes=1, max_partitions=0)
    r = ByteRange("gs://b/x.jsonl", 5, 10, 2)
    assert ByteRange.from_dict(orjson.loads(orjson.dumps(r.to_dict()))) == r


def test_is_result_file():
    assert is_result_file("out/prediction-model-2025/predictions_0001.jsonl")
    assert is_result_file("out/prediction-model-2025/errors_0001.jsonl")
    assert is_result_file("predictions.jsonl")
    assert not is_result_file("out/x/predictions_0001.jsonl.tmp")
    assert not is_result_file("out/x/_SUCCESS")


# ---- iter_range_lines ------------------------------------------------------------------------

class CountingFile(io.BytesIO):
    def __init__(self, data):
        super().__init__(data)
        self.max_read = self.total_read = 0

    def read(self, size=-1):
        out = super().read(size)
        self.max_read = max(self.max_read, len(out))
        self.total_read += len(out)
        return out

    def readinto(self, b):
        n = super().readinto(b)
        self.max_read = max(self.max_read, n)
        self.total_read += n
        return n


class ReadOnlyFile(CountingFile):
    """A file object without ``readinto`` (some ``open_range`` adapters): lines come through ``read``."""

    readinto = property(lambda self: None)


def reference_lines(data):
    parts = data.split(b"\n")
    if data.endswith(b"\n"):
        parts.pop()
    return numbered(parts) if data else []


def random_lines_case(rnd, blocks):
    """Random short lines (some empty, maybe no final newline), cut points covering them, a block size."""
    lines = [bytes(rnd.choice(b"ab{}\",") for _ in range(rnd.choice([0, 0, 1, 3, 10, 40])))
             for _ in range(rnd.randint(0, 25))]
    data = b"\n".join(lines) + (b"\n" if rnd.random() < 0.5 else b"")
    cuts = sorted({0, len(data), *(rnd.randint(0, len(data)) for _ in range(rnd.randint(0, 8)))})
    return data, cuts, rnd.choice(blocks)


def test_iter_range_lines_random_cuts_every_line_exactly_once():
    rnd = random.Random(42)
    for trial in range(400):
        data, cuts, block = random_lines_case(rnd, [1, 2, 3, 7, 64, 1 << 20])
        got = []
        for start, end in zip(cuts, cuts[1:], strict=False):
            f = (CountingFile if trial % 2 else ReadOnlyFile)(data)
            got.extend(iter_range_lines(f, start, end, block_size=block))
            assert 0 < f.max_read <= block
        assert got == reference_lines(data), (trial, data, cuts, block)


def test_iter_range_lines_edges():
    data = b"one\ntwo\n\nthree"
    assert list(iter_range_lines(io.BytesIO(data), 0, len(data))) == [(0, b"one"), (4, b"two"), (8, b""), (9, b"three")]
    assert list(iter_range_lines(io.BytesIO(data), 4, 5)) == [(4, b"two")]  # a line starting in range is read whole
    assert list(iter_range_lines(io.BytesIO(data), 5, 8)) == []  # starts mid-line, next line starts at 8
    assert list(iter_range_lines(io.BytesIO(data), 3, 4)) == []  # byte 3 is a newline, not a line start
    assert list(iter_range_lines(io.BytesIO(data), 100, 200)) == []
    assert list(iter_range_lines(io.BytesIO(data), 2, 2)) == []
    with pytest.raises(ValueError):
        list(iter_range_lines(io.BytesIO(data), 5, 2))


def test_iter_range_lines_reads_only_near_its_range():
    data = b"".join(b"%06d\n" % i for i in range(200_000))  # 1.4 MB
    f = CountingFile(data)
    out = list(iter_range_lines(f, 700_000, 700_070, block_size=4_096))
    assert [line for _, line in out] == [b"100000", b"100001", b"100002", b"100003", b"100004",
                                         b"100005", b"100006", b"100007", b"100008", b"100009"]
    assert f.total_read <= 2 * 4_096


# ---- error mapping ---------------------------------------------------------------------------

@pytest.mark.parametrize("code, status, message, expected", [
    (429, None, "Too many requests", ErrorCode.RATE_LIMITED),
    (None, "RESOURCE_EXHAUSTED", "rate limit hit", ErrorCode.RATE_LIMITED),
    (8, None, "resource exhausted", ErrorCode.RATE_LIMITED),  # gRPC code
    (429, None, "Quota exceeded for requests per minute", ErrorCode.RATE_LIMITED),
    (429, None, "Quota exceeded for aiplatform.googleapis.com/embed requests per day", ErrorCode.QUOTA_EXCEEDED),
    (None, "RESOURCE_EXHAUSTED", "daily limit reached", ErrorCode.QUOTA_EXCEEDED),
    (None, None, "Quota exceeded", ErrorCode.RATE_LIMITED),  # no daily window: back off, do not wait a day
    (429, "RESOURCE_EXHAUSTED", "Resource has been exhausted (e.g. check quota).", ErrorCode.RATE_LIMITED),
    (503, None, "The service is currently unavailable", ErrorCode.UNAVAILABLE),
    (None, "UNAVAILABLE", "", ErrorCode.UNAVAILABLE),
    (14, None, "", ErrorCode.UNAVAILABLE),
    ("503", None, "", ErrorCode.UNAVAILABLE),
    (400, "INVALID_ARGUMENT", "Input text is too long", ErrorCode.TOO_LONG),
    (400, None, "The input token count is 3000 which exceeds the maximum of 2048 tokens", ErrorCode.TOO_LONG),
    (400, None, "token limit exceeded", ErrorCode.TOO_LONG),
    (400, None, "Text contains invalid characters", ErrorCode.INVALID_CHARACTERS),
    (400, None, "control characters are not allowed", ErrorCode.INVALID_CHARACTERS),
    (400, None, "Invalid UTF-8 in request", ErrorCode.INVALID_CHARACTERS),
    (400, "INVALID_ARGUMENT", "Request contains an invalid argument.", ErrorCode.INVALID_INPUT),
    (None, None, "something odd", ErrorCode.INVALID_INPUT),
    (None, None, 'Bad Request: {"error": {"code": 429, "message": "slow down"}}', ErrorCode.RATE_LIMITED),
    (None, None, "503 Service Unavailable", ErrorCode.UNAVAILABLE),
])
def test_classify_error(code, status, message, expected):
    assert classify_error(code, status, message) == expected


# ---- parsing ---------------------------------------------------------------------------------

def test_parse_classic_successes_and_failures():
    v0, v1 = vec(0), vec(1)
    lines = [
        classic_ok("alpha", v0, tokens=3),
        b"",
        classic_ok("beta", v1, tokens=4),
        orjson.dumps({"instance": {"content": "gamma"}, "predictions": [], "status": "Request too long: exceeds 2048 tokens"}),
        orjson.dumps({"instance": {"content": "delta"}, "error": {"code": 429, "message": "Too Many Requests"}}),
        orjson.dumps({"instance": {"content": "eps"}, "error": {"code": 400, "message": "control character \\u0007"}}),
        classic_ok("zeta", vec(2, DIM + 1)),
        classic_ok("eta", vec(3), truncated=True),
        orjson.dumps({"instance": {"content": "theta"}, "status": ""}),
    ]
    block = parse_lines(numbered(lines), CLASSIC, dim=DIM, source="gs://b/predictions_0001.jsonl")
    assert block.keys == [content_key("alpha"), content_key("beta")]
    assert block.vectors.dtype == np.float32 and block.vectors.shape == (2, DIM)
    np.testing.assert_array_equal(block.vectors, np.stack([v0, v1]))
    assert block.token_count == 7 and block.lines == 8
    codes = {f.key: f.code for f in block.failures}
    assert codes == {content_key("gamma"): ErrorCode.TOO_LONG, content_key("delta"): ErrorCode.RATE_LIMITED,
                     content_key("eps"): ErrorCode.INVALID_CHARACTERS, content_key("zeta"): ErrorCode.DIMENSION_MISMATCH,
                     content_key("eta"): ErrorCode.TOO_LONG, content_key("theta"): ErrorCode.MALFORMED_OUTPUT}
    assert all("gs://b/predictions_0001.jsonl byte " in f.message for f in block.failures)
    assert "9 values, expected 8" in next(f.message for f in block.failures if f.code == ErrorCode.DIMENSION_MISMATCH)


def test_parse_gemini_successes_and_failures():
    lines = [
        gemini_ok("k1", vec(1)),
        orjson.dumps({"key": "k2", "request": {}, "status": 'Bad Request: {"error": {"code": 400, "message": '
                      '"Invalid UTF-8 string", "status": "INVALID_ARGUMENT"}}'}),
        orjson.dumps({"key": "k3", "status": {"code": 14, "message": "backend unavailable"}}),
        orjson.dumps({"key": "k4", "error": {"code": 429, "message": "Quota exceeded: requests per day",
                                             "status": "RESOURCE_EXHAUSTED"}}),
        orjson.dumps({"key": "k5", "error": {"code": 400, "message": "Request contains an invalid argument."}}),
        orjson.dumps({"key": 6, "response": {"embeddings": [{"values": vec(6).tolist()}]}}),
        orjson.dumps({"key": "k7", "response": {"embedding": {"values": ["a"] * DIM}}}),
        orjson.dumps({"request": {}, "response": {"embedding": {"values": vec(8).tolist()}}}),
    ]
    block = parse_lines(numbered(lines), GEMINI, dim=DIM, source="out.jsonl", first_line=1)
    assert block.keys == ["k1", "6"]
    np.testing.assert_allclose(block.vectors, np.stack([vec(1), vec(6)]))
    assert [(f.key, f.code) for f in block.failures] == [
        ("k2", ErrorCode.INVALID_CHARACTERS), ("k3", ErrorCode.UNAVAILABLE), ("k4", ErrorCode.QUOTA_EXCEEDED),
        ("k5", ErrorCode.INVALID_INPUT), ("k7", ErrorCode.MALFORMED_OUTPUT), (None, ErrorCode.MALFORMED_OUTPUT)]
    assert "out.jsonl byte " in block.failures[0].message and " line 2" in block.failures[0].message


def test_malformed_and_truncated_lines_fail_only_themselves():
    good = gemini_ok("ok", vec(0))
    trunc = gemini_ok("cut", vec(1))[:-40]
    lines = numbered([b"not json at all", good, b'{"key": "x\\"y", "response": {"embedding": {"val', trunc])
    block = parse_lines(lines, GEMINI, dim=DIM, source="f")
    assert block.keys == ["ok"]
    assert [(f.key, f.code) for f in block.failures] == [
        (None, ErrorCode.MALFORMED_OUTPUT), ('x"y', ErrorCode.MALFORMED_OUTPUT), ("cut", ErrorCode.MALFORMED_OUTPUT)]
    assert f"f byte {lines[3][0]}: malformed or truncated JSON" in block.failures[2].message

    full = classic_ok("complete content", vec(2))
    cut_after = full[:-30]  # content string complete: key recovered from its hash
    cut_inside = orjson.dumps({"instance": {"content": "x" * 50}})[:20]
    block = parse_lines(numbered([cut_after, cut_inside]), CLASSIC, dim=DIM)
    assert [(f.key, f.code) for f in block.failures] == [
        (content_key("complete content"), ErrorCode.MALFORMED_OUTPUT), (None, ErrorCode.MALFORMED_OUTPUT)]


def test_duplicate_keys_within_a_block():
    lines = [gemini_ok("a", vec(1)), orjson.dumps({"key": "a", "status": "429 rate limit"}), gemini_ok("a", vec(2)),
             orjson.dumps({"key": "b", "status": "503"}), orjson.dumps({"key": "b", "status": "503"})]
    block = parse_lines(numbered(lines), GEMINI, dim=DIM)
    assert block.keys == ["a"] and block.duplicates == 1
    np.testing.assert_array_equal(block.vectors[0], vec(1))
    assert [(f.key, f.code) for f in block.failures] == [("b", ErrorCode.UNAVAILABLE)]


def test_empty_block_has_shape():
    block = parse_lines([], GEMINI, dim=DIM)
    assert block.vectors.shape == (0, DIM) and block.keys == [] and block.failures == []


# ---- streaming -------------------------------------------------------------------------------

def write_result_file(path, n, dim, family, start=0, bad_every=0):
    with path.open("wb") as f:
        buf = []
        for i in range(start, start + n):
            v = vec(i, dim)
            if bad_every and i % bad_every == 0:
                line = orjson.dumps({"key": f"k{i}", "instance": {"content": f"text {i}"}, "status": "503 unavailable"})
            elif family == GEMINI:
                line = gemini_ok(f"k{i}", v)
            else:
                line = classic_ok(f"text {i} " + "lorem ipsum " * 10, v)
            buf.append(line + b"\n")
            if len(buf) >= 500:
                f.write(b"".join(buf))
                buf.clear()
        f.write(b"".join(buf))


def test_stream_results_over_ranges_matches_whole_parse(tmp_path):
    files = []
    for j in range(3):
        p = tmp_path / f"predictions_{j}.jsonl"
        write_result_file(p, 40 + j, DIM, GEMINI, start=1000 * j, bad_every=7)
        files.append((str(p), p.stat().st_size))
    ranges = plan_ranges(files, target_bytes=1_000, max_partitions=13)
    assert len(group_by_partition(ranges)) <= 13
    opened = []

    def open_range(r):
        f = open(r.uri, "rb")  # noqa: SIM115 - closed by stream_results
        opened.append(f)
        return f

    blocks = list(stream_results(open_range, ranges, GEMINI, DIM, block_lines=7, block_size=256))
    assert all(b.lines <= 7 for b in blocks) and all(f.closed for f in opened)
    keys = [k for b in blocks for k in b.keys]
    fails = [f.key for b in blocks for f in b.failures]
    expected_fail = [f"k{i}" for j in range(3) for i in range(1000 * j, 1000 * j + 40 + j) if i % 7 == 0]
    expected_ok = [f"k{i}" for j in range(3) for i in range(1000 * j, 1000 * j + 40 + j) if i % 7]
    assert keys == expected_ok and fails == expected_fail
    vectors = np.concatenate([b.vectors for b in blocks])
    np.testing.assert_array_equal(vectors, np.stack([vec(int(k[1:])) for k in keys]))


def test_stream_results_memory_stays_flat_on_a_50mb_file(tmp_path):
    dim = 768
    path = tmp_path / "predictions_0001.jsonl"
    write_result_file(path, 5_800, dim, CLASSIC)
    size = path.stat().st_size
    assert size > 48_000_000
    ranges = plan_ranges([(str(path), size)], target_bytes=8 << 20)

    def open_range(r):
        return open(r.uri, "rb")  # noqa: SIM115 - closed by stream_results

    tracemalloc.start()
    t0 = time.perf_counter()
    n = 0
    checksum = 0.0
    for block in stream_results(open_range, ranges, CLASSIC, dim):
        n += len(block)
        checksum += float(block.vectors[:, 0].sum())
        assert not block.failures
    elapsed = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert n == 5_800
    print(f"\n{size / 1e6:.1f} MB, {n} lines of {dim}-d: peak traced {peak / 1e6:.1f} MB, "
          f"{n / elapsed:,.0f} lines/s under tracemalloc")
    assert peak < 32_000_000


class FakeBlob:
    """``download_as_bytes`` as GCS answers a ranged GET: inclusive ``end``, 416 from the end on."""

    def __init__(self, data):
        self.data, self.requests = data, []

    def download_as_bytes(self, start, end, checksum, single_shot_download):
        from google.api_core.exceptions import RequestRangeNotSatisfiable

        assert checksum is None and single_shot_download
        self.requests.append((start, end))
        if start >= len(self.data):
            raise RequestRangeNotSatisfiable("range not satisfiable")
        return self.data[start:end + 1]


def test_gcs_range_reader_reads_every_line_once_in_ranged_requests():
    from reindex.vertex.gcs import _BlobRangeReader

    rnd = random.Random(7)
    for trial in range(200):
        data, cuts, block = random_lines_case(rnd, [1, 2, 5, 64, 4 << 20])
        got = []
        for start, end in zip(cuts, cuts[1:], strict=False):
            blob = FakeBlob(data)
            with _BlobRangeReader(blob) as f:
                got.extend(iter_range_lines(f, start, end, block_size=block))
            assert all(e - s + 1 <= block for s, e in blob.requests)
            assert all(s < len(data) for s, _ in blob.requests[:-1])  # only the last may hit the end
        assert got == reference_lines(data), (trial, data, cuts, block)
    reader = _BlobRangeReader(FakeBlob(b"abc"))
    with pytest.raises(io.UnsupportedOperation):
        reader.seek(1, io.SEEK_CUR)
    reader.close()
    with pytest.raises(ValueError):
        reader.readinto(bytearray(2))


def test_split_gs_uri_is_strict_about_the_bucket():
    from reindex.vertex.gcs import split_gs_uri

    assert split_gs_uri("gs://bkt/a/b.jsonl") == ("bkt", "a/b.jsonl")
    assert split_gs_uri("gs://bkt") == ("bkt", "")
    assert split_gs_uri("gs://bkt/out/") == ("bkt", "out/")
    for bad in ("gs://", "gs:///x", "s3://bkt/x", "bkt/x", None):
        with pytest.raises(ValueError, match="not a gs:// URI"):
            split_gs_uri(bad)


def test_gcs_adapters_against_the_emulator():
    gcs = pytest.importorskip("reindex.emulators.gcs")
    from reindex.vertex.gcs import GcsRangeOpener, list_result_files
    from reindex.vertex.requests import GcsShardOpener, write_request_shards

    with gcs.gcs_emulator(buckets=["bkt"]) as url:
        client = gcs.anonymous_client(url)
        bucket = client.bucket("bkt")
        opener = GcsShardOpener(bucket, "b1/requests")
        plan = write_request_shards(((f"k{i}", f"text {i}") for i in range(250)), GEMINI, opener,
                                    max_lines_per_shard=100)
        assert [s.lines for s in plan.jobs[0].shards] == [100, 100, 50]
        assert bucket.blob("b1/requests/input-0000-00002.jsonl").download_as_bytes().count(b"\n") == 50
        out = b"".join(gemini_ok(f"k{i}", vec(i)) + b"\n" for i in range(250))
        bucket.blob("b1/out/prediction-x/predictions_0001.jsonl").upload_from_string(out)
        bucket.blob("b1/out/prediction-x/errors_0001.jsonl").upload_from_string(
            b'{"key":"k999","error":{"code":503,"message":"down"}}')
        bucket.blob("b1/out/prediction-x/job.log").upload_from_string(b"x")
        files = list_result_files(client, "gs://bkt/b1/out/")
        assert [u.rsplit("/", 1)[1] for u, _ in files] == ["errors_0001.jsonl", "predictions_0001.jsonl"]
        ranges = plan_ranges(files, target_bytes=5_000)
        assert len(ranges) > 3
        blocks = list(stream_results(GcsRangeOpener(client), ranges, GEMINI, DIM, block_lines=64, block_size=2_048))
    assert sorted(k for b in blocks for k in b.keys) == sorted(f"k{i}" for i in range(250))
    assert [(f.key, f.code) for b in blocks for f in b.failures] == [("k999", ErrorCode.UNAVAILABLE)]


def test_stream_results_names_the_line_of_a_truncated_last_line():
    lines = [classic_ok(f"text {i}", vec(i)) for i in range(3)]
    data = b"\n".join(lines[:2]) + b"\n" + lines[2][: len(lines[2]) // 2]  # the last line is cut off
    ranges = plan_ranges([("mem://predictions_0001.jsonl", len(data))], target_bytes=1 << 20)
    blocks = list(stream_results(lambda r: io.BytesIO(data), ranges, CLASSIC, DIM))
    assert sum(len(b) for b in blocks) == 2
    (failure,) = [f for b in blocks for f in b.failures]
    assert failure.code == ErrorCode.MALFORMED_OUTPUT
    assert "mem://predictions_0001.jsonl byte" in failure.message and " line 3:" in failure.message
    assert failure.key == content_key("text 2")  # the complete content string was recovered
