import unicodedata

import pytest

from reindex.sanitize import decode_utf8, has_control_characters, sanitize_text


def test_control_characters_removed_newline_and_tab_kept():
    raw = "a\x00b\x07c\td\ne\x1bf\x7fg\x85h\ufeffi"
    assert sanitize_text(raw) == "abc\td\nefghi"
    assert has_control_characters(raw)
    assert not has_control_characters(sanitize_text(raw))


def test_carriage_returns_become_newlines():
    assert sanitize_text("one\r\ntwo\rthree") == "one\ntwo\nthree"


def test_nfc_normalisation():
    decomposed = "e\u0301 и\u0306"  # é and й as base + combining mark
    out = sanitize_text(decomposed)
    assert out == unicodedata.normalize("NFC", decomposed) == "é й"


def test_lone_surrogates_removed():
    assert sanitize_text("ok\ud800ok") == "okok"


def test_decode_names_the_source_and_position():
    assert decode_utf8("привет".encode(), "x") == "привет"
    assert decode_utf8(b"\xef\xbb\xbfhi", "x") == "hi"
    with pytest.raises(UnicodeDecodeError, match=r"notes/a.txt: not valid UTF-8 at byte 2"):
        decode_utf8(b"ab\xff", "notes/a.txt")
