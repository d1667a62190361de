"""Vertex AI batch embeddings: request files, job limits and streaming result parsing.

Pure functions over file-like objects (no Airflow, no network): ``formats`` knows the two model
families and their line formats, ``requests`` writes request shards split into jobs under the
service limits, ``results`` partitions output files into byte ranges and parses them in bounded
blocks. GCS enters only through small optional adapters that take an already-built client/bucket.
"""

from __future__ import annotations

from reindex.vertex.formats import (
    CLASSIC,
    GEMINI,
    MAX_TOKENS_PER_TEXT,
    Family,
    JobLimits,
    content_key,
    family_for,
    limits_for,
    request_line,
)
from reindex.vertex.requests import (
    GcsShardOpener,
    JobInput,
    Rejection,
    RequestPlan,
    ShardInfo,
    write_request_shards,
)
from reindex.vertex.results import (
    BlockParser,
    ByteRange,
    GcsRangeOpener,
    LineFailure,
    ParsedBlock,
    classify_error,
    group_by_partition,
    is_result_file,
    iter_range_lines,
    list_result_files,
    parse_lines,
    plan_ranges,
    stream_results,
)

__all__ = [
    "CLASSIC",
    "GEMINI",
    "MAX_TOKENS_PER_TEXT",
    "BlockParser",
    "ByteRange",
    "Family",
    "GcsRangeOpener",
    "GcsShardOpener",
    "JobInput",
    "JobLimits",
    "LineFailure",
    "ParsedBlock",
    "Rejection",
    "RequestPlan",
    "ShardInfo",
    "classify_error",
    "content_key",
    "family_for",
    "group_by_partition",
    "is_result_file",
    "iter_range_lines",
    "limits_for",
    "list_result_files",
    "parse_lines",
    "plan_ranges",
    "request_line",
    "stream_results",
    "write_request_shards",
]
