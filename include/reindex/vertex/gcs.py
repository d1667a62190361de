"""Optional GCS adapters of the result path (take a ``google.cloud.storage`` client; imported lazily).

``split_gs_uri`` is the one place a ``gs://bucket/path`` URI is taken apart.
"""

from __future__ import annotations

import io
from typing import BinaryIO

from reindex.vertex.ranges import ByteRange, is_result_file

GCS_READ_BLOCK = 4 << 20  # bytes per ranged GET when reading results from GCS (fewer round trips)


def split_gs_uri(uri: str) -> tuple[str, str]:
    """``(bucket, path)`` of ``gs://bucket/path`` (path may be empty); ``ValueError`` naming the URI when
    it is not a string, not ``gs://`` or has no bucket."""
    if not isinstance(uri, str) or not uri.startswith("gs://") or len(uri) <= 5:
        raise ValueError(f"not a gs:// URI: {uri!r}")
    bucket, _, path = uri[5:].partition("/")
    if not bucket:
        raise ValueError(f"not a gs:// URI: {uri!r}")
    return bucket, path


def list_result_files(client, output_directory: str) -> list[tuple[str, int]]:
    """``(uri, size)`` of the result files under a job's ``gcs_output_directory`` (gs://bucket/prefix)."""
    bucket, prefix = split_gs_uri(output_directory)
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
