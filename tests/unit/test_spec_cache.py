"""The model spec cache: ``prepare`` needs only the model's identity, so once computed for a model directory it is
read back without loading (or hashing) the weights, until any file of the directory changes."""

from __future__ import annotations

import os
import shutil

import pytest

from reindex.embeddings import local
from reindex.models import resolve_model_path


@pytest.fixture
def model_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("REINDEX_ENCODER_CACHE", str(tmp_path / "cache" / "encoders"))
    return shutil.copytree(resolve_model_path("default"), tmp_path / "minilm")


def test_a_spec_is_computed_once_per_directory_state(model_dir, monkeypatch):
    cache = os.environ["REINDEX_ENCODER_CACHE"]
    first = local.LocalEncoder(str(model_dir)).spec
    assert (first.dim, first.runtime) == (384, "torch")
    assert len(list(local.spec_cache_dir().glob("*.json"))) == 1

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(local, "_load", no_load)
    monkeypatch.setattr(local, "model_revision", no_load)
    again = local.LocalEncoder(str(model_dir)).spec
    assert again == first and again.checksum == first.checksum
    # other options are another spec (normalisation is in the checksum): computed, not read
    with pytest.raises(AssertionError, match="the model was loaded"):
        _ = local.LocalEncoder(str(model_dir), normalize=False).spec

    # any file touched: computed again (and, the content being the same, the same spec)
    cfg = model_dir / "config.json"
    st = cfg.stat()
    os.utime(cfg, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    with pytest.raises(AssertionError, match="the model was loaded"):
        _ = local.LocalEncoder(str(model_dir)).spec
    monkeypatch.undo()
    monkeypatch.setenv("REINDEX_ENCODER_CACHE", cache)
    assert local.LocalEncoder(str(model_dir)).spec == first
    assert len(list(local.spec_cache_dir().glob("*.json"))) == 2


def test_an_unwritable_cache_is_skipped(model_dir, monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("REINDEX_ENCODER_CACHE", str(blocker / "encoders"))  # its parent is a file
    assert local.LocalEncoder(str(model_dir)).spec.dim == 384
