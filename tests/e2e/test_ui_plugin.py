"""The ``reindex`` UI plugin as Airflow serves it: the api-server app (``create_app()``, the plugin
mounted by the plugin manager from ``plugins/``) with the real SimpleAuthManager and JWTs, over the
store history of ``tests.integration.test_inspect.build_scenario``; and once through a real
``airflow api-server`` process (login, ``/api/v2/plugins``, the mounted pages) and ``airflow plugins``.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from html import unescape

import httpx
import pytest

from reindex.store import inspect
from tests.e2e.services import AIRFLOW, free_port
from tests.integration.test_inspect import RESULT_FILE, Scenario, build_scenario

pytestmark = pytest.mark.e2e

SECRET = "Sup3r-s3cret-pw-4242"  # the store connection's password: must never reach a response or the log
UI_ENV = {
    "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin,viewer:viewer,operator:user",
    "AIRFLOW__API_AUTH__JWT_SECRET": "ui-plugin-test-jwt-secret-" + "x" * 48,
    "AIRFLOW__API__SECRET_KEY": "ui-plugin-test-secret-key",
}


@pytest.fixture(scope="module")
def ui_env(airflow_db, tmp_path_factory):
    """Users admin / viewer / operator (role USER: may trigger runs), known passwords, fixed secrets."""
    passwords = tmp_path_factory.mktemp("auth") / "passwords.json"
    passwords.write_text(json.dumps({"admin": "admin-pw", "viewer": "viewer-pw", "operator": "operator-pw"}))
    env = {**UI_ENV, "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def api_app(ui_env):
    from airflow.api_fastapi.app import create_app, purge_cached_app

    app = create_app()
    yield app
    purge_cached_app()


@pytest.fixture(scope="module")
def serialized_dags(ui_env):
    """The DAGs in Airflow's database, as the dag-processor would put them (the retry action triggers one)."""
    subprocess.run([*AIRFLOW, "dags", "reserialize"], env=os.environ, check=True, capture_output=True)


def _token(role: str | None, name: str) -> str:
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

    return get_auth_manager().generate_jwt(SimpleAuthManagerUser(username=name, role=role))


def _store_conn(store, **changes) -> str:
    conn = json.loads(os.environ["AIRFLOW_CONN_REINDEX_PG"])
    conn.update(password=SECRET, extra={"store_schema": store.schema}, **changes)
    return json.dumps(conn)


class Client:
    """A TestClient on the api-server app that checks every answer for connection secrets."""

    def __init__(self, app, forbidden: list[str]) -> None:
        from fastapi.testclient import TestClient

        self.http = TestClient(app, base_url="http://testserver")
        self.forbidden = forbidden

    def request(self, method: str, path: str, *, token: str | None = None, cookie: str | None = None,
                **kwargs) -> httpx.Response:
        headers = dict(kwargs.pop("headers", {}))
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.http.cookies.clear()
        if cookie:
            self.http.cookies.set("_token", cookie)
        r = self.http.request(method, path, headers=headers, **kwargs)
        text = r.text + json.dumps(dict(r.headers))
        for secret in self.forbidden:
            assert secret not in text, f"{method} {path} answered with {secret!r}"
        return r

    def get(self, path: str, **kw) -> httpx.Response:
        return self.request("GET", path, **kw)

    def post(self, path: str, **kw) -> httpx.Response:
        return self.request("POST", path, **kw)


@pytest.fixture
def ui(api_app, store, monkeypatch) -> tuple[Client, Scenario, dict]:
    s = build_scenario(store)
    monkeypatch.setenv("AIRFLOW_CONN_REINDEX_PG", _store_conn(store))
    conn = json.loads(os.environ["AIRFLOW_CONN_REINDEX_PG"])
    client = Client(api_app, [SECRET, conn["host"], "postgresql://", "postgres://"])
    tokens = {"admin": _token("admin", "admin"), "viewer": _token("viewer", "viewer"),
              "operator": _token("user", "operator"), "nobody": _token(None, "nobody")}
    with client.http:
        yield client, s, tokens


