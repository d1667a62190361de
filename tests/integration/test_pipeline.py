"""The pipeline stages with the real bundled model and a real store (no Airflow)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from psycopg import sql

from reindex import pipeline
from reindex.config import ReindexConfig
from reindex.errors import ConfigError, EmptyCorpusError
from reindex.store.search import corpus_status, search

DOCS = {
    "photo.txt": "Photosynthesis: green plants use chlorophyll to turn sunlight, water and carbon dioxide "
                 "into glucose and oxygen.",
    "volcano.md": "# Volcanoes\n\nA volcano erupts when molten magma rises through the crust.",
    "baikal.txt": "Байкал — самое глубокое озеро на Земле, его глубина больше полутора километров.",
}


@pytest.fixture
def corpus_dir(tmp_path):
    for name, text in DOCS.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    (tmp_path / "broken.txt").write_bytes(b"\xff\xfe\x00 not utf-8")
    return tmp_path


def _run(store, cfg, root, batch_id, encoder):
    prepared = pipeline.prepare(store, cfg)
    manifest = pipeline.chunk_corpus(store, cfg, root, batch_id=batch_id, model_checksum=prepared["model_checksum"])
    results = [pipeline.encode_partition(store, cfg, p, model_checksum=prepared["model_checksum"], encoder=encoder)
               for p in pipeline.plan(store, cfg, batch_id)]
    return manifest, results, pipeline.finish_batch(store, cfg, batch_id, prepared["model_checksum"])


def test_local_batch_end_to_end(store, corpus_dir, encoder):
    cfg = ReindexConfig(corpus="kb", corpus_uri=str(corpus_dir), partition_size=100)
    manifest, results, summary = _run(store, cfg, corpus_dir, "b1", encoder)
    assert manifest["documents"] == 3 and manifest["failed_documents"] == 1
    assert manifest["document_failures"][0]["error_code"] == "DECODE_ERROR"
    # every chunk READY, but a document could not be read: not plain success
    assert summary.status.value == "COMPLETED_WITH_ERRORS" and summary.ready == manifest["chunks"] == 3
    assert (summary.failed, summary.failed_documents, summary.documents_by_reason) == (0, 1, {"DECODE_ERROR": 1})
    assert sum(r["ready"] for r in results) == 3
    q = encoder.encode(["how do plants make sugar from light"])[0]
    assert search(store, "kb", q, k=1)[0].doc_id == "photo.txt"
    # vectors are the model's, normalised
    (vec,) = store.one(sql.SQL("SELECT e.embedding::text FROM {} e").format(store.t(manifest["vector_table"])) + sql.SQL(" LIMIT 1"))
    arr = np.array(json.loads(str(vec)), dtype=np.float32)
    assert arr.shape == (384,) and abs(np.linalg.norm(arr) - 1) < 1e-3

    # a second run re-embeds nothing; force re-embeds everything
    m2, _, s2 = _run(store, cfg, corpus_dir, "b2", encoder)
    assert (m2["pending"], m2["reused"], s2.status.value, s2.total) == (0, 3, "COMPLETED_WITH_ERRORS", 0)
    forced = ReindexConfig(corpus="kb", corpus_uri=str(corpus_dir), partition_size=100, force=True)
    m3, _, s3 = _run(store, forced, corpus_dir, "b3", encoder)
    assert (m3["pending"], s3.ready) == (3, 3)
    assert corpus_status(store, "kb")["chunks"] == {"READY": 3, "PENDING": 0, "FAILED": 0}


class FlakyEncoder:
    """The real encoder, except that texts containing ``poison`` raise (``transient``: like CUDA OOM)."""

    def __init__(self, inner, poison: str, transient: bool):
        self.inner, self.poison, self.transient, self.calls = inner, poison, transient, 0

    @property
    def spec(self):
        return self.inner.spec

    def encode(self, texts):
        self.calls += 1
        if any(self.poison in t for t in texts):
            raise RuntimeError("CUDA out of memory" if self.transient else "tokenizer exploded")
        return self.inner.encode(texts)


@pytest.mark.parametrize("transient,code,retriable", [(True, "TRANSIENT_ENCODER_ERROR", 1), (False, "ENCODER_ERROR", 0)])
def test_encoder_failure_fails_only_the_offending_chunk(store, corpus_dir, encoder, transient, code, retriable):
    cfg = ReindexConfig(corpus="kb", corpus_uri=str(corpus_dir), partition_size=100)
    flaky = FlakyEncoder(encoder, "magma", transient)
    _, results, summary = _run(store, cfg, corpus_dir, "b1", flaky)
    assert (summary.status.value, summary.ready, summary.failed, summary.retriable) == (
        "COMPLETED_WITH_ERRORS", 2, 1, retriable)
    assert summary.counts_by_reason == {code: 1}
    assert summary.sample_errors[0]["chunk_id"] == "volcano.md#0"
    assert "encoder failed: RuntimeError" in summary.sample_errors[0]["error_message"]


def test_empty_corpus_fails_with_a_clear_message(store, tmp_path, encoder):
    (tmp_path / "picture.png").write_bytes(b"\x89PNG")
    cfg = ReindexConfig(corpus="empty", corpus_uri=str(tmp_path))
    prepared = pipeline.prepare(store, cfg)
    with pytest.raises(EmptyCorpusError, match=r"corpus 'empty' at .* is empty: .*1 file\(s\) of other types skipped"):
        pipeline.chunk_corpus(store, cfg, tmp_path, batch_id="b1", model_checksum=prepared["model_checksum"])
    (n,) = store.one(sql.SQL("SELECT count(*) FROM {}").format(store.t("batches")))
    assert n == 0  # the transaction rolled back: nothing half-written


def test_max_tokens_over_the_model_limit_is_rejected(store, tmp_path):
    cfg = ReindexConfig(corpus="kb", corpus_uri=str(tmp_path), max_tokens=300, overlap_tokens=10)
    with pytest.raises(ConfigError, match=r"max_tokens=300 exceeds the limit of model .*: at most 254 tokens"):
        pipeline.prepare(store, cfg)


def test_switching_a_corpus_to_halfvec_is_an_upgrade(store, corpus_dir, encoder, capsys):
    """The same model stored as halfvec is another store: reindex_model_upgrade's stages fill it and switch;
    later runs that follow the active model keep halfvec (restored from the registry's run config). The
    vector store's vectors are cast, not embedded again — except one beyond the half range."""
    from reindex.store.vectors import get_embedding_store

    cfg = ReindexConfig(corpus="kb", corpus_uri=str(corpus_dir), partition_size=100)
    _, _, first = _run(store, cfg, corpus_dir, "b1", encoder)
    vector = get_embedding_store(store, "kb")
    assert first.ready == 3 and vector.storage == "vector"
    old = dict(store.execute(sql.SQL("SELECT chunk_pk, embedding::text FROM {} ORDER BY chunk_pk").format(
        store.t(vector.table_name))).fetchall())
    huge_pk = min(old)
    store.execute(sql.SQL("UPDATE {} SET embedding = ('[' || array_to_string(array_fill(70000, ARRAY[384]), ',') || ']')"
                          "::vector WHERE chunk_pk = %s").format(store.t(vector.table_name)), (huge_pk,))

    up = ReindexConfig(corpus="kb", corpus_uri="store", model=cfg.model, storage="halfvec", partition_size=100)
    manifest = pipeline.prepare_upgrade(store, up, batch_id="u1", dim=384)
    checksum = manifest["model_checksum"]
    assert checksum == encoder.spec.stored_as("halfvec").checksum != vector.model_checksum
    assert (manifest["pending"], manifest["converted"], manifest["model"]["storage"]) == (1, 2, "halfvec")
    for part in pipeline.plan(store, up, "u1"):
        pipeline.encode_partition(store, up, part, model_checksum=checksum, encoder=encoder)
    summary = pipeline.finish_batch(store, up, "u1", checksum)
    assert (summary.total, summary.ready, summary.reused) == (1, 1, 2)
    stored = dict(store.execute(sql.SQL("SELECT chunk_pk, embedding::text FROM {} ORDER BY chunk_pk").format(
        store.t(get_embedding_store(store, "kb", checksum).table_name))).fetchall())
    for pk, text in old.items():  # the cast rounds exactly as storing the float32 vector as halfvec does
        new, before = np.array(json.loads(stored[pk]), np.float16), np.array(json.loads(text), np.float32)
        if pk == huge_pk:  # embedded again (alone, not in a batch of 3): the same vector up to float noise
            assert float(np.dot(new.astype(np.float32), before)) > 0.9999
            continue
        assert np.array_equal(new, before.astype(np.float16)), pk

    assert pipeline.finish_upgrade(store, "kb", "u1", checksum, retention_seconds=3600)["previous_model_checksum"] \
        == vector.model_checksum

    half = get_embedding_store(store, "kb")
    assert (half.model_checksum, half.storage) == (checksum, "halfvec")
    st = corpus_status(store, "kb")
    assert st["model"]["storage"] == "halfvec" and {s["storage"] for s in st["stores"]} == {"vector", "halfvec"}
    from reindex.cli import main

    assert main(["--dsn", store.conn.info.dsn, "--schema", store.schema, "status", "--corpus", "kb"]) == 0
    out = capsys.readouterr().out
    assert f"{half.table_name} (halfvec, index {half.table_name}_hnsw)" in out
    assert f"{vector.table_name} [RETIRED] 384-d (vector, index {vector.table_name}_hnsw)" in out
    q = encoder.encode(["how do plants make sugar from light"])[0]
    assert search(store, "kb", q, k=1)[0].doc_id == "photo.txt"

    # a run with `model` empty (a nightly one) follows the active model, storage included: nothing to embed
    prepared = pipeline.prepare(store, cfg)
    assert (prepared["model_checksum"], prepared["config"]["storage"]) == (checksum, "halfvec")
    m2 = pipeline.chunk_corpus(store, ReindexConfig.from_mapping(prepared["config"]), corpus_dir, batch_id="b2",
                               model_checksum=checksum)
    assert (m2["pending"], m2["reused"]) == (0, 3)
    # naming the model with the other storage is refused with the way forward
    with pytest.raises(ConfigError, match=r"384-d halfvec, .* asks for 'all-MiniLM-L6-v2' \(384-d vector, .*"
                                          r"reindex_model_upgrade"):
        pipeline.prepare(store, ReindexConfig(corpus="kb", corpus_uri=str(corpus_dir), model=cfg.model))
