"""Text sanitizing: what every text goes through before it is chunked or sent to a model."""

from __future__ import annotations

import re
import unicodedata

# C0/C1 control characters except \t and \n, the BOM and the two non-characters U+FFFE/U+FFFF.
# \r is folded into \n first so Windows line ends survive as line ends. A run of them becomes ONE
# space: in real text they sit where a separator was (a NUL between two fields, a stray ESC or
# form feed between words, C1 mojibake of curly quotes), so deleting them glued words together
# ("Control\x00characters" -> "Controlcharacters") and the tokenizer saw one unknown word.
_CONTROL_RE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ufeff\ufffe\uffff]+")
# Lone surrogates are half of a character whose other half is gone (they cannot even be encoded
# as UTF-8): removed, not replaced, because they sit inside a word, not between words.
_SURROGATE_RE = re.compile("[\ud800-\udfff]")


def sanitize_text(text: str) -> str:
    """Return ``text`` NFC-normalised, each run of control characters replaced by one space.

    ``\\n`` and ``\\t`` are kept; ``\\r\\n`` and a lone ``\\r`` become ``\\n``; a leading BOM is
    dropped (it marks the encoding, not a word boundary); lone surrogates are removed. The result
    never contains a character ``has_control_characters`` reports.
    """
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if text.startswith("\ufeff"):
        text = text.lstrip("\ufeff")
    text = _CONTROL_RE.sub(" ", text)
    text = _SURROGATE_RE.sub("", text)
    return unicodedata.normalize("NFC", text)


def has_control_characters(text: str) -> bool:
    """Whether ``sanitize_text`` would replace or remove anything besides normalising (``\\r`` included)."""
    return _CONTROL_RE.search(text) is not None or _SURROGATE_RE.search(text) is not None or "\r" in text


def decode_utf8(data: bytes, source: str) -> str:
    """Decode ``data`` as UTF-8 (a leading BOM is dropped); raise ``UnicodeDecodeError`` naming ``source``."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UnicodeDecodeError(
            e.encoding, e.object, e.start, e.end, f"{source}: not valid UTF-8 at byte {e.start} ({e.reason})"
        ) from None
