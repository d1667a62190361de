"""``EmbeddingService``: the reference service running under uvicorn in a daemon thread."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from reindex.emulators.embedding_service.config import ServiceConfig
from reindex.emulators.embedding_service.embedders import Embedder, ModelServiceEmbedder, make_embedder
from reindex.emulators.embedding_service.faults import Faults
from reindex.emulators.embedding_service.state import ServiceState

log = logging.getLogger(__name__)


class EmbeddingService:
    """The service: ``start()`` loads the embedder, serves on ``host:port`` (0: a free port) and returns
    self; ``url`` is then ``http://127.0.0.1:<port>`` (or the host it was given); ``stop()`` ends it.
    Also a context manager. ``embedder`` replaces the configured one (tests: e.g. a gated embedder)."""

    def __init__(self, config: ServiceConfig | None = None, *, host: str = "127.0.0.1", port: int = 0,
                 embedder: Embedder | None = None) -> None:
        self.config = config if config is not None else ServiceConfig.from_env()
        self.host = host
        self.port = port
        self._embedder = embedder
        self.state: ServiceState | None = None
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 60.0) -> EmbeddingService:
        """Load the model and listen; ``RuntimeError`` when the server does not come up in ``timeout`` s."""
        import uvicorn

        from reindex.emulators.embedding_service.app import build_app

        if self._thread is not None:
            raise RuntimeError("EmbeddingService is already started")
        cfg = self.config
        embedder = self._embedder or make_embedder(cfg.embedder, cfg.dim, cfg.local_model)
        t0 = time.perf_counter()
        native = int(embedder.load())
        load_time = time.perf_counter() - t0
        if cfg.dim is not None and cfg.dim != native:
            raise ValueError(f"ServiceConfig: dim={cfg.dim}, but the {cfg.embedder} embedder produces "
                             f"{native}-d vectors")
        max_dim = native if isinstance(embedder, ModelServiceEmbedder) else None
        self.state = ServiceState(cfg, embedder, native, load_time, max_dim=max_dim)
        server = uvicorn.Server(uvicorn.Config(
            build_app(self.state), host=self.host, port=self.port, log_level="warning", log_config=None,
            access_log=False, lifespan="off", timeout_graceful_shutdown=2))
        thread = threading.Thread(target=server.run, name=f"embedding-service-{self.port}", daemon=True)
        thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                server.should_exit = True
                self.state.close()
                raise RuntimeError(f"embedding service did not start on {self.host}:{self.port} "
                                   "(port in use? see the uvicorn log above)")
            time.sleep(0.01)
        self.port = server.servers[0].sockets[0].getsockname()[1]
        self._server, self._thread = server, thread
        log.info("embedding service on %s (embedder=%s, model=%s, auth=%s)", self.url, cfg.embedder,
                 self.state.base_model.name, "on" if cfg.api_key else "off")
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving (requests still running get ~2 s) and release the encode threads."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        if self.state is not None:
            self.state.close()
        self._server = self._thread = None

    def __enter__(self) -> EmbeddingService:
        return self if self._thread is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "", "::") else self.host
        return f"http://{host}:{self.port}"

    def _live(self) -> ServiceState:
        if self.state is None:
            raise RuntimeError("EmbeddingService is not started")
        return self.state

    def stats(self) -> dict[str, Any]:
        """Counters, as ``GET /admin/stats``: ``requests`` ({endpoint: {status: n}}, status ``dropped``
        for a dropped connection), ``successful_requests``, ``texts_embedded`` (texts in successful
        responses), ``texts_encoded`` (texts the embedder computed), ``cache_hits``, ``cache_misses``,
        ``cache_size``, ``in_flight``/``max_in_flight`` (requests encoding inside the concurrency
        limit, now / peak), ``waiting``/``max_waiting`` (queued for it), ``batch_sizes`` ({size: n} of
        batch requests accepted), ``encode_failures`` ({reason: n}), ``faults`` (served by kind),
        ``faults_remaining``, ``faults_config`` and ``model`` (the identity serving now, ``changed``)."""
        return self._live().stats()

    def set_faults(self, **faults: Any) -> dict[str, Any]:
        """Replace the faults (``Faults`` fields; the ones not given are off) with fresh budgets."""
        state = self._live()
        state.set_faults(Faults.from_mapping(faults))
        return state.faults.snapshot()

    def reset(self) -> None:
        """Zero the counters, re-arm the fault budgets, serve the start-up model, empty the cache."""
        self._live().reset()

    def model_info(self) -> dict[str, Any]:
        """The identity serving now: ``model_name``, ``model_version``, ``model_checksum``, ``dimensions``."""
        return self._live().model().to_dict()
