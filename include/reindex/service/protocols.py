"""The wire protocols of embedding services, as data: one class per protocol, chosen by name
(``PROTOCOLS[settings.protocol]``), never by ``if`` chains in the client.

* ``seed004`` — the FastAPI service this product's users run (contract in README "Embedding service"):
  ``POST /embed/batch`` ``{"items": [{"id", "text"}]}`` → ``{"results": [{"id", "embedding", "cached"}],
  "cached_count", "dimensions", "model_version", "model_checksum"}``; ``GET /model-info`` gives the model
  and the limits; the key goes in ``X-API-Key``.
* ``openai`` — ``POST /v1/embeddings`` ``{"input": [...], "model", "encoding_format", "dimensions"}`` →
  ``{"data": [{"index", "embedding"}], "model"}`` (Hugging Face TEI, vLLM, Infinity, Ollama, OpenAI); the
  key goes in ``Authorization: Bearer``. The model's identity is its name and dimension, plus the
  ``X-Model-Checksum`` response header where the server sends one.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import numpy as np

from reindex.errors import ConfigError


class MalformedReply(ValueError):
    """A 200 answer that does not follow the protocol (its chunks fail ``MALFORMED_OUTPUT``)."""


@dataclass(frozen=True)
class Identity:
    """The model that made an answer's vectors, as the service names it."""

    model_name: str | None
    checksum: str | None
    dim: int
    version: str | None = None

    def differs_from(self, pinned: Identity) -> bool:
        """Another model than ``pinned``: another dimension, or another checksum / name where both carry one."""
        if self.dim != pinned.dim:
            return True
        if self.checksum and pinned.checksum and self.checksum != pinned.checksum:
            return True
        return bool(self.model_name and pinned.model_name and self.model_name != pinned.model_name)

    def describe(self) -> str:
        parts = [self.model_name or "unnamed model", f"{self.dim}-d"]
        if self.checksum:
            parts.append(f"checksum {self.checksum}")
        return " ".join(parts[:1]) + f" ({', '.join(parts[1:])})"


@dataclass
class Reply:
    vectors: np.ndarray  # (n, dim) float32, in request order
    cached: int
    identity: Identity


@dataclass(frozen=True)
class Limits:
    """What the service accepts; None where it does not say."""

    max_batch_size: int | None = None
    max_text_length: int | None = None
    max_concurrent_requests: int | None = None


