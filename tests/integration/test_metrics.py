"""reindex metrics through Airflow's own StatsD / OpenTelemetry clients, received by a real UDP socket.

Each case runs the emitting code in a fresh Python process configured only through Airflow's
``AIRFLOW__METRICS__*`` settings (as a worker would be), so nothing of this test process's Airflow
state leaks in; the in-process route (``statsd_listener`` around ``dag.test()``) is checked last.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import ROOT
from tests.udp_listener import StatsdListener, statsd_listener

SUMMARY = {"batch_id": "b-1", "corpus": "kb", "kind": "full", "status": "COMPLETED_WITH_ERRORS", "total": 10,
           "ready": 7, "failed": 3, "reused": 4, "retriable": 2, "jobs_submitted": 1,
           "counts_by_reason": {"TOO_LONG": 1, "RATE_LIMITED": 2}, "seconds": 1.5}
COST = {"tokens": 12345, "characters": 67890, "token_source": "service", "compute_seconds": 0.0,
        "cost": {"usd": 0.000926, "online_usd": 0.001852, "saving_usd": 0.000926, "unit": "1M_tokens",
                 "price_date": "2025-09-10", "note": ""}}
EMIT_ALL = f"""
from reindex_airflow import metrics as m
m.batch_closed({SUMMARY!r}, backend="vertex", cost={COST!r})
m.partition_done("encode", {{"batch_id": "b-1", "partition": 0, "chunks": 6, "ready": 5, "failed": 1,
                            "seconds": 0.25}}, corpus="kb", backend="local")
m.partition_done("ingest", {{"lines": 9, "ready": 8, "failed": 1, "unattributed": 0, "tokens": 70,
                            "by_reason": {{"RATE_LIMITED": 1}}, "seconds": 2.0}}, corpus="kb", backend="vertex",
                 batch_id="b-1", map_index=3)
m.vertex_jobs_waited(61.5, [{{"name": "projects/p/locations/l/batchPredictionJobs/1", "state": "SUCCEEDED",
                             "completion_stats": {{"successful": 9, "failed": 1, "incomplete": 0}}, "error": None}},
                            {{"name": "projects/p/locations/l/batchPredictionJobs/2", "state": "FAILED",
                             "completion_stats": {{"successful": 0, "failed": 0, "incomplete": 5}},
                             "error": {{"code": 3, "message": "bad input"}}}}], corpus="kb", batch_id="b-1")
