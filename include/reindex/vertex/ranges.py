"""Result files of Vertex batch jobs cut into byte ranges, grouped into partitions (one mapped task each).

Output files (classic: ``prediction-<model>-<time>/predictions_0001.jsonl…`` and ``errors_0001.jsonl…``;
gemini: ``predictions*.jsonl``) are partitioned by ``plan_ranges`` into byte ranges grouped into at
most ``max_partitions`` partitions. A range is read by ``reindex.vertex.lines.iter_range_lines``:
adjacent ranges together yield every line exactly once.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import NamedTuple


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
