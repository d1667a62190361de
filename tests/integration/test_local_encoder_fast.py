"""LocalEncoder's token-sorted batches give plain SentenceTransformer.encode()'s vectors, in input order."""

from __future__ import annotations

import numpy as np
import pytest

from reindex.errors import ConfigError

TEXTS = [
    "short",
    "Фотосинтез — процесс, при котором растения превращают энергию света в химическую энергию сахаров.",
    "Plants use sunlight, water and carbon dioxide to make sugars and release oxygen as a by-product.",
    "Ёж",
    " ".join(["Длинный русский текст о чае, велосипедах и тайге."] * 30),
    " ".join(["A long English text about tea, bicycles and the taiga."] * 30),
    "",
    "Mixed: привет, world! 123",
] * 5


def test_sorted_batches_match_plain_encode(encoder):
    plain = encoder.model.encode(TEXTS, batch_size=encoder.batch_size, normalize_embeddings=True,
                                 convert_to_numpy=True)
    ours = encoder.encode(TEXTS)
    assert ours.dtype == np.float32 and ours.shape == plain.shape
    assert float(np.abs(ours - plain).max()) <= 1e-5
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    lengths = encoder.token_lengths(TEXTS)
    assert lengths.max() <= encoder.model.max_seq_length and lengths.min() >= 2


def test_small_batches_and_single_text(encoder):
    from reindex.embeddings.local import LocalEncoder

    small = LocalEncoder("default", batch_size=3)
    one = small.encode(TEXTS[:1])
    many = small.encode(TEXTS[:7])
    np.testing.assert_allclose(one[0], many[0], atol=1e-5)
    np.testing.assert_allclose(many, encoder.encode(TEXTS[:7]), atol=1e-5)


def test_fp16_is_a_different_model_and_needs_cuda():
    import dataclasses

    from reindex.embeddings.local import LocalEncoder

    with pytest.raises(ConfigError, match="needs a CUDA device"):
        LocalEncoder("default", device="cpu", precision="fp16")
    with pytest.raises(ConfigError, match="not supported"):
        LocalEncoder("default", precision="int8")
    spec = LocalEncoder("default", device="cpu").spec
    assert spec.precision == "fp32"
    assert dataclasses.replace(spec, precision="fp16").checksum != spec.checksum


def test_prepare_ahead_keeps_order_and_errors():
    from reindex.embeddings.local import _ahead

    items = list(range(7))
    assert list(_ahead(items, lambda i: i * i, threaded=True)) == [(i, i * i) for i in items]
    assert list(_ahead(items, lambda i: i * i, threaded=False)) == [(i, i * i) for i in items]
    assert list(_ahead([], lambda i: i, threaded=True)) == []

    def boom(i):
        if i == 3:
            raise ValueError("bad batch")
        return i

    got = []
    with pytest.raises(ValueError, match="bad batch"):
        for item, _ in _ahead(items, boom, threaded=True):
            got.append(item)
    assert got == [0, 1, 2]


def test_threaded_tokenization_gives_the_same_vectors(encoder, monkeypatch):
    """The CUDA path (tokenizing ahead in a thread) forced on CPU: same vectors."""
    from reindex.embeddings import local

    plain = encoder.encode(TEXTS)
    real = local._ahead
    monkeypatch.setattr(local, "_ahead", lambda items, prepare, threaded: real(items, prepare, threaded=True))
    np.testing.assert_array_equal(encoder.encode(TEXTS), plain)
