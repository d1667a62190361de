"""Error taxonomy: the exceptions the core raises on purpose, each terminal or transient by type, and the
per-chunk (and per-document) error codes it records.

An exception's kind is its type, never its text (as dlt's ``TerminalException`` / ``TransientException``):
a ``TerminalError`` means the same input cannot succeed on a retry (the run fails for good, with the
message); a ``TransientError`` means it may succeed later. The Airflow layer maps the two in one place
(``plugins/reindex_airflow/failures.py``). Per-chunk failures are not exceptions: they are ``ErrorCode``
values on the chunk, and ``reindex.retry.decide`` says what happens to each.
"""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from reindex.store.leases import Lease


class TerminalError(Exception):
    """Mixin: retrying the same input cannot help; the message names the input and what to change."""


class TransientError(Exception):
    """Mixin: the same call may succeed later (a busy corpus, a service that recovers)."""


class ReindexError(Exception):
    """Base class of every error the core raises on purpose."""


class ConfigError(ReindexError, TerminalError, ValueError):
    """A configuration value or run parameter is invalid; the message names it and its limit."""


class CorpusError(ReindexError, TerminalError):
    """The corpus cannot be read as a whole (missing, empty, unsupported)."""


class EmptyCorpusError(CorpusError):
    """The corpus holds no document that could be chunked."""


class StoreError(ReindexError, TerminalError):
    """The vector store is in a state the pipeline cannot work with (no such corpus or store, a vector
    that does not fit its table, a model that changed during the run)."""


class CorpusBusyError(ReindexError, TransientError):
    """Another run holds the corpus's lease (``holder``); it ends when that run's batch closes."""

    def __init__(self, message: str, holder: Lease) -> None:
        super().__init__(message)
        self.holder = holder


class ServiceAuthError(ReindexError, TerminalError):
    """The embedding service refused the run's credentials (HTTP 401/403): no chunk is to blame, nothing is
    retried; the message names the service and the connection to fix (never the key)."""


class ServiceUnavailableError(ReindexError, TransientError):
    """The embedding service could not be reached or answered 5xx where no chunk is concerned (model info)."""


def is_terminal(exc: BaseException) -> bool:
    """Whether retrying cannot help: a ``TerminalError`` (anything else is left to the caller's retries)."""
    return isinstance(exc, TerminalError)


class ErrorCode(StrEnum):
    """Why a chunk (or a document) failed. Stored verbatim in ``chunks.error_code``."""

    RATE_LIMITED = "RATE_LIMITED"  # 429 / RESOURCE_EXHAUSTED
    UNAVAILABLE = "UNAVAILABLE"  # 503
    TOO_LONG = "TOO_LONG"  # input over the model's token limit
    INVALID_CHARACTERS = "INVALID_CHARACTERS"
    QUOTA_EXCEEDED = "QUOTA_EXCEEDED"  # daily quota
    INVALID_INPUT = "INVALID_INPUT"  # 400 and anything the service rejects for good
    MALFORMED_OUTPUT = "MALFORMED_OUTPUT"  # a result line that cannot be parsed
    MISSING_FROM_OUTPUT = "MISSING_FROM_OUTPUT"
    DIMENSION_MISMATCH = "DIMENSION_MISMATCH"
    NON_FINITE = "NON_FINITE"
    NOT_NORMALIZED = "NOT_NORMALIZED"
    ENCODER_ERROR = "ENCODER_ERROR"  # the local encoder raised for this text
    TRANSIENT_ENCODER_ERROR = "TRANSIENT_ENCODER_ERROR"  # e.g. device out of memory
    NOT_PROCESSED = "NOT_PROCESSED"  # its partition task never finished
    JOB_FAILED = "JOB_FAILED"  # the batch job ended FAILED / CANCELLED / EXPIRED without a result for it
    SUBMIT_FAILED = "SUBMIT_FAILED"  # the batch job could not be submitted (configuration, permission)
    ABANDONED = "ABANDONED"  # its run died holding the corpus; another run took the corpus over
    MODEL_CHANGED = "MODEL_CHANGED"  # the embedding service answered with another model than the batch's
    DECODE_ERROR = "DECODE_ERROR"  # documents only: not UTF-8
    UNREADABLE = "UNREADABLE"  # documents only: a path that could not be read (permission, loop, corrupt, I/O)
    BAD_DOCUMENT = "BAD_DOCUMENT"  # documents only: missing id/text, too large, invalid JSON
