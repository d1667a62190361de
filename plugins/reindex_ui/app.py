"""The operator's view of the reindex pipelines: a FastAPI app the api-server mounts at ``/reindex``.

HTML pages (shown in the Airflow UI's iframes) and the same data as JSON under ``/reindex/api``:

| route | what |
|---|---|
| ``GET /`` · ``GET /api/corpora`` | every corpus: active model, chunk/document counts by status and reason, last batches, lease, vector table |
| ``GET /runs/{dag_id}/{run_id}`` · ``GET /api/runs/{dag_id}/{run_id}`` | the batches a DAG run opened (a nightly run: its corpus runs' batches) |
| ``GET /batches/{batch_id}`` · ``GET /api/batches/{batch_id}`` | one batch: status, counts, first errors, Vertex jobs, usage, stages, lineage, failed documents |
| ``GET /batches/{batch_id}/failures`` · ``GET /api/batches/{batch_id}/failures`` | FAILED chunks, by reason, keyset pages (``after``, ``limit``) |
| ``GET /batches/{batch_id}/failures.csv`` | every FAILED chunk (optionally of one reason) as streamed CSV |
| ``POST /batches/{batch_id}/retry`` · ``POST /api/batches/{batch_id}/retry`` | trigger ``reindex_retry`` with ``{"batch_id": …}`` |
| ``POST /corpora/{corpus}/lease/release`` · ``POST /api/corpora/{corpus}/lease/release`` | free the lease of a run that is no longer running (its batch: ABANDONED) |

Every route needs an authenticated Airflow user and the auth manager's DAG permission
(``reindex_ui.security``); the SQL lives in ``reindex.store.inspect`` (Airflow-free).
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Annotated, Any
from urllib.parse import quote

from airflow.api_fastapi.auth.managers.models.base_user import BaseUser
from fastapi import Body, Depends, FastAPI, Form, HTTPException, Query, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from reindex.store import inspect
from reindex_ui.asgi import URL_PREFIX
from reindex_ui.render import render
from reindex_ui.security import Permissions, check_csrf, csrf_token, get_user
from reindex_ui.store import open_store

log = logging.getLogger(__name__)

CORPUS_DAG, RETRY_DAG, UPGRADE_DAG, NIGHTLY_DAG = "reindex_corpus", "reindex_retry", "reindex_model_upgrade", \
    "reindex_nightly"
KIND_DAG = {"full": CORPUS_DAG, "retry": RETRY_DAG, "upgrade": UPGRADE_DAG}
RUN_KINDS = {CORPUS_DAG: ["full"], RETRY_DAG: ["retry"], UPGRADE_DAG: ["upgrade"], NIGHTLY_DAG: ["full"]}
ACTIVE_RUN_STATES = ("queued", "running")
PAGE_ROWS = 100

User = Annotated[BaseUser, Depends(get_user)]

app = FastAPI(title="reindex operator's view", docs_url=None, redoc_url=None, openapi_url=None)


# --- links --------------------------------------------------------------------------------------------

def nightly_child_prefix(run_id: str) -> str:
    """Run ids of the ``reindex_corpus`` runs a nightly run triggers start with this
    (``reindex_airflow.nightly.child_run_id(run_id, corpus)``)."""
    return f"nightly__{run_id}__"


def batch_dag(kind: str, dag_id: str | None) -> str:
    """The DAG whose run opened a batch: recorded on the batch, else the DAG of its kind."""
    return dag_id or KIND_DAG.get(kind, CORPUS_DAG)


def _ui_base() -> str:
    from airflow.api_fastapi.app import API_ROOT_PATH

    return API_ROOT_PATH  # "/" or the base path of [api] base_url, with its trailing slash


def airflow_run_url(dag_id: str, run_id: str | None) -> str | None:
    """The run's page in the Airflow UI (``/dags/<dag>/runs/<run>``)."""
    if not run_id:
        return None
    return f"{_ui_base()}dags/{quote(dag_id, safe='')}/runs/{quote(run_id, safe='')}"


def _base(request: Request) -> str:
    """This app's path prefix as the browser sees it (the api-server's base path + the mount)."""
    return str(request.scope.get("root_path", "")).rstrip("/")


# --- Airflow side: run states, triggering ---------------------------------------------------------------

def airflow_run_state(dag_id: str, run_id: str | None) -> str | None:
    """The DAG run's state in Airflow's database (``queued``, ``running``, ``success``, ``failed``), None if unknown."""
    if not run_id:
        return None
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        state = session.scalar(select(DagRun.state).where(DagRun.dag_id == dag_id, DagRun.run_id == run_id))
    return None if state is None else str(getattr(state, "value", state))


