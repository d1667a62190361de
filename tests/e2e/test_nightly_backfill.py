"""Re-running a night of ``reindex_nightly`` really runs it again, through real Airflow processes
(scheduler, dag-processor, triggerer, api-server) driven by the CLI an operator would use:
a backfill with ``--reprocess-behavior completed``, ``airflow dags clear`` of a night whose corpus
cannot be read (the night fails, its report does not show the older COMPLETED batch), then
``airflow dags clear --only-failed`` after the fix (the same corpus run is cleared and re-run).
And, through ``dag.test()``: a night with no corpus on a brand-new store migrates the store and
logs no error."""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from psycopg import sql

from reindex.pipeline import batch_id_for
from reindex.store import Store, connect
from tests.e2e.services import AIRFLOW, airflow_processes

pytestmark = pytest.mark.e2e

CORPUS = "rerun_kb"
DOCS = ["Glaciers carve U-shaped valleys.", "Bees pollinate apple blossoms."]
# The test's cron fires on Feb 29 only: its last fire time (2024) is before the DAG's start date, so
# unpausing starts no scheduled run, and 2024-02-29 02:00 is the one night the backfill plans.
CRON = "0 2 29 2 *"
FROM, TO = "2024-02-29", "2024-03-01"
NIGHT = "backfill__2024-02-29T02:00:00+00:00"


def test_an_empty_night_on_a_fresh_store(dagbag, tmp_path, monkeypatch, capfd, store_uri):
    """The first night on a new store: nothing configured, nothing migrated yet. The night succeeds,
    skips report, migrates the store in drop_retired_stores, and logs no error for the skipped path."""
    schema = f"fresh_{uuid.uuid4().hex[:8]}"
    empty = tmp_path / "corpora.yaml"
    empty.write_text("corpora: []\n", encoding="utf-8")
    monkeypatch.setenv("REINDEX_CORPORA_FILE", str(empty))
    conn = json.loads(os.environ["AIRFLOW_CONN_REINDEX_PG"])
    conn["extra"]["store_schema"] = schema
    monkeypatch.setenv("AIRFLOW_CONN_REINDEX_PG", json.dumps(conn))

    dr = dagbag.get_dag("reindex_nightly").test()
    out = capfd.readouterr()
    states = {ti.task_id: ti.state for ti in dr.get_task_instances()}
    assert dr.state == "success" and states == {"corpora": "skipped", "reindex": "skipped", "report": "skipped",
                                                "drop_retired_stores": "success"}, states
    logs = out.out + out.err
    assert f"no enabled corpus in {empty}" in logs and "no corpus was run: the corpora task ended skipped" in logs
    assert "[error" not in logs and "XCom not found" not in logs
    from reindex.store.schema import MIGRATIONS

    with connect(store_uri, autocommit=True) as c:
        versions = [r[0] for r in c.execute(sql.SQL("SELECT version FROM {} ORDER BY 1").format(
            sql.Identifier(schema, "schema_migrations")))]
        assert versions == [m[0] for m in MIGRATIONS]
        c.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))



@pytest.fixture
def corpus_dir(tmp_path):
    root = tmp_path / CORPUS
    root.mkdir()
    for i, text in enumerate(DOCS):
        (root / f"d{i}.txt").write_text(text, encoding="utf-8")
    (tmp_path / "corpora.yaml").write_text(f"corpora:\n  - name: {CORPUS}\n    uri: {root}\n    backend: local\n",
                                           encoding="utf-8")
    return root


@pytest.fixture
def services(airflow_db, tmp_path, corpus_dir):
    # Feb 29 at 02:00: its last fire time (2024) is before the DAG's start date, so unpausing it
    # does not start a scheduled run of its own; the test triggers its nights by hand.
    with airflow_processes(tmp_path, tmp_path / "corpora.yaml", CRON) as (env, logs):
        yield env, logs


