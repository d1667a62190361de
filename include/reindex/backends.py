"""Embedding backends, chosen by configuration (``ReindexConfig.backend``), never by scattered ``if``s.

A backend knows its model (spec, stored as the run's ``storage``; tokenizer; token limit) and how a
partition of chunks gets its vectors. ``local`` encodes in the worker with sentence-transformers;
``vertex`` writes request files to GCS and runs Vertex AI batch prediction jobs; ``service`` calls a
remote embedding service over HTTP.
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
                                         normalize=self.cfg.normalize, encoder=self.cfg.encoder.value)
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


class ServiceBackend:
    """A remote embedding service over HTTP (``reindex.service``): the model is whatever the service serves
    (its name, checksum and dimension), asked once per task. Chunking counts tokens with the bundled
    tokenizer; the service's own limit is in characters (``max_text_length``), checked per text."""

    name = Backend.SERVICE.value

    def __init__(self, cfg: ReindexConfig, settings=None) -> None:
        from dataclasses import replace

        from reindex.config import SERVED_MODEL
        from reindex.service.settings import settings_for

        self.cfg = cfg
        settings = settings or settings_for(cfg.service_conn_id)
        if cfg.model and cfg.model != SERVED_MODEL:
            settings = replace(settings, model=cfg.model)  # the model to ask for (openai) or to insist on
        self.settings = settings
        self._encoder = None

    @property
    def encoder(self):
        if self._encoder is None:
            from reindex.service.client import ServiceEncoder

            self._encoder = ServiceEncoder(self.settings, normalize=self.cfg.normalize)
        return self._encoder

    def model_spec(self) -> ModelSpec:
        spec = self.encoder.spec.stored_as(self.cfg.storage)
        self.encoder.close()  # its connections reopen if the encoder is used later; none idle meanwhile
        return spec

    def tokenizer_path(self) -> Path:
        return resolve_model_path("default")

    def token_limit(self) -> int | None:
        return None


BACKENDS: dict[Backend, type] = {Backend.LOCAL: LocalBackend, Backend.VERTEX: VertexBackend,
                                 Backend.SERVICE: ServiceBackend}


def backend_for(cfg: ReindexConfig) -> EmbeddingBackend:
    try:
        return BACKENDS[cfg.backend](cfg)
    except KeyError:
        raise ConfigError(
            f"backend {cfg.backend.value!r} is not available in this build; available: "
            f"{sorted(b.value for b in BACKENDS)}"
        ) from None
