"""Local encoding with sentence-transformers (CPU, or CUDA when present).

torch and sentence-transformers are imported on first use, never at import time.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import numpy as np

from reindex.config import DEFAULT_MODEL
from reindex.errors import ConfigError, ErrorCode
from reindex.models import ModelSpec, model_id_for, model_revision, offline_hub, resolve_model_path

log = logging.getLogger(__name__)


def auto_device() -> str:
    import torch

    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


@dataclass
class EncodeFailure(Exception):
    code: ErrorCode
    message: str


@functools.lru_cache(maxsize=4)
def _load(path: str, device: str):
    offline_hub()
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(path, device=device, local_files_only=True)


class LocalEncoder:
    """A sentence-transformers model that encodes texts into (normalised) float32 vectors."""

    backend = "local"

    def __init__(self, model: str = DEFAULT_MODEL, *, batch_size: int = 64, device: str | None = None,
                 normalize: bool = True) -> None:
        self.model_name = model
        self.path = resolve_model_path(model)
        self.batch_size = batch_size
        self.device = device
        self.normalize = normalize

    @functools.cached_property
    def model(self):
        device = self.device or auto_device()
        log.info("loading %s from %s on %s", self.model_name, self.path, device)
        return _load(str(self.path), device)

    @functools.cached_property
    def spec(self) -> ModelSpec:
        getter = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        dim = getter()
        if not dim:
            raise ConfigError(f"model {self.model_name!r} does not declare its embedding dimension")
        return ModelSpec(
            model_id=model_id_for(self.model_name),
            revision=model_revision(self.path),
            dim=int(dim),
            normalized=self.normalize,
            backend=self.backend,
            precision="fp32",
            max_seq_length=self.model.max_seq_length,
        )

    def encode(self, texts: list[str]) -> np.ndarray:
        """Vectors for ``texts`` as a float32 array of shape (len(texts), dim)."""
        if not texts:
            return np.empty((0, self.spec.dim), dtype=np.float32)
        vectors = self.model.encode(
            texts, batch_size=self.batch_size, normalize_embeddings=self.normalize,
            convert_to_numpy=True, show_progress_bar=False,
        )
        return np.asarray(vectors, dtype=np.float32)


def classify_encoder_error(exc: BaseException) -> ErrorCode:
    """Out-of-memory and device errors are transient (retried); anything else is terminal."""
    name = type(exc).__name__.lower()
    text = str(exc).lower()
    if "outofmemory" in name or "out of memory" in text or "cuda" in text:
        return ErrorCode.TRANSIENT_ENCODER_ERROR
    return ErrorCode.ENCODER_ERROR
