"""The emulator service: ``VertexEmulator`` (its job store, the JobService calls, the admin API) and
its HTTP front (routing, create-body validation, list filters, the request handler)."""

from __future__ import annotations

import copy
import itertools
import json
import logging
import re
import threading
import time
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from reindex.emulators.vertex.config import EmulatorConfig
from reindex.emulators.vertex.jobs import TERMINAL_STATES, Job, model_family
from reindex.emulators.vertex.worker import JobRunner
from reindex.vertex.gcs import split_gs_uri

log = logging.getLogger(__name__)

HTTP_STATUS_NAMES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                     409: "ALREADY_EXISTS", 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 501: "UNIMPLEMENTED",
                     503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}

_PARENT_RE = re.compile(r"^/v1/(projects/[^/]+/locations/[^/]+)/batchPredictionJobs$")
_JOB_RE = re.compile(r"^/v1/(projects/[^/]+/locations/[^/]+/batchPredictionJobs/[^/:]+)(:cancel)?$")
_FILTER_RE = re.compile(r'^\s*([A-Za-z_][\w.\-]*)\s*=\s*(?:"([^"]*)"|(\S+))\s*$')


class _HttpError(Exception):
    """Answers the request with this HTTP ``status`` and Google's error payload."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class VertexEmulator:
    """The emulator: job store, worker threads and the HTTP server (started by ``start``).

    ``endpoint`` is ``http://host:port``, for ``client_options={"api_endpoint": endpoint}``.
    ``gcs_host`` is the storage endpoint the workers use (default: ``STORAGE_EMULATOR_HOST``).
    """

    def __init__(self, config: EmulatorConfig | None = None, *, host: str = "127.0.0.1", port: int = 0,
                 gcs_host: str | None = None) -> None:
        self.initial_config = config if config is not None else EmulatorConfig.from_env()
        self._config = copy.deepcopy(self.initial_config)
        self.host, self.port, self.gcs_host = host, port, gcs_host
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}
        self._ids = itertools.count(int(time.time() * 1000) * 1_000_000)
        self._stats = self._zero_stats()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._runner = JobRunner(lock=self._lock, count=self._count, storage_client=self._storage_client)

    # -- lifecycle

    def start(self) -> VertexEmulator:
        if self._server is not None:
            return self
        emulator = self

        class Handler(_Handler):
            pass

        Handler.emulator = emulator
        self._server = ThreadingHTTPServer((self.host, self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="vertex-emulator-http",
                                        daemon=True)
        self._thread.start()
        log.info("Vertex emulator listening on %s (embedder=%s)", self.endpoint, self._config.embedder)
        return self

    def stop(self) -> None:
        """Stop serving and wind the workers down (unfinished jobs are cancelled)."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._server = None
        with self._lock:
            jobs = list(self._jobs.values())
        for job in jobs:
            job.cancel.set()
        for job in jobs:
            if job.thread is not None:
                job.thread.join(timeout=5)

    def __enter__(self) -> VertexEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    # -- admin API (also over HTTP)

    @property
    def config(self) -> EmulatorConfig:
        with self._lock:
            return copy.deepcopy(self._config)

    def configure(self, changes: Mapping[str, Any] | None = None, /, **kwargs: Any) -> EmulatorConfig:
        """Merge ``changes`` into the configuration used by jobs created from now on; return it."""
        merged = dict(changes or {}, **kwargs)
        with self._lock:
            self._config = self._config.merged(merged)
            return copy.deepcopy(self._config)

    def stats(self) -> dict[str, Any]:
        """Call counters plus the number of jobs in each state."""
        with self._lock:
            out = dict(self._stats)
            jobs = list(self._jobs.values())
        states: dict[str, int] = {}
        for job in jobs:
            states[job.state] = states.get(job.state, 0) + 1
        out["jobs"] = len(jobs)
        out["jobs_by_state"] = states
        return out

    def reset(self, *, config: bool = False) -> None:
        """Forget jobs, counters and fault history (unfinished jobs are cancelled)."""
        with self._lock:
            jobs = list(self._jobs.values())
            self._jobs.clear()
            self._stats = self._zero_stats()
            self._runner.transient_failures.clear()
            if config:
                self._config = copy.deepcopy(self.initial_config)
        for job in jobs:
            job.cancel.set()

    def job(self, name: str) -> dict[str, Any]:
        """The REST resource of a job (enum names as strings)."""
        return self._find(name).resource()

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Wait until every job is terminal; False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                busy = [j for j in self._jobs.values() if j.state not in TERMINAL_STATES]
            if not busy:
                return True
            time.sleep(0.02)
        return False

    @staticmethod
    def _zero_stats() -> dict[str, Any]:
        return {"create_calls": 0, "creates_accepted": 0, "creates_rejected": 0, "get_calls": 0,
                "list_calls": 0, "cancel_calls": 0, "lines_processed": 0}

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._stats[key] += n

    # -- routing

    def route(self, method: str, path: str, query: dict[str, list[str]], body: bytes) -> tuple[int, Any]:
        """Answer one HTTP request: ``(status, JSON-able payload)``."""
        int_enums = "enum-encoding=int" in (query.get("$alt") or [""])[0]
        try:
            if path.startswith("/emulator/"):
                return self._admin(method, path, body)
            m = _PARENT_RE.match(path)
            if m:
                if method == "POST":
                    return 200, self._create(m.group(1), _json_body(body), int_enums)
                if method == "GET":
                    return 200, self._list(m.group(1), query, int_enums)
                raise _HttpError(405 if method else 400, f"method {method} not allowed on {path}")
            m = _JOB_RE.match(path)
            if m and m.group(2) and method == "POST":
                self._cancel(m.group(1))
                return 200, {}
            if m and not m.group(2) and method == "GET":
                self._count("get_calls")
                return 200, self._find(m.group(1)).resource(int_enums)
            if m:
                raise _HttpError(501, f"{method} {path} is not implemented by the emulator")
            raise _HttpError(404, f"no route for {method} {path}")
        except _HttpError as e:
            return e.status, _error_payload(e.status, e.message)

    def _admin(self, method: str, path: str, body: bytes) -> tuple[int, Any]:
        if path == "/emulator/health":
            return 200, {"ok": True}
        if path == "/emulator/stats" and method == "GET":
            return 200, self.stats()
        if path == "/emulator/config":
            if method == "POST":
                try:
                    return 200, self.configure(_json_body(body)).to_dict()
                except (TypeError, ValueError) as e:
                    raise _HttpError(400, str(e)) from e
            return 200, self.config.to_dict()
        if path == "/emulator/reset" and method == "POST":
            opts = _json_body(body) if body.strip() else {}
            self.reset(config=bool(opts.get("config")))
            return 200, {"ok": True}
        if path == "/emulator/jobs" and method == "GET":
            with self._lock:
                jobs = list(self._jobs.values())
            return 200, {"jobs": [j.resource() for j in jobs]}
        raise _HttpError(404, f"no admin route for {method} {path}")

    # -- JobService

    def _create(self, parent: str, body: dict[str, Any], int_enums: bool = False) -> dict[str, Any]:
        """Validate and register a job, start its worker; return the job as created (PENDING)."""
        with self._lock:
            self._stats["create_calls"] += 1
            cfg = copy.deepcopy(self._config)
            if self._config.create_errors:
                code = self._config.create_errors.pop(0)
                self._stats["creates_rejected"] += 1
                raise _HttpError(code, f"Injected error {code} for this create call (emulator create_errors).")
            if cfg.create_quota is not None and self._stats["creates_accepted"] >= cfg.create_quota:
                self._stats["creates_rejected"] += 1
                project = parent.split("/")[1]
                raise _HttpError(429, (
                    "Quota exceeded for quota metric 'Batch prediction jobs' and limit 'Batch prediction "
                    "jobs per day per region' of service 'aiplatform.googleapis.com' for consumer "
                    f"'project:{project}' (limit {cfg.create_quota} per day)."))
        try:
            family, model_id, native_dim = _validate_create(body)
        except _HttpError:
            self._count("creates_rejected")
            raise
        now = time.time()
        with self._lock:
            self._stats["creates_accepted"] += 1
            name = f"{parent}/batchPredictionJobs/{next(self._ids)}"
            job = Job(name=name, body=body, config=cfg, family=family, model_id=model_id,
                       native_dim=native_dim, create_time=now, update_time=now)
            self._jobs[name] = job
        created = job.resource(int_enums)
        job.thread = threading.Thread(target=self._runner.run, args=(job,), name=f"vertex-job-{name[-6:]}",
                                      daemon=True)
        job.thread.start()
        log.info("created %s (%s, %s)", name, model_id, family)
        return created

    def _find(self, name: str) -> Job:
        with self._lock:
            job = self._jobs.get(name)
        if job is None:
            raise _HttpError(404, f"BatchPredictionJob {name} not found.")
        return job

    def _cancel(self, name: str) -> None:
        self._count("cancel_calls")
        job = self._find(name)
        with job.lock:
            if job.state in TERMINAL_STATES:
                raise _HttpError(400, f"BatchPredictionJob {name} is in state {job.state} and cannot be "
                                      "cancelled. FAILED_PRECONDITION")
            job.cancel.set()
            job.state = "JOB_STATE_CANCELLING"
            job.update_time = time.time()

    def _list(self, parent: str, query: dict[str, list[str]], int_enums: bool) -> dict[str, Any]:
        self._count("list_calls")
        first = {k: v[0] for k, v in query.items() if v}
        try:
            size = int(first.get("pageSize") or 100)
            offset = int(first.get("pageToken") or 0)
        except ValueError as e:
            raise _HttpError(400, "pageSize and pageToken must be integers") from e
        size = max(1, min(size, 1000))
        matches = _filter_predicate(first.get("filter", ""))
        with self._lock:
            jobs = [j for j in self._jobs.values() if j.name.startswith(parent + "/")]
        chosen = [j.resource(int_enums) for j in jobs if matches(j)]
        page = chosen[offset:offset + size]
        out: dict[str, Any] = {"batchPredictionJobs": page}
        if offset + size < len(chosen):
            out["nextPageToken"] = str(offset + size)
        return out

    # -- storage

    def _storage_client(self, cfg: EmulatorConfig):
        """The storage client a job created under ``cfg`` reads and writes with (``gcs_host`` as it is
        when the job starts)."""
        from reindex.emulators.gcs import anonymous_client

        return anonymous_client(self.gcs_host, cfg.gcs_project)


