from __future__ import annotations

import pytest

from reindex.chunking import TokenChunker, content_sha256
from reindex.errors import ConfigError

RU = ("Озеро Байкал — самое глубокое пресноводное озеро планеты; его глубина превышает 1600 метров, "
      "а в котловине сосредоточено около двадцати процентов мировых запасов пресной воды. ")
EN = ("Photosynthesis lets green plants capture sunlight and turn water and carbon dioxide into sugar, "
      "releasing oxygen as a by-product of the light reactions in the chloroplasts. ")


@pytest.mark.parametrize("max_tokens,overlap", [(16, 0), (50, 10), (128, 32), (254, 32)])
@pytest.mark.parametrize("text", [RU * 80, EN * 80, (RU + EN) * 60, "слово, " * 3000, "x1y2 " * 5000])
def test_no_chunk_exceeds_the_limit(tokenizer, text, max_tokens, overlap):
    chunker = TokenChunker(tokenizer, max_tokens, overlap)
    chunks = list(chunker.chunk("doc", text))
    assert len(chunks) > 1
    for c in chunks:
        # re-tokenize the stored text: the limit holds for what the model will actually see
        assert len(tokenizer.encode(c.text, add_special_tokens=False).ids) <= max_tokens
        assert c.token_count == len(tokenizer.encode(c.text, add_special_tokens=False).ids)


def test_chunks_cover_the_text_in_order_with_overlap(tokenizer):
    words = [f"w{i}" for i in range(600)]
    chunker = TokenChunker(tokenizer, 60, 12)
    chunks = list(chunker.chunk("d", " ".join(words)))
    seen = [w for c in chunks for w in c.text.split()]
    assert set(seen) == set(words)  # nothing lost
    for a, b in zip(chunks, chunks[1:], strict=False):
        assert set(a.text.split()) & set(b.text.split()), "consecutive chunks share the overlap"
        assert a.text.split()[0] != b.text.split()[0]


def test_chunks_do_not_start_or_end_mid_word(tokenizer):
    chunker = TokenChunker(tokenizer, 40, 8)
    text = RU * 30
    words = set(text.split())
    for c in chunker.chunk("d", text):
        toks = c.text.split()
        assert toks[0] in words and toks[-1] in words


def test_ids_and_hashes_are_stable(tokenizer):
    chunker = TokenChunker(tokenizer, 50, 10)
    a = list(chunker.chunk("doc-1", EN * 20))
    b = list(chunker.chunk("doc-1", EN * 20))
    assert [c.chunk_id for c in a] == [f"doc-1#{i}" for i in range(len(a))]
    assert a == b
    assert all(c.content_sha256 == content_sha256(c.text) for c in a)


def test_short_and_empty_documents(tokenizer):
    chunker = TokenChunker(tokenizer, 50, 10)
    assert [c.text for c in chunker.chunk("d", "Hello world.")] == ["Hello world."]
    assert list(chunker.chunk("d", "   \n\n ")) == []


def test_long_document_is_segmented_without_losing_text(tokenizer):
    chunker = TokenChunker(tokenizer, 200, 0)
    text = "\n\n".join(f"Paragraph {i}. " + EN * 3 for i in range(400))  # > 20,000 characters
    chunks = list(chunker.chunk("big", text))
    # no overlap: the chunks' words, in order, are exactly the document's words
    assert [w for c in chunks for w in c.text.split()] == text.split()
    assert [c.ordinal for c in chunks] == list(range(len(chunks)))


def test_bad_settings_are_rejected(tokenizer):
    with pytest.raises(ConfigError, match="overlap=50"):
        TokenChunker(tokenizer, 50, 50)