def _text(html: str, testid: str) -> list[str]:
    """The text of every element with ``data-testid=testid`` (tags inside stripped, entities decoded)."""
    out = []
    for m in re.finditer(rf'<(\w+)[^>]*data-testid="{re.escape(testid)}"[^>]*>(.*?)</\1>', html, re.S):
        out.append(unescape(re.sub(r"[ \t\r\n]+", " ", re.sub(r"<[^>]+>", "", m[2])).strip()))
    return out


def _attr(html: str, testid: str, attr: str) -> list[str]:
    return re.findall(rf'data-testid="{re.escape(testid)}"[^>]*?{attr}="([^"]*)"', html)


def _routes(s: Scenario) -> list[tuple[str, str]]:
    """Every route of the plugin with a real argument (the test below checks none is missing)."""
    return [
        ("GET", "/reindex/"), ("GET", "/reindex/api/corpora"),
        ("GET", f"/reindex/runs/reindex_corpus/{s.full_run}"), ("GET", f"/reindex/api/runs/reindex_corpus/{s.full_run}"),
        ("GET", f"/reindex/batches/{s.full}"), ("GET", f"/reindex/api/batches/{s.full}"),
        ("GET", f"/reindex/batches/{s.many}/failures"), ("GET", f"/reindex/api/batches/{s.many}/failures"),
        ("GET", f"/reindex/batches/{s.many}/failures.csv"),
        ("POST", f"/reindex/batches/{s.many}/retry"), ("POST", f"/reindex/api/batches/{s.many}/retry"),
        ("POST", "/reindex/corpora/news/lease/release"), ("POST", "/reindex/api/corpora/news/lease/release"),
    ]


def test_plugin_is_registered_with_its_views(api_app):
    from airflow import plugins_manager

    (info,) = [p for p in plugins_manager.get_plugin_info() if p["name"] == "reindex_ui"]
    assert [(a["url_prefix"], a["name"]) for a in info["fastapi_apps"]] == [("/reindex", "reindex")]
    assert [(v["destination"], v["href"], v["url_route"], v.get("nav_top_level")) for v in info["external_views"]] == [
        ("nav", "reindex/", "reindex", True), ("dag_run", "reindex/runs/{DAG_ID}/{RUN_ID}", "reindex-run", None)]
    assert plugins_manager.get_import_errors() == {}
    mounted = [r for r in api_app.routes if getattr(r, "path", None) == "/reindex"]
    assert len(mounted) == 1


