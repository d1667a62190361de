"""The HTTP front of the reference service: a FastAPI app (protocols ``seed004`` and ``openai``, the
open probes, the admin API) inside an ASGI layer that counts every response and injects the
request-level faults (a dropped connection, 429, 503, 403, a delay) before the app sees a request.

Errors: ``{"detail": "<message>"}`` everywhere except under ``/v1/``, where OpenAI's shape
``{"error": {"message", "type", "code"}}`` is used. Validation errors are 400 (not FastAPI's 422)
and name the offending field, e.g. ``items[3].text: text has 10001 characters, more than
MAX_TEXT_LENGTH=10000``; several are joined with ``"; "``.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

try:
    import orjson
except ImportError:  # pragma: no cover - pinned in constraints.txt; json is the slow fallback
    orjson = None

from reindex.emulators.embedding_service.config import (
    SEED_RATE_LIMIT,
    SEED_RATE_LIMIT_BATCH,
    parse_rate_limit,
)
from reindex.emulators.embedding_service.faults import FaultAction, Faults
from reindex.emulators.embedding_service.state import ApiError, ModelIdentity, ServiceState

log = logging.getLogger(__name__)

# Embedding endpoints → their rate-limit class.
EMBED_PATHS = {"/embed": "single", "/embed/batch": "batch", "/v1/embeddings": "batch"}
OPEN_PATHS = ("/health", "/model-info", "/metrics", "/admin/faults", "/admin/stats", "/admin/reset")
KNOWN_PATHS = frozenset({*EMBED_PATHS, *OPEN_PATHS, "/cache/stats", "/cache/clear", "/v1/models"})

_OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                 404: "invalid_request_error", 405: "invalid_request_error", 429: "rate_limit_error"}
_MESSAGES = {  # pydantic error type → wording
    "missing": "field required",
    "string_type": "must be a string",
    "list_type": "must be a list",
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "int_from_float": "must be an integer",
    "model_attributes_type": "must be a JSON object",
    "model_type": "must be a JSON object",
    "dict_type": "must be a JSON object",
}


# --- request bodies ---------------------------------------------------------------------------------

class EmbedRequest(BaseModel):
    text: str


class BatchItem(BaseModel):
    id: str
    text: str


class BatchRequest(BaseModel):
    items: list[BatchItem]


class OpenAIEmbeddingsRequest(BaseModel):
    input: Any
    model: str
    encoding_format: str = "float"
    dimensions: int | None = None
    user: str | None = None


# --- errors -------------------------------------------------------------------------------------------

def error_response(path: str, status: int, message: str, *, kind: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """The error in the protocol of ``path``: OpenAI's shape under ``/v1/``, else ``{"detail": ...}``."""
    if path.startswith("/v1/"):
        body: dict[str, Any] = {"error": {"message": message,
                                          "type": kind or _OPENAI_TYPES.get(status, "server_error"),
                                          "code": code}}
    else:
        body = {"detail": message}
    return JSONResponse(body, status_code=status, headers=headers)


def dump_json(content: dict[str, Any]) -> bytes:
    """JSON bytes; numpy vectors are written directly (orjson), each float32 as its shortest repr, which
    reads back as the same float32. Serialising 128 x 384 floats with ``json`` would cost more than
    a client's own overhead, which the noop embedder is there to measure."""
    if orjson is not None:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)
    return json.dumps(content, default=lambda v: v.tolist(), separators=(",", ":")).encode()


def validation_message(errors: list[dict[str, Any]]) -> str:
    """pydantic's errors as one line naming each field: ``items[0].text: must be a string``."""
    parts = []
    for err in errors:
        loc = list(err.get("loc", ()))
        if loc and loc[0] == "body":
            loc = loc[1:]
        if err.get("type") == "json_invalid":
            where = f" at position {loc[0]}" if loc and isinstance(loc[0], int) else ""
            parts.append(f"invalid JSON{where}: {(err.get('ctx') or {}).get('error', err.get('msg'))}")
            continue
        name = format_loc(loc) or "request body"
        parts.append(f"{name}: {_MESSAGES.get(err.get('type', ''), err.get('msg', 'invalid'))}")
    return "; ".join(parts) or "invalid request"


