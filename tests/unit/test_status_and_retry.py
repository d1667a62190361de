import pytest

from reindex.errors import ErrorCode
from reindex.retry import RetryAction, RetryPolicy, decide, retriable_codes
from reindex.status import BatchStatus, compute_batch_status


@pytest.mark.parametrize(
    "total,ready,failed,job_failed,expected",
    [
        (100, 100, 0, False, BatchStatus.COMPLETED),
        (0, 0, 0, False, BatchStatus.COMPLETED),
        (100, 98, 2, False, BatchStatus.COMPLETED_WITH_ERRORS),
        (100, 1, 99, False, BatchStatus.COMPLETED_WITH_ERRORS),
        (100, 0, 100, False, BatchStatus.FAILED),
        (100, 0, 0, True, BatchStatus.FAILED),
        (100, 50, 50, True, BatchStatus.COMPLETED_WITH_ERRORS),
    ],
)
def test_batch_status(total, ready, failed, job_failed, expected):
    assert compute_batch_status(total, ready, failed, job_failed=job_failed) == expected


def test_inconsistent_counts_are_rejected():
    with pytest.raises(ValueError, match="inconsistent"):
        compute_batch_status(10, 8, 5)


def test_retry_table():
    p = RetryPolicy()
    assert [decide(ErrorCode.RATE_LIMITED, n, p).delay_seconds for n in range(3)] == [5, 10, 20]
    assert decide(ErrorCode.RATE_LIMITED, 0, p).action == RetryAction.BACKOFF
    assert decide(ErrorCode.RATE_LIMITED, 3, p).action == RetryAction.FAIL
    assert decide(ErrorCode.UNAVAILABLE, 1, p) .delay_seconds == 30
    assert decide(ErrorCode.UNAVAILABLE, 3, p).action == RetryAction.FAIL
    assert decide(ErrorCode.TOO_LONG, 0, p).action == RetryAction.RESPLIT
    assert decide(ErrorCode.INVALID_CHARACTERS, 0, p).action == RetryAction.SANITIZE
    assert decide(ErrorCode.INVALID_CHARACTERS, 1, p).action == RetryAction.FAIL  # sanitize once
    assert decide(ErrorCode.QUOTA_EXCEEDED, 5, p).action == RetryAction.QUOTA_WAIT
    assert decide(ErrorCode.QUOTA_EXCEEDED, 0, p).delay_seconds == 3600  # deferred until the window reopens
    for terminal in (ErrorCode.INVALID_INPUT, ErrorCode.DIMENSION_MISMATCH, ErrorCode.MALFORMED_OUTPUT,
                     ErrorCode.ENCODER_ERROR, "something new", None):
        assert decide(terminal, 0, p).action == RetryAction.FAIL


def test_policy_is_configurable():
    p = RetryPolicy(backoff_seconds=(1, 2), max_attempts=1)
    assert decide(ErrorCode.RATE_LIMITED, 0, p).delay_seconds == 1
    assert not decide(ErrorCode.RATE_LIMITED, 1, p).retriable
    assert "RATE_LIMITED" in retriable_codes(0) and "RATE_LIMITED" not in retriable_codes(3)
