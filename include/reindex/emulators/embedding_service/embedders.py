"""What turns texts into vectors inside the reference service.

Every embedder has ``load() -> native dimension``, ``embed(texts, salt, dim) -> float32 array
(len(texts), dim) of unit rows`` and ``count_tokens(texts) -> int``; ``embed`` runs in the service's
encode threads (it may block), ``count_tokens`` too. ``salt`` is the serving model's checksum: the
hash embedder mixes it in, so a "new model" gives other vectors; the real model ignores it.
"""

from __future__ import annotations

import threading
from typing import Protocol

import numpy as np

from reindex.emulators.vertex.embedders import HashEmbedder, RegexTokenCounter


class Embedder(Protocol):
    """The interface ``EmbeddingService`` needs (tests may pass their own, e.g. a gated one)."""

    def load(self) -> int: ...

    def embed(self, texts: list[str], salt: str, dim: int) -> np.ndarray: ...

    def count_tokens(self, texts: list[str]) -> int: ...


def truncate_normalised(vectors: np.ndarray, dim: int) -> np.ndarray:
    """The first ``dim`` components of each row, renormalised to unit length (Matryoshka-style)."""
    out = np.array(vectors[:, :dim], dtype=np.float32, copy=True)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    out /= norms
    return out


class HashServiceEmbedder:
    """TESTS ONLY: ``reindex.emulators.vertex.embedders.HashEmbedder`` salted with the model checksum."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._hash = HashEmbedder()
        self._tokens = RegexTokenCounter()

    def load(self) -> int:
        return self.dim

    def embed(self, texts: list[str], salt: str, dim: int) -> np.ndarray:
        return self._hash.embed(texts, [salt] * len(texts), dim)

    def count_tokens(self, texts: list[str]) -> int:
        return sum(self._tokens.count(t) for t in texts)


class NoopEmbedder:
    """One constant unit vector for every text, no work: a benchmark measures the client's own cost."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._tokens = RegexTokenCounter()

    def load(self) -> int:
        return self.dim

    def embed(self, texts: list[str], salt: str, dim: int) -> np.ndarray:
        return np.full((len(texts), dim), 1.0 / np.sqrt(dim), dtype=np.float32)

    def count_tokens(self, texts: list[str]) -> int:
        return sum(self._tokens.count(t) for t in texts)


class ModelServiceEmbedder:
    """The bundled sentence-transformers model (``LocalEncoder``), normalised; ignores the salt.

    A smaller ``dim`` than the model's (a "new model" with ``new_dim``) is served by truncation and
    renormalisation; a larger one cannot be. Calls are serialised: a fast tokenizer shared between
    threads fails with "Already borrowed", and the forward pass already uses every core.
    """

    def __init__(self, model: str = "default") -> None:
        from reindex.embeddings.local import LocalEncoder

        self.encoder = LocalEncoder(model)
        self._lock = threading.Lock()
        self._counter = None
        self._count_lock = threading.Lock()

    def load(self) -> int:
        with self._lock:
            return self.encoder.spec.dim  # loads the model

    def embed(self, texts: list[str], salt: str, dim: int) -> np.ndarray:
        with self._lock:
            vectors = self.encoder.encode(texts)
        native = vectors.shape[1]
        if dim > native:
            raise ValueError(f"the model produces {native}-d vectors; {dim} dimensions cannot be served")
        return vectors if dim == native else truncate_normalised(vectors, dim)

    def count_tokens(self, texts: list[str]) -> int:
        # A tokenizer of its own (not the model's, which the encode thread uses at the same time).
        with self._count_lock:
            if self._counter is None:
                from reindex.emulators.vertex.embedders import ModelTokenCounter

                self._counter = ModelTokenCounter(self.encoder.model_name)
            return sum(self._counter.count(t) for t in texts)


def make_embedder(kind: str, dim: int | None, local_model: str = "default") -> Embedder:
    """The embedder named by ``ServiceConfig.embedder``."""
    if kind == "hash":
        return HashServiceEmbedder(dim or 384)
    if kind == "noop":
        return NoopEmbedder(dim or 384)
    if kind == "model":
        return ModelServiceEmbedder(local_model)
    raise ValueError(f"unknown embedder {kind!r}: choose model, hash or noop")