m.lease_waited("kb", 0.75, batch_id="b-1", run_id="manual__1")
"""

EXPECTED_LINES = [
    "airflow.reindex.chunks.ready:7|c",
    "airflow.reindex.chunks.failed.RATE_LIMITED:2|c",
    "airflow.reindex.chunks.failed.TOO_LONG:1|c",
    "airflow.reindex.chunks.reused:4|c",
    "airflow.reindex.batches.COMPLETED_WITH_ERRORS:1|c",
    "airflow.reindex.batch.seconds:1500.000000|ms",
    "airflow.reindex.tokens:12345|c",
    "airflow.reindex.characters:67890|c",
    "airflow.reindex.cost.usd_micros:926|c",
    "airflow.reindex.cost.online_usd_micros:1852|c",
    "airflow.reindex.encode.rows:5|c",
    "airflow.reindex.encode.failed:1|c",
    "airflow.reindex.encode.seconds:250.000000|ms",
    "airflow.reindex.ingest.rows:8|c",
    "airflow.reindex.ingest.failed:1|c",
    "airflow.reindex.ingest.lines:9|c",
    "airflow.reindex.ingest.seconds:2000.000000|ms",
    "airflow.reindex.vertex.wait.seconds:61500.000000|ms",
    "airflow.reindex.vertex.jobs.SUCCEEDED:1|c",
    "airflow.reindex.vertex.jobs.FAILED:1|c",
    "airflow.reindex.lease.wait.seconds:750.000000|ms",
]


def run_python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter with plugins/ importable (as Airflow puts it on sys.path)."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW__METRICS__")}
    full.update(env, PYTHONPATH=str(ROOT / "plugins"))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full, capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, f"emitting process failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_airflow_statsd_client_is_installed():
    """Without the ``statsd`` package Airflow logs "Could not configure StatsClient" and sends nothing."""
    import importlib.util

    assert importlib.util.find_spec("statsd") is not None, (
        "the 'statsd' package is missing: add statsd (Airflow's statsd extra) to requirements.txt")


@pytest.fixture
def listener():
    lst = StatsdListener()
    yield lst
    lst.close()


def test_every_metric_arrives_as_exact_statsd_lines(listener):
    run_python(EMIT_ALL, listener.env())
    listener.sync()
    assert listener.lines("airflow.reindex.") == EXPECTED_LINES


def test_statsd_prefix_and_allow_list_are_airflows(listener):
    run_python(EMIT_ALL, listener.env(prefix="prod", metrics_allow_list="reindex.chunks.,reindex.batches."))
    listener.sync()
    assert listener.lines("prod.") == [
        "prod.reindex.chunks.ready:7|c",
        "prod.reindex.chunks.failed.RATE_LIMITED:2|c",
        "prod.reindex.chunks.failed.TOO_LONG:1|c",
        "prod.reindex.chunks.reused:4|c",
        "prod.reindex.batches.COMPLETED_WITH_ERRORS:1|c",
    ]
    assert listener.lines("airflow.") == []


def test_influxdb_tags_ride_on_the_name(listener):
    run_python(EMIT_ALL, listener.env(statsd_influxdb_enabled="True"))
    listener.sync()
    lines = listener.lines("airflow.reindex.")
    assert lines[:2] == [
        "airflow.reindex.chunks.ready,corpus=kb,backend=vertex,kind=full:7|c",
        "airflow.reindex.chunks.failed.RATE_LIMITED,corpus=kb,backend=vertex,kind=full,reason=RATE_LIMITED:2|c",
    ]
    assert "airflow.reindex.vertex.jobs.FAILED,corpus=kb,state=FAILED:1|c" in lines
    assert len(lines) == len(EXPECTED_LINES)


def test_metrics_off_sends_nothing_and_does_not_fail(listener):
    env = listener.env()
    env["AIRFLOW__METRICS__STATSD_ON"] = "False"
    run_python(EMIT_ALL, env)
    listener.sync()
    assert listener.lines() == []


def test_a_bad_summary_is_logged_not_raised(listener):
    proc = run_python("""
        from reindex_airflow import metrics as m
        m.batch_closed({"corpus": "kb", "status": "FAILED", "counts_by_reason": ["not", "a", "dict"]})
        m.lease_waited("kb", 1.0)
        try:
            m.partition_done("decode", {})
        except ValueError as e:
            print("refused:", e)
        """, listener.env())
    listener.sync()
    assert "reindex metrics: batch_closed not emitted: AttributeError" in proc.stdout + proc.stderr
    assert "refused: partition kind 'decode' is not one of ['encode', 'ingest']" in proc.stdout
    assert listener.lines("airflow.reindex.lease.") == ["airflow.reindex.lease.wait.seconds:1000.000000|ms"]


def test_events_are_json_keys_in_the_task_log():
    """Configured as the task runner configures its log (JSON lines to the supervisor), each call
    writes one line whose fields are top-level JSON keys."""
    proc = run_python("import sys\n"
                      "from airflow.sdk.log import configure_logging\n"
                      "configure_logging(json_output=True, output=sys.stdout.buffer, sending_to_supervisor=True)\n"
                      + EMIT_ALL, {})
    events = [json.loads(line) for line in proc.stdout.splitlines() if '"logger":"reindex.events"' in line]
    assert [e["event"] for e in events] == ["reindex.batch_closed", "reindex.partition_done",
                                            "reindex.partition_done", "reindex.vertex_jobs_done",
                                            "reindex.lease_taken"]
    closed = events[0]
    assert {k: closed[k] for k in ("batch_id", "corpus", "kind", "backend", "status", "total", "ready", "failed",
                                   "reused", "retriable", "counts_by_reason", "tokens", "token_source",
                                   "characters", "cost_usd", "online_usd", "saving_usd", "price_date")} == {
        "batch_id": "b-1", "corpus": "kb", "kind": "full", "backend": "vertex", "status": "COMPLETED_WITH_ERRORS",
        "total": 10, "ready": 7, "failed": 3, "reused": 4, "retriable": 2,
        "counts_by_reason": {"TOO_LONG": 1, "RATE_LIMITED": 2}, "tokens": 12345, "token_source": "service",
        "characters": 67890, "cost_usd": 0.000926, "online_usd": 0.001852, "saving_usd": 0.000926,
        "price_date": "2025-09-10"}
    assert closed["level"] == "info" and "price_note" not in closed  # None fields are left out
    ingest = events[2]
    assert (ingest["partition_kind"], ingest["map_index"], ingest["lines"], ingest["by_reason"]) == (
        "ingest", 3, 9, {"RATE_LIMITED": 1})
    jobs = events[3]
    assert [(j["state"], j["completion_stats"]["successful"]) for j in jobs["jobs"]] == [("SUCCEEDED", 9), ("FAILED", 0)]
    assert jobs["wait_seconds"] == 61.5
    lease = {k: v for k, v in events[4].items() if k not in ("timestamp", "filename", "lineno")}  # callsite: ours
    assert lease == {"level": "info", "event": "reindex.lease_taken", "logger": "reindex.events", "corpus": "kb",
                     "wait_seconds": 0.75, "batch_id": "b-1", "run_id": "manual__1"}


def _otel_metrics(stdout: str) -> dict[str, list[tuple[dict, float]]]:
    """Name → [(attributes, value or sum)] from the OTel console exporter's JSON documents."""
    decoder, i, out = json.JSONDecoder(), 0, {}
    while i < len(stdout):
        start = stdout.find('{\n    "resource_metrics"', i)
        if start < 0:
            break
        doc, i = decoder.raw_decode(stdout, start)
        for rm in doc["resource_metrics"]:
            for sm in rm["scope_metrics"]:
                for metric in sm["metrics"]:
                    out.setdefault(metric["name"], []).extend(
                        (p["attributes"], p.get("value", p.get("sum"))) for p in metric["data"]["data_points"])
    return out


