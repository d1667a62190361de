"""reindex_nightly's schedule as an operator meets it: paused when it first appears (unless asked),
which nights a documented backfill command plans, and a failed report failing the night."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def _nights(dag, from_text: str, to_text: str) -> list[str]:
    """The nights ``airflow backfill create --from-date FROM --to-date TO`` plans: the CLI's own date
    parser and Airflow's own backfill planner."""
    # the parser the CLI's --from-date / --to-date use
    from airflow._shared.timezones.timezone import parse as cli_parsedate
    from airflow.models.backfill import _get_info_list
    from airflow.serialization.serialized_objects import DagSerialization

    serialized = DagSerialization.deserialize_dag(DagSerialization.serialize_dag(dag))
    infos = _get_info_list(from_date=cli_parsedate(from_text), to_date=cli_parsedate(to_text), reverse=False,
                           dag=serialized)
    return [i.logical_date.date().isoformat() for i in infos]


def test_the_documented_backfill_runs_seven_nights(dagbag):
    """--to-date is midnight of that day: Nov 7's 02:00 night is after it."""
    dag = dagbag.get_dag("reindex_nightly")
    assert _nights(dag, "2026-11-01", "2026-11-07") == [f"2026-11-0{d}" for d in range(1, 7)]  # 6 nights
    assert _nights(dag, "2026-11-01", "2026-11-08") == [f"2026-11-0{d}" for d in range(1, 8)]  # the 7 of Nov 1-7
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "--from-date 2026-11-01 --to-date 2026-11-08" in readme
    assert "--from-date 2026-11-01 --to-date 2026-11-07" not in readme
    assert "--from-date 2026-11-01 --to-date 2026-11-08" in dag.doc_md


def test_paused_when_it_first_appears_unless_asked(dagbag):
    assert dagbag.get_dag("reindex_nightly").is_paused_upon_creation is True
    code = ("from airflow.dag_processing.dagbag import DagBag; import sys; "
            f"b = DagBag(dag_folder={str(ROOT / 'dags' / 'reindex_nightly.py')!r}); "
            "print(b.import_errors or b.get_dag('reindex_nightly').is_paused_upon_creation)")
    for value, paused in (("true", "False"), ("1", "False"), ("false", "True"), ("", "True")):
        out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "REINDEX_NIGHTLY_ACTIVE": value},
                             capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        assert out == paused, (value, out)


def test_a_failed_report_fails_the_night(dagbag):
    """Airflow decides a run's state by its leaf tasks: the report must be one (an `all_done` task
    after it would turn a night whose corpus failed green)."""
    dag = dagbag.get_dag("reindex_nightly")
    assert {t.task_id for t in dag.leaves} == {"report", "drop_retired_stores"}
    assert dag.get_task("report").trigger_rule == "all_done"
    assert dag.get_task("report").upstream_task_ids == {"reindex"}
    reindex = dag.get_task("reindex")
    assert reindex.partial_kwargs["reset_dag_run"] is True  # clearing it re-runs its corpus run


@pytest.mark.parametrize("doc", ["README.md", "dags/reindex_nightly.py"])
def test_the_variable_adds_to_the_file(doc):
    text = " ".join((ROOT / doc).read_text(encoding="utf-8").split())
    assert "the bundled `sample` corpus keeps running unless" in text
