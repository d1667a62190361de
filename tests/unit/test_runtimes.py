"""Local encoder runtimes: the export cache (a second run exports nothing), the checksum separation, and
fp32 ONNX Runtime / OpenVINO vectors equal to torch's within 1e-5 cosine."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from reindex.config import Encoder, ReindexConfig
from reindex.errors import ConfigError
from reindex.models import ModelSpec
from tests.conftest import SAMPLE_CORPUS

TEXTS = [
    "Honey bees survive the winter by clustering together and shivering to keep warm.",
    "Пчёлы зимуют в клубе и согреваются, сокращая грудные мышцы.",
    "PostgreSQL VACUUM reclaims storage occupied by dead tuples.",
    "short",
    " ".join(["A long text that is truncated by the model's own limit."] * 60),
]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh export cache and fresh in-process caches (a new worker process, as far as the encoder knows)."""
    from reindex.embeddings import local, runtimes

    monkeypatch.setenv("REINDEX_ENCODER_CACHE", str(tmp_path / "encoders"))

    def fresh():
        local._load_for_runtime.cache_clear()
        runtimes._onnx_session.cache_clear()
        runtimes._openvino_model.cache_clear()

    fresh()
    yield fresh
    fresh()


def _cosines(a, b):
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_checksums_separate_runtimes_and_keep_torch_ones():
    spec = ModelSpec(model_id="m", revision="r", dim=384, normalized=True, backend="local")
    # the torch checksum is the one made before runtimes existed (no "runtime" key in its identity)
    legacy = {"model_id": "m", "revision": "r", "dim": 384, "normalized": True, "backend": "local",
              "precision": "fp32"}
    assert spec.checksum == hashlib.sha256(json.dumps(legacy, sort_keys=True).encode()).hexdigest()[:16]
    from dataclasses import replace

    variants = {
        "torch": spec,
        "onnx": replace(spec, runtime="onnx"),
        "openvino": replace(spec, runtime="openvino"),
        "openvino-bf16": replace(spec, runtime="openvino", precision="bf16"),
        "onnx halfvec": replace(spec, runtime="onnx", storage="halfvec"),
    }
    assert len({v.checksum for v in variants.values()}) == len(variants)
    assert variants["onnx"].to_dict()["runtime"] == "onnx"


def test_encoder_config_is_validated():
    assert ReindexConfig(corpus="c", corpus_uri="x").encoder == Encoder.TORCH
    assert ReindexConfig(corpus="c", corpus_uri="x", encoder="openvino").to_dict()["encoder"] == "openvino"
    with pytest.raises(ConfigError, match=r"encoder 'tensorrt' is not supported: choose one of \['torch', 'onnx'"):
        ReindexConfig(corpus="c", corpus_uri="x", encoder="tensorrt")
    with pytest.raises(ConfigError, match="encoder=onnx runs the model in this worker: it needs backend=local"):
        ReindexConfig(corpus="c", corpus_uri="x", encoder="onnx", backend="vertex")
    from reindex.embeddings.local import LocalEncoder

    with pytest.raises(ConfigError, match="encoder=onnx runs on the CPU; device 'cuda' needs encoder=torch"):
        LocalEncoder("default", encoder="onnx", device="cuda")


def test_onnx_export_cached_and_equal_to_torch(cache, encoder, monkeypatch):
    from reindex.embeddings import runtimes
    from reindex.embeddings.local import LocalEncoder

    first = LocalEncoder("default", encoder="onnx")
    vectors = first.encode(TEXTS)
    assert first.export.exported and first.export.onnx.is_file()
    meta = json.loads((first.export.path / "export.json").read_text())
    torch_spec = encoder.spec
    assert meta["checksum"] == torch_spec.checksum and first.export.path.name.startswith(torch_spec.checksum)
    assert meta["max_abs_diff_vs_torch"] <= runtimes.EXPORT_TOLERANCE
    assert first.spec.runtime == "onnx" and first.spec.precision == "fp32"
    assert first.spec.checksum != torch_spec.checksum and first.spec.dim == torch_spec.dim
    reference = encoder.encode(TEXTS)
    assert vectors.shape == reference.shape and vectors.dtype == np.float32
    assert 1 - _cosines(vectors, reference).min() <= 1e-5

    # a second run (a new process: in-process caches cleared) exports nothing
    cache()
    monkeypatch.setattr(runtimes, "_export_onnx", lambda *a, **k: pytest.fail("exported a second time"))
    second = LocalEncoder("default", encoder="onnx")
    again = second.encode(TEXTS)
    assert not second.export.exported and second.export.path == first.export.path
    assert second.spec.checksum == first.spec.checksum
    np.testing.assert_array_equal(again, vectors)


def test_openvino_fp32_equal_to_torch_and_reuses_the_onnx_export(cache, encoder, monkeypatch):
    pytest.importorskip("openvino")
    from reindex.embeddings import runtimes
    from reindex.embeddings.local import LocalEncoder

    onnx = LocalEncoder("default", encoder="onnx")
    onnx.encode(TEXTS[:1])
    cache()
    monkeypatch.setattr(runtimes, "_export_onnx", lambda *a, **k: pytest.fail("the ONNX graph was exported again"))
    ov = LocalEncoder("default", encoder="openvino")
    vectors = ov.encode(TEXTS)
    assert ov.export.exported and ov.export.openvino.is_file()  # only the OpenVINO IR was made
    assert ov.spec.runtime == "openvino" and ov.spec.checksum not in (onnx.spec.checksum, encoder.spec.checksum)
    assert 1 - _cosines(vectors, encoder.encode(TEXTS)).min() <= 1e-5


