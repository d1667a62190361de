"""Text sanitizing: what every text goes through before it is chunked or sent to a model."""

from __future__ import annotations

import re
import unicodedata

# C0/C1 control characters except \t and \n, surrogates, the BOM and the two non-characters
# U+FFFE/U+FFFF. \r is folded into \n first so Windows line ends survive as line ends.
_CONTROL_RE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff\ufeff\ufffe\uffff]")


def sanitize_text(text: str) -> str:
    """Return ``text`` NFC-normalised with control characters removed (``\\n`` and ``\\t`` kept)."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL_RE.sub("", text)
    return unicodedata.normalize("NFC", text)


def has_control_characters(text: str) -> bool:
    return _CONTROL_RE.search(text) is not None or "\r" in text


def decode_utf8(data: bytes, source: str) -> str:
    """Decode ``data`` as UTF-8 (a leading BOM is dropped); raise ``UnicodeDecodeError`` naming ``source``."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UnicodeDecodeError(
            e.encoding, e.object, e.start, e.end, f"{source}: not valid UTF-8 at byte {e.start} ({e.reason})"
        ) from None