def active_retry_runs(batch_id: str) -> list[str]:
    """``reindex_retry`` runs still queued or running for ``batch_id`` (a second one would find nothing to claim)."""
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        rows = session.execute(select(DagRun.run_id, DagRun.conf).where(
            DagRun.dag_id == RETRY_DAG, DagRun.state.in_(ACTIVE_RUN_STATES))).all()
    return [run_id for run_id, conf in rows if isinstance(conf, dict) and conf.get("batch_id") == batch_id]


def _trigger_retry(batch_id: str, user: BaseUser) -> str:
    from airflow.api.common.trigger_dag import trigger_dag
    from airflow.exceptions import DagNotFound, DagRunAlreadyExists
    from airflow.utils.types import DagRunTriggeredByType

    # Named like the retry runs the DAGs trigger themselves (wiring.trigger_retry): the batch, then the time.
    run_id = f"retry__{batch_id}__{datetime.now(UTC):%Y%m%dT%H%M%S}"
    try:
        run = trigger_dag(RETRY_DAG, run_id=run_id, conf={"batch_id": batch_id}, triggered_by=DagRunTriggeredByType.UI,
                          triggering_user_name=user.get_name(),
                          note=f"retry of batch {batch_id} requested from the reindex view by {user.get_name()}")
    except DagNotFound:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"DAG {RETRY_DAG!r} is not in Airflow's database "
                                                       "(has the dag-processor parsed it?)") from None
    except DagRunAlreadyExists as e:
        raise HTTPException(status.HTTP_409_CONFLICT, f"a {RETRY_DAG} run with that id already exists: {e}") from None
    except ValueError as e:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, f"{RETRY_DAG} cannot be triggered: {e}") from None
    if run is None:
        raise HTTPException(status.HTTP_500_INTERNAL_SERVER_ERROR, f"{RETRY_DAG} was not triggered")
    return run.run_id


# --- data assembly ------------------------------------------------------------------------------------------

def _lease_view(lease: dict | None, perms: Permissions, holder_kind: str | None) -> dict | None:
    """The lease with its holder's DAG, Airflow run state, and whether this user may free it now."""
    if lease is None:
        return None
    dag = batch_dag(holder_kind or "full", lease["dag_id"])
    state = airflow_run_state(dag, lease["run_id"])
    live = state in ACTIVE_RUN_STATES
    allowed = perms.can(dag, "PUT")
    return {**lease, "dag": dag, "run_state": state, "run_url": airflow_run_url(dag, lease["run_id"]),
            "can_release": allowed and not live,
            "release_blocked": (None if not live else f"its run is {state}: stop it in Airflow first")
            if allowed else f"you may not edit runs of {dag}"}


def corpora_data(perms: Permissions) -> list[dict]:
    perms.require(CORPUS_DAG)
    with open_store() as store:
        corpora = inspect.corpora_overview(store)
        kinds = {c["corpus"]: inspect.batch_kind(store, c["lease"]["batch_id"]) for c in corpora if c["lease"]}
    for c in corpora:
        for b in c["recent_batches"]:
            b["dag"] = batch_dag(b["kind"], b["dag_id"])
            b["run_url"] = airflow_run_url(b["dag"], b["dag_run_id"])
        c["lease"] = _lease_view(c["lease"], perms, (kinds.get(c["corpus"]) or (None,))[0])
    return corpora


def batch_data(store, perms: Permissions, batch_id: str, *, with_lineage: bool = True) -> dict:
    """One batch as the pages show it; 404 unknown, 403 when the user may not read its DAG's runs."""
    d = inspect.batch_detail(store, batch_id)
    if d is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"batch {batch_id!r} is not in the store")
    d["dag"] = batch_dag(d["kind"], d["dag_id"])
    perms.require(d["dag"])
    d["run_url"] = airflow_run_url(d["dag"], d["dag_run_id"])
    d["failed_documents"] = inspect.failed_documents(store, batch_id)
    d["corpus_totals"] = inspect.corpus_totals(store, d["corpus"])
    if with_lineage:
        rows = []
        for b in inspect.lineage(store, batch_id):
            b["dag"] = batch_dag(b["kind"], b["dag_id"])
            b["readable"] = perms.can(b["dag"])
            b["run_url"] = airflow_run_url(b["dag"], b["dag_run_id"]) if b["readable"] else None
            if not b["readable"]:  # the id and where it sits in the tree, nothing of its content
                b.update(status=None, recorded=None, now=None, dag_run_id=None)
            rows.append(b)
        d["lineage"] = rows
    lease = inspect.corpus_lease(store, d["corpus"])
    d["holds_lease"] = bool(lease and lease["batch_id"] == batch_id)
    holder_kind = None
    if lease is not None:
        holder_kind = d["kind"] if d["holds_lease"] else (inspect.batch_kind(store, lease["batch_id"]) or (None,))[0]
    d["lease"] = _lease_view(lease, perms, holder_kind)
    d["retry"] = _retry_state(d, perms)
    return d


