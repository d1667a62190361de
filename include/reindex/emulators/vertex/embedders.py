"""What turns texts into vectors and counts their tokens inside the emulator.

``ModelEmbedder`` (the bundled local model) and ``HashEmbedder`` (TESTS ONLY) embed; ``ModelTokenCounter``
(the local model's tokenizer) and ``RegexTokenCounter`` (words and punctuation) count tokens.
"""

from __future__ import annotations

import hashlib
import re
import threading

import numpy as np

from reindex.emulators.vertex.jobs import CODE_INVALID_ARGUMENT, JobError

_TOKEN_RE = re.compile(r"\w+|[^\w\s]")


class HashEmbedder:
    """TEST ONLY: deterministic unit vectors from shake-256 of (salt, text); carry no meaning."""

    def embed(self, texts: list[str], salts: list[str], dim: int) -> np.ndarray:
        out = np.empty((len(texts), dim), dtype=np.float32)
        for i, (text, salt) in enumerate(zip(texts, salts, strict=True)):
            digest = hashlib.shake_256(f"{salt}\x00{text}".encode()).digest(2 * dim)
            out[i] = np.frombuffer(digest, dtype="<i2")
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        norms[norms == 0] = 1.0
        out /= norms
        return out


class ModelEmbedder:
    """The bundled local sentence-transformers model; one dimension (``dim``), normalised vectors."""

    def __init__(self, model: str = "default") -> None:
        from reindex.embeddings.local import LocalEncoder

        self.encoder = LocalEncoder(model)
        self._lock = threading.Lock()

    @property
    def dim(self) -> int:
        with self._lock:
            return self.encoder.spec.dim

    def embed(self, texts: list[str], salts: list[str], dim: int) -> np.ndarray:
        with self._lock:
            vectors = self.encoder.encode(texts)
        if vectors.shape[1] != dim:
            raise JobError(CODE_INVALID_ARGUMENT, dim_message(dim, vectors.shape[1]))
        return vectors


def dim_message(requested: int, native: int) -> str:
    """Why a job asking for ``requested`` dimensions cannot run on the local model (``native``-d)."""
    return (f"output dimensionality {requested} cannot be served: the emulator's local model produces "
            f"{native}-d vectors (ask for {native}, or run the emulator with embedder='hash')")


class RegexTokenCounter:
    """Words and punctuation marks (``\\w+|[^\\w\\s]``): a cheap approximation of a token count."""

    def count(self, text: str) -> int:
        return sum(1 for _ in _TOKEN_RE.finditer(text))

    def truncate(self, text: str, limit: int) -> str:
        for i, m in enumerate(_TOKEN_RE.finditer(text), 1):
            if i == limit:
                return text[:m.end()]
        return text


class ModelTokenCounter:
    """Tokens of the local model's fast tokenizer, special tokens excluded."""

    def __init__(self, model: str = "default") -> None:
        from reindex.chunking import load_tokenizer
        from reindex.models import resolve_model_path

        self.tokenizer = load_tokenizer(resolve_model_path(model))

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def truncate(self, text: str, limit: int) -> str:
        offsets = self.tokenizer.encode(text, add_special_tokens=False).offsets
        return text if len(offsets) <= limit else text[:offsets[limit - 1][1]]