def _json_body(body: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(body or b"{}")
    except ValueError as e:
        raise _HttpError(400, f"Invalid JSON payload received: {e}") from e
    if not isinstance(obj, dict):
        raise _HttpError(400, "Invalid JSON payload received: expected an object.")
    return obj


def _error_payload(status: int, message: str) -> dict[str, Any]:
    return {"error": {"code": status, "message": message, "status": HTTP_STATUS_NAMES.get(status, "UNKNOWN")}}


def _validate_create(body: dict[str, Any]) -> tuple[str, str, int]:
    """(family, model id, native dim) of a valid create body; ``_HttpError`` 400/404 otherwise."""
    def bad(msg: str) -> _HttpError:
        return _HttpError(400, msg)

    if not isinstance(body.get("displayName"), str) or not body["displayName"]:
        raise bad("BatchPredictionJob.display_name must be set.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("BatchPredictionJob.model must be set.")
    resolved = model_family(model)
    if resolved is None:
        raise _HttpError(404, f"Publisher Model `{model}` not found (the emulator serves text-embedding "
                              f"models and gemini-embedding-001).")
    family, model_id, native = resolved
    inp = body.get("inputConfig") or {}
    if inp.get("bigquerySource"):
        raise bad("The emulator reads JSONL from Cloud Storage only (inputConfig.gcsSource).")
    if inp.get("instancesFormat") != "jsonl":
        raise bad(f"instancesFormat {inp.get('instancesFormat')!r} is not supported; use 'jsonl'.")
    uris = (inp.get("gcsSource") or {}).get("uris")
    if not isinstance(uris, list) or not uris:
        raise bad("inputConfig.gcsSource.uris must list at least one gs:// URI.")
    out = body.get("outputConfig") or {}
    if out.get("predictionsFormat") != "jsonl":
        raise bad(f"predictionsFormat {out.get('predictionsFormat')!r} is not supported; use 'jsonl'.")
    prefix = (out.get("gcsDestination") or {}).get("outputUriPrefix")
    try:
        for uri in [*uris, prefix]:
            split_gs_uri(uri)
    except ValueError as e:
        raise bad(str(e)) from e
    params = body.get("modelParameters")
    if params is not None and not isinstance(params, dict):
        raise bad("modelParameters must be an object.")
    if family == "classic" and params:
        dim = params.get("outputDimensionality", params.get("output_dimensionality"))
        if dim is not None and (not isinstance(dim, int | float) or int(dim) != dim or not 1 <= dim <= native):
            raise bad(f"modelParameters.outputDimensionality must be an integer in 1..{native}, not {dim!r}.")
        truncate = params.get("autoTruncate", params.get("auto_truncate"))
        if truncate is not None and not isinstance(truncate, bool):
            raise bad("modelParameters.autoTruncate must be a boolean.")
    return family, model_id, native


def _filter_predicate(text: str):
    """A predicate for the ``filter`` of list: ``field=value`` clauses joined by AND
    (fields: state, display_name, model, labels.<key>)."""
    clauses = [c for c in re.split(r"\s+AND\s+", text.strip(), flags=re.IGNORECASE) if c]
    tests = []
    for clause in clauses:
        m = _FILTER_RE.match(clause)
        if not m:
            raise _HttpError(400, f"Unsupported filter clause {clause!r}.")
        fld, value = m.group(1), m.group(2) if m.group(2) is not None else m.group(3)
        if fld == "state":
            tests.append(lambda j, v=value: j.state == v)
        elif fld in ("display_name", "displayName"):
            tests.append(lambda j, v=value: j.body.get("displayName") == v)
        elif fld == "model":
            tests.append(lambda j, v=value: j.body.get("model") == v)
        elif fld.startswith("labels."):
            tests.append(lambda j, k=fld[7:], v=value: (j.body.get("labels") or {}).get(k) == v)
        else:
            raise _HttpError(400, f"Unsupported filter field {fld!r}.")
    return lambda job: all(t(job) for t in tests)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "VertexEmulator/1.0"
    emulator: VertexEmulator

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def do_DELETE(self) -> None:  # noqa: N802
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:  # noqa: N802
        self._dispatch("PATCH")

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature of the base class
        log.debug("%s %s", self.address_string(), format % args)

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        try:
            status, payload = self.emulator.route(method, unquote(url.path), parse_qs(url.query), body)
        except Exception as e:  # noqa: BLE001 - answer 500 rather than drop the connection
            log.exception("emulator error on %s %s", method, self.path)
            status, payload = 500, _error_payload(500, f"Emulator error: {e}")
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