def _retry_state(d: dict, perms: Permissions) -> dict:
    """Whether "retry the retriable chunks now" can be offered, and why not."""
    why = None
    if d["kind"] == "upgrade":
        why = "an upgrade batch is resumed by running reindex_model_upgrade again"
    elif d["status"] == "RUNNING":
        why = "the batch is still running"
    elif d["retriable"] == 0:
        why = "no FAILED chunk of this batch is retriable now"
    allowed = perms.can(RETRY_DAG, "POST")
    return {"possible": why is None, "allowed": allowed,
            "why_not": why or (None if allowed else f"you may not trigger {RETRY_DAG}")}


def run_data(perms: Permissions, dag_id: str, run_id: str) -> dict:
    perms.require(dag_id)
    kinds = RUN_KINDS.get(dag_id)
    out: dict[str, Any] = {"dag_id": dag_id, "run_id": run_id, "reindex_dag": kinds is not None,
                           "run_url": airflow_run_url(dag_id, run_id), "batches": []}
    if kinds is None:
        return out
    if dag_id == NIGHTLY_DAG:
        perms.require(CORPUS_DAG)  # its batches belong to the reindex_corpus runs it triggered
        query = {"run_id_prefix": nightly_child_prefix(run_id), "dag_id": CORPUS_DAG}
    else:
        query = {"run_id": run_id, "dag_id": dag_id}
    with open_store() as store:
        ids = inspect.batches_of_run(store, kinds=kinds, **query)
        out["batches"] = [batch_data(store, perms, b) for b in ids]
    return out


def require_batch(store, perms: Permissions, batch_id: str) -> tuple:
    """The batch's (kind, dag id); 404 when the store has no such batch, 403 without read access to its DAG."""
    kind = inspect.batch_kind(store, batch_id)
    if kind is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"batch {batch_id!r} is not in the store")
    perms.require(batch_dag(*kind))
    return kind


def failures_data(perms: Permissions, batch_id: str, reason: str | None, after: int, limit: int) -> dict:
    with open_store() as store:
        require_batch(store, perms, batch_id)
        try:
            page = inspect.failed_chunks(store, batch_id, reason=reason, after=after, limit=limit)
        except ValueError as e:
            raise HTTPException(status.HTTP_400_BAD_REQUEST, str(e)) from None
        detail = inspect.batch_detail(store, batch_id)
    return {"batch_id": batch_id, "corpus": detail["corpus"], "status": detail["status"],
            "failed_by_reason": detail["now"]["failed_by_reason"], "failed": detail["now"]["FAILED"], **page}


# --- pages ------------------------------------------------------------------------------------------------

def _page(request: Request, template: str, user: BaseUser, status_code: int = 200, **context) -> HTMLResponse:
    return HTMLResponse(render(template, base=_base(request), ui_base=_ui_base(), user=user.get_name(),
                               csrf=csrf_token(user), **context), status_code=status_code)


@app.get("/", response_class=HTMLResponse)
def overview_page(request: Request, user: User) -> HTMLResponse:
    return _page(request, "overview.html", user, corpora=corpora_data(Permissions(user)))


@app.get("/api/corpora")
def overview_json(user: User) -> dict:
    return {"corpora": corpora_data(Permissions(user))}


@app.get("/runs/{dag_id}/{run_id:path}", response_class=HTMLResponse)
def run_page(request: Request, dag_id: str, run_id: str, user: User) -> HTMLResponse:
    return _page(request, "run.html", user, run=run_data(Permissions(user), dag_id, run_id),
                 reindex_dags=sorted(RUN_KINDS))


@app.get("/api/runs/{dag_id}/{run_id:path}")
def run_json(dag_id: str, run_id: str, user: User) -> dict:
    return run_data(Permissions(user), dag_id, run_id)


@app.get("/batches/{batch_id}", response_class=HTMLResponse)
def batch_page(request: Request, batch_id: str, user: User) -> HTMLResponse:
    perms = Permissions(user)
    with open_store() as store:
        batch = batch_data(store, perms, batch_id)
    return _page(request, "batch_page.html", user, b=batch)


