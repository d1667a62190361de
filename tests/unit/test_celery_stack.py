"""scripts/celery_stack.py (`make airflow-celery`) without starting anything: broker choice, the shared
environment, one hostname and log port per worker, the queues. The stack itself runs in
tests/e2e/test_celery_workers.py."""

from __future__ import annotations

import argparse
import sys

import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import celery_stack  # noqa: E402  (scripts/ is not a package)

DB = "postgresql+psycopg2://postgres@/airflow?host=/tmp/rx/pg"


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    for name in ("REINDEX_CELERY_BROKER", "REINDEX_ENCODE_QUEUE"):
        monkeypatch.delenv(name, raising=False)


def _args(**kw) -> argparse.Namespace:
    base = {"workers": 2, "concurrency": 2, "api_port": 8080, "api_workers": 1, "host": "127.0.0.1",
            "log_port": 8793, "queues": "", "grace": 45.0, "skip_migrate": False}
    return argparse.Namespace(**{**base, **kw})


def test_default_broker_is_the_metadata_database():
    assert celery_stack.broker_urls({"AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": DB}) == (f"sqla+{DB}", f"db+{DB}")


def test_redis_when_asked_and_an_explicit_broker_url_wins(monkeypatch):
    monkeypatch.setenv("REINDEX_CELERY_BROKER", "redis://localhost:6379/0")
    env = {"AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": DB}
    assert celery_stack.broker_urls(env) == ("redis://localhost:6379/0", f"db+{DB}")
    env["AIRFLOW__CELERY__BROKER_URL"] = "redis://other:6379/1"
    env["AIRFLOW__CELERY__RESULT_BACKEND"] = "db+postgresql://x@db/celery"
    assert celery_stack.broker_urls(env) == ("redis://other:6379/1", "db+postgresql://x@db/celery")


def test_a_sqlite_metadata_database_is_refused_with_the_reason():
    with pytest.raises(SystemExit, match="the metadata database must be PostgreSQL .* AIRFLOW__DATABASE__SQL_ALCHEMY_CONN="
                                         "'sqlite:////tmp/airflow.db'"):
        celery_stack.broker_urls({"AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "sqlite:////tmp/airflow.db"})


def test_one_environment_for_every_component(monkeypatch):
    base = {"AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": DB, "AIRFLOW__CORE__EXECUTOR": "LocalExecutor", "PATH": "/usr/bin"}
    env = celery_stack.stack_env(base, host="0.0.0.0", api_port=18080)
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://127.0.0.1:18080/execution/"
    assert len(env["AIRFLOW__API_AUTH__JWT_SECRET"]) >= 32
    assert "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__VISIBILITY_TIMEOUT" not in env  # not a sqla option
    assert celery_stack.stack_env(base, host="127.0.0.1", api_port=1)["AIRFLOW__API_AUTH__JWT_SECRET"] != env[
        "AIRFLOW__API_AUTH__JWT_SECRET"]  # fresh per start
    kept = celery_stack.stack_env({**base, "AIRFLOW__API_AUTH__JWT_SECRET": "s" * 40}, host="127.0.0.1", api_port=1)
    assert kept["AIRFLOW__API_AUTH__JWT_SECRET"] == "s" * 40
    monkeypatch.setenv("REINDEX_CELERY_BROKER", "redis://:pw@localhost:6379/0")
    redis = celery_stack.stack_env(base, host="127.0.0.1", api_port=1)
    assert redis["AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__VISIBILITY_TIMEOUT"] == "86400"
    assert celery_stack._redact(redis["AIRFLOW__CELERY__BROKER_URL"]) == "redis://:***@localhost:6379/0"


def test_workers_have_their_own_hostname_and_log_port():
    env = celery_stack.stack_env({"AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": DB}, host="127.0.0.1", api_port=8080)
    parts = {c.name: c for c in celery_stack.components(_args(workers=3), env)}
    assert set(parts) == {"api-server", "scheduler", "dag-processor", "triggerer", "worker1", "worker2", "worker3"}
    workers = [parts[f"worker{i}"] for i in (1, 2, 3)]
    # 8794 is the triggerer's log server (Airflow's default): the workers skip it
    assert [w.env["AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT"] for w in workers] == ["8793", "8795", "8796"]
    names = [w.env["REINDEX_WORKER_HOSTNAME"] for w in workers]
    assert len(set(names)) == 3 and all(n.startswith(f"worker{i}@") for i, n in enumerate(names, 1))
    for w, name in zip(workers, names, strict=True):
        assert w.args[w.args.index("--celery-hostname") + 1] == name
        assert w.env["AIRFLOW__CORE__HOSTNAME_CALLABLE"] == "reindex.settings.worker_hostname"
        assert w.args[-2:] == ["--without-mingle", "--without-gossip"]  # the SQLAlchemy transport has no broadcast
        assert w.stop_phase == 1
    assert (parts["api-server"].stop_phase, parts["scheduler"].stop_phase) == (2, 0)


def test_worker_hostname_setting(monkeypatch):
    import socket

    from reindex import settings

    monkeypatch.setenv("REINDEX_WORKER_HOSTNAME", "worker2@box")
    assert settings.worker_hostname() == "worker2@box"
    monkeypatch.delenv("REINDEX_WORKER_HOSTNAME")
    assert settings.worker_hostname() == socket.getfqdn()


def test_queues_follow_the_encode_queue(monkeypatch):
    env = {"AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": DB}
    assert celery_stack.default_queues(env) == "default"
    monkeypatch.setenv("REINDEX_ENCODE_QUEUE", "reindex_gpu")
    assert celery_stack.default_queues(env) == "default,reindex_gpu"
    monkeypatch.setenv("REINDEX_CELERY_BROKER", "redis://localhost:6379/0")
    stack_env = celery_stack.stack_env(env, host="127.0.0.1", api_port=8080)
    worker = next(c for c in celery_stack.components(_args(workers=1), stack_env) if c.name == "worker1")
    assert worker.args[worker.args.index("--queues") + 1] == "default,reindex_gpu"
    assert "--without-mingle" not in worker.args  # Redis has broadcast
    custom = next(c for c in celery_stack.components(_args(workers=1, queues="q1"), stack_env) if c.name == "worker1")
    assert custom.args[custom.args.index("--queues") + 1] == "q1"
