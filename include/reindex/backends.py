"""Embedding backends, chosen by configuration (``ReindexConfig.backend``), never by scattered ``if``s.

A backend knows its model (spec, stored as the run's ``storage``; tokenizer; token limit) and how a
partition of chunks gets its vectors. ``local`` encodes in the worker with sentence-transformers;
``vertex`` writes request files to GCS and runs Vertex AI batch prediction jobs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from reindex.chunking import tokenizer_limit
from reindex.config import Backend, ReindexConfig
from reindex.errors import ConfigError
from reindex.models import ModelSpec, resolve_model_path


class EmbeddingBackend(Protocol):
    name: str

    def model_spec(self) -> ModelSpec: ...
    def tokenizer_path(self) -> Path: ...
    def token_limit(self) -> int | None: ...


class LocalBackend:
    name = Backend.LOCAL.value

    def __init__(self, cfg: ReindexConfig) -> None:
        self.cfg = cfg
        self._encoder = None

    @property
    def encoder(self):
        if self._encoder is None:
            from reindex.embeddings.local import LocalEncoder

            self._encoder = LocalEncoder(self.cfg.model, batch_size=self.cfg.encode_batch_size,
                                         normalize=self.cfg.normalize)
        return self._encoder

    def model_spec(self) -> ModelSpec:
        return self.encoder.spec.stored_as(self.cfg.storage)

    def tokenizer_path(self) -> Path:
        return resolve_model_path(self.cfg.model)

    def token_limit(self) -> int | None:
        return tokenizer_limit(self.tokenizer_path())


class VertexBackend:
    """Google Vertex AI batch prediction. Chunking uses the bundled tokenizer as a proxy for
    Google's (not available offline) under the service's 2,048-token limit per text."""

    name = Backend.VERTEX.value

    def __init__(self, cfg: ReindexConfig) -> None:
        from reindex.vertex.formats import family_for

        self.cfg = cfg
        self.family = family_for(cfg.model)

    def model_spec(self) -> ModelSpec:
        from reindex.vertex.settings import vertex_model_spec

        return vertex_model_spec(self.cfg.model, self.cfg.output_dimensionality).stored_as(self.cfg.storage)

    def tokenizer_path(self) -> Path:
        return resolve_model_path("default")

    def token_limit(self) -> int | None:
        from reindex.vertex.formats import MAX_TOKENS_PER_TEXT

        return MAX_TOKENS_PER_TEXT


BACKENDS: dict[Backend, type] = {Backend.LOCAL: LocalBackend, Backend.VERTEX: VertexBackend}


def backend_for(cfg: ReindexConfig) -> EmbeddingBackend:
    try:
        return BACKENDS[cfg.backend](cfg)
    except KeyError:
        raise ConfigError(
            f"backend {cfg.backend.value!r} is not available in this build; available: "
            f"{sorted(b.value for b in BACKENDS)}"
        ) from None
