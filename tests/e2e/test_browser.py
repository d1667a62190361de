"""The operator's view, in a real browser against a real Airflow.

Airflow's api-server, scheduler (LocalExecutor), dag-processor and triggerer run as processes
(``tests.e2e.test_scheduler_run.airflow_services``), with the SimpleAuthManager users of
``tests.e2e.test_ui_plugin.ui_env``. A headless Chromium (``tests/e2e/browser.py``) then does what an
operator does:

1. logs in through Airflow's login page as ``operator`` (role USER);
2. opens the Trigger form of ``reindex_corpus`` and submits it with its defaults (the bundled
   sample corpus, corpus ``sample``); the run really executes;
3. opens the run's **Reindex** tab: the batch is Completed and its READY count is the store's;
4. opens **Reindex** in the navigation bar: the ``sample`` card shows the same counts and the run;
5. triggers ``reindex_corpus`` from the form on a small corpus written here, with an invalid UTF-8
   file, an empty file and a broken .jsonl line among good documents: the run's tab says
   "⚠ Completed with errors" in amber and lists the three documents with DECODE_ERROR / BAD_DOCUMENT.

Every step leaves a screenshot under ``$REINDEX_TEST_ARTIFACTS`` (default
``/tmp/reindex-test-artifacts``); the directory is printed. Without a browser the test fails under
``CI=true`` and is skipped elsewhere.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote, unquote

import httpx
import pytest

from reindex.store import Store, connect
from reindex.store.search import corpus_status
from reindex_ui.render import fmt_int
from tests.conftest import SAMPLE_CORPUS
from tests.e2e.browser import artifacts_dir, chromium_page, require_browser
from tests.e2e.test_scheduler_run import airflow_services, corpora  # noqa: F401  (fixtures used below)
from tests.e2e.test_ui_plugin import ui_env  # noqa: F401  (fixture: users admin / viewer / operator)

pytestmark = pytest.mark.e2e

USER = "operator"  # SimpleAuthManager role USER: may read and trigger runs, no admin rights
HEALTH_TIMEOUT_S = 240  # the api-server's first start on a busy 2-core machine
RUN_TIMEOUT_S = 1200  # the sample corpus encodes in 1-3 min here; generous for a loaded CI runner
UI_TIMEOUT_MS = 60_000
HEALTHY = ("metadatabase", "scheduler", "dag_processor", "triggerer")  # parts of /api/v2/monitor/health  # a page of the UI: React renders after its API calls
# The plugin's palette (plugins/reindex_ui/templates/base.html): amber for COMPLETED_WITH_ERRORS.
# The UI shows an external view in an iframe titled with the view's name (the plugin's pages, /reindex/…).
PLUGIN_FRAME = 'iframe[title="Reindex"]'
AMBER_BADGE, AMBER_BORDER, GREEN_BORDER = "rgb(255, 241, 194)", "rgb(212, 167, 44)", "rgb(26, 127, 55)"


@pytest.fixture(scope="module")
def browser_available() -> None:
    """Checked before Airflow is started: no browser, no point starting it."""
    require_browser()


def _log_tails(logs: dict[str, Path]) -> str:
    return "\n".join(f"--- {name} ---\n{Path(p).read_text(errors='replace')[-2500:]}" for name, p in logs.items())


def _wait_healthy(base: str, logs: dict[str, Path]) -> None:
    deadline = time.monotonic() + HEALTH_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            health = httpx.get(f"{base}/api/v2/monitor/health", timeout=5)
            if health.status_code == 200 and all(
                    health.json().get(part, {}).get("status") == "healthy" for part in HEALTHY):
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    pytest.fail(f"Airflow at {base}: api-server, {', '.join(HEALTHY)} not all healthy within {HEALTH_TIMEOUT_S} s\n"
                f"{_log_tails(logs)}")


def _token(base: str, username: str, password: str) -> str:
    r = httpx.post(f"{base}/auth/token", json={"username": username, "password": password}, timeout=30)
    assert r.status_code == 201, f"POST /auth/token as {username}: {r.status_code} {r.text}"
    return r.json()["access_token"]


def _run_url(base: str, run_id: str) -> str:
    return f"{base}/api/v2/dags/reindex_corpus/dagRuns/{quote(run_id, safe='')}"


def _wait_for_run(base: str, token: str, run_id: str, logs: dict[str, Path]) -> dict:
    """Poll the REST API until the run has ended; fail with its task states and the logs unless it succeeded."""
    headers = {"Authorization": f"Bearer {token}"}
    deadline = time.monotonic() + RUN_TIMEOUT_S
    run: dict = {}
    while time.monotonic() < deadline:
        r = httpx.get(_run_url(base, run_id), headers=headers, timeout=30)
        assert r.status_code == 200, f"GET dagRun {run_id}: {r.status_code} {r.text}"
        run = r.json()
        if run["state"] in ("success", "failed"):
            break
        time.sleep(3)
    if run.get("state") != "success":
        tis = httpx.get(f"{_run_url(base, run_id)}/taskInstances", headers=headers, timeout=30).json()
        states = {(t["task_id"], t["map_index"]): t["state"] for t in tis.get("task_instances", [])}
        pytest.fail(f"reindex_corpus run {run_id} ended {run.get('state')!r} (limit {RUN_TIMEOUT_S} s); "
                    f"tasks {states}\n{_log_tails(logs)}")
    return run


def _hostile_corpus(root: Path) -> None:
    """Four good documents and three that cannot be indexed (one per way a document fails)."""
    root.mkdir()
    (root / "glaciers.txt").write_text("Glaciers carve U-shaped valleys over thousands of years.", encoding="utf-8")
    (root / "bees.md").write_text("# Bees\n\nBees pollinate apple blossoms in spring.", encoding="utf-8")
    (root / "latin1.txt").write_bytes("café au lait, written as Latin-1".encode("latin-1"))  # DECODE_ERROR
    (root / "empty.txt").write_bytes(b"")  # BAD_DOCUMENT: no text to index
    (root / "notes.jsonl").write_text(  # line 2 is cut off: BAD_DOCUMENT (invalid JSON)
        '{"id": "tides", "text": "Tides follow the moon."}\n{"id": "broken", "text": \n'
        '{"id": "owls", "text": "Owls hunt at night."}\n', encoding="utf-8")


def test_operators_view(browser_available, ui_env, airflow_services, tmp_path, store_uri, capsys):  # noqa: F811
    from playwright.sync_api import expect

    env, logs = airflow_services
    base = f"http://127.0.0.1:{env['AIRFLOW__API__PORT']}"
    passwords = json.loads(Path(ui_env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"]).read_text())
    shots_dir = artifacts_dir("browser-operators-view")
    with capsys.disabled():
        print(f"\nbrowser test screenshots: {shots_dir}")
    _wait_healthy(base, logs)
    admin = _token(base, "admin", passwords["admin"])
    # an earlier test of the session may have paused it; the operator's story starts with it active
    r = httpx.patch(f"{base}/api/v2/dags/reindex_corpus", json={"is_paused": False},
                    headers={"Authorization": f"Bearer {admin}"}, timeout=30)
    assert r.status_code == 200 and r.json()["is_paused"] is False, r.text
    token = _token(base, USER, passwords[USER])

    with chromium_page(timeout_ms=UI_TIMEOUT_MS) as page:
        step = 0

        def shot(name: str) -> Path:
            nonlocal step
            step += 1
            path = shots_dir / f"{step:02d}-{name}.png"
            page.screenshot(path=str(path))
            return path

        try:
            # 1. log in through Airflow's own login page
            page.goto(f"{base}/dags/reindex_corpus")
            expect(page).to_have_url(re.compile(r"/auth/login"))
            page.get_by_label("Username").fill(USER)
            page.get_by_label("Password").fill(passwords[USER])
            shot("login")
            page.get_by_role("button", name="Sign in").click()
            expect(page).to_have_url(re.compile(r"/dags/reindex_corpus$"))

            # 2. the Trigger form, submitted with its defaults
            run_id = _trigger_from_form(page, shot, "defaults", None)
            run = httpx.get(_run_url(base, run_id), headers={"Authorization": f"Bearer {token}"}, timeout=30).json()
            assert (run["triggering_user_name"], run["conf"]["corpus"], run["conf"]["corpus_uri"],
                    run["conf"]["model"], run["conf"]["backend"]) == (USER, "sample", str(SAMPLE_CORPUS), None, "local")
            _wait_for_run(base, token, run_id, logs)

            with connect(store_uri, autocommit=True) as conn:
                sample = corpus_status(Store(conn), "sample")
            ready = sample["chunks"]["READY"]
            assert ready > 0 and sample["chunks"]["FAILED"] == sample["chunks"]["PENDING"] == 0, sample
            assert sample["last_batch"]["status"] == "COMPLETED" and sample["last_batch"]["total"] == ready, sample

            # 3. the run's Reindex tab
            frame = _open_run_tab(page, base, run_id)
            expect(frame.get_by_test_id("batch-status")).to_have_attribute("data-status", "COMPLETED")
            expect(frame.get_by_test_id("batch-status")).to_have_text("Completed")
            expect(frame.get_by_test_id("batch-corpus")).to_have_text("sample")
            expect(frame.get_by_test_id("airflow-run-link")).to_contain_text(run_id)
            expect(frame.get_by_test_id("user")).to_have_text(USER)
            counts = {k: int(frame.get_by_test_id(k).inner_text().replace("\u202f", ""))
                      for k in ("recorded-total", "recorded-ready", "recorded-failed", "now-ready", "now-failed",
                                "encoded", "reused", "corpus-total-ready")}
            assert counts == {**counts, "recorded-total": ready, "recorded-ready": ready, "recorded-failed": 0,
                              "now-ready": ready, "now-failed": 0, "corpus-total-ready": ready}, (counts, ready)
            assert counts["encoded"] + counts["reused"] == ready, counts
            expect(frame.get_by_test_id("no-failed-documents")).to_have_text("none")
            _assert_border(frame.get_by_test_id("batch"), GREEN_BORDER)
            shot("run-tab-completed")

            # 4. Reindex in the navigation bar: the corpus's card
            card = _open_overview(page).locator('[data-testid="corpus"][data-corpus="sample"]')
            expect(card.get_by_test_id("ready-count")).to_have_text(fmt_int(ready))
            expect(card.get_by_test_id("failed-count")).to_have_text("0")
            expect(card.get_by_test_id("pending-count")).to_have_text("0")
            expect(card.get_by_test_id("last-batch-status")).to_have_attribute("data-status", "COMPLETED")
            expect(card.get_by_test_id("documents-ok")).to_have_text(fmt_int(sample["documents"]["OK"]))
            expect(card.get_by_test_id("recent-run").first.get_by_test_id("airflow-run-link")).to_contain_text(run_id)
            shot("overview")

            # 5. a corpus with documents that cannot be indexed
            corpus_dir = tmp_path / "kb"
            _hostile_corpus(corpus_dir)
            page.goto(f"{base}/dags/reindex_corpus")
            bad_run = _trigger_from_form(page, shot, "bad-documents",
                                         {"element_corpus_uri": str(corpus_dir), "element_corpus": "kb_errors"})
            _wait_for_run(base, token, bad_run, logs)  # a few bad documents do not fail the run…
            frame = _open_run_tab(page, base, bad_run)
            status = frame.get_by_test_id("batch-status")  # …but its batch says so, in words and in amber
            expect(status).to_have_attribute("data-status", "COMPLETED_WITH_ERRORS")
            expect(status).to_have_text("⚠ Completed with errors")
            expect(status).to_have_css("background-color", AMBER_BADGE)
            _assert_border(frame.get_by_test_id("batch"), AMBER_BORDER)
            expect(frame.get_by_test_id("batch-message")).to_contain_text(
                "4 chunk(s) embedded: 4 READY, 0 FAILED")
            expect(frame.get_by_test_id("batch-message")).to_contain_text(
                "3 document(s) failed {'BAD_DOCUMENT': 2, 'DECODE_ERROR': 1}")
            for key, value in {"recorded-total": "4", "recorded-ready": "4", "recorded-failed": "0"}.items():
                expect(frame.get_by_test_id(key)).to_have_text(value)
            shot("bad-documents-run-tab")
            failed = frame.get_by_test_id("failed-documents")
            failed.scroll_into_view_if_needed()
            expect(frame.get_by_test_id("failed-documents-count")).to_have_attribute("data-count", "3")
            expect(frame.get_by_test_id("failed-documents-count")).to_contain_text("BAD_DOCUMENT 2 · DECODE_ERROR 1")
            rows = {row.get_attribute("data-doc-id"): [c.strip() for c in row.locator("td").all_inner_texts()]
                    for row in frame.get_by_test_id("failed-document").all()}
            assert {doc: (cells[1], cells[2]) for doc, cells in rows.items()} == {
                "empty.txt": (str(corpus_dir / "empty.txt"), "BAD_DOCUMENT"),
                "latin1.txt": (str(corpus_dir / "latin1.txt"), "DECODE_ERROR"),
                "notes.jsonl:2": (str(corpus_dir / "notes.jsonl"), "BAD_DOCUMENT"),
            }, rows
            assert rows["empty.txt"][3] == "empty.txt: no text to index"
            assert rows["latin1.txt"][3].startswith("latin1.txt: not valid UTF-8 at byte 3"), rows
            assert rows["notes.jsonl:2"][3].startswith("notes.jsonl line 2: invalid JSON"), rows
            shot("bad-documents-failures")

            card = _open_overview(page).locator('[data-testid="corpus"][data-corpus="kb_errors"]')
            expect(card.get_by_test_id("last-batch-status")).to_have_attribute("data-status", "COMPLETED_WITH_ERRORS")
            expect(card.get_by_test_id("ready-count")).to_have_text("4")
            expect(card.get_by_test_id("documents-ok")).to_have_text("4")
            expect(card.get_by_test_id("documents-failed")).to_have_text("3")
            expect(card.get_by_test_id("failed-document-reasons")).to_have_text("(BAD_DOCUMENT 2, DECODE_ERROR 1)")
            expect(page.frame_locator(PLUGIN_FRAME).locator('[data-corpus="sample"]')).to_be_visible()
            shot("overview-two-corpora")
        except BaseException:
            shot("FAILED")
            raise


def _trigger_from_form(page, shot: Callable[[str], Path], name: str, fields: dict[str, str] | None) -> str:
    """Open the DAG's Trigger form, set ``fields`` (input name → value; None: keep the defaults), submit it
    and return the run id the UI navigates to."""
    from playwright.sync_api import expect

    page.get_by_test_id("trigger-dag-button").click()
    dialog = page.get_by_role("dialog")
    expect(dialog.get_by_text("Run Parameters")).to_be_visible()
    uri, corpus = dialog.locator('input[name="element_corpus_uri"]'), dialog.locator('input[name="element_corpus"]')
    expect(uri).to_have_value(str(SAMPLE_CORPUS))  # the form opens with the DAG's defaults
    expect(corpus).to_have_value("sample")
    for field, value in (fields or {}).items():
        dialog.locator(f'input[name="{field}"]').fill(value)
    shot(f"trigger-form-{name}")
    dialog.get_by_test_id("trigger-dag-submit").click()
    expect(page).to_have_url(re.compile(r"/dags/reindex_corpus/runs/[^/]+$"))
    run_id = unquote(page.url.rsplit("/runs/", 1)[1])
    assert run_id.startswith("manual__"), page.url
    # the URL changes before the run's page has rendered: wait for the page itself
    expect(dialog).to_be_hidden()
    expect(page.locator('a[href$="/plugin/reindex-run"]')).to_be_visible()
    expect(page.get_by_text("Triggering User")).to_be_visible()
    expect(page.get_by_text(re.compile(r"^\d+ Task Instances$"))).to_be_visible()
    shot(f"run-triggered-{name}")
    return run_id


def _open_run_tab(page, base: str, run_id: str):
    """From the run's page, click its Reindex tab; the plugin's frame once its batch is shown."""
    from playwright.sync_api import expect

    page.goto(f"{base}/dags/reindex_corpus/runs/{quote(run_id, safe='')}")
    tab = page.locator('a[href$="/plugin/reindex-run"]')
    expect(tab).to_have_text("Reindex")
    tab.click()
    expect(page).to_have_url(re.compile(r"/plugin/reindex-run$"))
    frame = page.frame_locator(PLUGIN_FRAME)
    expect(frame.get_by_test_id("batch")).to_be_visible()
    return frame


def _open_overview(page):
    """Click Reindex in Airflow's navigation bar; the plugin's frame once its corpora are listed."""
    from playwright.sync_api import expect

    page.locator('a[href="/plugin/reindex"]').click()
    frame = page.frame_locator(PLUGIN_FRAME)
    expect(frame.locator("h1")).to_have_text("Corpora")
    expect(frame.get_by_test_id("corpus").first).to_be_visible()
    return frame


def _assert_border(card, colour: str) -> None:
    from playwright.sync_api import expect

    expect(card).to_have_css("border-left-color", colour)


@pytest.mark.parametrize("missing", ["chromium", "playwright"])
@pytest.mark.parametrize("ci", ["true", ""])
def test_a_missing_browser_fails_under_ci_and_skips_elsewhere(ci, missing, monkeypatch, tmp_path):
    import sys

    from tests.e2e import browser

    monkeypatch.setenv("CI", ci)
    if missing == "chromium":
        monkeypatch.setattr(browser, "CHROMIUM", tmp_path / "no-chromium")
        reason = rf"{tmp_path / 'no-chromium'} \(Debian's chromium: `make browser` installs it\)"
    else:
        monkeypatch.setitem(sys.modules, "playwright.sync_api", None)  # import fails as if not installed
        reason = r"the Python package playwright \(.*; it is pinned in requirements.txt\)"
    outcome = pytest.fail.Exception if ci else pytest.skip.Exception
    with pytest.raises(outcome, match=reason) as raised:
        browser.require_browser()
    assert ("never skipped" in str(raised.value)) == bool(ci)
