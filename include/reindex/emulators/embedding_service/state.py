"""The live state of one reference service: the model it serves, its cache, rate-limit windows, the
concurrency limit around encoding, faults and counters. Mutated from the server's event loop and read
(``stats``) or configured (``set_faults``, ``reset``) from other threads, hence the lock."""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from reindex.emulators.embedding_service.config import RateLimit, ServiceConfig, model_checksum
from reindex.emulators.embedding_service.embedders import Embedder
from reindex.emulators.embedding_service.faults import FaultInjector, Faults

log = logging.getLogger(__name__)


class ApiError(Exception):
    """Answer the request with ``status`` and ``message``; ``kind``/``code`` fill OpenAI's error shape."""

    def __init__(self, status: int, message: str, *, kind: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.code = code
        self.headers = headers or {}


@dataclass(frozen=True)
class ModelIdentity:
    """The model a response was computed with."""

    name: str
    version: str
    dimensions: int

    @property
    def checksum(self) -> str:
        return model_checksum(self.name, self.dimensions)

    def to_dict(self) -> dict[str, Any]:
        return {"model_name": self.name, "model_version": self.version, "model_checksum": self.checksum,
                "dimensions": self.dimensions}


class VectorCache:
    """sha256(text) → vector, per model checksum; entries expire after ``ttl`` seconds, and the least
    recently used entry goes when ``max_entries`` is reached."""

    def __init__(self, ttl: float, max_entries: int) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._items: collections.OrderedDict[tuple[str, str], tuple[float, np.ndarray]] = collections.OrderedDict()

    @staticmethod
    def key(checksum: str, text: str) -> tuple[str, str]:
        return checksum, hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()

    def get(self, key: tuple[str, str]) -> np.ndarray | None:
        now = time.monotonic()
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            if item[0] <= now:
                del self._items[key]
                return None
            self._items.move_to_end(key)
            return item[1]

    def put(self, key: tuple[str, str], vector: np.ndarray) -> None:
        with self._lock:
            self._items[key] = (time.monotonic() + self.ttl, vector)
            self._items.move_to_end(key)
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)

    def clear(self) -> int:
        with self._lock:
            n = len(self._items)
            self._items.clear()
            return n

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