def test_opentelemetry_gets_the_same_metrics_with_attributes():
    proc = run_python(EMIT_ALL, {"AIRFLOW__METRICS__OTEL_ON": "True", "OTEL_METRICS_EXPORTER": "console"})
    got = _otel_metrics(proc.stdout)
    # OTel instrument names are case-insensitive: the SDK reports them lower-cased.
    assert got["airflow.reindex.chunks.failed.rate_limited"] == [
        ({"corpus": "kb", "backend": "vertex", "kind": "full", "reason": "RATE_LIMITED"}, 2)]
    assert got["airflow.reindex.cost.usd_micros"] == [({"corpus": "kb", "backend": "vertex", "kind": "full"}, 926)]
    assert got["airflow.reindex.vertex.wait.seconds"] == [({"corpus": "kb"}, 61500.0)]  # histogram sum, ms
    expected = {line.split(":")[0].lower() for line in EXPECTED_LINES}
    assert {n for n in got if n.startswith("airflow.reindex.")} == expected


def test_in_process_listener_for_dag_runs():
    """The fixture the DAG tests use: this process's Task SDK Stats re-pointed at the socket."""
    from reindex_airflow import metrics

    with statsd_listener() as statsd:
        metrics.batch_closed(SUMMARY, backend="local")
        metrics.partition_done("encode", {"ready": 5, "failed": 0, "seconds": 0.5}, corpus="kb")
        statsd.sync()
        assert statsd.counters("airflow.reindex.") == {
            "airflow.reindex.chunks.ready": 7, "airflow.reindex.chunks.failed.RATE_LIMITED": 2,
            "airflow.reindex.chunks.failed.TOO_LONG": 1, "airflow.reindex.chunks.reused": 4,
            "airflow.reindex.batches.COMPLETED_WITH_ERRORS": 1, "airflow.reindex.encode.rows": 5}
        assert statsd.timings("airflow.reindex.") == {"airflow.reindex.batch.seconds": [1500.0],
                                                      "airflow.reindex.encode.seconds": [500.0]}
    metrics.lease_waited("kb", 1.0)  # after the block: metrics back to this process's settings, no error