def test_openvino_streams_run_batches_at_once_with_the_same_vectors(cache, monkeypatch):
    """OpenVINO runs ``REINDEX_ENCODER_STREAMS`` batches at once (an AsyncInferQueue, results put from its
    threads): the vectors equal one stream's, a few texts are split so each stream has a batch, and an error in a
    batch or in the tokenizing loop is raised in the caller once the batches in flight are done."""
    pytest.importorskip("openvino")
    import threading

    from reindex.embeddings import runtimes
    from reindex.embeddings.local import LocalEncoder

    texts = [f"{t} ({i})" for i in range(12) for t in TEXTS]
    got = {}
    for streams in ("1", "2"):
        cache()
        monkeypatch.setenv("REINDEX_ENCODER_STREAMS", streams)
        enc = LocalEncoder("default", encoder="openvino", batch_size=8)
        got[streams] = enc.encode(texts)
        assert enc._runtime[1].streams == int(streams)
    np.testing.assert_allclose(got["2"], got["1"], atol=2e-6)
    assert got["2"].shape == (len(texts), 384)
    np.testing.assert_allclose(np.linalg.norm(got["2"], axis=1), 1.0, atol=1e-5)

    forward = enc._runtime[1]
    seen, keys, sizes = [], [], []

    def spy(key, emb):
        seen.append(threading.get_ident())
        sizes.append(len(emb))
        keys.append(key)

    model = enc._runtime[0]
    feats = [(i, {k: v.numpy() for k, v in model.preprocess(TEXTS[i:i + 2]).items() if hasattr(v, "numpy")})
             for i in range(0, 4, 2)]
    forward.run_all(feats, spy)
    assert sorted(keys) == [0, 2] and sizes == [2, 2]
    assert threading.get_ident() not in seen  # put from the queue's threads
    spied = []
    monkeypatch.setattr(forward, "run_all", lambda items, put: (spied.extend(len(i) for i, _ in items),
                                                                 runtimes._OpenVinoForward.run_all(forward, [], put)))
    with pytest.raises(RuntimeError, match="returned vectors for 0 of 3 texts"):
        enc.encode(TEXTS[:3])  # nothing was put: rows left unset are never returned as vectors
    assert spied == [2, 1]  # 3 texts, 2 streams: batches of 2 and 1, not one batch of 3
    monkeypatch.undo()

    def broken(key, emb):
        raise RuntimeError(f"put failed for {key}")

    with pytest.raises(RuntimeError, match="put failed for"):
        forward.run_all(feats, broken)

    def items():
        yield feats[0]
        raise ValueError("tokenizer broke")

    done = []
    with pytest.raises(ValueError, match="tokenizer broke"):
        forward.run_all(items(), lambda k, e: done.append(k))
    assert done == [0]  # the batch in flight finished before the error was raised
    np.testing.assert_allclose(forward(feats[0][1]), forward(feats[0][1]))  # the queue is usable again


def test_encoder_streams_and_threads_are_validated(monkeypatch):
    from reindex.embeddings import runtimes

    for var, fn in (("REINDEX_ENCODER_STREAMS", runtimes._streams), ("REINDEX_ENCODER_THREADS", runtimes._threads)):
        for bad in ("0", "two", "-1"):
            monkeypatch.setenv(var, bad)
            with pytest.raises(ConfigError, match=f"{var}={bad!r} must be a positive integer"):
                fn()
    monkeypatch.setenv("REINDEX_ENCODER_STREAMS", "3")
    assert runtimes._streams() == 3
    monkeypatch.delenv("REINDEX_ENCODER_STREAMS")
    assert runtimes._streams() is None


def test_openvino_bf16_agrees_or_is_refused(cache, encoder):
    """bf16: top-10 agreement with fp32 torch ≥ 0.97 on the sample corpus's documents where the CPU has bf16;
    refused with the reason where it has not (it would store fp32 numbers under the bf16 name)."""
    ov = pytest.importorskip("openvino")
    from reindex.corpus import CorpusReader, Document
    from reindex.embeddings.local import LocalEncoder
    from reindex.quality import vector_agreement

    bf16 = LocalEncoder("default", encoder="openvino-bf16")
    if "BF16" not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        with pytest.raises(ConfigError, match="needs a CPU with bfloat16 support"):
            bf16.encode(TEXTS)
        return
    docs = [d.text for d in CorpusReader(SAMPLE_CORPUS) if isinstance(d, Document)][:200]
    a = vector_agreement(encoder.encode(docs), bf16.encode(docs), k=10)
    assert bf16.spec.precision == "bf16"
    assert a.top_k_agreement >= 0.97 and a.min_cosine >= 0.999, a


def test_a_model_with_dense_layers_exports(cache, model_768):
    from reindex.embeddings.local import LocalEncoder

    torch_vectors = LocalEncoder(str(model_768)).encode(TEXTS)
    onnx = LocalEncoder(str(model_768), encoder="onnx")
    vectors = onnx.encode(TEXTS)
    assert vectors.shape == (len(TEXTS), 768)
    assert 1 - _cosines(vectors, torch_vectors).min() <= 1e-5


def test_an_interrupted_export_leaves_no_cache_entry(cache, tmp_path, monkeypatch):
    from reindex.embeddings import runtimes
    from reindex.embeddings.local import LocalEncoder

    def broken(model, checksum, out):
        (out / "model.onnx").write_bytes(b"half a graph")
        raise RuntimeError("killed mid-export")

    monkeypatch.setattr(runtimes, "_export_onnx", broken)
    with pytest.raises(RuntimeError, match="killed mid-export"):
        LocalEncoder("default", encoder="onnx").encode(TEXTS[:1])
    root = tmp_path / "encoders"
    assert [p.name for p in root.iterdir() if not p.name.startswith(".")] == []  # nothing published
    assert not [p for p in root.iterdir() if p.is_dir()]  # the temporary folder is gone too
