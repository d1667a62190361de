import io

import orjson
import pytest

from reindex.errors import ErrorCode
from reindex.vertex.formats import CLASSIC, GEMINI, JobLimits, content_key, request_line
from reindex.vertex.requests import GcsShardOpener, write_request_shards


class Shards:
    """open_shard writing local files; remembers open order and how many rows were consumed then."""

    def __init__(self, root, consumed=None):
        self.root, self.opened, self.files, self.consumed = root, [], [], consumed

    def __call__(self, job, shard):
        self.opened.append((job, shard, self.consumed[0] if self.consumed else None))
        path = self.root / f"job-{job}" / f"requests-{shard}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        f = path.open("wb")
        self.files.append(f)
        return f

    def read(self, job, shard):
        return (self.root / f"job-{job}" / f"requests-{shard}.jsonl").read_bytes()


def classic_rows(n, prefix="text"):
    for i in range(n):
        text = f"{prefix} number {i}"
        yield content_key(text), text


def test_classic_split_at_prompt_limit(tmp_path):
    shards = Shards(tmp_path)
    plan = write_request_shards(classic_rows(20), CLASSIC, shards, limits=JobLimits(max_rows=7),
                                max_lines_per_shard=3)
    assert [j.lines for j in plan.jobs] == [7, 7, 6]
    assert [[s.lines for s in j.shards] for j in plan.jobs] == [[3, 3, 1], [3, 3, 1], [3, 3]]
    assert [j.index for j in plan.jobs] == [0, 1, 2]
    assert all(f.closed for f in shards.files)
    expected = [request_line(k, t, CLASSIC) for k, t in classic_rows(20)]
    written = b"".join(shards.read(j.index, s.index) for j in plan.jobs for s in j.shards)
    assert written == b"".join(expected)
    for j in plan.jobs:
        for s in j.shards:
            assert s.bytes == len(shards.read(j.index, s.index))
    assert plan.lines == 20 and plan.bytes == len(written) and not plan.rejected
    assert plan.jobs[1].to_dict()["shards"][0] == {"index": 0, "lines": 3, "bytes": plan.jobs[1].shards[0].bytes}


def test_default_classic_limit_is_30000(tmp_path):
    plan = write_request_shards(((f"k{i}", "x") for i in range(30_001)), GEMINI, Shards(tmp_path),
                                limits=JobLimits(max_rows=30_000))
    assert [j.lines for j in plan.jobs] == [30_000, 1]


def test_gemini_split_by_bytes(tmp_path):
    rows = [(f"key-{i}", "w" * (i % 50 + 1)) for i in range(300)]
    max_bytes = 2_000
    shards = Shards(tmp_path)
    plan = write_request_shards(rows, GEMINI, shards, output_dimensionality=768,
                                limits=JobLimits(max_rows=1_000, max_bytes=max_bytes), max_shard_bytes=700)
    assert len(plan.jobs) > 1 and plan.lines == 300
    for j in plan.jobs:
        assert j.bytes <= max_bytes
        assert all(s.bytes <= 700 for s in j.shards)
    keys = [orjson.loads(line)["key"] for j in plan.jobs for s in j.shards
            for line in shards.read(j.index, s.index).splitlines()]
    assert keys == [k for k, _ in rows]


def test_streaming_opens_shards_lazily_and_in_order(tmp_path):
    consumed = [0]

    def rows():
        for i in range(5_000):
            consumed[0] += 1
            yield f"k{i}", f"text {i}"

    shards = Shards(tmp_path, consumed)
    plan = write_request_shards(rows(), GEMINI, shards, limits=JobLimits(max_rows=2_000), max_lines_per_shard=500)
    assert [(j, s) for j, s, _ in shards.opened] == [(j, s) for j in range(3) for s in range(4)][:10]
    # each shard was opened when its first row arrived: the input was never read ahead
    assert [c for _, _, c in shards.opened] == [1 + 500 * k for k in range(10)]
    assert [j.lines for j in plan.jobs] == [2_000, 2_000, 1_000]


