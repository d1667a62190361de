"""DAG integrity: imports, tags, retries, docs, Params — without torch at parse; an Airflow-free core."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

DAG_IDS = {"reindex_corpus", "reindex_retry", "reindex_nightly", "reindex_model_upgrade"}


def test_no_import_errors(dagbag):
    assert dagbag.import_errors == {}
    assert set(dagbag.dag_ids) >= DAG_IDS


@pytest.mark.parametrize("dag_id", sorted(DAG_IDS))
def test_dag_conventions(dagbag, dag_id):
    dag = dagbag.get_dag(dag_id)
    assert "reindex" in dag.tags
    assert dag.doc_md and len(dag.doc_md) > 200
    assert dag.default_args["owner"] == "reindex"
    assert not dag.catchup
    for t in dag.tasks:
        if t.task_id not in {"summarize", "fail_batch", "branch", "done", "trigger_retry", "choose_backend",
                             "reindex", "report", "switch_model", "fail_upgrade"}:
            assert t.retries >= 1, f"{dag_id}.{t.task_id} has no retries"


def test_nightly_is_scheduled_and_backfillable(dagbag):
    """Cron 02:00 UTC by default, catchup off, and Airflow's backfill planner finds one run a night."""
    from datetime import UTC, datetime

    from airflow.models.backfill import _get_info_list
    from airflow.serialization.serialized_objects import DagSerialization

    dag = dagbag.get_dag("reindex_nightly")
    assert not dag.catchup and dag.max_active_runs == 1
    serialized = DagSerialization.deserialize_dag(DagSerialization.serialize_dag(dag))
    assert serialized.timetable.periodic
    infos = _get_info_list(from_date=datetime(2026, 11, 20, tzinfo=UTC), to_date=datetime(2026, 11, 22, 12, tzinfo=UTC),
                           reverse=False, dag=serialized)
    assert [i.run_after.isoformat() for i in infos] == [f"2026-11-{d}T02:00:00+00:00" for d in (20, 21, 22)]
    reindex = dag.get_task("reindex")
    assert reindex.partial_kwargs["trigger_dag_id"] == "reindex_corpus"
    assert reindex.partial_kwargs["deferrable"] and reindex.partial_kwargs["wait_for_completion"]
    assert dag.get_task("report").trigger_rule == "all_done"


def test_model_upgrade_shape(dagbag):
    dag = dagbag.get_dag("reindex_model_upgrade")
    # every chunk embedded → the quality gate (pass / human approval / below the bar) before switch_model
    assert dag.get_task("branch").downstream_task_ids == {"quality_gate", "fail_upgrade"}
    assert dag.get_task("switch_model").upstream_task_ids == {"quality_passed", "approve_switch"}
    assert "build_index" in dag.get_task("summarize").upstream_task_ids
    assert "trigger_retry" not in {t.task_id for t in dag.tasks}  # a rerun of the upgrade resumes instead
    assert dag.params["index_type"] == "hnsw"
    # the same model with another storage is an upgrade: the Param reaches the target's configuration
    from reindex_airflow.tasks import upgrade_config

    assert dag.params["storage"] == "vector"
    cfg = upgrade_config({"corpus": "kb", "model": "all-MiniLM-L6-v2", "storage": "halfvec", "dimension": 384})
    assert cfg.storage.value == "halfvec" and cfg.model == "all-MiniLM-L6-v2"


def test_reindex_corpus_shape(dagbag):
    dag = dagbag.get_dag("reindex_corpus")
    ids = {t.task_id for t in dag.tasks}
    assert ids == {"prepare", "list_corpus", "scan_shard", "finish_scan", "choose_backend", "plan_partitions", "encode_partition",
                   "submit_vertex_batch", "plan_result_ranges", "ingest_results", "close_results",
                   "build_index", "summarize", "branch", "done", "trigger_retry", "fail_batch"}
    assert dag.get_task("choose_backend").downstream_task_ids == {"plan_partitions", "submit_vertex_batch"}
    assert dag.get_task("scan_shard").downstream_task_ids == {"finish_scan"}
    assert dag.get_task("finish_scan").trigger_rule == "none_failed"  # also when no shard was planned
    assert dag.get_task("branch").downstream_task_ids == {"done", "trigger_retry", "fail_batch"}
    assert dag.get_task("summarize").trigger_rule == "all_done"
    assert dag.get_task("trigger_retry").trigger_dag_id == "reindex_retry"


def test_parse_never_imports_heavy_libraries():
    """Parsing the DAG folder imports no torch, sentence-transformers or Google client (its time is measured in
    benchmarks/, `make bench BENCH_ARGS="--only airflow"`, not asserted here)."""
    code = f"""
import json, sys, time
sys.path.insert(0, {str(ROOT / 'plugins')!r})
t0 = time.monotonic()
from airflow.dag_processing.dagbag import DagBag
t1 = time.monotonic()
bag = DagBag(dag_folder={str(ROOT / 'dags')!r})
t2 = time.monotonic()
heavy = sorted(m for m in ("torch", "sentence_transformers", "transformers", "google.cloud.aiplatform") if m in sys.modules)
print(json.dumps({{"parse": t2 - t1, "errors": len(bag.import_errors), "heavy": heavy}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["errors"] == 0
    assert result["heavy"] == []


def test_the_core_never_imports_airflow():
    """``include/reindex`` is Airflow-free: no module of the core imports airflow, directly or at import time."""
    import ast

    offenders = []
    for path in sorted((ROOT / "include" / "reindex").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names
                          if n == "airflow" or n.startswith("airflow.")]
    assert offenders == []
    code = """
import pkgutil, importlib, sys
import reindex
for m in pkgutil.walk_packages(reindex.__path__, "reindex."):
    if m.name.endswith("__main__") or m.name.rsplit(".", 1)[-1].startswith("_vecparse"):
        continue  # CLIs run on import; the native parser is a ctypes library, not a Python module
    importlib.import_module(m.name)
print(sorted(k for k in sys.modules if k == "airflow" or k.startswith("airflow.")))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize(
    "conf,message",
    [
        ({"corpus": "Bad Name"}, "param corpus: 'Bad Name' does not match"),
        ({"backend": "openai"}, "param backend: 'openai' is not one of"),
        ({"max_tokens": 5}, "param max_tokens: 5 is less than the minimum of 16"),
        ({"partition_size": 0}, "param partition_size"),
        ({"output_dimensionality": 0}, "param output_dimensionality"),
        ({"storage": "float16"}, "param storage: 'float16' is not one of \\['vector', 'halfvec'\\]"),
    ],
)
def test_invalid_params_are_rejected_before_the_run(dagbag, conf, message):
    """A run with invalid conf is refused when it is created: no task (and no batch) ever starts."""
    from airflow.sdk.exceptions import ParamValidationError

    dag = dagbag.get_dag("reindex_corpus")
    with pytest.raises(ParamValidationError, match=message):
        dag.test(run_conf=conf)


def test_default_params_are_valid(dagbag):
    dag = dagbag.get_dag("reindex_corpus")
    validated = dag.params.validate()
    assert validated["corpus"] == "sample" and validated["backend"] == "local"
