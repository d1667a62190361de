"""Batch status: COMPLETED (everything READY), COMPLETED_WITH_ERRORS (partial), FAILED (nothing READY)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import StrEnum


class BatchStatus(StrEnum):
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    COMPLETED_WITH_ERRORS = "COMPLETED_WITH_ERRORS"
    FAILED = "FAILED"


class ChunkStatus(StrEnum):
    PENDING = "PENDING"
    READY = "READY"
    FAILED = "FAILED"


def compute_batch_status(total: int, ready: int, failed: int, *, job_failed: bool = False) -> BatchStatus:
    """Status of a finished batch from its counts.

    A batch with nothing to do is COMPLETED. A batch whose job failed as a whole, or in which no
    chunk became READY, is FAILED. Otherwise any failure makes it COMPLETED_WITH_ERRORS.
    """
    if min(total, ready, failed) < 0 or ready + failed > total:
        raise ValueError(f"inconsistent batch counts: total={total} ready={ready} failed={failed}")
    if job_failed and ready == 0:
        return BatchStatus.FAILED
    if total == 0 or ready == total:
        return BatchStatus.COMPLETED
    if ready == 0:
        return BatchStatus.FAILED
    return BatchStatus.COMPLETED_WITH_ERRORS


@dataclass
class BatchSummary:
    batch_id: str
    corpus: str
    status: BatchStatus
    total: int
    ready: int
    failed: int
    reused: int = 0
    retriable: int = 0
    counts_by_reason: dict[str, int] = field(default_factory=dict)
    sample_errors: list[dict] = field(default_factory=list)
    seconds: float | None = None
    kind: str = "full"
    encoded: int = 0  # chunks embedded by this batch (encoder inputs or batch-job lines)
    jobs_submitted: int = 0
    reused_by_content: int = 0
    kept_failed: int = 0
    message: str = ""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["status"] = self.status.value
        return d