def _cli(env, *args: str) -> str:
    p = subprocess.run([*AIRFLOW, *args], env=env, capture_output=True, text=True)
    assert p.returncode == 0, (args, p.stdout[-2000:], p.stderr[-3000:])
    return p.stdout + p.stderr


def _run(dag_id: str, run_id: str):
    from airflow import settings
    from airflow.models.dagrun import DagRun

    with settings.Session() as session:
        dr = session.query(DagRun).filter(DagRun.dag_id == dag_id, DagRun.run_id == run_id).one_or_none()
        return None if dr is None else (str(dr.state), dr.clear_number)


def _wait(runs: list[tuple[str, str]], logs, timeout: float = 300) -> dict:
    """Until every run exists and is finished; returns {run: state}."""
    deadline = time.monotonic() + timeout
    states: dict = {}
    while time.monotonic() < deadline:
        states = {r: (_run(*r) or (None,))[0] for r in runs}
        if all(s in ("success", "failed") for s in states.values()):
            return states
        time.sleep(2)
    tails = {n: Path(p).read_text()[-3000:] for n, p in logs.items()}
    raise AssertionError(f"runs did not finish: {states}; logs: {tails}")


def _wait_backfills_done(logs, timeout: float = 300) -> None:
    """Until the scheduler has marked every backfill of reindex_nightly complete (one at a time per DAG)."""
    from airflow import settings
    from airflow.models.backfill import Backfill

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with settings.Session() as session:
            running = session.query(Backfill).filter(Backfill.dag_id == "reindex_nightly",
                                                     Backfill.completed_at.is_(None)).count()
        if not running:
            return
        time.sleep(2)
    tails = {n: Path(p).read_text()[-3000:] for n, p in logs.items()}
    raise AssertionError(f"a backfill of reindex_nightly is still running; logs: {tails}")


def _ti_states(run_id: str) -> dict:
    from airflow import settings
    from airflow.models.taskinstance import TaskInstance

    with settings.Session() as session:
        return {(ti.task_id if ti.map_index < 0 else f"{ti.task_id}_{ti.map_index}"): str(ti.state)
                for ti in session.query(TaskInstance).filter(TaskInstance.dag_id == "reindex_nightly",
                                                             TaskInstance.run_id == run_id)}


def _report(run_id: str) -> dict | None:
    from airflow import settings
    from airflow.models.xcom import XComModel

    with settings.Session() as session:
        row = session.query(XComModel.value).filter(
            XComModel.dag_id == "reindex_nightly", XComModel.run_id == run_id, XComModel.task_id == "report",
            XComModel.key == "return_value").one_or_none()
    if row is None:
        return None
    value = row[0]
    return json.loads(value) if isinstance(value, str) else value


def _batches(store_uri: str, run_id: str) -> list[tuple]:
    with connect(store_uri, autocommit=True) as conn:
        store = Store(conn)
        return store.execute(sql.SQL("""SELECT batch_id, status, encoded, reused, details->>'message' FROM {}
            WHERE corpus = %s AND dag_run_id = %s ORDER BY started_at""").format(store.t("batches")),
            (CORPUS, run_id)).fetchall()


def _report_log(env) -> str:
    folder = Path(env["AIRFLOW__LOGGING__BASE_LOG_FOLDER"]) / "dag_id=reindex_nightly" / f"run_id={NIGHT}"
    return "\n".join(p.read_text() for p in sorted(folder.glob("task_id=report/attempt=*.log")))