def format_loc(loc: list[Any]) -> str:
    """``["items", 3, "text"]`` → ``items[3].text``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# --- the app ------------------------------------------------------------------------------------------

def build_app(state: ServiceState) -> Any:
    """The ASGI application serving ``state`` (the fault/counting layer around the FastAPI app)."""
    return FrontLayer(build_fastapi(state), state)


def build_fastapi(state: ServiceState) -> FastAPI:
    cfg = state.config
    app = FastAPI(title="Reference embedding service (offline emulator)", version=cfg.model_version,
                  redoc_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(request.url.path, exc.status, exc.message, kind=exc.kind, code=exc.code,
                              headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(request.url.path, 400, validation_message(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(request.url.path, exc.status_code, str(exc.detail),
                              headers=dict(exc.headers or {}))

    def require_key(request: Request) -> None:
        """401 unless ``X-API-Key`` or ``Authorization: Bearer`` carries the key (either header, any endpoint)."""
        key = cfg.api_key
        if key is None:
            return
        given = []
        if (x := request.headers.get("x-api-key")) is not None:
            given.append(x)
        auth = request.headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            given.append(auth[7:].strip())
        # compare_digest: the time taken must not tell how much of the key was right.
        if not any(hmac.compare_digest(g.encode(), key.encode()) for g in given):
            raise ApiError(401, "Invalid or missing API key", code="invalid_api_key")

    auth = [Depends(require_key)]

    def check_count(n: int, name: str) -> None:
        if n == 0:
            raise ApiError(400, f"{name}: no items (send 1 to MAX_BATCH_SIZE={cfg.max_batch_size})")
        if n > cfg.max_batch_size:
            raise ApiError(400, f"{name}: {n} items, more than MAX_BATCH_SIZE={cfg.max_batch_size}")

    def check_texts(texts: list[str], names: list[str]) -> None:
        problems = []
        for name, text in zip(names, texts, strict=True):
            if not text:
                problems.append(f"{name}: empty text")
            elif len(text) > cfg.max_text_length:
                problems.append(f"{name}: text has {len(text)} characters, more than "
                                f"MAX_TEXT_LENGTH={cfg.max_text_length}")
            else:
                try:  # JSON can carry a lone surrogate ("\ud800"); no model can tokenize it
                    text.encode("utf-8")
                except UnicodeEncodeError as exc:
                    problems.append(f"{name}: not valid Unicode (lone surrogate at character {exc.start})")
        if problems:
            raise ApiError(400, "; ".join(problems))

    def check_rate(endpoint_class: str, request: Request) -> None:
        hit = state.rate_limit(endpoint_class, request.client.host if request.client else "-")
        if hit is not None:
            limit, retry_after = hit
            raise ApiError(429, f"Rate limit exceeded: {limit.describe()}", code="rate_limit_exceeded",
                           headers={"Retry-After": str(retry_after)})

    def check_marker(texts: list[str], names: list[str]) -> None:
        marker = state.faults.faults.invalid_marker
        if not marker:
            return
        bad = [f"{name}: rejected by the model: contains {marker}"
               for name, text in zip(names, texts, strict=True) if marker in text]
        if bad:
            state.faults.served("invalid_marker")
            raise ApiError(400, "; ".join(bad), code="invalid_input")

    def answer(content: dict[str, Any], model: ModelIdentity) -> Response:
        # The checksum as a header too: OpenAI-shaped bodies have no field for it.
        return Response(dump_json(content), media_type="application/json",
                        headers={"X-Model-Checksum": model.checksum})

    # --- protocol seed004 ---------------------------------------------------------------------------

    @app.post("/embed", dependencies=auth)
    async def embed(body: EmbedRequest, request: Request) -> Response:
        """One text → ``{"embedding", "dimensions", "cached", "model_version", "model_checksum"}``."""
        texts, names = [body.text], ["text"]
        check_texts(texts, names)
        check_rate("single", request)
        check_marker(texts, names)
        model = state.model()
        vectors, cached = await state.vectors(texts, model)
        state.count_success(1)
        return answer({"embedding": vectors[0], "dimensions": model.dimensions, "cached": cached[0],
                       "model_version": model.version, "model_checksum": model.checksum}, model)

    @app.post("/embed/batch", dependencies=auth)
    async def embed_batch(body: BatchRequest, request: Request) -> Response:
        """``{"items": [{"id", "text"}]}`` → results in request order, with per-item ``cached``."""
        check_count(len(body.items), "items")
        texts = [item.text for item in body.items]
        names = [f"items[{i}].text" for i in range(len(texts))]
        check_texts(texts, names)
        check_rate("batch", request)
        check_marker(texts, names)
        model = state.model()
        state.count_batch(len(texts))
        vectors, cached = await state.vectors(texts, model)
        rows = np.stack(vectors)
        results = [{"id": item.id, "embedding": row, "cached": hit}
                   for item, row, hit in zip(body.items, rows, cached, strict=True)]
        state.count_success(len(texts))
        return answer({"results": results, "total": len(results), "successful": len(results),
                       "cached_count": sum(cached), "dimensions": model.dimensions,
                       "model_version": model.version, "model_checksum": model.checksum}, model)

    # --- protocol openai ----------------------------------------------------------------------------

    @app.post("/v1/embeddings", dependencies=auth)
    async def openai_embeddings(body: OpenAIEmbeddingsRequest, request: Request) -> Response:
        """OpenAI's embeddings API: ``input`` a string or a list of strings."""
        if isinstance(body.input, str):
            texts, names = [body.input], ["input"]
        elif isinstance(body.input, list) and all(isinstance(t, str) for t in body.input):
            check_count(len(body.input), "input")
            texts, names = list(body.input), [f"input[{i}]" for i in range(len(body.input))]
        elif isinstance(body.input, list) and body.input and all(isinstance(t, int | list) for t in body.input):
            raise ApiError(400, "input: token arrays are not supported; send strings")
        else:
            raise ApiError(400, "input: must be a string or a list of strings")
        check_texts(texts, names)
        model = state.model()
        if not state.accepts_model_name(body.model):
            raise ApiError(404, f"The model `{body.model}` does not exist; this service serves `{model.name}`",
                           code="model_not_found")
        if body.encoding_format not in ("float", "base64"):
            raise ApiError(400, f"encoding_format: must be 'float' or 'base64', not {body.encoding_format!r}")
        dims = model.dimensions if body.dimensions is None else body.dimensions
        if dims < 1 or dims > model.dimensions:
            raise ApiError(400, f"dimensions: {dims} is out of range: this model serves 1..{model.dimensions}")
        check_rate("batch", request)
        check_marker(texts, names)
        state.count_batch(len(texts))
        vectors, _cached = await state.vectors(texts, model)
        matrix = np.stack(vectors)
        if dims < model.dimensions:  # Matryoshka-style: keep the leading components, unit length again
            from reindex.emulators.embedding_service.embedders import truncate_normalised

            matrix = truncate_normalised(matrix, dims)
        if body.encoding_format == "base64":
            encoded: list[Any] = [base64.b64encode(row.astype("<f4").tobytes()).decode("ascii") for row in matrix]
        else:
            encoded = list(matrix)
        tokens = await state.count_tokens(texts)
        state.count_success(len(texts))
        data = [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(encoded)]
        return answer({"object": "list", "data": data, "model": model.name,
                       "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}, model)

    @app.get("/v1/models", dependencies=auth)
    async def openai_models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": state.model().name, "object": "model", "owned_by": "reference"}]}

    # --- open probes --------------------------------------------------------------------------------

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model_loaded": True}

    @app.get("/model-info")
    async def model_info() -> dict[str, Any]:
        model = state.model()
        return {"model_name": model.name, "model_version": model.version, "model_checksum": model.checksum,
                "dimensions": model.dimensions, "normalize_embeddings": True,
                "max_batch_size": cfg.max_batch_size, "max_text_length": cfg.max_text_length,
                "max_concurrent_requests": cfg.max_concurrent_requests,
                "encode_timeout_seconds": cfg.encode_timeout_seconds,
                "load_time_seconds": round(state.load_time_seconds, 3), "embedder": cfg.embedder}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(prometheus_text(state), media_type="text/plain; version=0.0.4; charset=utf-8")

    # --- cache ----------------------------------------------------------------------------------------

    @app.get("/cache/stats", dependencies=auth)
    async def cache_stats() -> dict[str, Any]:
        s = state.stats()
        lookups = s["cache_hits"] + s["cache_misses"]
        return {"enabled": cfg.cache_enabled, "size": s["cache_size"], "max_size": cfg.cache_max_entries,
                "ttl_seconds": cfg.cache_ttl_seconds, "hits": s["cache_hits"], "misses": s["cache_misses"],
                "hit_rate": round(s["cache_hits"] / lookups, 4) if lookups else 0.0}

    @app.post("/cache/clear", dependencies=auth)
    async def cache_clear() -> dict[str, Any]:
        return {"cleared": state.cache.clear()}

    # --- admin (open: tests and demos drive it) -----------------------------------------------------

    @app.get("/admin/faults")
    async def get_faults() -> dict[str, Any]:
        return state.faults.snapshot()

    @app.post("/admin/faults")
    async def post_faults(request: Request) -> Response:
        """Replace the faults with the JSON object's fields (the others off); budgets start afresh."""
        try:
            data = await request.json()
        except ValueError as exc:
            raise ApiError(400, f"invalid JSON: {exc}") from None
        try:
            state.set_faults(Faults.from_mapping(data))
        except (ValueError, TypeError) as exc:
            raise ApiError(400, str(exc)) from None
        return JSONResponse(state.faults.snapshot())

    @app.get("/admin/stats")
    async def admin_stats() -> dict[str, Any]:
        return state.stats()

    @app.post("/admin/reset")
    async def admin_reset() -> dict[str, Any]:
        state.reset()
        return {"reset": True}

    return app


def prometheus_text(state: ServiceState) -> str:
    """The counters in Prometheus' text exposition format."""
    s = state.stats()
    lines = ["# HELP embedding_requests_total HTTP requests by endpoint and status.",
             "# TYPE embedding_requests_total counter"]
    for endpoint, by_status in sorted(s["requests"].items()):
        for status, n in sorted(by_status.items()):
            lines.append(f'embedding_requests_total{{endpoint="{endpoint}",status="{status}"}} {n}')
    lines += ["# HELP embedding_cache_hits_total Texts answered from the cache.",
              "# TYPE embedding_cache_hits_total counter", f"embedding_cache_hits_total {s['cache_hits']}",
              "# HELP embedding_cache_misses_total Texts not in the cache.",
              "# TYPE embedding_cache_misses_total counter", f"embedding_cache_misses_total {s['cache_misses']}",
              "# HELP embedding_active_requests Requests encoding now (inside the concurrency limit).",
              "# TYPE embedding_active_requests gauge", f"embedding_active_requests {s['in_flight']}",
              "# HELP embedding_waiting_requests Requests waiting for the concurrency limit.",
              "# TYPE embedding_waiting_requests gauge", f"embedding_waiting_requests {s['waiting']}",
              "# HELP embedding_encode_failures_total Encode calls that failed, by reason.",
              "# TYPE embedding_encode_failures_total counter"]
    for reason, n in sorted(s["encode_failures"].items()):
        lines.append(f'embedding_encode_failures_total{{reason="{reason}"}} {n}')
    lines += ["# HELP embedding_texts_total Texts answered by successful embedding requests.",
              "# TYPE embedding_texts_total counter", f"embedding_texts_total {s['texts_embedded']}",
              "# HELP embedding_model_loaded Whether the model is loaded.",
              "# TYPE embedding_model_loaded gauge", "embedding_model_loaded 1"]
    return "\n".join(lines) + "\n"


# --- the outer layer: counting and request-level faults ------------------------------------------------

class FrontLayer:
    """ASGI layer in front of the app: counts every response by endpoint and status (unknown paths as
    ``other``) and applies ``FaultInjector.next_request()`` to embedding requests."""

    def __init__(self, app: Any, state: ServiceState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        endpoint = path if path in KNOWN_PATHS else "other"
        started = False

        async def counting_send(message: dict[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start" and not started:
                started = True
                # Counted before the response leaves: a client that reads stats right after sees it.
                self.state.count_request(endpoint, str(message["status"]))
            await send(message)

        if scope["method"] == "POST" and path in EMBED_PATHS:
            action = self.state.faults.next_request()
            if action.kind == "drop_connections":
                self.state.count_request(endpoint, "dropped")
                await drop_connection(send, receive)
                return
            if action.kind is not None:
                await self.fault_response(action, path)(scope, receive, counting_send)
                return
            if action.slow_seconds:
                await asyncio.sleep(action.slow_seconds)
        try:
            await self.app(scope, receive, counting_send)
        finally:
            if not started:
                self.state.count_request(endpoint, "no-response")

    def fault_response(self, action: FaultAction, path: str) -> JSONResponse:
        cfg = self.state.config
        if action.kind == "status_429":
            limit = self.state.rate_limits[EMBED_PATHS[path]] or parse_rate_limit(
                SEED_RATE_LIMIT if EMBED_PATHS[path] == "single" else SEED_RATE_LIMIT_BATCH)
            headers = {"Retry-After": str(action.retry_after)} if action.retry_after is not None else None
            return error_response(path, 429, f"Rate limit exceeded: {limit.describe()}", code="rate_limit_exceeded",
                                  headers=headers)
        if action.kind == "status_503":
            return error_response(path, 503, f"Encoding timeout after {cfg.encode_timeout_seconds:g}s",
                                  code="encode_timeout")
        return error_response(path, 403, "API key lacks permission", code="forbidden")


async def drop_connection(send: Any, receive: Any) -> None:
    """Close the client's connection without a response (uvicorn: the transport behind its ``send``)."""
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    if transport is None:
        raise RuntimeError("drop_connections needs uvicorn: the ASGI server does not expose its transport")
    transport.close()
    # Wait until uvicorn has seen the disconnect, so it does not try to answer 500 on the closed socket.
    try:
        async with asyncio.timeout(2):
            while (await receive())["type"] != "http.disconnect":
                pass
    except TimeoutError:
        log.debug("drop_connections: no disconnect seen within 2 s")