@app.get("/api/batches/{batch_id}")
def batch_json(batch_id: str, user: User) -> dict:
    with open_store() as store:
        return batch_data(store, Permissions(user), batch_id)


Reason = Annotated[str | None, Query(max_length=64, description="an error code, e.g. RATE_LIMITED")]
After = Annotated[int, Query(ge=0, description="the last chunk id of the previous page (keyset)")]
Limit = Annotated[int, Query(ge=1, le=inspect.MAX_PAGE_ROWS)]


@app.get("/batches/{batch_id}/failures", response_class=HTMLResponse)
def failures_page(request: Request, batch_id: str, user: User, reason: Reason = None, after: After = 0,
                  limit: Limit = PAGE_ROWS) -> HTMLResponse:
    return _page(request, "failures.html", user, f=failures_data(Permissions(user), batch_id, reason, after, limit))


@app.get("/api/batches/{batch_id}/failures")
def failures_json(batch_id: str, user: User, reason: Reason = None, after: After = 0, limit: Limit = PAGE_ROWS) -> dict:
    return failures_data(Permissions(user), batch_id, reason, after, limit)


CSV_COLUMNS = ("chunk_pk", "chunk_id", "doc_id", "error_code", "retry_count", "updated_at", "source_uri",
               "source_byte", "source_line", "error_message")


