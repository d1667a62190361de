"""Vertex AI batch embedding model families, their request line formats and job limits.

Two families (README "Google batch facts"):

* ``classic`` — ``text-embedding-005``, ``text-multilingual-embedding-002``, ``textembedding-gecko*``.
  Input line ``{"content": text, "task_type": ...}``. The output echoes the instance, so results
  are joined to chunks by the sha256 (hex, of the UTF-8 text) of the echoed ``instance.content`` —
  never by line order. The key is therefore *not* written to the line; callers pass
  ``key = sha256(text)`` and ``request_line`` checks it. The output dimensionality of a classic
  model is a job-level parameter, not part of the line. At most 30,000 prompts per job.
* ``gemini`` — ``gemini-embedding-001``. Input line
  ``{"key": k, "request": {"content": {"parts": [{"text": t}]},
  "embed_content_config": {"output_dimensionality": d, "task_type": ...}}}``; joined by ``key``.
  At most 1,000,000 rows and 1 GB of input per job.

Every text must be at most 2,048 tokens (``autoTruncate=false`` makes longer input an error).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

import orjson

from reindex.errors import ConfigError

Family = Literal["classic", "gemini"]
CLASSIC: Family = "classic"
GEMINI: Family = "gemini"

MAX_TOKENS_PER_TEXT = 2048
CLASSIC_MAX_PROMPTS_PER_JOB = 30_000
GEMINI_MAX_ROWS_PER_JOB = 1_000_000
GEMINI_MAX_BYTES_PER_JOB = 1_000_000_000  # "1 GB", read as decimal: the stricter reading
# A text larger than this cannot realistically be <= 2,048 tokens: it is rejected locally as TOO_LONG
# (so the retry policy re-splits it) instead of costing a round trip through a batch job.
MAX_TEXT_BYTES = 64 * 1024

DEFAULT_TASK_TYPE = "RETRIEVAL_DOCUMENT"
TASK_TYPES = frozenset({
    "RETRIEVAL_DOCUMENT", "RETRIEVAL_QUERY", "SEMANTIC_SIMILARITY", "CLASSIFICATION", "CLUSTERING",
    "QUESTION_ANSWERING", "FACT_VERIFICATION", "CODE_RETRIEVAL_QUERY",
})

# The model tables (one place: the settings' model specs and the emulator read them from here).
CLASSIC_MODELS = ("text-embedding-005", "text-multilingual-embedding-002")
CLASSIC_PREFIXES = ("textembedding-gecko",)
GEMINI_MODELS = ("gemini-embedding-001",)
CLASSIC_DIM = 768  # output dimension of every classic model: its default and its maximum
GEMINI_DIM = 3072  # gemini-embedding-001's default and maximum output dimension
# Default output dimension of each supported model (a ``textembedding-gecko*`` model has none here).
MODEL_DIMS = {**dict.fromkeys(CLASSIC_MODELS, CLASSIC_DIM), **dict.fromkeys(GEMINI_MODELS, GEMINI_DIM)}
# What the service itself takes as a classic embedding model (the emulator's check): every
# text-embedding, text-multilingual-embedding and gecko model, also those this client does not
# support (text-embedding-004).
SERVICE_CLASSIC_PREFIXES = ("textembedding-gecko", "text-embedding-", "text-multilingual-embedding-")
_PUBLISHER_PREFIX = "publishers/google/models/"


@dataclass(frozen=True)
class JobLimits:
    """Limits one batch job's input must respect. ``max_bytes`` is None where the service sets none."""

    max_rows: int
    max_bytes: int | None = None
    max_text_bytes: int = MAX_TEXT_BYTES

    def __post_init__(self) -> None:
        if self.max_rows < 1:
            raise ConfigError(f"max_rows must be >= 1, got {self.max_rows}")
        if self.max_bytes is not None and self.max_bytes < 1:
            raise ConfigError(f"max_bytes must be >= 1 or None, got {self.max_bytes}")
        if self.max_text_bytes < 1:
            raise ConfigError(f"max_text_bytes must be >= 1, got {self.max_text_bytes}")


def family_for(model: str) -> Family:
    """The family of a Vertex embedding model name (``publishers/google/models/`` prefix allowed).

    Raises ``ConfigError`` naming the supported models for anything else.
    """
    name = model.strip()
    if name.startswith(_PUBLISHER_PREFIX):
        name = name[len(_PUBLISHER_PREFIX):]
    base = name.split("@", 1)[0]
    if base in CLASSIC_MODELS or base.startswith(CLASSIC_PREFIXES):
        return CLASSIC
    if base in GEMINI_MODELS:
        return GEMINI
    supported = ", ".join([*CLASSIC_MODELS, *(p + "*" for p in CLASSIC_PREFIXES), *GEMINI_MODELS])
    raise ConfigError(f"unsupported Vertex embedding model {model!r}; supported: {supported}")


def limits_for(family: Family) -> JobLimits:
    """The documented per-job limits of ``family``."""
    if family == CLASSIC:
        return JobLimits(max_rows=CLASSIC_MAX_PROMPTS_PER_JOB)
    if family == GEMINI:
        return JobLimits(max_rows=GEMINI_MAX_ROWS_PER_JOB, max_bytes=GEMINI_MAX_BYTES_PER_JOB)
    raise ConfigError(f"unknown model family {family!r}; expected {CLASSIC!r} or {GEMINI!r}")


def content_key(text: str) -> str:
    """The join key of a classic request: hex sha256 of the UTF-8 text (same as ``chunks.content_sha256``)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def request_line(key: str, text: str, family: Family, *, task_type: str = DEFAULT_TASK_TYPE,
                 output_dimensionality: int | None = None) -> bytes:
    """One request JSONL line (compact JSON, trailing ``\\n``) for ``text``.

    classic: ``{"content": text, "task_type": task_type}`` — ``key`` must equal ``content_key(text)``
    (it is the join key recovered from the echoed instance) and is not written;
    ``output_dimensionality`` is ignored (a job parameter for classic models).
    gemini: ``{"key": key, "request": {...}}``, with ``output_dimensionality`` included when given.

    Raises ``ValueError`` for a classic key that is not the text's hash, an unknown task type or
    family, and ``orjson.JSONEncodeError`` (a ``TypeError``) for text that is not valid Unicode
    (lone surrogates).
    """
    if task_type not in TASK_TYPES:
        raise ValueError(f"unknown task_type {task_type!r}; expected one of {sorted(TASK_TYPES)}")
    if family == CLASSIC:
        if key != content_key(text):
            raise ValueError("classic requests are joined by the content hash: key must be sha256(text)")
        return orjson.dumps({"content": text, "task_type": task_type}, option=orjson.OPT_APPEND_NEWLINE)
    if family == GEMINI:
        config: dict = {"task_type": task_type}
        if output_dimensionality is not None:
            config = {"output_dimensionality": int(output_dimensionality), "task_type": task_type}
        obj = {"key": key, "request": {"content": {"parts": [{"text": text}]}, "embed_content_config": config}}
        return orjson.dumps(obj, option=orjson.OPT_APPEND_NEWLINE)
    raise ValueError(f"unknown model family {family!r}")
