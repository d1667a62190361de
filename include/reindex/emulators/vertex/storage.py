"""The Cloud Storage side of a job: its input objects read as lines, its output files written in rolls."""

from __future__ import annotations

import fnmatch
import re
import tempfile
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import Any

from reindex.emulators.vertex.jobs import CODE_NOT_FOUND, JobError
from reindex.vertex.gcs import split_gs_uri

_READ_CHUNK = 1 << 20


def resolve_inputs(client, uris: list[str]) -> list[Any]:
    """The input objects of a job, in order: each URI's object, or the objects a wildcard URI matches
    (sorted by name); ``JobError`` NOT_FOUND when a URI names or matches none."""
    from google.api_core import exceptions as gexc

    blobs = []
    for uri in uris:
        bucket_name, path = split_gs_uri(uri)
        bucket = client.bucket(bucket_name)
        try:
            if "*" in path or "?" in path:
                prefix = re.split(r"[*?\[]", path, maxsplit=1)[0]
                found = sorted((b for b in client.list_blobs(bucket_name, prefix=prefix)
                                if fnmatch.fnmatchcase(b.name, path)), key=lambda b: b.name)
                if not found:
                    raise JobError(CODE_NOT_FOUND, f"No files match the input URI {uri}.")
                blobs.extend(found)
            else:
                blob = bucket.blob(path)
                blob.reload()
                blobs.append(blob)
        except gexc.NotFound as e:
            raise JobError(CODE_NOT_FOUND, f"Input file {uri} not found.") from e
    return blobs


def iter_lines(blobs: Iterable[Any]) -> Iterator[bytes]:
    """Non-blank lines of every blob, streamed in 1 MiB chunks (trailing ``\\r`` removed)."""
    for blob in blobs:
        with blob.open("rb", chunk_size=_READ_CHUNK) as f:
            rest = b""
            while True:
                data = f.read(_READ_CHUNK)
                if not data:
                    break
                lines = (rest + data).split(b"\n")
                rest = lines.pop()
                for line in lines:
                    if line.strip():
                        yield line.removesuffix(b"\r")
            if rest.strip():
                yield rest.removesuffix(b"\r")


def folder_stamp(t: float) -> str:
    """The time in an output folder's name, as Vertex writes it: ``YYYY_MM_DDTHH_MM_SS_mmmZ`` (UTC)."""
    d = datetime.fromtimestamp(t, UTC)
    return d.strftime("%Y_%m_%dT%H_%M_%S_") + f"{d.microsecond // 1000:03d}Z"


class RollingSink:
    """JSONL lines into ``<dir>/<stem>_0001.jsonl, …``, ``per_file`` lines each, uploaded when full."""

    def __init__(self, bucket, folder: str, stem: str, per_file: int) -> None:
        self.bucket, self.folder, self.stem, self.per_file = bucket, folder, stem, per_file
        self.files: list[str] = []
        self._tmp = None
        self._count = 0
        self._last_line_start = 0
        self._last_line_len = 0

    def write(self, line: bytes) -> None:
        if self._tmp is None or self._count >= self.per_file:
            self._upload()
            self._tmp = tempfile.TemporaryFile(prefix="vertex-emu-")  # noqa: SIM115 - closed by _upload
            self._count = 0
        self._last_line_start = self._tmp.tell()
        self._last_line_len = len(line)
        self._tmp.write(line)
        self._tmp.write(b"\n")
        self._count += 1

    def close(self, truncate_last_line: bool = False) -> list[str]:
        """Upload the current file (its last line cut in half if asked); return the object names."""
        if self._tmp is not None and truncate_last_line:
            self._tmp.truncate(self._last_line_start + max(1, self._last_line_len // 2))
        self._upload()
        return self.files

    def _upload(self) -> None:
        if self._tmp is None:
            return
        name = f"{self.folder}/{self.stem}_{len(self.files) + 1:04d}.jsonl"
        try:
            self.bucket.blob(name).upload_from_file(self._tmp, rewind=True, content_type="application/jsonl")
        finally:
            self._tmp.close()
            self._tmp = None
        self.files.append(name)
