"""An offline reference embedding service (tests, ``make demo BACKEND=service``, compose profile
``service``): the HTTP service that ``backend="service"`` calls, with fault injection.

Protocol ``seed004``:

====== ================ =====================================================================
POST   ``/embed``       ``{"text"}`` → ``{"embedding", "dimensions", "cached", "model_version",
                        "model_checksum"}``
POST   ``/embed/batch`` ``{"items": [{"id", "text"}]}`` → ``{"results": [{"id", "embedding",
                        "cached"}], "total", "successful", "cached_count", "dimensions",
                        "model_version", "model_checksum"}`` (request order)
GET    ``/model-info``  ``{"model_name", "model_version", "model_checksum", "dimensions",
                        "normalize_embeddings", "max_batch_size", "max_text_length",
                        "max_concurrent_requests", "encode_timeout_seconds",
                        "load_time_seconds", "embedder"}``
GET    ``/health``      ``{"status": "ok", "model_loaded": true}``
GET    ``/metrics``     Prometheus text (``embedding_requests_total{endpoint,status}``, …)
GET    ``/cache/stats`` / POST ``/cache/clear``
====== ================ =====================================================================

Protocol ``openai``: ``POST /v1/embeddings`` (``input`` a string or list of strings, ``model`` the
served model's name, ``encoding_format`` float|base64, ``dimensions`` ≤ native: truncated and
renormalised) → ``{"object": "list", "data": [{"object": "embedding", "index", "embedding"}],
"model", "usage": {"prompt_tokens", "total_tokens"}}`` with header ``X-Model-Checksum``;
``GET /v1/models``. Errors ``{"error": {"message", "type", "code"}}``.

Errors elsewhere are ``{"detail": "<message>"}``: 400 validation (naming the item, e.g.
``items[3].text: text has 10001 characters, more than MAX_TEXT_LENGTH=10000``), 401 ``Invalid or
missing API key`` (``X-API-Key`` or ``Authorization: Bearer``, when ``api_key`` is set), 429
``Rate limit exceeded: 20 per 1 minute`` + ``Retry-After``, 503 ``Encoding timeout after 30s``.
``/health``, ``/model-info``, ``/metrics`` and ``/admin/*`` are open.

Model identity: ``model_checksum`` = md5("<model_name>:<dimensions>")[:12], as the real service.
Cache: sha256(text) per model checksum, TTL 3600 s, 10,000 entries.

Faults (``ServiceConfig.faults``, ``EmbeddingService.set_faults(**faults)``, ``POST /admin/faults``;
``GET /admin/stats``, ``POST /admin/reset``): see ``faults.Faults``.

Use: ``with EmbeddingService(ServiceConfig(embedder="hash")) as svc: svc.url`` or
``python -m reindex.emulators.embedding_service --port 8090 --embedder model``.

Layout: ``config`` (``ServiceConfig``, rate-limit strings, the checksum), ``faults``, ``embedders``
(model, hash, noop), ``state`` (model identity, cache, rate windows, concurrency, counters), ``app``
(the FastAPI app and the fault/counting layer), ``server`` (``EmbeddingService``), ``cli``.
"""

from __future__ import annotations

from reindex.emulators.embedding_service.config import ServiceConfig, model_checksum
from reindex.emulators.embedding_service.faults import Faults
from reindex.emulators.embedding_service.server import EmbeddingService

__all__ = ["EmbeddingService", "Faults", "ServiceConfig", "model_checksum"]