def test_a_night_run_again_runs_again(services, corpus_dir, store_uri):
    env, logs = services
    for args in (["dags", "unpause", "reindex_corpus"], ["dags", "unpause", "reindex_nightly"]):
        _cli(env, *args)
    backfill = ["backfill", "create", "--dag-id", "reindex_nightly", "--from-date", FROM, "--to-date", TO]

    # 1. the night, backfilled: its corpus run embeds both documents
    _cli(env, *backfill)
    first = f"nightly__{NIGHT}__{CORPUS}"
    assert _wait([("reindex_nightly", NIGHT), ("reindex_corpus", first)], logs) == {
        ("reindex_nightly", NIGHT): "success", ("reindex_corpus", first): "success"}
    (b1,) = _batches(store_uri, first)
    assert b1[:4] == (batch_id_for("reindex_corpus", first, CORPUS), "COMPLETED", 2, 0)
    assert _report(NIGHT)["corpora"][CORPUS]["batch_id"] == b1[0]

    # 2. without --reprocess-behavior a backfill skips a night that ran; with it, the night is planned again
    dry = [*backfill, "--dry-run"]
    assert "2024-02-29" not in _cli(env, *dry).split("Runs to be attempted:")[-1]
    assert "2024-02-29 02:00:00+00:00" in _cli(env, *dry, "--reprocess-behavior", "completed").split(
        "Runs to be attempted:")[-1]

    # 3. cleared while its corpus cannot be read: the corpus run fails, so does the night, and the report
    # does not fall back on the COMPLETED batch of the first attempt
    corpus_dir.rename(corpus_dir.with_name("moved_away"))
    _cli(env, "dags", "clear", "reindex_nightly", "--run-id", NIGHT, "--yes")
    second = f"{first}__rerun1"
    assert _wait([("reindex_nightly", NIGHT), ("reindex_corpus", second)], logs) == {
        ("reindex_nightly", NIGHT): "failed", ("reindex_corpus", second): "failed"}
    assert _ti_states(NIGHT) == {"corpora": "success", "reindex_0": "failed", "report": "failed",
                                 "drop_retired_stores": "success"}
    assert _report(NIGHT) is None
    assert all(b[1] != "COMPLETED" for b in _batches(store_uri, second))
    log = _report_log(env)
    assert f"nightly run incomplete: {{'{CORPUS}': " in log and f"reindex_corpus run {second} ended failed" in log

    # 4. fixed, and only the failed tasks cleared: the same corpus run is cleared and re-run (reset_dag_run)
    corpus_dir.with_name("moved_away").rename(corpus_dir)
    _cli(env, "dags", "clear", "reindex_nightly", "--run-id", NIGHT, "--only-failed", "--yes")
    assert _wait([("reindex_nightly", NIGHT)], logs) == {("reindex_nightly", NIGHT): "success"}
    assert _run("reindex_corpus", second) == ("success", 1)  # cleared once, not a new run
    assert _run("reindex_corpus", f"{first}__rerun2") is None  # `corpora` was not re-run
    b2 = _batches(store_uri, second)[-1]
    assert b2[:4] == (batch_id_for("reindex_corpus", second, CORPUS), "COMPLETED", 0, 2) and b2[0] != b1[0]
    assert b2[4].startswith("nothing to embed: 0 chunks encoded, 0 batch jobs submitted")
    entry = _report(NIGHT)["corpora"][CORPUS]
    assert (entry["batch_id"], entry["run_id"], entry["status"], entry["ok"]) == (b2[0], second, "COMPLETED", True)

    # 5. a backfill with reprocessing clears the night (its third clear): new corpus run, new batch, named
    # by the report. (One backfill at a time per DAG: wait until the scheduler has closed the first.)
    _wait_backfills_done(logs)
    _cli(env, *backfill, "--reprocess-behavior", "completed")
    fourth = f"{first}__rerun3"
    assert _wait([("reindex_nightly", NIGHT), ("reindex_corpus", fourth)], logs) == {
        ("reindex_nightly", NIGHT): "success", ("reindex_corpus", fourth): "success"}
    assert _run("reindex_nightly", NIGHT) == ("success", 3)
    (b4,) = _batches(store_uri, fourth)
    assert b4[:4] == (batch_id_for("reindex_corpus", fourth, CORPUS), "COMPLETED", 0, 2)
    entry = _report(NIGHT)["corpora"][CORPUS]
    assert (entry["batch_id"], entry["run_id"], entry["status"], entry["encoded"], entry["reused"]) == (
        b4[0], fourth, "COMPLETED", 0, 2)
