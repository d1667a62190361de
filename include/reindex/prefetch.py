"""Producing the items of an iterator in a background thread, ahead of the consumer.

One helper for every place that overlaps two stages: the Vertex result parser runs a block or two
ahead of the database load (``reindex.vertex.parse.stream_results``), the local encoder tokenizes the
next batch while the GPU runs the current one (``reindex.embeddings.local``).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import TypeVar

T = TypeVar("T")

_END = object()


def prefetched(items: Iterator[T], depth: int = 1, *, name: str = "reindex-prefetch") -> Iterator[T]:
    """The items of ``items`` in order, produced in a background thread named ``name``.

    Contract: while the consumer works on an item, the thread produces the next one, and at most
    ``depth`` finished items wait for the consumer besides it (``depth=0``: only the next item is
    produced ahead). An error raised by ``items`` is re-raised to the consumer in its place in the
    order, after the items before it. The thread starts on the first ``next``; closing the returned
    generator (or leaving its loop) stops the thread and closes ``items`` (when it has ``close``)
    from that thread, before the close returns.
    """
    if depth < 0:
        raise ValueError(f"depth must be >= 0, got {depth}")
    results: queue.SimpleQueue = queue.SimpleQueue()
    # One slot per item the thread may hold that the consumer has not taken: the one in production
    # plus ``depth`` finished ones. The consumer frees a slot as it takes an item.
    slots = threading.Semaphore(depth + 1)
    stop = threading.Event()

    def produce() -> None:
        try:
            while True:
                slots.acquire()
                if stop.is_set():
                    return
                item = next(items, _END)
                results.put((item, None))
                if item is _END:
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            results.put((_END, e))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name=name, daemon=True)
    thread.start()
    try:
        while True:
            item, error = results.get()
            slots.release()
            if error is not None:
                raise error
            if item is _END:
                return
            yield item
    finally:
        stop.set()
        slots.release()  # wake a thread waiting for a slot, so that it sees ``stop``
        thread.join()
