"""Error taxonomy: exceptions raised by the core and the per-chunk error codes it records."""

from __future__ import annotations

from enum import StrEnum


class ReindexError(Exception):
    """Base class of every error the core raises on purpose."""


class ConfigError(ReindexError, ValueError):
    """A configuration value or run parameter is invalid; the message names it and its limit."""


class CorpusError(ReindexError):
    """The corpus cannot be read as a whole (missing, empty, unsupported)."""


class EmptyCorpusError(CorpusError):
    """The corpus holds no document that could be chunked."""


class StoreError(ReindexError):
    """The vector store is in a state the pipeline cannot work with."""


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
    DECODE_ERROR = "DECODE_ERROR"  # documents only: not UTF-8
    UNREADABLE = "UNREADABLE"  # documents only: a path that could not be read (permission, loop, corrupt, I/O)
    BAD_DOCUMENT = "BAD_DOCUMENT"  # documents only: missing id/text, too large, invalid JSON
