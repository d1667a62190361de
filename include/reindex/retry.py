"""The retry policy: every chunk error code maps to one decision, here and only here.

The table (also in README "Retry policy"): rate limit / transient encoder error / a chunk left
unanswered (its task died, its batch job ended FAILED/CANCELLED/EXPIRED, its run was abandoned) →
exponential backoff 5 → 10 → 20 s, at most 3 attempts; 503 → 30 s, same budget; too long → re-split
once; invalid characters → sanitize once; daily quota → wait for the window; anything else → FAILED
with its reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from reindex.errors import ErrorCode


class RetryAction(StrEnum):
    BACKOFF = "BACKOFF"  # resubmit after an exponential backoff
    DELAY = "DELAY"  # resubmit after a fixed delay
    RESPLIT = "RESPLIT"  # split the chunk under the limit and submit the pieces
    SANITIZE = "SANITIZE"  # sanitize the text and resubmit once
    QUOTA_WAIT = "QUOTA_WAIT"  # wait (deferred) until the quota window reopens
    FAIL = "FAIL"  # terminal: keep FAILED with the reason


@dataclass(frozen=True)
class RetryPolicy:
    backoff_seconds: tuple[float, ...] = (5.0, 10.0, 20.0)
    unavailable_seconds: float = 30.0
    max_attempts: int = 3
    sanitize_attempts: int = 1
    quota_wait_seconds: float = 3600.0

    @classmethod
    def from_env(cls) -> RetryPolicy:
        """The policy with the environment's knobs (``reindex.settings.retry_policy_values``)."""
        from reindex.settings import retry_policy_values

        return cls(**retry_policy_values())


@dataclass(frozen=True)
class RetryDecision:
    action: RetryAction
    delay_seconds: float = 0.0

    @property
    def retriable(self) -> bool:
        return self.action != RetryAction.FAIL


TRANSIENT_CODES = {ErrorCode.RATE_LIMITED, ErrorCode.TRANSIENT_ENCODER_ERROR, ErrorCode.NOT_PROCESSED,
                   ErrorCode.JOB_FAILED, ErrorCode.ABANDONED}


def decide(code: str | None, retry_count: int, policy: RetryPolicy = RetryPolicy()) -> RetryDecision:
    """What to do with a FAILED chunk that has been retried ``retry_count`` times so far."""
    try:
        code = ErrorCode(code)
    except ValueError:
        return RetryDecision(RetryAction.FAIL)
    if code in TRANSIENT_CODES:
        if retry_count >= policy.max_attempts:
            return RetryDecision(RetryAction.FAIL)
        steps = policy.backoff_seconds or (0.0,)
        return RetryDecision(RetryAction.BACKOFF, steps[min(retry_count, len(steps) - 1)])
    if code == ErrorCode.UNAVAILABLE:
        if retry_count >= policy.max_attempts:
            return RetryDecision(RetryAction.FAIL)
        return RetryDecision(RetryAction.DELAY, policy.unavailable_seconds)
    if code == ErrorCode.TOO_LONG:
        return RetryDecision(RetryAction.RESPLIT) if retry_count < 1 else RetryDecision(RetryAction.FAIL)
    if code == ErrorCode.INVALID_CHARACTERS:
        if retry_count >= policy.sanitize_attempts:
            return RetryDecision(RetryAction.FAIL)
        return RetryDecision(RetryAction.SANITIZE)
    if code == ErrorCode.QUOTA_EXCEEDED:
        return RetryDecision(RetryAction.QUOTA_WAIT, policy.quota_wait_seconds)
    return RetryDecision(RetryAction.FAIL)


def retriable_codes(retry_count: int, policy: RetryPolicy = RetryPolicy()) -> list[str]:
    """Error codes that are still retriable after ``retry_count`` retries (for SQL filters)."""
    return [c.value for c in ErrorCode if decide(c.value, retry_count, policy).retriable]


# Failures caused by the text itself: re-sending the same text to the same model cannot help, so
# a later run leaves such a chunk FAILED until its text or the model changes (or ``force``).
CONTENT_CODES = frozenset({ErrorCode.TOO_LONG, ErrorCode.INVALID_CHARACTERS, ErrorCode.INVALID_INPUT,
                           ErrorCode.ENCODER_ERROR})


def exhausted_after(code: str, policy: RetryPolicy = RetryPolicy(), *, limit: int = 100) -> int | None:
    """The smallest ``retry_count`` at which ``decide`` gives up on ``code`` (None: never within ``limit``).
    SQL that must agree with the policy is built from this, not written again."""
    for retry_count in range(limit + 1):
        if not decide(code, retry_count, policy).retriable:
            return retry_count
    return None


def content_failures_kept() -> dict[str, int]:
    """For each content code: the ``retry_count`` from which a FAILED chunk stays FAILED across runs (its retries
    are spent; only a new text, a new model or ``force`` gives it another try)."""
    return {c.value: exhausted_after(c.value) for c in sorted(CONTENT_CODES)}