class SlidingWindowLimiter:
    """At most ``limit.count`` requests per key in any ``limit.window_seconds`` window."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._hits: dict[tuple[str, str], collections.deque[float]] = {}

    def acquire(self, key: tuple[str, str], limit: RateLimit) -> int | None:
        """Record a request and return None, or return the whole seconds until a slot frees (>= 1)."""
        now = time.monotonic()
        window = limit.window_seconds
        with self._lock:
            hits = self._hits.setdefault(key, collections.deque())
            while hits and hits[0] <= now - window:
                hits.popleft()
            if len(hits) >= limit.count:
                return max(1, math.ceil(hits[0] + window - now))
            hits.append(now)
            return None

    def clear(self) -> None:
        with self._lock:
            self._hits.clear()


class ServiceState:
    """Everything one running service shares between requests."""

    def __init__(self, config: ServiceConfig, embedder: Embedder, native_dim: int, load_time_seconds: float,
                 *, max_dim: int | None = None) -> None:
        self.config = config
        self.embedder = embedder
        self.load_time_seconds = load_time_seconds
        self.max_dim = max_dim  # the largest dimension the embedder can serve (None: any)
        self.base_model = ModelIdentity(config.resolved_model_name, config.model_version, native_dim)
        self.rate_limits = config.rate_limits
        self.faults = FaultInjector()
        self.cache = VectorCache(config.cache_ttl_seconds, config.cache_max_entries)
        self.limiter = SlidingWindowLimiter()
        self.executor = ThreadPoolExecutor(max_workers=config.max_concurrent_requests,
                                           thread_name_prefix="embedding-encode")
        # Bound to the server's loop on first use (asyncio primitives no longer take a loop).
        self.semaphore = asyncio.Semaphore(config.max_concurrent_requests)
        self._lock = threading.Lock()
        self._zero()
        self.set_faults(config.faults)

    # --- model identity and faults -----------------------------------------------------------------

    def _zero(self) -> None:
        self._model = self.base_model
        self._served_names = {self.base_model.name}
        self._model_changed = False
        self._successes = 0
        self._successes_at_faults = 0
        self.requests: dict[str, dict[str, int]] = {}
        self.texts_embedded = 0
        self.texts_encoded = 0
        self.cache_hits = 0
        self.cache_misses = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.waiting = 0
        self.max_waiting = 0
        self.batch_sizes: dict[str, int] = {}
        self.encode_failures = {"timeout": 0, "error": 0}

    def set_faults(self, faults: Faults) -> None:
        """Replace the faults (fresh budgets); ``model_change_after`` counts from now."""
        if faults.new_dim is not None and self.max_dim is not None and faults.new_dim > self.max_dim:
            raise ValueError(f"faults: new_dim {faults.new_dim} is more than the {self.max_dim} dimensions "
                             f"the {self.config.embedder} embedder can serve")
        with self._lock:
            self.faults.configure(faults)
            self._successes_at_faults = self._successes
            self._model_changed = False

    def reset(self) -> None:
        """Zero the counters, re-arm the fault budgets, serve the start-up model again, empty the cache
        and the rate-limit windows. The fault configuration stays."""
        with self._lock:
            self._zero()
            self.faults.rearm()
        self.cache.clear()
        self.limiter.clear()

    def model(self) -> ModelIdentity:
        """The model serving now (after ``model_change_after`` successful requests, the new one)."""
        f = self.faults.faults
        with self._lock:
            if (f.model_change_after is not None and not self._model_changed
                    and self._successes - self._successes_at_faults >= f.model_change_after):
                old = self._model
                name = f.new_model_name or f"{old.name}-v2"
                self._model = ModelIdentity(name, old.version, f.new_dim or old.dimensions)
                self._model_changed = True
                self._served_names.add(name)
                self.faults.served("model_change")
                log.warning("embedding service: model changed from %s (%s) to %s (%s)", old.name, old.checksum,
                            self._model.name, self._model.checksum)
            return self._model

    def accepts_model_name(self, name: str) -> bool:
        """Whether ``/v1/embeddings`` serves a request for ``name`` (the current model's name, or with
        ``accept_old_model_name`` one served before)."""
        current = self.model()
        if name == current.name:
            return True
        with self._lock:
            return self.faults.faults.accept_old_model_name and name in self._served_names

    # --- counters ----------------------------------------------------------------------------------

    def count_request(self, endpoint: str, status: str) -> None:
        with self._lock:
            by_status = self.requests.setdefault(endpoint, {})
            by_status[status] = by_status.get(status, 0) + 1

    def count_success(self, n_texts: int) -> None:
        """A successful embedding request (counts towards ``model_change_after``)."""
        with self._lock:
            self._successes += 1
            self.texts_embedded += n_texts

    def count_batch(self, size: int) -> None:
        with self._lock:
            self.batch_sizes[str(size)] = self.batch_sizes.get(str(size), 0) + 1

    def rate_limit(self, endpoint_class: str, client: str) -> tuple[RateLimit, int] | None:
        """``(limit, retry_after)`` when this request is over its class's limit, else None (and counted)."""
        limit = self.rate_limits[endpoint_class]
        if limit is None:
            return None
        retry_after = self.limiter.acquire((endpoint_class, client), limit)
        return None if retry_after is None else (limit, retry_after)

    def stats(self) -> dict[str, Any]:
        """Counters (see ``EmbeddingService.stats``)."""
        faults = self.faults.snapshot()
        model = self.model()
        with self._lock:
            return {
                "requests": {e: dict(s) for e, s in self.requests.items()},
                "successful_requests": self._successes,
                "texts_embedded": self.texts_embedded,
                "texts_encoded": self.texts_encoded,
                "cache_hits": self.cache_hits,
                "cache_misses": self.cache_misses,
                "cache_size": len(self.cache),
                "in_flight": self.in_flight,
                "max_in_flight": self.max_in_flight,
                "waiting": self.waiting,
                "max_waiting": self.max_waiting,
                "batch_sizes": dict(self.batch_sizes),
                "encode_failures": dict(self.encode_failures),
                "faults": faults["served"],
                "faults_remaining": faults["remaining"],
                "faults_config": faults["config"],
                "model": {**model.to_dict(), "changed": model is not self.base_model},
            }

    # --- encoding ----------------------------------------------------------------------------------

    async def vectors(self, texts: list[str], model: ModelIdentity) -> tuple[list[np.ndarray], list[bool]]:
        """One vector per text (``model.dimensions``, unit length) and whether it came from the cache.

        Cache misses are encoded once per distinct text, in the encode thread pool, under the
        ``max_concurrent_requests`` semaphore and the ``encode_timeout_seconds`` limit (503).
        """
        cfg = self.config
        keys = [VectorCache.key(model.checksum, t) for t in texts]
        found = [self.cache.get(k) if cfg.cache_enabled else None for k in keys]
        cached = [v is not None for v in found]
        todo: dict[tuple[str, str], list[int]] = {}
        for i, v in enumerate(found):
            if v is None:
                todo.setdefault(keys[i], []).append(i)
        with self._lock:
            self.cache_hits += sum(cached)
            self.cache_misses += len(texts) - sum(cached)
        if todo:
            unique = [texts[idx[0]] for idx in todo.values()]
            encoded = await self._encode(unique, model)
            for (key, idx), vector in zip(todo.items(), encoded, strict=True):
                for i in idx:
                    found[i] = vector
                if cfg.cache_enabled:
                    self.cache.put(key, vector)
        return found, cached  # type: ignore[return-value]

    async def _encode(self, texts: list[str], model: ModelIdentity) -> np.ndarray:
        cfg = self.config
        with self._lock:
            self.waiting += 1
            self.max_waiting = max(self.max_waiting, self.waiting)
        try:
            await self.semaphore.acquire()
        finally:
            with self._lock:
                self.waiting -= 1
        try:
            with self._lock:
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
            loop = asyncio.get_running_loop()
            future = loop.run_in_executor(self.executor, self._encode_blocking, texts, model)
            try:
                out = await asyncio.wait_for(future, cfg.encode_timeout_seconds)
            except TimeoutError:
                self._failure("timeout")
                raise ApiError(503, f"Encoding timeout after {cfg.encode_timeout_seconds:g}s",
                               code="encode_timeout") from None
            except Exception as exc:
                self._failure("error")
                log.exception("embedding service: encoding %d texts failed", len(texts))
                raise ApiError(500, f"Encoding failed: {type(exc).__name__}: {exc}", code="encode_failed") from None
        finally:
            with self._lock:
                self.in_flight -= 1
            self.semaphore.release()
        with self._lock:
            self.texts_encoded += len(texts)
        return out

    def _encode_blocking(self, texts: list[str], model: ModelIdentity) -> np.ndarray:
        if self.config.encode_delay_seconds:
            time.sleep(self.config.encode_delay_seconds)
        out = np.asarray(self.embedder.embed(texts, model.checksum, model.dimensions), dtype=np.float32)
        if out.shape != (len(texts), model.dimensions):
            raise ValueError(f"embedder returned shape {out.shape}, expected ({len(texts)}, {model.dimensions})")
        return out

    def _failure(self, reason: str) -> None:
        with self._lock:
            self.encode_failures[reason] = self.encode_failures.get(reason, 0) + 1

    async def count_tokens(self, texts: list[str]) -> int:
        return await asyncio.get_running_loop().run_in_executor(None, self.embedder.count_tokens, texts)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
