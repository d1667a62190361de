"""Batch status: COMPLETED (everything READY), COMPLETED_WITH_ERRORS (partial), FAILED (nothing READY),
ABANDONED (its run died holding the corpus; closed by the run that took the corpus over)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import StrEnum


class BatchStatus(StrEnum):
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    COMPLETED_WITH_ERRORS = "COMPLETED_WITH_ERRORS"
    FAILED = "FAILED"
    ABANDONED = "ABANDONED"


class ChunkStatus(StrEnum):
    PENDING = "PENDING"
    READY = "READY"
    FAILED = "FAILED"


def compute_batch_status(total: int, ready: int, failed: int, *, job_failed: bool = False,
                         failed_documents: int = 0, ok_documents: int | None = None) -> BatchStatus:
    """Status of a finished batch from its counts.

    A batch with nothing to do is COMPLETED — unless documents of its scan failed (then it is
    COMPLETED_WITH_ERRORS, or FAILED when the corpus has no readable document at all). A batch whose
    job failed as a whole, or in which no chunk became READY, is FAILED. Otherwise any failure makes it
    COMPLETED_WITH_ERRORS.
    """
    if min(total, ready, failed) < 0 or ready + failed > total:
        raise ValueError(f"inconsistent batch counts: total={total} ready={ready} failed={failed}")
    if job_failed and ready == 0:
        return BatchStatus.FAILED
    if failed_documents and ok_documents == 0:
        return BatchStatus.FAILED
    if total == 0 or ready == total:
        return BatchStatus.COMPLETED_WITH_ERRORS if failed_documents else BatchStatus.COMPLETED
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
    failed_documents: int = 0  # documents this batch's scan could not read or chunk
    documents_by_reason: dict[str, int] = field(default_factory=dict)
    document_samples: list[dict] = field(default_factory=list)
    # The lineage (the first batch and its retry batches): what is left FAILED of the work the first
    # run was asked to do, once this batch is closed. ``max_failed_ratio`` is checked against this.
    root_batch_id: str = ""
    lineage_total: int = 0
    lineage_failed: int = 0
    tokens: int = 0
    characters: int = 0
    cost: dict = field(default_factory=dict)
    # service backend: the embedding service's counters (texts, cached, requests, retries, bisections)
    service: dict = field(default_factory=dict)
    # Why the batch was stopped as a whole (e.g. the service refused the API key); empty when it was not.
    halted: str = ""

    @property
    def lineage_failed_ratio(self) -> float:
        return self.lineage_failed / self.lineage_total if self.lineage_total else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["status"] = self.status.value
        d["lineage_failed_ratio"] = round(self.lineage_failed_ratio, 6)
        return d


def outcome_line(summary: dict) -> str:
    """The one-line outcome of a batch, for a DAG-run note and the logs."""
    reasons = ", ".join(f"{code} {n}" for code, n in sorted((summary.get("counts_by_reason") or {}).items()))
    docs = summary.get("failed_documents") or 0
    parts = [f"{summary['status']}: {summary['ready']}/{summary['total']} chunk(s) READY"]
    if summary.get("failed"):
        parts.append(f"{summary['failed']} FAILED ({reasons})")
    if docs:
        by = ", ".join(f"{c} {n}" for c, n in sorted((summary.get("documents_by_reason") or {}).items()))
        parts.append(f"{docs} document(s) failed ({by})")
    if summary.get("retriable"):
        parts.append(f"{summary['retriable']} retriable")
    if summary.get("reused"):
        parts.append(f"{summary['reused']} reused")
    service = summary.get("service") or {}
    if service.get("texts"):
        parts.append(f"service cache hits {service.get('cached', 0)}/{service['texts']}")
    return f"corpus {summary['corpus']} batch {summary['batch_id']} " + "; ".join(parts)
