"""The embedding-service client: async HTTP with bounded concurrency, the service's limits, the retry
table and model pinning, behind a synchronous ``encode_block`` the pipeline calls per block of chunks.

Why httpx: it is already installed and pinned (Airflow's task SDK talks to the API server with it), its
``AsyncClient`` keeps a pool of keep-alive connections (reused by every request of a task), and one API
covers timeouts per phase and transport errors as types. One event loop (``asyncio.Runner``) and one
client live as long as the encoder, so the connections survive from one block to the next.

Per request group (at most ``max_batch_size`` texts, each at most ``max_text_length`` characters; longer
texts fail ``TOO_LONG`` without being sent):

* 200 → vectors, unless the answer names another model than the one pinned for the batch: then its texts
  fail ``MODEL_CHANGED`` and no vector of the other model is kept;
* 429 → wait ``Retry-After`` when given, else the retry policy's backoff (5/10/20 s), at most
  ``max_attempts`` requests, then ``RATE_LIMITED`` (``reindex_retry`` takes them later);
* 5xx, timeouts, connection resets → the same, then ``UNAVAILABLE``;
* 400/413/422 → bisect: the halves are sent again until the offending texts are alone; each fails with
  its own message (``TOO_LONG`` when it speaks of length, else ``INVALID_INPUT``);
* 401/403 → ``ServiceAuthError``: the run fails at once, no chunk is blamed, nothing is retried.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import logging
import time

import numpy as np

from reindex.classify import classify_error
from reindex.errors import ConfigError, ErrorCode, ServiceAuthError, ServiceUnavailableError
from reindex.models import ModelSpec
from reindex.retry import RetryPolicy
from reindex.service.protocols import PROTOCOLS, Identity, Limits, MalformedReply
from reindex.service.settings import DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_TEXT_LENGTH, ServiceSettings

log = logging.getLogger(__name__)

Failure = tuple[int, ErrorCode, str]
_IN_TASK_RETRIES = {ErrorCode.RATE_LIMITED, ErrorCode.UNAVAILABLE}


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """The ``Retry-After`` header in seconds (delta-seconds or an HTTP date), None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (now if now is not None else time.time()))


