"""Writing Vertex batch request files: stream rows into JSONL shards, split into jobs under the limits.

``write_request_shards`` consumes ``(key, text)`` rows one at a time (never holding them all) and
writes request lines (``formats.request_line``) to shard files it obtains from ``open_shard(job,
shard)`` and closes itself. A new job starts whenever the next line would exceed the job's row
limit (classic: 30,000 prompts; gemini: 1,000,000 rows) or byte limit (gemini: 1 GB); a new shard
starts every ``max_lines_per_shard`` lines (or ``max_shard_bytes``). Files are opened lazily, so no
empty shard or job exists; shard names chosen by ``open_shard`` should be deterministic, so a rerun
overwrites the same files.

Rows are never silently lost. A row that cannot be sent is *rejected* with a per-row reason and
appears in ``RequestPlan.rejected`` (or is passed to ``on_reject``) instead of being written:

* empty or whitespace-only text → ``INVALID_INPUT``;
* text that is not valid Unicode (lone surrogates, cannot be encoded) → ``INVALID_CHARACTERS``;
* text over ``limits.max_text_bytes`` UTF-8 bytes, or a line that alone exceeds the job byte limit →
  ``TOO_LONG`` (the retry policy re-splits such chunks).

Duplicate keys (identical content under classic's content-hash key) are sent once per job: with
``dedupe=True`` (default) a key already written in the current job is skipped and counted in
``RequestPlan.duplicates``; the caller maps every result key back to all chunks sharing it. The set
of seen keys is bounded by the job's row limit (≈100 bytes per key). Pass ``dedupe=False`` when the
rows are known to be distinct (e.g. ``SELECT DISTINCT ON (content_sha256)``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import BinaryIO, NamedTuple

from reindex.errors import ErrorCode
from reindex.vertex.formats import DEFAULT_TASK_TYPE, Family, JobLimits, limits_for, request_line

DEFAULT_MAX_LINES_PER_SHARD = 50_000
_WRITE_BUFFER_BYTES = 1 << 20


class Rejection(NamedTuple):
    """A row that was not written: its key, the error code to record on its chunk(s), and why."""

    key: str
    code: ErrorCode
    message: str


@dataclass(frozen=True)
class ShardInfo:
    """One request file of a job: shard index, lines and bytes written."""

    index: int
    lines: int
    bytes: int


@dataclass
class JobInput:
    """The input of one batch job: its index and its shards (in write order)."""

    index: int
    shards: list[ShardInfo] = field(default_factory=list)

    @property
    def lines(self) -> int:
        return sum(s.lines for s in self.shards)

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    def to_dict(self) -> dict:
        """A JSON-able manifest (for XCom): counts only, never texts."""
        return {"index": self.index, "lines": self.lines, "bytes": self.bytes,
                "shards": [{"index": s.index, "lines": s.lines, "bytes": s.bytes} for s in self.shards]}


@dataclass
class RequestPlan:
    """What ``write_request_shards`` wrote: the jobs, the rejected rows and the skipped duplicates."""

    jobs: list[JobInput] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    duplicates: int = 0

    @property
    def lines(self) -> int:
        return sum(j.lines for j in self.jobs)

    @property
    def bytes(self) -> int:
        return sum(j.bytes for j in self.jobs)


def check_text(text: str, limits: JobLimits) -> tuple[ErrorCode, str] | None:
    """Why ``text`` cannot be sent (code, message), or None. Does not check encodability."""
    if not text or text.isspace():
        return ErrorCode.INVALID_INPUT, "empty text: nothing to embed"
    if len(text) * 4 > limits.max_text_bytes:  # may be over (UTF-8 is at most 4 bytes a char): measure
        size = len(text.encode("utf-8", "surrogatepass"))
        if size > limits.max_text_bytes:
            return ErrorCode.TOO_LONG, (
                f"text of {size} bytes exceeds the {limits.max_text_bytes}-byte request limit "
                f"(cannot be within the model's token limit)")
    return None


class _ShardSink:
    """The open shard of the current job, with buffered writes."""

    def __init__(self, f: BinaryIO, index: int) -> None:
        self.f, self.index, self.lines, self.bytes = f, index, 0, 0
        self._pending: list[bytes] = []
        self._pending_bytes = 0

    def write(self, line: bytes) -> None:
        self._pending.append(line)
        self._pending_bytes += len(line)
        self.lines += 1
        self.bytes += len(line)
        if self._pending_bytes >= _WRITE_BUFFER_BYTES:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            self.f.write(b"".join(self._pending))
            self._pending.clear()
            self._pending_bytes = 0

    def close(self) -> ShardInfo:
        try:
            self.flush()
        finally:
            self.f.close()
        return ShardInfo(self.index, self.lines, self.bytes)


def write_request_shards(
    rows: Iterable[tuple[str, str]],
    family: Family,
    open_shard: Callable[[int, int], BinaryIO],
    *,
    task_type: str = DEFAULT_TASK_TYPE,
    output_dimensionality: int | None = None,
    limits: JobLimits | None = None,
    max_lines_per_shard: int = DEFAULT_MAX_LINES_PER_SHARD,
    max_shard_bytes: int | None = None,
    dedupe: bool = True,
    on_reject: Callable[[Rejection], None] | None = None,
) -> RequestPlan:
    """Stream ``(key, text)`` rows into request shards grouped into jobs; return the plan.

    ``open_shard(job_index, shard_index)`` must return a writable binary file; it is called only
    when the first line of that shard is ready and the file is closed here (also on error). Job
    and shard indices start at 0 and are contiguous; shard indices restart at 0 in every job.
    ``limits`` defaults to ``limits_for(family)``. Rejected rows go to ``on_reject`` when given,
    else into ``RequestPlan.rejected``. ``ValueError`` from ``request_line`` (a classic key that is
    not the text's sha256, an unknown task type) propagates: it is a caller bug, not bad data.
    """
    limits = limits or limits_for(family)
    if max_lines_per_shard < 1:
        raise ValueError(f"max_lines_per_shard must be >= 1, got {max_lines_per_shard}")
    plan = RequestPlan()
    reject = on_reject or plan.rejected.append
    job: JobInput | None = None
    job_lines = job_bytes = 0
    sink: _ShardSink | None = None
    seen: set[str] = set()

    def close_shard() -> None:
        nonlocal sink
        if sink is not None:
            s, sink = sink, None
            job.shards.append(s.close())

    try:
        for key, text in rows:
            problem = check_text(text, limits)
            if problem is not None:
                reject(Rejection(key, *problem))
                continue
            if dedupe and key in seen:
                plan.duplicates += 1
                continue
            try:
                line = request_line(key, text, family, task_type=task_type,
                                    output_dimensionality=output_dimensionality)
            except TypeError as e:  # orjson.JSONEncodeError: lone surrogates, not valid Unicode
                reject(Rejection(key, ErrorCode.INVALID_CHARACTERS, f"text is not valid Unicode: {e}"))
                continue
            size = len(line)
            if limits.max_bytes is not None and size > limits.max_bytes:
                reject(Rejection(key, ErrorCode.TOO_LONG,
                                 f"request line of {size} bytes exceeds the job limit of {limits.max_bytes} bytes"))
                continue
            if job is not None and (job_lines + 1 > limits.max_rows or (
                    limits.max_bytes is not None and job_bytes + size > limits.max_bytes)):
                close_shard()
                plan.jobs.append(job)
                job = None
                seen.clear()
            if job is None:
                job = JobInput(index=len(plan.jobs))
                job_lines = job_bytes = 0
            if sink is not None and (sink.lines >= max_lines_per_shard or (
                    max_shard_bytes is not None and sink.bytes + size > max_shard_bytes)):
                close_shard()
            if sink is None:
                sink = _ShardSink(open_shard(job.index, len(job.shards)), len(job.shards))
            sink.write(line)
            job_lines += 1
            job_bytes += size
            if dedupe:
                seen.add(key)
        close_shard()
    finally:
        if sink is not None:  # an error mid-stream: release the file, keep the exception
            with contextlib.suppress(Exception):  # the original error matters more
                sink.f.close()
    if job is not None:
        plan.jobs.append(job)
    return plan


class GcsShardOpener:
    """Optional adapter: ``open_shard`` writing ``gs://<bucket>/<prefix>/input-0000-00000.jsonl`` (job, shard).

    ``bucket`` is a ``google.cloud.storage.Bucket`` (or anything with ``.name`` and ``.blob(name)``
    whose blobs support ``open("wb", chunk_size=...)``). ``chunk_size`` bounds the upload buffer.
    """

    def __init__(self, bucket, prefix: str, *, chunk_size: int = 8 * 1024 * 1024) -> None:
        self.bucket, self.prefix, self.chunk_size = bucket, prefix.strip("/"), chunk_size

    def object_name(self, job: int, shard: int) -> str:
        return f"{self.prefix}/input-{job:04d}-{shard:05d}.jsonl"

    def uri(self, job: int, shard: int) -> str:
        return f"gs://{self.bucket.name}/{self.object_name(job, shard)}"

    def job_uris(self, job: JobInput) -> list[str]:
        """The input URIs of one job, for the batch job's ``gcs_source``."""
        return [self.uri(job.index, s.index) for s in job.shards]

    def __call__(self, job: int, shard: int) -> BinaryIO:
        return self.bucket.blob(self.object_name(job, shard)).open("wb", chunk_size=self.chunk_size)
