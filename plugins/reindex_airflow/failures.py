"""The one place that maps the core's error taxonomy (``reindex.errors``) onto Airflow task outcomes.

A ``TerminalError`` (bad configuration, an unreadable corpus, a store in a state the run cannot use) fails the
task for good with its message — ``AirflowFailException``: no task retry, the message is the task's reason.
Anything else is left to Airflow's task retries (``default_args``): a transient error (a database restart, a
5xx from a service) is what they are for. Data-level failures never reach here: they are per-chunk codes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import ParamSpec, TypeVar

from airflow.sdk.exceptions import AirflowFailException

from reindex.errors import TerminalError

P = ParamSpec("P")
R = TypeVar("R")


@contextmanager
def terminal_errors() -> Iterator[None]:
    """Turn a ``TerminalError`` raised inside into ``AirflowFailException`` with the same message."""
    try:
        yield
    except TerminalError as e:
        raise AirflowFailException(str(e)) from e


def task_outcome(fn: Callable[P, R]) -> Callable[P, R]:
    """Decorate a task callable so a terminal error fails it for good (signature kept for Airflow's context)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with terminal_errors():
            return fn(*args, **kwargs)

    return wrapper
