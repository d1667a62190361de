"""Connections: ``PgVectorHook`` (the pgvector store), ``VertexBatchHook`` (Vertex AI and GCS) and
``EmbeddingServiceHook`` (the ``service`` backend's embedding service, from an ``http`` connection)."""

from __future__ import annotations

from contextlib import contextmanager
from functools import cached_property
from typing import Any

from airflow.sdk import BaseHook

DEFAULT_CONN_ID = "reindex_pg"


class PgVectorHook(BaseHook):
    """Opens psycopg 3 connections to the vector store.

    The Airflow connection is a ``postgres`` one; ``host`` may be a Unix-socket directory (the
    embedded default). Its extra ``store_schema`` names the schema (default ``reindex``).
    """

    conn_name_attr = "reindex_conn_id"
    default_conn_name = DEFAULT_CONN_ID
    conn_type = "postgres"
    hook_name = "pgvector store"

    def __init__(self, reindex_conn_id: str = DEFAULT_CONN_ID, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.reindex_conn_id = reindex_conn_id

    @cached_property
    def connection(self):
        return self.get_connection(self.reindex_conn_id)

    @property
    def store_schema(self) -> str:
        from reindex.config import DEFAULT_SCHEMA

        return (self.connection.extra_dejson or {}).get("store_schema", DEFAULT_SCHEMA)

    def conninfo(self) -> str:
        from psycopg.conninfo import make_conninfo

        c = self.connection
        params = {"host": c.host or None, "port": c.port or None, "dbname": c.schema or None,
                  "user": c.login or None, "password": c.password or None,
                  "application_name": "airflow-reindex"}
        extra = c.extra_dejson or {}
        for key in ("sslmode", "sslrootcert", "connect_timeout"):
            if key in extra:
                params[key] = extra[key]
        return make_conninfo(**{k: v for k, v in params.items() if v is not None})

    def get_conn(self):
        import psycopg

        return psycopg.connect(self.conninfo(), autocommit=True)

    @contextmanager
    def store(self):
        """A ``reindex.store.Store`` on a fresh connection, closed on exit."""
        from reindex.store import Store

        conn = self.get_conn()
        try:
            yield Store(conn, self.store_schema)
        finally:
            conn.close()


class VertexBatchHook(BaseHook):
    """Clients for Vertex AI batch prediction and GCS, with credentials from an Airflow Google connection.

    The endpoint is configurable (``VertexSettings.api_endpoint``) so the emulator can stand in; a
    connection with extra ``is_anonymous: true`` works offline against the emulators.
    """

    def __init__(self, gcp_conn_id: str = "google_cloud_default", api_endpoint: str | None = None,
                 project: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.gcp_conn_id = gcp_conn_id
        self.api_endpoint = api_endpoint
        self.project = project

    @cached_property
    def _google(self):
        from airflow.providers.google.common.hooks.base_google import GoogleBaseHook

        return GoogleBaseHook(gcp_conn_id=self.gcp_conn_id)

    @cached_property
    def credentials(self):
        return self._google.get_credentials()

    def job_client(self):
        from reindex.vertex.jobs import make_job_client

        return make_job_client(self.api_endpoint, self.credentials)

    def storage_client(self):
        from google.cloud import storage

        return storage.Client(project=self.project or "reindex", credentials=self.credentials)


class EmbeddingServiceHook(BaseHook):
    """The embedding service of ``backend=service`` from an Airflow ``http`` connection.

    ``host``: the base URL (``http://gpu-box:8090``, or a bare host with ``schema`` http/https and ``port``);
    ``password``: the API key (sent as ``X-API-Key`` or ``Authorization: Bearer`` by protocol; never logged);
    ``extra``: ``{"protocol": "seed004" | "openai", "model", "concurrency", "max_batch_size",
    "max_text_length", "timeout_seconds", "dimensions", "encoding_format", "max_retry_after_seconds"}``
    (unknown keys are refused by name).
    """

    conn_name_attr = "service_conn_id"
    default_conn_name = "reindex_embedding_service"
    conn_type = "http"
    hook_name = "embedding service"

    def __init__(self, service_conn_id: str = default_conn_name, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.service_conn_id = service_conn_id

    def settings(self):
        """``reindex.service.settings.ServiceSettings`` of the connection (``ConfigError`` when it is missing)."""
        from airflow.sdk.exceptions import AirflowNotFoundException

        from reindex.errors import ConfigError
        from reindex.service.settings import ServiceSettings

        try:
            c = self.get_connection(self.service_conn_id)
        except AirflowNotFoundException:
            raise ConfigError(
                f"backend 'service' needs the Airflow connection {self.service_conn_id!r} (type http; host = the "
                "embedding service's base URL, password = its API key, extra = {\"protocol\": \"seed004\" | "
                "\"openai\"}): create it (Admin → Connections, or `airflow connections add`), or name another one "
                "in the run's service_conn_id") from None
        return ServiceSettings.from_values(base_url(c.host, c.schema, c.port), api_key=c.password,
                                           extra=c.extra_dejson or {}, conn_id=self.service_conn_id)

    @classmethod
    def lookup(cls, conn_id: str):
        return cls(conn_id).settings()


def base_url(host: str | None, scheme: str | None, port: int | None) -> str:
    """``http://host:port`` from an http connection's fields; a host that is already a URL is kept as it is."""
    host = (host or "").strip()
    if "://" in host:
        return host
    url = f"{scheme or 'http'}://{host}"
    return f"{url}:{port}" if port else url


def _install_service_lookup() -> None:
    from reindex.service.settings import use_connection_lookup

    use_connection_lookup(EmbeddingServiceHook.lookup)


_install_service_lookup()  # the core resolves service connection ids through Airflow from here on
