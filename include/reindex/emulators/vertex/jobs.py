"""A batch prediction job as the emulator keeps it: states, ``google.rpc`` codes, its REST resource,
and the model a job names."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from reindex.vertex.formats import (
    CLASSIC,
    CLASSIC_DIM,
    GEMINI,
    GEMINI_DIM,
    GEMINI_MODELS,
    SERVICE_CLASSIC_PREFIXES,
)

if TYPE_CHECKING:
    from reindex.emulators.vertex.config import EmulatorConfig

JOB_STATES: dict[str, int] = {
    "JOB_STATE_UNSPECIFIED": 0, "JOB_STATE_QUEUED": 1, "JOB_STATE_PENDING": 2, "JOB_STATE_RUNNING": 3,
    "JOB_STATE_SUCCEEDED": 4, "JOB_STATE_FAILED": 5, "JOB_STATE_CANCELLING": 6, "JOB_STATE_CANCELLED": 7,
    "JOB_STATE_PAUSED": 8, "JOB_STATE_EXPIRED": 9, "JOB_STATE_UPDATING": 10, "JOB_STATE_PARTIALLY_SUCCEEDED": 11,
}
TERMINAL_STATES = frozenset({"JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED",
                             "JOB_STATE_EXPIRED", "JOB_STATE_PARTIALLY_SUCCEEDED"})

# google.rpc.Code numbers used in job.error
CODE_CANCELLED, CODE_INVALID_ARGUMENT, CODE_DEADLINE_EXCEEDED, CODE_NOT_FOUND = 1, 3, 4, 5
CODE_INTERNAL = 13


class JobError(Exception):
    """Ends a running job FAILED with ``error {code, message}``."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _rfc3339(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def model_family(model: str) -> tuple[str, str, int] | None:
    """(family, model id, native dim) of a publisher model name, or None if not an embedding model."""
    model_id = model.rsplit("/", 1)[-1].split("@", 1)[0]
    if model_id in GEMINI_MODELS:
        return GEMINI, model_id, GEMINI_DIM
    if model_id.startswith(SERVICE_CLASSIC_PREFIXES):
        return CLASSIC, model_id, CLASSIC_DIM
    return None


@dataclass
class Job:
    """One job: its create body, the configuration it runs under, its state and counts (``lock``
    guards them; ``cancel`` asks its worker to stop)."""

    name: str
    body: dict[str, Any]
    config: EmulatorConfig
    family: str
    model_id: str
    native_dim: int
    create_time: float
    state: str = "JOB_STATE_PENDING"
    update_time: float = 0.0
    start_time: float | None = None
    end_time: float | None = None
    error: dict[str, Any] | None = None
    output_dir: str | None = None
    total: int | None = None
    successful: int = 0
    failed: int = 0
    cancel: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    thread: threading.Thread | None = None

    def resource(self, int_enums: bool = False) -> dict[str, Any]:
        with self.lock:
            res = dict(self.body)
            for key in ("state", "error", "outputInfo", "completionStats", "startTime", "endTime"):
                res.pop(key, None)
            res["name"] = self.name
            res["state"] = JOB_STATES[self.state] if int_enums else self.state
            res["createTime"] = _rfc3339(self.create_time)
            res["updateTime"] = _rfc3339(self.update_time)
            if self.start_time is not None:
                res["startTime"] = _rfc3339(self.start_time)
            if self.end_time is not None:
                res["endTime"] = _rfc3339(self.end_time)
            if self.output_dir:
                res["outputInfo"] = {"gcsOutputDirectory": self.output_dir}
            if self.start_time is not None:
                incomplete = 0
                if self.state in TERMINAL_STATES and self.total is not None:
                    incomplete = max(0, self.total - self.successful - self.failed)
                res["completionStats"] = {"successfulCount": str(self.successful),
                                          "failedCount": str(self.failed),
                                          "incompleteCount": str(incomplete)}
            if self.error:
                res["error"] = dict(self.error)
            return res
