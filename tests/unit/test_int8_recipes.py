"""The int8 recipes benchmark names layers of the real export: its MatMul kinds must split the exported graph's
MatMuls exactly as NNCF's ignored scope matches them (``re.match``: a prefix match)."""

from __future__ import annotations

import re

import pytest


@pytest.fixture(scope="module")
def matmuls(tmp_path_factory) -> list[str]:
    """The MatMul node names of the bundled MiniLM as the project exports it (ONNX)."""
    import onnx

    from reindex.embeddings import local, runtimes
    from reindex.embeddings.local import LocalEncoder

    mp = pytest.MonkeyPatch()
    mp.setenv("REINDEX_ENCODER_CACHE", str(tmp_path_factory.mktemp("encoders")))
    local._load_for_runtime.cache_clear()
    runtimes._onnx_session.cache_clear()
    try:
        enc = LocalEncoder("default", encoder="onnx")
        enc.encode(["warm"])
        return [n.name for n in onnx.load(str(enc.export.onnx)).graph.node if n.op_type == "MatMul"]
    finally:
        local._load_for_runtime.cache_clear()
        runtimes._onnx_session.cache_clear()
        mp.undo()


def _matched(patterns: list[str], names: list[str]) -> set[str]:
    """What NNCF's ignored scope takes for ``patterns`` (nncf/scopes.py: ``filter(re.compile(p).match, names)``)."""
    return {n for p in patterns for n in names if re.compile(p).match(n)}


def test_kinds_split_the_exported_matmuls_one_kind_each(matmuls):
    from benchmarks.int8_recipes import KINDS

    assert len(matmuls) == 48  # 6 layers × (q, k, v, QKᵀ, attention·V, attention output, FFN in, FFN out)
    per_kind = {kind: _matched([p], matmuls) for kind, p in KINDS.items()}
    assert {k: len(v) for k, v in per_kind.items()} == {"qkv": 18, "qk": 6, "pv": 6, "attn_out": 6, "ffn_in": 6,
                                                         "ffn_out": 6}
    # 48 names in all and 48 matches: every MatMul has exactly one kind
    assert set().union(*per_kind.values()) == set(matmuls)


@pytest.mark.parametrize("kind", ["qkv", "qk", "pv", "attn_out", "ffn_in", "ffn_out"])
def test_a_recipe_of_one_kind_quantises_that_kind_only(matmuls, kind):
    from benchmarks.int8_recipes import KINDS, RECIPES

    _, recipe, settings, _ = RECIPES[f"only-{kind}"]
    ignored = settings["ignored"]
    assert recipe == "static" and ignored["types"] == ["Gather"]  # the embedding tables stay float
    left = set(matmuls) - _matched(ignored["patterns"], matmuls)
    assert left == _matched([KINDS[kind]], matmuls) and len(left) == (18 if kind == "qkv" else 6)
