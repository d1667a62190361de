"""The embedding-service client (``reindex.service``) against the reference service (test-only hash embedder):
settings validation, the retry table per request, bisection, model pinning, auth, limits."""

from __future__ import annotations

import numpy as np
import pytest

from reindex.errors import ConfigError, ErrorCode, ServiceAuthError
from reindex.retry import RetryPolicy
from reindex.service.client import ServiceEncoder, retry_after_seconds
from reindex.service.settings import ServiceSettings

KEY = "unit-key-9c1e"
FAST = RetryPolicy(backoff_seconds=(0.01, 0.02, 0.04))


@pytest.fixture(scope="module")
def service():
    from reindex.emulators.embedding_service import EmbeddingService, ServiceConfig

    svc = EmbeddingService(ServiceConfig(embedder="hash", api_key=KEY)).start()
    yield svc
    svc.stop()


@pytest.fixture
def svc(service):
    service.set_faults()
    service.reset()
    return service


def _encoder(svc, *, waits: list | None = None, **kw) -> ServiceEncoder:
    settings = ServiceSettings(url=svc.url, api_key=kw.pop("api_key", KEY), **kw)
    enc = ServiceEncoder(settings, policy=FAST)
    if waits is not None:
        async def record(seconds):
            waits.append(seconds)

        enc._sleep = record
    return enc


def test_settings_refuse_unknown_keys_and_bad_values_by_name():
    with pytest.raises(ConfigError, match=r"unknown extra key\(s\) 'concurency' \(did you mean 'concurrency'\?\)"):
        ServiceSettings.from_values("http://h:1", extra={"concurency": 4}, conn_id="emb")
    with pytest.raises(ConfigError, match=r"base URL 'h:1' must start with http:// or https://"):
        ServiceSettings(url="h:1")
    with pytest.raises(ConfigError, match=r"protocol 'grpc' is not supported: choose one of \['openai', 'seed004'\]"):
        ServiceSettings(url="http://h", protocol="grpc")
    with pytest.raises(ConfigError, match=r"concurrency=0 is out of range: must be an integer between 1 and 64"):
        ServiceSettings(url="http://h", concurrency=0)
    s = ServiceSettings(url="http://h/", api_key="s3cret")
    assert "s3cret" not in repr(s) and "s3cret" not in str(s.describe()) and s.url == "http://h"


def test_retry_after_in_seconds_or_as_a_date():
    assert retry_after_seconds("7") == 7.0
    assert retry_after_seconds("Wed, 01 Jan 2031 00:00:10 GMT", now=1924992000.0) == 10.0
    assert retry_after_seconds("soon") is None and retry_after_seconds(None) is None


def test_limits_come_from_model_info_and_long_texts_are_not_sent(svc):
    with _encoder(svc) as enc:
        assert (enc.max_batch_size, enc.max_text_length) == (128, 10_000)
        texts = [f"t{i}" for i in range(300)] + ["x" * 10_001]
        ok, parts, failures = enc.encode_block(texts)
        assert ok == list(range(300)) and parts[0].shape == (300, 384)
        assert failures == [(300, ErrorCode.TOO_LONG, "text has 10,001 characters, more than the embedding "
                             "service's max_text_length=10,000; not sent")]
        assert enc.stats["requests"] == 3  # 128 + 128 + 44
        assert np.allclose(np.linalg.norm(parts[0], axis=1), 1.0, atol=1e-5)


def test_429_honours_retry_after_else_the_backoff(svc):
    waits: list[float] = []
    with _encoder(svc, waits=waits) as enc:
        svc.set_faults(status_429=1, retry_after=3)
        assert enc.encode_block(["a", "b"])[2] == []
        svc.set_faults(status_429=2)
        assert enc.encode_block(["c"])[2] == []
    assert waits == [3.0, 0.01, 0.02]


def test_a_storm_past_the_attempts_fails_the_texts_retriable(svc):
    with _encoder(svc, waits=[]) as enc:
        svc.set_faults(status_503=3)
        ok, _, failures = enc.encode_block(["a", "b"])
    assert ok == [] and [f[:2] for f in failures] == [(0, ErrorCode.UNAVAILABLE), (1, ErrorCode.UNAVAILABLE)]
    assert failures[0][2] == "HTTP 503 from the embedding service: Encoding timeout after 30s (after 3 attempt(s))"


def test_a_retry_after_beyond_the_cap_is_left_to_reindex_retry(svc):
    waits: list[float] = []
    with _encoder(svc, waits=waits, max_retry_after_seconds=60) as enc:
        svc.set_faults(status_429=1, retry_after=600)
        _, _, failures = enc.encode_block(["a"])
    assert waits == [] and failures[0][1] == ErrorCode.RATE_LIMITED
    assert "asked to retry after 600 s, more than max_retry_after_seconds=60" in failures[0][2]


def test_bisection_isolates_the_refused_texts(svc):
    svc.set_faults(invalid_marker="BAD")
    texts = [f"text {i}" + (" BAD" if i in (5, 77, 100) else "") for i in range(128)]
    with _encoder(svc) as enc:
        ok, parts, failures = enc.encode_block(texts)
    assert [f[0] for f in failures] == [5, 77, 100] and len(ok) == 125 and parts[0].shape == (125, 384)
    assert {f[1] for f in failures} == {ErrorCode.INVALID_INPUT}
    assert all("contains BAD" in f[2] for f in failures)


def test_a_wrong_key_raises_without_the_key_in_the_message(svc):
    with _encoder(svc, api_key="wrong-key-55") as enc, pytest.raises(ServiceAuthError) as info:
        enc.encode_block(["a"])
    assert "refused the API key (HTTP 401" in str(info.value) and "wrong-key-55" not in str(info.value)
    assert "no chunk is marked failed" in str(info.value)


@pytest.mark.parametrize("protocol", ["seed004", "openai"])
def test_another_model_mid_block_fails_model_changed_and_keeps_no_vector(svc, protocol):
    extra = {"model": "reference-hash-384"} if protocol == "openai" else {}
    with _encoder(svc, protocol=protocol, max_batch_size=10, concurrency=1, **extra) as enc:
        enc.pin(enc.spec.checksum, "vector")
        svc.set_faults(model_change_after=2, accept_old_model_name=True)
        ok, parts, failures = enc.encode_block([f"t{i}" for i in range(40)])
    assert ok == list(range(20)) and parts[0].shape == (20, 384)
    assert [f[0] for f in failures] == list(range(20, 40)) and {f[1] for f in failures} == {ErrorCode.MODEL_CHANGED}
    assert "reindex_model_upgrade" in failures[0][2]


def test_a_service_already_on_another_model_fails_every_text_unsent(svc):
    with _encoder(svc) as enc:
        enc.pin("0123456789abcdef", "vector")
        requests = enc.stats["requests"]
        ok, _, failures = enc.encode_block(["a", "b"])
    assert ok == [] and {f[1] for f in failures} == {ErrorCode.MODEL_CHANGED} and enc.stats["requests"] == requests


def test_concurrency_is_bounded_by_the_setting(svc):
    with _encoder(svc, concurrency=2, max_batch_size=5) as enc:
        ok, _, _ = enc.encode_block([f"c{i}" for i in range(50)])
    assert len(ok) == 50 and enc.stats["requests"] == 10
    assert 1 <= svc.stats()["max_in_flight"] <= 2


def test_openai_without_a_model_name_is_refused(svc):
    with _encoder(svc, protocol="openai") as enc, pytest.raises(ConfigError, match=r"needs a model name"):
        enc.identity  # noqa: B018
