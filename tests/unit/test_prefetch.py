"""reindex.prefetch: items made in a background thread arrive in order, errors in their place, and a
closed consumer stops the thread."""

from __future__ import annotations

import threading

import pytest

from reindex.prefetch import prefetched


def _threads(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == name and t.is_alive()]


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_items_arrive_in_order_from_the_named_thread(depth):
    made_in = []

    def items():
        for i in range(10):
            made_in.append(threading.current_thread().name)
            yield i * i

    assert list(prefetched(items(), depth, name="test-prefetch")) == [i * i for i in range(10)]
    assert set(made_in) == {"test-prefetch"}
    assert _threads("test-prefetch") == []
    assert list(prefetched(iter([]), depth)) == []


def test_an_error_is_raised_after_the_items_before_it():
    def items():
        yield from range(3)
        raise OSError("item 3 unreadable")

    got = []
    with pytest.raises(OSError, match="item 3 unreadable"):
        for item in prefetched(items(), 1, name="test-prefetch-error"):
            got.append(item)
    assert got == [0, 1, 2]
    assert _threads("test-prefetch-error") == []


def test_closing_stops_the_thread_and_closes_the_source():
    closed = []

    def items():
        try:
            yield from range(1000)
        finally:
            closed.append(threading.current_thread().name)

    gen = prefetched(items(), 0, name="test-prefetch-close")
    assert next(gen) == 0
    assert len(_threads("test-prefetch-close")) == 1
    gen.close()
    assert closed == ["test-prefetch-close"]  # closed in the producer thread, before close() returned
    assert _threads("test-prefetch-close") == []


def test_a_plain_iterator_without_close_is_accepted():
    assert list(prefetched(iter(range(5)), 2)) == [0, 1, 2, 3, 4]


def test_a_negative_depth_is_refused():
    with pytest.raises(ValueError, match="depth must be >= 0, got -1"):
        list(prefetched(iter([1]), -1))
