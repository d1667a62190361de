"""Model resolution offline: a directory, a model in the local Hugging Face cache, or our own error."""

from __future__ import annotations

import pytest

from reindex.errors import ConfigError
from reindex.models import resolve_model_path


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache of the test's own (read at call time, as the deployment's would be)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    resolve_model_path.cache_clear()
    yield cache
    resolve_model_path.cache_clear()


def test_unknown_hub_model_names_the_model_the_cache_and_the_offline_remedy(hf_cache):
    with pytest.raises(ConfigError) as exc:
        resolve_model_path("acme/no-such-model")
    msg = str(exc.value)
    folder = hf_cache / "models--acme--no-such-model"
    assert msg.startswith("model 'acme/no-such-model' is not available offline: no directory ")
    assert f"no copy in the local Hugging Face cache ({folder} does not exist)" in msg
    assert "`hf download acme/no-such-model`" in msg and f"pointing at {hf_cache}" in msg
    assert "give that directory's path as the model" in msg
    assert "local_files_only" not in msg and "outgoing traffic" not in msg  # not Hugging Face's online advice
    assert exc.value.__cause__ is None and exc.value.__suppress_context__


def test_a_partial_cache_entry_is_named_as_such(hf_cache):
    (hf_cache / "models--acme--half" / "blobs").mkdir(parents=True)  # an interrupted download: no snapshot
    with pytest.raises(ConfigError, match=r"models--acme--half has no usable snapshot\)"):
        resolve_model_path("acme/half")


def test_a_missing_directory_that_is_no_hub_id(hf_cache, tmp_path):
    missing = tmp_path / "models" / "my model"  # a space: not a valid hub id either
    with pytest.raises(ConfigError) as exc:
        resolve_model_path(str(missing))
    assert str(exc.value) == (
        f"model {str(missing)!r} is not available offline: no directory {missing} (and it is not a valid Hugging "
        "Face model id). Weights are never downloaded at run time: give the path of an existing model directory, "
        "or a model id from the local Hugging Face cache.")


def test_a_file_is_not_a_model_directory(hf_cache, tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"\0")
    with pytest.raises(ConfigError, match=r"model\.safetensors is a file; give the model's directory"):
        resolve_model_path(str(f))


def test_a_model_pre_downloaded_into_the_cache_resolves_to_its_snapshot(hf_cache):
    repo = hf_cache / "models--acme--tiny"
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    assert resolve_model_path("acme/tiny") == snapshot


def test_a_directory_resolves_to_itself(hf_cache, tmp_path):
    d = tmp_path / "local-model"
    d.mkdir()
    assert resolve_model_path(str(d)) == d.resolve()