def _cell(value: Any) -> Any:
    """Text that a spreadsheet would run as a formula is prefixed with ``'`` (CSV injection)."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def _csv_blocks(batch_id: str, reason: str | None) -> Iterator[str]:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    yield buf.getvalue()
    # Its own connection: the route's one is closed before the body is sent. A store error here ends
    # the response early (the client sees a broken transfer, never a complete-looking file).
    with open_store() as store:
        for block in inspect.iter_failed_chunks(store, batch_id, reason=reason):
            buf.seek(0)
            buf.truncate()
            for r in block:
                src = r["source"] or {}
                writer.writerow([_cell(v) for v in (r["chunk_pk"], r["chunk_id"], r["doc_id"], r["error_code"],
                                                    r["retry_count"], r["updated_at"], src.get("uri"),
                                                    src.get("byte"), src.get("line"), r["error_message"])])
            yield buf.getvalue()


@app.get("/batches/{batch_id}/failures.csv")
def failures_csv(batch_id: str, user: User, reason: Reason = None) -> StreamingResponse:
    perms = Permissions(user)
    with open_store() as store:
        require_batch(store, perms, batch_id)
    try:
        reason = inspect.check_reason(reason)
    except ValueError as e:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, str(e)) from None
    name = f"{batch_id}-failed-chunks{'-' + reason if reason else ''}.csv"
    return StreamingResponse(_csv_blocks(batch_id, reason), media_type="text/csv; charset=utf-8",
                             headers={"Content-Disposition": f"attachment; filename*=UTF-8''{quote(name)}"})


# --- actions ------------------------------------------------------------------------------------------------

def retry_action(request: Request, user: BaseUser, batch_id: str, supplied_csrf: str | None) -> dict:
    """Trigger ``reindex_retry`` for the batch's retriable chunks (409 when there is nothing to retry,
    the batch is still running, or a retry run for it is already queued or running)."""
    check_csrf(request, user, supplied_csrf)
    perms = Permissions(user)
    perms.require(RETRY_DAG, "POST")
    with open_store() as store:
        require_batch(store, perms, batch_id)
        d = inspect.batch_detail(store, batch_id, per_reason=1)
    offer = _retry_state(d, perms)
    if not offer["possible"]:
        raise HTTPException(status.HTTP_409_CONFLICT, f"batch {batch_id}: {offer['why_not']}")
    active = active_retry_runs(batch_id)
    if active:
        raise HTTPException(status.HTTP_409_CONFLICT, f"batch {batch_id}: {RETRY_DAG} run {active[0]} is already "
                                                      "queued or running for it")
    run_id = _trigger_retry(batch_id, user)
    log.info("reindex UI: %s triggered %s run %s for batch %s (%d retriable chunks)", user.get_name(), RETRY_DAG,
             run_id, batch_id, d["retriable"])
    return {"dag_id": RETRY_DAG, "run_id": run_id, "batch_id": batch_id, "retriable": d["retriable"],
            "run_url": airflow_run_url(RETRY_DAG, run_id)}


def release_action(request: Request, user: BaseUser, corpus: str, batch_id: str | None,
                   supplied_csrf: str | None) -> dict:
    """Free the corpus's lease held by ``batch_id`` (the one the user saw) if its run is not queued or running.

    As when a run takes a dead holder's lease over (``reindex.store.leases``), the holder's batch is closed
    ``ABANDONED`` and its unfinished chunks become FAILED ``ABANDONED`` (retriable: the next run claims them),
    in one transaction under the corpus's advisory lock.
    """
    from reindex.store import leases

    check_csrf(request, user, supplied_csrf)
    perms = Permissions(user)
    perms.require(CORPUS_DAG)
    with open_store() as store:
        lease = inspect.corpus_lease(store, corpus)
        holder_kind = inspect.batch_kind(store, lease["batch_id"]) if lease else None
    if lease is None:
        raise HTTPException(status.HTTP_409_CONFLICT, f"corpus {corpus!r} is not leased")
    dag = batch_dag((holder_kind or ("full",))[0], lease["dag_id"])
    perms.require(dag, "PUT")
    if not batch_id:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "batch_id is required: the batch whose lease to free "
                                                         "(the one shown as holding it)")
    if lease["batch_id"] != batch_id:
        raise HTTPException(status.HTTP_409_CONFLICT, f"corpus {corpus!r} is now leased by batch {lease['batch_id']} "
                                                      f"(run {lease['run_id']}), not {batch_id}; reload the page")
    state = airflow_run_state(dag, lease["run_id"])
    if state in ACTIVE_RUN_STATES:
        raise HTTPException(status.HTTP_409_CONFLICT,
                            f"run {dag}/{lease['run_id']} is still {state}: a live run's lease is not freed by hand. "
                            "Mark the run failed in Airflow (or let it finish): its batch then closes and frees "
                            "the corpus")
    reason = (f"its lease was freed by {user.get_name()} from the reindex view; Airflow run "
              f"{dag}/{lease['run_id']}: {state or 'not found'}")
    with open_store(writable=True) as store:
        abandoned = leases.free(store, corpus, batch_id, reason)
    if abandoned is None:
        raise HTTPException(status.HTTP_409_CONFLICT, f"corpus {corpus!r}: the lease of batch {batch_id} was "
                                                      "already given back")
    log.warning("reindex UI: %s freed corpus %s from run %s/%s (batch %s, run state %s; %d unfinished chunks "
                "ABANDONED)", user.get_name(), corpus, dag, lease["run_id"], batch_id, state, abandoned)
    return {"corpus": corpus, "released": True, "batch_id": batch_id, "dag_id": dag, "run_id": lease["run_id"],
            "run_state": state, "abandoned_chunks": abandoned}


CsrfField = Annotated[str | None, Form()]


@app.post("/batches/{batch_id}/retry", response_class=HTMLResponse)
def retry_form(request: Request, batch_id: str, user: User, csrf_token: CsrfField = None) -> HTMLResponse:
    out = retry_action(request, user, batch_id, csrf_token)
    return _page(request, "action.html", user, status_code=status.HTTP_201_CREATED, action="retry", out=out)


@app.post("/api/batches/{batch_id}/retry", status_code=status.HTTP_201_CREATED)
def retry_json(request: Request, batch_id: str, user: User) -> dict:
    return retry_action(request, user, batch_id, None)


@app.post("/corpora/{corpus}/lease/release", response_class=HTMLResponse)
def release_form(request: Request, corpus: str, user: User, batch_id: Annotated[str | None, Form()] = None,
                 csrf_token: CsrfField = None) -> HTMLResponse:
    out = release_action(request, user, corpus, batch_id, csrf_token)
    return _page(request, "action.html", user, action="release", out=out)


@app.post("/api/corpora/{corpus}/lease/release")
def release_json(request: Request, corpus: str, user: User,
                 batch_id: Annotated[str | None, Body(embed=True)] = None) -> dict:
    return release_action(request, user, corpus, batch_id, None)


# --- errors -----------------------------------------------------------------------------------------------

def _wants_json(request: Request) -> bool:
    path = str(request.scope.get("path", ""))
    return f"{URL_PREFIX}/api/" in path or path.startswith("/api/") or \
        "application/json" in request.headers.get("accept", "")


@app.exception_handler(HTTPException)
def _http_error(request: Request, exc: HTTPException) -> Response:
    if _wants_json(request):
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)
    html = render("error.html", base=_base(request), ui_base=_ui_base(), code=exc.status_code, detail=str(exc.detail))
    return HTMLResponse(html, status_code=exc.status_code, headers=exc.headers)


@app.exception_handler(RequestValidationError)
def _invalid_request(request: Request, exc: RequestValidationError) -> Response:
    detail = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
    return _http_error(request, HTTPException(status.HTTP_400_BAD_REQUEST, f"invalid request: {detail}"))
