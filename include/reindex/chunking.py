"""Token-aware chunking with the target model's own tokenizer.

A chunk never holds more than ``max_tokens`` tokens of the model's tokenizer (special tokens
excluded): windows are cut on token offsets, moved back to a word boundary, and every chunk is
re-tokenized and shrunk if the re-tokenized text came out longer. Chunk ids are stable
(``<doc_id>#<ordinal>``) and every chunk carries the sha256 of its text.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from reindex.errors import ConfigError

# Documents are tokenized in segments of about this many characters, cut at a paragraph or
# whitespace boundary, so a very long document never becomes one huge token list.
SEGMENT_CHARS = 20_000


@dataclass(frozen=True, slots=True)
class Chunk:
    chunk_id: str
    doc_id: str
    ordinal: int
    text: str
    content_sha256: str
    token_count: int


# Bump when the chunking algorithm changes: every document is then re-chunked by the next run.
CHUNKER_VERSION = 1


def chunking_signature(tokenizer_path: Path, max_tokens: int, overlap_tokens: int) -> str:
    """What a document's chunks depend on besides its text: the tokenizer, the sizes, the algorithm.

    A document is re-chunked when its content hash or this signature changes.
    """
    return f"v{CHUNKER_VERSION}:{_tokenizer_digest(str(tokenizer_path))}:{max_tokens}:{overlap_tokens}"


@functools.lru_cache(maxsize=8)
def _tokenizer_digest(path: str) -> str:
    return hashlib.sha256((Path(path) / "tokenizer.json").read_bytes()).hexdigest()[:12]


def content_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def load_tokenizer(model_path: Path):
    """The fast (Rust) tokenizer of a model directory, without loading torch or the model."""
    from tokenizers import Tokenizer

    tj = model_path / "tokenizer.json"
    if not tj.exists():
        raise ConfigError(f"model at {model_path} has no tokenizer.json; a fast tokenizer is required")
    tok = Tokenizer.from_file(str(tj))
    tok.no_truncation()
    tok.no_padding()
    return tok


def _segments(text: str, size: int = SEGMENT_CHARS) -> Iterator[str]:
    start, n = 0, len(text)
    while start < n:
        end = min(start + size, n)
        if end < n:
            cut = text.rfind("\n\n", start + size // 2, end)
            if cut < 0:
                cut = text.rfind(" ", start + size // 2, end)
            if cut > start:
                end = cut
        yield text[start:end]
        start = end


class TokenChunker:
    """Splits documents into overlapping token windows of at most ``max_tokens`` tokens."""

    def __init__(self, tokenizer, max_tokens: int, overlap: int = 0) -> None:
        if max_tokens < 1:
            raise ConfigError(f"max_tokens={max_tokens} must be at least 1")
        if not 0 <= overlap < max_tokens:
            raise ConfigError(f"overlap={overlap} must be between 0 and max_tokens-1 ({max_tokens - 1})")
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.overlap = overlap

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def chunk(self, doc_id: str, text: str) -> Iterator[Chunk]:
        ordinal = 0
        for segment in _segments(text):
            for piece, ntok in self._split(segment):
                yield Chunk(f"{doc_id}#{ordinal}", doc_id, ordinal, piece, content_sha256(piece), ntok)
                ordinal += 1

    def _split(self, text: str) -> Iterator[tuple[str, int]]:
        enc = self.tokenizer.encode(text, add_special_tokens=False)
        offsets, words = enc.offsets, enc.word_ids
        n = len(offsets)
        if n == 0:
            return
        # Cut preferably where whitespace separates two tokens; else between tokenizer words
        # (punctuation); only a single over-long word is cut inside.
        starts_word = [i == 0 or offsets[i][0] > offsets[i - 1][1] for i in range(n)]
        starts_piece = [i == 0 or words[i] is None or words[i] != words[i - 1] for i in range(n)]
        start = 0
        while start < n:
            end = min(start + self.max_tokens, n)
            if end < n:  # move the cut back to a boundary, but keep at least half a window
                for boundary in (starts_word, starts_piece):
                    b = end
                    while b > start + self.max_tokens // 2 and not boundary[b]:
                        b -= 1
                    if boundary[b] and b > start:
                        end = b
                        break
            piece, ntok = self._fit(text, offsets, start, end)
            if piece:
                yield piece, ntok
            if end >= n:
                break
            nxt = max(end - self.overlap, start + 1)
            while nxt < end and not starts_word[nxt]:
                nxt += 1
            start = nxt

    def _fit(self, text: str, offsets, start: int, end: int) -> tuple[str, int]:
        """Text of tokens [start, end), shrunk until it re-tokenizes within ``max_tokens``."""
        while True:
            piece = text[offsets[start][0] : offsets[end - 1][1]].strip()
            ntok = self.count_tokens(piece)
            if ntok <= self.max_tokens or end - start <= 1:
                return piece, ntok
            end = max(start + 1, end - max(1, ntok - self.max_tokens))


def tokenizer_limit(model_path: Path) -> int | None:
    """The model's sequence limit minus its special tokens, if the model declares one."""
    from reindex.models import read_max_seq_length

    limit = read_max_seq_length(model_path)
    if limit is None:
        cfg = model_path / "tokenizer_config.json"
        if cfg.exists():
            value = json.loads(cfg.read_text()).get("model_max_length")
            limit = int(value) if value and value < 1_000_000 else None
    return None if limit is None else limit - 2
