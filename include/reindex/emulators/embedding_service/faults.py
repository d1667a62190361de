"""Faults the reference service can inject into its embedding endpoints, and their budgets.

``Faults`` is the configuration (validated, JSON-friendly); ``FaultInjector`` holds the live
configuration and what of each budget has been used. One embedding request consumes at most one
answering fault, checked in this order: ``drop_connections``, ``status_429``, ``status_503``,
``forbidden``; then ``slow_seconds`` (a delay, after which the request goes on). ``invalid_marker``
and ``model_change_after`` are applied by the request handler (they depend on the texts and on
successful requests) and are read from ``FaultInjector.faults``.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# Kinds counted in ``stats()["faults"]``.
FAULT_KINDS = ("drop_connections", "status_429", "status_503", "forbidden", "slow", "invalid_marker",
               "model_change")


@dataclass(frozen=True)
class Faults:
    """What to inject; every field off by default. ``ValueError`` names a bad field.

    - ``drop_connections``: the next N embedding requests get no response (the socket is closed).
    - ``status_429`` (+ ``retry_after`` seconds, or None for no ``Retry-After`` header): the next N
      requests answer 429.
    - ``status_503``: the next N requests answer 503 ``Encoding timeout after <timeout>s``.
    - ``forbidden``: every request answers 403 ``API key lacks permission``.
    - ``slow_seconds`` / ``slow_count``: the next ``slow_count`` requests wait that long first.
    - ``invalid_marker``: a text containing it fails its request with 400 naming the item.
    - ``model_change_after``: after N successful embedding requests the service serves another
      model, ``new_model_name`` (default: the model name + ``-v2``), ``new_dim`` dimensions
      (default: unchanged). ``accept_old_model_name``: ``/v1/embeddings`` still accepts the names of
      models served before (an alias now pointing at the new model: only the ``X-Model-Checksum``
      header and the response's ``model`` tell the change); otherwise an old name is 404.
    """

    drop_connections: int = 0
    status_429: int = 0
    retry_after: int | None = None
    status_503: int = 0
    forbidden: bool = False
    slow_seconds: float = 0.0
    slow_count: int = 0
    invalid_marker: str | None = None
    model_change_after: int | None = None
    new_model_name: str | None = None
    new_dim: int | None = None
    accept_old_model_name: bool = False

    def __post_init__(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"faults: {msg}")

        for name in ("drop_connections", "status_429", "status_503", "slow_count"):
            value = getattr(self, name)
            need(_is_int(value) and value >= 0, f"{name} must be an integer >= 0, not {value!r}")
        need(self.retry_after is None or (_is_int(self.retry_after) and self.retry_after >= 0),
             f"retry_after must be null or an integer >= 0, not {self.retry_after!r}")
        for name in ("forbidden", "accept_old_model_name"):
            need(isinstance(getattr(self, name), bool), f"{name} must be true or false, not {getattr(self, name)!r}")
        need(isinstance(self.slow_seconds, int | float) and not isinstance(self.slow_seconds, bool)
             and self.slow_seconds >= 0, f"slow_seconds must be a number >= 0, not {self.slow_seconds!r}")
        need(self.invalid_marker is None or (isinstance(self.invalid_marker, str) and self.invalid_marker != ""),
             f"invalid_marker must be null or a non-empty string, not {self.invalid_marker!r}")
        need(self.model_change_after is None or (_is_int(self.model_change_after) and self.model_change_after >= 0),
             f"model_change_after must be null or an integer >= 0, not {self.model_change_after!r}")
        need(self.new_model_name is None or (isinstance(self.new_model_name, str) and self.new_model_name != ""),
             f"new_model_name must be null or a non-empty string, not {self.new_model_name!r}")
        need(self.new_dim is None or (_is_int(self.new_dim) and 1 <= self.new_dim <= 8192),
             f"new_dim must be null or an integer in 1..8192, not {self.new_dim!r}")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None) -> Faults:
        """Faults from a JSON object; unknown names are a ``ValueError`` (a typo must not pass silently)."""
        if data is None:
            return cls()
        if not isinstance(data, Mapping):
            raise ValueError(f"faults: expected a JSON object, not {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"faults: unknown field(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        return cls(**dict(data))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class FaultAction:
    """What one request gets: ``kind`` answers it (``drop_connections``, ``status_429``, ``status_503``,
    ``forbidden``) or is None; ``slow_seconds`` is the delay before it is handled normally."""

    kind: str | None = None
    slow_seconds: float = 0.0
    retry_after: int | None = None


class FaultInjector:
    """The live fault configuration and the budgets used so far (thread-safe)."""

    _BUDGETS = ("drop_connections", "status_429", "status_503", "slow_count")

    def __init__(self, faults: Faults | None = None) -> None:
        self._lock = threading.Lock()
        self._faults = faults or Faults()
        self._used = dict.fromkeys(self._BUDGETS, 0)
        self._served = dict.fromkeys(FAULT_KINDS, 0)

    @property
    def faults(self) -> Faults:
        with self._lock:
            return self._faults

    def configure(self, faults: Faults) -> None:
        """Replace the configuration (fields not given are off) with fresh budgets."""
        with self._lock:
            self._faults = faults
            self._used = dict.fromkeys(self._BUDGETS, 0)

    def rearm(self) -> None:
        """Forget the budgets used and the faults served (``POST /admin/reset``)."""
        with self._lock:
            self._used = dict.fromkeys(self._BUDGETS, 0)
            self._served = dict.fromkeys(FAULT_KINDS, 0)

    def next_request(self) -> FaultAction:
        """Consume and return the fault for the next embedding request (see the module docstring)."""
        with self._lock:
            f = self._faults
            for kind in ("drop_connections", "status_429", "status_503"):
                if self._used[kind] < getattr(f, kind):
                    self._used[kind] += 1
                    self._served[kind] += 1
                    return FaultAction(kind, retry_after=f.retry_after if kind == "status_429" else None)
            if f.forbidden:
                self._served["forbidden"] += 1
                return FaultAction("forbidden")
            if f.slow_seconds > 0 and self._used["slow_count"] < f.slow_count:
                self._used["slow_count"] += 1
                self._served["slow"] += 1
                return FaultAction(None, slow_seconds=float(f.slow_seconds))
            return FaultAction()

    def served(self, kind: str, n: int = 1) -> None:
        """Count a fault applied outside ``next_request`` (``invalid_marker``, ``model_change``)."""
        with self._lock:
            self._served[kind] += n

    def snapshot(self) -> dict[str, Any]:
        """``{"config": ..., "remaining": {budget: left}, "served": {kind: count}}``."""
        with self._lock:
            f = self._faults
            remaining = {k: max(0, getattr(f, k) - self._used[k]) for k in self._BUDGETS}
            return {"config": f.to_dict(), "remaining": remaining, "served": dict(self._served)}
