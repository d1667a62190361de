"""reindex_model_upgrade's quality gate end to end (dag.test): a runtime switch that agrees passes and switches;
a model that retrieves worse fails (the old model keeps serving), waits for a human who rejects or approves
(Airflow's human-in-the-loop, answered as the Required Actions page does), or switches anyway."""

from __future__ import annotations

import threading

import pytest

from reindex.store.batches import get_batch
from reindex.store.leases import get_lease
from reindex.store.search import corpus_status
from tests.conftest import SAMPLE_CORPUS

pytestmark = pytest.mark.e2e

CORPUS = "gate_e2e"


@pytest.fixture(scope="module")
def model_16(tmp_path_factory):
    """A real model that retrieves worse: the bundled MiniLM squeezed to 16 dimensions by a seeded Dense layer."""
    from tests.conftest import minilm_with_dense

    return minilm_with_dense(tmp_path_factory.mktemp("models") / "minilm-dense-16", 16, seed=16)


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, dagbag):
    """The corpus indexed once with MiniLM on torch: 120 English and Russian documents."""
    folder = tmp_path_factory.mktemp("gate-corpus")
    for name in ("articles_en.jsonl", "articles_ru.jsonl"):
        lines = (SAMPLE_CORPUS / name).read_text(encoding="utf-8").splitlines()[:60]
        (folder / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    dr = dagbag.get_dag("reindex_corpus").test(run_conf={"corpus": CORPUS, "corpus_uri": str(folder),
                                                          "max_tokens": 64, "overlap_tokens": 8})
    assert dr.state == "success"
    return folder


def _states(dr) -> dict:
    return {ti.task_id: ti.state for ti in dr.get_task_instances()}


def _upgrade_batch(store, dr) -> dict:
    from psycopg import sql

    (batch_id,) = store.one(sql.SQL("SELECT batch_id FROM {} WHERE dag_run_id = %s AND kind = 'upgrade'").format(
        store.t("batches")), (dr.run_id,))
    return get_batch(store, batch_id)


def _answer(task_id: str, choice: str, seen: list, stop: threading.Event) -> None:
    """Answer the first human-in-the-loop request of ``task_id`` as the Required Actions page does (the Core
    API's PATCH …/hitlDetails handler, called in-process against the same metadata DB)."""
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser
    from airflow.api_fastapi.core_api.datamodels.hitl import UpdateHITLDetailPayload
    from airflow.api_fastapi.core_api.routes.public.hitl import update_hitl_detail
    from airflow.models.hitl import HITLDetail
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import select

    while not stop.is_set():
        with create_session() as session:
            row = session.execute(
                select(TaskInstance.dag_id, TaskInstance.run_id, HITLDetail.subject, HITLDetail.body)
                .join(HITLDetail, HITLDetail.ti_id == TaskInstance.id)
                .where(TaskInstance.task_id == task_id, TaskInstance.state == "awaiting_input",
                       HITLDetail.responded_at.is_(None))).first()
            if row is not None:
                seen.append({"subject": row.subject, "body": row.body})
                update_hitl_detail(dag_id=row.dag_id, dag_run_id=row.run_id, task_id=task_id, map_index=-1,
                                   update_hitl_detail_payload=UpdateHITLDetailPayload(chosen_options=[choice]),
                                   user=SimpleAuthManagerUser(username="reviewer", role="admin"), session=session)
                return
        stop.wait(0.5)  # waiting on a condition: the request appears once the task parks itself


def _upgrade_answered(dag, conf: dict, choice: str):
    seen: list = []
    stop = threading.Event()
    t = threading.Thread(target=_answer, args=("approve_switch", choice, seen, stop), daemon=True)
    t.start()
    try:
        dr = dag.test(run_conf=conf)
    finally:
        stop.set()
        t.join(30)
    return dr, seen


def test_runtime_switch_that_agrees_passes_the_gate(indexed, upgrade_dag, store_conn, store_uri, capsys):
    before = corpus_status(store_conn, CORPUS)["model"]["checksum"]
    dr = upgrade_dag.test(run_conf={"corpus": CORPUS, "model": "default", "encoder": "onnx"})
    states = _states(dr)
    assert dr.state == "success", states
    assert states["quality_gate"] == "success" and states["quality_passed"] == "success"
    assert states["switch_model"] == "success" and states["approve_switch"] == "skipped"
    assert states["quality_failed"] == "skipped"
    batch = _upgrade_batch(store_conn, dr)
    q = batch["details"]["quality"]
    assert q["passed"] and q["same_weights"] and q["source"] == "sampled chunks" and q["queries"] == 100
    assert q["agreement"] >= 0.97 and q["min_cosine"] >= 0.99999
    assert q["hit_rate_new"] >= q["hit_rate_old"] - 0.02
    assert "quality gate: 100 sampled chunks" in batch["details"]["message"]
    status = corpus_status(store_conn, CORPUS)
    assert status["model"]["checksum"] == batch["model_checksum"] != before
    assert get_lease(store_conn, CORPUS).free
    _figures_shown_with_the_batch(dr, batch, store_conn, store_uri, capsys)


def _figures_shown_with_the_batch(dr, batch: dict, store, store_uri: str, capsys) -> None:
    """The gate's figures are wherever the batch is shown: the run's note, ``python -m reindex status`` (text and
    JSON) and the Reindex tab's batch data."""
    import json

    from airflow import settings
    from airflow.models.dagrun import DagRun

    from reindex.cli import main
    from reindex.store.inspect import batch_detail

    q = batch["details"]["quality"]
    line = q["line"]
    assert line.startswith("quality gate: 100 sampled chunks, own document in top 10 ")
    for figure in (f"{q['hit_rate_old']:.1%} → {q['hit_rate_new']:.1%} (old → new)",
                   f"top-10 agreement {q['agreement']:.1%}", f"index recall@10 {q['index_recall']:.1%}"):
        assert figure in line, (figure, line)
    with settings.Session() as session:
        note = session.query(DagRun).filter(DagRun.run_id == dr.run_id).one().note
    assert line in note, note
    capsys.readouterr()
    assert main(["--dsn", store_uri, "status", "--corpus", CORPUS]) == 0
    out = capsys.readouterr().out
    assert f"  last batch {batch['batch_id']} [upgrade, local]" in out and f"\n             {line}\n" in out, out
    assert main(["--dsn", store_uri, "status", "--corpus", CORPUS, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)["last_batch"]["quality"]
    assert (shown["agreement"], shown["hit_rate_old"], shown["hit_rate_new"], shown["index_recall"], shown["line"]) == (
        q["agreement"], q["hit_rate_old"], q["hit_rate_new"], q["index_recall"], line)
    detail = batch_detail(store, batch["batch_id"])["quality"]
    assert (detail["agreement"], detail["index_recall"], detail["passed"], detail["line"]) == (
        q["agreement"], q["index_recall"], True, line)


def test_a_worse_model_fails_the_gate_and_the_old_model_keeps_serving(indexed, upgrade_dag, store_conn, model_16):
    serving = corpus_status(store_conn, CORPUS)["model"]["checksum"]
    dr = upgrade_dag.test(run_conf={"corpus": CORPUS, "model": str(model_16), "quality_max_drop": 0.0})
    states = _states(dr)
    assert dr.state == "failed", states
    assert states["quality_gate"] == "success" and states["below_bar"] == "success"
    assert states["quality_failed"] == "failed" and states["switch_model"] == "skipped"
    batch = _upgrade_batch(store_conn, dr)
    q = batch["details"]["quality"]
    assert not q["passed"] and q["hit_rate_new"] < q["hit_rate_old"]
    assert q["reasons"][0].startswith("own-document hit rate fell")
    assert "BELOW THRESHOLD" in batch["details"]["message"]
    assert corpus_status(store_conn, CORPUS)["model"]["checksum"] == serving  # nothing switched
    assert get_lease(store_conn, CORPUS).free  # the corpus is given back

    # wait for a human, who rejects: still the old model; the rows embedded by the failed run are reused
    dr, seen = _upgrade_answered(upgrade_dag, {"corpus": CORPUS, "model": str(model_16), "quality_max_drop": 0.0,
                                               "quality_below": "wait"}, "Reject")
    states = _states(dr)
    assert dr.state == "failed" and states["approve_switch"] == "success", states
    assert states["quality_failed"] == "failed" and states["switch_model"] == "skipped"
    assert len(seen) == 1 and f"Switch corpus {CORPUS} to its new model" in seen[0]["subject"]
    assert "| own document in top 10, old → new |" in seen[0]["body"] and "Below the bar because" in seen[0]["body"]
    batch = _upgrade_batch(store_conn, dr)
    assert batch["details"]["quality"]["decision"]["choice"] == "Reject"
    assert batch["details"]["quality"]["decision"]["by"] == "reviewer"
    assert batch["encoded"] == 0  # resumed: nothing embedded again
    assert corpus_status(store_conn, CORPUS)["model"]["checksum"] == serving
    assert get_lease(store_conn, CORPUS).free

    # wait again, and a human approves: switched
    dr, seen = _upgrade_answered(upgrade_dag, {"corpus": CORPUS, "model": str(model_16), "quality_max_drop": 0.0,
                                               "quality_below": "wait"}, "Approve")
    states = _states(dr)
    assert dr.state == "success", states
    assert states["switch_model"] == "success" and states["quality_failed"] == "skipped"
    batch = _upgrade_batch(store_conn, dr)
    assert batch["details"]["quality"]["decision"]["choice"] == "Approve"
    assert corpus_status(store_conn, CORPUS)["model"]["checksum"] == batch["model_checksum"] != serving


def test_switch_anyway_is_recorded(indexed, upgrade_dag, store_conn, model_16):
    """From the 16-d model back to MiniLM passes on its own; then to the 16-d one again with quality_below=switch."""
    dr = upgrade_dag.test(run_conf={"corpus": CORPUS, "model": "default"})
    assert dr.state == "success", _states(dr)
    assert _upgrade_batch(store_conn, dr)["details"]["quality"]["passed"]
    dr = upgrade_dag.test(run_conf={"corpus": CORPUS, "model": str(model_16), "quality_max_drop": 0.0,
                                    "quality_below": "switch"})
    states = _states(dr)
    assert dr.state == "success", states
    assert states["quality_passed"] == "success" and states["switch_model"] == "success"
    batch = _upgrade_batch(store_conn, dr)
    q = batch["details"]["quality"]
    assert not q["passed"] and q["decision"] == {"choice": "switch anyway", "by": "quality_below=switch"}
    assert corpus_status(store_conn, CORPUS)["model"]["checksum"] == batch["model_checksum"]
