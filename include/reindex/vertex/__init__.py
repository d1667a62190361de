"""Vertex AI batch embeddings: request files, job limits and streaming result parsing.

Pure functions over file-like objects (no Airflow, no network): ``formats`` knows the two model
families and their line formats, ``requests`` writes request shards split into jobs under the
service limits; ``ranges`` partitions output files into byte ranges, ``lines`` streams a range's
lines, ``parse`` parses them in bounded blocks and ``classify`` maps Google errors to error codes.
GCS enters only through small optional adapters (``gcs``) that take an already-built client/bucket.
"""

from __future__ import annotations

from reindex.classify import classify_error
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
from reindex.vertex.gcs import GcsRangeOpener, list_result_files
from reindex.vertex.lines import iter_range_lines
from reindex.vertex.parse import BlockParser, LineFailure, ParsedBlock, parse_lines, stream_results
from reindex.vertex.ranges import ByteRange, group_by_partition, is_result_file, plan_ranges
from reindex.vertex.requests import (
    GcsShardOpener,
    JobInput,
    Rejection,
    RequestPlan,
    ShardInfo,
    write_request_shards,
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
