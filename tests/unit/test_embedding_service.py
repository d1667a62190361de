"""The offline reference embedding service (``reindex.emulators.embedding_service``), over HTTP.

Every test starts its own service (hash embedder, a free port) and talks to it with httpx, so what
is checked is the wire contract the ``backend="service"`` client is written against.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from reindex.emulators.embedding_service import EmbeddingService, Faults, ServiceConfig
from reindex.emulators.embedding_service.config import parse_rate_limit
from reindex.emulators.embedding_service.embedders import HashServiceEmbedder
from reindex.emulators.vertex.embedders import HashEmbedder

HASH_MODEL = "reference-hash-384"
KEY = "test-key-0123456789"


def checksum(name: str, dim: int) -> str:
    return hashlib.md5(f"{name}:{dim}".encode()).hexdigest()[:12]


def hash_vector(text: str, salt: str, dim: int = 384) -> np.ndarray:
    return HashEmbedder().embed([text], [salt], dim)[0]


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met within the timeout")
        time.sleep(0.01)


@pytest.fixture
def start():
    """``start(**config) -> EmbeddingService`` with the hash embedder; all stopped at the end."""
    services: list[EmbeddingService] = []

    def _start(*, custom_embedder=None, **config) -> EmbeddingService:
        config.setdefault("embedder", "hash")
        svc = EmbeddingService(ServiceConfig(**config), embedder=custom_embedder).start()
        services.append(svc)
        return svc

    yield _start
    for svc in services:
        svc.stop()


@pytest.fixture
def svc(start) -> EmbeddingService:
    return start()


@pytest.fixture
def client(svc):
    with httpx.Client(base_url=svc.url, timeout=10) as c:
        yield c


def items(*texts: str) -> dict:
    return {"items": [{"id": f"c{i}", "text": t} for i, t in enumerate(texts)]}


# --- protocol seed004 ---------------------------------------------------------------------------------

def test_embed_returns_the_exact_fields(client):
    r = client.post("/embed", json={"text": "hello world"})
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"embedding", "dimensions", "cached", "model_version", "model_checksum"}
    cs = checksum(HASH_MODEL, 384)
    assert (body["dimensions"], body["cached"], body["model_version"], body["model_checksum"]) == (
        384, False, "2.2.0", cs)
    assert r.headers["X-Model-Checksum"] == cs
    vec = np.array(body["embedding"], dtype=np.float32)
    assert vec.shape == (384,)
    np.testing.assert_array_equal(vec, hash_vector("hello world", cs))  # salted by the model checksum
    assert abs(float(np.linalg.norm(vec)) - 1.0) < 1e-5
    again = client.post("/embed", json={"text": "hello world"}).json()
    assert again["cached"] is True and again["embedding"] == body["embedding"]


def test_embed_batch_in_request_order_with_cache_flags(svc, client):
    r = client.post("/embed/batch", json=items("alpha", "beta", "gamma"))
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"results", "total", "successful", "cached_count", "dimensions", "model_version",
                         "model_checksum"}
    assert [x["id"] for x in body["results"]] == ["c0", "c1", "c2"]
    assert [set(x) for x in body["results"]] == [{"id", "embedding", "cached"}] * 3
    assert (body["total"], body["successful"], body["cached_count"], body["dimensions"]) == (3, 3, 0, 384)
    assert body["model_checksum"] == checksum(HASH_MODEL, 384) and body["model_version"] == "2.2.0"
    single = client.post("/embed", json={"text": "beta"}).json()
    assert single["cached"] is True and single["embedding"] == body["results"][1]["embedding"]

    second = client.post("/embed/batch", json=items("gamma", "delta", "alpha")).json()
    assert [x["cached"] for x in second["results"]] == [True, False, True]
    assert second["cached_count"] == 2
    assert second["results"][0]["embedding"] == body["results"][2]["embedding"]
    stats = svc.stats()
    assert (stats["cache_hits"], stats["cache_misses"], stats["texts_encoded"]) == (3, 4, 4)
    assert stats["batch_sizes"] == {"3": 2}
    assert stats["requests"]["/embed/batch"] == {"200": 2}
    assert client.get("/cache/stats").json() == {"enabled": True, "size": 4, "max_size": 10000,
                                                 "ttl_seconds": 3600.0, "hits": 3, "misses": 4,
                                                 "hit_rate": round(3 / 7, 4)}
    assert client.post("/cache/clear").json() == {"cleared": 4}
    assert client.post("/embed", json={"text": "alpha"}).json()["cached"] is False


def test_duplicates_in_one_batch_are_encoded_once(svc, client):
    body = client.post("/embed/batch", json=items("same", "same", "other")).json()
    assert [x["cached"] for x in body["results"]] == [False, False, False]
    assert body["results"][0]["embedding"] == body["results"][1]["embedding"]
    assert svc.stats()["texts_encoded"] == 2


def test_cache_can_be_disabled(start):
    svc = start(cache_enabled=False)
    for _ in range(2):
        assert httpx.post(svc.url + "/embed", json={"text": "x"}).json()["cached"] is False


def test_validation_errors_are_400_and_name_the_item(client):
    texts = ["ok"] * 3 + ["x" * 10001]
    r = client.post("/embed/batch", json=items(*texts))
    assert r.status_code == 400
    assert r.json() == {"detail": "items[3].text: text has 10001 characters, more than MAX_TEXT_LENGTH=10000"}
    r = client.post("/embed/batch", json=items(*["t"] * 129))
    assert (r.status_code, r.json()) == (400, {"detail": "items: 129 items, more than MAX_BATCH_SIZE=128"})
    r = client.post("/embed/batch", json=items("", "fine"))
    assert (r.status_code, r.json()) == (400, {"detail": "items[0].text: empty text"})
    r = client.post("/embed/batch", json={"items": []})
    assert (r.status_code, r.json()) == (400, {"detail": "items: no items (send 1 to MAX_BATCH_SIZE=128)"})
    r = client.post("/embed/batch", json={"items": [{"id": "a", "text": 5}]})
    assert (r.status_code, r.json()) == (400, {"detail": "items[0].text: must be a string"})
    r = client.post("/embed/batch", json={"items": [{"id": "a"}]})
    assert (r.status_code, r.json()) == (400, {"detail": "items[0].text: field required"})
    r = client.post("/embed/batch", content=b'{"items": [', headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["detail"].startswith("invalid JSON")
    r = client.post("/embed/batch", content=b'{"items": [{"id": "a", "text": "x\\ud800"}]}',
                    headers={"content-type": "application/json"})
    assert r.json() == {"detail": "items[0].text: not valid Unicode (lone surrogate at character 1)"}
    r = client.post("/embed", json={"text": "y" * 10001})
    assert (r.status_code, r.json()) == (400, {"detail": "text: text has 10001 characters, more than "
                                                         "MAX_TEXT_LENGTH=10000"})
    assert client.post("/embed/batch", json=items(*["t"] * 128)).status_code == 200  # the limit itself is fine


def test_limits_come_from_the_config(start):
    svc = start(max_batch_size=2, max_text_length=5)
    r = httpx.post(svc.url + "/embed/batch", json=items("a", "b", "c"))
    assert r.json() == {"detail": "items: 3 items, more than MAX_BATCH_SIZE=2"}
    r = httpx.post(svc.url + "/embed/batch", json=items("abcdef"))
    assert r.json() == {"detail": "items[0].text: text has 6 characters, more than MAX_TEXT_LENGTH=5"}
    info = httpx.get(svc.url + "/model-info").json()
    assert (info["max_batch_size"], info["max_text_length"]) == (2, 5)


def test_model_info_health_metrics_are_open(start):
    svc = start(api_key=KEY)
    info = httpx.get(svc.url + "/model-info")
    assert info.status_code == 200
    body = info.json()
    load = body.pop("load_time_seconds")
    assert isinstance(load, float) and load >= 0
    assert body == {"model_name": HASH_MODEL, "model_version": "2.2.0", "model_checksum": checksum(HASH_MODEL, 384),
                    "dimensions": 384, "normalize_embeddings": True, "max_batch_size": 128,
                    "max_text_length": 10000, "max_concurrent_requests": 6, "encode_timeout_seconds": 30.0,
                    "embedder": "hash"}
    assert httpx.get(svc.url + "/health").json() == {"status": "ok", "model_loaded": True}
    httpx.post(svc.url + "/embed", json={"text": "a"}, headers={"X-API-Key": KEY})
    httpx.post(svc.url + "/embed", json={"text": "a"}, headers={"X-API-Key": KEY})
    metrics = httpx.get(svc.url + "/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    lines = set(metrics.text.splitlines())
    assert {'embedding_requests_total{endpoint="/embed",status="200"} 2', "embedding_cache_hits_total 1",
            "embedding_cache_misses_total 1", "embedding_active_requests 0", "embedding_model_loaded 1",
            'embedding_encode_failures_total{reason="timeout"} 0'} <= lines


# --- authentication -----------------------------------------------------------------------------------

def test_api_key_on_both_protocols(start):
    svc = start(api_key=KEY)
    url = svc.url
    openai_body = {"input": ["a"], "model": HASH_MODEL}
    for headers in ({}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.post(url + "/embed", json={"text": "a"}, headers=headers)
        assert (r.status_code, r.json()) == (401, {"detail": "Invalid or missing API key"}), headers
        r = httpx.post(url + "/embed/batch", json=items("a"), headers=headers)
        assert r.status_code == 401
        r = httpx.post(url + "/v1/embeddings", json=openai_body, headers=headers)
        assert r.status_code == 401
        assert r.json() == {"error": {"message": "Invalid or missing API key", "type": "authentication_error",
                                      "code": "invalid_api_key"}}
    for headers in ({"X-API-Key": KEY}, {"Authorization": f"Bearer {KEY}"}):
        assert httpx.post(url + "/embed", json={"text": "a"}, headers=headers).status_code == 200
        assert httpx.post(url + "/embed/batch", json=items("a"), headers=headers).status_code == 200
        assert httpx.post(url + "/v1/embeddings", json=openai_body, headers=headers).status_code == 200
        assert httpx.get(url + "/v1/models", headers=headers).status_code == 200
    assert httpx.get(url + "/v1/models").status_code == 401
    assert httpx.get(url + "/cache/stats").status_code == 401


# --- protocol openai ----------------------------------------------------------------------------------

def test_openai_embeddings_shape_float_and_base64(client):
    body = {"input": ["one", "two"], "model": HASH_MODEL}
    r = client.post("/v1/embeddings", json=body)
    assert r.status_code == 200
    out = r.json()
    assert set(out) == {"object", "data", "model", "usage"}
    assert (out["object"], out["model"]) == ("list", HASH_MODEL)
    assert [(d["object"], d["index"]) for d in out["data"]] == [("embedding", 0), ("embedding", 1)]
    assert out["usage"] == {"prompt_tokens": 2, "total_tokens": 2}
    assert r.headers["X-Model-Checksum"] == checksum(HASH_MODEL, 384)
    floats = np.array([d["embedding"] for d in out["data"]], dtype=np.float32)
    np.testing.assert_array_equal(floats[0], hash_vector("one", checksum(HASH_MODEL, 384)))

    b64 = client.post("/v1/embeddings", json={**body, "encoding_format": "base64"}).json()
    decoded = np.array([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in b64["data"]])
    np.testing.assert_array_equal(decoded, floats)

    single = client.post("/v1/embeddings", json={"input": "one", "model": HASH_MODEL}).json()
    assert len(single["data"]) == 1 and single["data"][0]["embedding"] == out["data"][0]["embedding"]
    # the same vectors as protocol seed004
    assert client.post("/embed", json={"text": "two"}).json()["embedding"] == out["data"][1]["embedding"]
    assert client.get("/v1/models").json() == {"object": "list", "data": [
        {"id": HASH_MODEL, "object": "model", "owned_by": "reference"}]}


def test_openai_dimensions_truncate_and_renormalise(client):
    full = np.array(client.post("/v1/embeddings", json={"input": "text", "model": HASH_MODEL})
                    .json()["data"][0]["embedding"], dtype=np.float32)
    r = client.post("/v1/embeddings", json={"input": "text", "model": HASH_MODEL, "dimensions": 64})
    short = np.array(r.json()["data"][0]["embedding"], dtype=np.float32)
    assert short.shape == (64,)
    np.testing.assert_allclose(short, full[:64] / np.linalg.norm(full[:64]), rtol=1e-6)
    assert abs(float(np.linalg.norm(short)) - 1.0) < 1e-5
    r = client.post("/v1/embeddings", json={"input": "text", "model": HASH_MODEL, "dimensions": 385})
    assert r.status_code == 400
    assert r.json()["error"] == {"message": "dimensions: 385 is out of range: this model serves 1..384",
                                 "type": "invalid_request_error", "code": None}


def test_openai_errors(client):
    r = client.post("/v1/embeddings", json={"input": ["a"], "model": "other-model"})
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "model_not_found" and r.json()["error"]["type"] == "invalid_request_error"
    r = client.post("/v1/embeddings", json={"input": ["ok", "z" * 10001], "model": HASH_MODEL})
    assert r.status_code == 400
    assert r.json()["error"]["message"] == "input[1]: text has 10001 characters, more than MAX_TEXT_LENGTH=10000"
    r = client.post("/v1/embeddings", json={"input": ["t"] * 129, "model": HASH_MODEL})
    assert r.json()["error"]["message"] == "input: 129 items, more than MAX_BATCH_SIZE=128"
    r = client.post("/v1/embeddings", json={"input": [[1, 2, 3]], "model": HASH_MODEL})
    assert r.json()["error"]["message"] == "input: token arrays are not supported; send strings"
    r = client.post("/v1/embeddings", json={"input": "a", "model": HASH_MODEL, "encoding_format": "int8"})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("encoding_format:")
    r = client.post("/v1/embeddings", json={"input": "a"})
    assert (r.status_code, r.json()["error"]["message"]) == (400, "model: field required")


# --- rate limits and injected faults --------------------------------------------------------------------

def test_rate_limit_sliding_window_per_endpoint_class(start):
    svc = start(rate_limit_batch="2/minute")
    url = svc.url
    assert [httpx.post(url + "/embed/batch", json=items("a")).status_code for _ in range(2)] == [200, 200]
    r = httpx.post(url + "/embed/batch", json=items("a"))
    assert (r.status_code, r.json()) == (429, {"detail": "Rate limit exceeded: 2 per 1 minute"})
    assert 1 <= int(r.headers["Retry-After"]) <= 60
    r = httpx.post(url + "/v1/embeddings", json={"input": "a", "model": HASH_MODEL})  # same class
    assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error" and "Retry-After" in r.headers
    assert httpx.post(url + "/embed", json={"text": "a"}).status_code == 200  # single: no limit set


def test_injected_429_with_and_without_retry_after(svc, client):
    svc.set_faults(status_429=2, retry_after=7)
    for _ in range(2):
        r = client.post("/embed/batch", json=items("a"))
        assert (r.status_code, r.headers["Retry-After"]) == (429, "7")
        assert r.json() == {"detail": "Rate limit exceeded: 20 per 1 minute"}
    assert client.post("/embed/batch", json=items("a")).status_code == 200
    svc.set_faults(status_429=1)
    r = client.post("/v1/embeddings", json={"input": "a", "model": HASH_MODEL})
    assert r.status_code == 429 and "Retry-After" not in r.headers
    assert r.json()["error"]["type"] == "rate_limit_error"
    assert client.post("/v1/embeddings", json={"input": "a", "model": HASH_MODEL}).status_code == 200
    stats = svc.stats()
    assert stats["faults"]["status_429"] == 3  # set_faults keeps the served counts; reset() zeroes them
    assert stats["requests"]["/embed/batch"] == {"429": 2, "200": 1}


def test_injected_503_and_forbidden(svc, client):
    svc.set_faults(status_503=1)
    r = client.post("/embed", json={"text": "a"})
    assert (r.status_code, r.json()) == (503, {"detail": "Encoding timeout after 30s"})
    assert client.post("/embed", json={"text": "a"}).status_code == 200
    svc.set_faults(forbidden=True)
    for _ in range(2):
        r = client.post("/embed", json={"text": "a"})
        assert (r.status_code, r.json()) == (403, {"detail": "API key lacks permission"})
    r = client.post("/v1/embeddings", json={"input": "a", "model": HASH_MODEL})
    assert r.status_code == 403 and r.json()["error"]["message"] == "API key lacks permission"
    assert client.get("/health").status_code == 200  # only embedding endpoints get faults
    svc.set_faults()
    assert client.post("/embed", json={"text": "a"}).status_code == 200


def test_real_encode_timeout_is_503(start):
    svc = start(encode_timeout_seconds=0.2, encode_delay_seconds=1.0)
    r = httpx.post(svc.url + "/embed", json={"text": "a"})
    assert (r.status_code, r.json()) == (503, {"detail": "Encoding timeout after 0.2s"})
    assert svc.stats()["encode_failures"]["timeout"] == 1


def test_dropped_connection_is_seen_by_httpx(svc, client):
    svc.set_faults(drop_connections=2)
    for path, body in (("/embed/batch", items("a")), ("/v1/embeddings", {"input": "a", "model": HASH_MODEL})):
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
            client.post(path, json=body)
    assert client.post("/embed/batch", json=items("a")).status_code == 200
    stats = svc.stats()
    assert stats["requests"]["/embed/batch"] == {"dropped": 1, "200": 1}
    assert stats["faults"]["drop_connections"] == 2


def test_slow_response_times_out_a_shorter_client_timeout(svc):
    svc.set_faults(slow_seconds=1.5, slow_count=1)
    with httpx.Client(base_url=svc.url, timeout=0.5) as c:
        with pytest.raises(httpx.ReadTimeout):
            c.post("/embed", json={"text": "a"})
        assert c.post("/embed", json={"text": "b"}).status_code == 200  # the budget was one request
    assert svc.stats()["faults"]["slow"] == 1


def test_invalid_marker_fails_the_request_naming_the_item(svc, client):
    svc.set_faults(invalid_marker="<<BAD>>")
    r = client.post("/embed/batch", json=items("fine", "also <<BAD>> here", "fine too"))
    assert (r.status_code, r.json()) == (400, {"detail": "items[1].text: rejected by the model: contains <<BAD>>"})
    r = client.post("/v1/embeddings", json={"input": ["<<BAD>>", "x"], "model": HASH_MODEL})
    assert r.status_code == 400
    assert r.json()["error"]["message"] == "input[0]: rejected by the model: contains <<BAD>>"
    assert client.post("/embed/batch", json=items("fine")).status_code == 200
    assert svc.stats()["faults"]["invalid_marker"] == 2


def test_model_change_after_n_successful_requests(svc, client):
    old_cs, new_cs = checksum(HASH_MODEL, 384), checksum(HASH_MODEL + "-v2", 256)
    svc.set_faults(model_change_after=2, new_dim=256)
    first = [client.post("/embed", json={"text": "same"}).json() for _ in range(2)]
    assert [b["model_checksum"] for b in first] == [old_cs, old_cs]
    client.post("/embed/batch", json=items(""))  # a failed request does not count
    after = client.post("/embed", json={"text": "same"}).json()
    assert (after["model_checksum"], after["dimensions"], after["cached"]) == (new_cs, 256, False)
    np.testing.assert_array_equal(np.array(after["embedding"], dtype=np.float32), hash_vector("same", new_cs, 256))
    batch = client.post("/embed/batch", json=items("same")).json()
    assert (batch["model_checksum"], batch["dimensions"], len(batch["results"][0]["embedding"])) == (new_cs, 256, 256)
    info = client.get("/model-info").json()
    assert (info["model_name"], info["model_checksum"], info["dimensions"]) == (HASH_MODEL + "-v2", new_cs, 256)
    r = client.post("/v1/embeddings", json={"input": "same", "model": HASH_MODEL})
    assert r.status_code == 404  # the old name is gone
    r = client.post("/v1/embeddings", json={"input": "same", "model": HASH_MODEL + "-v2"})
    assert r.headers["X-Model-Checksum"] == new_cs and len(r.json()["data"][0]["embedding"]) == 256
    assert svc.stats()["model"]["changed"] is True and svc.stats()["faults"]["model_change"] == 1
    svc.set_faults(accept_old_model_name=True)  # the old name as an alias of the model serving now
    r = client.post("/v1/embeddings", json={"input": "same", "model": HASH_MODEL})
    assert (r.status_code, r.headers["X-Model-Checksum"], r.json()["model"]) == (200, new_cs, HASH_MODEL + "-v2")
    assert client.post("/v1/embeddings", json={"input": "same", "model": "never-served"}).status_code == 404

    svc.reset()  # back to the start-up model; the fault is re-armed
    assert client.get("/model-info").json()["model_checksum"] == old_cs
    assert svc.stats()["requests"] == {"/model-info": {"200": 1}}


def test_max_in_flight_never_exceeds_the_concurrency_limit(start):
    class GatedEmbedder(HashServiceEmbedder):
        """Encodes only once the gate opens, so every request is in flight or queued when we look."""

        def __init__(self) -> None:
            super().__init__(384)
            self.gate = threading.Event()

        def embed(self, texts, salt, dim):
            self.gate.wait(20)
            return super().embed(texts, salt, dim)

    gated = GatedEmbedder()
    svc = start(max_concurrent_requests=3, custom_embedder=gated)
    try:
        with ThreadPoolExecutor(20) as pool:
            futures = [pool.submit(httpx.post, svc.url + "/embed", json={"text": f"text {i}"}, timeout=30)
                       for i in range(20)]
            wait_until(lambda: (svc.stats()["in_flight"], svc.stats()["waiting"]) == (3, 17))
            assert httpx.get(svc.url + "/metrics").text.count("embedding_active_requests 3") == 1
            gated.gate.set()
            statuses = [f.result().status_code for f in futures]
    finally:
        gated.gate.set()
    assert statuses == [200] * 20
    stats = svc.stats()
    assert (stats["max_in_flight"], stats["max_waiting"], stats["in_flight"], stats["texts_encoded"]) == (3, 17, 0, 20)


# --- admin API ------------------------------------------------------------------------------------------

def test_admin_http_api(svc, client):
    r = client.post("/admin/faults", json={"status_503": 1, "typo": 1})
    assert r.status_code == 400 and "unknown field(s) typo" in r.json()["detail"]
    r = client.post("/admin/faults", json={"status_429": -1})
    assert r.status_code == 400 and "status_429 must be an integer >= 0" in r.json()["detail"]
    r = client.post("/admin/faults", json={"status_503": 1})
    assert r.status_code == 200 and r.json()["remaining"]["status_503"] == 1
    assert client.post("/embed", json={"text": "a"}).status_code == 503
    assert client.get("/admin/faults").json()["remaining"]["status_503"] == 0
    stats = client.get("/admin/stats").json()
    assert stats["requests"]["/embed"] == {"503": 1} and stats["faults"]["status_503"] == 1
    assert client.post("/admin/reset").json() == {"reset": True}
    stats = client.get("/admin/stats").json()
    assert stats["faults"]["status_503"] == 0 and stats["faults_remaining"]["status_503"] == 1  # re-armed
    assert stats["requests"] == {"/admin/reset": {"200": 1}}  # counted as it answered, after the reset
    assert client.post("/embed", json={"text": "a"}).status_code == 503


# --- configuration and the command line ----------------------------------------------------------------

def test_config_validation_and_env():
    with pytest.raises(ValueError, match="embedder must be one of model, hash, noop"):
        ServiceConfig(embedder="bert")
    with pytest.raises(ValueError, match="rate_limit_batch: rate limit 'lots'"):
        ServiceConfig(rate_limit_batch="lots")
    with pytest.raises(ValueError, match="faults: unknown field"):
        Faults.from_mapping({"status_430": 1})
    assert parse_rate_limit("20/minute").describe() == "20 per 1 minute"
    assert parse_rate_limit("10 per 5 seconds").window_seconds == 5.0
    cfg = ServiceConfig.from_env({"REINDEX_SERVICE_API_KEY": "s3cret-key", "REINDEX_SERVICE_EMBEDDER": "noop",
                                  "REINDEX_SERVICE_MAX_BATCH_SIZE": "16",
                                  "REINDEX_SERVICE_FAULTS": '{"status_503": 2}'})
    assert (cfg.api_key, cfg.embedder, cfg.max_batch_size, cfg.faults.status_503) == ("s3cret-key", "noop", 16, 2)
    assert "s3cret-key" not in repr(cfg) and cfg.describe()["api_key"] == "set"
    with pytest.raises(ValueError, match="REINDEX_SERVICE_DIM"):
        ServiceConfig.from_env({"REINDEX_SERVICE_DIM": "many"})


def test_noop_embedder_answers_one_constant_unit_vector(start):
    svc = start(embedder="noop", dim=8)
    body = httpx.post(svc.url + "/embed/batch", json=items("a", "b")).json()
    assert body["dimensions"] == 8
    assert [r["embedding"] for r in body["results"]] == [[pytest.approx(8 ** -0.5)] * 8] * 2


def test_cli_runs_as_a_subprocess_until_sigterm():
    env = {k: v for k, v in os.environ.items() if not k.startswith("REINDEX_SERVICE_")}
    env.update(REINDEX_SERVICE_API_KEY=KEY, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "reindex.emulators.embedding_service", "--port", "0",
                             "--embedder", "hash", "--seed-limits", "--faults", json.dumps({"status_503": 1}),
                             "--log-level", "WARNING"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()  # the service prints it once it listens (or exits: empty line)
        m = re.fullmatch(r"embedding service listening on (http://127\.0\.0\.1:(\d+))\n", line)
        assert m, (line, proc.poll())
        url = m.group(1)
        assert httpx.get(url + "/health").json() == {"status": "ok", "model_loaded": True}
        headers = {"X-API-Key": KEY}
        # --faults: injected faults come before authentication, as a proxy in front of the service would
        assert httpx.post(url + "/embed", json={"text": "a"}).status_code == 503
        assert httpx.post(url + "/embed", json={"text": "a"}).status_code == 401  # key from the environment
        assert httpx.post(url + "/embed", json={"text": "a"}, headers=headers).status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        assert KEY not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
