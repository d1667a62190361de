"""Streaming the lines of one byte range of a seekable binary file, in bounded blocks."""

from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO

DEFAULT_READ_BLOCK = 1 << 20


def iter_range_lines(f: BinaryIO, start: int, end: int, *,
                     block_size: int = DEFAULT_READ_BLOCK) -> Iterator[tuple[int, bytes]]:
    """Yield ``(offset, line)`` for every line whose first byte lies in ``[start, end)``.

    ``f`` must be seekable and binary. A line starts at 0 and after every ``\\n``; ``line`` is its
    bytes without the ``\\n`` (empty lines are yielded as ``b""``; a final line without newline is
    yielded as is — it may be truncated). A line starting in the range is read to its end even past
    ``end``; a range starting mid-line skips to the next line start. Reads at most ``block_size`` bytes
    at a time into one reused buffer (``readinto``): memory is bounded by two blocks plus the longest
    line, never the file, and no block is allocated per read.
    """
    if start < 0 or end < start:
        raise ValueError(f"invalid byte range [{start}, {end})")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if start == end:
        return
    readinto = getattr(f, "readinto", None)
    buf = bytearray(2 * block_size)
    view = memoryview(buf)
    fill = 0  # bytes of buf holding file data; buf[0] is the file's byte ``base``

    def read_more() -> int:
        """Append up to ``block_size`` bytes at ``fill`` (growing buf when full); the count read."""
        nonlocal buf, view
        if fill + block_size > len(buf):
            view.release()
            buf.extend(bytes(max(len(buf), fill + block_size - len(buf))))
            view = memoryview(buf)
        if readinto is not None:
            return readinto(view[fill:fill + block_size]) or 0
        chunk = f.read(block_size)
        view[fill:fill + len(chunk)] = chunk
        return len(chunk)

    if start == 0:
        base = i = 0
        f.seek(0)
    else:  # the first line start >= start follows the first newline at or after start - 1
        base = start - 1
        f.seek(base)
        while True:
            n = read_more()
            if not n:
                return
            j = buf.find(b"\n", 0, n)
            if j >= 0:
                fill, i = n, j + 1
                break
            base += n
    scan = i
    try:
        while base + i < end:
            j = buf.find(b"\n", scan, fill)
            if j < 0:
                if i:  # keep the partial line only: move it to the front
                    view[:fill - i] = view[i:fill]
                    base, fill, i = base + i, fill - i, 0
                scan = fill
                n = read_more()
                if not n:
                    if i < fill:
                        yield base + i, bytes(view[i:fill])
                    return
                fill += n
                continue
            yield base + i, bytes(view[i:j])
            i = scan = j + 1
    finally:
        view.release()