def test_loading_the_plugin_does_not_import_the_app():
    """Every task process loads the plugins: the registration must stay light; the api-server imports the
    app on its first request."""
    code = ("import sys, reindex_ui_plugin; "
            "heavy = [m for m in ('reindex_ui.app', 'fastapi', 'airflow.api_fastapi.core_api.security') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], env=os.environ, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stderr[-2000:]


def test_every_route_needs_a_user_and_the_dag_permission(ui):
    from reindex_ui.app import app as plugin_app

    client, s, tok = ui
    routes = _routes(s)
    # no route of the plugin app is left out of this test
    declared = {(m, "/reindex" + r.path) for r in plugin_app.routes if hasattr(r, "methods") for m in r.methods}
    templated = {(m, re.sub(r"\{[^}]+\}", "X", p)) for m, p in declared}
    tested = {(m, p.replace(s.full_run, "X").replace(s.full, "X").replace(s.many, "X").replace("news", "X")
               .replace("reindex_corpus", "X")) for m, p in routes}
    assert templated == tested, templated ^ tested
    for method, path in routes:
        r = client.request(method, path)
        assert r.status_code == 401, (method, path, r.status_code, r.text)
        r = client.request(method, path, token="not-a-jwt")
        assert r.status_code == 403, (method, path, r.status_code)  # Airflow: invalid token
        r = client.request(method, path, token=tok["nobody"])  # a user without any DAG permission
        assert r.status_code == 403, (method, path, r.status_code, r.text)
        assert "Forbidden" in r.text
        r = client.request(method, path, token=tok["viewer"], data={"batch_id": s.running})
        assert r.status_code == (200 if method == "GET" else 403), (method, path, r.status_code, r.text)
    # HTML routes answer an HTML page, the JSON API JSON
    r = client.get("/reindex/")
    assert r.status_code == 401 and r.headers["content-type"].startswith("text/html") and "Log in" in r.text
    r = client.get("/reindex/api/corpora")
    assert r.status_code == 401 and r.json() == {"detail": "Not authenticated"}


def test_overview(ui):
    client, s, tok = ui
    r = client.get("/reindex/", token=tok["viewer"])
    assert r.status_code == 200, r.text
    html = r.text
    assert _attr(html, "corpus", "data-corpus") == ["kb", "news"]
    kb, news = html.split('data-corpus="news"')
    assert _text(kb, "ready-count") == ["10"] and _text(kb, "failed-count") == ["251"]
    assert _text(kb, "pending-count") == ["0"]
    assert _text(kb, "failed-reasons") == ["RATE_LIMITED 150 · TRANSIENT_ENCODER_ERROR 100 · INVALID_INPUT 1"]
    assert _text(kb, "documents-failed") == ["2"]
    assert _text(kb, "failed-document-reasons") == ["(BAD_DOCUMENT 1, DECODE_ERROR 1)"]
    assert _attr(kb, "last-batch-status", "data-status") == ["COMPLETED"]
    assert _text(kb, "last-batch-seconds") == ["1 min"]
    assert _attr(kb, "recent-run", "data-batch-id") == [s.retry, s.full, s.many]
    assert _attr(kb, "recent-run-status", "data-status") == ["COMPLETED", "COMPLETED_WITH_ERRORS", "FAILED"]
    assert f'href="/dags/reindex_retry/runs/{s.retry_run.replace(":", "%3A").replace("+", "%2B")}"' in kb
    assert "/dags/reindex_corpus/runs/manual__2026-11-29T10%3A00%3A00%2B00%3A00" in kb
    assert _text(kb, "lease") == ["free"]
    size = int(_attr(kb, "vector-table-size", "data-bytes")[0])
    assert size > 0 and "emb_kb_" in _text(kb, "vector-table")[0]
    assert _text(news, "pending-count") == ["2"] and _attr(news, "last-batch-status", "data-status") == ["RUNNING"]
    assert f"nightly__{s.nightly_run}__news" in _text(news, "lease")[0]
    assert _text(news, "lease-run-state") == ["not found"]  # no such run in Airflow: dead, may be freed…
    assert "release-form" not in news  # …but not by a viewer
    assert _text(news, "release-blocked") == ["(cannot free: you may not edit runs of reindex_corpus)"]

    admin = client.get("/reindex/", token=tok["admin"]).text
    assert 'data-testid="release-form"' in admin.split('data-corpus="news"')[1]

    data = client.get("/reindex/api/corpora", token=tok["viewer"]).json()["corpora"]
    assert [c["corpus"] for c in data] == ["kb", "news"]
    assert data[0]["chunks"] == {"READY": 10, "PENDING": 0, "FAILED": 251}
    assert data[0]["vector_table"]["bytes"] == size
    assert data[1]["lease"]["batch_id"] == s.running and data[1]["lease"]["dag"] == "reindex_corpus"


def test_run_tab_of_a_partly_failed_run(ui):
    client, s, tok = ui
    r = client.get(f"/reindex/runs/reindex_corpus/{s.full_run}", token=tok["viewer"])
    assert r.status_code == 200, r.text
    html = r.text
    assert _attr(html, "batch", "data-batch-id") == [s.full]
    # amber, with a warning sign and words: never a plain success
    assert re.search(r'class="badge st-warn" data-testid="batch-status" data-status="COMPLETED_WITH_ERRORS">⚠ '
                     r'Completed with errors</span>', html)
    assert 'class="card st-warn"' in html
    assert [_text(html, k)[0] for k in ("recorded-total", "recorded-ready", "recorded-failed", "now-failed",
                                        "retriable")] == ["10", "6", "4", "1", "0"]
    assert _attr(html, "reason", "data-reason") == ["RATE_LIMITED", "INVALID_INPUT", "TOO_LONG"]
    assert _text(html, "reason-recorded") == ["2", "1", "1"] and _text(html, "reason-now") == ["0", "1", "0"]
    assert _attr(html, "recorded-error", "data-chunk-id") == ["beta#1", "beta#2", "delta#1"]  # sampled at close
    assert _text(html, "error-source")[:2] == [f"({RESULT_FILE} byte 2048 line 7)", f"({RESULT_FILE} byte 4096)"]
    (first,) = _text(html, "first-error")
    assert first == "gamma · gamma#1 · 400 invalid input: <script>alert(1)</script>"  # as text…
    assert "<script>alert(1)" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html  # …never as markup
    assert _attr(html, "vertex-job", "data-state") == ["SUCCEEDED"]
    assert ('href="https://console.cloud.google.com/vertex-ai/locations/europe-west4/batch-predictions/123456789'
            '?project=acme-prod"') in html
    assert _text(html, "tokens") == ["1\u202f234 (service)"] and _text(html, "cost") == ["$0.0125"]
    assert _attr(html, "stage", "data-stage") == ["chunk", "vertex_wait", "ingest", "zz_custom"]
    assert "5 min 10 s" in html  # vertex_wait: 310.5 s
    assert _attr(html, "lineage-row", "data-batch-id") == [s.full, s.retry]
    assert _attr(html, "lineage-status", "data-status") == ["COMPLETED_WITH_ERRORS", "COMPLETED"]
    assert (_text(html, "corpus-total-ready"), _text(html, "corpus-total-failed")) == (["10"], ["251"])
    assert _attr(html, "failed-document", "data-doc-id") == ["broken", "latin1"]
    assert _text(html, "retry-unavailable") == ["Retry: no FAILED chunk of this batch is retriable now"]

    data = client.get(f"/reindex/api/runs/reindex_corpus/{s.full_run}", token=tok["viewer"]).json()
    (b,) = data["batches"]
    assert (b["status"], b["recorded"]["failed"], b["now"]["FAILED"], b["retriable"]) == (
        "COMPLETED_WITH_ERRORS", 4, 1, 0)
    assert [x["batch_id"] for x in b["lineage"]] == [s.full, s.retry]
    assert b["failed_documents"]["rows"][0]["source_uri"] == "file:///corpora/kb/broken.jsonl"


def test_run_tabs_of_the_other_dags(ui, store):
    from reindex.store.batches import create_batch
    from tests.integration.test_inspect import SPEC

    client, s, tok = ui
    create_batch(store, "kb-upgrade00001", "kb", "vertex", SPEC.checksum, kind="upgrade", dag_run_id="manual__up")
    html = client.get("/reindex/runs/reindex_model_upgrade/manual__up", token=tok["operator"]).text
    assert _attr(html, "batch", "data-batch-id") == ["kb-upgrade00001"]
    assert _text(html, "retry-unavailable") == [
        "Retry: an upgrade batch is resumed by running reindex_model_upgrade again"]
    assert _text(html, "quality") == []  # no gate measured yet: no gate section
    # the quality gate's figures, as the quality_gate task records them, are on the batch card and in its JSON
    from reindex.quality import SwitchFigures
    from reindex.store.batches import update_details

    figures = SwitchFigures(queries=100, source="sampled chunks", hit_rate_old=0.91, hit_rate_new=0.84,
                            agreement=0.413, index_recall=0.993, passed=False,
                            reasons=["own-document hit rate fell 7.0% (91.0% → 84.0%), more than "
                                     "quality_max_drop=2.0%"])
    update_details(store, "kb-upgrade00001", {"quality": {**figures.to_dict(), "line": figures.line(), "below": "wait",
                                                          "decision": {"choice": "Reject", "by": "reviewer"}}})
    html = client.get("/reindex/runs/reindex_model_upgrade/manual__up", token=tok["operator"]).text
    assert _attr(html, "quality", "data-passed") == ["no"]
    assert _text(html, "quality-queries") == ["100 sampled chunks"]
    assert _text(html, "quality-hit-rate") == ["91.0% → 84.0%"]
    assert _text(html, "quality-agreement") == ["41.3%"] and _text(html, "quality-recall") == ["99.3%"]
    assert _text(html, "quality-cosine") == ["—"]  # the two models' vectors have different dimensions
    assert _text(html, "quality-verdict") == [
        "below the bar: own-document hit rate fell 7.0% (91.0% → 84.0%), more than quality_max_drop=2.0%"]
    assert _text(html, "quality-decision") == ["Reject by reviewer"]
    (b,) = client.get("/reindex/api/runs/reindex_model_upgrade/manual__up", token=tok["operator"]).json()["batches"]
    assert (b["quality"]["agreement"], b["quality"]["hit_rate_new"], b["quality"]["index_recall"]) == (0.413, 0.84, 0.993)
    assert b["quality"]["line"] == figures.line()
    html = client.get(f"/reindex/runs/reindex_retry/{s.retry_run}", token=tok["viewer"]).text
    assert _attr(html, "batch", "data-batch-id") == [s.retry]
    assert _attr(html, "batch-status", "data-status") == ["COMPLETED"] and 'class="card st-ok"' in html
    assert _text(html, "no-stages") == ["—"] and _text(html, "cost") == ["—"]
    # the reindex_corpus run id is not a reindex_retry run
    html = client.get(f"/reindex/runs/reindex_retry/{s.full_run}", token=tok["viewer"]).text
    assert _attr(html, "batch", "data-batch-id") == [] and "no-batches" in html
    # a nightly run shows the batches of the corpus runs it triggered
    html = client.get(f"/reindex/runs/reindex_nightly/{s.nightly_run}", token=tok["viewer"]).text
    assert _attr(html, "batch", "data-batch-id") == [s.running]
    assert _attr(html, "batch-status", "data-status") == ["RUNNING"] and 'class="card st-run"' in html
    assert _text(html, "now-pending") == ["2"]
    r = client.get("/reindex/runs/some_other_dag/manual__1", token=tok["viewer"])
    assert r.status_code == 200 and "is not a reindex DAG" in _text(r.text, "not-reindex")[0]
    assert client.get(f"/reindex/batches/{s.full}x", token=tok["viewer"]).status_code == 404


def test_failed_chunks_pages_and_csv(ui):
    client, s, tok = ui
    seen, after = [], 0
    for _ in range(5):
        page = client.get(f"/reindex/api/batches/{s.many}/failures", params={"after": after, "limit": 100},
                          token=tok["viewer"]).json()
        seen += [r["chunk_id"] for r in page["rows"]]
        if page["next_after"] is None:
            break
        after = page["next_after"]
    assert len(seen) == 250 == len(set(seen)) and page["failed_by_reason"] == {
        "RATE_LIMITED": 150, "TRANSIENT_ENCODER_ERROR": 100}

    html = client.get(f"/reindex/batches/{s.many}/failures", params={"reason": "TRANSIENT_ENCODER_ERROR", "limit": 60},
                      token=tok["viewer"]).text
    pks = [int(p) for p in _attr(html, "failed-chunk", "data-chunk-pk")]
    assert len(pks) == 60 and set(_attr(html, "failed-chunk", "data-reason")) == {"TRANSIENT_ENCODER_ERROR"}
    (nxt,) = re.findall(r'href="([^"]+)" data-testid="next-page"', html)
    assert nxt == f"/reindex/batches/{s.many}/failures?reason=TRANSIENT_ENCODER_ERROR&amp;after={pks[-1]}&amp;limit=60"
    rest = client.get(nxt.replace("&amp;", "&"), token=tok["viewer"]).text
    assert len(_attr(rest, "failed-chunk", "data-chunk-pk")) == 40 and "next-page" not in rest

    r = client.get(f"/reindex/batches/{s.many}/failures.csv", token=tok["viewer"])
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    assert r.headers["content-disposition"] == f"attachment; filename*=UTF-8''{s.many}-failed-chunks.csv"
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert len(rows) == 250 and rows[0]["chunk_id"] == "alpha#m1" and rows[0]["error_code"] == "RATE_LIMITED"
    assert rows[0]["error_message"] == "failure number 1"
    r = client.get(f"/reindex/batches/{s.many}/failures.csv", params={"reason": "RATE_LIMITED"}, token=tok["viewer"])
    assert len(list(csv.DictReader(io.StringIO(r.text)))) == 150
    r = client.get(f"/reindex/batches/{s.full}/failures.csv", token=tok["viewer"])
    (row,) = list(csv.DictReader(io.StringIO(r.text)))
    assert (row["chunk_id"], row["error_code"]) == ("gamma#1", "INVALID_INPUT")

    for params, message in [({"reason": "not a code"}, "is not an error code"), ({"limit": 0}, "limit"),
                            ({"after": "x"}, "after")]:
        r = client.get(f"/reindex/api/batches/{s.many}/failures", params=params, token=tok["viewer"])
        assert r.status_code == 400 and message in r.json()["detail"], r.text

    from reindex_ui.app import _cell

    assert (_cell("=HYPERLINK(1)"), _cell("-1"), _cell("plain"), _cell(5)) == ("'=HYPERLINK(1)", "'-1", "plain", 5)


def test_retry_action(ui, serialized_dags):
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from sqlalchemy import select

    client, s, tok = ui
    url = f"/reindex/api/batches/{s.many}/retry"
    assert client.post(url, token=tok["viewer"]).status_code == 403
    r = client.post(f"/reindex/api/batches/{s.full}/retry", token=tok["admin"])
    assert r.status_code == 409 and "no FAILED chunk of this batch is retriable now" in r.json()["detail"]
    r = client.post(f"/reindex/api/batches/{s.running}/retry", token=tok["admin"])
    assert r.status_code == 409 and "still running" in r.json()["detail"]

    # the browser way: the UI's cookie, and the CSRF token of the page's form
    page = client.get(f"/reindex/batches/{s.many}", cookie=tok["operator"]).text
    (csrf,) = re.findall(r'data-testid="retry-form">\s*<input type="hidden" name="csrf_token" value="([^"]+)"', page)
    assert _text(page, "retry-button") == ["Retry the 220 retriable chunk(s) now"]
    form = f"/reindex/batches/{s.many}/retry"
    r = client.post(form, cookie=tok["operator"], data={})
    assert r.status_code == 403 and "missing CSRF token" in r.text
    r = client.post(form, cookie=tok["operator"], data={"csrf_token": csrf}, headers={"Origin": "https://evil.example"})
    assert r.status_code == 403 and "cross-origin" in r.text
    other = client.get(f"/reindex/batches/{s.many}", cookie=tok["admin"]).text
    (admin_csrf,) = re.findall(r'name="csrf_token" value="([^"]+)"', other)[:1]
    r = client.post(form, cookie=tok["operator"], data={"csrf_token": admin_csrf})
    assert r.status_code == 403 and "belongs to another user" in r.text
    r = client.post(form, cookie=tok["operator"], data={"csrf_token": csrf}, headers={"Origin": "http://testserver"})
    assert r.status_code == 201, r.text
    (run_id,) = _attr(r.text, "action-result", "data-run-id")
    assert re.fullmatch(rf"retry__{s.many}__\d{{8}}T\d{{6}}", run_id)  # named like the DAGs' own retry runs
    with create_session() as session:
        dr = session.scalars(select(DagRun).where(DagRun.dag_id == "reindex_retry", DagRun.run_id == run_id)).one()
        assert (dr.conf, str(dr.state), dr.triggering_user_name) == ({"batch_id": s.many}, "queued", "operator")
    # a second request while that run is queued is refused
    r = client.post(url, token=tok["admin"])
    assert r.status_code == 409 and f"run {run_id} is already queued or running" in r.json()["detail"]
    with create_session() as session:
        session.delete(session.scalars(select(DagRun).where(DagRun.run_id == run_id,
                                                            DagRun.dag_id == "reindex_retry")).one())


def test_release_action(ui, serialized_dags, store):
    from airflow.api.common.trigger_dag import trigger_dag
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from airflow.utils.types import DagRunTriggeredByType
    from sqlalchemy import update

    client, s, tok = ui
    url = "/reindex/api/corpora/news/lease/release"
    holder_run = f"nightly__{s.nightly_run}__news"
    assert client.post(url, token=tok["viewer"], json={"batch_id": s.running}).status_code == 403
    r = client.post(url, token=tok["admin"], json={"batch_id": "other-batch"})
    assert r.status_code == 409 and f"leased by batch {s.running}" in r.json()["detail"]
    r = client.post("/reindex/api/corpora/kb/lease/release", token=tok["admin"], json={"batch_id": s.full})
    assert r.status_code == 409 and r.json()["detail"] == "corpus 'kb' is not leased"

    # the holder's run is queued in Airflow: a live run keeps its lease
    trigger_dag("reindex_corpus", run_id=holder_run, conf={"corpus": "news"}, triggered_by=DagRunTriggeredByType.TEST)
    try:
        r = client.post(url, token=tok["admin"], json={"batch_id": s.running})
        assert r.status_code == 409 and f"run reindex_corpus/{holder_run} is still queued" in r.json()["detail"]
        assert inspect.corpus_lease(store, "news")["batch_id"] == s.running
        html = client.get("/reindex/", token=tok["admin"]).text.split('data-corpus="news"')[1]
        assert _text(html, "lease-run-state") == ["queued"] and "release-form" not in html
        with create_session() as session:
            session.execute(update(DagRun).where(DagRun.run_id == holder_run).values(state="failed"))
        # the browser way, as the overview's form posts it
        page = client.get("/reindex/", cookie=tok["admin"]).text.split('data-corpus="news"')[1]
        (csrf,) = re.findall(r'name="csrf_token" value="([^"]+)"', page)
        r = client.post("/reindex/corpora/news/lease/release", cookie=tok["admin"],
                        data={"csrf_token": csrf, "batch_id": s.running})
        assert r.status_code == 200, r.text
        assert "Freed corpus" in _text(r.text, "action-result")[0] and _text(r.text, "abandoned-chunks") == ["2"]
        assert inspect.corpus_lease(store, "news") is None
        # as a takeover would: the dead run's batch is closed, its unfinished chunks left retriable
        closed = inspect.batch_detail(store, s.running)
        assert closed["status"] == "ABANDONED" and closed["now"]["failed_by_reason"] == {"ABANDONED": 2}
        assert closed["retriable"] == 2
        r = client.post(url, token=tok["admin"], json={"batch_id": s.running})
        assert r.status_code == 409 and "not leased" in r.json()["detail"]
    finally:
        with create_session() as session:
            for dr in session.query(DagRun).filter(DagRun.run_id == holder_run):
                session.delete(dr)


def test_store_failures_do_not_leak_the_connection(ui, monkeypatch, caplog, capfd):
    client, s, tok = ui
    monkeypatch.setenv("AIRFLOW_CONN_REINDEX_PG", json.dumps({
        "conn_type": "postgres", "host": "/tmp/no-such-socket-dir-for-reindex", "port": 1, "login": "reindexer",
        "password": SECRET, "schema": "reindex"}))
    client.forbidden += ["/tmp/no-such-socket-dir-for-reindex", "reindexer"]
    for path in ("/reindex/", "/reindex/api/corpora", f"/reindex/api/batches/{s.full}"):
        r = client.get(path, token=tok["admin"])
        assert r.status_code == 503, r.text
        assert "the vector store (Airflow connection 'reindex_pg') cannot be reached" in unescape(r.text)
    out, err = capfd.readouterr()
    logged = caplog.text + out + err
    assert "cannot reach the store (connection 'reindex_pg'): OperationalError" in logged  # the log says what…
    assert SECRET not in logged and "no-such-socket-dir" not in logged  # …and nothing of the connection


def test_statement_timeout_setting_is_checked(ui, monkeypatch):
    client, s, tok = ui
    monkeypatch.setenv("REINDEX_UI_STATEMENT_TIMEOUT_MS", "10")
    r = client.get("/reindex/api/corpora", token=tok["admin"])
    assert r.status_code == 500
    assert r.json()["detail"] == "REINDEX_UI_STATEMENT_TIMEOUT_MS='10' must be an integer 100–600000 (ms)"



def test_served_by_a_real_api_server(ui_env, store, tmp_path):
    """``airflow api-server`` (default ``lazy_load_plugins``) mounts the plugin and lists its views."""
    s = build_scenario(store)
    port = free_port()
    env = {**os.environ, "AIRFLOW_CONN_REINDEX_PG": _store_conn(store), "AIRFLOW__API__PORT": str(port)}
    env.pop("AIRFLOW__CORE__LAZY_LOAD_PLUGINS", None)
    listed = subprocess.run([*AIRFLOW, "plugins", "--output", "json"], env=env, capture_output=True, text=True,
                            check=True)
    (plugin,) = [p for p in json.loads(listed.stdout) if p["name"] == "reindex_ui"]
    assert "reindex/runs/{DAG_ID}/{RUN_ID}" in json.dumps(plugin["external_views"])
    log = tmp_path / "api-server.log"
    proc = subprocess.Popen([*AIRFLOW, "api-server", "--port", str(port), "--host", "127.0.0.1"], env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/api/v2/monitor/health", timeout=2).status_code == 200:
                    break
            time.sleep(1)
        else:
            pytest.fail(f"api-server did not answer within 180 s: {log.read_text()[-3000:]}")
        token = httpx.post(f"{base}/auth/token", json={"username": "admin", "password": "admin-pw"}).json()[
            "access_token"]
        plugins = httpx.get(f"{base}/api/v2/plugins", headers={"Authorization": f"Bearer {token}"}).json()
        (p,) = [p for p in plugins["plugins"] if p["name"] == "reindex_ui"]
        assert {(v["destination"], v["url_route"]) for v in p["external_views"]} == {
            ("nav", "reindex"), ("dag_run", "reindex-run")}
        assert httpx.get(f"{base}/reindex/").status_code == 401
        page = httpx.get(f"{base}/reindex/runs/reindex_corpus/{s.full_run}", cookies={"_token": token})
        assert page.status_code == 200 and _attr(page.text, "batch-status", "data-status") == ["COMPLETED_WITH_ERRORS"]
        assert SECRET not in page.text and SECRET not in log.read_text()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def test_nightly_child_prefix_matches_the_nightly_dag():
    from reindex_airflow.nightly import child_run_id
    from reindex_ui.app import nightly_child_prefix

    assert child_run_id("scheduled__2026-11-29T02:00:00+00:00", "kb").startswith(
        nightly_child_prefix("scheduled__2026-11-29T02:00:00+00:00"))
