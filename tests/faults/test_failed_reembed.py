"""An edited document whose new text the encoder refuses: the chunk fails with its reason — and must not
keep serving the vector of its old text (vector rows = READY chunks)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from psycopg import sql

from reindex import pipeline
from reindex.config import ReindexConfig
from reindex.store.search import search
from reindex.store.vectors import ensure_embedding_store
from tests.faults.conftest import check_invariants
from tests.faults.killable import HASH_SPEC, HashEncoder

pytestmark = pytest.mark.faults


class RefusingEncoder(HashEncoder):
    """Refuses (terminally) any text containing ``marker``."""

    def __init__(self, marker: str) -> None:
        super().__init__(HASH_SPEC)
        self.marker = marker

    def encode(self, texts: list[str]) -> np.ndarray:
        if any(self.marker in t for t in texts):
            raise ValueError("input contains a token the model cannot encode")
        return super().encode(texts)


def _run(store, cfg: ReindexConfig, batch_id: str, encoder) -> dict:
    pipeline.chunk_corpus(store, cfg, Path(cfg.corpus_uri), batch_id=batch_id, model_checksum=HASH_SPEC.checksum)
    for part in pipeline.plan(store, cfg, batch_id):
        pipeline.encode_partition(store, cfg, part, model_checksum=HASH_SPEC.checksum, encoder=encoder)
    return pipeline.finish_batch(store, cfg, batch_id, HASH_SPEC.checksum).to_dict()


def test_an_edited_document_that_fails_to_embed_keeps_no_stale_vector(store, tmp_path):
    corpus = "fault_stale_vector"
    root = tmp_path / "kb"
    root.mkdir()
    for i in range(3):
        (root / f"d{i}.txt").write_text(f"Buoy {i} marks the channel with a green light.", encoding="utf-8")
    cfg = ReindexConfig(corpus=corpus, corpus_uri=str(root))
    with store.conn.transaction():
        ensure_embedding_store(store, corpus, HASH_SPEC)
    assert _run(store, cfg, "b1", HashEncoder())["status"] == "COMPLETED"
    (old_text,) = store.one(sql.SQL("SELECT text FROM {} WHERE corpus = %s AND doc_id = 'd0.txt'").format(
        store.t("chunks")), (corpus,))
    old_vector = HashEncoder().encode([old_text])[0]

    (root / "d0.txt").write_text("Buoy 0 was moved; ⛔ its light is now red.", encoding="utf-8")
    summary = _run(store, cfg, "b2", RefusingEncoder("⛔"))
    assert (summary["status"], summary["total"], summary["counts_by_reason"]) == ("FAILED", 1, {"ENCODER_ERROR": 1})

    hits = search(store, corpus, old_vector, k=3)
    assert "d0.txt" not in [h.doc_id for h in hits], "the FAILED chunk is served with its old text's vector"
    assert check_invariants(store, corpus, good_docs=["d1.txt", "d2.txt"]) == {
        "documents": {"OK": 3, "FAILED": 0}, "failed_documents": {},
        "chunks": {"READY": 2, "PENDING": 0, "FAILED": 1}, "failed_chunks": {"ENCODER_ERROR": 1}, "vectors": 2}
