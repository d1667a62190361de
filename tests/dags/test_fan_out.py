"""Scale-out wiring (docs/scale-out.md): the encode fan-out's concurrency, Celery queue and pool come from the
environment at parse time; the Celery executor imports with the pinned celery; a local run never reaches
close_results."""

from __future__ import annotations

import pytest

from tests.conftest import ROOT

EMBEDDING_DAGS = ("reindex_corpus", "reindex_retry", "reindex_model_upgrade")
FAN_OUT_ENV = ("REINDEX_ENCODE_CONCURRENCY", "REINDEX_INGEST_CONCURRENCY", "REINDEX_ENCODE_QUEUE",
               "REINDEX_ENCODE_POOL")


def _parse(monkeypatch, **env: str):
    """A fresh parse of dags/ (what the dag-processor does) with exactly ``env`` set among the fan-out variables;
    returns the DagBag and its DAGs after a serialization round trip (what the scheduler schedules from)."""
    from airflow.dag_processing.dagbag import DagBag
    from airflow.serialization.serialized_objects import DagSerialization

    for name in FAN_OUT_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    bag = DagBag(dag_folder=str(ROOT / "dags"))
    serialized = {dag_id: DagSerialization.deserialize_dag(DagSerialization.serialize_dag(bag.get_dag(dag_id)))
                  for dag_id in EMBEDDING_DAGS if dag_id in bag.dag_ids}
    return bag, serialized


def test_defaults_are_unchanged(airflow_db, monkeypatch):
    """Nothing set: 2 encodes and 4 ingests per run, on Airflow's default queue and pool — as before."""
    from airflow.configuration import conf

    bag, dags = _parse(monkeypatch)
    assert bag.import_errors == {}
    default_queue = conf.get("operators", "default_queue")
    for dag_id in EMBEDDING_DAGS:
        for dag in (bag.get_dag(dag_id), dags[dag_id]):
            encode, ingest = dag.get_task("encode_partition"), dag.get_task("ingest_results")
            assert (encode.max_active_tis_per_dagrun, encode.queue, encode.pool) == (2, default_queue,
                                                                                    "default_pool"), dag_id
            assert (ingest.max_active_tis_per_dagrun, ingest.queue, ingest.pool) == (4, default_queue,
                                                                                    "default_pool"), dag_id


def test_environment_sets_concurrency_queue_and_pool(airflow_db, monkeypatch):
    """The variables reach the mapped operators of every DAG that embeds (and survive serialization); the queue
    and pool are the encode task's alone — the scan, ingest and index tasks stay on the default queue."""
    from airflow.configuration import conf

    bag, dags = _parse(monkeypatch, REINDEX_ENCODE_CONCURRENCY="7", REINDEX_INGEST_CONCURRENCY="9",
                       REINDEX_ENCODE_QUEUE="reindex_gpu", REINDEX_ENCODE_POOL="gpu_pool")
    assert bag.import_errors == {}
    default_queue = conf.get("operators", "default_queue")
    for dag_id in EMBEDDING_DAGS:
        for dag in (bag.get_dag(dag_id), dags[dag_id]):
            encode, ingest = dag.get_task("encode_partition"), dag.get_task("ingest_results")
            assert (encode.max_active_tis_per_dagrun, encode.queue, encode.pool) == (7, "reindex_gpu",
                                                                                    "gpu_pool"), dag_id
            assert (ingest.max_active_tis_per_dagrun, ingest.queue, ingest.pool) == (9, default_queue,
                                                                                    "default_pool"), dag_id
            others = {t.task_id: (t.queue, t.pool) for t in dag.tasks if t.task_id != "encode_partition"}
            assert set(others.values()) == {(default_queue, "default_pool")}, (dag_id, others)


@pytest.mark.parametrize("name,value,message", [
    ("REINDEX_ENCODE_CONCURRENCY", "0", "REINDEX_ENCODE_CONCURRENCY='0' is out of range: must be at least 1"),
    ("REINDEX_INGEST_CONCURRENCY", "four", "REINDEX_INGEST_CONCURRENCY='four' is not a whole number"),
    ("REINDEX_ENCODE_CONCURRENCY", "2.5", "REINDEX_ENCODE_CONCURRENCY='2.5' is not a whole number"),
])
def test_a_bad_value_is_an_import_error_that_names_it(airflow_db, monkeypatch, name, value, message):
    """A bad value fails the parse of the DAG files that embed (shown as an import error in the UI) with the
    variable, its value and the limit; nothing runs with a guessed concurrency."""
    bag, _ = _parse(monkeypatch, **{name: value})
    failed = {path.rsplit("/", 1)[-1]: err for path, err in bag.import_errors.items()}
    assert set(failed) == {"reindex_corpus.py", "reindex_retry.py", "reindex_model_upgrade.py"}
    assert all(message in err for err in failed.values()), failed


def test_blank_queue_and_pool_mean_the_defaults(airflow_db, monkeypatch):
    from airflow.configuration import conf

    bag, dags = _parse(monkeypatch, REINDEX_ENCODE_QUEUE="  ", REINDEX_ENCODE_POOL="")
    encode = dags["reindex_corpus"].get_task("encode_partition")
    assert (encode.queue, encode.pool) == (conf.get("operators", "default_queue"), "default_pool")


def test_close_results_hangs_on_the_vertex_branch_only(dagbag):
    """close_results' upstreams are the Vertex branch's tasks alone: on a local run all of them are skipped, so the
    scheduler skips it and no task pulls submit_vertex_batch's never-pushed return value (the task SDK logs such a
    pull as "[error] XCom not found"). With no result ranges, ingest_results alone is skipped and it still runs."""
    for dag_id in EMBEDDING_DAGS:
        task = dagbag.get_dag(dag_id).get_task("close_results")
        assert task.upstream_task_ids == {"submit_vertex_batch", "ingest_results"}, dag_id
        assert task.trigger_rule == "none_failed_min_one_success"


def test_the_celery_executor_imports():
    """The pinned celery/kombu/billiard/vine work with the Celery provider (celery 5.7.0 did not: "cannot import
    name 'retry' from 'celery.backends.database'"), and so do both brokers make airflow-celery can use."""
    import importlib.metadata as md

    from airflow.providers.celery.executors.celery_executor import CeleryExecutor
    from kombu.transport import redis as redis_transport
    from kombu.transport import sqlalchemy as sqla_transport

    assert CeleryExecutor.__name__ == "CeleryExecutor"
    assert sqla_transport.Transport.driver_type == "sql" and redis_transport.Transport.driver_type == "redis"
    pinned = {line.split("==")[0]: line.split("==")[1]
              for line in (ROOT / "requirements.txt").read_text().splitlines() if "==" in line and line[0] != "#"}
    for name in ("apache-airflow-providers-celery", "celery", "kombu", "billiard", "vine", "redis"):
        assert md.version(name) == pinned[name], name