class ServiceEncoder:
    """Vectors from a remote embedding service for the texts of one task (see the module's contract)."""

    backend = "service"

    def __init__(self, settings: ServiceSettings, *, normalize: bool = True,
                 policy: RetryPolicy | None = None) -> None:
        self.settings = settings
        self.protocol = PROTOCOLS[settings.protocol]
        self.normalize = normalize
        self.policy = policy or RetryPolicy.from_env()
        self._runner: asyncio.Runner | None = None
        self._client = None
        self._limits = Limits()
        self.pinned: Identity | None = None
        self.model_changed: Identity | None = None
        self.stats = {"texts": 0, "cached": 0, "requests": 0, "retries": 0, "bisections": 0}
        self._sleep = asyncio.sleep  # the backoff's clock (a test records the waits instead)

    # --- lifecycle -------------------------------------------------------------------------------

    def _run(self, coro):
        if self._runner is None:
            self._runner = asyncio.Runner()
        return self._runner.run(coro)

    async def _http(self):
        if self._client is None:
            import httpx

            s = self.settings
            self._client = httpx.AsyncClient(
                base_url=s.url, headers=self.protocol.headers(s.api_key),
                timeout=httpx.Timeout(s.timeout_seconds, connect=min(10.0, s.timeout_seconds)),
                limits=httpx.Limits(max_connections=s.concurrency, max_keepalive_connections=s.concurrency))
        return self._client

    def close(self) -> None:
        if self._runner is not None:
            if self._client is not None:
                self._runner.run(self._client.aclose())
                self._client = None
            self._runner.close()
            self._runner = None

    def __enter__(self) -> ServiceEncoder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- identity --------------------------------------------------------------------------------

    @functools.cached_property
    def identity(self) -> Identity:
        """The model the service serves now (``/model-info``, or a one-text probe for openai servers)."""
        import httpx

        async def ask():
            return await self.protocol.identify(await self._http(), self.settings)

        try:
            ident, limits, resp, payload = self._run(ask())
        except httpx.TransportError as e:  # timeouts included
            raise ServiceUnavailableError(f"embedding service {self.settings.url} cannot be reached: "
                                          f"{type(e).__name__}: {e}") from None
        except MalformedReply as e:
            raise ServiceUnavailableError(f"embedding service {self.settings.url} answered its model info "
                                          f"outside the {self.settings.protocol} protocol: {e}") from None
        if ident is None:
            status, detail = resp.status_code, self.protocol.error_detail(payload) or resp.text[:200]
            self._refuse_auth(status, detail)
            if status == 429 or status >= 500:
                raise ServiceUnavailableError(f"embedding service {self.settings.url} answered HTTP {status} "
                                              f"for its model: {detail}")
            raise ConfigError(f"embedding service {self.settings.url} ({self.settings.protocol} protocol) refused "
                              f"to name its model: HTTP {status} {detail}. Check the connection's protocol and model.")
        self._limits = limits
        return ident

    @functools.cached_property
    def spec(self) -> ModelSpec:
        ident = self.identity
        return ModelSpec(model_id=ident.model_name or self.settings.model or "unnamed", dim=ident.dim,
                         revision=ident.checksum or f"{ident.model_name}:{ident.dim}", normalized=self.normalize,
                         backend=self.backend, precision="fp32", max_seq_length=None)

    def pin(self, model_checksum: str, storage: str) -> None:
        """Keep only vectors of the batch's model (``model_checksum``). A service that already serves another
        one fails every text ``MODEL_CHANGED`` rather than mixing models in the store."""
        if self.spec.stored_as(storage).checksum == model_checksum:
            self.pinned = self.identity
        else:
            self.model_changed = self.identity
            log.error("the embedding service now serves %s; batch was planned for model checksum %s",
                      self.identity.describe(), model_checksum)

    @property
    def max_batch_size(self) -> int:
        self.identity  # noqa: B018 - learns the limits
        return self.settings.max_batch_size or self._limits.max_batch_size or DEFAULT_MAX_BATCH_SIZE

    @property
    def max_text_length(self) -> int:
        self.identity  # noqa: B018
        return self.settings.max_text_length or self._limits.max_text_length or DEFAULT_MAX_TEXT_LENGTH

    @property
    def block_size(self) -> int:
        """Texts per call of ``encode_block`` that keep every connection busy."""
        return self.max_batch_size * self.settings.concurrency * 2

    # --- encoding --------------------------------------------------------------------------------

    def encode(self, texts: list[str]) -> np.ndarray:
        """Vectors for every text (queries, tools); raises when any text failed."""
        ok, parts, failures = self.encode_block(texts)
        if failures:
            i, code, message = failures[0]
            error = ServiceUnavailableError if code in _IN_TASK_RETRIES else ConfigError
            raise error(f"text {i} of {len(texts)}: [{code}] {message}")
        return parts[0] if parts else np.empty((0, self.spec.dim), np.float32)

    def encode_block(self, texts: list[str]) -> tuple[list[int], list[np.ndarray], list[Failure]]:
        """``(ok_indices, [vectors of those, in order], failures)`` for ``texts``: each text gets a vector or
        a failure ``(index, code, message)``. Raises ``ServiceAuthError`` on 401/403."""
        if self.model_changed is not None:
            msg = self._changed_message(self.model_changed)
            return [], [], [(i, ErrorCode.MODEL_CHANGED, msg) for i in range(len(texts))]
        if self.pinned is None:
            self.pinned = self.identity
        vectors: dict[int, np.ndarray] = {}
        failures: list[Failure] = []
        self._run(self._encode(texts, vectors, failures))
        ok = sorted(vectors)
        parts = [np.stack([vectors[i] for i in ok])] if ok else []
        return ok, parts, sorted(failures)

    async def _encode(self, texts: list[str], vectors: dict, failures: list[Failure]) -> None:
        limit, size = self.max_text_length, self.max_batch_size
        groups: list[list[int]] = [[]]
        for i, text in enumerate(texts):
            if len(text) > limit:
                failures.append((i, ErrorCode.TOO_LONG, f"text has {len(text):,} characters, more than the "
                                 f"embedding service's max_text_length={limit:,}; not sent"))
                continue
            if len(groups[-1]) == size:
                groups.append([])
            groups[-1].append(i)
        slots = asyncio.Semaphore(self.settings.concurrency)
        try:
            async with asyncio.TaskGroup() as tg:
                for group in groups:
                    if group:
                        tg.create_task(self._send(group, texts, slots, vectors, failures))
        except* ServiceAuthError as eg:
            raise eg.exceptions[0] from None
        except* ConfigError as eg:
            raise eg.exceptions[0] from None

    async def _send(self, idx: list[int], texts: list[str], slots: asyncio.Semaphore, vectors: dict,
                    failures: list[Failure]) -> None:
        attempt = 0
        while True:
            async with slots:
                kind, *rest = await self._post([texts[i] for i in idx])
            if kind == "ok":
                reply = rest[0]
                if reply.identity.differs_from(self.pinned):
                    self.model_changed = reply.identity
                    msg = self._changed_message(reply.identity)
                    failures.extend((i, ErrorCode.MODEL_CHANGED, msg) for i in idx)
                    return
                for k, i in enumerate(idx):
                    vectors[i] = reply.vectors[k]
                self.stats["texts"] += len(idx)
                self.stats["cached"] += reply.cached
                return
            if kind == "split":
                status, detail = rest
                if len(idx) == 1:
                    code = classify_error(status, None, detail)
                    code = code if code in (ErrorCode.TOO_LONG, ErrorCode.INVALID_CHARACTERS) else ErrorCode.INVALID_INPUT
                    failures.append((idx[0], code, f"HTTP {status} from the embedding service: {detail}"))
                    return
                self.stats["bisections"] += 1  # the service refuses the request: find the texts it refuses
                mid = len(idx) // 2
                await asyncio.gather(self._send(idx[:mid], texts, slots, vectors, failures),
                                     self._send(idx[mid:], texts, slots, vectors, failures))
                return
            code, message, delay = rest
            attempt += 1
            if kind == "fail" or attempt >= self.policy.max_attempts:
                tail = f" (after {attempt} attempt(s))" if kind == "retry" else ""
                failures.extend((i, code, message + tail) for i in idx)
                return
            steps = self.policy.backoff_seconds or (0.0,)
            wait = delay if delay is not None else steps[min(attempt - 1, len(steps) - 1)]
            if wait > self.settings.max_retry_after_seconds:
                failures.extend((i, code, f"{message}; asked to retry after {wait:.0f} s, more than "
                                 f"max_retry_after_seconds={self.settings.max_retry_after_seconds:g}: left to "
                                 "reindex_retry") for i in idx)
                return
            self.stats["retries"] += 1
            log.info("embedding service: %s; attempt %d of %d in %.1f s (%d text(s))", message, attempt + 1,
                     self.policy.max_attempts, wait, len(idx))
            await self._sleep(wait)

    async def _post(self, batch: list[str]) -> tuple:
        """One request: ``("ok", Reply)``, ``("split", status, detail)``, ``("retry", code, message, delay)``,
        ``("fail", code, message, None)``; raises for 401/403 (auth) and 404 (wrong endpoint or model)."""
        import httpx

        client = await self._http()
        self.stats["requests"] += 1
        try:
            resp = await client.post(self.protocol.embed_path, json=self.protocol.body(batch, self.settings))
        except httpx.TimeoutException:
            return ("retry", ErrorCode.UNAVAILABLE, f"the embedding service did not answer within "
                    f"{self.settings.timeout_seconds:g} s", None)
        except httpx.TransportError as e:  # refused, reset, closed without an answer
            return ("retry", ErrorCode.UNAVAILABLE, f"connection to the embedding service failed: "
                    f"{type(e).__name__}: {e}".rstrip(": "), None)
        status = resp.status_code
        try:
            payload = resp.json()
        except ValueError:
            payload = None
        if status == 200:
            try:
                return ("ok", self.protocol.parse(payload, resp.headers, len(batch), self.pinned))
            except MalformedReply as e:
                return ("fail", ErrorCode.MALFORMED_OUTPUT, f"the embedding service's answer is malformed: {e}", None)
        detail = self.protocol.error_detail(payload) or resp.text[:300] or resp.reason_phrase
        self._refuse_auth(status, detail)
        if status == 404:
            raise ConfigError(f"embedding service {self.settings.url} answered 404 to {self.protocol.embed_path}: "
                              f"{detail}. Check the connection's protocol ({self.settings.protocol}) and model.")
        if status in (400, 413, 422):
            return ("split", status, detail)
        code = classify_error(status, None, detail)
        message = f"HTTP {status} from the embedding service: {detail}"
        if code in _IN_TASK_RETRIES:
            return ("retry", code, message, retry_after_seconds(resp.headers.get("retry-after")))
        return ("fail", code, message, None)

    def _refuse_auth(self, status: int, detail: str) -> None:
        if status in (401, 403):
            where = (f"as the password of Airflow connection {self.settings.conn_id!r}" if self.settings.conn_id
                     else "in REINDEX_SERVICE_API_KEY")
            what = "refused the API key" if status == 401 else "denied this API key the embedding endpoint"
            given = "a key was sent" if self.settings.api_key else "no key was sent"
            raise ServiceAuthError(
                f"embedding service {self.settings.url} {what} (HTTP {status}: {detail}; {given}). Set the right key "
                f"{where}. The run stops here: no chunk is marked failed, nothing is retried.")

    def _changed_message(self, now: Identity) -> str:
        was = self.pinned.describe() if self.pinned else "the batch's model"
        return (f"the embedding service now serves {now.describe()}, not {was} this batch was planned for: no "
                "vector of the other model is stored. Move the corpus to the new model with reindex_model_upgrade.")