def _vectors(rows: list[Any], n: int) -> np.ndarray:
    if len(rows) != n:
        raise MalformedReply(f"{len(rows)} embedding(s) in the answer for {n} text(s)")
    try:
        out = np.asarray(rows, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise MalformedReply(f"embeddings are not lists of numbers of one length: {e}") from None
    if out.ndim != 2:
        raise MalformedReply(f"embeddings have shape {out.shape}, not (texts, dimension)")
    return out


class Seed004:
    name = "seed004"
    embed_path = "/embed/batch"
    info_path = "/model-info"

    def headers(self, api_key: str | None) -> dict[str, str]:
        return {"X-API-Key": api_key} if api_key else {}

    def body(self, texts: list[str], settings) -> dict:
        return {"items": [{"id": str(i), "text": t} for i, t in enumerate(texts)]}

    def parse(self, payload: Any, headers: Any, n: int, pinned: Identity | None) -> Reply:
        if not isinstance(payload, dict) or not isinstance(payload.get("results"), list):
            raise MalformedReply("the answer has no 'results' list")
        results = payload["results"]
        try:
            results = sorted(results, key=lambda r: int(r["id"]))  # ids are the request positions
            rows = [r["embedding"] for r in results]
        except (KeyError, TypeError, ValueError) as e:
            raise MalformedReply(f"a result has no usable 'id'/'embedding' ({e})") from None
        vectors = _vectors(rows, n)
        cached = payload.get("cached_count")
        if not isinstance(cached, int):
            cached = sum(1 for r in results if r.get("cached") is True)
        dim = payload.get("dimensions") if isinstance(payload.get("dimensions"), int) else vectors.shape[1]
        checksum = payload.get("model_checksum")
        # The batch answer names no model: the name is the pinned one while the checksum is the same.
        name = pinned.model_name if pinned and checksum == pinned.checksum else None
        return Reply(vectors, cached, Identity(name, checksum, int(dim), payload.get("model_version")))

    def error_detail(self, payload: Any) -> str | None:
        if isinstance(payload, dict):
            detail = payload.get("detail")
            if isinstance(detail, list):  # FastAPI's own validation answer
                return "; ".join(str(d.get("msg", d)) if isinstance(d, dict) else str(d) for d in detail)
            return str(detail) if detail is not None else None
        return None

    async def identify(self, client, settings) -> tuple[Identity | None, Limits, Any, Any]:
        """``(identity, limits, response, payload)``; identity None when the service refused (see response)."""
        resp = await client.get(self.info_path)
        payload = _json_or_none(resp)
        if resp.status_code != 200 or not isinstance(payload, dict):
            return None, Limits(), resp, payload
        try:
            ident = Identity(str(payload["model_name"]), payload.get("model_checksum"), int(payload["dimensions"]),
                             payload.get("model_version"))
        except (KeyError, TypeError, ValueError):
            raise MalformedReply(f"{self.info_path} lacks model_name/dimensions: {str(payload)[:200]}") from None
        if settings.model and ident.model_name != settings.model:
            raise ConfigError(f"the embedding service at {settings.url} serves {ident.describe()}, not the model "
                              f"{settings.model!r} the connection asks for")
        limits = Limits(*(payload.get(k) if isinstance(payload.get(k), int) else None
                          for k in ("max_batch_size", "max_text_length", "max_concurrent_requests")))
        return ident, limits, resp, payload


class OpenAI:
    name = "openai"
    embed_path = "/v1/embeddings"
    probe_text = "model identity probe"

    def headers(self, api_key: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def body(self, texts: list[str], settings) -> dict:
        body: dict[str, Any] = {"input": texts, "model": settings.model, "encoding_format": settings.encoding_format}
        if settings.dimensions:
            body["dimensions"] = settings.dimensions
        return body

    def parse(self, payload: Any, headers: Any, n: int, pinned: Identity | None) -> Reply:
        if not isinstance(payload, dict) or not isinstance(payload.get("data"), list):
            raise MalformedReply("the answer has no 'data' list")
        rows = []
        try:
            for item in sorted(payload["data"], key=lambda d: int(d.get("index", 0))):
                emb = item["embedding"]
                if isinstance(emb, str):  # encoding_format=base64: little-endian float32 bytes
                    emb = np.frombuffer(base64.b64decode(emb), dtype="<f4")
                rows.append(emb)
        except (KeyError, TypeError, ValueError) as e:
            raise MalformedReply(f"an item of 'data' has no usable 'embedding' ({e})") from None
        vectors = _vectors(rows, n)
        checksum = headers.get("x-model-checksum") if headers is not None else None
        return Reply(vectors, 0, Identity(payload.get("model"), checksum, vectors.shape[1]))

    def error_detail(self, payload: Any) -> str | None:
        if isinstance(payload, dict):
            err = payload.get("error")
            if isinstance(err, dict):
                return str(err.get("message") or err)
            if err is not None:
                return str(err)
            if payload.get("detail") is not None:
                return str(payload["detail"])
        return None

    async def identify(self, client, settings) -> tuple[Identity | None, Limits, Any, Any]:
        """``(identity, limits, response, payload)``; identity None when the service refused (see response)."""
        if not settings.model:
            raise ConfigError(f"embedding service {settings.url} speaks the openai protocol, which needs a model "
                              "name: set \"model\" in the connection's extra")
        resp = await client.post(self.embed_path, json=self.body([self.probe_text], settings))
        payload = _json_or_none(resp)
        if resp.status_code != 200:
            return None, Limits(), resp, payload
        reply = self.parse(payload, resp.headers, 1, None)
        ident = Identity(reply.identity.model_name or settings.model, reply.identity.checksum, reply.identity.dim)
        return ident, Limits(), resp, payload


def _json_or_none(resp) -> Any:
    try:
        return resp.json()
    except ValueError:
        return None


PROTOCOLS: dict[str, Seed004 | OpenAI] = {p.name: p for p in (Seed004(), OpenAI())}
