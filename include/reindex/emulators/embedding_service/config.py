"""``ServiceConfig``: how the reference embedding service behaves (validated), and its env variables."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from reindex.emulators.embedding_service.faults import Faults

ENV_PREFIX = "REINDEX_SERVICE_"
EMBEDDERS = ("model", "hash", "noop")
DEFAULT_DIM = 384
HASH_MODEL_NAME = "reference-hash-384"
DEFAULT_MODEL_VERSION = "2.2.0"
# The real service's limits (rate limits: slowapi strings).
SEED_RATE_LIMIT = "100/minute"
SEED_RATE_LIMIT_BATCH = "20/minute"

_RATE_RE = re.compile(r"^\s*(\d+)\s*(?:/|\s+per\s+)\s*(\d+)?\s*(second|minute|hour|day)s?\s*$", re.IGNORECASE)
_UNIT_SECONDS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}


@dataclass(frozen=True)
class RateLimit:
    """``count`` requests per ``per`` ``unit``s (a sliding window of ``window_seconds``)."""

    count: int
    per: int
    unit: str

    @property
    def window_seconds(self) -> float:
        return float(self.per * _UNIT_SECONDS[self.unit])

    def describe(self) -> str:
        """As slowapi words it: ``20 per 1 minute``."""
        return f"{self.count} per {self.per} {self.unit}"


def parse_rate_limit(text: str) -> RateLimit:
    """``"100/minute"``, ``"20 per minute"``, ``"10/5 seconds"`` → ``RateLimit``; ``ValueError`` otherwise."""
    m = _RATE_RE.match(text)
    if not m or int(m.group(1)) < 1 or (m.group(2) is not None and int(m.group(2)) < 1):
        raise ValueError(f"rate limit {text!r}: expected '<count>/<unit>' or '<count>/<n> <unit>s' "
                         f"(unit second|minute|hour|day, count >= 1), e.g. '100/minute'")
    return RateLimit(int(m.group(1)), int(m.group(2) or 1), m.group(3).lower())


def model_checksum(model_name: str, dimensions: int) -> str:
    """As the real service computes it: the first 12 hex digits of md5("<model_name>:<dimensions>")."""
    return hashlib.md5(f"{model_name}:{dimensions}".encode()).hexdigest()[:12]


@dataclass(frozen=True)
class ServiceConfig:
    """Behaviour of ``EmbeddingService``; ``ValueError`` names a bad field.

    ``embedder``: ``"model"`` (the bundled MiniLM, 384-d), ``"hash"`` (TESTS ONLY: deterministic
    meaningless unit vectors salted by the model checksum) or ``"noop"`` (one constant unit vector
    for every text: measures a client's own overhead). ``model_name`` defaults to
    ``sentence-transformers/all-MiniLM-L6-v2`` for the model and ``reference-hash-384`` otherwise;
    ``dim`` (hash/noop only) to 384. Limits default to the real service's; rate limits (slowapi
    strings such as ``"100/minute"``, per endpoint class and client address) are off by default.
    ``encode_delay_seconds`` adds that much encoding time to every encode call (inside the
    concurrency limit, so it also counts against ``encode_timeout_seconds``).
    """

    embedder: str = "model"
    local_model: str = "default"
    model_name: str | None = None
    model_version: str = DEFAULT_MODEL_VERSION
    dim: int | None = None
    max_batch_size: int = 128
    max_text_length: int = 10_000
    max_concurrent_requests: int = 6
    encode_timeout_seconds: float = 30.0
    encode_delay_seconds: float = 0.0
    rate_limit: str | None = None
    rate_limit_batch: str | None = None
    api_key: str | None = field(default=None, repr=False)  # never printed
    cache_enabled: bool = True
    cache_ttl_seconds: float = 3600.0
    cache_max_entries: int = 10_000
    faults: Faults = field(default_factory=Faults)

    def __post_init__(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"ServiceConfig: {msg}")

        need(self.embedder in EMBEDDERS, f"embedder must be one of {', '.join(EMBEDDERS)}, not {self.embedder!r}")
        need(self.model_name is None or (isinstance(self.model_name, str) and self.model_name.strip() != ""),
             "model_name must be a non-empty string")
        need(isinstance(self.model_version, str) and self.model_version != "", "model_version must be a string")
        need(self.dim is None or (_is_int(self.dim) and 1 <= self.dim <= 8192), "dim must be in 1..8192")
        for name in ("max_batch_size", "max_text_length", "max_concurrent_requests", "cache_max_entries"):
            value = getattr(self, name)
            need(_is_int(value) and value >= 1, f"{name} must be an integer >= 1, not {value!r}")
        for name in ("encode_timeout_seconds", "cache_ttl_seconds"):
            value = getattr(self, name)
            need(_is_number(value) and value > 0 and math.isfinite(value), f"{name} must be > 0, not {value!r}")
        need(_is_number(self.encode_delay_seconds) and self.encode_delay_seconds >= 0,
             "encode_delay_seconds must be >= 0")
        for name in ("rate_limit", "rate_limit_batch"):
            value = getattr(self, name)
            if value is not None:
                try:
                    parse_rate_limit(value)
                except (ValueError, TypeError) as exc:
                    raise ValueError(f"ServiceConfig: {name}: {exc}") from None
        need(self.api_key is None or (isinstance(self.api_key, str) and self.api_key != ""),
             "api_key must be None (no authentication) or a non-empty string")
        need(isinstance(self.cache_enabled, bool), "cache_enabled must be true or false")
        if isinstance(self.faults, Mapping):
            object.__setattr__(self, "faults", Faults.from_mapping(self.faults))
        need(isinstance(self.faults, Faults), "faults must be a Faults or a mapping of its fields")

    @property
    def resolved_model_name(self) -> str:
        """``model_name``, or the embedder's default name."""
        if self.model_name:
            return self.model_name
        if self.embedder == "model":
            from reindex.models import model_id_for

            return model_id_for(self.local_model)
        return HASH_MODEL_NAME

    @property
    def rate_limits(self) -> dict[str, RateLimit | None]:
        """``{"single": ..., "batch": ...}`` parsed (None: no limit)."""
        return {"single": parse_rate_limit(self.rate_limit) if self.rate_limit else None,
                "batch": parse_rate_limit(self.rate_limit_batch) if self.rate_limit_batch else None}

    def replace(self, **changes: Any) -> ServiceConfig:
        """A copy with ``changes``; unknown names are a ``ValueError``."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"ServiceConfig: unknown option(s) {', '.join(unknown)}")
        return dataclasses.replace(self, **changes)

    def describe(self) -> dict[str, Any]:
        """The configuration as JSON, the API key replaced by whether one is set."""
        out = dataclasses.asdict(self)
        out["api_key"] = "set" if self.api_key else None
        return out

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> ServiceConfig:
        """Defaults, then ``REINDEX_SERVICE_<FIELD>`` variables (e.g. ``REINDEX_SERVICE_API_KEY``,
        ``REINDEX_SERVICE_EMBEDDER``, ``REINDEX_SERVICE_MAX_BATCH_SIZE``, ``REINDEX_SERVICE_FAULTS``
        as JSON), then ``overrides``. An empty variable counts as unset."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper(), "").strip()
            if raw:
                values[f.name] = _from_text(f.name, raw)
        values.update(overrides)
        return cls(**values)


_INT_FIELDS = {"dim", "max_batch_size", "max_text_length", "max_concurrent_requests", "cache_max_entries"}
_FLOAT_FIELDS = {"encode_timeout_seconds", "encode_delay_seconds", "cache_ttl_seconds"}


def _from_text(name: str, raw: str) -> Any:
    """One ``REINDEX_SERVICE_*`` value converted to its field's type (``ValueError`` names the variable)."""
    var = ENV_PREFIX + name.upper()
    try:
        if name in _INT_FIELDS:
            return int(raw)
        if name in _FLOAT_FIELDS:
            return float(raw)
        if name == "cache_enabled":
            if raw.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError("expected true or false")
            return raw.lower() in ("1", "true", "yes", "on")
        if name == "faults":
            return Faults.from_mapping(json.loads(raw))
        if name in ("rate_limit", "rate_limit_batch") and raw.lower() in ("none", "off"):
            return None
    except ValueError as exc:
        raise ValueError(f"{var}={raw if name != 'api_key' else '***'!r}: {exc}") from None
    return raw


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
