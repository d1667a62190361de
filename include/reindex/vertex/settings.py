"""Deployment settings of the Vertex backend (environment), and the model spec of a Vertex model."""

from __future__ import annotations

import os
from dataclasses import dataclass

from reindex.errors import ConfigError
from reindex.models import ModelSpec
from reindex.vertex.formats import CLASSIC, GEMINI_DIM, MODEL_DIMS, family_for


@dataclass(frozen=True)
class VertexSettings:
    """Where batch jobs run and where their files live. Read from the environment by ``from_env``.

    ``api_endpoint`` None means Google's regional endpoint; an ``http://host:port`` value points the
    client at an emulator (the REST transport is used then).
    """

    project: str
    location: str = "us-central1"
    bucket: str = "reindex-batches"
    prefix: str = "reindex"
    api_endpoint: str | None = None
    gcp_conn_id: str = "google_cloud_default"
    poll_interval: float = 30.0
    quota_reset_seconds: float = 3600.0

    @classmethod
    def from_env(cls) -> VertexSettings:
        from reindex.settings import gcp_conn_id

        env = os.environ
        project = env.get("REINDEX_VERTEX_PROJECT") or env.get("GOOGLE_CLOUD_PROJECT")
        if not project:
            raise ConfigError("backend 'vertex' needs a project: set REINDEX_VERTEX_PROJECT (or GOOGLE_CLOUD_PROJECT)")
        return cls(
            project=project,
            location=env.get("REINDEX_VERTEX_LOCATION", "us-central1"),
            bucket=env.get("REINDEX_GCS_BUCKET", "reindex-batches"),
            prefix=env.get("REINDEX_GCS_PREFIX", "reindex").strip("/"),
            api_endpoint=env.get("REINDEX_VERTEX_ENDPOINT") or None,
            gcp_conn_id=gcp_conn_id(),
            poll_interval=float(env.get("REINDEX_VERTEX_POLL_SECONDS", "30")),
            quota_reset_seconds=float(env.get("REINDEX_QUOTA_RESET_SECONDS", "3600")),
        )

    @property
    def endpoint(self) -> str:
        return self.api_endpoint or f"{self.location}-aiplatform.googleapis.com"


def vertex_model_spec(model: str, output_dimensionality: int | None = None) -> ModelSpec:
    """Identity of a Vertex embedding model (``text-embedding-005@002`` pins a revision)."""
    family = family_for(model)
    name = model.rsplit("/", 1)[-1]
    base, _, revision = name.partition("@")
    dim = output_dimensionality or MODEL_DIMS.get(base)
    if not dim:
        raise ConfigError(f"model {model!r} has no known default dimension: set output_dimensionality")
    # Classic models return unit vectors; gemini-embedding-001 only at its full 3072 dimensions.
    normalized = family == CLASSIC or dim == GEMINI_DIM
    return ModelSpec(model_id=base, revision=revision or "default", dim=dim, normalized=normalized,
                     backend="vertex", precision="service")
