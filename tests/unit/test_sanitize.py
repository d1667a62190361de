import unicodedata

import pytest

from reindex.sanitize import decode_utf8, has_control_characters, sanitize_text


def test_control_characters_become_spaces_newline_and_tab_kept():
    raw = "a\x00b\x07c\td\ne\x1bf\x7fg\x85h\ufeffi\ufffej\uffffk"
    assert sanitize_text(raw) == "a b c\td\ne f g h i j k"
    assert has_control_characters(raw)
    assert not has_control_characters(sanitize_text(raw))


def test_control_characters_never_glue_words():
    assert sanitize_text("Control\x00characters") == "Control characters"
    assert sanitize_text("field\x1fvalue\x1e\x1dnext") == "field value next"  # a run is one separator
    assert sanitize_text("\x93quoted\x94 text") == " quoted  text"  # C1 mojibake of curly quotes
    assert sanitize_text("page one\x0cpage two") == "page one page two"  # form feed
    assert sanitize_text("tab\tand\nline") == "tab\tand\nline"


def test_leading_bom_dropped_inner_bom_separates():
    assert sanitize_text("\ufeffTitle") == "Title"
    assert sanitize_text("end of one file\ufeffstart of the next") == "end of one file start of the next"


def test_carriage_returns_become_newlines():
    assert sanitize_text("one\r\ntwo\rthree") == "one\ntwo\nthree"


def test_nfc_normalisation():
    decomposed = "e\u0301 и\u0306"  # é and й as base + combining mark
    out = sanitize_text(decomposed)
    assert out == unicodedata.normalize("NFC", decomposed) == "é й"


def test_lone_surrogates_removed():
    # half of a character: removed where it stands, not turned into a word break
    assert sanitize_text("ok\ud800ok") == "okok"
    assert has_control_characters("ok\ud800ok")
    assert not has_control_characters("plain text\twith\nlines")


def test_decode_names_the_source_and_position():
    assert decode_utf8("привет".encode(), "x") == "привет"
    assert decode_utf8(b"\xef\xbb\xbfhi", "x") == "hi"
    with pytest.raises(UnicodeDecodeError, match=r"notes/a.txt: not valid UTF-8 at byte 2"):
        decode_utf8(b"ab\xff", "notes/a.txt")
