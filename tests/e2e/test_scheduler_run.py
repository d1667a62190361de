"""Runs through real Airflow processes: scheduler (LocalExecutor), dag-processor, triggerer and
api-server (the Execution API the task processes talk to), triggered from the CLI like an operator
would: two nightly runs over configured corpora (the second does no work), with a manual run on
one of the corpora racing the first nightly run; and a sharded scan (tiny shards, mapped scan tasks in
parallel) through a corpus's changes, held against the single-task scan."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from reindex.store import Store, connect
from reindex.store.search import corpus_status
from tests.e2e.services import AIRFLOW, airflow_processes

pytestmark = pytest.mark.e2e




@pytest.fixture
def corpora(tmp_path):
    texts = {"night_a": ["Glaciers carve U-shaped valleys.", "Bees pollinate apple blossoms.",
                         "Лёд на Байкале прозрачный."],
             "night_b": ["Lighthouses rotate their lenses with clockwork.", "Sourdough rises with wild yeast."]}
    lines = ["corpora:"]
    for name, docs in texts.items():
        root = tmp_path / name
        root.mkdir()
        for i, text in enumerate(docs):
            (root / f"n{i}.txt").write_text(text, encoding="utf-8")
        lines += [f"  - name: {name}", f"    uri: {root}", "    backend: local"]
    path = tmp_path / "corpora.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path, {name: len(docs) for name, docs in texts.items()}


@pytest.fixture
def airflow_services(airflow_db, tmp_path, corpora):
    # Feb 29 at 02:00: its last fire time (2024) is before the DAG's start date, so unpausing it
    # does not start a scheduled run of its own; the test triggers its nights by hand.
    with airflow_processes(tmp_path, corpora[0], "0 2 29 2 *") as (env, logs):
        yield env, logs


def _run_state(dag_id: str, run_id: str) -> str | None:
    from airflow import settings
    from airflow.models.dagrun import DagRun

    with settings.Session() as session:
        dr = session.query(DagRun).filter(DagRun.dag_id == dag_id, DagRun.run_id == run_id).one_or_none()
        return None if dr is None else str(dr.state)


def _wait(runs: list[tuple[str, str]], logs, timeout: float = 480) -> None:
    deadline = time.monotonic() + timeout
    states = {}
    while time.monotonic() < deadline:
        states = {r: _run_state(*r) for r in runs}
        if all(s in ("success", "failed") for s in states.values()):
            break
        time.sleep(3)
    tails = {n: Path(p).read_text()[-3000:] for n, p in logs.items()} if any(
        s != "success" for s in states.values()) else {}
    assert all(s == "success" for s in states.values()), f"runs ended {states}; logs: {tails}"


def _batches(store, corpus):
    from psycopg import sql

    cur = store.execute(sql.SQL("""SELECT dag_run_id, status, encoded, reused, started_at, finished_at,
        details->>'message' FROM {} WHERE corpus = %s ORDER BY started_at""").format(store.t("batches")), (corpus,))
    return cur.fetchall()


def test_nightly_runs_through_the_scheduler(airflow_services, corpora, store_uri):
    env, logs = airflow_services
    _, ndocs = corpora
    for args in (["dags", "reserialize"], ["dags", "unpause", "reindex_corpus"],
                 ["dags", "unpause", "reindex_nightly"]):
        subprocess.run([*AIRFLOW, *args], env=env, check=True, capture_output=True)
    stamp = int(time.time())
    night1, manual = f"night1_{stamp}", f"manual_{stamp}"
    subprocess.run([*AIRFLOW, "dags", "trigger", "reindex_nightly", "--run-id", night1], env=env, check=True,
                   capture_output=True)
    # a manual run of one configured corpus, racing the nightly one for the corpus's lease
    subprocess.run([*AIRFLOW, "dags", "trigger", "reindex_corpus", "--run-id", manual, "--conf",
                    json.dumps({"corpus": "night_a", "corpus_uri": str(corpora[0].parent / "night_a")})],
                   env=env, check=True, capture_output=True)
    _wait([("reindex_nightly", night1), ("reindex_corpus", manual),
           ("reindex_corpus", f"nightly__{night1}__night_a"), ("reindex_corpus", f"nightly__{night1}__night_b")], logs)

    with connect(store_uri, autocommit=True) as conn:
        store = Store(conn)
        for corpus, n in ndocs.items():
            st = corpus_status(store, corpus)
            assert st["chunks"] == {"READY": n, "PENDING": 0, "FAILED": 0} and st["lease"] is None
        rows = _batches(store, "night_a")
        assert len(rows) == 2, rows
        first, second = rows
        assert {first[0], second[0]} == {manual, f"nightly__{night1}__night_a"}
        assert first[5] <= second[4]  # the later run's writes began after the first closed its batch
        assert (first[2], second[2]) == (3, 0)  # whichever ran second found nothing to embed
    # each corpus run's note (written by the scheduler's listener) says its batch's outcome
    from airflow import settings
    from airflow.models.dagrun import DagRun

    with settings.Session() as session:
        note = session.query(DagRun).filter(DagRun.dag_id == "reindex_corpus", DagRun.run_id == manual).one().note
    assert note.startswith("night_a: COMPLETED — ") and note.endswith(first[6] if first[0] == manual else second[6])

    night2 = f"night2_{stamp}"
    subprocess.run([*AIRFLOW, "dags", "trigger", "reindex_nightly", "--run-id", night2], env=env, check=True,
                   capture_output=True)
    _wait([("reindex_nightly", night2)], logs)
    with connect(store_uri, autocommit=True) as conn:
        store = Store(conn)
        for corpus, n in ndocs.items():
            run_id, status, encoded, reused, *_, message = _batches(store, corpus)[-1]
            assert (run_id, status, encoded, reused) == (f"nightly__{night2}__{corpus}", "COMPLETED", 0, n)
            assert message.startswith("nothing to embed: 0 chunks encoded, 0 batch jobs submitted")



@pytest.fixture
def sharded_services(airflow_db, tmp_path, corpora, monkeypatch):
    # tiny shards: the corpus of tests/integration/test_sharded_scan.py becomes 20-odd mapped scan tasks
    monkeypatch.setenv("REINDEX_SCAN_SHARD_BYTES", "300")
    monkeypatch.setenv("REINDEX_SCAN_SHARD_FILES", "3")
    with airflow_processes(tmp_path, corpora[0], "0 2 29 2 *") as (env, logs):
        yield env, logs


def test_sharded_scan_through_the_scheduler_equals_the_single_task_scan(sharded_services, store_uri, tmp_path,
                                                                        encoder, store):
    """Additions, edits, deletions, a moved file, duplicate ids across shards and split .jsonl/.parquet files:
    after each change, the DAG's sharded scan (scan_shard tasks run in parallel by the LocalExecutor) leaves the
    same documents, chunks, fingerprints and vectors as ``pipeline.chunk_corpus`` in a schema of its own; an
    unchanged run plans no shard, so no content is read."""
    from reindex.config import ReindexConfig
    from tests.integration.test_sharded_scan import _change, _initial, _jsonl, compare_stores, single_task_run

    env, logs = sharded_services
    subprocess.run([*AIRFLOW, "dags", "unpause", "reindex_corpus"], env=env, check=True, capture_output=True)
    root = tmp_path / "kb"
    _initial(root)
    cfg = ReindexConfig(corpus="sharded_e2e", corpus_uri=str(root), max_tokens=32, overlap_tokens=4)
    conf = {"corpus": cfg.corpus, "corpus_uri": str(root), "max_tokens": 32, "overlap_tokens": 4}

    def dag_run(n: int) -> list:
        run_id = f"sharded_{n}_{int(time.time())}"
        subprocess.run([*AIRFLOW, "dags", "trigger", "reindex_corpus", "--run-id", run_id, "--conf", json.dumps(conf)],
                       env=env, check=True, capture_output=True)
        _wait([("reindex_corpus", run_id)], logs)
        from airflow import settings
        from airflow.models.taskinstance import TaskInstance

        with settings.Session() as session:
            return session.query(TaskInstance).filter(TaskInstance.dag_id == "reindex_corpus",
                                                      TaskInstance.run_id == run_id).all()

    fixed = [{"id": f"j{i}", "text": f"Line {i} about otters and rivers. " * (1 + i % 4)} for i in range(5, 46)]
    with connect(store_uri, autocommit=True) as conn:
        dag_store = Store(conn)
        for step, change in enumerate([None, _change, lambda r: _jsonl(r / "a_lines.jsonl", fixed)]):
            if change is not None:
                change(root)
            tis = dag_run(step)
            shards = [ti for ti in tis if ti.task_id == "scan_shard"]
            assert len(shards) > 5 and {str(ti.state) for ti in shards} == {"success"}
            manifest = single_task_run(store, cfg, root, f"ref{step}", encoder)
            dag_manifest = next(ti for ti in tis if ti.task_id == "finish_scan").xcom_pull(task_ids="finish_scan")
            compare_stores(dag_store, store, cfg.corpus, dag_manifest, manifest)

        tis = dag_run(3)  # nothing changed since the last run
        assert [ti for ti in tis if ti.task_id == "scan_shard" and ti.state is not None and
                str(ti.state) != "skipped"] == []
        manifest = next(ti for ti in tis if ti.task_id == "finish_scan").xcom_pull(task_ids="finish_scan")
        assert (manifest["read_files"], manifest["shards"], manifest["pending"]) == (0, 0, 0)
        assert manifest["unchanged_files"] == manifest["files"] == 12
