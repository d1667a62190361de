"""``halfvec`` storage: the model checksum, run configuration, vector validation and index limits."""

from __future__ import annotations

import numpy as np
import pytest

from reindex.config import ReindexConfig, Storage
from reindex.embeddings.validation import validate_vectors
from reindex.errors import ConfigError, ErrorCode
from reindex.models import ModelSpec
from reindex.pipeline import check_index_dim, model_config

# Checksums of vector specs as they were before storage existed: every stored table is named by one.
PINNED = [
    (ModelSpec("test/model", "r1", 8, True, "local"), "bc6b9a03466ab8f0"),
    (ModelSpec("sentence-transformers/all-MiniLM-L6-v2", "0123456789abcdef", 384, True, "local", max_seq_length=256),
     "a42b40bc565fbc0c"),
    (ModelSpec("text-embedding-005", "default", 768, True, "vertex", precision="service"), "487b475fa7cb1629"),
]


@pytest.mark.parametrize(("spec", "checksum"), PINNED)
def test_vector_checksums_are_unchanged(spec, checksum):
    assert spec.storage == "vector"
    assert spec.checksum == checksum
    assert spec.stored_as("vector").checksum == checksum


@pytest.mark.parametrize(("spec", "checksum"), PINNED)
def test_halfvec_is_another_store(spec, checksum):
    half = spec.stored_as(Storage.HALFVEC)
    assert half.storage == "halfvec" and type(half.storage) is str  # plain text in manifests and XCom
    assert half.checksum != checksum
    assert half.stored_as("vector").checksum == checksum
    assert half.to_dict()["storage"] == "halfvec"


def test_unknown_storage_in_a_spec():
    with pytest.raises(ConfigError, match=r"storage 'float16' is not supported: choose one of \['vector', 'halfvec'\]"):
        ModelSpec("m", "r", 8, True, "local", storage="float16")


def test_config_storage():
    cfg = ReindexConfig(corpus="kb", corpus_uri="/data/kb")
    assert cfg.storage is Storage.VECTOR and cfg.to_dict()["storage"] == "vector"
    half = ReindexConfig.from_mapping({"corpus": "kb", "corpus_uri": "/data/kb", "storage": "halfvec"})
    assert half.storage is Storage.HALFVEC
    assert ReindexConfig.from_mapping(half.to_dict()) == half
    assert model_config(half)["storage"] == "halfvec"  # the registry keeps it for runs that follow the model
    assert ReindexConfig(corpus="kb", corpus_uri="/data/kb", storage="").storage is Storage.VECTOR
    with pytest.raises(ConfigError, match=r"storage 'fp16' is not supported: choose one of \['vector', 'halfvec'\]"):
        ReindexConfig(corpus="kb", corpus_uri="/data/kb", storage="fp16")


def test_index_dimension_limits():
    spec = ModelSpec("gemini-embedding-001", "default", 3072, True, "vertex", precision="service")
    vector = ReindexConfig(corpus="kb", corpus_uri="x", backend="vertex", model="gemini-embedding-001")
    with pytest.raises(ConfigError, match=r"makes 3072-d vectors, but pgvector's hnsw index on vector takes at most "
                                          r"2000 dimensions: choose storage=halfvec, a smaller output_dimensionality"):
        check_index_dim(vector, spec)
    check_index_dim(ReindexConfig(corpus="kb", corpus_uri="x", index_type="none"), spec)  # no index, no limit
    half = ReindexConfig(corpus="kb", corpus_uri="x", storage="halfvec", index_type="ivfflat")
    check_index_dim(half, spec)
    with pytest.raises(ConfigError, match=r"ivfflat index on halfvec takes at most 4000 dimensions: choose a smaller"):
        check_index_dim(half, ModelSpec("big", "r", 4096, True, "local"))


def test_values_beyond_half_precision_fail_per_vector():
    spec = ModelSpec("m", "r", 3, False, "local", storage="halfvec")
    vectors = np.array([[1, 2, 3], [70000, 0, 0], [np.nan, 1, 1], [-65504, 0, 1], [0, -65505, 0]], dtype=np.float32)
    checks = validate_vectors(vectors, spec)
    assert [c and c[1] for c in checks] == [None, ErrorCode.NON_FINITE, ErrorCode.NON_FINITE, None,
                                            ErrorCode.NON_FINITE]
    assert "magnitude 70000, beyond half precision (|x| <= 65504)" in checks[1][2]
    assert checks[2][2] == "vector contains NaN or infinite values"
    # float32 storage takes them; a normalising model's overflowing vector names the half range, not its norm
    assert [c and c[1] for c in validate_vectors(vectors, spec.stored_as("vector"))] == [
        None, None, ErrorCode.NON_FINITE, None, None]
    normed = ModelSpec("m", "r", 3, True, "local", storage="halfvec")
    assert "beyond half precision" in validate_vectors(np.array([[1e5, 0, 0]], np.float32), normed)[0][2]


def test_validation_tells_huge_finite_vectors_from_non_finite_ones():
    """The one-pass check (squared norms) overflows for huge finite values: those rows are looked at again,
    so they fail as not normalised with their real norm, and NaN/inf rows as non-finite."""
    spec = ModelSpec("m", "r", 2, True, "local")
    vectors = np.array([[0.6, 0.8], [3e19, 4e19], [np.inf, 0], [np.nan, 0], [0.6, 0.81]], dtype=np.float32)
    checks = validate_vectors(vectors, spec)
    assert [c and c[1] for c in checks] == [None, ErrorCode.NOT_NORMALIZED, ErrorCode.NON_FINITE,
                                            ErrorCode.NON_FINITE, ErrorCode.NOT_NORMALIZED]
    assert float(checks[1][2].split()[2]) == pytest.approx(5e19, rel=1e-6)
    assert checks[4][2] == "vector norm 1.0080 is not 1 (model normalises)"
