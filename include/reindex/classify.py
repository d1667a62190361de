"""Every classifier of the project: what went wrong → an ``ErrorCode`` (and, through ``reindex.retry``,
a retry decision).

* ``classify_error`` — a Google error (HTTP or gRPC code, status name, message): a failed line of batch
  output (``line_error``), a failed job, a refused API call (``classify_exception`` reads the exception's
  own fields: ``code``, ``grpc_status_code``, ``message``).
* ``classify_encoder_error`` — an exception of the local encoder for one text.

Exceptions the code raises on purpose carry their kind as a type instead (``reindex.errors``:
``TerminalError`` / ``TransientError``).
"""

from __future__ import annotations

import re

from reindex.errors import ErrorCode

_GRPC_NAMES = {
    1: "CANCELLED", 2: "UNKNOWN", 3: "INVALID_ARGUMENT", 4: "DEADLINE_EXCEEDED", 5: "NOT_FOUND",
    7: "PERMISSION_DENIED", 8: "RESOURCE_EXHAUSTED", 9: "FAILED_PRECONDITION", 10: "ABORTED",
    11: "OUT_OF_RANGE", 13: "INTERNAL", 14: "UNAVAILABLE", 16: "UNAUTHENTICATED",
}
_STATUS_NAME = re.compile(r"\b(RESOURCE_EXHAUSTED|UNAVAILABLE|INTERNAL|DEADLINE_EXCEEDED|INVALID_ARGUMENT)\b")
_SERVER_STATUSES = {"UNAVAILABLE", "INTERNAL", "DEADLINE_EXCEEDED"}
_SERVER_HTTP = {500, 502, 503, 504}
_HTTP_IN_TEXT = re.compile(r"\b(429|500|502|503|504)\b")
# Only a daily window is a quota to wait out; Google's generic "Resource has been exhausted (e.g. check
# quota)" on 429 is a rate limit, retried with backoff.
_QUOTA = re.compile(r"per day|daily|per-day|\bday\b")
_SHORT_WINDOW = re.compile(r"per minute|per second|per-minute|per-second")
_RATE = re.compile(r"rate limit|rate-limit|too many requests|resource exhausted|resource_exhausted|quota")
_TOO_LONG = re.compile(
    r"too long|token limit|exceeds? (?:the )?(?:max\w*|limit)|\bexceed\w*\b[^.]{0,60}\btokens?\b"
    r"|\btokens?\b[^.]{0,60}\bexceed|max(?:imum)? (?:input )?(?:number of )?tokens|longer than"
    r"|input is too large|context length|max_text_length|characters?, more than")
_BAD_CHARS = re.compile(
    r"invalid (?:unicode|utf-?8|characters?|bytes?|encoding)|control characters?|non-?printable"
    r"|surrogate|malformed utf|not valid utf|utf-?8 (?:decod|encod)\w* error|(?:decode|encode|encoding) error")
_UNAVAILABLE_TEXT = re.compile(r"service unavailable|temporarily unavailable|backend error|try again later")