def test_no_rows_no_files(tmp_path):
    shards = Shards(tmp_path)
    plan = write_request_shards([], CLASSIC, shards)
    assert plan.jobs == [] and shards.opened == []


def test_rejections_are_per_row(tmp_path):
    long_text = "я" * 600  # 1,200 bytes
    rows = [("a", "ok"), ("b", ""), ("c", "  \n\t"), ("d", long_text), ("e", "bad \ud800"), ("f", "fine")]
    shards = Shards(tmp_path)
    plan = write_request_shards(rows, GEMINI, shards, limits=JobLimits(max_rows=10, max_text_bytes=1_000))
    assert plan.lines == 2
    got = {r.key: r.code for r in plan.rejected}
    assert got == {"b": ErrorCode.INVALID_INPUT, "c": ErrorCode.INVALID_INPUT, "d": ErrorCode.TOO_LONG,
                   "e": ErrorCode.INVALID_CHARACTERS}
    assert "1200 bytes" in next(r.message for r in plan.rejected if r.key == "d")


def test_line_larger_than_job_limit_rejected_via_callback(tmp_path):
    seen = []
    plan = write_request_shards([("a", "x" * 500), ("b", "y")], GEMINI, Shards(tmp_path),
                                limits=JobLimits(max_rows=10, max_bytes=300), on_reject=seen.append)
    assert [r.key for r in seen] == ["a"] and seen[0].code == ErrorCode.TOO_LONG
    assert plan.rejected == [] and plan.lines == 1


def test_duplicates_sent_once_per_job(tmp_path):
    text = "same content"
    key = content_key(text)
    rows = [(key, text), (key, text), (content_key("other"), "other"), (key, text)]
    plan = write_request_shards(rows, CLASSIC, Shards(tmp_path))
    assert plan.lines == 2 and plan.duplicates == 2
    rows2 = [(key, text), (content_key("other"), "other"), (content_key("third"), "third"), (key, text)]
    plan = write_request_shards(rows2, CLASSIC, Shards(tmp_path / "x"), limits=JobLimits(max_rows=2))
    assert [j.lines for j in plan.jobs] == [2, 2] and plan.duplicates == 0  # resent in the next job
    plan = write_request_shards(rows, CLASSIC, Shards(tmp_path / "y"), dedupe=False)
    assert plan.lines == 4 and plan.duplicates == 0


def test_caller_bug_raises_and_closes_file(tmp_path):
    shards = Shards(tmp_path)
    with pytest.raises(ValueError, match="sha256"):
        write_request_shards([(content_key("a"), "a"), ("not-a-hash", "b")], CLASSIC, shards)
    assert shards.files and all(f.closed for f in shards.files)

    def broken():
        yield "k", "v"
        raise RuntimeError("source failed")

    shards = Shards(tmp_path / "b")
    with pytest.raises(RuntimeError, match="source failed"):
        write_request_shards(broken(), GEMINI, shards)
    assert all(f.closed for f in shards.files)


def test_gcs_shard_opener_with_fake_bucket():
    class Blob:
        def __init__(self, store, name):
            self.store, self.name = store, name

        def open(self, mode, chunk_size=None):
            assert mode == "wb" and chunk_size % (256 * 1024) == 0
            store, name = self.store, self.name

            class W(io.BytesIO):
                def close(self):
                    store[name] = self.getvalue()
                    super().close()

            return W()

    class Bucket:
        name = "bkt"

        def __init__(self):
            self.objects = {}

        def blob(self, name):
            return Blob(self.objects, name)

    bucket = Bucket()
    opener = GcsShardOpener(bucket, "/runs/b1/")
    plan = write_request_shards([("k1", "a"), ("k2", "b")], GEMINI, opener, max_lines_per_shard=1)
    assert opener.job_uris(plan.jobs[0]) == ["gs://bkt/runs/b1/input-0000-00000.jsonl",
                                              "gs://bkt/runs/b1/input-0000-00001.jsonl"]
    assert orjson.loads(bucket.objects["runs/b1/input-0000-00001.jsonl"])["key"] == "k2"
