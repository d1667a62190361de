"""How to reach an embedding service: base URL, API key, protocol and the client's limits.

Inside Airflow these come from an ``http`` connection (``reindex_airflow.hooks.EmbeddingServiceHook``
installs itself with ``use_connection_lookup``); outside it (CLI, scripts) from ``REINDEX_SERVICE_*``
(``reindex.settings.service_env``). Either way the values pass ``ServiceSettings.from_values``, which
refuses unknown extra keys and out-of-range limits with their names. The API key is never part of a
``repr``, a log line, an XCom or an error message.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from reindex.errors import ConfigError

# The reference service's (seed-004) own limits, used when the service does not say (no /model-info).
DEFAULT_MAX_BATCH_SIZE = 128
DEFAULT_MAX_TEXT_LENGTH = 10_000
DEFAULT_CONCURRENCY = 6
# Longer than the service's own 30 s encode timeout, so its 503 arrives before our timeout.
DEFAULT_TIMEOUT_SECONDS = 60.0

CONCURRENCY_RANGE = (1, 64)
BATCH_RANGE = (1, 4096)


@dataclass(frozen=True)
class ServiceSettings:
    """One embedding service as the client sees it.

    ``protocol``: ``seed004`` (``/embed/batch`` + ``/model-info``) or ``openai`` (``/v1/embeddings``).
    ``model``: openai, the model name sent with every request; seed004, the model the service must serve
    (None: whatever it serves). ``max_batch_size`` / ``max_text_length`` (characters): None = the service's
    ``/model-info``, else 128 / 10,000. ``dimensions`` (openai): the ``dimensions`` request field.
    ``encoding_format`` (openai): ``base64`` (compact; the default) or ``float``.
    """

    url: str
    protocol: str = "seed004"
    api_key: str | None = field(default=None, repr=False, compare=False)
    model: str | None = None
    dimensions: int | None = None
    encoding_format: str = "base64"
    concurrency: int = DEFAULT_CONCURRENCY
    max_batch_size: int | None = None
    max_text_length: int | None = None
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS
    max_retry_after_seconds: float = 120.0
    conn_id: str | None = None  # where the settings came from, for messages

    def __post_init__(self) -> None:
        from reindex.service.protocols import PROTOCOLS

        where = f"embedding service connection {self.conn_id!r}" if self.conn_id else "embedding service"
        if not isinstance(self.url, str) or not self.url.startswith(("http://", "https://")):
            raise ConfigError(f"{where}: base URL {self.url!r} must start with http:// or https:// "
                              "(connection host, or REINDEX_SERVICE_URL)")
        object.__setattr__(self, "url", self.url.rstrip("/"))
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"{where}: protocol {self.protocol!r} is not supported: choose one of {sorted(PROTOCOLS)}")
        if self.encoding_format not in ("base64", "float"):
            raise ConfigError(f"{where}: encoding_format {self.encoding_format!r} must be 'base64' or 'float'")
        _int(where, "concurrency", self.concurrency, CONCURRENCY_RANGE)
        for name in ("max_batch_size", "max_text_length", "dimensions"):
            if getattr(self, name) is not None:
                _int(where, name, getattr(self, name), BATCH_RANGE if name == "max_batch_size" else (1, 10**7))
        for name in ("timeout_seconds", "max_retry_after_seconds"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ConfigError(f"{where}: {name}={value!r} must be a positive number of seconds")

    @classmethod
    def from_values(cls, url: str, *, api_key: str | None = None, extra: Mapping[str, Any] | None = None,
                    conn_id: str | None = None) -> ServiceSettings:
        """From a connection's base URL, password and extra (its keys: every field but ``url``/``api_key``)."""
        extra = dict(extra or {})
        known = sorted(f.name for f in fields(cls) if f.name not in ("url", "api_key", "conn_id"))
        unknown = sorted(k for k in extra if k not in known)
        if unknown:
            hints = [f"{k!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, known, 1)) else repr(k)
                     for k in unknown]
            raise ConfigError(f"embedding service connection {conn_id!r}: unknown extra key(s) {', '.join(hints)}; "
                              f"valid keys are {', '.join(known)}")
        return cls(url=url, api_key=api_key or None, conn_id=conn_id,
                   **{k: v for k, v in extra.items() if v is not None})

    @classmethod
    def from_env(cls, conn_id: str | None = None) -> ServiceSettings:
        from reindex.settings import service_env

        env = service_env()
        if not env["url"]:
            raise ConfigError(
                f"backend 'service' needs the embedding service's address: create the Airflow connection "
                f"{conn_id or 'reindex_embedding_service'!r} (type http; host = the base URL, password = the API "
                "key, extra = {\"protocol\": \"seed004\" | \"openai\"}), or outside Airflow set REINDEX_SERVICE_URL")
        return cls.from_values(env["url"], api_key=env["api_key"], extra=env["extra"], conn_id=conn_id)

    def describe(self) -> dict:
        """What may be shown (logs, batch details): everything but the key."""
        return {"url": self.url, "protocol": self.protocol, "model": self.model, "concurrency": self.concurrency,
                "api_key": "set" if self.api_key else "none"}


def _int(where: str, name: str, value: Any, bounds: tuple[int, int]) -> None:
    lo, hi = bounds
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(f"{where}: {name}={value!r} is out of range: must be an integer between {lo} and {hi}")


_lookup: Callable[[str], ServiceSettings] | None = None


def use_connection_lookup(lookup: Callable[[str], ServiceSettings] | None) -> None:
    """Install where connection ids resolve (the Airflow layer installs its connection hook)."""
    global _lookup
    _lookup = lookup


def settings_for(conn_id: str | None = None) -> ServiceSettings:
    """The settings of connection ``conn_id`` (default ``reindex.settings.service_conn_id()``)."""
    from reindex.settings import service_conn_id

    conn_id = conn_id or service_conn_id()
    if _lookup is not None:
        return _lookup(conn_id)
    return ServiceSettings.from_env(conn_id)