def classify_error(code: int | str | None = None, status: str | None = None,
                   message: str | None = None) -> ErrorCode:
    """Map a Google error (HTTP or gRPC ``code``, status name, message) to an ``ErrorCode``.

    Explicit signals first: 429 / RESOURCE_EXHAUSTED → RATE_LIMITED, or QUOTA_EXCEEDED when the
    message speaks of a quota or a daily limit (unless it says per minute/second); 500/502/503/504,
    UNAVAILABLE, INTERNAL, DEADLINE_EXCEEDED → UNAVAILABLE. Then the message: quota exceeded →
    QUOTA_EXCEEDED; rate limit → RATE_LIMITED; too long / token limit → TOO_LONG; invalid or control
    characters, invalid UTF-8 → INVALID_CHARACTERS; a 429/5xx number in the text as above.
    Everything else (400, INVALID_ARGUMENT, unknown) → INVALID_INPUT.
    """
    text = " ".join(str(x) for x in (status, message) if x)
    low = text.lower()
    names = set(_STATUS_NAME.findall(text))
    http: int | None = None
    if isinstance(code, str):
        code = code.strip()
        if code.isdigit():
            code = int(code)
        else:
            names.add(code.upper())
    if isinstance(code, int) and not isinstance(code, bool):
        if code >= 100:
            http = code
        elif code in _GRPC_NAMES:
            names.add(_GRPC_NAMES[code])

    def exhausted() -> ErrorCode:
        if _QUOTA.search(low) and not _SHORT_WINDOW.search(low):
            return ErrorCode.QUOTA_EXCEEDED
        return ErrorCode.RATE_LIMITED

    if http == 429 or "RESOURCE_EXHAUSTED" in names:
        return exhausted()
    if http in _SERVER_HTTP or names & _SERVER_STATUSES:
        return ErrorCode.UNAVAILABLE
    if _QUOTA.search(low) and not _SHORT_WINDOW.search(low):
        return ErrorCode.QUOTA_EXCEEDED
    if _RATE.search(low):
        return exhausted()
    if _TOO_LONG.search(low):
        return ErrorCode.TOO_LONG
    if _BAD_CHARS.search(low):
        return ErrorCode.INVALID_CHARACTERS
    m = _HTTP_IN_TEXT.search(low)
    if m:
        return exhausted() if m.group(1) == "429" else ErrorCode.UNAVAILABLE
    if _UNAVAILABLE_TEXT.search(low):
        return ErrorCode.UNAVAILABLE
    return ErrorCode.INVALID_INPUT


def classify_exception(exc: BaseException) -> ErrorCode:
    """A refused API call (google.api_core ``GoogleAPICallError`` or anything with ``code``/``message``): its
    HTTP code, gRPC status and message, read from the exception's fields rather than its ``str()``."""
    code = getattr(exc, "code", None)
    grpc = getattr(exc, "grpc_status_code", None)
    status = getattr(grpc, "name", None) if grpc is not None else None
    message = getattr(exc, "message", None) or (exc.args[0] if exc.args and isinstance(exc.args[0], str) else None)
    return classify_error(int(code) if isinstance(code, int) and not isinstance(code, bool) else None, status, message)


def classify_encoder_error(exc: BaseException) -> ErrorCode:
    """Out-of-memory and device errors of the local encoder are transient (retried); anything else is terminal."""
    name = type(exc).__name__.lower()
    text = str(exc).lower()
    if "outofmemory" in name or "out of memory" in text or "cuda" in text:
        return ErrorCode.TRANSIENT_ENCODER_ERROR
    return ErrorCode.ENCODER_ERROR


def line_error(obj: dict) -> tuple[ErrorCode, str] | None:
    """The failure reported by a batch output line (``status`` non-empty or an ``error``) as
    ``(code, message)``, or None when the line reports none."""
    codes: list = []
    statuses: list[str] = []
    messages: list[str] = []
    for field_name in ("error", "status"):
        value = obj.get(field_name)
        if not value:
            continue
        if isinstance(value, dict):
            if value.get("code") in (0, "0", "OK") and not value.get("message"):
                continue
            codes.append(value.get("code"))
            if isinstance(value.get("status"), str):
                statuses.append(value["status"])
            messages.append(str(value.get("message") or value.get("details") or value))
        elif isinstance(value, str):
            if value.strip():
                messages.append(value.strip())
        else:
            messages.append(str(value))
    if not messages and not codes:
        return None
    code = next((c for c in codes if c not in (None, "")), None)
    message = " | ".join(messages) or " ".join(statuses) or f"error code {code}"
    err = classify_error(code, " ".join(statuses) or None, message)
    label = f"{code} " if code not in (None, "") else ""
    return err, f"{label}{' '.join(statuses) + ': ' if statuses else ''}{message}"
